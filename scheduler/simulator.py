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
row whose true remaining length exceeds its plan's ``max_new_tokens_bound`` runs to the bound
and overflows: the simulator advances its ``prompt_len`` and ``generated`` and hands it back
with ``on_overflow``. A request's latency runs from its arrival to its last token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from heapq import heappop, heappush
from operator import itemgetter

from scheduler.policy import MultiBinScheduler
from scheduler.service import PAPER_SERVICE, ServiceModel
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


class _Arrivals:
    """Feeds the workload's requests to the scheduler at their arrival times; closes the
    scheduler (final flush) once the last one is in."""

    def __init__(self, workload: Workload, scheduler: MultiBinScheduler):
        self.workload = workload
        self.scheduler = scheduler
        self.times = workload.arrival_times
        self.i = 0

    @property
    def next_time(self) -> float | None:
        return self.times[self.i] if self.i < len(self.times) else None

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
        if self.i == n and not self.scheduler.closed:
            self.scheduler.close(times[-1] if n else now)


class _Meter:
    def __init__(self):
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

    def run(self, duration: float, slots: int) -> None:
        self.busy += duration
        self.kv_slot_time += slots * duration
        self.kv_peak = max(self.kv_peak, slots)


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100])."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _finish_row(scheduler, meter: _Meter, request, overflowed: bool, steps: float,
                now: float) -> None:
    if overflowed:
        request.generated += steps
        request.prompt_len += steps
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


def _run_static(scheduler, arrivals: _Arrivals, service: ServiceModel, meter: _Meter) -> float:
    t = 0.0
    while True:
        arrivals.submit_until(t)
        plan = scheduler.next_plan(t)
        if plan is None:
            nxt = _idle_until(scheduler, arrivals, t)
            if nxt is None:
                return t
            t = nxt
            continue
        meter.batches += 1
        slab_rows, bound = plan.batch_size, plan.max_new_tokens_bound
        rows = []
        for r in plan.requests:
            remaining = r.payload - r.generated
            rows.append((bound, r, True) if remaining > bound else (remaining, r, False))
        rows.sort(key=itemgetter(0))
        prompt_tokens = sum(r.prompt_len for r in plan.requests)
        prefill = service.prefill_time(len(rows), prompt_tokens)
        # Walk the rows in finishing order; between two finishes the live set is fixed and
        # its KV tokens grow by one per live row per step.
        n_live, live_prompts, step, elapsed = len(rows), prompt_tokens, 0, prefill
        finishes = []
        for steps, r, overflowed in rows:
            if steps > step:
                elapsed += service.decode_sum(slab_rows, live_prompts + n_live * (step + 1),
                                              n_live, steps - step)
                step = steps
            finishes.append((t + elapsed, r, overflowed, steps))
            n_live -= 1
            live_prompts -= r.prompt_len
        meter.prefill += prefill
        meter.decode += elapsed - prefill
        meter.live_row_steps += sum(row[0] for row in rows)
        meter.row_steps += slab_rows * step
        meter.run(elapsed, slab_rows * (plan.max_prompt_len + bound))
        for finish_time, r, overflowed, steps in finishes:
            arrivals.submit_until(finish_time)
            _finish_row(scheduler, meter, r, overflowed, steps, finish_time)
        t += elapsed


def _run_refilling(scheduler, arrivals: _Arrivals, service: ServiceModel, meter: _Meter,
                   continuous: bool, max_model_len: int) -> float:
    slab_rows = scheduler.batch_size
    heap: list = []  # (finish_step, tiebreak, request, steps, overflowed, prompt_at_join, join_step)
    step = 0.0  # the slab's step clock; a row joining at step s with n steps leaves at s + n
    t = 0.0
    n_live = 0
    live_base = 0.0  # sum over live rows of (prompt_at_join - join_step)
    slab_bin, bound, capacity = None, None, max_model_len
    tiebreak = 0
    while True:
        arrivals.submit_until(t)
        free = slab_rows - n_live
        joining = []
        if free > 0:
            if continuous:
                if n_live == 0 and scheduler.pending():
                    meter.batches += 1
                joining = scheduler.refill(None, free, t)
            elif n_live == 0:
                plan = scheduler.next_plan(t)
                if plan is not None:
                    meter.batches += 1
                    # The slab outlives this plan: size it for any request of its bin, not just
                    # these (whose max_tokens may cap the plan's bound below the bin's).
                    slab_bin = plan.bin
                    bound = max(plan.max_new_tokens_bound, scheduler.edges.upper(plan.bin))
                    capacity = plan.max_prompt_len + bound
                    joining = plan.requests
            else:
                joining = scheduler.refill(slab_bin, free, t)
        if joining:
            for r in joining:
                remaining = r.payload - r.generated
                overflowed = bound is not None and not continuous and remaining > bound
                steps = bound if overflowed else remaining
                heappush(heap, (step + steps, tiebreak, r, steps, overflowed, r.prompt_len, step))
                tiebreak += 1
                n_live += 1
                live_base += r.prompt_len - step
                if not continuous:
                    capacity = max(capacity, r.prompt_len + bound)
            prefill = service.prefill_time(len(joining), sum(r.prompt_len for r in joining))
            meter.prefill += prefill
            meter.run(prefill, slab_rows * capacity)
            t += prefill
            continue  # requests may have arrived during the prefill
        if n_live == 0:
            nxt = _idle_until(scheduler, arrivals, t)
            if nxt is None:
                return t
            t = nxt
            continue
        finish_step = heap[0][0]
        n_steps = finish_step - step
        live_start = live_base + n_live * (step + 1)
        duration = service.decode_sum(slab_rows, live_start, n_live, n_steps)
        next_arrival = arrivals.next_time
        if free > 0 and next_arrival is not None and next_arrival < t + duration:
            # Stop at the step where the next request arrives: a free row may take it.
            partial = service.steps_in(slab_rows, live_start, n_live, next_arrival - t)
            if partial < n_steps:
                n_steps, finish_step = partial, step + partial
                duration = service.decode_sum(slab_rows, live_start, n_live, n_steps)
        meter.decode += duration
        meter.live_row_steps += n_live * n_steps
        meter.row_steps += slab_rows * n_steps
        meter.run(duration, slab_rows * capacity)
        # Stopping for an arrival lands on it exactly (real steps) or just past it (whole
        # steps); max() also keeps rounding from leaving t a hair short of it.
        t = t + duration if finish_step == heap[0][0] else max(t + duration, next_arrival)
        step = finish_step
        while heap and heap[0][0] <= step:
            _, _, r, steps, overflowed, prompt_at_join, join_step = heappop(heap)
            n_live -= 1
            live_base -= prompt_at_join - join_step
            _finish_row(scheduler, meter, r, overflowed, steps, t)


def simulate(workload: Workload, scheduler: MultiBinScheduler,
             service: ServiceModel = PAPER_SERVICE, mode: str = "static",
             max_model_len: int | None = None) -> SimResult:
    """Run ``workload`` through ``scheduler`` on the modelled GPU until every request is done.

    Args:
        workload: requests, arrival times and hidden true lengths (whole numbers when the
            service model needs whole steps, e.g. a measured ``StepTimeTable``).
        scheduler: a fresh ``MultiBinScheduler`` (its predictor already holds any true-length
            map it needs); its ``batch_size`` is the slab's row count.
        service: step-time model (default: the paper's, one time unit per token).
        mode: "static", "bin-continuous" or "continuous".
        max_model_len: the continuous slab's capacity C for the KV figures (default: the
            longest prompt plus ``max_tokens``).
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
    if max_model_len is None:
        max_model_len = max(workload.prompt_lens, default=0) + workload.max_tokens
    meter = _Meter()
    arrivals = _Arrivals(workload, scheduler)
    if mode == "static":
        makespan = _run_static(scheduler, arrivals, service, meter)
    else:
        makespan = _run_refilling(scheduler, arrivals, service, meter, mode == "continuous",
                                  max_model_len)
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
