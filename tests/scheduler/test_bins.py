import math
import random

import pytest

from scheduler import theory
from scheduler.bins import (AdaptiveEdges, BinEdges, equal_mass_edges, equal_width_edges,
                            explicit_edges, exponential_edges)


def test_bin_of_lower_edge_inclusive_upper_exclusive():
    edges = explicit_edges([10, 20.5, 40], max_len=100)
    assert edges.k == 4
    cases = {0: 0, 9.999: 0, 10: 1, 20: 1, 20.5: 2, 39.9: 2, 40: 3, 100: 3}
    for length, expected in cases.items():
        assert edges.bin_of(length) == expected, length
    assert [edges.upper(i) for i in range(4)] == [10, 21, 40, 100]
    assert [edges.lower(i) for i in range(4)] == [0, 10, 20.5, 40]


def test_every_length_fits_its_bins_upper_bound():
    rng = random.Random(1)
    edges = equal_mass_edges([rng.uniform(1, 500) for _ in range(1000)], 6, max_len=500)
    for _ in range(5000):
        length = rng.choice([rng.uniform(0, 500), rng.randint(1, 500)])
        assert length <= edges.upper(edges.bin_of(length))


def test_single_bin_is_open_up_to_max_len():
    edges = BinEdges((), 64)
    assert edges.k == 1 and edges.bin_of(64) == 0 and edges.upper(0) == 64


def test_bad_edges_are_refused():
    with pytest.raises(ValueError, match="non-decreasing"):
        BinEdges((5, 3), 10)
    with pytest.raises(ValueError, match="lie in"):
        BinEdges((5, 30), 10)
    with pytest.raises(ValueError, match="lie in"):
        BinEdges((math.nan,), 10)
    with pytest.raises(ValueError, match="max_len"):
        BinEdges((), 0)
    with pytest.raises(IndexError, match="out of range"):
        BinEdges((5,), 10).upper(2)


def test_equal_width_edges():
    edges = equal_width_edges(5, 1, 20)
    assert edges.boundaries == pytest.approx((4.8, 8.6, 12.4, 16.2))
    assert edges.max_len == 20


def test_equal_mass_puts_the_same_share_of_the_sample_in_each_bin():
    rng = random.Random(7)
    sample = [rng.lognormvariate(5, 1) for _ in range(10007)]
    k = 7
    edges = equal_mass_edges(sample, k, max_len=10 ** 6)
    counts = [0] * k
    for v in sample:
        counts[edges.bin_of(v)] += 1
    assert max(abs(c - len(sample) / k) for c in counts) <= 1.5


def test_equal_mass_of_uniform_sample_is_nearly_equal_width():
    rng = random.Random(3)
    edges = equal_mass_edges([rng.uniform(1, 20) for _ in range(50000)], 4, 20)
    assert edges.boundaries == pytest.approx(equal_width_edges(4, 1, 20).boundaries, rel=0.01)


def test_equal_mass_with_few_distinct_values_keeps_k_bins():
    edges = equal_mass_edges([3] * 50 + [7] * 50, 4, 10)
    assert edges.k == 4
    assert edges.boundaries == (3, 5, 7)  # a value equal to an edge belongs to the bin above
    assert edges.bin_of(3) == 1 and edges.bin_of(7) == 3


def test_exponential_edges_follow_the_formula():
    mean, b, k = 100.0, 8, 4
    edges = exponential_edges(k, mean, b, max_len=5000)
    levels = [theory.harmonic(b)]
    for _ in range(k - 1):
        levels.append(1 + math.log(levels[-1]))
    expected = [mean * sum(math.log(levels[k - j - 1]) for j in range(1, i + 1))
                for i in range(1, k)]
    assert list(edges.boundaries) == pytest.approx(expected)
    with pytest.raises(ValueError, match="exceed max_len"):
        exponential_edges(k, mean, b, max_len=100)


def test_adaptive_edges_start_from_the_prior_then_follow_recent_lengths():
    edges = AdaptiveEdges(4, max_len=1000, window=400, min_samples=200, refresh_every=100)
    assert edges.boundaries == equal_width_edges(4, 1, 1000).boundaries
    rng = random.Random(0)
    for _ in range(199):
        edges.observe(rng.uniform(1, 100))
    assert edges.refreshes == 0
    assert edges.boundaries == equal_width_edges(4, 1, 1000).boundaries
    edges.observe(50.0)
    assert edges.refreshes == 1
    assert max(edges.boundaries) < 100
    # The window is bounded: after 400 long lengths the short ones are forgotten.
    for _ in range(400):
        edges.observe(rng.uniform(500, 900))
    assert min(edges.boundaries) > 500
    assert edges.upper(3) == 1000 and edges.k == 4
    assert edges.bin_of(600) == edges.current.bin_of(600)
