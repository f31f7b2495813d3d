"""Service-time models for the simulator.

A model answers, for a slab of B rows: how long one decode step takes with ``live_tokens``
KV tokens in its live rows, the sum of that over a run of steps in which the live tokens grow
by a fixed amount per step, how many steps fit in a duration, and how long a prefill of
``prompt_tokens`` (summed over the rows being prefilled) takes. ``StepTimeTable`` (schemas.py)
is the measured model; ``LinearServiceModel`` is the analytic one; ``EngineStepModel`` adds to
a table what it leaves out: rows of unequal length, and the engine loop's own costs.
``integer_steps`` says whether output lengths must be whole tokens (a measured table) or may be
real numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

from scheduler.interpolate import PiecewiseLinear


class ServiceModel(Protocol):
    integer_steps: bool

    def decode_time(self, batch_size: int, live_tokens: float) -> float: ...

    def decode_sum(self, batch_size: int, live_start: float, live_step: float,
                   n_steps: float) -> float: ...

    def steps_in(self, batch_size: int, live_start: float, live_step: float,
                 duration: float) -> float: ...

    def prefill_time(self, batch_size: int, prompt_tokens: float) -> float: ...


@dataclass(frozen=True)
class LinearServiceModel:
    """Decode step ``step_s + per_token_s * live_tokens``; prefill
    ``prefill_s + prefill_per_token_s * prompt_tokens`` (0 when nothing is prefilled).

    The default is the paper's model: one time unit per generated token, free prefill, so a
    static batch takes as long as its longest member.
    """

    step_s: float = 1.0
    per_token_s: float = 0.0
    prefill_s: float = 0.0
    prefill_per_token_s: float = 0.0
    integer_steps: bool = False

    def __post_init__(self):
        if self.step_s <= 0 or min(self.per_token_s, self.prefill_s, self.prefill_per_token_s) < 0:
            raise ValueError(f"linear service model needs step_s > 0 and non-negative "
                             f"per-token and prefill costs, got {self}")

    def decode_time(self, batch_size: int, live_tokens: float) -> float:
        """One decode step of the slab (B does not enter the linear model)."""
        return self.step_s + self.per_token_s * live_tokens

    def decode_sum(self, batch_size: int, live_start: float, live_step: float,
                   n_steps: float) -> float:
        """Sum of step times while live tokens go live_start, live_start + live_step, ...
        (continuous in n_steps: real-valued lengths are allowed)."""
        n = n_steps
        return n * self.step_s + self.per_token_s * (n * live_start + live_step * n * (n - 1) / 2)

    def steps_in(self, batch_size: int, live_start: float, live_step: float,
                 duration: float) -> float:
        """The n with decode_sum(n) = duration (n >= 0); with ``integer_steps``, the fewest
        whole steps reaching it."""
        if duration <= 0:
            return 0.0
        a = self.per_token_s * live_step / 2
        b = self.step_s + self.per_token_s * (live_start - live_step / 2)
        n = duration / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * duration)) / (2 * a)
        if not self.integer_steps:
            return n
        whole = max(1, math.floor(n))
        while self.decode_sum(batch_size, live_start, live_step, whole) < duration:
            whole += 1  # floor(n) is one short unless n is whole; rounding may cost one more
        return whole

    def prefill_time(self, batch_size: int, prompt_tokens: float) -> float:
        """Prefilling ``batch_size`` rows whose prompts sum to ``prompt_tokens``."""
        if batch_size == 0:
            return 0.0
        return self.prefill_s + self.prefill_per_token_s * prompt_tokens


PAPER_SERVICE = LinearServiceModel()


class EngineStepModel:
    """The engine's step costs: a measured step-time table plus what it leaves out.

    The table times decode steps whose live rows all hold the same number of tokens, so its
    attention runs bandwidth-bound. In a real slab rows differ: once fewer rows are still
    streaming their KV than it takes to fill the memory bandwidth, each streams at its lone
    speed, and the step waits for the longest. (The decode kernel gives each row and KV head
    its own programs, split along the row only when B is small.) ``one_row`` measures that lone speed: the same
    model's decode steps with a single live row per slab. Per step, with the live rows'
    lengths sorted, L_1 <= ... <= L_n, and L_0 = 0, the step costs the table's time plus

        sum_i (L_i - L_{i-1}) * max(0, alpha - beta * (n - i + 1))

    (rows advance together; while m rows remain, each token costs max(alpha, beta * m)), with
    alpha(B) the one-row curve's seconds per token and beta(B) the table's seconds per live
    token, both their mean slopes over the one-row table's lengths. The engine's loop adds
    its own costs per decode step and per batch (charged with a slab's first prefill, not with
    its refills: ``refill_time``), measured by running the engine:
    lists of (B, seconds), piecewise linear in B, flat below the smallest, beyond the largest
    extended with the last slope floored at zero (one point: the same for every B).

    ``table`` and ``one_row`` are measured ``StepTimeTable``s (whole steps). ``decode_time``,
    ``decode_sum`` and ``steps_in`` leave the rows' spread out (they see only the token
    total); the simulator adds ``straggler_sum`` where it knows each live row.
    """

    def __init__(self, table: ServiceModel, one_row: ServiceModel | None = None,
                 decode_step: Sequence[tuple[int, float]] = (),
                 prefill_call: Sequence[tuple[int, float]] = ()):
        self.table = table
        self.one_row = one_row
        self.integer_steps = table.integer_steps
        self.decode_step_points = [(int(b), float(s)) for b, s in decode_step]
        self.prefill_call_points = [(int(b), float(s)) for b, s in prefill_call]
        self._decode = _by_batch_size(self.decode_step_points, "decode_step")
        self._prefill = _by_batch_size(self.prefill_call_points, "prefill_call")
        if one_row is not None:
            lengths = [x for _, x, _ in one_row.decode]
            self._lengths = (min(lengths), max(lengths))
            if self._lengths[0] == self._lengths[1]:
                raise ValueError("the one-row table needs at least two row lengths")
        self._slopes: dict[int, tuple[float, float]] = {}

    def decode_time(self, batch_size: int, live_tokens: float) -> float:
        return self.table.decode_time(batch_size, live_tokens) + self._decode(batch_size)

    def decode_sum(self, batch_size: int, live_start: float, live_step: float,
                   n_steps: float) -> float:
        return (self.table.decode_sum(batch_size, live_start, live_step, n_steps)
                + n_steps * self._decode(batch_size))

    def steps_in(self, batch_size: int, live_start: float, live_step: float,
                 duration: float) -> float:
        """The fewest whole steps whose ``decode_sum`` reaches ``duration``."""
        return fewest_steps(lambda n: self.decode_sum(batch_size, live_start, live_step, n),
                            duration)

    def prefill_time(self, batch_size: int, prompt_tokens: float) -> float:
        """A slab's first prefill: the table's, plus the engine's per-batch cost at B rows."""
        if batch_size == 0:
            return 0.0
        return self.table.prefill_time(batch_size, prompt_tokens) + self._prefill(batch_size)

    def refill_time(self, rows: int, prompt_tokens: float) -> float:
        """Prefilling ``rows`` new rows into a slab that is already running: the table's
        prefill only. The calibrated ``prefill_call`` cost is measured per batch (host work
        around a batch's start and end, from whole static batches), so a refill, which
        neither starts nor ends a batch, does not pay it again."""
        if rows == 0:
            return 0.0
        return self.table.prefill_time(rows, prompt_tokens)

    def slopes(self, batch_size: int) -> tuple[float, float]:
        """(alpha, beta): seconds per token of a lone row, and per live token of the table."""
        if batch_size not in self._slopes:
            lo, hi = self._lengths
            B = batch_size
            alpha = (self.one_row.decode_time(B, hi) - self.one_row.decode_time(B, lo)) / (hi - lo)
            beta = (self.table.decode_time(B, B * hi) - self.table.decode_time(B, B * lo)) / \
                (B * (hi - lo))
            self._slopes[B] = (alpha, beta)
        return self._slopes[batch_size]

    def straggler_sum(self, batch_size: int, row_lengths: Sequence[float],
                      n_steps: float) -> float:
        """The stragglers' extra seconds over ``n_steps`` decode steps of a B-row slab whose
        live rows hold ``row_lengths`` tokens at the first step, each one more per step."""
        if self.one_row is None or not row_lengths or n_steps <= 0:
            return 0.0
        alpha, beta = self.slopes(batch_size)
        if alpha <= beta:  # a lone row is no slower than its share of the bandwidth
            return 0.0
        ordered = sorted(row_lengths)
        n = len(ordered)
        # The gaps between rows stay as they are from step to step; the shortest row grows.
        # Past the shortest row's length, the i-th gap is streamed by n - i rows.
        gaps = sum((b - a) * max(0.0, alpha - beta * (n - i))
                   for i, (a, b) in enumerate(zip(ordered, ordered[1:]), start=1))
        common = max(0.0, alpha - beta * n)
        return n_steps * gaps + common * (n_steps * ordered[0] + n_steps * (n_steps - 1) / 2)


def fewest_steps(total, duration: float) -> int:
    """The fewest whole n >= 1 with total(n) >= duration (0 for duration <= 0); ``total`` must
    grow with n."""
    if duration <= 0:
        return 0
    hi = 1
    while total(hi) < duration:
        if total(2 * hi) <= total(hi):
            raise ValueError(f"step costs do not grow with the steps (total({hi}) = "
                             f"{total(hi)}): a step must take a positive time")
        hi *= 2
    lo = hi // 2  # total(lo) < duration <= total(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) < duration else (lo, mid)
    return hi


def _by_batch_size(points: list[tuple[int, float]], what: str):
    """f(B) through (B, seconds) points (see ``EngineStepModel``); 0 without points."""
    if not points:
        return PiecewiseLinear([1], [0.0])
    if len({b for b, _ in points}) != len(points) or min(b for b, _ in points) < 1:
        raise ValueError(f"{what} overheads need distinct batch sizes >= 1, got {points}")
    points = sorted(points)
    return PiecewiseLinear([b for b, _ in points], [s for _, s in points])
