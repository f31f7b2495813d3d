import subprocess
import sys

import pytest

from scheduler.bins import AdaptiveEdges, explicit_edges
from scheduler.policy import MultiBinScheduler, QueueFull, standard_scheduler
from scheduler.predictors import OraclePredictor
from scheduler.types import Request

EDGES = explicit_edges([10, 20], max_len=40)  # bins [0,10) [10,20) [20,40]


class Lengths(OraclePredictor):
    """An oracle whose map the test fills as it creates requests."""

    def __init__(self):
        super().__init__({})


def make(batch_size=2, edges=EDGES, **kwargs):
    predictor = Lengths()
    sched = MultiBinScheduler(edges, batch_size, predictor, **kwargs)
    counter = iter(range(10 ** 6))

    def submit(length, now=0.0, prompt_len=5, max_tokens=40):
        r = Request(f"r{next(counter)}", prompt_len, max_tokens, arrival_time=now)
        predictor.true_lengths[r.request_id] = length
        sched.submit(r, now)
        return r

    return sched, submit


def ids(plan_or_list):
    reqs = plan_or_list.requests if hasattr(plan_or_list, "requests") else plan_or_list
    return [r.request_id for r in reqs]


def test_full_batches_form_per_bin_and_serve_in_formation_order():
    sched, submit = make()
    a = submit(25, 0.0)
    b = submit(5, 1.0)
    c = submit(6, 2.0)  # bin 0 full first
    d = submit(30, 3.0)  # then bin 2
    assert (a.bin, b.bin, d.bin) == (2, 0, 2)
    assert sched.queue_depths() == [2, 0, 2] and sched.pending() == 4
    p1 = sched.next_plan(4.0)
    assert (p1.bin, ids(p1), p1.formed_at, p1.batch_size) == (0, [b.request_id, c.request_id], 2.0, 2)
    assert p1.max_new_tokens_bound == 10 and p1.max_prompt_len == 5
    p2 = sched.next_plan(4.0)
    assert (p2.bin, ids(p2), p2.max_new_tokens_bound) == (2, [a.request_id, d.request_id], 40)
    assert sched.next_plan(5.0) is None
    assert sched.in_flight() == 4 and sched.pending() == 0


def test_bound_is_capped_by_remaining_max_tokens_and_prompt_is_the_longest():
    sched, submit = make()
    submit(12, prompt_len=7, max_tokens=15)
    submit(11, prompt_len=30, max_tokens=13)
    plan = sched.next_plan(0.0)
    assert plan.bin == 1 and plan.max_new_tokens_bound == 15 and plan.max_prompt_len == 30


def test_shortest_bin_first_and_the_starvation_guard():
    sched, submit = make(order="shortest", starvation_wait=10.0)
    for t in (0.0, 0.5):
        submit(30, t)  # bin 2 forms at 0.5
    for t in (1.0, 1.5, 2.0, 2.5):
        submit(3, t)  # two bin-0 batches form at 1.5 and 2.5
    assert sched.next_plan(3.0).bin == 0  # shortest first
    plan = sched.next_plan(10.5)  # bin 2 has waited exactly 10: served regardless of order
    assert plan.bin == 2 and plan.formed_at == 0.5
    assert sched.next_plan(10.5).bin == 0


def test_max_wait_flushes_a_partial_batch_at_its_deadline():
    sched, submit = make(batch_size=4, max_wait=5.0)
    first = submit(3, 1.0)
    submit(4, 2.0)
    assert sched.next_deadline() == 6.0
    assert sched.next_plan(5.999) is None
    plan = sched.next_plan(9.0)
    assert ids(plan)[0] == first.request_id and len(plan.requests) == 2
    assert plan.formed_at == 6.0  # formed when it fell due, not when asked
    assert sched.next_deadline() is None


def test_flush_and_close_form_partial_batches():
    sched, submit = make(batch_size=4)
    submit(3)
    assert sched.next_plan(1.0) is None and sched.next_deadline() is None
    assert len(sched.next_plan(1.0, flush=True).requests) == 1
    submit(25, 2.0)
    submit(26, 2.0)
    sched.close(3.0)
    plan = sched.next_plan(3.0)
    assert len(plan.requests) == 2 and plan.formed_at == 3.0
    with pytest.raises(RuntimeError, match="closed"):
        submit(3, 4.0)


def test_queue_full():
    sched, submit = make(batch_size=8, max_queue=2)
    submit(1)
    submit(2)
    with pytest.raises(QueueFull, match="max_queue=2"):
        submit(3)
    sched.next_plan(0.0, flush=True)
    submit(4)  # room again once handed out


def test_bad_requests_are_named():
    sched, submit = make()
    r = submit(3)
    with pytest.raises(ValueError, match="already queued"):
        sched.submit(r, 0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        submit(3, max_tokens=41)
    with pytest.raises(ValueError, match="not in flight"):
        sched.on_finish("nobody", 3, 0.0)
    with pytest.raises(ValueError, match="unknown central-queue order"):
        MultiBinScheduler(EDGES, 2, order="random")


def test_refill_same_bin_then_any_bin_oldest_first():
    sched, submit = make(batch_size=3)
    a0, a1 = submit(5, 0.0), submit(6, 1.0)
    c0 = submit(30, 2.0)
    a2, a3 = submit(7, 3.0), submit(8, 4.0)  # bin 0 formed [a0 a1 a2]; a3 waits
    assert ids(sched.refill(0, 2, 5.0)) == [a0.request_id, a1.request_id]  # from the formed batch
    assert ids(sched.refill(0, 5, 5.0)) == [a2.request_id, a3.request_id]
    assert sched.refill(0, 1, 5.0) == []
    b0 = submit(15, 6.0)
    assert ids(sched.refill(None, 5, 7.0)) == [c0.request_id, b0.request_id]
    assert sched.pending() == 0 and sched.in_flight() == 6


def test_bin_continuous_refill_yields_to_a_starving_bin():
    sched, submit = make(batch_size=2, starvation_wait=4.0)
    submit(30, 0.0), submit(31, 0.0)  # bin 2 formed at 0
    submit(3, 1.0)
    assert len(sched.refill(0, 1, 3.0)) == 1
    submit(4, 3.5)
    assert sched.refill(0, 1, 4.0) == []  # bin 2 has waited 4: drain, let next_plan serve it
    assert sched.next_plan(4.0).bin == 2


def test_overflow_requeues_the_same_request_in_a_higher_bin():
    sched, submit = make(batch_size=1)
    r = submit(3)  # predicted 3 tokens; it will need 35
    sched.close(0.0)
    assert sched.next_plan(0.0).requests[0] is r and r.bin == 0
    r.prompt_len += 10
    r.generated += 10
    sched.on_overflow(r, 1.0)
    assert r.bin == 1 and r.predicted_len == 11  # at least one past what it generated
    assert sched.overflow_count == 1
    plan = sched.next_plan(1.0)  # closed: forms at once
    assert plan.requests == [r] and plan.max_new_tokens_bound == 20
    r.prompt_len += 20
    r.generated += 20
    sched.on_overflow(r, 2.0)
    assert r.bin == 2
    plan = sched.next_plan(2.0)
    assert plan.max_new_tokens_bound == 10  # remaining max_tokens: 40 - 30
    sched.on_finish(r.request_id, 35, 3.0)
    assert sched.finished_count == 1 and sched.in_flight() == 0


def test_overflow_needs_the_same_object_and_an_in_flight_request():
    sched, submit = make(batch_size=1)
    r = submit(5)
    with pytest.raises(ValueError, match="not in flight"):
        sched.on_overflow(r, 0.0)
    sched.next_plan(0.0)
    copy = Request(r.request_id, r.prompt_len + 1, r.max_tokens, generated=1)
    with pytest.raises(ValueError, match="same Request object"):
        sched.on_overflow(copy, 0.0)


def test_standard_batching_is_arrival_order():
    sched = standard_scheduler(3, max_len=100)
    reqs = [Request(f"s{i}", 1, 100 - i) for i in range(7)]
    for i, r in enumerate(reqs):
        sched.submit(r, float(i))
    sched.close(7.0)
    plans = [sched.next_plan(7.0) for _ in range(3)]
    assert [ids(p) for p in plans] == [ids(reqs[0:3]), ids(reqs[3:6]), ids(reqs[6:])]
    assert plans[0].max_new_tokens_bound == 100 and plans[2].max_new_tokens_bound == 94


def test_cancel():
    sched, submit = make(batch_size=3)
    a, b = submit(5), submit(6)
    c = submit(7)  # formed
    d = submit(8)  # waiting
    assert sched.cancel(b.request_id, 1.0) and sched.cancel(d.request_id, 1.0)
    assert not sched.cancel("nobody", 1.0)
    assert sched.pending() == 2 and sched.queue_depths() == [2, 0, 0]
    assert ids(sched.next_plan(1.0)) == [a.request_id, c.request_id]
    assert sched.cancel(a.request_id, 2.0) and sched.in_flight() == 1


def test_adaptive_edges_learn_from_finishes():
    edges = AdaptiveEdges(2, max_len=100, window=50, min_samples=50, refresh_every=50)
    sched, submit = make(batch_size=1, edges=edges)
    assert edges.boundaries == (50.5,)
    for i in range(50):
        r = submit(10 + i % 3, max_tokens=100)
        sched.next_plan(0.0)
        sched.on_finish(r.request_id, 10 + i % 3, 1.0)
    assert edges.refreshes == 1 and edges.boundaries == (11.0,)


def test_scheduler_imports_neither_torch_nor_numpy():
    code = ("import sys, scheduler, scheduler.simulate; "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
