"""Plain data that flows through the engine: sampling parameters, requests and their outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Temperatures below this are treated as greedy: dividing logits by a smaller number risks
# overflowing fp32, and the resulting distribution is argmax in all but name anyway.
GREEDY_TEMPERATURE = 1e-5


def has_penalties(presence: float, frequency: float, repetition: float) -> bool:
    """Whether these penalties change any logit (0, 0 and 1 leave them all as they are)."""
    return presence != 0 or frequency != 0 or repetition != 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop.

    Attributes:
        max_tokens: cap on new tokens (>= 1).
        temperature: logits are divided by it; 0 (anything below ``GREEDY_TEMPERATURE``) is greedy.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p;
            1.0 keeps everything. Must lie in (0, 1].
        top_k: keep the k most likely tokens; -1 or 0 turns it off.
        seed: per-request seed; ``None`` lets the engine draw one when it admits the request.
        stop: strings that end generation; the returned text stops before the first match.
            A single string is accepted and turned into a one-element list, None into [].
        stop_token_ids: token ids that end generation (in addition to EOS); the one that
            does stays in the output's ids but adds no text. None is [].
        ignore_eos: keep generating after EOS (benchmarks).
        logprobs: return the log-probability of every sampled token.
        n: completions per prompt.
        presence_penalty: subtracted from the logit of every token the request has generated
            so far, in [-2, 2] (OpenAI's definition; positive values discourage repeats).
        frequency_penalty: subtracted once per earlier occurrence in the generated tokens, in
            [-2, 2].
        repetition_penalty: > 0; tokens seen in the prompt or the output have positive logits
            divided by it and negative ones multiplied by it (the CTRL paper's penalty, as in
            transformers and vLLM); 1 turns it off.
        Penalties apply before temperature, top-k and top-p, to greedy rows too; the order is
        vLLM's: repetition, then frequency and presence.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self._normalise()

    def _normalise(self) -> None:
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return has_penalties(self.presence_penalty, self.frequency_penalty,
                             self.repetition_penalty)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field; also normalise ``stop``."""
        self._normalise()
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or -1/0 to turn it off, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be None or an integer in the int64 range, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got "
                             f"{self.repetition_penalty!r}")


@dataclass
class EngineRequest:
    """One prompt as the engine core receives it (token ids only; text lives in the front end).

    Attributes:
        hint: the client's predicted output length (``predicted_tokens``), for the scheduler.
        target_len: hidden benchmark length: the engine stops the request there with
            finish_reason "length". Predictors never see it.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    hint: int | None = None
    target_len: int | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` on an empty prompt, out-of-vocabulary ids or bad params."""
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids is empty")
        if vocab_size is not None:
            bad = [t for t in self.prompt_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"request {self.request_id!r}: prompt token ids {bad[:5]} outside [0, {vocab_size})"
                )
        if self.hint is not None and (not _is_int(self.hint) or self.hint < 1):
            raise ValueError(f"request {self.request_id!r}: hint must be an integer >= 1, got {self.hint!r}")
        if self.target_len is not None and (not _is_int(self.target_len) or self.target_len < 1):
            raise ValueError(
                f"request {self.request_id!r}: target_len must be an integer >= 1, got {self.target_len!r}"
            )
        self.params.validate()


@dataclass
class TokenUpdate:
    """What ``EngineCore.step()`` reports for one request that has news.

    ``finish_reason`` is one of "stop", "length", "abort", "error" once ``finished``.
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0

    @property
    def text_token_ids(self) -> list[int]:
        """The new tokens whose text belongs in the output: all but a stop or EOS token that
        ended the request, which stays in the token ids but adds no text."""
        if self.finished and self.finish_reason == "stop" and self.new_token_ids:
            return self.new_token_ids[:-1]
        return self.new_token_ids


@dataclass
class RequestOutput:
    """Result of the offline ``LLM.generate`` for one prompt (one per completion when n > 1)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        """Seconds from arrival to the last token."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time
