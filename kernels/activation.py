"""SwiGLU's elementwise half: ``silu(gate) * up`` straight from the fused gate/up projection.

Optionally it also finishes a deferred RMSNorm: when the gate/up product was taken of the
*unnormalised* rows x (the norm weight folded into the projection's columns, see
``engine.model``), gate and up are first scaled by the row's 1 / rms(x). The scale is a per-row
scalar, so it commutes with the product; applying it here saves the norm kernel's launch and
its pass over x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.rmsnorm import check_norm_input, norm_block, row_inv_rms

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, norm_ptr, stride_x_row, stride_out_row, stride_norm_row,
                         inter, norm_hidden, eps, BLOCK: tl.constexpr, NORM_BLOCK: tl.constexpr,
                         SCALE_BY_RMS: tl.constexpr):
    """Grid (T, cdiv(inter, BLOCK)): program (t, j) takes column block j of row t.

    x: [T, 2 * inter] (gate then up), last dim contiguous; out: [T, inter] in x's dtype, last
    dim contiguous. With SCALE_BY_RMS, norm: [T, norm_hidden] (last dim contiguous) and gate and
    up are scaled by 1 / sqrt(mean(norm[t]^2) + eps) before the SiLU.
    """
    row = tl.program_id(0).to(tl.int64)
    if SCALE_BY_RMS:
        scale = row_inv_rms(norm_ptr + row * stride_norm_row, norm_hidden, eps, NORM_BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate_ptrs = x_ptr + row * stride_x_row + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    if SCALE_BY_RMS:  # in fp32: the product was already rounded once, by cuBLAS
        gate *= scale
        up *= scale
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_out_row + cols, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@dataclass(frozen=True)
class SiluLaunch:
    """Compile-time parameters of one ``_silu_and_mul_kernel`` launch."""

    constexprs: dict
    num_warps: int


def silu_launch(num_tokens: int, inter: int, norm_hidden: int = 0) -> SiluLaunch:
    """Block size and warps: 8 elements per thread (16-byte half-precision loads); few tokens
    get smaller blocks so a decode step of one token still spreads over many SMs. With a
    deferred norm (``norm_hidden`` > 0, the row length of x) each program first reads its whole
    row of x, in the same round trip as its gate and up blocks; 4096-column blocks (16 elements
    per thread) keep those repeated reads of x to a few per row."""
    if norm_hidden:
        block, num_warps = (4096, 8) if num_tokens >= 16 else (1024, 4)
    else:
        block, num_warps = (1024, 4) if num_tokens >= 16 else (256, 1)
    block = min(block, max(16, triton.next_power_of_2(inter)))
    constexprs = dict(BLOCK=block, NORM_BLOCK=norm_block(norm_hidden) if norm_hidden else 16,
                      SCALE_BY_RMS=norm_hidden > 0)
    return SiluLaunch(constexprs, num_warps=num_warps)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None,
                 norm_input: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """silu(gate) * up with fp32 arithmetic.

    x: [T, 2 * I] (gate then up; fp16 / bf16 / fp32), last dim contiguous.
    out: optional [T, I] in x's dtype with a contiguous last dim.
    norm_input: optional [T, H] with a contiguous last dim: gate and up are then first scaled by
    1 / sqrt(mean(norm_input[t]^2) + eps) (x is the projection of unnormalised rows).
    Returns [T, I] in x's dtype.
    """
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul: x must be [T, 2 * I], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"silu_and_mul: x dtype must be fp16, bf16 or fp32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: x's last dim must be contiguous, strides {x.stride()}")
    T, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    elif (out.shape != (T, inter) or out.dtype != x.dtype or out.stride(-1) != 1
          or out.device != x.device):
        raise ValueError(f"silu_and_mul: out must be {x.dtype} [{T}, {inter}] on {x.device} with a "
                         f"contiguous last dim, got {out.dtype} {tuple(out.shape)}")
    if norm_input is not None:
        check_norm_input("silu_and_mul", norm_input, T, x.device)
    if T == 0 or inter == 0:
        return out
    launch = silu_launch(T, inter, 0 if norm_input is None else norm_input.shape[1])
    norm = x if norm_input is None else norm_input  # never read without SCALE_BY_RMS
    grid = (T, triton.cdiv(inter, launch.constexprs["BLOCK"]))
    _silu_and_mul_kernel[grid](
        x, out, norm, x.stride(0), out.stride(0), norm.stride(0), inter, norm.shape[1], eps,
        **launch.constexprs, num_warps=launch.num_warps)
    return out
