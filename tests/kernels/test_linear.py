"""The fused projections of kernels.linear against their plain-torch twins.

Rows up to GEMV_MAX_ROWS run the GEMV Triton kernel (through the interpreter here); more
rows take the cuBLAS composition. Outputs and the unused parts of strided residual buffers are
poisoned with NaN first: the kernel must write exactly its [M, N] block.
"""

from __future__ import annotations

import pytest
import torch

from kernels import linear, reference
from kernels.linear import (GEMV_MAX_ROWS, gated_linear_residual, linear_residual, norm_linear,
                            gemv_config)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
EPS = 1e-5
# (M, N, K): rows the kernel takes with even and uneven N and K tiles, K over two tiles; the
# cuBLAS side of the switch.
SHAPES = [(1, 64, 256), (GEMV_MAX_ROWS, 40, 96), (1, 17, 300), (1, 24, 1100),
          (GEMV_MAX_ROWS + 3, 32, 64)]


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def weights(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, k, dtype=dtype) * k ** -0.5


def poisoned_residual(m: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [m, n] view with a wider row stride into a NaN buffer, filled with random values."""
    buffer = torch.full((m, n + 7), float("nan"), dtype=dtype)
    view = buffer[:, 3:3 + n]
    view.copy_(torch.randn(m, n, dtype=dtype))
    return buffer, view


def assert_margins_untouched(buffer: torch.Tensor, n: int) -> None:
    assert torch.isnan(buffer[:, :3]).all() and torch.isnan(buffer[:, 3 + n:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_norm_linear_matches_reference(dtype, M, N, K, with_bias):
    x = torch.randn(M, K, dtype=dtype) * 3
    norm_w = torch.randn(K, dtype=dtype)
    w = weights(N, K, dtype)
    bias = torch.randn(N, dtype=dtype) if with_bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype)
    result = norm_linear(x, norm_w, EPS, w, bias, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = reference.norm_linear(x.float(), norm_w.float(), EPS, w.float(),
                                     None if bias is None else bias.float())
    assert rel_l2(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_residual_adds_in_place(dtype, M, N, K):
    x = torch.randn(M, K, dtype=dtype)
    w = weights(N, K, dtype)
    buffer, residual = poisoned_residual(M, N, dtype)
    expected = residual.float() + x.float() @ w.float().t()
    result = linear_residual(x, w, residual)
    assert result.data_ptr() == residual.data_ptr()
    assert rel_l2(residual, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gated_linear_residual_adds_in_place(dtype, M, N, K):
    gate_up = torch.randn(M, 2 * K, dtype=dtype) * 2
    w = weights(N, K, dtype)
    buffer, residual = poisoned_residual(M, N, dtype)
    expected = residual.float() + reference.silu_and_mul(gate_up.float()) @ w.float().t()
    gated_linear_residual(gate_up, w, residual)
    assert rel_l2(residual, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


def test_strided_rows_of_a_wider_activation():
    """x rows taken from a wider buffer (the attention output is contiguous, but a caller's
    activations need not be)."""
    wide = torch.randn(4, 300)
    x = wide[:, 10:266]
    w = weights(32, 256, torch.float32)
    norm_w = torch.randn(256)
    out = norm_linear(x, norm_w, EPS, w)
    assert rel_l2(out, reference.norm_linear(x, norm_w, EPS, w)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("prologue", [linear.PLAIN, linear.NORM, linear.GATED])
def test_kernel_handles_several_rows(prologue):
    """The kernel itself takes any M (one program row each), as the benchmark uses it."""
    M, N, K = 3, 24, 300
    x = torch.randn(M, 2 * K if prologue == linear.GATED else K)
    w, norm_w, residual = weights(N, K, torch.float32), torch.randn(K), torch.randn(M, N)
    if prologue == linear.NORM:
        expected = reference.norm_linear(x, norm_w, EPS, w)
        actual = linear._gemv(x, w, torch.full((M, N), float("nan")), prologue,
                              norm_weight=norm_w, eps=EPS)
    else:
        ref = reference.gated_linear_residual if prologue == linear.GATED else reference.linear_residual
        expected = ref(x, w, residual.clone())
        actual = linear._gemv(x, w, residual, prologue, residual=residual)
    assert rel_l2(actual, expected) < TOLERANCE[torch.float32]


def test_kernel_path_is_taken_for_few_rows(monkeypatch):
    """Up to GEMV_MAX_ROWS rows the fused kernel runs, beyond it the composition."""
    calls = []
    original = linear._gemv
    monkeypatch.setattr(linear, "_gemv", lambda *a, **k: calls.append(1) or original(*a, **k))
    w = weights(16, 64, torch.float32)
    linear_residual(torch.randn(GEMV_MAX_ROWS, 64), w, torch.zeros(GEMV_MAX_ROWS, 16))
    assert calls == [1]
    linear_residual(torch.randn(GEMV_MAX_ROWS + 1, 64), w, torch.zeros(GEMV_MAX_ROWS + 1, 16))
    assert calls == [1]


@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),
                                 (6144, 4096), (4096, 14336), (28672, 4096), (40, 96)])
def test_gemv_config_fills_the_gpu(n, k):
    config = gemv_config(n, k, torch.bfloat16)
    if n >= 2048:  # every projection of the served models: a program for every SM
        assert -(-n // config.block_n) >= 132
    # Several 16-byte weight loads in flight per thread and iteration (or the whole row).
    per_thread_bytes = config.block_n * config.block_k * 2 // (32 * config.num_warps)
    assert per_thread_bytes >= 64 or config.block_k >= k
    assert 16 <= config.block_k <= 1024 and config.block_k & (config.block_k - 1) == 0
    assert gemv_config(n, k, torch.bfloat16) == config  # a pure function


def test_bad_inputs_are_refused_with_clear_errors():
    x, w = torch.randn(2, 64), weights(16, 64, torch.float32)
    with pytest.raises(ValueError, match="does not match weight"):
        norm_linear(torch.randn(2, 32), torch.ones(32), EPS, w)
    with pytest.raises(ValueError, match="norm_weight"):
        norm_linear(x, torch.ones(63), EPS, w)
    with pytest.raises(ValueError, match="share one of"):
        linear_residual(x.half(), w, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="residual must be"):
        linear_residual(x, w, torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        gated_linear_residual(torch.randn(2, 65), w, torch.zeros(2, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, GEMV_MAX_ROWS])
@pytest.mark.parametrize("N,K", [(3072, 2048), (2048, 8192), (6144, 4096), (1152, 896)])
def test_gpu_bf16_model_projections(M, N, K):
    """The compiled kernel (every prologue) on model projection shapes, bf16 against fp32."""
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(M, 2 * K, dtype=bf16, device=dev)
    w = (torch.randn(N, K, device=dev) * K ** -0.5).to(bf16)
    norm_w = torch.randn(K, dtype=bf16, device=dev)
    bias = torch.randn(N, dtype=bf16, device=dev)
    out = torch.full((M, N), float("nan"), dtype=bf16, device=dev)
    norm_linear(x[:, :K], norm_w, EPS, w, bias, out=out)
    expected = reference.norm_linear(x[:, :K].float(), norm_w.float(), EPS, w.float(), bias.float())
    assert rel_l2(out, expected) < 1e-2
    residual = torch.randn(M, N, dtype=bf16, device=dev)
    expected = reference.gated_linear_residual(x.float(), w.float(), residual.float())
    assert rel_l2(gated_linear_residual(x, w, residual), expected) < 1e-2
    residual = torch.randn(M, N, dtype=bf16, device=dev)
    expected = reference.linear_residual(x[:, :K].float(), w.float(), residual.float())
    assert rel_l2(linear_residual(x[:, :K], w, residual), expected) < 1e-2
