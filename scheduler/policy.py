"""The multi-bin batching policy (standard batching is its k = 1 case).

Requests are binned by predicted output length and queue per bin, first in, first out. When a
bin holds ``batch_size`` requests they form a batch that enters the central queue; batches are
served in formation order or shortest bin first. A partial batch forms when its bin's oldest
request has waited ``max_wait``; a formed batch that has waited ``starvation_wait`` in the
central queue is served next whatever the order. After ``close()`` every partial batch forms at
once, so no request is left behind. ``refill`` hands single requests to the refilling modes
(``bin-continuous``: the same bin; ``continuous``: any bin, oldest first).

The policy never reads a clock: every call takes the caller's ``now``. Requests handed out are
"in flight" until ``on_finish`` or ``on_overflow``. An overflowed request (it reached its batch's
bound) comes back through ``on_overflow`` as the same object and the same id, with ``prompt_len``
and ``generated`` already advanced, and joins a higher bin than the one it overflowed from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scheduler.bins import BinEdges
from scheduler.predictors import MaxTokensPredictor, Predictor
from scheduler.types import BatchPlan, Request

ORDERS = ("formation", "shortest")


class QueueFull(RuntimeError):
    """``submit`` refused a request because ``max_queue`` requests are already waiting."""


@dataclass(slots=True)
class _Entry:
    seq: int  # enqueue order; FIFO within a bin and "oldest" across bins follow it
    enqueued_at: float
    request: Request
    bound: int  # the bin's upper() when the request joined it (adaptive edges may move later)


@dataclass(slots=True)
class _FormedBatch:
    formed_at: float
    seq: int
    entries: deque


class MultiBinScheduler:
    """k-bin batching behind the scheduler API (see the module docstring).

    Args:
        edges: ``BinEdges`` or ``AdaptiveEdges`` (observed lengths feed it on ``on_finish``).
        batch_size: B, the most requests in one plan.
        predictor: output-length predictor (default: ``max_tokens``).
        order: "formation" (the paper's) or "shortest" (lowest bin first) for the central queue.
        max_wait: a bin's partial batch forms when its oldest request has waited this long
            (None: only full batches form until ``close``).
        starvation_wait: a formed batch waiting this long is served next regardless of order;
            in ``bin-continuous`` refills it also stops refilling other bins.
        max_queue: ``submit`` raises ``QueueFull`` when this many requests are queued.
    """

    def __init__(self, edges, batch_size: int, predictor: Predictor | None = None, *,
                 order: str = "formation", max_wait: float | None = None,
                 starvation_wait: float | None = None, max_queue: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if order not in ORDERS:
            raise ValueError(f"unknown central-queue order {order!r}; expected one of {ORDERS}")
        for name, value in (("max_wait", max_wait), ("starvation_wait", starvation_wait)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
        self.edges = edges
        self.batch_size = batch_size
        self.predictor = predictor if predictor is not None else MaxTokensPredictor()
        self.order = order
        self.max_wait = max_wait
        self.starvation_wait = starvation_wait
        self.max_queue = max_queue
        self.overflow_count = 0
        self.finished_count = 0
        self.plan_count = 0
        self._observe_edges = getattr(edges, "observe", None)
        self._max_len = edges.max_len
        k = edges.k
        self._waiting: list[deque[_Entry]] = [deque() for _ in range(k)]
        self._formed: list[deque[_FormedBatch]] = [deque() for _ in range(k)]
        self._depth = [0] * k
        self._pending = 0
        self._seq = 0
        self._active: dict[str, Request] = {}  # submitted and not finished
        self._in_flight: set[str] = set()
        self._closed = False
        self._latest_now = float("-inf")

    # ---- the scheduler API -------------------------------------------------------------

    def submit(self, request: Request, now: float) -> None:
        """Predict the request's length, bin it and queue it. Raises ``QueueFull`` at
        ``max_queue``, ``ValueError`` for a duplicate id or a ``max_tokens`` beyond the bins."""
        if self._closed:
            raise RuntimeError(f"scheduler is closed; cannot submit {request.request_id!r}")
        if self.max_queue is not None and self._pending >= self.max_queue:
            raise QueueFull(f"queue full: {self._pending} requests waiting (max_queue="
                            f"{self.max_queue}); rejected {request.request_id!r}")
        rid = request.request_id
        if rid in self._active:
            raise ValueError(f"request id {rid!r} is already queued or running")
        remaining = request.max_tokens - request.generated
        if request.prompt_len < 0 or request.generated < 0 or not 1 <= remaining <= self._max_len:
            raise ValueError(f"request {rid!r}: need prompt_len >= 0, generated >= 0 and remaining "
                             f"max_tokens in [1, {self._max_len}] (the bins' max_len); got "
                             f"prompt_len={request.prompt_len}, generated={request.generated}, "
                             f"max_tokens={request.max_tokens}")
        self._advance(now)
        predicted = self._predict(request)
        self._active[rid] = request
        self._enqueue(request, self.edges.bin_of(predicted - request.generated), now)

    def next_plan(self, now: float, flush: bool = False) -> BatchPlan | None:
        """The next batch to run, or None when no batch has formed. ``flush=True`` first
        forms every partial batch (as ``close`` does, without closing)."""
        self._advance(now)
        if flush:
            self._form_all_partial(now)
        heads = [(q[0].formed_at, q[0].seq, b) for b, q in enumerate(self._formed) if q]
        if not heads:
            return None
        oldest = min(heads)
        if self.starvation_wait is not None and now - oldest[0] >= self.starvation_wait:
            chosen = oldest[2]
        elif self.order == "formation":
            chosen = oldest[2]
        else:
            chosen = heads[0][2]  # heads are listed by bin, lowest first
        batch = self._formed[chosen].popleft()
        requests = [e.request for e in batch.entries]
        self._hand_out(chosen, requests)
        self.plan_count += 1
        bound = min(max(e.bound for e in batch.entries),
                    max(r.remaining_max_tokens for r in requests))
        return BatchPlan(bin=chosen, requests=requests, batch_size=self.batch_size,
                         max_prompt_len=max(r.prompt_len for r in requests),
                         max_new_tokens_bound=bound, formed_at=batch.formed_at)

    def refill(self, bin: int | None, n: int, now: float) -> list[Request]:
        """Up to ``n`` queued requests for rows that just freed up.

        ``bin`` given (bin-continuous): the oldest requests of that bin, formed batches first;
        returns [] while another bin's formed batch has waited ``starvation_wait`` (let the slab
        drain so ``next_plan`` serves it). ``bin`` None (continuous): the oldest requests of
        any bin.
        """
        self._advance(now)
        if n <= 0:
            return []
        if bin is not None:
            if not 0 <= bin < len(self._waiting):
                raise IndexError(f"refill bin {bin} out of range for k={len(self._waiting)} bins")
            if self.starvation_wait is not None and any(
                    q and now - q[0].formed_at >= self.starvation_wait
                    for b, q in enumerate(self._formed) if b != bin):
                return []
            taken = self._take(bin, n)
            self._hand_out(bin, taken)
            return taken
        taken = []
        while len(taken) < n:
            best_seq, best_bin = None, -1
            for b in range(len(self._waiting)):
                entry = self._head(b)
                if entry is not None and (best_seq is None or entry.seq < best_seq):
                    best_seq, best_bin = entry.seq, b
            if best_seq is None:
                break
            request = self._take(best_bin, 1)[0]
            self._hand_out(best_bin, [request])
            taken.append(request)
        return taken

    def on_finish(self, request_id: str, true_len: float, now: float) -> None:
        """An in-flight request completed with ``true_len`` new tokens in all (counted from its
        original prompt, across any overflows). Feeds the predictor and adaptive edges."""
        self._advance(now)
        if request_id not in self._in_flight:
            raise ValueError(f"on_finish for {request_id!r}, which is not in flight (never "
                             f"handed out, already finished, or re-queued)")
        self._in_flight.remove(request_id)
        request = self._active.pop(request_id)
        self.finished_count += 1
        self.predictor.observe(request, true_len)
        if self._observe_edges is not None:
            self._observe_edges(true_len)

    def on_overflow(self, request: Request, now: float) -> None:
        """The request reached its batch's bound unfinished; the caller already added the
        tokens it generated to ``prompt_len`` and ``generated``. Re-queue it, same id, into a
        bin above the one it overflowed from (the top bin stays the top bin)."""
        self._advance(now)
        rid = request.request_id
        if rid not in self._in_flight:
            raise ValueError(f"on_overflow for {rid!r}, which is not in flight")
        if self._active[rid] is not request:
            raise ValueError(f"on_overflow for {rid!r} must pass the same Request object that "
                             f"was handed out")
        if request.remaining_max_tokens < 1:
            raise ValueError(f"request {rid!r} has generated its max_tokens={request.max_tokens}; "
                             f"it finished, it did not overflow")
        self._in_flight.remove(rid)
        self.overflow_count += 1
        previous = request.bin if request.bin is not None else 0
        predicted = max(self._predict(request), request.generated + 1)
        request.predicted_len = min(predicted, request.max_tokens)
        by_prediction = self.edges.bin_of(request.predicted_len - request.generated)
        self._enqueue(request, min(max(by_prediction, previous + 1), self.edges.k - 1), now)

    def cancel(self, request_id: str, now: float) -> bool:
        """Forget a request (client gone): drop it from its queue or from the in-flight set.
        Returns False if the id is unknown."""
        self._advance(now)
        request = self._active.pop(request_id, None)
        if request is None:
            return False
        if request_id in self._in_flight:
            self._in_flight.remove(request_id)
            return True
        b = request.bin
        for queue in [self._waiting[b]] + [batch.entries for batch in self._formed[b]]:
            for entry in queue:
                if entry.request is request:
                    queue.remove(entry)
                    self._depth[b] -= 1
                    self._pending -= 1
                    break
        self._formed[b] = deque(batch for batch in self._formed[b] if batch.entries)
        return True

    def next_deadline(self) -> float | None:
        """When the earliest partial batch will form by ``max_wait`` (None: no such time)."""
        if self.max_wait is None:
            return None
        starts = [q[0].enqueued_at for q in self._waiting if q]
        return min(starts) + self.max_wait if starts else None

    def close(self, now: float | None = None) -> None:
        """Final flush: form every partial batch now; later re-queued overflows form at once."""
        if now is not None:
            self._advance(now)
        self._closed = True
        self._form_all_partial(self._latest_now if now is None else now)

    def pending(self) -> int:
        """Requests queued (in bins or in formed batches), not yet handed out."""
        return self._pending

    def in_flight(self) -> int:
        """Requests handed out and not yet finished or re-queued."""
        return len(self._in_flight)

    def queue_depths(self) -> list[int]:
        """Queued requests per bin (waiting plus formed, not yet handed out)."""
        return list(self._depth)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- internals ---------------------------------------------------------------------

    def _predict(self, request: Request) -> float:
        predicted = self.predictor.predict(request)
        if not predicted >= 0:  # also rejects NaN
            raise ValueError(f"predictor {type(self.predictor).__name__} returned {predicted!r} "
                             f"for {request.request_id!r}; lengths must be >= 0")
        request.predicted_len = min(predicted, request.max_tokens)
        return request.predicted_len

    def _advance(self, now: float) -> None:
        if now > self._latest_now:
            self._latest_now = now
        if self.max_wait is None:
            return
        for b, queue in enumerate(self._waiting):
            if queue and queue[0].enqueued_at + self.max_wait <= now:
                # Formed when it fell due, even if nobody asked until later: keeps the
                # central queue's formation order true to the bins' clocks.
                self._form(b, queue[0].enqueued_at + self.max_wait, len(queue))

    def _enqueue(self, request: Request, b: int, now: float) -> None:
        request.bin = b
        queue = self._waiting[b]
        queue.append(_Entry(self._seq, now, request, self.edges.upper(b)))
        self._seq += 1
        self._depth[b] += 1
        self._pending += 1
        if len(queue) >= self.batch_size:
            self._form(b, now, self.batch_size)
        elif self._closed:
            self._form(b, now, len(queue))
        elif self.max_wait is not None and queue[0].enqueued_at + self.max_wait <= now:
            self._form(b, queue[0].enqueued_at + self.max_wait, len(queue))  # max_wait = 0

    def _form(self, b: int, formed_at: float, n: int) -> None:
        queue = self._waiting[b]
        entries = deque(queue.popleft() for _ in range(n))
        self._formed[b].append(_FormedBatch(formed_at, self._seq, entries))
        self._seq += 1

    def _form_all_partial(self, now: float) -> None:
        for b, queue in enumerate(self._waiting):
            if queue:
                self._form(b, now, len(queue))

    def _head(self, b: int) -> _Entry | None:
        if self._formed[b]:
            return self._formed[b][0].entries[0]
        return self._waiting[b][0] if self._waiting[b] else None

    def _take(self, b: int, n: int) -> list[Request]:
        taken = []
        formed, waiting = self._formed[b], self._waiting[b]
        while len(taken) < n and formed:
            entries = formed[0].entries
            while len(taken) < n and entries:
                taken.append(entries.popleft().request)
            if not entries:
                formed.popleft()
        while len(taken) < n and waiting:
            taken.append(waiting.popleft().request)
        return taken

    def _hand_out(self, b: int, requests: list[Request]) -> None:
        self._depth[b] -= len(requests)
        self._pending -= len(requests)
        for r in requests:
            self._in_flight.add(r.request_id)


def standard_scheduler(batch_size: int, max_len: int, **kwargs) -> MultiBinScheduler:
    """Standard batching: one bin, batches in arrival order (k = 1)."""
    return MultiBinScheduler(BinEdges((), max_len), batch_size, **kwargs)
