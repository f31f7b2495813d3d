"""The offline API: ``LLM(model, **options).generate(prompts, params)``.

It tokenises, drives ``EngineCore`` until every request is done, and detokenises. Stop strings
are found in the text here, so a request whose text hits one is aborted in the core.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import time
from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_core import EngineCore
from engine.options import EngineOptions
from engine.request import EngineRequest, RequestOutput, SamplingParams
from engine.seeds import derive_seed
from engine.tokenizer import load_tokenizer


@dataclass(eq=False)
class _Tracked:
    """One completion being generated."""

    request_id: str
    prompt: list[int]
    detokenizer: IncrementalDetokenizer
    arrival_time: float
    token_ids: list[int]
    logprobs: list[float] | None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.token_ids, self.text,
                             self.finish_reason, self.logprobs, self.arrival_time,
                             self.first_token_time, self.finish_time)


class LLM:
    """Offline generation on one device.

    Args:
        model: local Hugging Face folder or ``dummy:NAME``.
        **options: any ``EngineOptions`` field (batch_size, bins, bin_edges, mode, predictor,
            kv_cache_gb, dtype, backend, enforce_eager, ...).
    """

    def __init__(self, model: str, **options):
        self.options = EngineOptions(model=model, **options)
        self.core = EngineCore(self.options)
        self.tokenizer = load_tokenizer(model)
        self._ids = itertools.count()

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, target_lens: list[int | None] | None = None,
                 hints: list[int | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one ``RequestOutput`` per prompt and completion
        (``params.n`` of them per prompt, consecutive), in input order.

        prompts: texts (tokenised with the model's tokenizer) or token-id lists.
        params: one ``SamplingParams`` for all, or one per prompt (default: SamplingParams()).
        target_lens: hidden benchmark lengths, one per prompt (None entries: none); the engine
            stops a request there with finish reason "length". Predictors never see them.
        hints: predicted output lengths the client passes to the scheduler (``hint``).
        Raises ``ValueError`` for a bad prompt or parameter and ``RuntimeError`` if the engine
        failed a request.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        n = len(prompts)
        per_prompt = self._per_prompt("params", params if params is not None else SamplingParams(), n)
        target_lens = self._per_prompt("target_lens", target_lens, n)
        hints = self._per_prompt("hints", hints, n)
        token_lists = [self._tokens(p, i) for i, p in enumerate(prompts)]

        batch_id = next(self._ids)
        arrival = time.monotonic()
        tracked: list[_Tracked] = []
        try:
            for i, (ids, p) in enumerate(zip(token_lists, per_prompt)):
                p.validate()
                for j in range(p.n):
                    child = self._completion_params(p, j)
                    rid = f"gen{batch_id}-{i}" + (f"-{j}" if p.n > 1 else "")
                    self.core.add_request(EngineRequest(rid, ids, child, arrival_time=arrival,
                                                        hint=hints[i], target_len=target_lens[i]))
                    tracked.append(_Tracked(rid, ids, IncrementalDetokenizer(self.tokenizer, ids, child.stop),
                                            arrival, [], [] if child.logprobs else None))
        except BaseException:
            for t in tracked:
                self._abort_quietly(t.request_id)
            self._drain_outbox()
            raise
        self._run(tracked, use_tqdm)
        failed = [t for t in tracked if t.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(tracked)} requests failed; first: "
                               f"{failed[0].request_id}: {failed[0].error}")
        return [t.output() for t in tracked]

    def _run(self, tracked: list[_Tracked], use_tqdm: bool) -> None:
        by_id = {t.request_id: t for t in tracked}
        open_ids = set(by_id)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(tracked), desc="generate", unit="req")
        try:
            while open_ids:
                now = time.monotonic()
                updates = self.core.step(now, flush=True)
                for update in updates:
                    t = by_id.get(update.request_id)
                    if t is None or t.finish_reason is not None:
                        continue  # e.g. the "abort" that follows a stop string
                    self._apply(t, update, now)
                    if t.finish_reason is not None:
                        open_ids.discard(t.request_id)
                        if bar is not None:
                            bar.update(1)
                if not updates and not self.core.is_running() and open_ids \
                        and not self.core.has_unfinished():
                    raise RuntimeError(f"engine lost {len(open_ids)} requests")
            self._drain_outbox()  # the final "abort" updates of stop-string requests
        except BaseException:
            for rid in open_ids:
                self._abort_quietly(rid)
            self._drain_outbox()
            raise
        finally:
            if bar is not None:
                bar.close()

    def _apply(self, t: _Tracked, update, now: float) -> None:
        if update.new_token_ids:
            if t.first_token_time is None:
                t.first_token_time = now
            t.token_ids.extend(update.new_token_ids)
            if t.logprobs is not None and update.new_logprobs is not None:
                t.logprobs.extend(update.new_logprobs)
            t.text += t.detokenizer.add(update.text_token_ids)
        if t.detokenizer.stopped and not update.finished:
            # A stop string appeared in the text: the core only knows ids, so abort it there.
            self._abort_quietly(t.request_id)
            t.finish_reason, t.finish_time = "stop", now
            return
        if update.finished:
            t.text += t.detokenizer.flush()
            t.finish_reason = "stop" if t.detokenizer.stopped else update.finish_reason
            t.error = update.error
            t.finish_time = now

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.core.abort_request(request_id)
        except KeyError:
            pass

    def _drain_outbox(self) -> None:
        """Collect the abort updates so the next generate starts clean."""
        while self.core.has_unfinished():
            self.core.step(time.monotonic(), flush=True)

    def _tokens(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise ValueError(f"prompt {index} must be a string or a list of token ids, "
                             f"got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        return ids

    @staticmethod
    def _per_prompt(name: str, value, n: int) -> list:
        if value is None or not isinstance(value, (list, tuple)):
            return [value] * n
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)

    @staticmethod
    def _completion_params(params: SamplingParams, index: int) -> SamplingParams:
        """Completion ``index`` of a prompt: its own seed when n > 1, n = 1 for the core."""
        seed = params.seed
        if params.n > 1 and seed is not None:
            seed = derive_seed(seed, index)
        return dataclasses.replace(params, seed=seed, stop=list(params.stop),
                                   stop_token_ids=list(params.stop_token_ids), n=1)

    def close(self) -> None:
        self.core.close()
