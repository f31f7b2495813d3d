"""Random interleavings of the scheduler API against a model of what the policy promises."""

from collections import Counter, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.bins import BinEdges
from scheduler.policy import ORDERS, MultiBinScheduler
from scheduler.predictors import OraclePredictor
from scheduler.types import Request

MAX_LEN = 40
OPS = ["submit", "submit", "submit", "tick", "plan", "flush", "refill_bin", "refill_any",
       "finish", "finish", "overflow"]


class Checked:
    """Drives a scheduler and checks every answer against the promises."""

    def __init__(self, sched: MultiBinScheduler, predictor: OraclePredictor):
        self.sched = sched
        self.predictor = predictor
        self.now = 0.0
        self.fifo = [deque() for _ in range(sched.edges.k)]  # expected hand-out order per bin
        self.enqueued_at: dict[str, float] = {}
        self.in_flight: dict[str, Request] = {}
        self.handed = Counter()
        self.overflows = Counter()
        self.submitted: list[str] = []
        self.finished: list[str] = []
        self.last_formed_at = float("-inf")

    def after_call(self):
        deadline = self.sched.next_deadline()
        # No bin holds an unformed request older than max_wait.
        assert deadline is None or deadline > self.now
        assert self.sched.pending() == sum(len(q) for q in self.fifo)
        assert self.sched.queue_depths() == [len(q) for q in self.fifo]
        assert self.sched.in_flight() == len(self.in_flight)

    def enqueued(self, r: Request):
        self.fifo[r.bin].append(r.request_id)
        self.enqueued_at[r.request_id] = self.now

    def take(self, requests: list[Request]):
        for r in requests:
            assert r.request_id not in self.in_flight, "handed out twice"
            assert self.fifo[r.bin] and self.fifo[r.bin][0] == r.request_id, "not FIFO in its bin"
            self.fifo[r.bin].popleft()
            self.in_flight[r.request_id] = r
            self.handed[r.request_id] += 1

    def submit(self, rid: str, predicted: float, prompt_len: int, max_tokens: int):
        r = Request(rid, prompt_len, max_tokens, arrival_time=self.now)
        self.predictor.true_lengths[rid] = predicted
        self.sched.submit(r, self.now)
        self.submitted.append(rid)
        self.enqueued(r)
        self.after_call()

    def plan(self, flush: bool = False):
        plan = self.sched.next_plan(self.now, flush=flush)
        if plan is not None:
            assert 1 <= len(plan.requests) <= plan.batch_size == self.sched.batch_size
            assert all(r.bin == plan.bin for r in plan.requests)
            assert plan.max_prompt_len == max(r.prompt_len for r in plan.requests)
            assert plan.max_new_tokens_bound == min(
                self.sched.edges.upper(plan.bin),
                max(r.remaining_max_tokens for r in plan.requests))
            oldest = min(self.enqueued_at[r.request_id] for r in plan.requests)
            if self.sched.max_wait is not None:
                assert plan.formed_at <= oldest + self.sched.max_wait
            if self.sched.order == "formation" and self.sched.starvation_wait is None:
                assert plan.formed_at >= self.last_formed_at
                self.last_formed_at = plan.formed_at
            self.take(plan.requests)
        self.after_call()
        return plan

    def refill(self, b, n):
        got = self.sched.refill(b, n, self.now)
        assert len(got) <= max(n, 0)
        if b is not None:
            assert all(r.bin == b for r in got)
        self.take(got)
        self.after_call()

    def finish(self, rid: str):
        self.in_flight.pop(rid)
        self.sched.on_finish(rid, 1.0, self.now)
        self.finished.append(rid)
        self.after_call()

    def overflow(self, rid: str, generated: int):
        r = self.in_flight.pop(rid)
        old_bin = r.bin
        r.prompt_len += generated
        r.generated += generated
        self.sched.on_overflow(r, self.now)
        assert r.bin > old_bin or r.bin == old_bin == self.sched.edges.k - 1
        self.overflows[rid] += 1
        self.enqueued(r)
        self.after_call()


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_every_request_is_planned_once_per_queueing_under_every_policy(data):
    k = data.draw(st.integers(1, 4), label="k")
    boundaries = sorted(data.draw(st.lists(st.integers(1, MAX_LEN), min_size=k - 1,
                                           max_size=k - 1), label="edges"))
    predictor = OraclePredictor({})
    sched = MultiBinScheduler(
        BinEdges(tuple(boundaries), MAX_LEN), data.draw(st.integers(1, 5), label="B"), predictor,
        order=data.draw(st.sampled_from(ORDERS), label="order"),
        max_wait=data.draw(st.sampled_from([None, 0.0, 1.0, 3.5]), label="max_wait"),
        starvation_wait=data.draw(st.sampled_from([None, 0.0, 2.0, 10.0]), label="starvation"))
    check = Checked(sched, predictor)
    for step, op in enumerate(data.draw(st.lists(st.sampled_from(OPS), max_size=80), label="ops")):
        if op == "submit":
            check.submit(f"r{step}", data.draw(st.floats(0, MAX_LEN)), data.draw(st.integers(0, 20)),
                         data.draw(st.integers(1, MAX_LEN)))
        elif op == "tick":
            check.now += data.draw(st.sampled_from([0.0, 0.25, 1.0, 3.5, 7.0]))
        elif op in ("plan", "flush"):
            check.plan(flush=op == "flush")
        elif op == "refill_bin":
            check.refill(data.draw(st.integers(0, k - 1)), data.draw(st.integers(0, 6)))
        elif op == "refill_any":
            check.refill(None, data.draw(st.integers(0, 6)))
        elif check.in_flight:
            rid = data.draw(st.sampled_from(sorted(check.in_flight)))
            room = check.in_flight[rid].remaining_max_tokens
            if op == "overflow" and room >= 2:
                check.overflow(rid, data.draw(st.integers(1, room - 1)))
            else:
                check.finish(rid)
    # Final flush: nothing is left behind.
    sched.close(check.now)
    check.after_call()
    while sched.pending() or check.in_flight:
        for rid in list(check.in_flight):
            check.finish(rid)
        check.plan()
    assert sorted(check.finished) == sorted(check.submitted)
    for rid in check.submitted:
        assert check.handed[rid] == 1 + check.overflows[rid]
    assert sched.overflow_count == sum(check.overflows.values())


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_continuous_refill_hands_out_the_oldest_request_first(data):
    edges = BinEdges((10.0, 20.0), MAX_LEN)
    predictor = OraclePredictor({})
    sched = MultiBinScheduler(edges, data.draw(st.integers(1, 4)), predictor)
    order = []
    for i, length in enumerate(data.draw(st.lists(st.floats(0, MAX_LEN), min_size=1, max_size=30))):
        predictor.true_lengths[f"r{i}"] = length
        sched.submit(Request(f"r{i}", 1, MAX_LEN), float(i))
        order.append(f"r{i}")
    got = []
    while True:
        batch = sched.refill(None, data.draw(st.integers(1, 5)), 100.0)
        if not batch:
            break
        got.extend(r.request_id for r in batch)
    assert got == order
