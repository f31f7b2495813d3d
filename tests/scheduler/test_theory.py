import math

import pytest

from scheduler import theory

PUBLISHED_T = [6.447, 8.434, 9.400, 9.970, 10.347]  # arXiv 2412.04504, B=128, U[1, 20]


def test_theorem_4_2_reproduces_the_published_numbers():
    for k, published in enumerate(PUBLISHED_T, start=1):
        assert round(theory.uniform_throughput(k, 128, 1, 20), 3) == published
    assert round(theory.uniform_throughput_limit(128, 1, 20), 2) == 12.19


def test_theorem_4_2_by_hand():
    # D = 128/129 * 20 + 1/129 - 10.5
    d = 128 / 129 * 20 + 1 / 129 - 10.5
    assert theory.uniform_gap(128, 1, 20) == pytest.approx(d, rel=1e-12)
    assert theory.uniform_service_time(3, 128, 1, 20) == pytest.approx(10.5 + d / 3, rel=1e-12)
    # One request per batch: the batch maximum is the mean length, so bins cannot help.
    for k in (1, 4):
        assert theory.uniform_throughput(k, 1, 1, 20) == pytest.approx(1 / 10.5, rel=1e-12)


def test_design_gains_for_b8_u1_1024():
    t1 = theory.uniform_throughput(1, 8, 1, 1024)
    gains = [round(100 * (theory.uniform_throughput(k, 8, 1, 1024) / t1 - 1))
             for k in (2, 4, 8, 16, 32)]
    assert gains == [28, 49, 62, 69, 73]


def test_throughput_increases_with_k_towards_c_max():
    c_max = theory.uniform_throughput_limit(64, 3, 700)
    values = [theory.uniform_throughput(k, 64, 3, 700) for k in range(1, 200)]
    assert all(a < b < c_max for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(c_max, rel=0.01)


def test_theorem_4_3_by_hand():
    # B=128, U[1,20], eps=1: (c_max - 1) * D / (1 * 10.5) = 9.968 -> 10 bins.
    c_max, d = 256 / 21, 128 / 129 * 20 + 1 / 129 - 10.5
    assert (c_max - 1) * d / 10.5 == pytest.approx(9.968, abs=1e-3)
    assert theory.bins_needed(1.0, 128, 1, 20) == 10
    assert theory.uniform_throughput(10, 128, 1, 20) >= c_max - 1
    assert theory.uniform_throughput(9, 128, 1, 20) < c_max - 1


@pytest.mark.parametrize("eps_share", [0.004, 0.02, 0.1, 0.3, 0.8])
@pytest.mark.parametrize("batch_size, lo, hi", [(128, 1, 20), (8, 1, 1024), (32, 10, 50)])
def test_theorem_4_3_is_the_fewest_bins(eps_share, batch_size, lo, hi):
    c_max = theory.uniform_throughput_limit(batch_size, lo, hi)
    eps = eps_share * c_max
    k = theory.bins_needed(eps, batch_size, lo, hi)
    assert theory.uniform_throughput(k, batch_size, lo, hi) >= c_max - eps - 1e-12
    if k > 1:
        assert theory.uniform_throughput(k - 1, batch_size, lo, hi) < c_max - eps


def test_lemma_5_1_by_hand():
    # 15 + (128 - 1) * 2 / (2 * 4) = 46.75
    assert theory.latency_lower_bound(2, 128, 4.0, 15.0) == pytest.approx(46.75)
    service = theory.uniform_service_time(3, 128, 1, 20)
    assert theory.latency_lower_bound(3, 128, 2.0, service) == pytest.approx(
        service + 127 * 3 / 4)


def test_harmonic():
    assert theory.harmonic(1) == 1
    assert theory.harmonic(4) == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 4)


def test_exponential_edges_by_hand():
    mean, b = 3.0, 8
    h = 1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5 + 1 / 6 + 1 / 7 + 1 / 8
    assert theory.exponential_optimal_edges(1, mean, b) == []
    assert theory.exponential_optimal_edges(2, mean, b) == pytest.approx([mean * math.log(h)])
    l2 = 1 + math.log(h)
    assert theory.exponential_optimal_edges(3, mean, b) == pytest.approx(
        [mean * math.log(l2), mean * (math.log(l2) + math.log(h))])
    l3 = 1 + math.log(l2)
    assert theory.exponential_throughput_bound(3, mean, b) == pytest.approx(b / (l3 * mean))


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_exponential_edges_minimise_the_bound(k):
    mean, b = 50.0, 16
    edges = theory.exponential_optimal_edges(k, mean, b)
    best = theory.exponential_service_bound(edges, mean, b)
    # The minimum is L_k * mean, i.e. B / (the throughput bound).
    assert best == pytest.approx(b / theory.exponential_throughput_bound(k, mean, b), rel=1e-9)
    for i in range(len(edges)):
        for delta in (-0.05 * mean, 0.05 * mean):
            moved = list(edges)
            moved[i] += delta
            if all(x <= y for x, y in zip(moved, moved[1:])) and moved[0] >= 0:
                assert theory.exponential_service_bound(moved, mean, b) > best


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="k must be >= 1"):
        theory.uniform_throughput(0, 8, 1, 20)
    with pytest.raises(ValueError, match="l_min <= l_max"):
        theory.uniform_throughput(1, 8, 30, 20)
    with pytest.raises(ValueError, match="epsilon"):
        theory.bins_needed(100.0, 128, 1, 20)
    with pytest.raises(ValueError, match="arrival_rate"):
        theory.latency_lower_bound(1, 8, 0.0, 10.0)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        theory.exponential_optimal_edges(3, 1.0, 1)
