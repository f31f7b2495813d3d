"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer.

Each program normalises ``ROWS`` rows held whole in registers (hidden sizes up to 8192), so a
row is read once and written once. Small rows (e.g. Qwen3's per-head q/k norm, H = head_dim)
are packed several to a program to keep programs from being mostly idle lanes.

The weight may be None: a model whose norm weights are folded into the next projection's
columns (``engine.model``) normalises without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 8192
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    n_rows, rows_per_group, stride_x_group, stride_x_row, stride_res_row, eps,
    H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """Grid (cdiv(n_rows, ROWS),). Row r of x sits at (r // rows_per_group) * stride_x_group +
    (r % rows_per_group) * stride_x_row, which covers both [T, H] and strided [T, heads, H]
    views. out: contiguous [n_rows, H]. With ADD_RESIDUAL, residual row r (at
    r * stride_res_row) becomes residual + x, rounded to its dtype, and that sum is normalised.
    weight: [H], multiplied in when HAS_WEIGHT."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    r = r.to(tl.int64)
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (r < n_rows) & (cols < H)
    x_offsets = (r // rows_per_group) * stride_x_group + (r % rows_per_group) * stride_x_row
    x = tl.load(x_ptr + x_offsets + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        res_ptrs = residual_ptr + r * stride_res_row + cols
        total = x + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        # Normalise the sum as stored, so the next layer's residual and this norm agree.
        total = total.to(residual_ptr.dtype.element_ty)
        tl.store(res_ptrs, total, mask=mask)
        x = total.to(tl.float32)
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=1) / H + eps)[:, None]
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * H + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class RmsnormLaunch:
    """Compile-time parameters of one ``_rmsnorm_kernel`` launch."""

    constexprs: dict
    num_warps: int

    @property
    def rows_per_program(self) -> int:
        return self.constexprs["ROWS"]


def rmsnorm_launch(hidden: int, add_residual: bool, has_weight: bool = True) -> RmsnormLaunch:
    """The constexprs and warp count the wrappers use for rows of ``hidden`` elements."""
    block_h = triton.next_power_of_2(hidden)
    # Small rows: pack up to 2048 elements per program; big rows: one row per program.
    rows = max(1, min(16, 2048 // block_h))
    # About 16 elements per thread: a 4096-wide bf16 row is two 16-byte loads per lane.
    num_warps = max(1, min(16, rows * block_h // 512))
    return RmsnormLaunch(dict(H=hidden, BLOCK_H=block_h, ROWS=rows, ADD_RESIDUAL=add_residual,
                              HAS_WEIGHT=has_weight), num_warps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, fp32 arithmetic.

    x: [T, H] or [T, heads, H] (fp16 / bf16 / fp32), last dim contiguous, other strides free
    (a per-head view of a fused QKV output works without a copy); H <= 8192.
    weight: [H], any float dtype, or None (no weight). out: optional contiguous tensor of x's
    shape and dtype.
    Returns the normalised tensor, x's shape and dtype, contiguous.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"rmsnorm: x must be [T, H] or [T, heads, H], got {tuple(x.shape)}")
    hidden = x.shape[-1]
    _check_common("rmsnorm", x, weight, hidden)
    out = _check_out("rmsnorm", out, x)
    if x.dim() == 2:
        rows_per_group, stride_group, stride_row = 1, x.stride(0), 0
    else:
        rows_per_group, stride_group, stride_row = x.shape[1], x.stride(0), x.stride(1)
    _launch(x, x, weight, out, rows_per_group, stride_group, stride_row, 0, eps, False)
    return out


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                      eps: float, out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` in place (rounded to residual's dtype), then RMSNorm of that sum.

    x, residual: [T, H], same dtype (fp16 / bf16 / fp32), last dim contiguous; H <= 8192.
    weight: [H] or None. out: optional contiguous [T, H] in x's dtype.
    Returns (normed [T, H], residual).
    """
    if x.dim() != 2 or residual.shape != x.shape:
        raise ValueError(f"fused_add_rmsnorm: x and residual must both be [T, H], got "
                         f"{tuple(x.shape)} and {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rmsnorm: residual dtype {residual.dtype} must match x's "
                         f"{x.dtype}")
    hidden = x.shape[-1]
    _check_common("fused_add_rmsnorm", x, weight, hidden)
    if residual.stride(-1) != 1 or residual.device != x.device:
        raise ValueError("fused_add_rmsnorm: residual must be on x's device with a contiguous "
                         f"last dim, strides {residual.stride()}")
    out = _check_out("fused_add_rmsnorm", out, x)
    _launch(x, residual, weight, out, 1, x.stride(0), 0, residual.stride(0), eps, True)
    return out, residual


def _launch(x, residual, weight, out, rows_per_group, stride_group, stride_row, stride_res,
            eps, add_residual) -> None:
    n_rows = out.numel() // out.shape[-1]
    if n_rows == 0:
        return
    launch = rmsnorm_launch(x.shape[-1], add_residual, weight is not None)
    grid = (triton.cdiv(n_rows, launch.rows_per_program),)
    # Without a weight its pointer gets x (never read).
    _rmsnorm_kernel[grid](x, residual, x if weight is None else weight, out, n_rows,
                          rows_per_group, stride_group, stride_row, stride_res, eps,
                          **launch.constexprs, num_warps=launch.num_warps)


def _check_common(name: str, x: torch.Tensor, weight: torch.Tensor, hidden: int) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: x dtype must be fp16, bf16 or fp32, got {x.dtype}")
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {hidden} outside 1..{MAX_HIDDEN}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: x's last dim must be contiguous, strides {x.stride()}")
    if weight is not None and (weight.shape != (hidden,) or not weight.is_floating_point()
                               or not weight.is_contiguous() or weight.device != x.device):
        raise ValueError(f"{name}: weight must be a contiguous float [{hidden}] tensor on x's "
                         f"device, got {weight.dtype} {tuple(weight.shape)} on {weight.device}")


def _check_out(name: str, out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous {x.dtype} {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)} contiguous={out.is_contiguous()}")
    return out


@triton.jit
def row_inv_rms(row_ptr, hidden, eps, NORM_BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the row x [hidden] at row_ptr (contiguous), fp32; the
    deferred norm's scale. NORM_BLOCK from ``norm_block``: usually one load for the row."""
    offs = tl.arange(0, NORM_BLOCK)
    sum_sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
    for h0 in range(0, hidden, NORM_BLOCK):
        h = h0 + offs
        x = tl.load(row_ptr + h, mask=h < hidden, other=0.0).to(tl.float32)
        sum_sq += x * x
    return tl.math.rsqrt(tl.sum(sum_sq, axis=0) / hidden + eps)


def norm_block(hidden: int) -> int:
    """Elements of a row a kernel loads at once to take its sum of squares: the whole row up to
    ``MAX_HIDDEN`` (one round trip to memory), in a loop beyond."""
    return min(triton.next_power_of_2(max(1, hidden)), MAX_HIDDEN)


def check_norm_input(name: str, norm_input: torch.Tensor, num_tokens: int,
                     device: torch.device) -> None:
    """Validates the rows whose deferred 1 / rms a kernel applies after the product: a float
    [T, H] tensor on ``device`` with a contiguous last dim."""
    if (norm_input.dim() != 2 or norm_input.shape[0] != num_tokens or norm_input.shape[1] == 0
            or norm_input.stride(-1) != 1 or norm_input.dtype not in _DTYPES
            or norm_input.device != device):
        raise ValueError(f"{name}: norm_input must be a float [T={num_tokens}, H] tensor on "
                         f"{device} with a contiguous last dim, got {norm_input.dtype} "
                         f"{tuple(norm_input.shape)} strides {norm_input.stride()}")
