"""OpenAI-compatible request and response bodies, and the checks that turn bad input into 400s.

Requests are parsed straight from the raw body with pydantic in strict mode: a string where a
number belongs, an unknown field, NaN or invalid JSON is refused with a message naming the
field, instead of being coerced. Checks that need the model (context length, vocabulary,
served name) live in ``check_*`` functions the server calls after tokenising.

Extension fields beyond OpenAI's API (accepted on both routes unless noted):
    top_k: int           sample from the k most likely tokens (-1 or 0 = off).
    repetition_penalty: float  > 0; divides positive logits of tokens already in the prompt or
                         the output and multiplies negative ones (1 = off), as in vLLM.
    ignore_eos: bool     keep generating past the model's end-of-sequence token.
    predicted_tokens: int  the client's guess of the output length; the ``hint`` predictor
                           bins the request by it.
    target_len: int      /v1/completions only, benchmark-only: the engine stops the request after
                         this many tokens (finish_reason "length"), as if the model had ended
                         there. Predictors never see it. Refused unless the server was started
                         with ``--allow-target-len``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 128          # choices per prompt; each one is a row in some batch
MAX_STOP_STRINGS = 16
INT64_MAX = 2 ** 63 - 1


class APIError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------- requests

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


def _check_no_alternatives(count: int | None) -> int | None:
    if count is not None and count != 0:
        raise ValueError("only 0 is supported: the engine returns the sampled token's "
                         "log-probability, not the most likely alternatives")
    return count


class _SamplingFields(_Strict):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: str
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # Extensions (see the module docstring).
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    predicted_tokens: int | None = Field(None, ge=1)

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """Body of ``POST /v1/completions``. ``prompt`` is normalised to a list of prompts, each a
    ``str`` or a list of token ids."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    target_len: int | None = Field(None, ge=1)

    @field_validator("logprobs", mode="after")
    @classmethod
    def _only_sampled_logprob(cls, logprobs: int | None) -> int | None:
        return _check_no_alternatives(logprobs)

    @field_validator("prompt", mode="after")
    @classmethod
    def _prompt_as_list(cls, prompt: Any) -> list[str | list[int]]:
        shape_error = ("prompt must be a string, a list of strings, a list of token ids or a "
                       "list of token-id lists")
        is_ids = lambda p: isinstance(p, list) and all(type(t) is int for t in p)
        if isinstance(prompt, str):
            prompts = [prompt]
        elif is_ids(prompt) and prompt:
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p)
                                                         for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        else:
            raise ValueError(shape_error)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty")
        return prompts

    @model_validator(mode="after")
    def _unsupported_completion_fields(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def _only_sampled_logprob(cls, top_logprobs: int | None) -> int | None:
        return _check_no_alternatives(top_logprobs)

    @model_validator(mode="after")
    def _one_length_cap(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the tokenizer's chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def parse_request(model_class: type[_Strict], body: bytes) -> Any:
    """Validate a raw JSON body; raises ``APIError(400)`` naming the first offending fields."""
    try:
        return model_class.model_validate_json(body)
    except ValidationError as err:
        raise bad_request(*describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """A readable message and the ``param`` of the first error, e.g.
    ``("max_tokens: Input should be greater than or equal to 1 (got -5)", "max_tokens")``."""
    parts, first_param = [], None
    for e in err.errors(include_url=False)[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "json_invalid":
            reason = e["msg"].removeprefix("Invalid JSON: ")
            return f"request body is not valid JSON: {reason}", None
        if e["type"] == "model_type" and not loc:
            return "request body must be a JSON object", None
        first_param = first_param or (loc or None)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        shown = repr(e.get("input"))
        show = e["type"] not in ("missing", "extra_forbidden") and len(shown) <= 40
        got = f" (got {shown})" if show else ""
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "; ".join(parts), first_param


# ---------------------------------------------------------------- model-dependent checks

def check_model_name(requested: str, served: str) -> None:
    if requested != served:
        # 404, as OpenAI answers for a model that does not exist (the client's NotFoundError).
        raise APIError(404, f"model {requested!r} is not served here; this server serves "
                            f"{served!r}", param="model", code="model_not_found")


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})",
                          param="prompt")


def resolve_max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int,
                       max_output_len: int | None = None, param: str = "max_tokens") -> int:
    """The number of new tokens to allow; ``None`` means as many as fit (up to
    ``max_output_len``, the engine's cap on new tokens). Raises 400 when the prompt alone fills
    the context, prompt + max_tokens exceeds it, or max_tokens exceeds ``max_output_len``."""
    max_output_len = max_model_len if max_output_len is None else max_output_len
    if prompt_len == 0:
        raise bad_request("prompt must not be empty", param="prompt")
    if prompt_len >= max_model_len:
        raise bad_request(f"the prompt has {prompt_len} tokens, but the model's maximum context "
                          f"length is {max_model_len} tokens, leaving no room to generate",
                          param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        return min(max_model_len - prompt_len, max_output_len)
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(f"the prompt ({prompt_len} tokens) plus {param} ({max_tokens}) is "
                          f"{prompt_len + max_tokens} tokens, over the model's maximum context "
                          f"length of {max_model_len} tokens", param=param,
                          code="context_length_exceeded")
    if max_tokens > max_output_len:
        raise bad_request(f"{param} ({max_tokens}) exceeds this server's limit of "
                          f"{max_output_len} new tokens (--max-output-len)", param=param)
    return max_tokens


# ---------------------------------------------------------------- responses
# Response bodies are plain dicts shaped like OpenAI's (ids ``cmpl-...``/``chatcmpl-...``,
# ``created``, ``model``, ``choices[i].index/text|message/logprobs/finish_reason``, ``usage``).

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bindecode"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _ResponseFormat:
    """Builds the response bodies of one request. Works on the server's ``Generation`` (its
    ``ordered_choices`` and ``usage()``) and ``Delta`` objects (what one update added to a
    choice: ``choice.index``, ``text``, ``token_ids``, ``logprobs``, ``finish_reason``)."""

    id_prefix = object_name = chunk_object_name = ""

    def __init__(self, model_name: str, tokenizer: Any,
                 request: CompletionRequest | ChatCompletionRequest):
        self.model_name, self.tokenizer, self.request = model_name, tokenizer, request
        self.id, self.created = new_id(self.id_prefix), now_s()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _envelope(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model_name}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {**self._envelope(self.chunk_object_name), "choices": choices}
        if self.request.include_usage_in_stream:
            body["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return body

    def stream_usage(self, generation) -> dict:
        return self.chunk([], generation.usage())

    def response(self, generation) -> dict:
        return {**self._envelope(self.object_name),
                "choices": [self._choice(c) for c in generation.ordered_choices],
                "usage": generation.usage()}


class CompletionFormat(_ResponseFormat):
    """``text_completion`` bodies; logprobs in the legacy completions layout."""

    id_prefix, object_name, chunk_object_name = "cmpl", "text_completion", "text_completion"

    @property
    def want_logprobs(self) -> bool:
        return self.request.logprobs is not None

    def __init__(self, *args):
        super().__init__(*args)
        # Per choice index: where the next streamed token's text_offset starts. Offsets count
        # the tokens' own texts, as in the whole response, not the text emitted so far (which
        # lags while a partial character or a possible stop string is held back).
        self._stream_offsets: dict[int, int] = {}

    def _logprobs(self, token_ids: list[int], logprobs: list[float],
                  offset: int) -> tuple[dict, int]:
        """The legacy logprobs object, and the text_offset after its last token."""
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        # top_logprobs holds only the sampled token: alternatives are not computed.
        return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)]}, offset

    def stream_start(self, generation) -> list[dict]:
        return []

    def stream_delta(self, delta) -> dict | None:
        if not (delta.text or delta.finish_reason or (self.want_logprobs and delta.token_ids)):
            return None  # text held back (a partial character or stop string): nothing to say
        logprobs = None
        if self.want_logprobs:
            index = delta.choice.index
            logprobs, self._stream_offsets[index] = self._logprobs(
                delta.token_ids, delta.logprobs, self._stream_offsets.get(index, 0))
        return self.chunk([{"index": delta.choice.index, "text": delta.text, "logprobs": logprobs,
                            "finish_reason": delta.finish_reason}])

    def _choice(self, choice) -> dict:
        logprobs = (self._logprobs(choice.token_ids, choice.logprobs, 0)[0]
                    if self.want_logprobs else None)
        return {"index": choice.index, "text": choice.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}


class ChatFormat(_ResponseFormat):
    """``chat.completion`` bodies; logprobs as ``{"content": [{token, logprob, bytes, ...}]}``."""

    id_prefix, object_name = "chatcmpl", "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict:
        content = []
        for token_id, logprob in zip(token_ids, logprobs):
            token = self.token_text(token_id)
            content.append({"token": token, "logprob": logprob,
                            "bytes": list(token.encode("utf-8")), "top_logprobs": []})
        return {"content": content}

    def stream_start(self, generation) -> list[dict]:
        """OpenAI opens each choice's stream with the assistant role."""
        return [self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
                for c in generation.ordered_choices]

    def stream_delta(self, delta) -> dict | None:
        if not (delta.text or delta.finish_reason or (self.request.logprobs and delta.token_ids)):
            return None
        logprobs = (self._logprobs(delta.token_ids, delta.logprobs) if self.request.logprobs
                    else None)
        return self.chunk([{"index": delta.choice.index,
                            "delta": {"content": delta.text} if delta.text else {},
                            "logprobs": logprobs, "finish_reason": delta.finish_reason}])

    def _choice(self, choice) -> dict:
        logprobs = (self._logprobs(choice.token_ids, choice.logprobs) if self.request.logprobs
                    else None)
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": logprobs, "finish_reason": choice.finish_reason}
