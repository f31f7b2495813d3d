"""How the kernel tests compare a kernel's output with its reference, and poison what it must not
touch."""

from __future__ import annotations

import torch


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||, computed in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


MARGIN = 2  # NaN columns left of a poisoned view (and MARGIN + 3 right of it)


def weights(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A random [n, k] projection weight scaled by 1 / sqrt(k), so products stay O(1)."""
    return torch.randn(n, k, dtype=dtype) * k ** -0.5


def poisoned_view(m: int, n: int, dtype: torch.dtype,
                  fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a [m, n] view with a wider row stride into a NaN buffer. The view holds
    ``fill`` if given (a residual to add into), else stays NaN (an output to be written)."""
    buffer = torch.full((m, n + 2 * MARGIN + 3), float("nan"), dtype=dtype)
    view = buffer[:, MARGIN:MARGIN + n]
    if fill is not None:
        view.copy_(fill)
    return buffer, view


def assert_margins_untouched(buffer: torch.Tensor, n: int) -> None:
    """Nothing was written beside the view of ``poisoned_view``."""
    assert torch.isnan(buffer[:, :MARGIN]).all() and torch.isnan(buffer[:, MARGIN + n:]).all()
