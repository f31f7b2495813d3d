"""Output-length predictors: ``predict(request) -> length`` and ``observe(request, true_len)``.

A prediction is the request's total number of new tokens, counted from its original prompt
(the same unit as ``max_tokens``); the scheduler bins on it. Lengths may be real numbers (the
paper's model) or integers (tokens). Predictors that need true lengths (oracle and the
synthetic error models) get them from the benchmark as a ``{request_id: true_len}`` map: the
engine never reveals them.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping, Protocol, Sequence

from scheduler.bins import BinEdges, quantile
from scheduler.types import Request


class Predictor(Protocol):
    def predict(self, request: Request) -> float: ...

    def observe(self, request: Request, true_len: float) -> None: ...


def _true_length(true_lengths: Mapping[str, float], request: Request) -> float:
    try:
        return true_lengths[request.request_id]
    except KeyError:
        raise ValueError(f"no true length for request {request.request_id!r} in the map "
                         f"given to the predictor") from None


def keyed_uniform(seed: int, request_id: str) -> float:
    """A number in (0, 1) that depends only on (seed, request_id), uniform over requests.

    The error models draw from it instead of from a stream, so a request is mispredicted the
    same way wherever it runs: in the engine (which also predicts for its warm-up requests)
    and in the simulator, whatever the order of the calls, and again when it is re-predicted
    after an overflow.
    """
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    # 53 bits: (n + 0.5) / 2**53 is exact in a double, so it never rounds to 0 or 1.
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) / 2**53


_STANDARD_NORMAL = NormalDist()


class OraclePredictor:
    """Predicts the true length exactly."""

    def __init__(self, true_lengths: Mapping[str, float]):
        self.true_lengths = true_lengths

    def predict(self, request: Request) -> float:
        try:
            return self.true_lengths[request.request_id]
        except KeyError:
            return _true_length(self.true_lengths, request)  # raises the explanatory error

    def observe(self, request: Request, true_len: float) -> None:
        pass


class BinErrorPredictor:
    """The paper's bin-error model: the true bin i is predicted as i-1 or as i+1 with
    probability ``p_error`` each; the first and last bins flip to their one neighbour with
    probability ``p_error``.

    A correct bin predicts the true length; a wrong bin j predicts the midpoint of bin j
    (for the last bin, of [l_{k-1}, max_len]). ``edges`` may be ``BinEdges`` or ``AdaptiveEdges``
    (read at each call). Each request's draw is ``keyed_uniform(seed, request_id)``: the same
    request gets the same prediction in any order of calls.
    """

    def __init__(self, true_lengths: Mapping[str, float], edges, p_error: float, seed: int = 0):
        if not 0 <= p_error <= 0.5:
            raise ValueError(f"bin-error probability must be in [0, 0.5], got {p_error}")
        self.true_lengths = true_lengths
        self.edges = edges
        self.p_error = p_error
        self.seed = seed

    def predict(self, request: Request) -> float:
        true_len = _true_length(self.true_lengths, request)
        edges = self.edges
        true_bin = edges.bin_of(true_len)
        last = edges.k - 1
        u = self.draw(request)
        if last == 0 or u >= (self.p_error if true_bin in (0, last) else 2 * self.p_error):
            return true_len
        if true_bin == 0:
            wrong = 1
        elif true_bin == last:
            wrong = last - 1
        else:
            wrong = true_bin - 1 if u < self.p_error else true_bin + 1
        top = edges.max_len if wrong == last else edges.boundaries[wrong]
        return (edges.lower(wrong) + top) / 2

    def draw(self, request: Request) -> float:
        """The uniform number in (0, 1) that decides the request's prediction."""
        return keyed_uniform(self.seed, request.request_id)

    def observe(self, request: Request, true_len: float) -> None:
        pass


class LognormalErrorPredictor:
    """Multiplicative error: ``true_len * exp(N(0, sigma^2))`` (median-unbiased); the normal
    draw of a request is keyed by (seed, request_id) as in ``BinErrorPredictor``."""

    def __init__(self, true_lengths: Mapping[str, float], sigma: float, seed: int = 0):
        if sigma < 0:
            raise ValueError(f"lognormal sigma must be >= 0, got {sigma}")
        self.true_lengths = true_lengths
        self.sigma = sigma
        self.seed = seed

    def predict(self, request: Request) -> float:
        z = _STANDARD_NORMAL.inv_cdf(keyed_uniform(self.seed, request.request_id))
        return _true_length(self.true_lengths, request) * math.exp(self.sigma * z)

    def observe(self, request: Request, true_len: float) -> None:
        pass


class MaxTokensPredictor:
    """Predicts the client's cap: every request lands in the bin of its ``max_tokens``."""

    def predict(self, request: Request) -> float:
        return request.max_tokens

    def observe(self, request: Request, true_len: float) -> None:
        pass


class HintPredictor:
    """Uses the client's hint (``request.hint``) when present, else ``fallback``."""

    def __init__(self, fallback: Predictor | None = None):
        self.fallback = fallback if fallback is not None else MaxTokensPredictor()

    def predict(self, request: Request) -> float:
        return request.hint if request.hint is not None else self.fallback.predict(request)

    def observe(self, request: Request, true_len: float) -> None:
        self.fallback.observe(request, true_len)


class OnlineQuantilePredictor:
    """Learns from completed requests: the ``q``-quantile of recent output lengths among
    requests whose original prompt length falls in the same power-of-two bucket.

    A bucket with fewer than ``min_samples`` completions uses the quantile over all recent
    completions; before ``min_samples`` completions in all, it uses ``fallback``. Each bucket's
    quantile is re-sorted at most once per ``refresh_every`` new observations, so a prediction
    costs O(1) on average.
    """

    def __init__(self, q: float = 0.5, window: int = 1024, min_samples: int = 32,
                 refresh_every: int = 32, fallback: Predictor | None = None):
        if not 0 <= q <= 1:
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        if not 1 <= min_samples <= window:
            raise ValueError(f"need 1 <= min_samples <= window, got {min_samples}, {window}")
        self.q = q
        self.window = window
        self.min_samples = min_samples
        self.refresh_every = max(1, refresh_every)
        self.fallback = fallback if fallback is not None else MaxTokensPredictor()
        self._recent: dict[int | None, deque[float]] = {}
        self._cached: dict[int | None, tuple[int, float]] = {}  # key -> (observations, quantile)
        self._observed: dict[int | None, int] = {}

    @staticmethod
    def _bucket(request: Request) -> int:
        # A re-queued overflow carries its generated tokens in prompt_len; bucket on the original.
        return max(0, request.prompt_len - request.generated).bit_length()

    def _quantile(self, key: int | None) -> float | None:
        recent = self._recent.get(key)
        if recent is None or len(recent) < self.min_samples:
            return None
        seen = self._observed[key]
        cached = self._cached.get(key)
        if cached is None or seen - cached[0] >= self.refresh_every:
            cached = (seen, quantile(sorted(recent), self.q))
            self._cached[key] = cached
        return cached[1]

    def predict(self, request: Request) -> float:
        value = self._quantile(self._bucket(request))
        if value is None:
            value = self._quantile(None)
        if value is None:
            return self.fallback.predict(request)
        return min(value, request.max_tokens)

    def observe(self, request: Request, true_len: float) -> None:
        for key in (self._bucket(request), None):
            if key not in self._recent:
                self._recent[key] = deque(maxlen=self.window)
                self._observed[key] = 0
            self._recent[key].append(float(true_len))
            self._observed[key] += 1
        self.fallback.observe(request, true_len)


@dataclass
class BinAccuracy:
    """The paper's Table 1 measures: share of requests put in their true bin, and within one."""

    n: int
    exact: float
    within_one: float


def bin_accuracy(true_lengths: Sequence[float], predicted_lengths: Sequence[float],
                 edges: BinEdges) -> BinAccuracy:
    """Bin accuracy of predictions against true lengths under ``edges``."""
    if len(true_lengths) != len(predicted_lengths):
        raise ValueError(f"{len(true_lengths)} true lengths but {len(predicted_lengths)} predictions")
    if not true_lengths:
        raise ValueError("bin_accuracy needs at least one request")
    exact = within = 0
    for t, p in zip(true_lengths, predicted_lengths):
        gap = abs(edges.bin_of(t) - edges.bin_of(p))
        exact += gap == 0
        within += gap <= 1
    n = len(true_lengths)
    return BinAccuracy(n=n, exact=exact / n, within_one=within / n)


def predictor_from_spec(spec: str, *, true_lengths: Mapping[str, float] | None = None,
                        edges=None, seed: int = 0) -> Predictor:
    """Build a predictor from a command-line spec.

    Specs: ``oracle``, ``bin-error:P``, ``lognormal:SIGMA``, ``max-tokens``, ``online`` or
    ``online:Q``, ``hint`` or ``hint:FALLBACK_SPEC``. ``oracle``, ``bin-error`` and ``lognormal``
    need ``true_lengths``; ``bin-error`` also needs ``edges``.
    """
    name, _, arg = spec.partition(":")

    def need_lengths() -> Mapping[str, float]:
        if true_lengths is None:
            raise ValueError(f"predictor {spec!r} needs the benchmark's true lengths")
        return true_lengths

    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"predictor {spec!r}: {text!r} is not a number") from None

    if name == "oracle" and not arg:
        return OraclePredictor(need_lengths())
    if name == "bin-error" and arg:
        if edges is None:
            raise ValueError(f"predictor {spec!r} needs the bin edges")
        return BinErrorPredictor(need_lengths(), edges, number(arg), seed)
    if name == "lognormal" and arg:
        return LognormalErrorPredictor(need_lengths(), number(arg), seed)
    if name == "max-tokens" and not arg:
        return MaxTokensPredictor()
    if name == "online":
        return OnlineQuantilePredictor(q=number(arg)) if arg else OnlineQuantilePredictor()
    if name == "hint":
        fallback = predictor_from_spec(arg, true_lengths=true_lengths, edges=edges, seed=seed) \
            if arg else MaxTokensPredictor()
        return HintPredictor(fallback)
    raise ValueError(f"unknown predictor {spec!r}; expected oracle, bin-error:P, lognormal:SIGMA, "
                     f"max-tokens, online[:Q] or hint[:FALLBACK]")
