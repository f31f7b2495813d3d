"""Synthetic workloads: output-length distributions, prompt lengths and arrival times.

Length specs (command line): ``uniform:LO:HI`` (real-valued), ``exponential:MEAN[:CAP]``,
``lognormal:MEDIAN:P99:CAP``, ``fixed:N``, ``file:PATH`` (one length per line).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from scheduler.bins import quantile
from scheduler.types import Request

_Z99 = NormalDist().inv_cdf(0.99)


@dataclass(frozen=True)
class Uniform:
    """Real-valued lengths U[lo, hi]."""

    lo: float
    hi: float

    def __post_init__(self):
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"uniform lengths need 0 <= lo <= hi, got {self.lo}, {self.hi}")

    @property
    def upper(self) -> float:
        return self.hi

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.lo, self.hi)

    def quantile(self, p: float) -> float:
        return self.lo + p * (self.hi - self.lo)


@dataclass(frozen=True)
class Exponential:
    """Exp(1/mean) lengths, capped at ``cap`` (default: the 1 - 1e-6 quantile)."""

    mean: float
    cap: float | None = None

    def __post_init__(self):
        if self.mean <= 0 or (self.cap is not None and self.cap <= 0):
            raise ValueError(f"exponential lengths need mean > 0 and cap > 0, got {self}")

    @property
    def upper(self) -> float:
        return self.cap if self.cap is not None else self.mean * math.log(1e6)

    def sample(self, rng: random.Random) -> float:
        return min(rng.expovariate(1 / self.mean), self.upper)

    def quantile(self, p: float) -> float:
        return self.upper if p >= 1 else min(-self.mean * math.log(1 - p), self.upper)


@dataclass(frozen=True)
class LogNormal:
    """Lognormal lengths with the given median and 99th percentile, clamped to [1, cap]."""

    median: float
    p99: float
    cap: float

    def __post_init__(self):
        if not 0 < self.median < self.p99 or self.cap < 1:
            raise ValueError(f"lognormal lengths need 0 < median < p99 and cap >= 1, got {self}")

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / _Z99

    @property
    def upper(self) -> float:
        return self.cap

    def sample(self, rng: random.Random) -> float:
        return min(max(1.0, rng.lognormvariate(math.log(self.median), self.sigma)), self.cap)

    def quantile(self, p: float) -> float:
        if p <= 0:
            return 1.0
        if p >= 1:
            return self.cap
        z = NormalDist().inv_cdf(p)
        return min(max(1.0, self.median * math.exp(self.sigma * z)), self.cap)


@dataclass(frozen=True)
class Fixed:
    """Every length equal to ``value``."""

    value: float

    @property
    def upper(self) -> float:
        return self.value

    def sample(self, rng: random.Random) -> float:
        return self.value

    def quantile(self, p: float) -> float:
        return self.value


@dataclass(frozen=True)
class Empirical:
    """Lengths drawn (with replacement) from measured values."""

    values: tuple[float, ...]

    def __post_init__(self):
        if not self.values or min(self.values) < 0:
            raise ValueError("empirical lengths need at least one value, all >= 0")
        object.__setattr__(self, "values", tuple(sorted(self.values)))

    @property
    def upper(self) -> float:
        return self.values[-1]

    def sample(self, rng: random.Random) -> float:
        return rng.choice(self.values)

    def quantile(self, p: float) -> float:
        return quantile(self.values, p)


LengthDistribution = Uniform | Exponential | LogNormal | Fixed | Empirical


def parse_lengths(spec: str) -> LengthDistribution:
    """A length distribution from its spec (see the module docstring)."""
    name, _, rest = spec.partition(":")
    if name == "file":
        path = Path(rest)
        if not path.is_file():
            raise ValueError(f"length file {rest!r} does not exist")
        try:
            values = [float(line) for line in path.read_text().split()]
        except ValueError:
            raise ValueError(f"length file {rest!r} must hold one number per line") from None
        return Empirical(tuple(values))
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"length spec {spec!r}: the parameters must be numbers") from None
    shapes = {"uniform": (Uniform, (2,)), "exponential": (Exponential, (1, 2)),
              "lognormal": (LogNormal, (3,)), "fixed": (Fixed, (1,))}
    if name not in shapes or len(args) not in shapes[name][1]:
        raise ValueError(f"bad length spec {spec!r}; expected uniform:LO:HI, exponential:MEAN[:CAP], "
                         f"lognormal:MEDIAN:P99:CAP, fixed:N or file:PATH")
    return shapes[name][0](*args)


@dataclass
class Workload:
    """A list of requests with hidden true output lengths.

    Request i has id ``f"r{i}"``, arrives at ``arrival_times[i]``, has ``prompt_lens[i]`` prompt
    tokens and ``output_lens[i]`` true new tokens (never shown to the scheduler); every
    request's ``max_tokens`` is ``max_tokens``.
    """

    arrival_times: list[float]
    prompt_lens: list[int]
    output_lens: list[float]
    max_tokens: int

    def __post_init__(self):
        n = len(self.arrival_times)
        if not len(self.prompt_lens) == len(self.output_lens) == n:
            raise ValueError(f"workload lists differ in length: {n} arrivals, "
                             f"{len(self.prompt_lens)} prompts, {len(self.output_lens)} outputs")
        if any(b < a for a, b in zip(self.arrival_times, self.arrival_times[1:])):
            raise ValueError("workload arrival times must be non-decreasing")
        if self.output_lens and not 0 <= min(self.output_lens) <= max(self.output_lens) <= self.max_tokens:
            raise ValueError(f"true output lengths must lie in [0, max_tokens={self.max_tokens}]")

    def __len__(self) -> int:
        return len(self.arrival_times)

    @staticmethod
    def request_id(i: int) -> str:
        return f"r{i}"

    def request(self, i: int) -> Request:
        """A fresh ``Request`` for entry i (the true length stays hidden)."""
        return Request(f"r{i}", self.prompt_lens[i], self.max_tokens, self.arrival_times[i])

    def true_lengths(self) -> dict[str, float]:
        """{request_id: true output length}, for oracle and error-model predictors."""
        return {f"r{i}": length for i, length in enumerate(self.output_lens)}

    @property
    def is_integer(self) -> bool:
        return all(float(v).is_integer() for v in self.output_lens)


def make_workload(n: int, lengths: LengthDistribution, *, prompts: LengthDistribution = Fixed(0),
                  arrival_rate: float | None = None, max_tokens: int | None = None,
                  integer: bool = False, seed: int = 0) -> Workload:
    """``n`` requests: lengths and prompts drawn from their distributions, arrivals all at time 0
    (``arrival_rate`` None) or Poisson at ``arrival_rate`` per time unit.

    ``integer`` rounds output lengths up to whole tokens (at least 1). Prompt lengths are
    always rounded up. ``max_tokens`` defaults to ceil(lengths.upper).
    """
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if arrival_rate is not None and arrival_rate <= 0:
        raise ValueError(f"arrival_rate must be > 0, got {arrival_rate}")
    cap = math.ceil(lengths.upper) if max_tokens is None else max_tokens
    rng_len = random.Random(f"{seed}:lengths")
    rng_prompt = random.Random(f"{seed}:prompts")
    rng_arrival = random.Random(f"{seed}:arrivals")
    outputs = [lengths.sample(rng_len) for _ in range(n)]
    if integer:
        outputs = [max(1, math.ceil(v)) for v in outputs]
    outputs = [min(v, cap) for v in outputs]
    prompt_lens = [math.ceil(prompts.sample(rng_prompt)) for _ in range(n)]
    if arrival_rate is None:
        arrivals = [0.0] * n
    else:
        t, arrivals = 0.0, []
        for _ in range(n):
            t += rng_arrival.expovariate(arrival_rate)
            arrivals.append(t)
    return Workload(arrivals, prompt_lens, outputs, cap)
