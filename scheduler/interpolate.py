"""Piecewise-linear curves through measured points, with exact sums over arithmetic sequences.

The simulator charges a decode step by its live KV tokens, which grow by one per live row per
step. Summing the step-time curve over such a run of steps in closed form (piece by piece)
keeps a static batch's cost O(rows) instead of O(steps).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Sequence


class PiecewiseLinear:
    """y(x) through points (xs[i], ys[i]), xs strictly increasing.

    Linear between points; flat at ys[0] below xs[0] (a step never costs less than the
    smallest measurement); above xs[-1] the last segment is extended with its slope floored at
    zero. A single point gives a constant.
    """

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"need equally many x and y points, at least one; got {len(xs)} "
                             f"and {len(ys)}")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError(f"x points must be strictly increasing, got {list(xs)}")
        self.xs = [float(x) for x in xs]
        self.ys = [float(y) for y in ys]
        # Pieces (start_x, slope, intercept): piece i covers [start_x[i], start_x[i+1]).
        pieces = [(-math.inf, 0.0, self.ys[0])]
        for i in range(len(xs) - 1):
            slope = (self.ys[i + 1] - self.ys[i]) / (self.xs[i + 1] - self.xs[i])
            pieces.append((self.xs[i], slope, self.ys[i] - slope * self.xs[i]))
        if len(xs) > 1:
            last_slope = max(pieces[-1][1], 0.0)
            pieces.append((self.xs[-1], last_slope, self.ys[-1] - last_slope * self.xs[-1]))
        self._starts = [p[0] for p in pieces]
        self._pieces = pieces

    def __call__(self, x: float) -> float:
        _, slope, intercept = self._pieces[bisect_right(self._starts, x) - 1]
        return slope * x + intercept

    def sum_arithmetic(self, x0: float, dx: float, n: int) -> float:
        """sum_{j=0}^{n-1} y(x0 + j dx) for integer n >= 0 and dx >= 0, exactly."""
        if n <= 0:
            return 0.0
        if dx < 0:
            raise ValueError(f"sum_arithmetic needs dx >= 0, got {dx}")
        if dx == 0:
            return n * self(x0)
        total = 0.0
        j = 0
        first = bisect_right(self._starts, x0) - 1
        for p in range(first, len(self._pieces)):
            _, slope, intercept = self._pieces[p]
            if p + 1 < len(self._pieces):
                # Last j whose x stays below the next piece's start (the curve is continuous,
                # so which side an exact breakpoint falls on does not change the sum).
                end = min(n, max(j, math.ceil((self._starts[p + 1] - x0) / dx)))
            else:
                end = n
            count = end - j
            if count > 0:
                sum_x = count * x0 + dx * (j + end - 1) * count / 2
                total += slope * sum_x + intercept * count
                j = end
            if j >= n:
                break
        return total


class CurvesByBatchSize:
    """t(B, x) from measured rows (B, x, t): piecewise linear in x at each measured B, linear
    in B between measured batch sizes. Below the smallest measured B it uses that B's curve;
    above the largest it extends the two largest linearly (one measured B: no B dependence).
    """

    def __init__(self, rows: Sequence[tuple[int, float, float]], what: str):
        if not rows:
            raise ValueError(f"{what}: no measured rows")
        by_batch: dict[int, list[tuple[float, float]]] = {}
        for batch_size, x, t in rows:
            if batch_size < 1 or x < 0 or not t >= 0:
                raise ValueError(f"{what}: bad row (B={batch_size}, tokens={x}, seconds={t}); need "
                                 f"B >= 1, tokens >= 0, seconds >= 0")
            by_batch.setdefault(int(batch_size), []).append((float(x), float(t)))
        self.batch_sizes = sorted(by_batch)
        self.curves = []
        for b in self.batch_sizes:
            points = sorted(by_batch[b])
            xs = [p[0] for p in points]
            if len(set(xs)) != len(xs):
                raise ValueError(f"{what}: B={b} has two rows with the same token count")
            self.curves.append(PiecewiseLinear(xs, [p[1] for p in points]))

    def _weights(self, batch_size: float) -> list[tuple[PiecewiseLinear, float]]:
        sizes = self.batch_sizes
        if len(sizes) == 1 or batch_size <= sizes[0]:
            return [(self.curves[0] if batch_size <= sizes[0] else self.curves[-1], 1.0)]
        i = min(bisect_right(sizes, batch_size), len(sizes) - 1)
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch_size - lo) / (hi - lo)  # > 1 beyond the largest measured B
        return [(self.curves[i - 1], 1.0 - w), (self.curves[i], w)]

    def value(self, batch_size: float, x: float) -> float:
        return sum(w * curve(x) for curve, w in self._weights(batch_size))

    def sum_arithmetic(self, batch_size: float, x0: float, dx: float, n: int) -> float:
        """sum_{j<n} value(batch_size, x0 + j dx), exactly."""
        return sum(w * curve.sum_arithmetic(x0, dx, n) for curve, w in self._weights(batch_size))
