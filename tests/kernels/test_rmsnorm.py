"""rmsnorm and fused_add_rmsnorm against the plain-torch reference; outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from tests.kernels.numerics import assert_margins_untouched, poisoned_view, rel_l2

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-6


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 256), (5, 896), (3, 1000), (19, 64), (2, 8192)])
def test_rmsnorm_matches_reference(dtype, T, H):
    x = torch.randn(T, H, dtype=dtype) * 3
    weight = torch.randn(H, dtype=dtype)
    out = rmsnorm(x, weight, EPS, out=poisoned_like(x))
    assert rel_l2(out, reference.rmsnorm(x, weight, EPS)) < TOLERANCE[dtype]


def test_rmsnorm_strided_rows_and_fp32_weight():
    """Rows taken from a wider buffer; weight in fp32 with half-precision activations."""
    wide = torch.randn(7, 1200, dtype=torch.float16)
    x = wide[:, 100:1100]
    weight = torch.randn(1000, dtype=torch.float32)
    out = rmsnorm(x, weight, EPS, out=poisoned_like(x))
    assert rel_l2(out, reference.rmsnorm(x, weight, EPS)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_per_head_view_of_fused_qkv(dtype):
    """Qwen3-style q norm: [T, heads, D] view of a fused QKV output, no copy."""
    T, hq, hkv, D = 5, 6, 2, 128
    qkv = torch.randn(T, (hq + 2 * hkv) * D, dtype=dtype)
    q = qkv[:, : hq * D].view(T, hq, D)
    weight = torch.randn(D, dtype=dtype)
    out = rmsnorm(q, weight, EPS, out=poisoned_like(q))
    assert out.shape == (T, hq, D)
    assert rel_l2(out, reference.rmsnorm(q, weight, EPS)) < TOLERANCE[dtype]


def test_rmsnorm_head_major_view():
    """[T, heads, D] whose head stride is not D (a transposed [heads, T, D] buffer)."""
    T, heads, D = 3, 5, 64
    x = torch.randn(heads, T, D).transpose(0, 1)
    weight = torch.randn(D)
    out = rmsnorm(x, weight, EPS, out=torch.full((T, heads, D), float("nan")))
    assert rel_l2(out, reference.rmsnorm(x, weight, EPS)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 256), (4, 896), (3, 1000), (17, 64)])
def test_fused_add_rmsnorm_matches_reference(dtype, T, H):
    x = torch.randn(T, H, dtype=dtype)
    residual = torch.randn(T, H, dtype=dtype) * 4
    weight = torch.randn(H, dtype=dtype)
    residual_ref = residual.clone()
    out, returned = fused_add_rmsnorm(x, residual, weight, EPS, out=poisoned_like(x))
    expected, _ = reference.fused_add_rmsnorm(x, residual_ref, weight, EPS)
    assert returned is residual
    # The sum is rounded once to the residual's dtype in both: bit-identical.
    assert torch.equal(residual, residual_ref)
    assert rel_l2(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("T,H", [(1, 256), (5, 896), (17, 64)])
def test_nothing_is_written_past_the_rows_and_columns(dtype, weighted, T, H):
    """Outputs are the first T rows of a NaN buffer with two more; x and the residual are
    strided views with NaN margins (stride mix-ups between them show as wrong sums)."""
    weight = torch.randn(H, dtype=dtype) if weighted else None
    x_buffer, x = poisoned_view(T, H, dtype, fill=torch.randn(T, H, dtype=dtype))
    res_buffer, residual = poisoned_view(T + 1, H, dtype)
    residual = residual[:T]
    residual.copy_(torch.randn(T, H, dtype=dtype) * 4)
    residual_ref = residual.clone()
    for add in (False, True):
        out_buffer = torch.full((T + 2, H), float("nan"), dtype=dtype)
        if add:
            out, _ = fused_add_rmsnorm(x, residual, weight, EPS, out=out_buffer[:T])
            expected, _ = reference.fused_add_rmsnorm(x, residual_ref, weight, EPS)
            assert torch.equal(residual, residual_ref)
        else:
            out = rmsnorm(x, weight, EPS, out=out_buffer[:T])
            expected = reference.rmsnorm(x, weight, EPS)
        assert rel_l2(out, expected) < TOLERANCE[dtype]
        assert torch.isnan(out_buffer[T:]).all()
    assert_margins_untouched(x_buffer, H)
    assert_margins_untouched(res_buffer, H)
    assert torch.isnan(res_buffer[T]).all()  # the residual's row after the last


def test_fresh_output_without_out():
    x = torch.randn(3, 300)
    weight = torch.randn(300)
    out = rmsnorm(x, weight, EPS)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert rel_l2(out, reference.rmsnorm(x, weight, EPS)) < 1e-5


def test_rejects_bad_inputs():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="hidden size 9000"):
        rmsnorm(torch.randn(2, 9000), torch.randn(9000), EPS)
    with pytest.raises(ValueError, match=r"weight must be a contiguous float \[64\]"):
        rmsnorm(x, torch.randn(32), EPS)
    with pytest.raises(ValueError, match="residual dtype"):
        fused_add_rmsnorm(x, x.half(), torch.randn(64), EPS)
    with pytest.raises(ValueError, match="out must be contiguous"):
        rmsnorm(x, torch.randn(64), EPS, out=torch.empty(2, 64, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("H", [2048, 4096])
@pytest.mark.parametrize("T", [1, 64, 256])
def test_gpu_bf16_real_sizes(H, T):
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(H, dtype=torch.bfloat16, device="cuda")
    assert rel_l2(rmsnorm(x, weight, EPS, out=poisoned_like(x)),
                  reference.rmsnorm(x, weight, EPS)) < 1e-2
    residual_ref = residual.clone()
    out, _ = fused_add_rmsnorm(x, residual, weight, EPS, out=poisoned_like(x))
    expected, _ = reference.fused_add_rmsnorm(x, residual_ref, weight, EPS)
    assert torch.equal(residual, residual_ref)
    assert rel_l2(out, expected) < 1e-2


@pytest.mark.gpu
def test_gpu_bf16_per_head_norm():
    T, hq, hkv, D = 256, 32, 8, 128
    qkv = torch.randn(T, (hq + 2 * hkv) * D, dtype=torch.bfloat16, device="cuda")
    k = qkv[:, hq * D: (hq + hkv) * D].view(T, hkv, D)
    weight = torch.randn(D, dtype=torch.bfloat16, device="cuda")
    assert rel_l2(rmsnorm(k, weight, EPS), reference.rmsnorm(k, weight, EPS)) < 1e-2
