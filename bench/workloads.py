"""The batch-shape study's workloads and simulations (``scheduler`` only, no torch).

A ``WorkloadSpec`` names a workload by its recipe (length and prompt specs, count, seed, arrival
rate), so the GPU run and every simulation of it rebuild exactly the same requests. Simulation
specs describe one run of ``scheduler.simulator``; ``run_simulations`` runs many in worker
processes that never load torch.

Length specs are ``scheduler.workload.parse_lengths`` strings. The study's two output-length
distributions (DESIGN.md, "Batch-shape study"): U[1, 1024], real-valued and rounded up, and a
heavy-tailed chat-like lognormal (median 200, p99 1500, capped at 2048). Prompts U[64, 512].
"""

from __future__ import annotations

import math
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

from scheduler import theory
from scheduler.bins import BinEdges, equal_width_edges
from scheduler.policy import MultiBinScheduler
from scheduler.predictors import BinErrorPredictor, OraclePredictor, predictor_from_spec
from scheduler.simulator import simulate
from scheduler.workload import Uniform, Workload, make_workload, parse_lengths

UNIFORM_LENGTHS = "uniform:1:1024"
CHAT_LENGTHS = "lognormal:200:1500:2048"
PROMPT_LENGTHS = "uniform:64:512"

# Gains over k=1 at B=8, U[1, 1024]: Theorem 4.2 (rounded %) and the paper's A100 measurement.
CLOSED_FORM_GAIN_PCT = {2: 28, 4: 49, 8: 62, 16: 69, 32: 73}
PAPER_GAIN_PCT = {2: 15, 4: 38, 8: 49, 16: 65, 32: 68}


@dataclass(frozen=True)
class WorkloadSpec:
    """A reproducible workload: ``n`` requests, integer output lengths (rounded up) from
    ``lengths``, prompt lengths from ``prompts``, every ``max_tokens`` the same, arrivals all at
    t=0 (``arrival_rate`` None) or Poisson at ``arrival_rate`` per second. With the same seed,
    lengths do not depend on n or the rate: a smaller n is a prefix."""

    n: int
    lengths: str
    prompts: str
    max_tokens: int
    seed: int = 0
    arrival_rate: float | None = None

    def build(self) -> Workload:
        return make_workload(self.n, parse_lengths(self.lengths),
                             prompts=parse_lengths(self.prompts), arrival_rate=self.arrival_rate,
                             max_tokens=self.max_tokens, integer=True, seed=self.seed)


def prompt_token_ids(workload: Workload, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random prompt token ids, ``workload.prompt_lens[i]`` of them for request i (fixed seed;
    request i's prompt does not depend on n)."""
    rng = random.Random(f"{seed}:prompt-ids")
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in workload.prompt_lens]


def bin_edges(lengths: str, k: int, max_tokens: int) -> BinEdges:
    """k equal-mass bins (Lemma 4.1's optimum) for the length distribution ``lengths``.

    For U[1, M] with ``max_tokens`` M these are equal-width edges over [1, M], exactly the edges
    the engine builds from ``--bins k`` with ``max_output_len`` M.
    """
    dist = parse_lengths(lengths)
    if isinstance(dist, Uniform):
        return equal_width_edges(k, dist.lo, dist.hi, max_tokens)
    return BinEdges(tuple(dist.quantile(i / k) for i in range(1, k)), max_tokens)


@dataclass(frozen=True)
class SimSpec:
    """One simulated run: a workload through a ``MultiBinScheduler`` with ``bin_edges`` bins.

    max_wait_s: the scheduler's partial-batch wait (the engine's ``max_wait_ms`` / 1e3).
    max_model_len: the continuous slab's capacity.
    capacities, refill_min_free, refill_max_wait_s: the engine's slab rules
    (``scheduler.simulator.simulate``); the defaults are the paper's model.
    sequential_draws_after: None for today's bin-error draws (keyed by request); a number N
    replays the engine's draws before they were keyed (``SequentialBinErrorPredictor``), for
    re-simulating runs saved then.
    """

    workload: WorkloadSpec
    batch_size: int
    k: int
    mode: str
    predictor: str
    max_wait_s: float | None = None
    max_model_len: int | None = None
    capacities: tuple[int, ...] | None = None
    refill_min_free: int = 1
    refill_max_wait_s: float | None = None
    sequential_draws_after: int | None = None


@dataclass(frozen=True)
class EqualKVSpec:
    """Static or bin-continuous k-bin batching where each bin runs as many rows as fit in a KV
    budget of ``slots`` token slots: bin i's slab has ``bin_capacities[i]`` slots per row, so
    ``slots // bin_capacities[i]`` rows. Oracle lengths, all requests at t=0.

    The scheduler forms batches of one size for every bin, so this is simulated bin by bin: at
    t=0 with oracle bins nothing moves between bins, and both modes serve one bin's requests in
    one stretch, so the makespan is the sum of the per-bin makespans.
    """

    workload: WorkloadSpec
    slots: int
    k: int
    mode: str
    bin_capacities: tuple[int, ...]
    capacity_rule: str
    # The bin-continuous slab's refill rule, as the engine's: refill once this many rows are
    # free (None: the engine's default for the bin's row count, max(1, rows // 8)) or the
    # first free row has waited refill_max_wait_s.
    refill_min_free: int | None = None
    refill_max_wait_s: float | None = None


class SequentialBinErrorPredictor(BinErrorPredictor):
    """The bin-error model drawing as the engine did before draws were keyed by request
    (commit 07be853 and earlier): one ``random.Random(seed)`` stream, one draw per prediction
    in call order, after ``skip`` draws that the engine spent on its warm-up requests (one per
    warm-up capacity). Only for re-simulating runs measured then."""

    def __init__(self, keyed: BinErrorPredictor, skip: int):
        super().__init__(keyed.true_lengths, keyed.edges, keyed.p_error, keyed.seed)
        self._rng = random.Random(keyed.seed)
        for _ in range(skip):
            self._rng.random()

    def draw(self, request) -> float:
        return self._rng.random()


def simulate_spec(spec: SimSpec, service, batch_log: list | None = None) -> dict:
    """Simulate ``spec`` with ``service`` (a step-time model); returns the spec's fields and
    ``scheduler.simulator.SimResult``'s, flat. ``batch_log``: see ``simulate``."""
    workload = spec.workload.build()
    edges = bin_edges(spec.workload.lengths, spec.k, spec.workload.max_tokens)
    predictor = predictor_from_spec(spec.predictor, true_lengths=workload.true_lengths(),
                                    edges=edges, seed=spec.workload.seed)
    if spec.sequential_draws_after is not None and isinstance(predictor, BinErrorPredictor):
        predictor = SequentialBinErrorPredictor(predictor, spec.sequential_draws_after)
    scheduler = MultiBinScheduler(edges, spec.batch_size, predictor, max_wait=spec.max_wait_s)
    result = simulate(workload, scheduler, service, spec.mode, spec.max_model_len,
                      capacities=spec.capacities, refill_min_free=spec.refill_min_free,
                      refill_max_wait=spec.refill_max_wait_s, batch_log=batch_log)
    return {**_spec_fields(spec), **result.to_dict()}


def simulate_with_batches(spec: SimSpec, service) -> dict:
    """``simulate_spec`` plus its batches under ``batches`` (``scheduler.simulator.SimBatch``
    fields), to check against the engine's batch records."""
    log: list = []
    result = simulate_spec(spec, service, batch_log=log)
    return {**result, "batches": [asdict(b) for b in log]}


def batch_check(measured: list[dict], simulated: list[dict]) -> dict:
    """Measured batches (``bench.e2e.compact_records``) against the simulated ones, in order.

    The totals always; when both ran the same batches (same count, same steps in each), also
    the median ratio measured / simulated of prefill and of decode seconds per batch."""
    total = lambda rows, key: sum(r[key] for r in rows)
    out = {"n_batches": [len(measured), len(simulated)],
           "steps": [total(measured, "steps"), total(simulated, "steps")],
           "prefill_s": [total(measured, "prefill_s"), total(simulated, "prefill_time")],
           "decode_s": [total(measured, "decode_s"), total(simulated, "decode_time")],
           "same_batches": len(measured) == len(simulated) and all(
               m["steps"] == s["steps"] for m, s in zip(measured, simulated))}
    if out["same_batches"] and measured:
        ratios = lambda a, b: sorted(m[a] / s[b] for m, s in zip(measured, simulated) if s[b] > 0)
        for name, (a, b) in (("prefill_ratio_median", ("prefill_s", "prefill_time")),
                             ("decode_ratio_median", ("decode_s", "decode_time"))):
            values = ratios(a, b)
            if values:
                out[name] = values[len(values) // 2]
    return out


def simulate_equal_kv(spec: EqualKVSpec, service) -> dict:
    """Simulate ``spec`` bin by bin (see ``EqualKVSpec``); throughput in requests and tokens per
    time unit of ``service``."""
    workload = spec.workload.build()
    edges = bin_edges(spec.workload.lengths, spec.k, spec.workload.max_tokens)
    if len(spec.bin_capacities) != edges.k:
        raise ValueError(f"{len(spec.bin_capacities)} bin capacities for k={edges.k} bins")
    members: list[list[int]] = [[] for _ in range(edges.k)]
    for i, length in enumerate(workload.output_lens):
        members[edges.bin_of(length)].append(i)
    makespan = tokens = 0.0
    rows = []
    for b, ids in enumerate(members):
        batch_size = spec.slots // spec.bin_capacities[b]
        if batch_size < 1:
            raise ValueError(f"a KV budget of {spec.slots} slots cannot hold one row of "
                             f"{spec.bin_capacities[b]} slots (bin {b})")
        rows.append(batch_size)
        if not ids:
            continue
        bound = edges.upper(b)
        part = Workload([0.0] * len(ids), [workload.prompt_lens[i] for i in ids],
                        [workload.output_lens[i] for i in ids], bound)
        scheduler = MultiBinScheduler(BinEdges((), bound), batch_size,
                                      OraclePredictor(part.true_lengths()))
        min_free = spec.refill_min_free or max(1, batch_size // 8)
        result = simulate(part, scheduler, service, spec.mode, refill_min_free=min_free,
                          refill_max_wait=spec.refill_max_wait_s)
        makespan += result.makespan
        tokens += sum(part.output_lens)
    return {**_spec_fields(spec), "rows_per_bin": rows, "makespan": makespan,
            "throughput": len(workload) / makespan, "token_throughput": tokens / makespan}


def _spec_fields(spec) -> dict:
    fields = asdict(spec)
    workload = fields.pop("workload")
    return {"lengths": workload["lengths"], "n_requests": workload["n"],
            "arrival_rate": workload["arrival_rate"], **fields}


def _run_one(fn, spec, service) -> dict:
    try:
        return fn(spec, service)
    except Exception as e:  # one bad configuration must not lose the others
        return {**_spec_fields(spec), "error": f"{type(e).__name__}: {e}"[:300]}


def run_simulations(fn: Callable, specs: list, service, workers: int = 1,
                    desc: str = "simulate", progress: bool = True) -> list[dict]:
    """``fn(spec, service)`` for every spec, in order (see ``run_simulation_groups``)."""
    return run_simulation_groups({desc: (fn, specs, service)}, workers, progress)[desc]


def run_simulation_groups(groups: dict[str, tuple[Callable, list, object]], workers: int = 1,
                          progress: bool = True) -> dict[str, list[dict]]:
    """{name: (fn, specs, service)} -> {name: [fn(spec, service) for spec in specs]}, all in one
    pool of ``workers`` spawned processes (the parent may hold a CUDA context, which forked
    children must not touch). A failed simulation gives its spec's fields and ``error``."""
    from tqdm.auto import tqdm

    tasks = [(name, fn, spec, service) for name, (fn, specs, service) in groups.items()
             for spec in specs]
    bar = tqdm(total=len(tasks), desc="simulations", disable=not progress, leave=False)
    results: dict[str, list[dict]] = {name: [] for name in groups}
    if workers <= 1 or len(tasks) <= 1:
        for name, fn, spec, service in tasks:
            results[name].append(_run_one(fn, spec, service))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [(name, pool.submit(_run_one, fn, spec, service))
                       for name, fn, spec, service in tasks]
            for name, future in futures:
                results[name].append(future.result())
                bar.update(1)
    bar.close()
    return results


# ---- the study's simulated configurations -------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """An output-length distribution of the study with its max_tokens cap."""

    lengths: str
    max_tokens: int


def grid_specs(distributions: list[Distribution], prompts: str, n: int, batch_sizes,
               bins, predictors, seed: int = 0) -> list[SimSpec]:
    """Equal batch size, all at t=0: every (distribution, B, mode, k, predictor). With one bin
    the predictor changes nothing, and continuous ignores bins: those run once."""
    specs = []
    prompt_max = math.ceil(parse_lengths(prompts).quantile(1.0))
    for d in distributions:
        workload = WorkloadSpec(n, d.lengths, prompts, d.max_tokens, seed)
        slab = prompt_max + d.max_tokens
        for B in batch_sizes:
            specs.append(SimSpec(workload, B, 1, "continuous", "oracle", max_model_len=slab))
            for mode in ("static", "bin-continuous"):
                specs.append(SimSpec(workload, B, 1, mode, "oracle", max_model_len=slab))
                specs += [SimSpec(workload, B, k, mode, p, max_model_len=slab)
                          for k in bins if k > 1 for p in predictors]
    return specs


def equal_kv_specs(distributions: list[Distribution], prompts: str, n: int, batch_sizes, bins,
                   capacity: Callable[[int, int], int], seed: int = 0) -> list[EqualKVSpec]:
    """Multi-bin slabs in the KV budget of one max-length slab of B rows (B x C_max slots,
    C_max = longest prompt + max_tokens). A bin's slab needs longest prompt + its bound per
    row: rounded by ``capacity(needed, C_max)`` (the engine's buckets: "engine") or not
    ("exact")."""
    specs = []
    prompt_max = math.ceil(parse_lengths(prompts).quantile(1.0))
    for d in distributions:
        workload = WorkloadSpec(n, d.lengths, prompts, d.max_tokens, seed)
        c_max = prompt_max + d.max_tokens
        for B in batch_sizes:
            for k in bins:
                edges = bin_edges(d.lengths, k, d.max_tokens)
                needs = [prompt_max + edges.upper(b) for b in range(k)]
                rules = {"engine": tuple(capacity(c, c_max) for c in needs), "exact": tuple(needs)}
                for rule, capacities in rules.items():
                    specs += [EqualKVSpec(workload, B * c_max, k, mode, capacities, rule)
                              for mode in ("static", "bin-continuous")]
    return specs


def latency_specs(d: Distribution, prompts: str, n: int, rates, batch_size: int, bins,
                  max_wait_s: float | None, seed: int = 0) -> list[SimSpec]:
    """Poisson arrivals at each rate (requests/s): static, oracle, k in ``bins``."""
    return [SimSpec(WorkloadSpec(n, d.lengths, prompts, d.max_tokens, seed, rate), batch_size, k,
                    "static", "oracle", max_wait_s=max_wait_s)
            for rate in rates for k in bins]


def paper_model_specs(prompts: str, n: int, seed: int = 0) -> list[SimSpec]:
    """The paper's setting (B=8, U[1, 1024], static, oracle) for k = 1, 2, 4, 8, 16, 32: under
    the paper's service model the simulator should reproduce Theorem 4.2."""
    workload = WorkloadSpec(n, UNIFORM_LENGTHS, prompts, 1024, seed)
    return [SimSpec(workload, 8, k, "static", "oracle") for k in (1, *CLOSED_FORM_GAIN_PCT)]


def closed_form_gains(batch_size: int = 8, l_min: float = 1, l_max: float = 1024) -> dict:
    """Theorem 4.2's throughput gain over k=1, in %, for k = 2, 4, 8, 16, 32."""
    base = theory.uniform_throughput(1, batch_size, l_min, l_max)
    return {k: 100 * (theory.uniform_throughput(k, batch_size, l_min, l_max) / base - 1)
            for k in CLOSED_FORM_GAIN_PCT}


def gains_over_k1(throughput_by_k: dict) -> dict:
    """{k: % gain of throughput over k=1} for every k > 1 (empty without k=1)."""
    base = throughput_by_k.get(1)
    return {k: 100 * (t / base - 1) for k, t in sorted(throughput_by_k.items()) if base and k > 1}


def relative_errors(measured: dict, simulated: dict,
                    keys=("throughput", "token_throughput", "makespan", "latency_p50",
                          "latency_p99")) -> dict:
    """|simulated - measured| / measured for each key both have."""
    out = {}
    for key in keys:
        m, s = measured.get(key), simulated.get(key)
        if m and s is not None and math.isfinite(s):
            out[key] = abs(s - m) / m
    return out


def json_safe(value):
    """NaN and infinities become None (JSON has neither); tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
