"""Closed forms of multi-bin batching (arXiv 2412.04504, Guldogan et al., 2024).

Model: static batches of B requests; a batch's service time is its longest member's length
(one time unit per token); throughput is requests per time unit. Lengths are real-valued.

- Theorem 4.2 (lengths U[l_min, l_max], k equal-mass bins, saturated queue):
  ``T_k = B / ((l_max + l_min)/2 + D/k)`` with
  ``D = B/(B+1) l_max + 1/(B+1) l_min - (l_max + l_min)/2``; limit ``c_max = 2B/(l_max + l_min)``.
- Theorem 4.3: ``c_max - eps`` needs the smallest integer
  ``k >= (c_max - eps) D / (eps (l_max + l_min)/2)``.
- Lemma 5.1 (Poisson arrivals at rate lambda, infinite servers, a lower bound):
  ``E[latency] = E[t_service,k] + (B-1) k / (2 lambda)``.
- Lemma A.1 (lengths Exp(mu)): ``E[t_service,k] <= sum_{i<k} P(bin=i) l_i +
  P(bin=k) (l_{k-1} + H_B/mu)``, minimised by ``l_i = (1/mu) sum_{j=1..i} log L_{k-j}`` with
  ``L_1 = H_B``, ``L_m = 1 + log L_{m-1}``; the minimum is ``L_k / mu``.
"""

from __future__ import annotations

import math


def _check_uniform(batch_size: int, l_min: float, l_max: float) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= l_min <= l_max:
        raise ValueError(f"need 0 <= l_min <= l_max, got l_min={l_min}, l_max={l_max}")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"the number of bins k must be >= 1, got {k}")


def uniform_gap(batch_size: int, l_min: float, l_max: float) -> float:
    """Theorem 4.2's D: how far one bin's expected batch maximum sits above the mean length."""
    _check_uniform(batch_size, l_min, l_max)
    b = batch_size
    return b / (b + 1) * l_max + 1 / (b + 1) * l_min - (l_max + l_min) / 2


def uniform_service_time(k: int, batch_size: int, l_min: float, l_max: float) -> float:
    """Expected batch service time with k equal-mass bins over U[l_min, l_max]:
    ``(l_max + l_min)/2 + D/k``."""
    _check_k(k)
    return (l_max + l_min) / 2 + uniform_gap(batch_size, l_min, l_max) / k


def uniform_throughput(k: int, batch_size: int, l_min: float, l_max: float) -> float:
    """Theorem 4.2's T_k in requests per time unit (B=128, U[1,20]: 6.447 for k=1)."""
    return batch_size / uniform_service_time(k, batch_size, l_min, l_max)


def uniform_throughput_limit(batch_size: int, l_min: float, l_max: float) -> float:
    """c_max = 2B / (l_max + l_min), the k -> infinity limit of T_k."""
    _check_uniform(batch_size, l_min, l_max)
    if l_max + l_min == 0:
        raise ValueError("c_max is unbounded when l_min = l_max = 0")
    return 2 * batch_size / (l_max + l_min)


def bins_needed(epsilon: float, batch_size: int, l_min: float, l_max: float) -> int:
    """Theorem 4.3: the fewest bins whose T_k reaches c_max - epsilon (0 < epsilon < c_max)."""
    c_max = uniform_throughput_limit(batch_size, l_min, l_max)
    if not 0 < epsilon < c_max:
        raise ValueError(f"epsilon must be in (0, c_max={c_max:.6g}), got {epsilon}")
    mean = (l_max + l_min) / 2
    bound = (c_max - epsilon) * uniform_gap(batch_size, l_min, l_max) / (epsilon * mean)
    # Round away float noise before ceil: an exact integer bound must not become bound + 1.
    return max(1, math.ceil(round(bound, 9)))


def latency_lower_bound(k: int, batch_size: int, arrival_rate: float,
                        service_time: float) -> float:
    """Lemma 5.1: ``service_time + (B-1) k / (2 arrival_rate)`` (equal-mass bins, Poisson arrivals).

    ``service_time`` is E[t_service,k], e.g. ``uniform_service_time(k, B, l_min, l_max)``.
    The lemma's latency ends with the batch (its longest member). The simulator and the engine
    return each request at its own last token, so their mean latency may fall below this.
    """
    _check_k(k)
    if arrival_rate <= 0:
        raise ValueError(f"arrival_rate must be > 0, got {arrival_rate}")
    return service_time + (batch_size - 1) * k / (2 * arrival_rate)


def harmonic(n: int) -> float:
    """H_n = 1 + 1/2 + ... + 1/n; H_B/mu is the expected maximum of B Exp(mu) lengths."""
    if n < 1:
        raise ValueError(f"harmonic number needs n >= 1, got {n}")
    return math.fsum(1 / i for i in range(1, n + 1))


def _exponential_levels(k: int, batch_size: int) -> list[float]:
    """[L_1, ..., L_k] with L_1 = H_B and L_m = 1 + log L_{m-1}."""
    levels = [harmonic(batch_size)]
    for _ in range(k - 1):
        levels.append(1 + math.log(levels[-1]))
    return levels


def exponential_optimal_edges(k: int, mean: float, batch_size: int) -> list[float]:
    """Lemma A.1's optimal inner edges l_1..l_{k-1} for lengths Exp(1/mean).

    ``l_i = mean * sum_{j=1..i} log L_{k-j}``. Needs H_B > 1 (B >= 2) so that every log is
    positive; for B = 1 every batch is one request and all edges would be 0.
    """
    _check_k(k)
    if mean <= 0:
        raise ValueError(f"mean length must be > 0, got {mean}")
    if batch_size < 2:
        raise ValueError(f"exponential edges need batch_size >= 2, got {batch_size}")
    levels = _exponential_levels(k, batch_size)
    edges, total = [], 0.0
    for i in range(1, k):
        total += math.log(levels[k - i - 1])  # L_{k-i}, levels is 0-indexed
        edges.append(mean * total)
    return edges


def exponential_service_bound(edges: list[float], mean: float, batch_size: int) -> float:
    """Lemma A.1's bound on E[t_service,k] for the given inner edges and lengths Exp(1/mean).

    Bins below the last are bounded by their upper edge; the last (open) bin by its lower
    edge plus the expected maximum of B exponentials, H_B * mean (memorylessness).
    """
    if mean <= 0:
        raise ValueError(f"mean length must be > 0, got {mean}")
    if any(b < a for a, b in zip(edges, edges[1:])) or any(e < 0 for e in edges):
        raise ValueError(f"edges must be non-negative and non-decreasing, got {edges}")
    cdf = lambda x: 1 - math.exp(-x / mean)
    bound, lower = 0.0, 0.0
    for edge in edges:
        bound += (cdf(edge) - cdf(lower)) * edge
        lower = edge
    return bound + (1 - cdf(lower)) * (lower + harmonic(batch_size) * mean)


def exponential_throughput_bound(k: int, mean: float, batch_size: int) -> float:
    """Lower bound on throughput with the optimal exponential edges: B / (L_k * mean)."""
    _check_k(k)
    if mean <= 0:
        raise ValueError(f"mean length must be > 0, got {mean}")
    return batch_size / (_exponential_levels(k, batch_size)[-1] * mean)
