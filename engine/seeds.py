"""Request seeds, with no torch import (the HTTP process derives the seeds of ``n > 1``
completions itself)."""

from __future__ import annotations

import random
import secrets

from engine.request import INT64_MAX, INT64_MIN


def draw_seed(rng: random.Random | None = None) -> int:
    """A fresh non-negative int64 seed. The engine calls this when it admits a request whose
    ``SamplingParams.seed`` is None (pass ``rng`` for reproducible runs)."""
    return rng.getrandbits(63) if rng is not None else secrets.randbits(63)


def derive_seed(seed: int, index: int) -> int:
    """Seed of completion ``index`` of a request with ``n > 1``: index 0 keeps ``seed``, the
    others get distinct, well-mixed int64 seeds (splitmix64 finaliser), so the n completions
    do not repeat each other."""
    if not INT64_MIN <= seed <= INT64_MAX:
        raise ValueError(f"seed must be in the int64 range, got {seed}")
    if index == 0:
        return seed
    mask64 = (1 << 64) - 1
    z = (seed + index * 0x9E3779B97F4A7C15) & mask64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
    z ^= z >> 31
    return z - (1 << 64) if z > INT64_MAX else z
