"""The batch-shape study (DESIGN.md "Batch-shape study"): a small GPU core, the rest simulated.

1. Step-time tables: decode time(B, live tokens) and prefill time(B, prompt tokens) of the
   model on this GPU, measured on the engine's own runner (CUDA graphs, Triton kernels),
   saved as ``step_times.json`` (``scheduler.schemas.StepTimeTable``); and the same decode
   steps with a single live row per slab, ``step_times_one_row.json`` (how fast a lone row
   streams its KV: what rows of unequal length cost, ``scheduler.service.EngineStepModel``).
2. Engine overheads: the engine itself runs calibration batches (requests of their own) at
   each B of the core; what its loop costs beyond the tables, per decode step and per
   prefill call, completes the simulator's step model.
3. GPU core on ``dummy:llama-3.2-1b``: prompts U[64, 512] of random ids, output lengths
   ceil(U[1, 1024]) handed to the engine as the hidden ``target_len`` (``ignore_eos``,
   ``max_tokens`` 1024 as an honest loose cap). B=64 with k in {1, 4, 16}, modes static /
   bin-continuous / continuous, predictors oracle and bin-error p_e=0.2; B=8 static with k in
   {1, 16} (the paper's setting); Poisson arrivals at two rates (B=64, k in {1, 4}, static).
   Before it starts, every run is simulated with the table and the estimate printed; request
   counts shrink (same recipes, whole batches) if the estimate exceeds ``--core-budget-s``.
   Each run keeps its batch records and GPU clock readings.
4. transformers' static-cache ``generate`` on padded B=8 batches of the same requests in
   arrival order, each batch running to its longest target.
5. Simulations calibrated by the step model (in worker processes, after the GPU work), with
   the engine's slab rules (capacity buckets, refill threshold and wait): B in {8, 64}, k in
   {1, 2, 4, 8, 16, 32}, predictors oracle / bin-error 0.05, 0.2 / max-tokens, U[1, 1024]
   and the chat-like lognormal, all three modes; equal-KV-memory comparisons; latency
   against the arrival rate; and every measured run on its exact workload, batch by batch
   (the simulator's error).

Outputs in ``--out``: ``e2e.json``, the two step tables, ``e2e_table.md`` and the PNGs
``e2e_throughput_vs_k``, ``e2e_gain_vs_paper``, ``e2e_sim_vs_measured``, ``e2e_latency``.

    python -m bench.e2e [--out DIR] [--quick] [--smoke] [--requests-big N] ...
    python -m bench.e2e --resimulate SAVED/e2e.json --out DIR

``--quick`` shrinks everything for a first GPU sanity run; ``--smoke`` runs on ``dummy:tiny`` on
the CPU with a handful of requests (the CI test). ``--resimulate`` needs no GPU: it recomputes
the simulated side of every measured run of a saved study with today's simulator
(``resimulate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import plots
from bench.common import RESULTS_DIR, run_metadata, write_json
from bench.engine import build_hf_llama, free_device_memory, hf_generate_seconds
from bench.workloads import (CHAT_LENGTHS, CLOSED_FORM_GAIN_PCT, PAPER_GAIN_PCT, PROMPT_LENGTHS,
                             UNIFORM_LENGTHS, Distribution, SimSpec, WorkloadSpec, batch_check,
                             bin_edges, closed_form_gains, equal_kv_specs, gains_over_k1,
                             grid_specs, json_safe, latency_specs, paper_model_specs,
                             prompt_token_ids, relative_errors, run_simulation_groups,
                             run_simulations, simulate_equal_kv, simulate_spec,
                             simulate_with_batches)
from scheduler.schemas import StepTimeTable
from scheduler.service import PAPER_SERVICE, EngineStepModel
from scheduler.workload import Workload, parse_lengths

# Set-up cost of one GPU-core run, for the estimate: engine start plus one warm-up batch per
# slab capacity it may use (a prefill and a graph capture).
RUN_SETUP_S = 1.5
WARMUP_PER_CAPACITY_S = 0.4
# Enough that partial batches at the end move the paper-model gains by well under 1 point.
PAPER_MODEL_REQUESTS = 16384
# The engine-overhead calibration draws its prompts with seed + this: requests of their own.
CALIBRATION_SEED_OFFSET = 1000
STEP_TABLE_FILE = "step_times.json"
ONE_ROW_TABLE_FILE = "step_times_one_row.json"


@dataclass
class StudyConfig:
    """Every size of the study. ``lengths`` drives the GPU core; the simulations add
    ``chat_lengths`` (capped at ``chat_max_tokens``)."""

    model: str = "dummy:llama-3.2-1b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    lengths: str = UNIFORM_LENGTHS
    chat_lengths: str = CHAT_LENGTHS
    prompts: str = PROMPT_LENGTHS
    max_tokens: int = 1024
    chat_max_tokens: int = 2048
    min_capacity: int = 256
    # GPU core
    big_batch: int = 64
    small_batch: int = 8
    core_bins: tuple[int, ...] = (1, 4, 16)
    small_bins: tuple[int, ...] = (1, 16)
    poisson_bins: tuple[int, ...] = (1, 4)
    p_error: float = 0.2
    requests_big: int = 512
    requests_small: int = 256
    poisson_requests: int = 192
    poisson_loads: tuple[float, ...] = (0.5, 0.9)  # x the simulated static k=1 capacity
    max_wait_ms: float = 50.0  # runs with every request at t=0 (the engine's default)
    poisson_max_wait_ms: float = 2000.0
    hf_batches: int = 1
    core_budget_s: float = 240.0  # 0: never shrink
    # step-time table
    table_decode_batches: tuple[int, ...] = (1, 8, 16, 32, 64, 128)
    table_decode_lens: tuple[int, ...] = (64, 512, 1024, 1536, 2048)
    table_prefill_batches: tuple[int, ...] = (1, 8, 32, 64)
    table_prefill_lens: tuple[int, ...] = (64, 256, 512, 1024)
    table_steps: int = 8
    # engine overheads: two calibration batches per core batch size, T1 and T2 new tokens
    calibration_new_tokens: tuple[int, int] = (64, 448)
    # simulations
    sim_batches: tuple[int, ...] = (8, 64)
    sim_bins: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    sim_predictors: tuple[str, ...] = ("oracle", "bin-error:0.05", "bin-error:0.2", "max-tokens")
    sim_requests: int = 8192
    latency_loads: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1)
    latency_steady_requests: int = 4096
    workers: int = field(default_factory=lambda: max(1, min(12, (os.cpu_count() or 2) - 2)))

    @property
    def prompt_range(self) -> tuple[int, int]:
        dist = parse_lengths(self.prompts)
        return math.ceil(dist.quantile(0.0)), math.ceil(dist.quantile(1.0))

    @property
    def max_model_len(self) -> int:
        """The GPU core's: longest prompt plus max_tokens."""
        return self.prompt_range[1] + self.max_tokens

    @property
    def distributions(self) -> list[Distribution]:
        return [Distribution(self.lengths, self.max_tokens),
                Distribution(self.chat_lengths, self.chat_max_tokens)]


def quick_config() -> StudyConfig:
    return StudyConfig(requests_big=128, requests_small=64, poisson_requests=96,
                       table_decode_batches=(1, 8, 64, 128), table_decode_lens=(64, 1024, 2048),
                       table_prefill_batches=(1, 64), table_prefill_lens=(64, 512),
                       sim_requests=2048, latency_loads=(0.5, 0.9),
                       latency_steady_requests=1024, core_budget_s=120.0)


def smoke_config() -> StudyConfig:
    # Short prompts and small capacity buckets, so mispredicted rows reach their slab's end.
    return StudyConfig(model="dummy:tiny", device="cpu", dtype="float32",
                       lengths="uniform:1:24", chat_lengths="lognormal:4:14:32",
                       prompts="uniform:2:6", max_tokens=24, chat_max_tokens=32, min_capacity=8,
                       big_batch=4, small_batch=2, requests_big=8, requests_small=4, p_error=0.4,
                       poisson_requests=6, poisson_max_wait_ms=100.0, core_budget_s=0.0,
                       table_decode_batches=(1, 2, 4), table_decode_lens=(4, 12, 24),
                       table_prefill_batches=(1, 4), table_prefill_lens=(4, 12), table_steps=3,
                       calibration_new_tokens=(3, 9),
                       sim_batches=(2, 4), sim_bins=(1, 2, 4), sim_requests=64,
                       latency_loads=(0.5, 0.9), latency_steady_requests=32, workers=1)


# ---- 1. step-time table -------------------------------------------------------------------


def measure_step_table(config: StudyConfig, progress: bool = True
                       ) -> tuple[StepTimeTable, StepTimeTable]:
    """Decode and prefill times of ``config.model`` on the engine's ``BatchRunner``: the step
    table, and the one-row table (``scheduler.service.EngineStepModel``).

    Decode (B, L): prefill B rows of L tokens into a slab of the capacity the engine would
    use, run 2 steps (the first captures the CUDA graph), then time ``table_steps`` steps
    (device time, ``runner.Stopwatch``); the row is (B, mean live tokens, median seconds).
    The one-row table does the same with only the first row prefilled (the others dead): how
    fast one row streams its KV alone. Prefill (B, L): B prompts of L tokens, once to warm
    up, then the median of two timed runs (the one-row table carries the same prefill rows).
    """
    from tqdm.auto import tqdm

    from engine.backend import default_backend
    from engine.kv_cache import KVArena
    from engine.model import load_model
    from engine.runner import BatchRunner, RowSampling, Stopwatch, capacity_bucket

    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype)
    model = load_model(config.model, dtype, device, default_backend(device), seed=config.seed)
    cfg = model.config
    warm, steps = 2, config.table_steps
    longest = config.prompt_range[1] + max(config.max_tokens, config.chat_max_tokens)
    capacity = lambda tokens: capacity_bucket(tokens, config.min_capacity, max(longest, tokens))
    decode_grid = [(B, L) for B in config.table_decode_batches for L in config.table_decode_lens]
    prefill_grid = [(B, L) for B in config.table_prefill_batches for L in config.table_prefill_lens]
    slots = max([B * capacity(L + warm + steps + 1) for B, L in decode_grid]
                + [B * capacity(L + 1) for B, L in prefill_grid])
    arena = KVArena(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, slots, dtype, device)
    arena.k.zero_()
    arena.v.zero_()
    runner = BatchRunner(model, arena)
    greedy = RowSampling(temperature=0.0, top_k=-1, top_p=1.0, seed=config.seed, logprobs=False)
    g = torch.Generator().manual_seed(config.seed)
    prompts = lambda B, L: torch.randint(0, cfg.vocab_size, (B, L), generator=g).tolist()

    def decode_seconds(B: int, L: int, live: int) -> float:
        runner.begin(B, capacity(L + warm + steps + 1))
        runner.prefill(list(range(live)), prompts(live, L), [greedy] * live).result()
        for _ in range(warm):
            runner.decode()
        watches = []
        for _ in range(steps):
            watches.append(Stopwatch(device))
            watches[-1].start()
            runner.decode()
            watches[-1].stop()
        seconds = statistics.median(w.seconds() for w in watches)
        runner.end()
        return seconds

    decode_rows, one_row_rows, prefill_rows = [], [], []
    bar = tqdm(total=len(decode_grid) + len(prefill_grid), desc="step-time table",
               disable=not progress, leave=False)
    for B, L in decode_grid:
        # Timed step s (from 0) attends to L + 1 + warm + s tokens in each live row.
        tokens = L + 1 + warm + (steps - 1) / 2
        decode_rows.append((B, round(B * tokens), decode_seconds(B, L, B)))
        one_row_rows.append((B, round(tokens), decode_seconds(B, L, 1)))
        bar.update(1)
    for B, L in prefill_grid:
        samples = []
        for attempt in range(3):
            batch = prompts(B, L)
            runner.begin(B, capacity(L + 1))
            watch = Stopwatch(device)
            watch.start()
            pending = runner.prefill(list(range(B)), batch, [greedy] * B)
            watch.stop()
            pending.result()
            if attempt:  # the first run compiles and warms up
                samples.append(watch.seconds())
            runner.end()
        prefill_rows.append((B, B * L, statistics.median(samples)))
        bar.update(1)
    bar.close()
    del runner, arena, model
    free_device_memory()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"dtype": config.dtype, "decode_steps_timed": steps, "warmup_steps": warm,
            "min_capacity": config.min_capacity}
    table = StepTimeTable(device=name, model=config.model, decode=decode_rows,
                          prefill=prefill_rows,
                          meta={**meta, "decode_live_tokens": "B rows x mean tokens per row "
                                                              "over the timed steps"})
    one_row = StepTimeTable(device=name, model=config.model, decode=one_row_rows,
                            prefill=prefill_rows,
                            meta={**meta, "decode_live_tokens": "one live row (the other B-1 "
                                                                "dead): its mean tokens over the "
                                                                "timed steps",
                                  "prefill": f"as {STEP_TABLE_FILE}"})
    return table, one_row


# ---- 2. GPU core --------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreRun:
    """One measured configuration of the GPU core."""

    batch_size: int
    k: int
    mode: str
    predictor: str
    workload: WorkloadSpec
    max_wait_ms: float

    @property
    def name(self) -> str:
        rate = self.workload.arrival_rate
        arrivals = "t=0" if rate is None else f"poisson {rate:.1f}/s"
        return f"B{self.batch_size} k{self.k} {self.mode} {self.predictor} {arrivals}"

    def sim_spec(self, config: StudyConfig) -> SimSpec:
        """The simulation of this run: same workload, bins and predictor, and the slab rules
        of the engine options it runs with."""
        return SimSpec(self.workload, self.batch_size, self.k, self.mode, self.predictor,
                       max_wait_s=self.max_wait_ms / 1e3, max_model_len=config.max_model_len,
                       **engine_slab_rules(engine_options(self, config)))

    def fields(self) -> dict:
        return {"name": self.name, "B": self.batch_size, "k": self.k, "mode": self.mode,
                "predictor": self.predictor, "lengths": self.workload.lengths,
                "n_requests": self.workload.n, "arrival_rate": self.workload.arrival_rate,
                "max_wait_ms": self.max_wait_ms}


def core_runs(config: StudyConfig, rates: list[float]) -> list[CoreRun]:
    """The GPU core's configurations. With one bin the predictor changes nothing, and
    bin-continuous with one bin is continuous, so those run once."""
    spec = lambda n, rate=None: WorkloadSpec(n, config.lengths, config.prompts, config.max_tokens,
                                             config.seed, rate)
    big, small = spec(config.requests_big), spec(config.requests_small)
    B, wait, noisy = config.big_batch, config.max_wait_ms, f"bin-error:{config.p_error}"
    runs = []
    for mode in ("static", "bin-continuous"):
        for k in config.core_bins:
            if k == 1:
                if mode == "static":
                    runs.append(CoreRun(B, 1, mode, "oracle", big, wait))
                continue
            runs += [CoreRun(B, k, mode, predictor, big, wait) for predictor in ("oracle", noisy)]
    runs.append(CoreRun(B, 1, "continuous", "oracle", big, wait))
    runs += [CoreRun(config.small_batch, k, "static", "oracle", small, wait)
             for k in config.small_bins]
    runs += [CoreRun(B, k, "static", "oracle", spec(config.poisson_requests, rate),
                     config.poisson_max_wait_ms)
             for rate in rates for k in config.poisson_bins]
    return runs


def slab_capacities(run: CoreRun, config: StudyConfig) -> list[int]:
    """Every slab capacity C the engine may pick in this run: its capacity buckets from the
    smallest bin's need (shortest prompt) to the largest bin's (longest prompt)."""
    from engine.runner import capacity_bucket

    top = config.max_model_len
    if run.mode == "continuous":
        return [top]
    edges = bin_edges(config.lengths, run.k, config.max_tokens)
    lo, hi = config.prompt_range
    needs = [capacity_bucket(p + edges.upper(b), config.min_capacity, top)
             for b in range(run.k) for p in (lo, hi)]
    buckets = {min(config.min_capacity * 2 ** i, top) for i in range(top.bit_length() + 1)}
    return sorted(c for c in buckets if min(needs) <= c <= max(needs))


def engine_options(run: CoreRun, config: StudyConfig):
    """The engine's options for ``run``; the bins are passed as explicit edges, the same the
    simulator uses."""
    from engine.options import EngineOptions

    edges = bin_edges(config.lengths, run.k, config.max_tokens)
    return EngineOptions(
        model=config.model, dtype=config.dtype, device=config.device, seed=config.seed,
        batch_size=run.batch_size, bins=run.k,
        bin_edges=list(edges.boundaries) if run.k > 1 else None, mode=run.mode,
        predictor=run.predictor, max_model_len=config.max_model_len,
        max_output_len=config.max_tokens, min_capacity=config.min_capacity,
        max_wait_ms=run.max_wait_ms, log_labels={"run": run.name})


def engine_slab_rules(options) -> dict:
    """The engine's slab rules as ``SimSpec`` fields, read from the engine: its capacity
    buckets (``engine.runner.capacity_bucket`` of every length up to max_model_len), its
    refill threshold and its refill wait (``EngineOptions.refill_min_free``, ``max_wait_ms``)."""
    from engine.runner import capacity_bucket

    top = options.max_model_len
    if top is None:
        raise ValueError("engine_slab_rules needs options with an explicit max_model_len")
    capacities = sorted({capacity_bucket(n, options.min_capacity, top) for n in range(1, top + 1)})
    # EngineOptions.refill_min_free documents None as max(1, batch_size // 8).
    min_free = options.refill_min_free or max(1, options.batch_size // 8)
    return {"capacities": tuple(capacities), "refill_min_free": min_free,
            "refill_max_wait_s": options.max_wait_ms / 1e3}


def with_engine_rules(spec: SimSpec, config: StudyConfig, max_wait_ms: float) -> SimSpec:
    """``spec`` with the slab rules of an engine running its batch size and slab length
    (``config.max_model_len`` when the spec names none) with this ``max_wait_ms``."""
    from engine.options import EngineOptions

    options = EngineOptions(model=config.model, batch_size=spec.batch_size,
                            max_model_len=spec.max_model_len or config.max_model_len,
                            min_capacity=config.min_capacity, max_wait_ms=max_wait_ms)
    return dataclasses.replace(spec, **engine_slab_rules(options))


def warm_up(core, run: CoreRun, config: StudyConfig) -> list[int]:
    """One single-token request per slab capacity the run may use, so kernels are compiled and
    decode graphs captured before the clock starts. Returns those capacities."""
    from engine.request import EngineRequest, SamplingParams

    capacities = slab_capacities(run, config)
    g = torch.Generator().manual_seed(config.seed + 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for c in capacities:
        # A prompt of C-1 tokens plus one new token needs exactly C slots: the slab gets C.
        prompt = torch.randint(0, core.model_config.vocab_size, (c - 1,), generator=g).tolist()
        core.add_request(EngineRequest(f"warm-up-{c}", prompt, params))
        while core.has_unfinished():
            for u in core.step(0.0, flush=True):
                if u.finish_reason == "error":
                    raise RuntimeError(f"warm-up request {u.request_id} failed: {u.error}")
    return capacities


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile, as the simulator computes it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


def play(core, workload, prompts: list[list[int]], max_tokens: int, desc: str = "",
         progress: bool = True) -> dict:
    """Feed ``workload`` to ``core`` in real time (request ``r{i}`` at ``arrival_times[i]``
    seconds after the start) and step the engine until every request is done.

    Partial batches wait for the engine's ``max_wait_ms`` until the last request has arrived;
    from then on they form at once (``step(flush=True)``), as the simulator's final flush does.
    Returns per-request arrival, first-token and finish times (seconds since the start), token
    counts and targets.
    """
    from tqdm.auto import tqdm

    from engine.request import EngineRequest, SamplingParams

    n = len(workload)
    arrivals = workload.arrival_times
    targets = [int(v) for v in workload.output_lens]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    index = {f"r{i}": i for i in range(n)}
    first, finish, counts = [None] * n, [None] * n, [0] * n
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False, unit="req")
    submitted = done = 0
    start = time.monotonic()
    clock = lambda: time.monotonic() - start
    while done < n:
        now = clock()
        while submitted < n and arrivals[submitted] <= now:
            i = submitted
            core.add_request(EngineRequest(f"r{i}", prompts[i], params, arrival_time=arrivals[i],
                                           target_len=targets[i]))
            submitted += 1
        all_in = submitted == n
        updates = core.step(now, flush=all_in)
        t = clock()
        for u in updates:
            i = index[u.request_id]
            if u.new_token_ids:
                counts[i] += len(u.new_token_ids)
                if first[i] is None:
                    first[i] = t
            if u.finished:
                if u.finish_reason != "length":
                    raise RuntimeError(f"request {u.request_id} ended with {u.finish_reason!r}"
                                       f" ({u.error}); benchmark requests end at target_len")
                finish[i] = t
                done += 1
                bar.update(1)
        if not updates and not core.is_running():
            if all_in and not core.has_unfinished():
                raise RuntimeError(f"the engine holds no work but {n - done} requests never "
                                   f"finished")
            wake = [arrivals[submitted]] if submitted < n else []
            deadline = core.next_deadline()
            if deadline is not None:
                wake.append(deadline)
            pause = min(wake) - clock() if wake else 0.0
            if pause > 0:
                time.sleep(min(pause, 0.05))
    bar.close()
    return {"arrival": list(arrivals), "first": first, "finish": finish, "tokens": counts,
            "targets": targets}


_COUNTERS = ("tokens_generated", "prefill_tokens", "decode_steps", "row_steps", "idle_row_steps",
             "overflows", "overflow_recompute_tokens", "overflow_requeue_s")


def run_core(run: CoreRun, config: StudyConfig, progress: bool = True) -> tuple[dict, list]:
    """Measure one configuration on a fresh engine. Returns (its result row, its batch
    records, ``scheduler.schemas.BatchRecord``)."""
    from engine.engine_core import EngineCore

    started = time.perf_counter()
    core = EngineCore(engine_options(run, config))
    try:
        warmups = warm_up(core, run, config)
        before = core.stats()
        n_records = len(core.batch_records)
        workload = run.workload.build()
        prompts = prompt_token_ids(workload, core.model_config.vocab_size, config.seed)
        setup_s = time.perf_counter() - started
        gpu_before = gpu_state()
        times = play(core, workload, prompts, config.max_tokens, desc=run.name, progress=progress)
        gpu_after = gpu_state()
        after = core.stats()
        records = core.batch_records[n_records:]
    finally:
        core.close()
        del core
        free_device_memory()
    latency = [f - a for f, a in zip(times["finish"], times["arrival"])]
    ttft = [f - a for f, a in zip(times["first"], times["arrival"])]
    makespan = max(times["finish"])
    delta = {key: after[key] - before[key] for key in _COUNTERS}
    measured = {
        "makespan": makespan, "throughput": len(latency) / makespan,
        "token_throughput": sum(times["targets"]) / makespan,
        "latency_mean": statistics.fmean(latency), "latency_p50": percentile(latency, 50),
        "latency_p90": percentile(latency, 90), "latency_p99": percentile(latency, 99),
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "padding_waste": delta["idle_row_steps"] / max(delta["row_steps"], 1),
        "n_batches": len(records),
        "mean_requests_per_batch": statistics.fmean(r.n_requests for r in records),
        "prefill_s": sum(r.prefill_s for r in records),
        "refill_prefill_s": sum(r.extra.get("refill_prefill_s", 0.0) for r in records),
        "output_tokens": sum(times["targets"]),
        "token_mismatches": sum(c != t for c, t in zip(times["tokens"], times["targets"])),
        "capacities_used": sorted({r.capacity for r in records}),
        "warmup_capacities": warmups, "setup_s": setup_s, **delta,
        # Where the wall time outside the batches went: before the first batch (submitting
        # the requests) and between batches.
        "first_batch_at": min(r.started_at for r in records),
        "outside_batches_s": makespan - sum(r.wall_s for r in records),
        "gpu_before": gpu_before, "gpu_after": gpu_after,
    }
    return {**run.fields(), "measured": measured, "batches": compact_records(records)}, records


def compact_records(records: list) -> list[dict]:
    """The per-batch numbers of ``BatchRecord``s that the simulator's batches can be checked
    against (per-request lists summed)."""
    return [{"bin": r.bin, "capacity": r.capacity, "n_requests": r.n_requests, "steps": r.steps,
             "idle_row_steps": r.idle_row_steps, "overflows": r.overflows,
             "prompt_tokens": sum(r.prompt_lens), "output_tokens": sum(r.output_lens),
             "prefill_s": r.prefill_s, "decode_s": r.decode_s, "wall_s": r.wall_s,
             "started_at": r.started_at, "formed_at": r.formed_at,
             "refills": r.extra.get("refills", 0),
             "refill_prefill_s": r.extra.get("refill_prefill_s", 0.0)} for r in records]


def gpu_state() -> dict:
    """SM clock (MHz), power (W) and temperature (C) now, where the driver tells (NVML);
    empty off CUDA or without NVML."""
    if not torch.cuda.is_available():
        return {}
    state = {}
    for key, read in (("sm_clock_mhz", torch.cuda.clock_rate),
                      ("power_w", lambda: torch.cuda.power_draw() / 1e3),
                      ("temperature_c", torch.cuda.temperature)):
        try:
            state[key] = read()
        except Exception:  # no NVML: the study runs without these readings
            pass
    return state


def measure_engine_overheads(config: StudyConfig, table: StepTimeTable,
                             one_row: StepTimeTable | None, progress: bool = True) -> dict:
    """What the engine's loop costs beyond the step tables, measured by running the engine.

    At each batch size of the core, one engine (static, one bin, oracle: the core's options)
    runs two batches of B calibration requests (prompts drawn from the study's prompt lengths
    with a seed of their own, so not the core's requests), every row generating T1 tokens in
    the first batch and T2 in the second, all rows live throughout. Then, per B:

    - decode_step_s: the engine's wall time per decode step, from the difference of the two
      batches (batch start and end cancel out), minus the tables' mean over the same steps
      (``EngineStepModel`` without overheads: the step table plus the rows' spread);
    - prefill_call_s: what is left of the wall time from the first batch's start to the last
      finish once the tables' prefills and steps (plus the step overhead) are taken out, per
      batch: host work around a batch, and the prefill of unequal prompts against the table's
      equal ones.

    Returns those as [(B, seconds)] lists with the batches' records and the model's figures.
    """
    from engine.engine_core import EngineCore

    short, long = config.calibration_new_tokens
    if not 1 <= short < long <= config.max_tokens:
        raise ValueError(f"calibration_new_tokens must satisfy 1 <= T1 < T2 <= max_tokens, got "
                         f"{config.calibration_new_tokens}")
    decode_step, prefill_call, rows = [], [], []
    for B in sorted({config.small_batch, config.big_batch}):
        spec = WorkloadSpec(2 * B, config.lengths, config.prompts, config.max_tokens,
                            config.seed + CALIBRATION_SEED_OFFSET)
        base = spec.build()
        workload = Workload(base.arrival_times, base.prompt_lens, [short] * B + [long] * B,
                            config.max_tokens)
        run = CoreRun(B, 1, "static", "oracle", spec, config.max_wait_ms)
        core = EngineCore(engine_options(run, config))
        try:
            warm_up(core, run, config)
            n_records = len(core.batch_records)
            prompts = prompt_token_ids(workload, core.model_config.vocab_size, spec.seed)
            times = play(core, workload, prompts, config.max_tokens,
                         desc=f"engine overheads B={B}", progress=progress)
            records = core.batch_records[n_records:]
        finally:
            core.close()
            del core
            free_device_memory()
        if [r.steps for r in records] != [short, long]:
            raise RuntimeError(f"calibration at B={B} ran batches of {[r.steps for r in records]} "
                               f"steps, expected [{short}, {long}]")
        devices = EngineStepModel(table, one_row)
        predicted = [devices.decode_sum(B, sum(r.prompt_lens) + B, B, r.steps)
                     + devices.straggler_sum(B, [p + 1 for p in r.prompt_lens], r.steps)
                     for r in records]
        loop = [r.wall_s - r.prefill_s for r in records]
        extra_steps = long - short
        engine_step = (loop[1] - loop[0]) / extra_steps
        table_step = (predicted[1] - predicted[0]) / extra_steps
        step_overhead = engine_step - table_step
        span = max(times["finish"]) - records[0].started_at
        modelled = sum(table.prefill_time(B, sum(r.prompt_lens)) + p + r.steps * step_overhead
                       for r, p in zip(records, predicted))
        decode_step.append((B, step_overhead))
        prefill_call.append((B, (span - modelled) / len(records)))
        rows.append({"B": B, "new_tokens": [short, long], "engine_step_s": engine_step,
                     "table_step_s": table_step, "span_s": span, "modelled_s": modelled,
                     "table_prefill_s": [table.prefill_time(B, sum(r.prompt_lens))
                                         for r in records],
                     "batches": compact_records(records)})
    return {"decode_step_s": decode_step, "prefill_call_s": prefill_call, "runs": rows,
            "seed": config.seed + CALIBRATION_SEED_OFFSET}


def calibrated_service(table: StepTimeTable, one_row: StepTimeTable | None,
                       calibration: dict | None):
    """The simulator's service model: the step table, with the rows' spread (``one_row``) and
    the engine's measured overheads (``measure_engine_overheads``) where the study has them."""
    if calibration is not None and "error" in calibration:
        calibration = None
    if one_row is None and calibration is None:
        return table
    return EngineStepModel(table, one_row,
                           calibration["decode_step_s"] if calibration else (),
                           calibration["prefill_call_s"] if calibration else ())


def estimate_core(runs: list[CoreRun], config: StudyConfig, service) -> list[float]:
    """Seconds each run should take: its simulated makespan plus engine start and warm-ups."""
    sims = run_simulations(simulate_spec, [r.sim_spec(config) for r in runs], service,
                           progress=False)
    return [s.get("makespan", math.nan) + RUN_SETUP_S
            + WARMUP_PER_CAPACITY_S * len(slab_capacities(r, config))
            for s, r in zip(sims, runs)]


def fit_to_budget(config: StudyConfig, rates: list[float], service
                  ) -> tuple[StudyConfig, list[CoreRun], list[float]]:
    """The core's runs and their estimates; if the total exceeds ``core_budget_s``, every
    request count shrinks by the same factor (whole batches, same recipes) first."""
    runs = core_runs(config, rates)
    estimates = estimate_core(runs, config, service)
    total = sum(estimates)
    if config.core_budget_s > 0 and total > config.core_budget_s:
        f = config.core_budget_s / total
        scale = lambda n, B: max(B, int(n * f) // B * B)
        config = dataclasses.replace(
            config, requests_big=scale(config.requests_big, config.big_batch),
            requests_small=scale(config.requests_small, config.small_batch),
            poisson_requests=scale(config.poisson_requests, config.big_batch))
        print(f"estimate {total:.0f} s exceeds the core budget {config.core_budget_s:.0f} s: "
              f"request counts scaled by {f:.2f} to {config.requests_big} (B="
              f"{config.big_batch}), {config.requests_small} (B={config.small_batch}), "
              f"{config.poisson_requests} (Poisson)")
        runs = core_runs(config, rates)
        estimates = estimate_core(runs, config, service)
    return config, runs, estimates


def simulated_capacity(config: StudyConfig, service) -> float:
    """Requests/s of B=big_batch, static, k=1, every request at t=0 (simulated)."""
    workload = WorkloadSpec(config.requests_big, config.lengths, config.prompts,
                            config.max_tokens, config.seed)
    spec = SimSpec(workload, config.big_batch, 1, "static", "oracle")
    return simulate_spec(spec, service)["throughput"]


# ---- 3. transformers baseline -------------------------------------------------------------


def run_transformers(config: StudyConfig, ours_records: list | None, progress: bool = True
                     ) -> dict:
    """Static-cache ``generate`` (eager) on padded batches of ``small_batch`` requests of the
    small runs' workload, in arrival order, each batch generating until its longest target;
    useful tokens are the targets. ``ours_records`` (our static k=1 run of that workload) give
    our time on exactly the same batches."""
    from tqdm.auto import tqdm

    B = config.small_batch
    n = min(config.hf_batches * B, config.requests_small)
    workload = WorkloadSpec(n, config.lengths, config.prompts, config.max_tokens,
                            config.seed).build()
    hf_model = build_hf_llama(config.model, getattr(torch, config.dtype), config.device,
                              config.seed)
    try:
        prompts = prompt_token_ids(workload, hf_model.config.vocab_size, config.seed)
        targets = [int(v) for v in workload.output_lens]
        hf_generate_seconds(hf_model, prompts[:B], 2)  # warm-up
        seconds = 0.0
        for lo in tqdm(range(0, n, B), desc="transformers generate", disable=not progress,
                       leave=False):
            seconds += hf_generate_seconds(hf_model, prompts[lo:lo + B], max(targets[lo:lo + B]))
    finally:
        del hf_model
        free_device_memory()
    result = {"batch_size": B, "n_requests": n, "variant": "eager", "seconds": seconds,
              "throughput": n / seconds, "token_throughput": sum(targets) / seconds}
    if ours_records:
        subset = {f"r{i}" for i in range(n)}
        same = [r for r in ours_records if set(r.request_ids) <= subset]
        if sum(r.n_requests for r in same) == n:
            ours_s = sum(r.wall_s for r in same)
            result.update(ours_seconds=ours_s, ours_throughput=n / ours_s,
                          ours_over_transformers=seconds / ours_s)
    return result


# ---- 4. simulations -----------------------------------------------------------------------


def run_study_simulations(config: StudyConfig, service, runs: list[CoreRun], capacity: float,
                          progress: bool = True) -> dict:
    """Every simulation of the study, in one pool of ``config.workers`` processes, on the
    calibrated step model (``calibrated_service``)."""
    from engine.runner import capacity_bucket

    uniform = config.distributions[0]
    rates = [load * capacity for load in config.latency_loads]
    wait = config.poisson_max_wait_ms / 1e3
    bucket = lambda needed, top: capacity_bucket(needed, config.min_capacity, top)
    engine = lambda specs, wait_ms: [with_engine_rules(s, config, wait_ms) for s in specs]
    groups = {
        "sim_grid": (simulate_spec, engine(grid_specs(
            config.distributions, config.prompts, config.sim_requests, config.sim_batches,
            config.sim_bins, config.sim_predictors, config.seed), config.max_wait_ms), service),
        "equal_kv": (simulate_equal_kv, [dataclasses.replace(
            s, refill_max_wait_s=config.max_wait_ms / 1e3) for s in equal_kv_specs(
                config.distributions, config.prompts, config.sim_requests, config.sim_batches,
                config.sim_bins, bucket, config.seed)], service),
        "latency_sweep": (simulate_spec, engine(latency_specs(
            uniform, config.prompts, config.poisson_requests, rates, config.big_batch,
            config.poisson_bins, wait, config.seed), config.poisson_max_wait_ms), service),
        "latency_sweep_steady": (simulate_spec, engine(latency_specs(
            uniform, config.prompts, config.latency_steady_requests, rates, config.big_batch,
            config.poisson_bins, wait, config.seed), config.poisson_max_wait_ms), service),
        "paper_model": (simulate_spec, paper_model_specs(
            config.prompts, PAPER_MODEL_REQUESTS, config.seed), PAPER_SERVICE),
        "measured": (simulate_with_batches, [r.sim_spec(config) for r in runs], service),
    }
    return run_simulation_groups(groups, config.workers, progress)


def gain_summary(payload: dict, config: StudyConfig) -> dict:
    """Gains over k=1 (%): the closed form and the paper (B=8, U[1, 1024]); the simulator under
    the paper's service model (same setting); and at B=small_batch on the study's lengths,
    static, oracle: simulated with the measured table, and measured (the k the core ran)."""
    measured = {r["k"]: r["measured"]["throughput"] for r in payload["core"]
                if "measured" in r and r["B"] == config.small_batch and r["mode"] == "static"
                and r["arrival_rate"] is None}
    table = {r["k"]: r["throughput"] for r in payload["sim_grid"]
             if "error" not in r and r["batch_size"] == config.small_batch
             and r["mode"] == "static" and r["predictor"] == "oracle"
             and r["lengths"] == config.lengths}
    paper_model = {r["k"]: r["throughput"] for r in payload["paper_model"] if "error" not in r}
    return {"batch_size": config.small_batch, "lengths": config.lengths,
            "measured": gains_over_k1(measured),
            "simulated_measured_table": gains_over_k1(table),
            "simulated_paper_model": gains_over_k1(paper_model),
            "closed_form": closed_form_gains(), "paper": dict(PAPER_GAIN_PCT)}


def attach_simulation(row: dict, sim: dict) -> None:
    """Put a measured run's simulation (``simulate_with_batches``) into its result row: the
    result under ``sim``, its batches under ``sim_batches``, the relative errors and, when the
    run recorded its batches, the batch-by-batch check."""
    sim = dict(sim)
    batches = sim.pop("batches", None)
    row["sim"] = sim
    if batches is not None:
        row["sim_batches"] = batches
    if "measured" in row and "error" not in sim:
        row["sim_error"] = relative_errors(row["measured"], sim)
        if row.get("batches") and batches is not None:
            row["batch_check"] = batch_check(row["batches"], batches)


# ---- re-simulating a saved study on the CPU -----------------------------------------------


def service_description(service) -> str:
    """What the simulator's step costs are made of, in words (for the results table)."""
    if not isinstance(service, EngineStepModel):
        return "step table only: no one-row table or engine overheads saved"
    parts = ["step table"]
    if service.one_row is not None:
        parts.append("rows' spread from the one-row table")
    if service.decode_step_points:
        parts.append("measured engine overheads")
    return " + ".join(parts)


def config_from_json(saved: dict) -> StudyConfig:
    """The ``StudyConfig`` a saved ``e2e.json`` ran with (fields it lacks take today's
    defaults)."""
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"the saved study config has fields StudyConfig does not know: {unknown}")
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def core_run_from_row(row: dict, config: StudyConfig) -> CoreRun:
    """The ``CoreRun`` behind a saved result row (its workload rebuilt from the recipe)."""
    workload = WorkloadSpec(row["n_requests"], row["lengths"], config.prompts, config.max_tokens,
                            config.seed, row["arrival_rate"])
    run = CoreRun(row["B"], row["k"], row["mode"], row["predictor"], workload, row["max_wait_ms"])
    if run.name != row["name"]:
        raise ValueError(f"saved run {row['name']!r} rebuilds as {run.name!r}")
    return run


def table_payload(table: StepTimeTable) -> dict:
    """``table`` as the JSON object ``StepTimeTable.save`` writes (embedded in e2e.json, so a
    saved study re-simulates without its side files)."""
    return {"version": table.version, "device": table.device, "model": table.model,
            "meta": table.meta, "decode": [list(r) for r in table.decode],
            "prefill": [list(r) for r in table.prefill]}


def saved_table(step_table: dict, key: str, side_file: Path) -> StepTimeTable:
    """The step table a saved study embeds under ``step_table[key]``; studies saved before
    tables were embedded fall back to the side file."""
    if key in step_table:
        with tempfile.TemporaryDirectory() as tmp:  # one reader: the schema's own checks
            path = Path(tmp) / "table.json"
            path.write_text(json.dumps(step_table[key]))
            return StepTimeTable.load(path)
    if not side_file.exists():
        raise FileNotFoundError(f"the saved study embeds no {key!r} and its side file "
                                f"{side_file} is missing")
    return StepTimeTable.load(side_file)


def resimulate(saved: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Recompute the simulated side of a saved study on the CPU: every measured GPU-core run is
    simulated again on its exact workload, with the saved step table (and the one-row table
    and engine overheads where the study measured them) and today's simulator and engine
    slab rules.

    Writes into ``out``: ``e2e.json`` (the saved payload with each core row's ``sim``,
    ``sim_error`` and ``sim_batches`` replaced, the previous errors under
    ``sim_error_before``, and a ``resimulated`` entry), the step table, ``e2e_table.md`` and
    ``e2e_sim_vs_measured.png``. Measured numbers and the other simulations stay as saved.
    """
    saved, out = Path(saved), Path(out)
    payload = json.loads(saved.read_text())
    missing = [key for key in ("config", "core", "step_table") if key not in payload]
    if missing:
        raise ValueError(f"{saved} is not a bench.e2e result: it lacks {missing}")
    if out.resolve() == saved.parent.resolve():
        raise ValueError(f"--out must not be the saved study's own directory ({out}): "
                         f"re-simulation never overwrites measured results")
    files = payload["step_table"]
    table = saved_table(files, "table", saved.parent / files["file"])
    one_row_file = saved.parent / files.get("one_row_file", ONE_ROW_TABLE_FILE)
    one_row = saved_table(files, "one_row_table", one_row_file) \
        if "one_row_table" in files or one_row_file.exists() else None
    if one_row is None and files.get("one_row_file"):
        print(f"note: {one_row_file} is missing: re-simulating without the rows' spread",
              file=sys.stderr)
    config = config_from_json(payload["config"])
    service = calibrated_service(table, one_row, payload.get("calibration"))
    runs = [core_run_from_row(row, config) for row in payload["core"]]
    specs = [r.sim_spec(config) for r in runs]
    if payload.get("predictor_draws") != "keyed":
        # Measured before draws were keyed by request: replay the engine's draw sequence, in
        # which each warm-up request spent one draw before the run's requests.
        specs = [dataclasses.replace(spec, sequential_draws_after=len(
                     row.get("measured", {}).get("warmup_capacities", ())))
                 for spec, row in zip(specs, payload["core"])]
    sims = run_simulations(simulate_with_batches, specs, service, workers, "re-simulate",
                           progress)
    for row, sim in zip(payload["core"], sims):
        if "sim_error" in row:
            row["sim_error_before"] = row["sim_error"]
        for key in ("sim", "sim_error", "sim_batches", "batch_check"):
            row.pop(key, None)
        attach_simulation(row, sim)
    rules = {r.name: {k: v for k, v in asdict(spec).items()
                      if k in ("capacities", "refill_min_free", "refill_max_wait_s",
                               "sequential_draws_after")}
             for r, spec in zip(runs, specs)}
    payload["resimulated"] = {
        **run_metadata(), "source": str(saved), "service": service_description(service),
        "slab_rules": rules}
    out.mkdir(parents=True, exist_ok=True)
    table.save(out / files["file"])
    if one_row is not None:
        one_row.save(out / files["one_row_file"])
    write_json(out / "e2e.json", json_safe(payload))
    safe = json_safe(payload)
    (out / "e2e_table.md").write_text(plots.format_e2e_table(safe, payload.get("meta")))
    plots.plot_sim_vs_measured(safe, out / "e2e_sim_vs_measured.png")
    return payload


# ---- the study ----------------------------------------------------------------------------


def check_closed_form() -> None:
    """Theorem 4.2 at B=8, U[1, 1024] must give DESIGN.md's +28/+49/+62/+69/+73%."""
    rounded = {k: round(v) for k, v in closed_form_gains().items()}
    if rounded != CLOSED_FORM_GAIN_PCT:
        raise AssertionError(f"Theorem 4.2 at B=8, U[1, 1024] gives {rounded}%, expected "
                             f"{CLOSED_FORM_GAIN_PCT}%")


def run(config: StudyConfig, out: Path, progress: bool = True) -> dict:
    """The whole study; writes every output into ``out`` and returns the JSON payload."""
    from tqdm.auto import tqdm

    check_closed_form()
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    # predictor_draws: bin-error draws are keyed by request (``resimulate`` replays the older,
    # sequential draws for results that lack this).
    payload: dict = {"config": asdict(config), "phase_seconds": phases, "core": [],
                     "predictor_draws": "keyed"}
    save = lambda: write_json(out / "e2e.json", json_safe(payload))

    t = time.perf_counter()
    gpu_before = gpu_state()
    table, one_row = measure_step_table(config, progress)
    table.save(out / STEP_TABLE_FILE)
    one_row.save(out / ONE_ROW_TABLE_FILE)
    payload["step_table"] = {"file": STEP_TABLE_FILE, "one_row_file": ONE_ROW_TABLE_FILE,
                             "device": table.device, "decode_points": len(table.decode),
                             "prefill_points": len(table.prefill),
                             "table": table_payload(table),
                             "one_row_table": table_payload(one_row),
                             "gpu_before": gpu_before, "gpu_after": gpu_state()}
    phases["step_table"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        payload["calibration"] = measure_engine_overheads(config, table, one_row, progress)
    except Exception as e:  # the study still runs, on the tables alone
        traceback.print_exc()
        payload["calibration"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    service = calibrated_service(table, one_row, payload["calibration"])
    phases["engine_overheads"] = time.perf_counter() - t
    save()

    capacity = simulated_capacity(config, service)
    rates = [load * capacity for load in config.poisson_loads]
    config, runs, estimates = fit_to_budget(config, rates, service)
    payload["config"] = asdict(config)
    payload["poisson"] = {"static_k1_capacity_rps": capacity, "rates": rates}
    payload["estimate"] = [{"name": r.name, "n_requests": r.workload.n, "seconds": e}
                           for r, e in zip(runs, estimates)]
    print(f"GPU core: {len(runs)} runs, estimated {sum(estimates):.0f} s; simulated static k=1 "
          f"B={config.big_batch} capacity {capacity:.2f} req/s")
    for r, e in zip(runs, estimates):
        print(f"  {r.name:<48} {r.workload.n:>6} requests  ~{e:6.1f} s")
    save()

    t = time.perf_counter()
    small_k1_records = None
    for run_ in tqdm(runs, desc="GPU core", disable=not progress):
        try:
            row, records = run_core(run_, config, progress)
        except Exception as e:  # keep the other runs: GPU time is scarce
            traceback.print_exc()
            row, records = {**run_.fields(), "error": f"{type(e).__name__}: {e}"[:300]}, None
        if (run_.batch_size, run_.k, run_.mode, run_.workload.arrival_rate) == \
                (config.small_batch, 1, "static", None):
            small_k1_records = records
        payload["core"].append(row)
        save()
    phases["gpu_core"] = time.perf_counter() - t

    t = time.perf_counter()
    if config.hf_batches > 0:
        try:
            payload["transformers"] = run_transformers(config, small_k1_records, progress)
        except Exception as e:
            traceback.print_exc()
            payload["transformers"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        save()
    phases["transformers"] = time.perf_counter() - t

    t = time.perf_counter()
    results = run_study_simulations(config, service, runs, capacity, progress)
    for row, sim in zip(payload["core"], results.pop("measured")):
        attach_simulation(row, sim)
    payload.update(results)
    payload["gains_pct"] = gain_summary(payload, config)
    phases["simulations"] = time.perf_counter() - t

    save()
    safe = json_safe(payload)
    (out / "e2e_table.md").write_text(plots.format_e2e_table(safe, run_metadata()))
    plots.plot_throughput_vs_k(safe, out / "e2e_throughput_vs_k.png")
    plots.plot_gain_vs_paper(safe, out / "e2e_gain_vs_paper.png")
    plots.plot_sim_vs_measured(safe, out / "e2e_sim_vs_measured.png")
    plots.plot_latency(safe, out / "e2e_latency.png")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where outputs go")
    parser.add_argument("--quick", action="store_true", help="small sizes: a first GPU run")
    parser.add_argument("--smoke", action="store_true", help="dummy:tiny on the CPU (CI)")
    parser.add_argument("--requests-big", type=int, help="requests of the B=64 runs")
    parser.add_argument("--requests-small", type=int, help="requests of the B=8 runs")
    parser.add_argument("--poisson-requests", type=int, help="requests of each Poisson run")
    parser.add_argument("--hf-batches", type=int, help="B=8 batches for transformers (0: skip)")
    parser.add_argument("--sim-requests", type=int, help="requests per simulated run")
    parser.add_argument("--core-budget-s", type=float,
                        help="shrink the GPU core's request counts to fit this estimate (0: off)")
    parser.add_argument("--workers", type=int, help="simulation processes")
    parser.add_argument("--resimulate", type=Path, metavar="E2E_JSON",
                        help="no GPU work: recompute the simulated columns of a saved e2e.json "
                             "(its step table beside it) into --out")
    args = parser.parse_args(argv)
    if args.resimulate is not None:
        if "--out" not in (argv if argv is not None else sys.argv[1:]):
            parser.error("--resimulate needs an explicit --out (never the saved study's folder)")
        payload = resimulate(args.resimulate, args.out, args.workers or 1)
        print(plots.format_e2e_table(json_safe(payload), payload.get("meta")))
        print(f"wrote e2e.json, {payload['step_table']['file']}, e2e_table.md and "
              f"e2e_sim_vs_measured.png to {args.out}")
        return 0
    config = smoke_config() if args.smoke else quick_config() if args.quick else StudyConfig()
    names = ("requests_big", "requests_small", "poisson_requests", "hf_batches", "sim_requests",
             "core_budget_s", "workers")
    config = dataclasses.replace(config, **{name: getattr(args, name) for name in names
                                            if getattr(args, name) is not None})
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.e2e needs a CUDA GPU (or --smoke for the CPU check)")
    start = time.perf_counter()
    payload = run(config, args.out)
    print(plots.format_e2e_table(json_safe(payload)))
    print(f"wrote e2e.json, {STEP_TABLE_FILE}, {ONE_ROW_TABLE_FILE}, e2e_table.md and 4 PNGs "
          f"to {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
