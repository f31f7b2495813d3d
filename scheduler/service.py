"""Service-time models for the simulator.

A model answers, for a slab of B rows: how long one decode step takes with ``live_tokens``
KV tokens in its live rows, the sum of that over a run of steps in which the live tokens grow
by a fixed amount per step, how many steps fit in a duration, and how long a prefill of
``prompt_tokens`` (summed over the rows being prefilled) takes. ``StepTimeTable`` (schemas.py)
is the measured model; ``LinearServiceModel`` is the analytic one. ``integer_steps`` says
whether output lengths must be whole tokens (a measured table) or may be real numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


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
