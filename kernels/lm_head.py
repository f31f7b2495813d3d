"""The greedy LM head: each row's argmax over x @ W.T in fp32, without writing the logits.

A greedy decode step needs one token per row, not the [B, V] fp32 logits, yet the unfused head
writes them (cuBLASLt from its fp32 accumulator: 33 MB at B = 64 with a 128k vocabulary) and
reads them back for the argmax (``kernels.argmax``): a store, a second kernel and a round trip
through memory on top of the weight stream. From 1 to ``GEMM_MAX_ROWS`` rows on a GPU with
16-bit weights the product runs on ``kernels.gemm``'s skinny tile instead, whose
ROW_ARGMAX epilogue keeps, per row, only the maximum of each program's fp32 tile and the first
feature holding it ([M, P], P programs: 1002 for a 128k vocabulary), and ``kernels.argmax``'s
second stage picks the first program holding each row's maximum. Ties therefore resolve to the
lowest id and a NaN counts as the maximum (the first NaN wins), as with ``torch.argmax`` over the
logits. Past 64 rows a wider tile takes over (below); more than ``HEAD_MAX_ROWS`` rows, fp32
and the CPU compute the fp32 logits and take ``kernels.argmax``.

The two paths round alike: both take the maximum over fp32 accumulators of the same 16-bit
operands; only the order of the K sums differs, so a near tie may break differently.

On the H100 (``bench.lm_head``, bench/RESULTS.md) the 1B head (2048 x 128256) took 189.5 µs
fused against 223.1 for logits then argmax at 64 rows (a plain read of the weights: 183.0),
186.9 against 193.0 at one row; the 8B head 362.3 against 408.2 at 64 rows. Greedy decode
steps of the 1B shape became 0.6% (B = 1) to 2.8% (B = 64) shorter, of the 8B shape 0.1-0.6%.

Past 64 rows, up to ``HEAD_MAX_ROWS``, the skinny tile gives way to ``head_config``'s 128-row
tiles over two warpgroups, whose M tiles of one weight tile run side by side so the weights
are still read once. ``bench.lm_head`` on the H100 at 128 / 256 rows: the 1B head 203.2 /
259.1 µs fused against 247.9 / 301.5 for logits then argmax, the 8B head 386.5 / 469.6 against
436.6 / 504.7 (at 192 rows a tie, 482.6 against 483.2). Decode steps of 96 to 256 rows became
about 2% (1B) and 0.4-0.7% (8B) shorter.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from kernels import cublaslt
from kernels.argmax import argmax, reduce_chunks
from kernels.device import has_pdl
from kernels.gemm import (GEMM_MAX_ROWS, PREFETCH_COLUMNS, GemmConfig, gemm_config,
                          gemm_programs, skinny_gemm_row_argmax)

# BINDECODE_FUSED_ARGMAX=0 keeps the unfused head (fp32 logits, then kernels.argmax) on every
# greedy step, to measure what the fusion gives; read once.
FUSED_ARGMAX = os.environ.get("BINDECODE_FUSED_ARGMAX") != "0"
# Rows the fused head takes (past them the logits path runs: not measured there).
HEAD_MAX_ROWS = 256
# The head's tiles past GEMM_MAX_ROWS (block_m, block_n, block_k, warps, stages), up to
# NARROW_TILE_MAX_ROWS rows and beyond: the fastest of eight in a development sweep on the
# H100 at 96 / 128 rows and at 192 / 256 rows (both heads).
NARROW_TILE_MAX_ROWS, NARROW_TILE, WIDE_TILE = 128, (128, 128, 64, 8, 6), (128, 256, 64, 8, 4)


def fuses_argmax(x: torch.Tensor) -> bool:
    """Whether ``lm_head_argmax`` takes the fused path for hidden rows x (its weight has x's
    dtype and device)."""
    return (FUSED_ARGMAX and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and 1 <= x.shape[0] <= HEAD_MAX_ROWS)


def lm_head_argmax(x: torch.Tensor, weight: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's greedy token: the first index of the maximum of x @ weight.T in fp32.

    x: [M, K] (the final-normed hidden rows), last dim contiguous; weight: [V, K] contiguous,
    x's dtype and device; out: optional int64 [M] (may alias memory x was computed from: it is
    written last). Returns int64 [M].
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"lm_head_argmax: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
                         f"must be [M, K] and [V, K]")
    if weight.shape[0] == 0 or x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("lm_head_argmax: needs V > 0, x with a contiguous last dim and a "
                         "contiguous weight")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"lm_head_argmax: x is {x.dtype} on {x.device}, weight {weight.dtype} "
                         f"on {weight.device}")
    M = x.shape[0]
    if out is None:
        out = torch.empty(M, dtype=torch.int64, device=x.device)
    elif out.shape != (M,) or out.dtype != torch.int64 or out.device != x.device:
        raise ValueError(f"lm_head_argmax: out must be int64 [{M}] on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if not fuses_argmax(x):
        return argmax(cublaslt.logits(x, weight), out=out)
    return fused_lm_head_argmax(x, weight, out)


def fused_lm_head_argmax(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                         config: GemmConfig | None = None) -> torch.Tensor:
    """The fused path of ``lm_head_argmax`` on any device and dtype (the interpreter runs it on
    the CPU), for any number of rows; arguments as there, already validated, ``config`` a
    ``kernels.gemm`` tile without split K (default ``head_config``'s). Returns out."""
    (M, K), V = x.shape, weight.shape[0]
    config = config or head_config(M, V, K, weight.dtype, pdl=has_pdl(x.device))
    programs = gemm_programs(config, V)
    best = torch.empty(M, programs, dtype=torch.float32, device=x.device)
    first = torch.empty(M, programs, dtype=torch.int32, device=x.device)
    skinny_gemm_row_argmax(x, weight, best, first, config)
    return reduce_chunks(best, first, out)


def head_config(m: int, vocab: int, hidden: int, dtype: torch.dtype,
                pdl: bool = False) -> GemmConfig:
    """The fused head's tile; a pure function. Up to ``GEMM_MAX_ROWS`` rows ``gemm_config``'s
    for the product, never split along K (each program's maxima need its whole K loop; only
    small vocabularies, ``dummy:tiny``'s 512, would otherwise split). Past them in 16 bits a
    128-row tile over two warpgroups, 128 features a program up to ``NARROW_TILE_MAX_ROWS``
    and 256 beyond (the M tiles of one weight tile run side by side, so the weights are read
    once); in fp32 (interpreter tests) ``gemm_config``'s 64-row tile, repeated along M."""
    if m <= GEMM_MAX_ROWS or dtype == torch.float32:
        config = gemm_config(min(m, GEMM_MAX_ROWS), vocab, hidden, dtype, pdl=pdl)
        return dataclasses.replace(config, split_k=1)
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"head_config: dtype must be fp16/bf16/fp32, got {dtype}")
    block_m, block_n, block_k, warps, stages = (NARROW_TILE if m <= NARROW_TILE_MAX_ROWS
                                                else WIDE_TILE)
    return GemmConfig(block_m, block_n, block_k, warps, stages, pdl,
                      PREFETCH_COLUMNS if pdl else 0)
