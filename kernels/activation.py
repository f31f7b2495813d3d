"""SwiGLU's elementwise half: ``silu(gate) * up`` straight from the fused gate/up projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x_row, stride_out_row, inter, BLOCK: tl.constexpr):
    """Grid (T, cdiv(inter, BLOCK)). x: [T, 2 * inter] (gate then up), last dim contiguous;
    out: [T, inter] in x's dtype, last dim contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate_ptrs = x_ptr + row * stride_x_row + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_out_row + cols, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@dataclass(frozen=True)
class SiluLaunch:
    """Compile-time parameters of one ``_silu_and_mul_kernel`` launch."""

    constexprs: dict
    num_warps: int


def silu_launch(num_tokens: int) -> SiluLaunch:
    """Block size and warps: 8 elements per thread (16-byte half-precision loads); few tokens
    get smaller blocks so a decode step of one token still spreads over many SMs."""
    if num_tokens >= 16:
        return SiluLaunch(dict(BLOCK=1024), num_warps=4)
    return SiluLaunch(dict(BLOCK=256), num_warps=1)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up with fp32 arithmetic.

    x: [T, 2 * I] (gate then up; fp16 / bf16 / fp32), last dim contiguous.
    out: optional [T, I] in x's dtype with a contiguous last dim.
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
    if T == 0 or inter == 0:
        return out
    launch = silu_launch(T)
    grid = (T, triton.cdiv(inter, launch.constexprs["BLOCK"]))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, **launch.constexprs,
                               num_warps=launch.num_warps)
    return out
