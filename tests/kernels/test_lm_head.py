"""The greedy LM head (kernels.lm_head) against the argmax of the fp32 logits.

Through the interpreter: each program's row maxima (the ROW_ARGMAX epilogue of kernels.gemm,
outputs poisoned first), then the whole head on row counts of the transposed and the 64-row
tile, vocabularies that do and do not divide the tiles, ties planted inside a program and
across programs, and NaN where torch.argmax would pick it. On the GPU: bf16 at the served
vocabularies, inside a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from kernels import argmax as argmax_kernels
from kernels import gemm, reference
from kernels.gemm import (GEMM_MAX_ROWS, SHARED_BYTES, GemmConfig, gemm_config, gemm_programs,
                          skinny_gemm_row_argmax)
from kernels.lm_head import (HEAD_MAX_ROWS, NARROW_TILE_MAX_ROWS, fused_lm_head_argmax,
                             fuses_argmax, head_config, lm_head_argmax)
from tests.kernels.numerics import weights

# Small tiles, so a few hundred features span many programs and an overhanging last one.
SMALL = GemmConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2)
SWAPPED = GemmConfig(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2, swap_ab=True)
WIDE = GemmConfig(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2)


def fp32_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


def assert_greedy(tokens: torch.Tensor, logits: torch.Tensor) -> None:
    """Each token is the reference argmax, except where the top two logits lie within the
    fp32 sums' rounding of each other (then either may win)."""
    top2 = logits.topk(2, dim=-1).values
    rounding = 1e-5 * top2[:, 0].abs().clamp(min=1)
    near_tie = top2[:, 0] - top2[:, 1] <= rounding
    assert torch.equal(tokens[~near_tie], logits.argmax(dim=-1)[~near_tie])
    picked = logits.gather(1, tokens[:, None]).squeeze(1)
    assert (top2[:, 0] - picked <= rounding).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [SMALL, SWAPPED], ids=["tile", "transposed"])
@pytest.mark.parametrize("M", [5, 37])  # 37: three M tiles of 16, the last overhanging
def test_each_program_leaves_its_rows_maximum_and_first_index(dtype, config, M):
    V, K = 200, 96  # V = 12.5 tiles of 16 (3.1 of 64): the last program overhangs
    x, w = torch.randn(M, K, dtype=dtype), weights(V, K, dtype)
    programs = gemm_programs(config, V)
    best = torch.full((M, programs), float("nan"))
    first = torch.full((M, programs), -1, dtype=torch.int32)
    skinny_gemm_row_argmax(x, w, best, first, config)
    logits = fp32_logits(x, w)
    for j in range(programs):
        features = slice(j * config.block_n, min(V, (j + 1) * config.block_n))
        block = logits[:, features]
        assert ((first[:, j] >= features.start) & (first[:, j] < features.stop)).all()
        torch.testing.assert_close(best[:, j], block.max(dim=1).values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.gather(1, first[:, j, None].long()).squeeze(1),
                                   best[:, j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,config", [(1, SWAPPED), (2, SWAPPED), (16, SWAPPED), (17, WIDE),
                                      (GEMM_MAX_ROWS, WIDE), (3, SMALL), (40, SMALL),
                                      (GEMM_MAX_ROWS + 6, WIDE)])
@pytest.mark.parametrize("V", [256, 333])
def test_head_picks_the_argmax_of_the_fp32_logits(dtype, M, config, V):
    K = 64
    x, w = torch.randn(M, K, dtype=dtype) * 2, weights(V, K, dtype)
    out = torch.full((M,), -7, dtype=torch.int64)
    result = fused_lm_head_argmax(x, w, out, config)
    assert result is out
    assert_greedy(out, fp32_logits(x, w))


@pytest.mark.parametrize("config", [SMALL, SWAPPED, WIDE], ids=["tile", "transposed", "wide"])
def test_ties_resolve_to_the_lowest_id_inside_and_across_programs(config):
    """Weight rows repeated at several ids give bit-equal logits; row r's x is the repeated
    row scaled up, so those ids hold its maximum."""
    M, V, K = 4, 300, 64
    w = weights(V, K, torch.float32)
    placements = [(3, 9), (40, 290), (299, 0, 150), (64, 65)]  # within a tile and across
    x = torch.randn(M, K) * 0.01
    for row, ids in enumerate(placements):
        direction = torch.randn(K)
        w[list(ids)] = direction
        x[row] = 10 * direction
    out = fused_lm_head_argmax(x, w, torch.full((M,), -7, dtype=torch.int64), config)
    assert out.tolist() == [min(ids) for ids in placements]


def test_nan_counts_as_the_maximum_as_in_torch():
    """A NaN logit (an overflowed model) is picked as torch.argmax picks it: the first NaN,
    in whichever program it falls; a NaN row picks id 0."""
    M, V, K = 3, 300, 64
    x, w = torch.randn(M, K), weights(V, K, torch.float32)
    w[[170, 240], 5] = float("nan")  # every row's logits 170 and 240 are NaN
    x[2, 0] = float("nan")  # row 2 is NaN throughout
    for config in (SMALL, SWAPPED, WIDE):
        out = fused_lm_head_argmax(x, w, torch.full((M,), -7, dtype=torch.int64), config)
        assert out.tolist() == [170, 170, 0]
        assert out.tolist() == reference.argmax(fp32_logits(x, w)).tolist()


def test_off_the_gpu_the_head_computes_the_logits():
    x, w = torch.randn(6, 64), weights(300, 64, torch.float32)
    assert not fuses_argmax(x)
    out = torch.full((6,), -7, dtype=torch.int64)
    assert lm_head_argmax(x, w, out=out) is out
    assert torch.equal(out, reference.lm_head_argmax(x, w))


def test_bad_inputs_are_refused():
    x, w = torch.randn(2, 64), weights(300, 64, torch.float32)
    with pytest.raises(ValueError, match=r"\[M, K\] and \[V, K\]"):
        lm_head_argmax(x, w[:, :32])
    with pytest.raises(ValueError, match="int64"):
        lm_head_argmax(x, w, out=torch.empty(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="float16"):
        lm_head_argmax(x, w.half())
    programs = gemm_programs(SMALL, 300)
    with pytest.raises(ValueError, match="best must be"):
        skinny_gemm_row_argmax(x, w, torch.empty(2, programs - 1),
                               torch.empty(2, programs, dtype=torch.int32), SMALL)
    with pytest.raises(ValueError, match="split K"):
        skinny_gemm_row_argmax(x, w, torch.empty(2, programs),
                               torch.empty(2, programs, dtype=torch.int32),
                               GemmConfig(16, 64, 32, 4, 2, swap_ab=True, split_k=2))


def test_past_the_skinny_rows_the_head_takes_128_row_tiles():
    for m, block_n, stages in ((GEMM_MAX_ROWS + 1, 128, 6), (NARROW_TILE_MAX_ROWS, 128, 6),
                               (NARROW_TILE_MAX_ROWS + 1, 256, 4), (HEAD_MAX_ROWS, 256, 4)):
        config = head_config(m, 128256, 2048, torch.bfloat16, pdl=True)
        assert (config.block_m, config.block_n, config.num_warps) == (128, block_n, 8)
        assert config.num_stages == stages and config.split_k == 1 and not config.swap_ab
        assert config.prefetch_k > 0
        # The pipeline fits the shared memory kernels.gemm budgets.
        assert (config.block_m + config.block_n) * config.block_k * 2 * stages <= SHARED_BYTES
    # fp32 (the interpreter's tests) repeats gemm_config's 64-row tile along M.
    assert head_config(200, 300, 64, torch.float32) == head_config(64, 300, 64, torch.float32)


def test_head_tiles_never_split_k():
    """A small vocabulary leaves too few programs, and gemm_config would split K."""
    assert gemm_config(2, 512, 256, torch.bfloat16).split_k > 1
    for m in (1, 2, 16, 17, GEMM_MAX_ROWS):
        config = head_config(m, 512, 256, torch.bfloat16)
        assert config.split_k == 1
        assert config == dataclasses.replace(gemm_config(m, 512, 256, torch.bfloat16), split_k=1)
    x, w = torch.randn(2, 256, dtype=torch.float16), weights(512, 256, torch.float16)
    out = fused_lm_head_argmax(x, w, torch.full((2,), -7, dtype=torch.int64),
                               head_config(2, 512, 256, torch.float16))
    assert_greedy(out, fp32_logits(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 8, 16, 17, 32, 64, 65, 128, 129, 256])
@pytest.mark.parametrize("V,K", [(128256, 2048), (151936, 896)])
def test_gpu_bf16_head_in_a_graph(M, V, K):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    assert fuses_argmax(x)
    out = torch.full((M,), -7, dtype=torch.int64, device="cuda")
    lm_head_argmax(x, w, out=out)  # compiles outside the capture
    out.fill_(-7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lm_head_argmax(x, w, out=out)
    graph.replay()
    torch.cuda.synchronize()
    logits = fp32_logits(x, w)
    assert_greedy(out, logits)
    # A repeated maximum: row 0's x written at a low and a high id, in different programs.
    w[[5, V - 3]] = x[0] * 4
    graph.replay()
    torch.cuda.synchronize()
    assert out[0].item() == 5


@pytest.mark.gpu
def test_gpu_head_runs_compiled():
    from triton.runtime.jit import JITFunction

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    lm_head_argmax(x, w)
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    for kernel in (gemm._skinny_gemm_kernel, argmax_kernels._reduce_chunks_kernel):
        assert isinstance(kernel, JITFunction), f"{kernel} is not a compiled Triton kernel"
        compiled = kernel.device_caches[device][0]
        assert all(c.n_regs > 0 and c.n_spills == 0 for c in compiled.values())


@pytest.mark.gpu
def test_gpu_past_the_head_rows_the_logits_path_runs():
    M, V, K = HEAD_MAX_ROWS + 1, 4000, 512
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    assert not fuses_argmax(x) and fuses_argmax(x[:HEAD_MAX_ROWS])
    assert_greedy(lm_head_argmax(x, w), fp32_logits(x, w))
