"""Plain data shared by the scheduler, the simulator and the engine (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One request as the scheduler sees it.

    The scheduler never sees a request's true output length: benchmarks keep it (as the
    engine's hidden ``target_len``) and the oracle predictor is handed it separately.

    Attributes:
        request_id: unique id; an overflowed request keeps its id when re-queued.
        prompt_len: tokens to prefill (for a re-queued overflow: prompt + generated so far).
        max_tokens: the client's cap on *new* tokens, counted from the original prompt.
        arrival_time: when it was submitted (the caller's clock).
        generated: tokens already produced before a re-queue (0 for a fresh request).
        hint: the client's predicted output length (`predicted_tokens`), if any.
        predicted_len: the predictor's estimate of all new tokens (counted from the original
            prompt, like ``max_tokens``), set at submit and again at an overflow re-queue.
        bin: the bin index the scheduler placed it in, set at submit and at re-queue.
        payload: the engine's own per-request data; the scheduler never reads it.
    """

    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_time: float = 0.0
    generated: int = 0
    hint: int | None = None
    predicted_len: int | None = None
    bin: int | None = None
    payload: Any = field(default=None, repr=False, compare=False)

    @property
    def remaining_max_tokens(self) -> int:
        return self.max_tokens - self.generated


@dataclass
class BatchPlan:
    """A group of requests to run as one padded, bin-shaped batch.

    The engine derives the slab capacity C from ``max_prompt_len + max_new_tokens_bound``
    (rounded up to its capacity buckets). ``len(requests) <= batch_size``; rows past
    ``len(requests)`` are dead (padding) rows.
    """

    bin: int
    requests: list[Request]
    batch_size: int
    max_prompt_len: int
    max_new_tokens_bound: int
    formed_at: float = 0.0
