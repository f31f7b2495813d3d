"""Greedy sampling's row argmax over the vocabulary, in two stages.

A single program per row would leave most SMs idle at small batch sizes (one row of a 152k
vocabulary is 600 KB), so stage 1 splits every row into chunks and records each chunk's
maximum and the first index reaching it; stage 2 (``reduce_chunks``, which the greedy LM head
of ``kernels.lm_head`` also runs over its programs' maxima) picks, per row, the first chunk
holding the row maximum. Ties therefore resolve to the lowest index, as ``torch.argmax`` does,
and NaN counts as larger than any number, as there: a row holding NaN (a model that overflowed)
picks its first NaN, which is still a token id, so the step's next embedding lookup stays in
range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _chunk_argmax_kernel(logits_ptr, chunk_max_ptr, chunk_idx_ptr, vocab, stride_row,
                         num_chunks, CHUNK: tl.constexpr):
    """Grid (B, num_chunks). logits: [B, vocab], last dim contiguous. Writes fp32 and int32
    [B, num_chunks]: each chunk's maximum and the lowest index holding it (NaN and the first
    NaN's index if the chunk holds one)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab,
                     other=float("-inf")).to(tl.float32)
    is_nan = values != values
    first_nan = tl.min(tl.where(is_nan, cols, vocab), axis=0)
    values = tl.where(is_nan, float("-inf"), values)
    best = tl.max(values, axis=0)
    # Lanes past the vocabulary hold -inf too, but their indices come after every real one.
    first = tl.min(tl.where(values == best, cols, vocab), axis=0)
    best = tl.where(first_nan < vocab, float("nan"), best)
    first = tl.where(first_nan < vocab, first_nan, first)
    tl.store(chunk_max_ptr + row * num_chunks + chunk, best)
    tl.store(chunk_idx_ptr + row * num_chunks + chunk, first)


@triton.jit
def _reduce_chunks_kernel(chunk_max_ptr, chunk_idx_ptr, out_ptr, num_chunks,
                          BLOCK_CHUNKS: tl.constexpr, INDEX_LIMIT: tl.constexpr):
    """Grid (B,). Reads stage 1's [B, num_chunks] results; writes int64 [B]."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_CHUNKS)
    mask = c < num_chunks
    best = tl.load(chunk_max_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    first = tl.load(chunk_idx_ptr + row * num_chunks + c, mask=mask, other=INDEX_LIMIT)
    is_nan = best != best
    first_nan = tl.min(tl.where(is_nan, first, INDEX_LIMIT), axis=0)
    best = tl.where(is_nan, float("-inf"), best)
    row_best = tl.max(best, axis=0)
    # Chunk indices rise with the chunk, so the smallest index among maximal chunks is the first.
    winner = tl.min(tl.where(best == row_best, first, INDEX_LIMIT), axis=0)
    winner = tl.where(first_nan < INDEX_LIMIT, first_nan, winner)
    tl.store(out_ptr + row, winner.to(tl.int64))


@dataclass(frozen=True)
class ArgmaxLaunch:
    """Compile-time parameters of stage 1 for one vocabulary size."""

    chunk: int
    num_chunks: int
    chunk_warps: int


def argmax_launch(vocab: int) -> ArgmaxLaunch:
    """4096-element chunks (16 fp32 per thread at 8 warps): a 128k vocabulary gives 32 chunks
    per row, enough programs to fill the GPU even for a single row."""
    chunk = 4096
    return ArgmaxLaunch(chunk, triton.cdiv(vocab, chunk), chunk_warps=8)


def reduce_launch_meta(num_chunks: int) -> dict:
    """Constexprs and warps of stage 2 over ``num_chunks`` partial maxima per row (one warp up
    to 256 of them)."""
    block = triton.next_power_of_2(num_chunks)
    # INDEX_LIMIT exceeds any real index; int32 indices cover vocabularies below 2**31.
    return dict(BLOCK_CHUNKS=block, INDEX_LIMIT=2 ** 31 - 1,
                num_warps=max(1, min(8, block // 256)))


def reduce_chunks(chunk_max: torch.Tensor, chunk_idx: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """Stage 2 alone: per row, the first index among chunks holding the row's maximum (NaN
    first). chunk_max: fp32 and chunk_idx: int32 [B, n], contiguous, each chunk's maximum and
    the first index holding it, chunks in index order; out: int64 [B]. Returns out."""
    B, num_chunks = chunk_max.shape
    if B:
        _reduce_chunks_kernel[(B,)](chunk_max, chunk_idx, out, num_chunks,
                                    **reduce_launch_meta(num_chunks))
    return out


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """First index of each row's maximum (ties -> lowest index, like ``torch.argmax``).

    logits: [B, V] (fp32 normally; fp16 / bf16 accepted), last dim contiguous; a NaN counts
    as the maximum (the first NaN wins), as in ``torch.argmax``.
    out: optional int64 [B]. Returns int64 [B].
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"argmax: logits must be [B, V] with V > 0, got {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"argmax: logits dtype must be fp32, fp16 or bf16, got {logits.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError(f"argmax: logits' last dim must be contiguous, strides {logits.stride()}")
    B, vocab = logits.shape
    if vocab >= 2 ** 31 - 1:
        raise ValueError(f"argmax: vocabulary {vocab} too large for int32 indices")
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    elif out.shape != (B,) or out.dtype != torch.int64 or out.device != logits.device:
        raise ValueError(f"argmax: out must be int64 [{B}] on {logits.device}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if B == 0:
        return out
    launch = argmax_launch(vocab)
    chunk_max = torch.empty(B, launch.num_chunks, dtype=torch.float32, device=logits.device)
    chunk_idx = torch.empty(B, launch.num_chunks, dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(B, launch.num_chunks)](
        logits, chunk_max, chunk_idx, vocab, logits.stride(0), launch.num_chunks,
        CHUNK=launch.chunk, num_warps=launch.chunk_warps)
    return reduce_chunks(chunk_max, chunk_idx, out)
