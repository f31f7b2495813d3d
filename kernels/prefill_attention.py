"""Causal flash-attention forward over packed variable-length prompts (the prefill).

One program owns BLOCK_M query rows of one sequence and one query head. It walks the key
blocks left of its diagonal with no masking at all, then the one to BLOCK_M / BLOCK_N
diagonal blocks with the causal mask, keeping an online softmax (running max and sum, in
base 2 so each probability costs one ``exp2``). Key blocks right of the diagonal are never
touched. The kernel computes attention only; writing K/V into the slab is ``rope_kv_write``.

The online-softmax recurrence is FlashAttention's (Dao et al., 2022, Algorithm 1).
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


@triton.jit
def _load_rows(ptrs, rows, row_limit, offs_d,
               CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking rows >= row_limit only when CHECK_ROWS and the
    padded head-dim lanes only when BLOCK_D > HEAD_DIM, so full tiles load unmasked."""
    if CHECK_ROWS:
        mask = rows[:, None] < row_limit
        if BLOCK_D != HEAD_DIM:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_kv_block(acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                     seq_len, stride_kt, stride_vt, qk_scale,
                     ON_DIAGONAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Fold key/value block ``start_n .. start_n + BLOCK_N`` into the running softmax state.

    acc: fp32 [BLOCK_M, BLOCK_D] un-normalised output; row_sum, row_max: fp32 [BLOCK_M], the
    max in base-2 log units (scores already multiplied by scale * log2(e)).
    """
    cols = start_n + offs_n
    # Blocks left of the diagonal lie wholly inside the sequence: no bounds check there.
    k = _load_rows(k_ptrs + start_n * stride_kt, cols, seq_len, offs_d,
                   ON_DIAGONAL, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptrs + start_n * stride_vt, cols, seq_len, offs_d,
                   ON_DIAGONAL, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if ON_DIAGONAL:
        # Keys past the sequence end sit right of every live query, so the causal test
        # alone hides them from live rows; rows past the end are never stored.
        qk = tl.where(offs_m[:, None] >= cols[None, :], qk, float("-inf"))
    # qk_scale > 0, so max(qk) * scale is the max of the scaled scores and the
    # subtraction below folds into one multiply-add per score.
    new_max = tl.maximum(row_max, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - new_max[:, None])
    correction = tl.math.exp2(row_max - new_max)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, row_sum, new_max


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(max_seqlen, BLOCK_M), N, H_q).

    q_ptr: [T, H_q, HEAD_DIM], k_ptr, v_ptr: [T, H_kv, HEAD_DIM], out_ptr: [T, H_q, HEAD_DIM],
    all of one dtype (fp16 / bf16 / fp32) with a contiguous last dim; cu_seqlens_ptr: int32
    [N + 1]. group = H_q // H_kv; qk_scale = softmax scale * log2(e), > 0.
    BLOCK_M must be a multiple of BLOCK_N so the unmasked sweep ends exactly at the diagonal.
    """
    # The heaviest query blocks (most keys to their left) launch first, shortening the tail.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    start_m = block_m * BLOCK_M
    if start_m >= seq_len:
        return
    kv_head = head // group

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit token offset: T * row stride can pass 2**31 for long packed batches.
    token0 = seq_start.to(tl.int64)
    q_ptrs = (q_ptr + token0 * stride_qt + head * stride_qh
              + offs_m[:, None] * stride_qt + offs_d[None, :])
    k_ptrs = (k_ptr + token0 * stride_kt + kv_head * stride_kh
              + offs_n[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (v_ptr + token0 * stride_vt + kv_head * stride_vh
              + offs_n[:, None] * stride_vt + offs_d[None, :])
    q = _load_rows(q_ptrs, offs_m, seq_len, offs_d, True, HEAD_DIM, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    for start_n in range(0, start_m, BLOCK_N):
        acc, row_sum, row_max = _attend_kv_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
            seq_len, stride_kt, stride_vt, qk_scale,
            False, HEAD_DIM, BLOCK_D, DOT_PRECISION)
    # Every row sees key 0 (in the first block of either loop), so row_max is finite
    # before any fully masked diagonal block and no exp2(-inf - -inf) can appear.
    diagonal_end = tl.minimum(start_m + BLOCK_M, seq_len)
    for start_n in range(start_m, diagonal_end, BLOCK_N):
        acc, row_sum, row_max = _attend_kv_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
            seq_len, stride_kt, stride_vt, qk_scale,
            True, HEAD_DIM, BLOCK_D, DOT_PRECISION)

    out = acc / row_sum[:, None]
    out_ptrs = (out_ptr + token0 * stride_ot + head * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :])
    mask = offs_m[:, None] < seq_len
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Launch configuration ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for the H100.

    16-bit inputs: 128-row query blocks (one m64 tensor-core tile per warpgroup of 8 warps)
    against 64-key blocks; at D=128 a K or V tile is 16 KB, so 3 pipeline stages plus Q take
    128 KB of shared memory and the kernel needs 184 registers, no spills. fp32 is the
    exact-parity mode (ieee dot, no tensor cores): small tiles keep it out of local memory.
    Figures from ptxas for sm_90 (see tests/kernels/test_aot_compile_prefill.py).
    """
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        if block_d <= 64:
            return 64, 32, 8, 2
        return (32, 16, 8, 2) if block_d <= 128 else (16, 16, 4, 2)
    return (128, 64, 8, 3) if block_d <= 128 else (64, 32, 8, 2)


def _block_d(head_dim: int) -> int:
    # tl.dot needs every tile dimension to be at least 16.
    return max(16, triton.next_power_of_2(head_dim))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float | None = None, *, out: torch.Tensor | None = None,
                      config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention over packed variable-length prompts.

    q: [T, H_q, D]; k, v: [T, H_kv, D] with H_q % H_kv == 0; fp16, bf16 or fp32 (one dtype),
    any strides with a contiguous last dim (views of a fused QKV output are fine).
    cu_seqlens: int32 [N + 1] on q's device, non-decreasing from 0 to T; sequence n is tokens
    ``cu_seqlens[n]:cu_seqlens[n+1]`` (an empty sequence is allowed). max_seqlen: at least
    the longest sequence — it sizes the grid; rows of a longer sequence would be left
    unwritten (the contents of cu_seqlens are not checked: that would synchronise the GPU).
    scale: softmax scale, default D ** -0.5; must be > 0.
    out: optional [T, H_q, D] tensor of q's dtype (last dim contiguous) to write into.
    config: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` overriding
    ``prefill_config`` (for tuning sweeps and small-block tests).
    Returns out, [T, H_q, D] in q's dtype.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    T, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device \
            or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a "
                         f"contiguous last dim, got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device} with strides {out.stride()}")
    num_seqs = cu_seqlens.numel() - 1
    if T == 0 or num_seqs == 0 or max_seqlen == 0:
        return out

    block_m, block_n, num_warps, num_stages = config or prefill_config(head_dim, q.dtype)
    _check_blocks(block_m, block_n)
    if num_seqs > 65535:  # CUDA's limit on grid dims y and z
        raise ValueError(f"at most 65535 sequences per launch, got {num_seqs}")
    grid = (triton.cdiv(int(max_seqlen), block_m), num_seqs, num_q_heads)
    _prefill_attention_kernel[grid](
        q, k, v, out, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        num_q_heads // num_kv_heads, scale * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        # Exact fp32 products for the parity mode; the setting is moot for 16-bit inputs.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _check_blocks(block_m: int, block_n: int) -> None:
    # tl.dot needs tiles of at least 16; the unmasked sweep must end exactly at the diagonal.
    for name, size in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    if block_m % block_n != 0:
        raise ValueError(f"BLOCK_M ({block_m}) must be a multiple of BLOCK_N ({block_n})")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    T, num_q_heads, head_dim = q.shape
    if k.shape[0] != T or k.shape[2] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} must share T and D with q {tuple(q.shape)}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"H_q ({num_q_heads}) must be a multiple of H_kv ({num_kv_heads})")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{_MAX_HEAD_DIM}, got {head_dim}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"q, k, v need a contiguous last dim; strides {q.stride()}, "
                         f"{k.stride()}, {v.stride()}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [N + 1], got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v, cu_seqlens must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) \
            or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
