"""silu_and_mul against the plain-torch reference; outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.activation import silu_and_mul
from tests.kernels.numerics import assert_margins_untouched, poisoned_view, rel_l2

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,inter", [(1, 1), (1, 300), (3, 1100), (17, 1500)])
def test_matches_reference(dtype, T, inter):
    """Covers both block sizes (few tokens and >= 16 tokens) and partial last blocks."""
    x = torch.randn(T, 2 * inter, dtype=dtype) * 4
    buffer, out = poisoned_view(T, inter, dtype)  # NaN columns on both sides of every row
    result = silu_and_mul(x, out=out)
    assert result is out
    assert rel_l2(out, reference.silu_and_mul(x)) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, inter)


def test_strided_rows_and_fresh_output():
    wide = torch.randn(5, 700)
    x = wide[:, 50:650]
    out = silu_and_mul(x)
    assert out.shape == (5, 300) and out.dtype == x.dtype
    assert rel_l2(out, reference.silu_and_mul(x)) < 1e-5


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[T, 2 \* I\]"):
        silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.randn(2, 8).double())
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(2, 8), out=torch.empty(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("T,inter", [(1, 8192), (256, 8192), (1, 14336), (256, 14336)])
def test_gpu_bf16_real_sizes(T, inter):
    x = torch.randn(T, 2 * inter, dtype=torch.bfloat16, device="cuda")
    out = torch.full((T, inter), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert rel_l2(silu_and_mul(x, out=out), reference.silu_and_mul(x)) < 1e-2
