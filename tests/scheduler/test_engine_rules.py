"""The simulator's engine rules, by hand: overflow at the slab's capacity, the refill threshold
and wait, the flush of re-queued overflows, the batch log, and the engine step model (rows'
spread and loop overheads)."""

import math
import pickle
import statistics

import pytest

from scheduler.bins import explicit_edges
from scheduler.policy import MultiBinScheduler, standard_scheduler
from scheduler.predictors import OraclePredictor
from scheduler.schemas import StepTimeTable
from scheduler.service import EngineStepModel, LinearServiceModel, fewest_steps
from scheduler.simulator import SimBatch, simulate
from scheduler.workload import Uniform, Workload, make_workload

WHOLE_STEPS = LinearServiceModel(step_s=1.0, integer_steps=True)  # one time unit per step


def _two_bins(predicted: dict, batch_size: int = 1) -> MultiBinScheduler:
    return MultiBinScheduler(explicit_edges([10], 20), batch_size, OraclePredictor(predicted))


@pytest.mark.parametrize("prompt, capacities, makespan, overflows", [
    # C = 16 (the smallest bucket >= 3 + 10): 13 steps to the slab's end, 14 tokens out (the
    # prefill gave one); the last token needs a new slab, bound min(20, 20 - 14) -> C = 32.
    (3, (8, 16, 32), 14, 1),
    # Prompt 1: room for 15 steps, the row's 15 tokens fit.
    (1, (8, 16, 32), 15, 0),
    # Prompt 2: 14 steps to the end and 15 tokens: the row finishes exactly there.
    (2, (8, 16, 32), 14, 0),
    # The paper's rule: overflow at the bound (10 tokens), 5 more in bin 1.
    (3, None, 15, 1),
])
def test_overflow_at_the_slab_capacity(prompt, capacities, makespan, overflows):
    workload = Workload([0.0], [prompt], [15], 20)
    result = simulate(workload, _two_bins({"r0": 5}), WHOLE_STEPS, capacities=capacities)
    assert (result.makespan, result.overflows) == (makespan, overflows)
    assert result.n_batches == 1 + overflows and result.token_throughput == 15 / makespan


def test_a_row_at_the_slab_end_holds_its_row_one_more_step():
    # B = 2, bin 0 slab: C = 16 (prompt 4 + bound 10 -> 14). r0 (prompt 4, 15 tokens) is live
    # 12 steps, then evicted: its row frees at step 13, when its last token is read. r2
    # (queued) takes it then and ends at 15. r1 (prompt 1, 14 tokens) fits (room 15) and ends
    # at 14. r0 re-runs its last 2 tokens once the slab has drained: 15 -> 17.
    workload = Workload([0.0] * 3, [4, 1, 4], [15, 14, 2], 20)
    sched = _two_bins({"r0": 5, "r1": 5, "r2": 2}, batch_size=2)
    result = simulate(workload, sched, WHOLE_STEPS, mode="bin-continuous",
                      capacities=(8, 16, 32))
    assert result.overflows == 1 and result.makespan == 17
    assert result.latency_mean == pytest.approx((17 + 14 + 15) / 3)


def test_capacities_and_refill_options_are_checked():
    workload = Workload([0.0], [4], [5], 20)
    with pytest.raises(ValueError, match="cannot hold the longest prompt"):
        simulate(workload, _two_bins({"r0": 5}), capacities=(8, 16))
    with pytest.raises(ValueError, match="positive whole token counts"):
        simulate(workload, _two_bins({"r0": 5}), capacities=(8.5, 32))
    with pytest.raises(ValueError, match="refill_min_free"):
        simulate(workload, _two_bins({"r0": 5}), mode="continuous", refill_min_free=0)
    with pytest.raises(ValueError, match="refill_max_wait"):
        simulate(workload, _two_bins({"r0": 5}), mode="continuous", refill_max_wait=-1.0)


def _continuous(lengths, **rules):
    workload = Workload([0.0] * len(lengths), [0] * len(lengths), list(lengths), 20)
    sched = standard_scheduler(4, 20)
    return simulate(workload, sched, WHOLE_STEPS, mode="continuous", **rules)


def test_refill_waits_for_enough_free_rows():
    # Rows 2, 5, 9, 9 and two queued 3s. Refilling after every finish: a 3 joins at 2 (ends 5),
    # the other at 5 (ends 8). With two free rows needed: both join at 5 and end at 8.
    lengths = [2, 5, 9, 9, 3, 3]
    every = _continuous(lengths)
    assert every.latency_mean == pytest.approx((2 + 5 + 9 + 9 + 5 + 8) / 6)
    pairs = _continuous(lengths, refill_min_free=2)
    assert pairs.latency_mean == pytest.approx((2 + 5 + 9 + 9 + 8 + 8) / 6)
    assert pairs.makespan == every.makespan == 9


def test_refill_after_the_wait_when_too_few_rows_are_free():
    # Four free rows needed (never while any is live), or a wait of 1.5. The row free at 2
    # waits until the step boundary past 3.5 (4): the first 3 joins then, ends 7. The row free
    # at 5 (first free row since that refill) has waited 2 at 7, when a second row frees: the
    # other 3 joins at 7 and ends at 10.
    result = _continuous([2, 5, 9, 9, 3, 3], refill_min_free=4, refill_max_wait=1.5)
    assert result.makespan == 10
    assert result.latency_mean == pytest.approx((2 + 5 + 9 + 9 + 7 + 10) / 6)


def test_overflows_re_queued_during_a_batch_form_one_batch():
    # Both rows are predicted in bin 0 (bound 10) and run 15: both overflow at 10 and go to bin
    # 1 together, as the engine's next plan forms them (not one batch each).
    workload = Workload([0.0, 0.0], [0, 0], [15, 15], 20)
    result = simulate(workload, _two_bins({"r0": 5, "r1": 5}, batch_size=2))
    assert result.overflows == 2 and result.n_batches == 2 and result.makespan == 15


def test_batch_log_by_hand():
    # Bin 0: r0 (3 tokens), r2 (4) form a full batch; bin 1: r1 (12) is flushed after it.
    # Slabs: C = 16 (prompt 4 + bound 10), then C = 32 (prompt 3 + bound 20); prefill 0.5.
    workload = Workload([0.0] * 3, [2, 3, 4], [3, 12, 4], 20)
    sched = _two_bins({"r0": 3, "r1": 12, "r2": 4}, batch_size=2)
    log: list[SimBatch] = []
    table = LinearServiceModel(step_s=1.0, prefill_s=0.5, integer_steps=True)
    result = simulate(workload, sched, table, capacities=(8, 16, 32), batch_log=log)
    assert [(b.bin, b.n_requests, b.steps, b.capacity) for b in log] == [(0, 2, 4, 16),
                                                                         (1, 1, 12, 32)]
    assert [(b.started_at, b.ended_at) for b in log] == [(0.0, 4.5), (4.5, 17.0)]
    assert sum(b.prefill_time for b in log) == result.prefill_time == 1.0
    assert sum(b.decode_time for b in log) == result.decode_time == 16.0


# ---- the engine step model -----------------------------------------------------------------


def _tables():
    """A step table and a one-row table, linear in tokens so the spread term is exact:
    a step costs 1 ms + 10 ns per live token (B=4) and 2 ms + 10 ns (B=8); one row alone
    streams at 200 ns per token."""
    decode = [(b, x, base + 1e-8 * x) for b, base in ((4, 1e-3), (8, 2e-3))
              for x in (0, 40_000)]
    one_row = [(b, x, base + 2e-7 * x) for b, base in ((4, 1e-3), (8, 2e-3))
               for x in (100, 5_000)]
    prefill = [(b, x, 1e-4 + 1e-7 * x) for b in (1, 8) for x in (0, 10_000)]
    return (StepTimeTable("d", "m", decode, prefill), StepTimeTable("d", "m", one_row, prefill))


def _spread(lengths, alpha, beta):
    """The straggler term of one step, straight from the formula."""
    ordered = sorted(lengths)
    n, previous, extra = len(ordered), 0, 0.0
    for i, length in enumerate(ordered):
        extra += (length - previous) * max(0.0, alpha - beta * (n - i))
        previous = length
    return extra


def test_one_live_row_costs_what_the_one_row_table_measured():
    table, one_row = _tables()
    model = EngineStepModel(table, one_row)
    assert model.slopes(4) == pytest.approx((2e-7, 1e-8))
    for length in (150, 2000, 4000):
        step = model.decode_time(4, length) + model.straggler_sum(4, [length], 1)
        assert step == pytest.approx(one_row.decode_time(4, length), rel=1e-12)


def test_straggler_sum_over_steps_matches_the_formula_step_by_step():
    table, one_row = _tables()
    model = EngineStepModel(table, one_row)
    alpha, beta = model.slopes(8)
    lengths = [37, 500, 510, 2000, 2001, 3000, 90, 1200]
    expected = sum(_spread([x + j for x in lengths], alpha, beta) for j in range(25))
    assert model.straggler_sum(8, lengths, 25) == pytest.approx(expected, rel=1e-12)
    assert expected > 0
    # Many equal rows keep the bandwidth busy: nothing straggles.
    assert model.straggler_sum(8, [1000] * 40, 10) == 0.0
    assert EngineStepModel(table).straggler_sum(8, lengths, 25) == 0.0


def test_engine_overheads_per_step_and_per_prefill():
    table, _ = _tables()
    model = EngineStepModel(table, decode_step=[(4, 1e-4), (8, 3e-4)],
                            prefill_call=[(8, 2e-3)])
    assert model.decode_time(6, 1000) == pytest.approx(table.decode_time(6, 1000) + 2e-4)
    assert model.decode_sum(4, 100, 4, 10) == pytest.approx(table.decode_sum(4, 100, 4, 10)
                                                            + 10 * 1e-4)
    assert model.prefill_time(2, 500) == pytest.approx(table.prefill_time(2, 500) + 2e-3)
    assert model.prefill_time(0, 0) == 0.0
    n = model.steps_in(8, 1000, 8, 0.05)
    assert model.decode_sum(8, 1000, 8, n - 1) < 0.05 <= model.decode_sum(8, 1000, 8, n)
    clone = pickle.loads(pickle.dumps(model))  # simulations run in worker processes
    assert clone.decode_sum(4, 100, 4, 10) == model.decode_sum(4, 100, 4, 10)
    with pytest.raises(ValueError, match="distinct batch sizes"):
        EngineStepModel(table, decode_step=[(4, 1e-4), (4, 2e-4)])
    with pytest.raises(ValueError, match="positive time"):
        fewest_steps(lambda n: 1.0, 5.0)


def _brute_force_static(workload, batch_size, model):
    """Static FIFO batches of one bin, step by step: each step costs the step table at the
    live tokens, plus the overhead, plus the spread term of the live rows' lengths."""
    alpha, beta = model.slopes(batch_size)
    t, finish = 0.0, {}
    order = list(range(len(workload)))
    for lo in range(0, len(order), batch_size):
        rows = order[lo:lo + batch_size]
        t += model.prefill_time(len(rows), sum(workload.prompt_lens[i] for i in rows))
        for step in range(int(max(workload.output_lens[i] for i in rows))):
            live = [workload.prompt_lens[i] + step + 1 for i in rows
                    if workload.output_lens[i] > step]
            t += model.decode_time(batch_size, sum(live)) + _spread(live, alpha, beta)
            for i in rows:
                if workload.output_lens[i] == step + 1:
                    finish[i] = t
    return t, statistics.fmean(finish[i] for i in order)


def test_simulator_charges_the_rows_spread():
    table, one_row = _tables()
    model = EngineStepModel(table, one_row, decode_step=[(4, 5e-5)], prefill_call=[(4, 1e-3)])
    workload = make_workload(40, Uniform(1, 300), prompts=Uniform(10, 2000), integer=True,
                             seed=3)
    result = simulate(workload, standard_scheduler(4, workload.max_tokens), model)
    makespan, mean = _brute_force_static(workload, 4, model)
    assert result.makespan == pytest.approx(makespan, rel=1e-9)
    assert result.latency_mean == pytest.approx(mean, rel=1e-9)
    plain = simulate(workload, standard_scheduler(4, workload.max_tokens), table)
    assert result.makespan > plain.makespan


@pytest.mark.parametrize("mode", ["bin-continuous", "continuous"])
def test_refilling_modes_with_the_step_model_finish_every_request(mode):
    table, one_row = _tables()
    model = EngineStepModel(table, one_row, decode_step=[(4, 5e-5)])
    workload = make_workload(60, Uniform(1, 200), prompts=Uniform(10, 400), integer=True,
                             arrival_rate=300.0, seed=4)
    result = simulate(workload, standard_scheduler(4, workload.max_tokens), model, mode=mode,
                      refill_min_free=2, refill_max_wait=0.01)
    plain = simulate(workload, standard_scheduler(4, workload.max_tokens), table, mode=mode,
                     refill_min_free=2, refill_max_wait=0.01)
    assert result.n_requests == 60 and math.isfinite(result.latency_p99)
    assert result.decode_time > plain.decode_time
