"""The skinny tensor-core GEMM (kernels.gemm) against plain torch, through the interpreter.

Every prologue (plain, RMSNorm from the x tiles or from a previous launch's partial sums of
squares) and epilogue (bias, residual add in place with and without those partials, SwiGLU) on
row counts of one and several M tiles, N and K that do and do not divide the
tiles; outputs and the margins of strided buffers are poisoned with NaN first.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import gemm, linear, reference
from kernels.gemm import (GEMM_MAX_ROWS, GEMM_MIN_ROWS, NORM, PARTIAL_NORM, PLAIN, SWAP_AB_ROWS,
                          GemmConfig, gemm_config, gemm_programs, skinny_gemm)
from tests.kernels.numerics import assert_margins_untouched, poisoned_view, rel_l2, weights

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
EPS = 1e-5
# Small tiles so the interpreter covers several M, N and K tiles and their overhangs.
SMALL = GemmConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2)
# The transposed tile of up to SWAP_AB_ROWS rows, with 32-column K tiles for the same reason.
SWAPPED = GemmConfig(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2, swap_ab=True)
SHAPES = [(2, 32, 64), (17, 40, 96), (33, 16, 300), (GEMM_MAX_ROWS, 48, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_norm_prologue_matches_rmsnorm_then_linear(dtype, M, N, K, with_bias):
    x = torch.randn(M, K, dtype=dtype) * 3
    w = weights(N, K, dtype)
    bias = torch.randn(N, dtype=dtype) if with_bias else None
    buffer, out = poisoned_view(M, N, dtype)
    skinny_gemm(x, w, out, NORM, bias=bias, eps=EPS, config=SMALL)
    expected = reference.norm_linear(x.float(), None, EPS, w.float(),
                                     None if bias is None else bias.float())
    assert rel_l2(out, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_residual_epilogue_adds_in_place(dtype, M, N, K):
    x = torch.randn(M, K, dtype=dtype) * 2
    w = weights(N, K, dtype)
    buffer, residual = poisoned_view(M, N, dtype, fill=torch.randn(M, N, dtype=dtype))
    expected = residual.float() + x.float() @ w.float().t()
    result = skinny_gemm(x, w, residual, PLAIN, add_residual=True, config=SMALL)
    assert result.data_ptr() == residual.data_ptr()
    assert rel_l2(residual, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,I,K", [(2, 16, 64), (17, 24, 96), (33, 40, 300)])
@pytest.mark.parametrize("prologue", [PLAIN, NORM])
def test_swiglu_epilogue_matches_linear_then_silu_and_mul(dtype, M, I, K, prologue):
    """The gate/up product with its SiLU-and-mul: I = 24 and 40 overhang the 8-row half tiles
    of SMALL's 16-row tile."""
    x = torch.randn(M, K, dtype=dtype) * 3
    w = weights(2 * I, K, dtype)
    buffer, out = poisoned_view(M, I, dtype)
    skinny_gemm(x, w, out, prologue, eps=EPS, swiglu=True, config=SMALL)
    gate_up = (reference.norm_linear(x.float(), None, EPS, w.float()) if prologue == NORM
               else x.float() @ w.float().t())
    assert rel_l2(out, reference.silu_and_mul(gate_up)) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, I)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_residual_epilogue_leaves_each_programs_sums_of_squares(dtype, M, N, K):
    """Row j of row_sumsq: the sums of squares of the rounded residual features program j
    stored (N = 40 overhangs SMALL's 16-feature tiles; the overhang adds nothing)."""
    x = torch.randn(M, K, dtype=dtype) * 2
    w = weights(N, K, dtype)
    _, residual = poisoned_view(M, N, dtype, fill=torch.randn(M, N, dtype=dtype))
    programs = gemm_programs(SMALL, N)
    sumsq = torch.full((programs, M), float("nan"))
    skinny_gemm(x, w, residual, PLAIN, add_residual=True, row_sumsq=sumsq, config=SMALL)
    squares = residual.float() ** 2
    for j in range(programs):
        tile = squares[:, j * SMALL.block_n:(j + 1) * SMALL.block_n]
        torch.testing.assert_close(sumsq[j], tile.sum(dim=1), rtol=1e-5, atol=1e-6)


def split_sums_of_squares(x: torch.Tensor, parts: int) -> torch.Tensor:
    """fp32 [parts, M]: x's rows' sums of squares cut at random columns into ``parts`` pieces
    (some empty), as the programs of a residual-adding launch leave them."""
    cuts = torch.sort(torch.randint(0, x.shape[1] + 1, (parts - 1,))).values.tolist()
    bounds = [0, *cuts, x.shape[1]]
    squares = x.float() ** 2
    return torch.stack([squares[:, a:b].sum(dim=1) for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("parts", [1, 5, 64])
@pytest.mark.parametrize("swiglu", [False, True])
def test_partial_norm_prologue_matches_rmsnorm_then_linear(dtype, M, N, K, parts, swiglu):
    """1 / rms from partials: one, fewer than the K steps, and more than the K steps take
    one at a time (several per step, the last step's partly masked)."""
    x = torch.randn(M, K, dtype=dtype) * 3
    w = weights(2 * N if swiglu else N, K, dtype)
    buffer, out = poisoned_view(M, N, dtype)
    skinny_gemm(x, w, out, PARTIAL_NORM, eps=EPS, swiglu=swiglu,
                row_sumsq=split_sums_of_squares(x, parts), config=SMALL)
    expected = reference.norm_linear(x.float(), None, EPS, w.float())
    if swiglu:
        expected = reference.silu_and_mul(expected)
    assert rel_l2(out, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


def test_row_sumsq_of_the_wrong_shape_or_use_is_refused():
    x, w = torch.randn(4, 64), weights(32, 64, torch.float32)
    residual = torch.randn(4, 32)
    programs = gemm_programs(SMALL, 32)
    with pytest.raises(ValueError, match=rf"row_sumsq must be contiguous fp32 \[{programs}, 4\]"):
        skinny_gemm(x, w, residual, add_residual=True, row_sumsq=torch.empty(programs + 1, 4),
                    config=SMALL)
    with pytest.raises(ValueError, match="row_sumsq must be"):
        skinny_gemm(x, w, residual, PARTIAL_NORM, row_sumsq=torch.empty(3, 4).double(),
                    config=SMALL)
    with pytest.raises(ValueError, match="PARTIAL_NORM needs row_sumsq"):
        skinny_gemm(x, w, residual, PARTIAL_NORM, config=SMALL)
    with pytest.raises(ValueError, match="written by a residual add only"):
        skinny_gemm(x, w, residual, row_sumsq=torch.empty(programs, 4), config=SMALL)


@pytest.mark.parametrize("M", [2, 17, GEMM_MAX_ROWS])
def test_default_config_fp16_model_like_shape(M):
    """The configuration the engine picks (big K tiles, pipelined) on a projection-like shape."""
    N, K = 96, 512
    x = torch.randn(M, K, dtype=torch.float16)
    w = weights(N, K, torch.float16)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    skinny_gemm(x, w, out, NORM, eps=EPS)
    assert rel_l2(out, reference.norm_linear(x.float(), None, EPS, w.float())) < 2e-3


def test_linear_ops_route_rows_to_the_kernel(monkeypatch):
    """One row takes the GEMV kernel, GEMM_MIN_ROWS..GEMM_MAX_ROWS this one, others cuBLAS;
    with SMALL_ROWS_GEMM off (BINDECODE_SMALL_ROWS_GEMM=0), up to SWAP_AB_ROWS rows cuBLAS too."""
    calls = []
    original = linear.skinny_gemm
    monkeypatch.setattr(linear, "skinny_gemm",
                        lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    w = weights(16, 64, torch.float32)
    row_counts = (1, GEMM_MIN_ROWS, SWAP_AB_ROWS, SWAP_AB_ROWS + 1, GEMM_MAX_ROWS,
                  GEMM_MAX_ROWS + 1)
    for small_rows_gemm in (True, False):
        monkeypatch.setattr(linear, "SMALL_ROWS_GEMM", small_rows_gemm)
        calls.clear()
        for m in row_counts:
            expected = torch.randn(m, 16)
            x = torch.randn(m, 64)
            result = linear.linear_residual(x, w, expected.clone())
            assert rel_l2(result, expected + x @ w.t()) < 1e-5
        assert calls == ([GEMM_MIN_ROWS, SWAP_AB_ROWS] if small_rows_gemm else []) + [
            SWAP_AB_ROWS + 1, GEMM_MAX_ROWS]


@pytest.mark.parametrize("m", [SWAP_AB_ROWS + 1, GEMM_MAX_ROWS])
@pytest.mark.parametrize("n,k,block_n", [
    (3072, 2048, 32), (2048, 2048, 16), (16384, 2048, 128), (2048, 8192, 16),
    (6144, 4096, 64), (4096, 4096, 32), (28672, 4096, 128), (4096, 14336, 32)])
def test_config_matches_the_measured_tiles(m, n, k, block_n):
    """Llama-3.2-1B / 3.1-8B projections get the tile width that was fastest on the H100, fill
    most SMs, and keep their pipeline (at least two stages) within shared memory."""
    config = gemm_config(m, n, k, torch.bfloat16)
    assert config.block_n == block_n and config.block_k == gemm.BLOCK_K
    assert config.block_m == 64
    assert -(-n // config.block_n) >= gemm.MIN_PROGRAMS
    for prologue in (PLAIN, NORM):
        c = gemm_config(m, n, k, torch.bfloat16, prologue)
        smem = (c.block_m + c.block_n) * c.block_k * 2 * c.num_stages
        assert 2 <= c.num_stages <= (4 if prologue == NORM else gemm.MAX_STAGES)
        assert smem <= gemm.SHARED_BYTES
    assert gemm_config(m, n, k, torch.bfloat16) == config  # a pure function


@pytest.mark.parametrize("m", [GEMM_MIN_ROWS, 8, SWAP_AB_ROWS])
@pytest.mark.parametrize("n,k,swiglu,block_n,split_k", [
    (3072, 2048, False, 64, 2), (2048, 2048, False, 64, 4), (16384, 2048, True, 128, 1),
    (2048, 8192, False, 64, 4), (6144, 4096, False, 64, 1), (4096, 4096, False, 64, 2),
    (28672, 4096, True, 128, 1), (4096, 14336, False, 64, 2)])
def test_config_transposes_few_rows(m, n, k, swiglu, block_n, split_k):
    """Up to SWAP_AB_ROWS rows the 1B / 8B products get the transposed 16-row tile with 64
    features per program (64 gate and 64 up rows with SwiGLU), and split K until they fill
    MIN_PROGRAMS programs; a normalising prologue never splits."""
    config = gemm_config(m, n, k, torch.bfloat16, swiglu=swiglu)
    assert config.swap_ab and config.block_m == 16
    assert (config.block_n, config.split_k) == (block_n, split_k)
    assert gemm_programs(config, n // 2 if swiglu else n, swiglu) * split_k >= gemm.MIN_PROGRAMS
    assert (config.block_m + config.block_n) * config.block_k * 2 * config.num_stages \
        <= gemm.SHARED_BYTES
    for prologue in (NORM, PARTIAL_NORM):
        assert gemm_config(m, n, k, torch.bfloat16, prologue, swiglu=swiglu).split_k == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prologue,swiglu", [(PLAIN, False), (NORM, False), (NORM, True),
                                             (PARTIAL_NORM, False), (PARTIAL_NORM, True)])
def test_transposed_tile_matches_every_prologue(dtype, prologue, swiglu):
    """out^T = W @ x^T on 5 rows of a 16-row tile; N = 100 overhangs the 64-feature tiles
    (32 gate and 32 up rows a program with SwiGLU) and K = 300 the K tiles."""
    M, N, K = 5, 100, 300
    x = torch.randn(M, K, dtype=dtype) * 3
    w = weights(2 * N if swiglu else N, K, dtype)
    bias = None if swiglu else torch.randn(N, dtype=dtype)
    buffer, out = poisoned_view(M, N, dtype)
    sumsq = split_sums_of_squares(x, 5) if prologue == PARTIAL_NORM else None
    skinny_gemm(x, w, out, prologue, bias=bias, eps=EPS, swiglu=swiglu, row_sumsq=sumsq,
                config=SWAPPED)
    expected = (x.float() @ w.float().t() if prologue == PLAIN
                else reference.norm_linear(x.float(), None, EPS, w.float()))
    expected = reference.silu_and_mul(expected) if swiglu else expected + bias.float()
    assert rel_l2(out, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 3, 8])
@pytest.mark.parametrize("M", [5, 21])  # 21: two M tiles, each with its own counter
def test_split_k_sums_its_pieces(monkeypatch, dtype, split_k, M):
    """K = 300 in 3 pieces of 128 columns (the last of 44) or in 8 of 64 (the last three
    empty), with bias, residual add and the partial sums of squares of the summed tile: the
    same bits on a second run, and the arrival counters back at zero after each. The pieces'
    buffer starts as NaN: every piece, empty or not, must write its share."""
    alloc = gemm._alloc_split_partials
    monkeypatch.setattr(gemm, "_alloc_split_partials",
                        lambda *a: alloc(*a).fill_(float("nan")))
    N, K = 100, 300
    config = dataclasses.replace(SWAPPED, split_k=split_k)
    x = torch.randn(M, K, dtype=dtype) * 2
    w, bias = weights(N, K, dtype), torch.randn(N, dtype=dtype)
    residual_before = torch.randn(M, N, dtype=dtype)
    runs = []
    for _ in range(2):
        buffer, residual = poisoned_view(M, N, dtype, fill=residual_before)
        sumsq = torch.full((gemm_programs(config, N), M), float("nan"))
        skinny_gemm(x, w, residual, PLAIN, bias=bias, add_residual=True, row_sumsq=sumsq,
                    config=config)
        assert_margins_untouched(buffer, N)
        if split_k > 1:
            assert not gemm._split_counters(x.device).any()
        runs.append((residual.clone(), sumsq))
    (residual, sumsq), (again, sumsq_again) = runs
    expected = residual_before.float() + x.float() @ w.float().t() + bias.float()
    assert rel_l2(residual, expected) < TOLERANCE[dtype]
    squares = residual.float() ** 2
    for j in range(sumsq.shape[0]):
        tile = squares[:, j * config.block_n:(j + 1) * config.block_n]
        torch.testing.assert_close(sumsq[j], tile.sum(dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(residual, again) and torch.equal(sumsq, sumsq_again)


def test_split_k_is_refused_where_the_pieces_cannot_meet():
    """The pieces meet before the epilogue, after any 1 / rms: a normalising prologue or
    SwiGLU (a product of two sums) cannot split."""
    config = dataclasses.replace(SWAPPED, split_k=2)
    x, w = torch.randn(4, 64), weights(32, 64, torch.float32)
    for prologue, swiglu in ((NORM, False), (PLAIN, True)):
        with pytest.raises(ValueError, match="split K takes the PLAIN prologue and no SwiGLU"):
            skinny_gemm(x, w, torch.empty(4, 16 if swiglu else 32), prologue, swiglu=swiglu,
                        config=config)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at most"):
        gemm_config(GEMM_MAX_ROWS + 1, 64, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="positive"):
        gemm_config(0, 64, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        gemm_config(4, 64, 64, torch.int8)
    with pytest.raises(ValueError, match="swiglu"):
        skinny_gemm(torch.randn(2, 16), torch.randn(31, 16), torch.empty(2, 15), swiglu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 8, 17, 40, GEMM_MAX_ROWS])
@pytest.mark.parametrize("N,K", [(3072, 2048), (2048, 8192), (6144, 4096), (1152, 896),
                                 (9728, 896)])
def test_gpu_bf16_chain_in_a_graph(M, N, K):
    """The compiled kernel (programmatic dependent launches, L2 prefetch) on model shapes: four
    launches, each reading what the one before wrote (as a layer's QKV, output, gate/up with
    SwiGLU, down), captured in a CUDA graph; bf16 against fp32 references of each step."""
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(M, K, dtype=bf16, device=dev) * 3
    w_up = (torch.randn(N, K, device=dev) * K ** -0.5).to(bf16)
    w_back = (torch.randn(K, N, device=dev) * N ** -0.5).to(bf16)
    w_gate_up = (torch.randn(N, K, device=dev) * K ** -0.5).to(bf16)
    w_down = (torch.randn(K, N // 2, device=dev) * (N // 2) ** -0.5).to(bf16)
    act = torch.full((M, N // 2), float("nan"), dtype=bf16, device=dev)
    start = torch.randn(M, K, dtype=bf16, device=dev)
    residual = start.clone()
    hidden = torch.full((M, N), float("nan"), dtype=bf16, device=dev)

    def chain():
        residual.copy_(start)
        skinny_gemm(x, w_up, hidden, NORM, eps=EPS)
        skinny_gemm(hidden, w_back, residual, PLAIN, add_residual=True)
        skinny_gemm(residual, w_gate_up, act, NORM, eps=EPS, swiglu=True)
        skinny_gemm(act, w_down, residual, PLAIN, add_residual=True)

    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    hidden.fill_(float("nan"))
    residual.fill_(float("nan"))
    act.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    h = reference.norm_linear(x.float(), None, EPS, w_up.float())
    assert rel_l2(hidden, h) < 1e-2
    h = hidden.float()  # each step reads what the previous one wrote, rounded
    after_o = start.float() + h @ w_back.float().t()
    gate_up = reference.norm_linear(after_o.to(bf16).float(), None, EPS, w_gate_up.float())
    assert rel_l2(act, reference.silu_and_mul(gate_up)) < 1e-2
    expected = after_o + act.float() @ w_down.float().t()
    assert rel_l2(residual, expected) < 1e-2
