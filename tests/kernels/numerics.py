"""How the kernel tests compare a kernel's output with its reference."""

from __future__ import annotations

import torch


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||, computed in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
