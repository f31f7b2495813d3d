"""EngineCore: the engine loop. Token ids in, token updates out; no text, no clock of its own.

Each ``step(now)`` is one iteration: start a batch (prefill a plan from the scheduler), or
advance the running one by a decode step, refilling free rows in between in the refilling
modes. The loop keeps one step in flight: it launches step t+1 before it reads step t's tokens,
so the host's bookkeeping overlaps the device's work. Consequences, all handled here:

- a row that finishes on step t's token is still computed in step t+1 (launched before the
  finish was known); that extra token is discarded and the row is dead from step t+2 on;
- the host cannot see the tokens of the step in flight, but it knows every row's position
  (positions advance by one per step), so a row about to pass its slab's end is taken out of
  the next step before it is launched; when its last token arrives it either finished or
  overflows (evicted and handed back to the scheduler with prompt + generated tokens as its
  new prompt; its RNG positions continue, so its output is unchanged).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass

import torch

from engine.batch_log import BatchLog, BatchStats
from engine.kv_cache import KVArena
from engine.options import EngineOptions
from engine.request import EngineRequest, TokenUpdate
from engine.runner import BatchRunner, PendingTokens, RowSampling, Stopwatch, capacity_bucket
from engine.seeds import draw_seed
from scheduler.bins import AdaptiveEdges, BinEdges
from scheduler.policy import MultiBinScheduler
from scheduler.predictors import predictor_from_spec
from scheduler.types import Request

log = logging.getLogger("bindecode.engine")

DEFAULT_MAX_MODEL_LEN = 4096
CPU_KV_CACHE_GB = 0.25
# CUDA errors after which the context is unusable: the process must exit, not limp on.
_FATAL_DEVICE_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                        "misaligned address", "illegal instruction", "uncorrectable ECC")


@dataclass(eq=False)
class _Sequence:
    """The engine's state of one request."""

    request: EngineRequest
    entry: Request          # the scheduler's view of it (payload = self)
    sampling: RowSampling
    output_ids: list[int]
    logprobs: list[float] | None
    row: int | None = None  # slab row while in the running batch
    next_slot: int = 0      # slot of the next token the row feeds to a decode step
    evicting: bool = False  # taken out of the decode steps at the slab's end; last token pending
    finished: bool = False
    evicted_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def tokens_to_prefill(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_ids


@dataclass(eq=False)
class _Batch:
    """The running batch: which sequence holds each slab row, and launches not yet read."""

    bin: int
    rows: list[_Sequence | None]
    stats: BatchStats
    pending: deque  # of (PendingTokens, list[_Sequence | None]) in launch order
    to_retire: list[int]
    first_free_at: float | None = None
    refill_closed: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def free_rows(self) -> list[int]:
        return [row for row, seq in enumerate(self.rows) if seq is None]

    def occupied(self) -> int:
        return sum(seq is not None for seq in self.rows)


class EngineCore:
    """Model, KV arena, runner and scheduler behind ``add_request`` / ``step`` / ``abort_request``.

    Args:
        options: every knob (``engine.options.EngineOptions``).
    Raises ``ValueError`` when the KV budget cannot hold the largest slab
    (batch_size x max_model_len) and ``ModelLoadError`` for a model it cannot load.
    """

    def __init__(self, options: EngineOptions):
        from engine.backend import default_backend
        from engine.dummy import dummy_config
        from engine.model import load_model
        from engine.model_config import load_model_config

        options.validate()
        self.options = options
        self.device = _resolve_device(options.device)
        dtype = _resolve_dtype(options.dtype, self.device)
        kv_dtype = dtype if options.kv_dtype == "auto" else getattr(torch, options.kv_dtype)
        self.backend = default_backend(self.device) if options.backend == "auto" else options.backend
        if self.device.type == "cpu":
            log.warning("no GPU in use: running on the CPU with %s weights and the %s kernels%s",
                        str(dtype).removeprefix("torch."), self.backend,
                        " (Triton interpreter: slow)" if self.backend == "triton" else "")
        config = (dummy_config(options.model) if options.model.startswith("dummy:")
                  else load_model_config(options.model))
        self.max_model_len = options.max_model_len or min(config.max_position_embeddings,
                                                          DEFAULT_MAX_MODEL_LEN)
        self.model = load_model(options.model, dtype, self.device, self.backend, seed=options.seed,
                                max_model_len=self.max_model_len)
        self.model_config = self.model.config
        log.info("engine: %s on %s, %s weights, %s KV cache, %s kernels, CUDA graphs %s, "
                 "max_model_len %d, batch_size %d, mode %s", options.model, self.device,
                 str(dtype).removeprefix("torch."), str(kv_dtype).removeprefix("torch."),
                 self.backend, "off" if options.enforce_eager or self.device.type != "cuda" else "on",
                 self.max_model_len, options.batch_size, options.mode)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.max_output_len = min(options.max_output_len or self.max_model_len, self.max_model_len)

        self.arena = self._allocate_arena(kv_dtype)
        self.runner = BatchRunner(self.model, self.arena, enforce_eager=options.enforce_eager,
                                  max_prefill_tokens=options.max_prefill_tokens)
        # --bins K: equal width over [1, max_output_len] until enough requests have finished,
        # then equal-mass edges of the recent output lengths (scheduler.bins.AdaptiveEdges).
        self.edges = (BinEdges(tuple(options.bin_edges), self.max_output_len)
                      if options.bin_edges is not None
                      else AdaptiveEdges(options.bins, self.max_output_len))
        self._true_lengths: dict[str, float] = {}  # for oracle-style predictors (benchmarks)
        name, _, arg = options.predictor.partition(":")
        predictor_spec = name.replace("_", "-") + (":" + arg if arg else "")
        predictor = predictor_from_spec(predictor_spec, true_lengths=self._true_lengths,
                                        edges=self.edges, seed=options.seed)
        ms = lambda value: None if value is None else value / 1e3
        self.scheduler = MultiBinScheduler(
            self.edges, options.batch_size, predictor, order=options.batch_order,
            max_wait=ms(options.max_wait_ms), starvation_wait=ms(options.starvation_wait_ms),
            max_queue=options.max_queue)
        self.batch_log = BatchLog(options.log_batches)
        self._log_extra = {"model": options.model, "k": self.edges.k, "predictor": predictor_spec,
                           "seed": options.seed, **options.log_labels}
        self._refill_min_free = options.refill_min_free or max(1, options.batch_size // 8)
        self._seed_rng = random.Random(options.seed)
        self._seqs: dict[str, _Sequence] = {}
        self._batch: _Batch | None = None
        self._outbox: list[TokenUpdate] = []
        self._now = float("-inf")
        self._counters = dict(tokens_generated=0, prefill_tokens=0, steps=0, decode_steps=0,
                              row_steps=0, idle_row_steps=0, overflows=0,
                              overflow_recompute_tokens=0, overflow_requeue_s=0.0, errors=0)
        self._batches_formed = [0] * self.edges.k

    # ---- public API ---------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises ``ValueError`` if it is invalid or cannot fit
        ``max_model_len``, and the scheduler's ``QueueFull`` when the queue is full."""
        request.validate(self.model_config.vocab_size)
        rid, params = request.request_id, request.params
        if rid in self._seqs:
            raise ValueError(f"request id {rid!r} is already queued or running")
        prompt_len = len(request.prompt_token_ids)
        if prompt_len + params.max_tokens > self.max_model_len:
            raise ValueError(f"request {rid!r}: prompt of {prompt_len} tokens + max_tokens "
                             f"{params.max_tokens} exceeds max_model_len {self.max_model_len}")
        if params.max_tokens > self.max_output_len:
            raise ValueError(f"request {rid!r}: max_tokens {params.max_tokens} exceeds the "
                             f"engine's max_output_len {self.max_output_len}")
        if params.n != 1:
            raise ValueError(f"request {rid!r}: the engine core runs one completion per request "
                             f"(n={params.n}); submit n requests with derived seeds")
        seed = params.seed if params.seed is not None else draw_seed(self._seed_rng)
        # top_k >= vocab keeps every token: off, as -1 (it may not even fit the int32 tensor).
        top_k = params.top_k if 0 < params.top_k < self.model_config.vocab_size else -1
        sampling = RowSampling(temperature=0.0 if params.greedy else float(params.temperature),
                               top_k=top_k, top_p=float(params.top_p), seed=seed,
                               logprobs=params.logprobs,
                               presence_penalty=float(params.presence_penalty),
                               frequency_penalty=float(params.frequency_penalty),
                               repetition_penalty=float(params.repetition_penalty))
        entry = Request(rid, prompt_len=prompt_len, max_tokens=params.max_tokens,
                        arrival_time=request.arrival_time, hint=request.hint)
        seq = _Sequence(request, entry, sampling, [], [] if params.logprobs else None)
        entry.payload = seq
        hidden = request.target_len if request.target_len is not None else params.max_tokens
        self._true_lengths[rid] = min(hidden, params.max_tokens)
        try:
            self.scheduler.submit(entry, max(self._now, request.arrival_time))
        except Exception:
            del self._true_lengths[rid]
            raise
        self._seqs[rid] = seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request: free its row or drop it from its queue; its final update (finish
        reason "abort") comes with the next ``step``. Raises ``KeyError`` if unknown or done."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not queued or running")
        self._finish(seq, "abort", self._now)
        self._outbox.append(self._final_update(seq, "abort"))

    def step(self, now: float, flush: bool = False) -> list[TokenUpdate]:
        """One engine iteration at the caller's time ``now``; returns the updates it produced.

        flush: no more requests are coming (offline use): partial batches form at once.
        """
        self._now = max(self._now, now)
        updates, self._outbox = self._outbox, []
        batch = self._batch
        try:
            if batch is None:
                batch = self._begin_batch(now, flush)
                if batch is None:
                    return updates
            else:
                self._retire(batch)
                if self.options.mode != "static":
                    self._refill(batch, now)
            self._counters["steps"] += 1
            launched = self._launch_decode(batch)
            self._drain(batch, now, updates, keep=1 if launched else 0)
            if batch.occupied() == 0:
                # Launches still unread only hold tokens of finished rows: drop them.
                self._end_batch(batch)
        except Exception as e:
            failing = self._batch
            if failing is None or _is_fatal_device_error(e):
                raise
            self._fail_batch(failing, e, now, updates)
        return updates

    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._outbox)

    def is_running(self) -> bool:
        """True while a batch holds the device (the caller should step again right away)."""
        return self._batch is not None

    def next_deadline(self) -> float | None:
        """When ``step`` next has work without new requests: now if a batch is running,
        else when the scheduler's next partial batch falls due (None: not before a request)."""
        if self._batch is not None or self._outbox:
            return self._now
        if self.options.mode == "continuous" and self.scheduler.pending():
            return self._now
        return self.scheduler.next_deadline()

    def stats(self) -> dict:
        """Counters for metrics: per-bin queue depths and batches formed, the running batch's
        occupancy and padding waste, overflows, tokens, steps."""
        batch = self._batch
        occupancy = padding_waste = 0.0
        running = 0
        if batch is not None:
            live = [s for s in batch.rows if s is not None]
            running = len(live)
            occupancy = running / batch.batch_size
            slots = batch.batch_size * self.runner.capacity
            padding_waste = 1.0 - sum(min(s.next_slot, self.runner.capacity) for s in live) / slots
        graphs = self.runner.graphs
        return {"queue_depth": self.scheduler.queue_depths(), "pending": self.scheduler.pending(),
                "running": running, "batches_formed": list(self._batches_formed),
                "occupancy": occupancy, "padding_waste": padding_waste, **self._counters,
                "graphs_captured": len(graphs) if graphs is not None else 0,
                "graph_capture_s": graphs.capture_seconds if graphs is not None else 0.0}

    @property
    def batch_records(self):
        """The latest per-batch records (``scheduler.schemas.BatchRecord``), oldest first."""
        return list(self.batch_log.records)

    def close(self) -> None:
        self.batch_log.close()

    # ---- batches ------------------------------------------------------------------------

    def _begin_batch(self, now: float, flush: bool) -> _Batch | None:
        mode = self.options.mode
        if mode == "continuous":
            if not self.scheduler.pending():
                return None
            plan_bin, bound, formed_at, requests = 0, self.max_output_len, now, None
            capacity = self.max_model_len
            batch_size = self.options.batch_size
        else:
            plan = self.scheduler.next_plan(now, flush=flush)
            if plan is None:
                return None
            plan_bin, bound, formed_at, requests = (plan.bin, plan.max_new_tokens_bound,
                                                    plan.formed_at, plan.requests)
            if mode == "bin-continuous":
                # The slab outlives this plan: size it for any request of the bin, not just
                # these (whose max_tokens may cap the plan's bound below the bin's).
                bound = max(bound, min(self.edges.upper(plan_bin), self.max_output_len))
            batch_size = plan.batch_size
            # Every request fits max_model_len (checked at add_request), so the cap is safe.
            capacity = capacity_bucket(min(plan.max_prompt_len + bound, self.max_model_len),
                                       self.options.min_capacity, self.max_model_len)
        stats = BatchStats(bin=plan_bin, batch_size=batch_size, capacity=capacity, mode=mode,
                           max_new_tokens_bound=bound, formed_at=formed_at, started_at=now)
        batch = _Batch(plan_bin, [None] * batch_size, stats, deque(), [])
        self._batch = batch
        # Rows are assigned before any device work, so a failure fails exactly these requests.
        seqs = [r.payload for r in requests] if requests is not None else []
        rows = self._assign_rows(batch, seqs)
        self.runner.begin(batch_size, capacity)
        self._batches_formed[plan_bin] += 1
        if mode == "continuous":
            self._refill(batch, now)
        else:
            self._prefill(batch, seqs, rows, now)
        return batch

    def _refill(self, batch: _Batch, now: float) -> None:
        """Refilling modes: hand free rows new requests, prefilled as one pack between decode
        steps, once enough rows are free (or any have waited max_wait, or none are live)."""
        free = batch.free_rows()
        if not free or batch.refill_closed:
            batch.first_free_at = None
            return
        if batch.first_free_at is None:
            batch.first_free_at = now
        live = batch.batch_size - len(free)
        waited = now - batch.first_free_at >= self.options.max_wait_ms / 1e3
        if live and len(free) < self._refill_min_free and not waited:
            return
        continuous = self.options.mode == "continuous"
        requests = self.scheduler.refill(None if continuous else batch.bin, len(free), now)
        if not requests:
            return
        seqs = []
        for request in requests:
            seq = request.payload
            if len(seq.tokens_to_prefill()) >= batch.stats.capacity:
                # A prompt (or a re-queued overflow) too long for this slab: send it up a bin.
                # Back in this very bin (the top one), it needs a new plan: let the slab drain.
                self._counters["overflows"] += 1
                batch.stats.overflows += 1
                self.scheduler.on_overflow(request, now)
                batch.refill_closed = batch.refill_closed or request.bin == batch.bin
                continue
            seqs.append(seq)
        if not seqs:
            return
        rows = self._assign_rows(batch, seqs)
        watch = self._prefill(batch, seqs, rows, now)
        if live:
            batch.stats.refills += 1
            batch.stats.refill_stalled_rows += live
            batch.stats.refill_watches.append(watch)
        batch.first_free_at = None if len(seqs) == len(free) else now

    def _assign_rows(self, batch: _Batch, seqs: list[_Sequence]) -> list[int]:
        rows = batch.free_rows()[:len(seqs)]
        for row, seq in zip(rows, seqs):
            batch.rows[row] = seq
            seq.row = row
        return rows

    def _prefill(self, batch: _Batch, seqs: list[_Sequence], rows: list[int],
                 now: float) -> Stopwatch:
        prompts = [seq.tokens_to_prefill() for seq in seqs]
        watch = Stopwatch(self.device)
        watch.start()
        pending = self.runner.prefill(rows, prompts, [seq.sampling for seq in seqs],
                                      [len(seq.output_ids) for seq in seqs])
        watch.stop()
        batch.stats.prefill_watches.append(watch)
        batch.pending.append((pending, list(seqs)))
        for seq, prompt in zip(seqs, prompts):
            seq.next_slot = len(prompt)
            batch.stats.join(seq.request_id, len(prompt), len(seq.output_ids))
            self._counters["prefill_tokens"] += len(prompt)
            if seq.evicted_at is not None:
                self._counters["overflow_recompute_tokens"] += len(prompt)
                self._counters["overflow_requeue_s"] += max(now - seq.evicted_at, 0.0)
                seq.evicted_at = None
        return watch

    def _retire(self, batch: _Batch) -> None:
        """Rows whose request finished or was aborted go dead before the next launch."""
        if batch.to_retire:
            self.runner.retire(sorted(set(batch.to_retire)))
            batch.to_retire.clear()

    def _launch_decode(self, batch: _Batch) -> bool:
        """Launch one decode step for the live rows; False if no row is live."""
        capacity = batch.stats.capacity
        at_end = [seq.row for seq in batch.rows
                  if seq is not None and not seq.evicting and seq.next_slot >= capacity]
        for row in at_end:
            batch.rows[row].evicting = True
        self._retire(batch)
        self.runner.retire(at_end)
        live_rows = set(self.runner.live_rows())
        if not live_rows:
            return False
        pending: PendingTokens = self.runner.decode()
        snapshot = [seq if row in live_rows else None for row, seq in enumerate(batch.rows)]
        for seq in snapshot:
            if seq is not None:
                seq.next_slot += 1
        batch.pending.append((pending, snapshot))
        idle = batch.batch_size - len(live_rows)
        batch.stats.steps += 1
        batch.stats.idle_row_steps += idle
        self._counters["decode_steps"] += 1
        self._counters["row_steps"] += batch.batch_size
        self._counters["idle_row_steps"] += idle
        return True

    def _drain(self, batch: _Batch, now: float, updates: list[TokenUpdate], keep: int) -> None:
        """Read every launch but the newest ``keep`` and apply their tokens."""
        news: dict[str, TokenUpdate] = {}
        try:
            while len(batch.pending) > keep:
                pending, seqs = batch.pending.popleft()
                tokens, logprobs = pending.result()
                for i, seq in enumerate(seqs):
                    if seq is None or seq.finished:
                        continue  # a dead row, or the extra token of a row that already finished
                    self._accept(batch, seq, tokens[i],
                                 None if logprobs is None else logprobs[i], now, news)
        finally:
            updates.extend(news.values())  # even if a later row failed: finals already sent

    def _accept(self, batch: _Batch, seq: _Sequence, token: int, logprob: float | None,
                now: float, news: dict[str, TokenUpdate]) -> None:
        seq.output_ids.append(token)
        update = news.get(seq.request_id)
        if update is None:
            update = news[seq.request_id] = TokenUpdate(
                seq.request_id, [], [] if seq.logprobs is not None else None,
                num_prompt_tokens=len(seq.request.prompt_token_ids))
        update.new_token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
            update.new_logprobs.append(logprob)
        self._counters["tokens_generated"] += 1
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self._finish(seq, reason, now)
            update.finished, update.finish_reason = True, reason
        elif seq.evicting:
            self._overflow(batch, seq, now)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        params, n = seq.request.params, len(seq.output_ids)
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        target = seq.request.target_len
        if n >= params.max_tokens or (target is not None and n >= target):
            return "length"
        return None

    def _finish(self, seq: _Sequence, reason: str, now: float) -> None:
        """Take a request out for good: free its row, tell the scheduler."""
        seq.finished = True
        self._release_row(seq)
        rid = seq.request_id
        if reason in ("stop", "length"):
            self.scheduler.on_finish(rid, len(seq.output_ids), now)
        else:
            self.scheduler.cancel(rid, now)
        del self._seqs[rid]
        self._true_lengths.pop(rid, None)

    def _overflow(self, batch: _Batch, seq: _Sequence, now: float) -> None:
        """The row reached its slab's end unfinished: evict it, re-queue it with its tokens
        so far as its prompt (recomputed by a later prefill, in a higher bin)."""
        self._release_row(seq)
        seq.evicting = False
        seq.evicted_at = now
        entry = seq.entry
        entry.generated = len(seq.output_ids)
        entry.prompt_len = len(seq.request.prompt_token_ids) + entry.generated
        batch.stats.overflows += 1
        self._counters["overflows"] += 1
        self.scheduler.on_overflow(entry, now)

    def _release_row(self, seq: _Sequence) -> None:
        batch = self._batch
        if seq.row is None or batch is None:
            return
        batch.rows[seq.row] = None
        batch.to_retire.append(seq.row)
        batch.stats.leave(seq.request_id, len(seq.output_ids))
        seq.row = None

    def _end_batch(self, batch: _Batch) -> None:
        self.runner.end()
        self._batch = None
        self.batch_log.write(batch.stats.record(self._log_extra))

    def _fail_batch(self, batch: _Batch, error: Exception, now: float,
                    updates: list[TokenUpdate]) -> None:
        """An exception inside a batch: fail its requests (finish reason "error"), drop the
        batch, keep the engine running for the others."""
        message = f"{type(error).__name__}: {error}"
        log.exception("batch of bin %d failed; failing its requests", batch.bin)
        self._counters["errors"] += 1
        victims = {id(s): s for s in batch.rows if s is not None}
        for _, seqs in batch.pending:
            victims.update({id(s): s for s in seqs if s is not None})
        for seq in victims.values():
            if seq.finished:
                continue
            self._finish(seq, "error", now)
            updates.append(self._final_update(seq, "error", message))
        self.runner.end()
        self._batch = None

    def _final_update(self, seq: _Sequence, reason: str, error: str | None = None) -> TokenUpdate:
        return TokenUpdate(seq.request_id, [], [] if seq.logprobs is not None else None,
                           finished=True, finish_reason=reason, error=error,
                           num_prompt_tokens=len(seq.request.prompt_token_ids))

    # ---- start-up -----------------------------------------------------------------------

    def _allocate_arena(self, kv_dtype: torch.dtype) -> KVArena:
        """KV storage for the largest slab, refused up front if the budget cannot hold it."""
        c, B = self.model_config, self.options.batch_size
        per_token = KVArena.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, kv_dtype)
        if self.options.kv_cache_gb is not None:
            budget, source = self.options.kv_cache_gb * 2**30, f"kv_cache_gb={self.options.kv_cache_gb}"
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.options.kv_memory_fraction
            source = (f"kv_memory_fraction={self.options.kv_memory_fraction} of "
                      f"{free / 2**30:.2f} GiB free")
        else:
            budget, source = CPU_KV_CACHE_GB * 2**30, f"the CPU default of {CPU_KV_CACHE_GB} GiB"
        budget_tokens = int(budget // per_token)
        largest = capacity_bucket(self.max_model_len, self.options.min_capacity, self.max_model_len)
        needed = B * largest
        if budget_tokens < needed:
            raise ValueError(
                f"KV cache budget too small: {source} holds {budget_tokens} token slots "
                f"({per_token} bytes each), but the largest slab, batch_size {B} x capacity "
                f"{largest} (max_model_len), needs {needed} ({needed * per_token / 2**30:.2f} GiB). "
                f"Raise kv_cache_gb, or lower batch_size or max_model_len")
        arena = KVArena(c.num_layers, c.num_kv_heads, c.head_dim, needed, kv_dtype, self.device)
        # Zeroed once: the reference ops compute over the whole padded slab (masking scores,
        # not values), so uninitialised NaN bits in a never-written slot would leak through.
        arena.k.zero_()
        arena.v.zero_()
        log.info("KV arena: %d token slots (%.2f GiB, %s), largest slab %d x %d",
                 needed, arena.nbytes / 2**30, str(kv_dtype).removeprefix("torch."), B, largest)
        return arena


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _is_fatal_device_error(error: Exception) -> bool:
    text = str(error)
    return any(signature in text for signature in _FATAL_DEVICE_ERRORS)
