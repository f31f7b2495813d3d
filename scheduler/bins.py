"""Bin edges: which output-length range each of the k bins covers.

Bins are numbered 0..k-1 and bin i holds ``lower(i) <= length < boundaries[i]`` (the paper's
``l_{i-1} <= l < l_i`` with bins numbered from 1 and l_0 = 0); the last bin is open-ended up
to ``max_len`` (the largest ``max_tokens`` the scheduler accepts). Edges are real numbers; a
bin's bound on new tokens, ``upper(i)``, is the integer ``ceil(boundaries[i])`` (``max_len``
for the last bin), so every length below the edge, real or integer, fits.

Edge rules: equal probability mass (the optimum for uniform lengths, Lemma 4.1 of
arXiv 2412.04504), equal width, explicit, the exponential optimum (theory.py), and adaptive
edges re-estimated from recently completed lengths.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from scheduler.theory import exponential_optimal_edges


@dataclass(frozen=True)
class BinEdges:
    """k = len(boundaries) + 1 bins over output lengths; bin i holds
    ``boundaries[i-1] <= length < boundaries[i]`` (0 below the first, max_len above the last).

    Attributes:
        boundaries: the k-1 inner edges, non-decreasing, within [0, max_len].
            Equal neighbours make an empty bin (possible when a sample has few distinct values).
        max_len: the last bin's bound on new tokens (>= 1).
    """

    boundaries: tuple[float, ...]
    max_len: int

    def __post_init__(self):
        edges = tuple(float(e) for e in self.boundaries)
        object.__setattr__(self, "boundaries", edges)
        if int(self.max_len) != self.max_len or self.max_len < 1:
            raise ValueError(f"max_len must be an integer >= 1, got {self.max_len}")
        if any(math.isnan(e) or e < 0 or e > self.max_len for e in edges):
            raise ValueError(f"bin edges must lie in [0, max_len={self.max_len}], got {list(edges)}")
        if any(b < a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bin edges must be non-decreasing, got {list(edges)}")
        uppers = tuple(math.ceil(e) for e in edges) + (int(self.max_len),)
        object.__setattr__(self, "_uppers", uppers)

    @property
    def k(self) -> int:
        return len(self.boundaries) + 1

    def bin_of(self, length: float) -> int:
        """Index of the bin holding ``length``."""
        return bisect_right(self.boundaries, length)

    def lower(self, i: int) -> float:
        """The bin's lower edge, boundaries[i-1] (0 for the first bin)."""
        self._check_bin(i)
        return 0.0 if i == 0 else self.boundaries[i - 1]

    def upper(self, i: int) -> int:
        """The bin's bound on new tokens: ceil(boundaries[i]), or max_len for the last bin."""
        if not 0 <= i < len(self._uppers):
            self._check_bin(i)
        return self._uppers[i]

    def _check_bin(self, i: int) -> None:
        if not 0 <= i <= len(self.boundaries):
            raise IndexError(f"bin {i} out of range for k={self.k} bins")


def explicit_edges(boundaries: Iterable[float], max_len: int) -> BinEdges:
    """Edges given by hand, e.g. ``explicit_edges([64, 256, 1024], max_len=2048)`` (k = 4)."""
    return BinEdges(tuple(boundaries), max_len)


def equal_width_edges(k: int, lo: float, hi: float, max_len: int | None = None) -> BinEdges:
    """k bins of equal width over [lo, hi]; the optimum for lengths U[lo, hi].

    ``max_len`` defaults to ceil(hi).
    """
    if k < 1:
        raise ValueError(f"the number of bins k must be >= 1, got {k}")
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= lo <= hi, got lo={lo}, hi={hi}")
    width = (hi - lo) / k
    return BinEdges(tuple(lo + width * i for i in range(1, k)),
                    math.ceil(hi) if max_len is None else max_len)


def quantile(sorted_values: Sequence[float], p: float) -> float:
    """The p-quantile of already-sorted values, interpolating between order statistics."""
    if not sorted_values:
        raise ValueError("quantile of an empty sample")
    h = (len(sorted_values) - 1) * p
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def equal_mass_edges(sample: Iterable[float], k: int, max_len: int) -> BinEdges:
    """Edges at the sample's i/k quantiles: each bin gets the same share of the sample.

    Lemma 4.1's optimum. Sample values above ``max_len`` are clamped to it.
    """
    if k < 1:
        raise ValueError(f"the number of bins k must be >= 1, got {k}")
    values = sorted(min(float(v), max_len) for v in sample)
    if not values:
        raise ValueError("equal_mass_edges needs a non-empty sample of lengths")
    return BinEdges(tuple(quantile(values, i / k) for i in range(1, k)), max_len)


def exponential_edges(k: int, mean: float, batch_size: int, max_len: int) -> BinEdges:
    """Lemma A.1's optimal edges for lengths Exp(1/mean) and batches of ``batch_size``."""
    edges = exponential_optimal_edges(k, mean, batch_size)
    if edges and edges[-1] > max_len:
        raise ValueError(f"the optimal exponential edges {edges} exceed max_len={max_len}; "
                         f"raise max_len or use fewer bins")
    return BinEdges(tuple(edges), max_len)


class AdaptiveEdges:
    """Equal-mass edges re-estimated from the most recent completed lengths.

    This is what ``--bins K`` means when the length distribution is unknown. At start, before
    ``min_samples`` lengths have been observed, the edges are a prior: equal width over
    [1, max_len]. Afterwards, every ``refresh_every`` observations the edges become the equal-mass
    edges of the last ``window`` lengths. Requests already queued keep the bin they were given.

    Exposes the same reading interface as ``BinEdges`` (``k``, ``max_len``, ``boundaries``,
    ``bin_of``, ``lower``, ``upper``), delegated to ``current``.
    """

    def __init__(self, k: int, max_len: int, window: int = 4096, min_samples: int = 512,
                 refresh_every: int = 256):
        if not 1 <= min_samples <= window:
            raise ValueError(f"need 1 <= min_samples <= window, got min_samples={min_samples}, "
                             f"window={window}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.current = equal_width_edges(k, 1, max_len, max_len)
        self.min_samples = min_samples
        self.refresh_every = refresh_every
        self.refreshes = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._since_refresh = 0

    def observe(self, length: float) -> None:
        """Record one completed request's output length."""
        self._recent.append(min(float(length), self.current.max_len))
        self._since_refresh += 1
        if len(self._recent) >= self.min_samples and self._since_refresh >= self.refresh_every:
            self.current = equal_mass_edges(self._recent, self.current.k, self.current.max_len)
            self._since_refresh = 0
            self.refreshes += 1

    @property
    def k(self) -> int:
        return self.current.k

    @property
    def max_len(self) -> int:
        return self.current.max_len

    @property
    def boundaries(self) -> tuple[float, ...]:
        return self.current.boundaries

    def bin_of(self, length: float) -> int:
        return self.current.bin_of(length)

    def lower(self, i: int) -> float:
        return self.current.lower(i)

    def upper(self, i: int) -> int:
        return self.current.upper(i)
