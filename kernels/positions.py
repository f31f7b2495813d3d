"""The decode step's last op: every live row's position moves to the next slot, in place.

    positions[b] += 1  where positions[b] >= 0  (dead rows, -1, stay -1)

In torch this is three elementwise kernels (compare, cast, add) at the end of every decode
step's CUDA graph; each costs a launch and a drain, against a step of about a millisecond at
the small batch sizes. One kernel does it in one pass: on the H100 the 1B model's decode step
at B = 1 took 1.056 ms against 1.067, and up to 0.3% less at other batch sizes
(bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, NUM_WARPS = 1024, 4  # positions per program (one program up to 1024 rows), its warps


@triton.jit
def _advance_positions_kernel(positions_ptr, n, BLOCK: tl.constexpr):
    """Grid (cdiv(n, BLOCK),). positions: int32 [n], contiguous, read and written in place."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    position = tl.load(positions_ptr + offs, mask=live, other=-1)
    tl.store(positions_ptr + offs, tl.where(position >= 0, position + 1, position), mask=live)


def advance_positions(positions: torch.Tensor) -> torch.Tensor:
    """positions: int32 [B], contiguous; each entry >= 0 (a live row's slot) grows by one, -1
    (a dead row) stays. In place; returns positions."""
    if positions.dim() != 1 or positions.dtype != torch.int32 or not positions.is_contiguous():
        raise ValueError(f"advance_positions: positions must be contiguous int32 [B], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    n = positions.shape[0]
    if n:
        _advance_positions_kernel[(triton.cdiv(n, BLOCK),)](positions, n, BLOCK=BLOCK,
                                                            num_warps=NUM_WARPS)
    return positions
