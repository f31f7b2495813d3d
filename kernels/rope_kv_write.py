"""RoPE on the new tokens' q and k, fused with writing k and v into the KV slab.

One program per new token: it rotates all of that token's query heads in place, rotates its
key heads, and stores the rotated keys and the values at ``(rows[t], positions[t])`` of the
``[B, C, H_kv, D]`` slab. Rotation is rotate-half (GPT-NeoX / Llama layout): the first and the
second half of each head form the (real, imaginary) pairs.

Optionally it also finishes a deferred RMSNorm: when q, k, v were projected from the
*unnormalised* rows x (the norm weight folded into the QKV projection's columns, see
``engine.model``), the program first scales them by its token's 1 / rms(x), a per-row scalar
that commutes with the product. That saves the norm kernel's launch and its pass over x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.device import has_pdl
from kernels.rmsnorm import check_norm_input, norm_block, row_inv_rms

_LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, rows_ptr, cos_ptr, sin_ptr,
    norm_ptr, stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok,
    stride_v_head, stride_kc_row, stride_kc_slot, stride_kc_head,
    stride_vc_row, stride_vc_slot, stride_vc_head, stride_norm_tok, norm_hidden, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_ROWS: tl.constexpr, SCALE_BY_RMS: tl.constexpr, NORM_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid (T,). q: [T, H_q, 2*HALF] rotated in place; k, v: [T, H_kv, 2*HALF] read;
    caches [B, C, H_kv, 2*HALF] written at (rows[t] or t, positions[t]) unless positions[t] < 0.
    cos, sin: fp32 [max_positions, HALF], contiguous. Last dims of all tensors contiguous.
    With SCALE_BY_RMS, norm: [T, norm_hidden] and q, k, v are first scaled by
    1 / sqrt(mean(norm[t]^2) + eps) (in fp32).
    PDL: launched as a programmatic dependent launch: let the next kernel (attention) launch,
    then wait for the previous one's writes (the projection) before reading anything."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tok = tl.program_id(0)
    pos = tl.load(positions_ptr + tok)
    live = pos >= 0
    if HAS_ROWS:
        row = tl.load(rows_ptr + tok).to(tl.int64)
    else:
        row = tok.to(tl.int64)
    # A dead token still computes with position 0's table; every store below is masked off.
    table_row = tl.maximum(pos, 0).to(tl.int64) * HALF

    q_dtype = q_ptr.dtype.element_ty
    scale = 1.0
    if SCALE_BY_RMS:
        scale = row_inv_rms(norm_ptr + tok.to(tl.int64) * stride_norm_tok, norm_hidden, eps,
                            NORM_BLOCK)

    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    cos = tl.load(cos_ptr + table_row + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + table_row + d, mask=d_ok, other=0.0)[None, :]

    hq = tl.arange(0, BLOCK_Q_HEADS)[:, None]
    # A dead token's q is left as is, except that a deferred scale still applies to it.
    q_mask = (hq < NUM_Q_HEADS) & d_ok[None, :] & (live | SCALE_BY_RMS)
    q_lo_ptrs = q_ptr + tok.to(tl.int64) * stride_q_tok + hq * stride_q_head + d[None, :]
    q_lo = _scaled(tl.load(q_lo_ptrs, mask=q_mask, other=0.0), scale, SCALE_BY_RMS)
    q_hi = _scaled(tl.load(q_lo_ptrs + HALF, mask=q_mask, other=0.0), scale, SCALE_BY_RMS)
    q_rot_lo = tl.where(live, q_lo * cos - q_hi * sin, q_lo)
    q_rot_hi = tl.where(live, q_hi * cos + q_lo * sin, q_hi)
    tl.store(q_lo_ptrs, q_rot_lo.to(q_dtype), mask=q_mask)
    tl.store(q_lo_ptrs + HALF, q_rot_hi.to(q_dtype), mask=q_mask)

    hk = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    kv_mask = (hk < NUM_KV_HEADS) & d_ok[None, :] & live
    k_lo_ptrs = k_ptr + tok.to(tl.int64) * stride_k_tok + hk * stride_k_head + d[None, :]
    k_lo = _scaled(tl.load(k_lo_ptrs, mask=kv_mask, other=0.0), scale, SCALE_BY_RMS)
    k_hi = _scaled(tl.load(k_lo_ptrs + HALF, mask=kv_mask, other=0.0), scale, SCALE_BY_RMS)
    # Round to k's own dtype before the cache's: an fp32 cache then holds exactly the keys a
    # half-precision model produces (the reference does the same).
    k_dtype = k_ptr.dtype.element_ty
    kc_dtype = k_cache_ptr.dtype.element_ty
    k_rot_lo = (k_lo * cos - k_hi * sin).to(k_dtype).to(kc_dtype)
    k_rot_hi = (k_hi * cos + k_lo * sin).to(k_dtype).to(kc_dtype)
    kc_lo_ptrs = (k_cache_ptr + row * stride_kc_row + pos.to(tl.int64) * stride_kc_slot
                  + hk * stride_kc_head + d[None, :])
    tl.store(kc_lo_ptrs, k_rot_lo, mask=kv_mask)
    tl.store(kc_lo_ptrs + HALF, k_rot_hi, mask=kv_mask)

    v_lo_ptrs = v_ptr + tok.to(tl.int64) * stride_v_tok + hk * stride_v_head + d[None, :]
    vc_lo_ptrs = (v_cache_ptr + row * stride_vc_row + pos.to(tl.int64) * stride_vc_slot
                  + hk * stride_vc_head + d[None, :])
    vc_dtype = v_cache_ptr.dtype.element_ty
    v_lo = _scaled(tl.load(v_lo_ptrs, mask=kv_mask, other=0.0), scale, SCALE_BY_RMS)
    v_hi = _scaled(tl.load(v_lo_ptrs + HALF, mask=kv_mask, other=0.0), scale, SCALE_BY_RMS)
    tl.store(vc_lo_ptrs, v_lo.to(q_dtype).to(vc_dtype), mask=kv_mask)
    tl.store(vc_lo_ptrs + HALF, v_hi.to(q_dtype).to(vc_dtype), mask=kv_mask)


@triton.jit
def _scaled(x, scale, SCALE_BY_RMS: tl.constexpr):
    """x in fp32, times the deferred norm scale with SCALE_BY_RMS (kept in fp32: the product
    was already rounded once, by cuBLAS)."""
    x = x.to(tl.float32)
    if SCALE_BY_RMS:
        x = x * scale
    return x


@dataclass(frozen=True)
class RopeLaunch:
    """Compile-time parameters of one ``_rope_kv_write_kernel`` launch."""

    constexprs: dict
    num_warps: int


def rope_launch(num_q_heads: int, num_kv_heads: int, head_dim: int, has_rows: bool,
                norm_hidden: int = 0, pdl: bool = False) -> RopeLaunch:
    """The constexprs and warp count the wrapper uses for these head counts and head size;
    ``norm_hidden`` > 0: a deferred norm over rows of that length (read in one go); ``pdl``: a
    programmatic dependent launch (Hopper)."""
    half = head_dim // 2
    constexprs = dict(
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), HAS_ROWS=has_rows,
        SCALE_BY_RMS=norm_hidden > 0, NORM_BLOCK=norm_block(norm_hidden) if norm_hidden else 16,
        PDL=pdl)
    # About 8 q elements per thread and half: enough bytes in flight without spilling.
    elements = constexprs["BLOCK_Q_HEADS"] * constexprs["BLOCK_HALF"]
    return RopeLaunch(constexprs, num_warps=max(1, min(8, elements // 256)))


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor | None = None,
                  norm_input: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """Rotate q (in place) and k of the new tokens with rotate-half RoPE; write k, v into the slab.

    q: [T, H_q, D]; k, v: [T, H_kv, D]; fp16 / bf16 / fp32, one dtype; any token and head
    strides (views of a fused QKV output are fine), last dim contiguous.
    k_cache, v_cache: [B, C, H_kv, D], q's dtype or fp32 (cast on store), last dim contiguous.
    positions: int32 [T], each token's slot and RoPE position; -1 = dead token (nothing written,
    its q left as is). Positions must be < C and < max_positions (not checked on the device).
    cos, sin: fp32 [max_positions, D // 2], contiguous (``kernels.rope_table.rope_cos_sin``).
    rows: int32 [T], each token's slab row (prefill packing); None means token t -> row t.
    norm_input: optional [T, H] (last dim contiguous), the unnormalised rows q, k, v were
    projected from: they are first scaled by 1 / sqrt(mean(norm_input[t]^2) + eps) (q in place
    too; a dead token's q is scaled but not rotated).
    D must be even; 64 and 128 are the tuned sizes, others run with masked lanes.
    """
    _check(q, k, v, k_cache, v_cache, positions, cos, sin, rows)
    T, num_q_heads, head_dim = q.shape
    if norm_input is not None:
        check_norm_input("rope_kv_write", norm_input, T, q.device)
    if T == 0:
        return
    pdl = has_pdl(q.device)
    launch = rope_launch(num_q_heads, k.shape[1], head_dim, rows is not None,
                         0 if norm_input is None else norm_input.shape[1], pdl)
    _rope_kv_write_kernel[(T,)](
        q, k, v, k_cache, v_cache, positions, positions if rows is None else rows, cos, sin,
        norm_input if norm_input is not None else q,  # q: never read without the scale
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        norm_input.stride(0) if norm_input is not None else 0,
        norm_input.shape[1] if norm_input is not None else 0, eps,
        launch_pdl=pdl, **launch.constexprs, num_warps=launch.num_warps)


def _check(q, k, v, k_cache, v_cache, positions, cos, sin, rows) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"rope_kv_write: q, k, v must be [T, heads, D], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    T, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"rope_kv_write: k and v must both be [T={T}, H_kv, D={D}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if D % 2:
        raise ValueError(f"rope_kv_write: head size must be even for rotate-half RoPE, got {D}")
    expected_cache = (k.shape[1], D)
    if (k_cache.dim() != 4 or k_cache.shape != v_cache.shape
            or tuple(k_cache.shape[2:]) != expected_cache):
        raise ValueError(f"rope_kv_write: k_cache and v_cache must both be "
                         f"[B, C, H_kv={k.shape[1]}, D={D}], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if q.dtype not in _LOAD_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"rope_kv_write: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"rope_kv_write: {name} dtype {cache.dtype} must be q's ({q.dtype}) "
                             f"or fp32")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"rope_kv_write: {name}'s last dim must be contiguous, "
                             f"strides {t.stride()}")
    if positions.shape != (T,) or positions.dtype != torch.int32:
        raise ValueError(f"rope_kv_write: positions must be int32 [T={T}], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if rows is not None:
        if rows.shape != (T,) or rows.dtype != torch.int32:
            raise ValueError(f"rope_kv_write: rows must be int32 [T={T}], got "
                             f"{rows.dtype} {tuple(rows.shape)}")
    elif T > k_cache.shape[0]:
        raise ValueError(f"rope_kv_write: without rows token t goes to row t, but T={T} exceeds "
                         f"the slab's B={k_cache.shape[0]}")
    for name, table in (("cos", cos), ("sin", sin)):
        if (table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != D // 2
                or not table.is_contiguous()):
            raise ValueError(f"rope_kv_write: {name} must be a contiguous fp32 [max_positions, "
                             f"{D // 2}] table, got {table.dtype} {tuple(table.shape)}")
    devices = {t.device for t in (q, k, v, k_cache, v_cache, positions, cos, sin)}
    if rows is not None:
        devices.add(rows.device)
    if len(devices) != 1:
        raise ValueError(f"rope_kv_write: all tensors must be on one device, got {devices}")
