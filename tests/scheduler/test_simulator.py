import math
import statistics
import time
from collections import deque

import pytest

from scheduler import theory
from scheduler.bins import BinEdges, equal_width_edges, exponential_edges, explicit_edges
from scheduler.policy import MultiBinScheduler, standard_scheduler
from scheduler.predictors import BinErrorPredictor, OraclePredictor
from scheduler.schemas import StepTimeTable
from scheduler.service import LinearServiceModel
from scheduler.simulator import simulate
from scheduler.workload import Exponential, Uniform, Workload, make_workload

PUBLISHED_T = [6.447, 8.434, 9.400, 9.970, 10.347]  # arXiv 2412.04504, B=128, U[1, 20]


def oracle_scheduler(workload, k, batch_size=128, lo=1, hi=20, **kwargs):
    return MultiBinScheduler(equal_width_edges(k, lo, hi), batch_size,
                             OraclePredictor(workload.true_lengths()), **kwargs)


def fixed_workload(lengths, prompts=None, arrivals=None, max_tokens=None):
    n = len(lengths)
    return Workload(arrivals or [0.0] * n, prompts or [0] * n, list(lengths),
                    max_tokens or math.ceil(max(lengths)))


@pytest.mark.slow
def test_saturated_throughput_matches_theorem_4_2():
    workload = make_workload(128_000, Uniform(1, 20), seed=1)
    for k, published in enumerate(PUBLISHED_T, start=1):
        expected = theory.uniform_throughput(k, 128, 1, 20)
        assert round(expected, 3) == published
        result = simulate(workload, oracle_scheduler(workload, k))
        assert result.n_requests == 128_000 and result.overflows == 0
        assert result.throughput == pytest.approx(expected, rel=0.01), k


def test_static_batch_by_hand():
    result = simulate(fixed_workload([1, 2, 3, 4]), standard_scheduler(4, 4))
    assert result.makespan == 4 and result.n_batches == 1
    assert (result.latency_p50, result.latency_p99, result.latency_mean) == (2, 4, 2.5)
    assert result.occupancy == 10 / 16 and result.padding_waste == 6 / 16
    assert result.kv_slots_peak == 16 and result.kv_slots_mean == 16
    assert result.throughput == 1.0 and result.token_throughput == 10 / 4


def _three_modes(lengths):
    workload = fixed_workload(lengths, max_tokens=20)
    results = {}
    for mode in ("static", "bin-continuous", "continuous"):
        sched = MultiBinScheduler(explicit_edges([10], 20), 2,
                                  OraclePredictor(workload.true_lengths()))
        results[mode] = simulate(workload, sched, mode=mode)
    return results


def test_the_three_modes_by_hand():
    # Bin 0: r0 (3), r1 (5), r2 (4); bin 1: r3 (12), r4 (15); B = 2. Batches form
    # [r0 r1], [r3 r4], then the final flush forms [r2].
    r = _three_modes([3, 5, 4, 12, 15])
    # static: [r0 r1] 0-5, [r3 r4] 5-20, [r2] 20-24.
    assert r["static"].makespan == 24
    assert r["static"].latency_mean == pytest.approx((3 + 5 + 20 + 17 + 24) / 5)
    # bin-continuous: r2 takes r0's row at 3 (ends 7); then [r3 r4] runs 7-19 / 7-22.
    assert r["bin-continuous"].makespan == 22
    assert r["bin-continuous"].latency_mean == pytest.approx((3 + 5 + 7 + 19 + 22) / 5)
    # continuous: oldest first: r2 at 3 (ends 7), r3 at 5 (ends 17), r4 at 7 (ends 22).
    assert r["continuous"].makespan == 22
    assert r["continuous"].latency_mean == pytest.approx((3 + 5 + 7 + 17 + 22) / 5)
    assert r["continuous"].kv_slots_peak == 2 * 20


@pytest.mark.parametrize("mode", ["static", "bin-continuous"])
def test_overflow_by_hand(mode):
    # Predicted 5 (bin 0, bound 10), true 15: runs 10, overflows, re-runs 5 in bin 1.
    workload = fixed_workload([15], max_tokens=20)
    sched = MultiBinScheduler(explicit_edges([10], 20), 1, OraclePredictor({"r0": 5}))
    result = simulate(workload, sched, mode=mode)
    assert result.overflows == 1 and result.n_batches == 2
    assert result.makespan == 15 and result.latency_mean == 15
    assert result.token_throughput == 1.0


@pytest.mark.parametrize("mode", ["static", "bin-continuous"])
def test_an_overflow_queues_behind_requests_that_arrived_while_it_ran(mode):
    # B = 1. r0 (predicted 2: bin 0, bound 5; true 10) runs 0-5 and overflows; r1 (8 tokens,
    # bin 1) arrived at 3, so it runs first, 5-13, and r0 finishes its last 5 tokens at 18.
    workload = fixed_workload([10, 8], arrivals=[0.0, 3.0], max_tokens=10)
    sched = MultiBinScheduler(explicit_edges([5], 10), 1, OraclePredictor({"r0": 2, "r1": 8}))
    result = simulate(workload, sched, mode=mode)
    assert result.overflows == 1
    assert result.makespan == 18 and result.latency_mean == (18 + (13 - 3)) / 2


def test_bin_continuous_slab_keeps_its_bins_bound_for_refills():
    # r0 (predicted 5, true 15) overflows at 10 and re-runs alone in bin 1 with 10 tokens of
    # max_tokens left; r1 (18 tokens, bin 1) arrives at 12 and takes the free row. The slab
    # is sized for bin 1 (20), not for r0's remaining 10, so r1 does not overflow.
    workload = fixed_workload([15, 18], arrivals=[0.0, 12.0], max_tokens=20)
    sched = MultiBinScheduler(explicit_edges([10], 20), 2, OraclePredictor({"r0": 5, "r1": 18}),
                              max_wait=0.0)
    result = simulate(workload, sched, mode="bin-continuous")
    assert result.overflows == 1
    assert result.makespan == 30 and result.latency_mean == (15 + 18) / 2
    assert result.kv_slots_peak == 2 * (10 + 20)


def test_bin_error_overflows_are_the_down_flips():
    k, p, n = 4, 0.2, 20_000
    workload = make_workload(n, Uniform(1, 20), seed=5)
    edges = equal_width_edges(k, 1, 20)
    sched = MultiBinScheduler(edges, 16, BinErrorPredictor(workload.true_lengths(), edges, p, 2))
    result = simulate(workload, sched)
    # Bins 1..k-1 flip down with p. A down-flipped length overflows unless it lies below the
    # ceiling of its lower edge (the lower bin's bound), and it cannot overflow twice.
    expected = n * p * sum((edges.lower(i + 1) if i + 1 < k else 20) - edges.upper(i - 1)
                           for i in range(1, k)) / 19
    assert abs(result.overflows - expected) < 5 * math.sqrt(expected)
    assert result.n_requests == n
    assert result.token_throughput == pytest.approx(sum(workload.output_lens) / result.makespan)
    clean = simulate(workload, oracle_scheduler(workload, k, batch_size=16))
    assert result.throughput < clean.throughput


def test_poisson_saturated_throughput_and_latency_rising_with_k():
    batch_size, t1 = 128, theory.uniform_throughput(1, 128, 1, 20)
    c_max = theory.uniform_throughput_limit(batch_size, 1, 20)
    heavy = make_workload(64_000, Uniform(1, 20), arrival_rate=1.5 * c_max, seed=2)
    for k in (1, 2, 3):
        result = simulate(heavy, oracle_scheduler(heavy, k))
        assert result.throughput == pytest.approx(theory.uniform_throughput(k, 128, 1, 20),
                                                  rel=0.02), k
    rate = 0.5 * t1
    light = make_workload(20_000, Uniform(1, 20), arrival_rate=rate, seed=3)
    latency = [simulate(light, oracle_scheduler(light, k)).latency_mean for k in (1, 2, 3)]
    assert latency[0] < latency[1] < latency[2]
    # Lemma 5.1: batch formation adds (B-1)k/(2 lambda). Latency here ends at a request's own
    # last token, so its service part does not shrink with k as the batch maximum does: the
    # rise from k=1 to k=3 is the formation term's, (B-1)(3-1)/(2 lambda).
    formation_rise = (theory.latency_lower_bound(3, batch_size, rate, 0.0)
                      - theory.latency_lower_bound(1, batch_size, rate, 0.0))
    assert latency[2] - latency[0] == pytest.approx(formation_rise, rel=0.15)


def test_continuous_mode_reaches_c_max():
    workload = make_workload(40_000, Uniform(1, 20), seed=4)
    sched = MultiBinScheduler(equal_width_edges(1, 1, 20), 128)
    result = simulate(workload, sched, mode="continuous")
    assert result.overflows == 0
    assert result.throughput == pytest.approx(theory.uniform_throughput_limit(128, 1, 20), rel=0.015)
    assert result.occupancy > 0.98


def test_exponential_lengths_beat_lemma_a1_bound():
    mean, batch_size, k = 50.0, 16, 4
    workload = make_workload(40_000, Exponential(mean), seed=6)
    edges = exponential_edges(k, mean, batch_size, workload.max_tokens)
    sched = MultiBinScheduler(edges, batch_size, OraclePredictor(workload.true_lengths()))
    result = simulate(workload, sched)
    bound = theory.exponential_throughput_bound(k, mean, batch_size)
    assert result.throughput >= 0.99 * bound
    one_bin = simulate(workload, MultiBinScheduler(BinEdges((), workload.max_tokens), batch_size))
    assert result.throughput > 1.2 * one_bin.throughput


def _table():
    decode = [(b, x, 1e-3 * (1 + 0.1 * b) + 2e-6 * x + (3e-7 * x if x > 300 else 0.0))
              for b in (2, 4) for x in (0, 100, 300, 1000)]
    prefill = [(b, x, 5e-4 * b + 1e-5 * x) for b in (1, 4) for x in (0, 1000)]
    return StepTimeTable("test-device", "test-model", decode, prefill)


def _brute_force(workload, batch_size, table, mode):
    """Step-by-step reference for one bin, FIFO, one slab. A slab starts from empty with a
    full batch (any batch once the last request has arrived: the final flush); static runs it
    until its longest row ends, bin-continuous and continuous refill free rows after every
    step (continuous also starts from empty with whatever is queued)."""
    n = len(workload)
    arrivals, queue = deque(range(n)), deque()
    rows = []  # [index, produced]
    t, finish = 0.0, {}
    while len(finish) < n:
        while arrivals and workload.arrival_times[arrivals[0]] <= t:
            queue.append(arrivals.popleft())
        if rows:
            can_start = mode != "static"
        else:
            can_start = mode == "continuous" or len(queue) >= batch_size or not arrivals
        if can_start and queue and len(rows) < batch_size:
            joining = [queue.popleft() for _ in range(min(batch_size - len(rows), len(queue)))]
            t += table.prefill_time(len(joining), sum(workload.prompt_lens[i] for i in joining))
            rows += [[i, 0] for i in joining]
            continue
        if not rows:
            t = workload.arrival_times[arrivals[0]]
            continue
        live = [row for row in rows if row[1] < workload.output_lens[row[0]]]
        t += table.decode_time(batch_size, sum(workload.prompt_lens[i] + p + 1 for i, p in live))
        for row in live:
            row[1] += 1
            if row[1] == workload.output_lens[row[0]]:
                finish[row[0]] = t
        if mode != "static" or all(row[1] >= workload.output_lens[row[0]] for row in rows):
            rows = [row for row in rows if row[1] < workload.output_lens[row[0]]]
    latencies = sorted(finish[i] - workload.arrival_times[i] for i in range(n))
    return max(finish.values()), statistics.fmean(latencies), latencies


@pytest.mark.parametrize("mode", ["static", "bin-continuous", "continuous"])
@pytest.mark.parametrize("rate", [None, 40.0, 300.0])
def test_event_simulation_matches_a_step_by_step_reference(mode, rate):
    table = _table()
    workload = make_workload(300, Uniform(1, 60), prompts=Uniform(10, 80), arrival_rate=rate,
                             integer=True, seed=7)
    sched = standard_scheduler(4, workload.max_tokens)
    result = simulate(workload, sched, table, mode=mode)
    makespan, mean, latencies = _brute_force(workload, 4, table, mode)
    assert result.makespan == pytest.approx(makespan, rel=1e-9)
    assert result.latency_mean == pytest.approx(mean, rel=1e-9)
    assert result.latency_p99 == pytest.approx(latencies[math.ceil(0.99 * 300) - 1], rel=1e-9)


def test_linear_model_with_whole_steps_matches_the_table_it_describes():
    linear = LinearServiceModel(step_s=2e-3, per_token_s=1e-6, integer_steps=True)
    as_table = StepTimeTable("d", "m", [(4, 0, 2e-3), (4, 10_000, 2e-3 + 1e-2)], [(4, 0, 0.0)])
    workload = make_workload(200, Uniform(1, 50), prompts=Uniform(5, 50), arrival_rate=400.0,
                             integer=True, seed=8)
    a = simulate(workload, standard_scheduler(4, workload.max_tokens), linear, mode="continuous")
    b = simulate(workload, standard_scheduler(4, workload.max_tokens), as_table, mode="continuous")
    assert a.makespan == pytest.approx(b.makespan, rel=1e-9)
    assert a.latency_mean == pytest.approx(b.latency_mean, rel=1e-9)


def test_max_wait_bounds_latency_at_low_load():
    workload = make_workload(400, Uniform(1, 20), arrival_rate=0.05, seed=9)
    without = simulate(workload, oracle_scheduler(workload, 2, batch_size=32))
    with_wait = simulate(workload, oracle_scheduler(workload, 2, batch_size=32, max_wait=5.0))
    # Without a maximum wait a request waits for 31 more of its bin; with one, at most 5.
    assert with_wait.latency_p99 < without.latency_p99 / 4
    assert with_wait.latency_mean < without.latency_mean / 4


def test_simulator_refuses_bad_setups():
    real = make_workload(10, Uniform(1, 20), seed=0)
    with pytest.raises(ValueError, match="whole decode steps"):
        simulate(real, standard_scheduler(2, 20), _table())
    with pytest.raises(ValueError, match="unknown mode"):
        simulate(real, standard_scheduler(2, 20), mode="eager")
    with pytest.raises(ValueError, match="exceeds the bins' max_len"):
        simulate(real, standard_scheduler(2, 10))
    used = standard_scheduler(2, 20)
    simulate(real, used)
    with pytest.raises(ValueError, match="fresh scheduler"):
        simulate(real, used)


@pytest.mark.slow
def test_a_million_requests_in_under_a_minute():
    workload = make_workload(1_000_000, Uniform(1, 20), seed=10)
    start = time.perf_counter()
    result = simulate(workload, oracle_scheduler(workload, 4))
    elapsed = time.perf_counter() - start
    assert result.n_requests == 1_000_000
    assert result.throughput == pytest.approx(theory.uniform_throughput(4, 128, 1, 20), rel=0.01)
    assert elapsed < 60, f"1M requests took {elapsed:.1f} s"
