"""Discrete-event simulator: the scheduler policy against a modelled GPU.

It plays the engine's part through the same scheduler API the server uses (``submit``,
``next_plan``, ``refill``, ``on_finish``, ``on_overflow``, ``next_deadline``), so the policy
code under test is the production code. One slab of B rows runs at a time:

- ``static``: a plan runs until its longest row ends (the paper's batching); a finished row
  idles until then.
- ``bin-continuous``: a finished row is refilled from the slab's bin; when the slab has
  drained, the next plan (any bin) starts. The slab's bound is its bin's, so a refilled
  request is held to the same bound as the plan's.
- ``continuous``: one slab of ``max_model_len`` capacity, rows refilled from any bin,
  oldest request first (iteration-level batching); nothing overflows.

Each new token costs one decode step of the whole slab (dead rows included); rows joining
the slab are prefilled first, pausing decode (the prefill policy of the refilling modes). A
service model with a ``straggler_sum`` (``EngineStepModel``) is also charged for the spread of
the live rows' lengths; one with a ``refill_time`` charges rows joining a running slab by it
(a slab's first prefill by ``prefill_time``). A request's latency runs from its arrival to
its last token.

Where a row overflows, two rules:

- the paper's (default): a row whose true remaining length exceeds its plan's
  ``max_new_tokens_bound`` runs to the bound and overflows;
- the engine's (``capacities`` given): the slab holds C token slots per row, C the smallest
  capacity bucket that fits the plan's longest prompt plus its bound. A row runs until its
  prompt plus generated tokens reach C: after C - p decode steps (p its prompt) it holds
  C - p + 1 new tokens (the prefill gave the first) and is evicted unless it is done; its
  row frees a step later (``_row_run``). So a row with a short prompt gets far more room
  than the bin's bound. A refilled request whose prompt no longer fits the slab is sent up
  a bin at once (and in the top bin, the slab stops refilling), as the engine does.

An overflowed row goes back through ``on_overflow`` with its ``prompt_len`` and ``generated``
advanced by the tokens it made. Once every request has arrived, each new plan first forms
every partial batch (the engine's offline flush), so overflows re-queued during one batch
wait for the next plan together.

The refilling modes refill free rows once ``refill_min_free`` of them are free, or the first
has waited ``refill_max_wait``, or no row is live (the engine's rule; the default, one row,
refills after every finish).

``bench.e2e`` checks all of this against the engine on the CPU (tests/bench): the same
workload gives the same batches, steps and overflows in both.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import asdict, dataclass
from heapq import heappop, heappush
from operator import itemgetter
from typing import Sequence

from scheduler.policy import MultiBinScheduler
from scheduler.service import PAPER_SERVICE, ServiceModel, fewest_steps
from scheduler.types import Request
from scheduler.workload import Workload

MODES = ("static", "bin-continuous", "continuous")


@dataclass
class SimResult:
    """What a simulated run measured (time in the service model's unit).

    throughput: requests per time unit; token_throughput: true output tokens per time unit.
    occupancy: live row-steps / slab row-steps; padding_waste = 1 - occupancy.
    busy_fraction: time a slab ran (prefill or decode) / makespan.
    kv_slots_peak, kv_slots_mean: the running slab's B x C token slots, peak and time-weighted
    mean over the makespan (0 while idle). n_batches: plans started (continuous mode: times
    the slab started from empty).
    """

    mode: str
    n_requests: int
    n_batches: int
    makespan: float
    throughput: float
    token_throughput: float
    latency_mean: float
    latency_p50: float
    latency_p90: float
    latency_p99: float
    occupancy: float
    padding_waste: float
    busy_fraction: float
    kv_slots_peak: int
    kv_slots_mean: float
    overflows: int
    prefill_time: float
    decode_time: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SimBatch:
    """One simulated batch: a static plan, or a refilling slab from start until it drained
    (the engine's ``BatchRecord`` unit). Times in the service model's unit.

    n_requests: rows that held a request (a refilled row counts once per request).
    steps: decode steps of the slab. overflows: rows evicted at the slab's end.
    """

    bin: int
    capacity: int
    n_requests: int
    steps: float
    overflows: int
    prefill_time: float
    decode_time: float
    started_at: float
    ended_at: float


@dataclass(frozen=True)
class _SlabRules:
    capacities: tuple[int, ...] | None
    refill_min_free: int
    refill_max_wait: float | None

    def capacity(self, needed: float) -> int:
        """The smallest bucket holding ``needed`` slots; the largest if none does (the
        engine caps slabs at max_model_len)."""
        i = bisect_left(self.capacities, needed)
        return self.capacities[min(i, len(self.capacities) - 1)]


class _Arrivals:
    """Feeds the workload's requests to the scheduler at their arrival times. Once the last
    one is in, each new plan first forms every partial batch (``next_plan(flush=True)``), as
    the engine's offline loop does: overflows re-queued while a batch runs wait for the next
    plan together."""

    def __init__(self, workload: Workload, scheduler: MultiBinScheduler):
        self.workload = workload
        self.scheduler = scheduler
        self.times = workload.arrival_times
        self.i = 0

    @property
    def next_time(self) -> float | None:
        return self.times[self.i] if self.i < len(self.times) else None

    @property
    def all_in(self) -> bool:
        return self.i == len(self.times)

    def submit_until(self, now: float) -> None:
        times, i, n = self.times, self.i, len(self.times)
        if i < n and times[i] <= now:
            w, submit = self.workload, self.scheduler.submit
            prompts, outputs, max_tokens = w.prompt_lens, w.output_lens, w.max_tokens
            while i < n and times[i] <= now:
                # The payload is the engine's own field: here, the hidden true length.
                submit(Request(f"r{i}", prompts[i], max_tokens, times[i], payload=outputs[i]),
                       times[i])
                i += 1
            self.i = i


class _Meter:
    def __init__(self, batch_log: list | None):
        self.latencies: list[float] = []
        self.tokens = 0.0
        self.live_row_steps = 0.0
        self.row_steps = 0.0
        self.busy = 0.0
        self.kv_slot_time = 0.0
        self.kv_peak = 0
        self.prefill = 0.0
        self.decode = 0.0
        self.batches = 0
        self.batch_log = batch_log
        self.batch: SimBatch | None = None

    def run(self, duration: float, slots: int) -> None:
        self.busy += duration
        self.kv_slot_time += slots * duration
        self.kv_peak = max(self.kv_peak, slots)

    def begin_batch(self, now: float, bin: int, capacity: int) -> None:
        self.batches += 1
        if self.batch_log is not None:
            self.batch = SimBatch(bin, capacity, 0, 0, 0, 0.0, 0.0, now, now)

    def add_to_batch(self, joined: int = 0, steps: float = 0, prefill: float = 0.0,
                     decode: float = 0.0, overflows: int = 0) -> None:
        if self.batch is not None:
            b = self.batch
            b.n_requests += joined
            b.steps += steps
            b.prefill_time += prefill
            b.decode_time += decode
            b.overflows += overflows

    def end_batch(self, now: float) -> None:
        if self.batch is not None:
            self.batch.ended_at = now
            self.batch_log.append(self.batch)
            self.batch = None


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100])."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _row_run(request: Request, bound: float, capacity: int | None
             ) -> tuple[float, float, float, bool]:
    """(decode steps the row is live, steps it holds its slab row, new tokens it leaves with,
    whether it overflows) for a row joining a slab with this plan bound (the paper's rule) or
    this capacity (the engine's rule).

    Under the engine's rule a row that reaches the slab's end is taken out of the next step
    before that step is launched, and its row frees one step later, when its last token has
    been read: it holds the row one step longer than it is live. A row that finishes earlier
    is live for the step in flight when its last token is read, and frees its row after it."""
    remaining = request.payload - request.generated
    if capacity is None:
        return (bound, bound, bound, True) if remaining > bound \
            else (remaining, remaining, remaining, False)
    room = capacity - request.prompt_len  # decode steps before the row reaches the slab's end
    if remaining > room:
        return room, room + 1, min(remaining, room + 1), remaining > room + 1
    return remaining, remaining, remaining, False


def _finish_row(scheduler, meter: _Meter, request, overflowed: bool, tokens: float,
                now: float) -> None:
    if overflowed:
        request.generated += tokens
        request.prompt_len += tokens
        scheduler.on_overflow(request, now)
    else:
        scheduler.on_finish(request.request_id, request.payload, now)
        meter.latencies.append(now - request.arrival_time)
        meter.tokens += request.payload


def _idle_until(scheduler, arrivals: _Arrivals, now: float) -> float | None:
    """The next time something can happen while no slab runs, or None when all is done."""
    candidates = [t for t in (arrivals.next_time, scheduler.next_deadline()) if t is not None]
    if not candidates:
        if scheduler.pending() or scheduler.in_flight():
            raise RuntimeError(f"simulation stuck at t={now}: {scheduler.pending()} requests "
                               f"queued but no batch can form")
        return None
    nxt = min(candidates)
    if nxt <= now and arrivals.next_time != nxt:
        raise RuntimeError(f"simulation stuck at t={now}: deadline {nxt} passed without a batch")
    return max(now, nxt)


def _run_static(scheduler, arrivals: _Arrivals, service: ServiceModel, meter: _Meter,
                rules: _SlabRules) -> float:
    stragglers = getattr(service, "straggler_sum", None)
    t = 0.0
    while True:
        arrivals.submit_until(t)
        plan = scheduler.next_plan(t, flush=arrivals.all_in)
        if plan is None:
            nxt = _idle_until(scheduler, arrivals, t)
            if nxt is None:
                return t
            t = nxt
            continue
        slab_rows, bound = plan.batch_size, plan.max_new_tokens_bound
        if rules.capacities is None:
            capacity, slots = None, plan.max_prompt_len + bound
        else:
            capacity = slots = rules.capacity(plan.max_prompt_len + bound)
        meter.begin_batch(t, plan.bin, slots)
        rows = sorted(((*_row_run(r, bound, capacity), r) for r in plan.requests),
                      key=itemgetter(0))  # (live steps, held steps, tokens, overflowed, request)
        prompt_tokens = sum(r.prompt_len for r in plan.requests)
        prefill = service.prefill_time(len(rows), prompt_tokens)
        # Walk the rows in finishing order; between two finishes the live set is fixed and
        # its KV tokens grow by one per live row per step.
        n_live, live_prompts, step, elapsed = len(rows), prompt_tokens, 0, prefill
        finishes = []
        for i, (steps, _, tokens, overflowed, r) in enumerate(rows):
            if steps > step:
                elapsed += service.decode_sum(slab_rows, live_prompts + n_live * (step + 1),
                                              n_live, steps - step)
                if stragglers is not None:
                    lengths = [row[4].prompt_len + step + 1 for row in rows[i:]]
                    elapsed += stragglers(slab_rows, lengths, steps - step)
                step = steps
            finishes.append((t + elapsed, r, overflowed, tokens))
            n_live -= 1
            live_prompts -= r.prompt_len
        meter.prefill += prefill
        meter.decode += elapsed - prefill
        meter.live_row_steps += sum(row[0] for row in rows)
        meter.row_steps += slab_rows * step
        meter.run(elapsed, slab_rows * slots)
        meter.add_to_batch(joined=len(rows), steps=step, prefill=prefill,
                           decode=elapsed - prefill, overflows=sum(row[3] for row in rows))
        meter.end_batch(t + elapsed)
        for finish_time, r, overflowed, tokens in finishes:
            arrivals.submit_until(finish_time)
            _finish_row(scheduler, meter, r, overflowed, tokens, finish_time)
        t += elapsed


# Events of a refilling slab, in step order: a row's last live step that also frees its row,
# a last live step with the row still held (it reached the slab's end), and that row freeing.
_LEAVE, _DEAD, _FREE = 0, 1, 2


def _run_refilling(scheduler, arrivals: _Arrivals, service: ServiceModel, meter: _Meter,
                   rules: _SlabRules, continuous: bool, max_model_len: int) -> float:
    slab_rows = scheduler.batch_size
    stragglers = getattr(service, "straggler_sum", None)
    # Rows joining a running slab may cost less than a slab's first prefill (``refill_time``).
    refill_time = getattr(service, "refill_time", service.prefill_time)
    # (step, tiebreak, kind, request, tokens, overflowed, key); a live row holds key + s + 1
    # tokens at step s (key = its prompt at joining minus the step it joined at).
    events: list = []
    step = 0.0  # the slab's step clock; a row joining at step s with n steps leaves at s + n
    t = 0.0
    n_live = 0
    held = 0  # rows no longer live that still hold their slab row
    live_base = 0.0  # sum of the live rows' keys
    slab_bin, bound, capacity = None, math.inf, max_model_len
    row_capacity = None  # the engine's rule: the slab's C; None: the paper's bound rule
    first_free_at = None  # when a row first stood free since the last refill (engine's rule)
    refill_closed = False
    tiebreak = 0

    def pop_events(until: float, now: float) -> None:
        nonlocal n_live, held, live_base
        # Requests that arrived while the slab ran reach the scheduler before these finishes
        # and overflows: a re-queued overflow goes behind them, as in the static loop.
        arrivals.submit_until(now)
        while events and events[0][0] <= until:
            _, _, kind, r, tokens, overflowed, key = heappop(events)
            if kind != _FREE:
                n_live -= 1
                live_base -= key
            held += {_LEAVE: 0, _DEAD: 1, _FREE: -1}[kind]
            if kind != _DEAD:
                meter.add_to_batch(overflows=int(overflowed))
                _finish_row(scheduler, meter, r, overflowed, tokens, now)

    while True:
        arrivals.submit_until(t)
        if n_live == 0 and held:
            # Nothing left to launch a step for: the held rows' last tokens are read at once.
            pop_events(math.inf, t)
        free = slab_rows - n_live - held
        joining = []
        starting = n_live == 0
        if starting:
            meter.end_batch(t)
            first_free_at, refill_closed = None, False
            if continuous:
                if scheduler.pending():
                    meter.begin_batch(t, 0, capacity)
                    joining = scheduler.refill(None, free, t)
            else:
                plan = scheduler.next_plan(t, flush=arrivals.all_in)
                if plan is not None:
                    # The slab outlives this plan: size it for any request of its bin, not just
                    # these (whose max_tokens may cap the plan's bound below the bin's).
                    slab_bin = plan.bin
                    bound = max(plan.max_new_tokens_bound, scheduler.edges.upper(plan.bin))
                    if rules.capacities is None:
                        capacity = plan.max_prompt_len + bound
                    else:
                        capacity = row_capacity = rules.capacity(plan.max_prompt_len + bound)
                    meter.begin_batch(t, plan.bin, capacity)
                    joining = plan.requests
        elif free > 0 and not refill_closed:
            if first_free_at is None:
                first_free_at = t
            waited = rules.refill_max_wait is not None and \
                t - first_free_at >= rules.refill_max_wait
            if free >= rules.refill_min_free or waited:
                for r in scheduler.refill(None if continuous else slab_bin, free, t):
                    if row_capacity is not None and r.prompt_len >= row_capacity:
                        # Too long for this slab (a re-queued overflow): up a bin. Back in this
                        # very bin (the top one), it needs a new plan: let the slab drain.
                        meter.add_to_batch(overflows=1)
                        scheduler.on_overflow(r, t)
                        refill_closed = refill_closed or r.bin == slab_bin
                    else:
                        joining.append(r)
                if joining:
                    first_free_at = None if len(joining) == free else t
        else:
            first_free_at = None
        if joining:
            for r in joining:
                if continuous:
                    remaining = r.payload - r.generated
                    live, hold, tokens, overflowed = remaining, remaining, remaining, False
                else:
                    live, hold, tokens, overflowed = _row_run(r, bound, row_capacity)
                key = r.prompt_len - step
                heappush(events, (step + live, tiebreak, _LEAVE if hold == live else _DEAD, r,
                                  tokens, overflowed, key))
                if hold > live:
                    heappush(events, (step + hold, tiebreak + 1, _FREE, r, tokens, overflowed,
                                      key))
                tiebreak += 2
                n_live += 1
                live_base += key
                if not continuous and row_capacity is None:
                    capacity = max(capacity, r.prompt_len + bound)
            prompt_tokens = sum(r.prompt_len for r in joining)
            if starting:
                prefill = service.prefill_time(len(joining), prompt_tokens)
            else:
                prefill = refill_time(len(joining), prompt_tokens)
            meter.prefill += prefill
            meter.run(prefill, slab_rows * capacity)
            meter.add_to_batch(joined=len(joining), prefill=prefill)
            t += prefill
            continue  # requests may have arrived during the prefill
        if n_live == 0:
            nxt = _idle_until(scheduler, arrivals, t)
            if nxt is None:
                return t
            t = nxt
            continue
        next_event = events[0][0]
        n_steps = next_event - step
        live_start = live_base + n_live * (step + 1)
        if stragglers is None:
            cost = lambda n: service.decode_sum(slab_rows, live_start, n_live, n)
        else:
            lengths = [e[6] + step + 1 for e in events if e[2] != _FREE]
            cost = lambda n: (service.decode_sum(slab_rows, live_start, n_live, n)
                              + stragglers(slab_rows, lengths, n))
        duration = cost(n_steps)
        wake = None  # when a free row may next take a request
        if free > 0 and not refill_closed:
            expiry = first_free_at + rules.refill_max_wait if rules.refill_max_wait is not None \
                else math.inf
            if free >= rules.refill_min_free or expiry <= t:
                wake = arrivals.next_time
            elif expiry < math.inf:
                wake = expiry
        stopped = False
        if wake is not None and wake < t + duration:
            # Stop at the step where the wake-up falls.
            partial = service.steps_in(slab_rows, live_start, n_live, wake - t) \
                if stragglers is None else fewest_steps(cost, wake - t)
            if partial < n_steps:
                n_steps, stopped = partial, True
                duration = cost(n_steps)
        meter.decode += duration
        meter.live_row_steps += n_live * n_steps
        meter.row_steps += slab_rows * n_steps
        meter.run(duration, slab_rows * capacity)
        meter.add_to_batch(steps=n_steps, decode=duration)
        # Stopping at a wake-up lands on it exactly (real steps) or just past it (whole
        # steps); max() also keeps rounding from leaving t a hair short of it.
        t = max(t + duration, wake) if stopped else t + duration
        step = step + n_steps if stopped else next_event
        pop_events(step, t)


def simulate(workload: Workload, scheduler: MultiBinScheduler,
             service: ServiceModel = PAPER_SERVICE, mode: str = "static",
             max_model_len: int | None = None, *, capacities: Sequence[int] | None = None,
             refill_min_free: int = 1, refill_max_wait: float | None = None,
             batch_log: list | None = None) -> SimResult:
    """Run ``workload`` through ``scheduler`` on the modelled GPU until every request is done.

    Args:
        workload: requests, arrival times and hidden true lengths (whole numbers when the
            service model needs whole steps, e.g. a measured ``StepTimeTable``).
        scheduler: a fresh ``MultiBinScheduler`` (its predictor already holds any true-length
            map it needs); its ``batch_size`` is the slab's row count.
        service: step-time model (default: the paper's, one time unit per token).
        mode: "static", "bin-continuous" or "continuous".
        max_model_len: the continuous slab's capacity C (default: the longest prompt plus
            ``max_tokens``).
        capacities: the engine's slab capacity buckets in token slots per row (any order):
            overflow by the engine's rule (module docstring). None: the paper's bound rule.
        refill_min_free: the refilling modes refill once this many rows are free (>= 1) ...
        refill_max_wait: ... or once the first free row has waited this long (None: never
            by waiting), or when no row is live.
        batch_log: if a list, one ``SimBatch`` per batch is appended to it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if service.integer_steps and not workload.is_integer:
        raise ValueError("this service model counts whole decode steps; make the workload's "
                         "output lengths integers (make_workload(..., integer=True))")
    if workload.max_tokens > scheduler.edges.max_len:
        raise ValueError(f"workload max_tokens={workload.max_tokens} exceeds the bins' "
                         f"max_len={scheduler.edges.max_len}")
    if scheduler.pending() or scheduler.in_flight() or scheduler.closed:
        raise ValueError("simulate needs a fresh scheduler")
    if not isinstance(refill_min_free, int) or refill_min_free < 1:
        raise ValueError(f"refill_min_free must be an integer >= 1, got {refill_min_free!r}")
    if refill_max_wait is not None and not refill_max_wait >= 0:
        raise ValueError(f"refill_max_wait must be >= 0 or None, got {refill_max_wait!r}")
    if capacities is not None:
        capacities = tuple(sorted(set(capacities)))
        if not capacities or any(int(c) != c or c < 1 for c in capacities):
            raise ValueError(f"capacities must be positive whole token counts, got "
                             f"{list(capacities)}")
    longest = max(workload.prompt_lens, default=0) + workload.max_tokens
    if capacities is not None and capacities[-1] < longest:
        raise ValueError(f"the largest capacity {capacities[-1]} cannot hold the longest prompt "
                         f"plus max_tokens ({longest} tokens)")
    if max_model_len is None:
        max_model_len = longest
    rules = _SlabRules(capacities, refill_min_free, refill_max_wait)
    meter = _Meter(batch_log)
    arrivals = _Arrivals(workload, scheduler)
    if mode == "static":
        makespan = _run_static(scheduler, arrivals, service, meter, rules)
    else:
        makespan = _run_refilling(scheduler, arrivals, service, meter, rules,
                                  mode == "continuous", max_model_len)
    scheduler.close(makespan)  # spent: a second simulate() must refuse it
    lat = sorted(meter.latencies)
    n = len(lat)
    if n != len(workload):
        raise RuntimeError(f"simulation finished {n} of {len(workload)} requests")
    occupancy = meter.live_row_steps / meter.row_steps if meter.row_steps else 0.0
    per_time = (lambda x: x / makespan) if makespan > 0 else (lambda x: math.inf if x else 0.0)
    return SimResult(
        mode=mode, n_requests=n, n_batches=meter.batches, makespan=makespan,
        throughput=per_time(n), token_throughput=per_time(meter.tokens),
        latency_mean=math.fsum(lat) / n if n else math.nan,
        latency_p50=_percentile(lat, 50), latency_p90=_percentile(lat, 90),
        latency_p99=_percentile(lat, 99),
        occupancy=occupancy, padding_waste=1.0 - occupancy if meter.row_steps else 0.0,
        busy_fraction=meter.busy / makespan if makespan > 0 else 0.0,
        kv_slots_peak=meter.kv_peak,
        kv_slots_mean=meter.kv_slot_time / makespan if makespan > 0 else 0.0,
        overflows=scheduler.overflow_count, prefill_time=meter.prefill, decode_time=meter.decode)
