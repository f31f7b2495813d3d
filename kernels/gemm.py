"""Skinny tensor-core GEMM for a decode step of ``GEMM_MIN_ROWS`` to ``GEMM_MAX_ROWS`` rows, with
the layer's neighbouring ops fused and a programmatic dependent launch.

    out[M, N] = epilogue(A[M, K] @ W[N, K]^T),  A = prologue(x)

Prologues: PLAIN (A = x), NORM (RMSNorm without a weight, i.e. one folded into W: the row's
sum of squares is accumulated from the x tiles the product streams anyway, and 1 / rms(x)
scales the fp32 accumulator, a per-row scalar that commutes with the product) and
PARTIAL_NORM (the same scale, from the per-program partial sums of squares that the launch
which wrote x left behind: see below). Epilogues: bias; residual add in place (out aliases
residual; each element is read and written by one program), optionally writing each row's sum
of squares over the program's features (``row_sumsq``); SWIGLU: W is the fused gate/up
projection [2I, K] and the program takes matching gate and up rows, so it writes
silu(gate) * up [M, I] straight from its two fp32 accumulators — the MLP's activation costs
neither a kernel nor a round trip of the [M, 2I] product through memory.

At these sizes a projection is a stream over its weight matrix (64 rows: 64 FLOPs per weight
byte, a tenth of the H100's ridge point), so the kernel is cut to keep every SM streaming
weights: one program per BLOCK_N output features, the whole K loop in the program (split K
with an in-kernel reduction gained 2% on one product and lost on the others in the step's
chain), every row in one M tile. What cuBLAS does not do at these sizes is overlap one product's
start with the previous kernel's end: each of a layer's small products loses a few
microseconds to launch and pipeline fill. Here, on Hopper, every launch is a programmatic
dependent launch: a program first allows the next kernel to launch, prefetches the first
weight columns of its tile into L2 (weights never depend on the previous kernel), and only
then waits for the previous grid's writes (``gdc_wait``) before it reads activations.

In a 16-layer chain of the 1B shape's products at 64 rows (``bench.gemm_chain``, H100,
bench/RESULTS.md): cuBLAS 972 us, this kernel 962 us without dependent launches, 897 us with them.

The operand feeding the tensor cores must come straight from the pipelined loads: an
activation computed in registers (SiLU-and-mul as a prologue of the down projection) had to be
written back to shared memory every iteration and ran about 3x slower than cuBLAS on the H100,
hence the SwiGLU epilogue instead. The NORM prologue's sum of squares costs
a few percent on narrow tiles and more where its registers cost pipeline stages, so a decode
step defers its QKV norm to the RoPE kernel when it can (``kernels.linear``). The normalised
product that follows a residual add does better still: the residual's writer already holds every
new residual value in registers, so each of its programs stores the sum of squares of its tile's
rows ([programs, M] fp32, a few KB), and the reader sums those partials, a few rows per K step,
instead of squaring its x tiles: on the H100 the decode steps of 32 and 64 rows took 2.4-2.6%
less time (1B) and 1.8-1.9% less (8B) (bench/RESULTS.md). The partials are added elementwise
in the K loop and summed across them once after it: a sum per step crosses warps, a barrier
every step, and made the same steps 4% (1B) and 7% (8B) slower.

Numerics: fp32 accumulation (``input_precision="ieee"``: fp32 operands are exact IEEE
products, no tf32); the normalised activation is not rounded before the product (the scale
comes after it); outputs (and residual sums) are rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.device import has_pdl

# Rows the engine gives this kernel (kernels.linear). In a 16- / 32-layer chain of a step's
# products (bench.gemm_chain, H100) it beat cuBLAS by 2-9% at 32 and 64 rows, and lost by
# 30-40% at 8 and 16, where its 16-row tiles run on the older mma instructions. At 128 rows it
# lost by 17-34% with 128-row tiles on two warpgroups (also with 64 features per program and
# split K) and with two 64-row tiles (bench/RESULTS.md).
GEMM_MIN_ROWS, GEMM_MAX_ROWS = 17, 64
PREFETCH_COLUMNS = 256  # weight columns per program prefetched into L2 before the wait
# A program per BLOCK_N features: the largest tile that still gives this many programs.
MIN_PROGRAMS = 96
# The pipeline: 128-column K tiles, as many stages as fit this budget (the H100 has 227 KB per
# block), at most MAX_STAGES. In the 1B chain on the H100 this beat 256-column tiles over four
# stages by 2.5-3% (bench/results/gemm_sweep_stages_b6e5fff.json); more stages of 64 columns
# ran 1.4-1.7x slower, and a 110 KB budget (two programs per SM) 1.1-1.8x slower.
SHARED_BYTES, MAX_STAGES, BLOCK_K = 220 * 1024, 8, 128

PLAIN, NORM, PARTIAL_NORM = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of ``_skinny_gemm_kernel``: the tile (rows, features, K columns), warps,
    software-pipeline stages, whether the launch is a programmatic dependent one, and how many
    weight columns of its tile a program prefetches into L2 before it waits (a power-of-two
    multiple of 64, or 0)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    pdl: bool = False
    prefetch_k: int = 0


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, prologue: int = PLAIN,
                pdl: bool = False) -> GemmConfig:
    """The launch shape for [M, K] x [N, K]^T in ``dtype``; a pure function.

    16-bit: every row in one M tile (16 or 64); BLOCK_N the largest of 128/64/32/16 that
    leaves >= MIN_PROGRAMS programs (the 1B products: QKV 32, output 16, gate/up 128, down 16;
    the 8B ones: 64, 32, 128, 32 — each the fastest alone of a 16-config sweep on the H100);
    BLOCK_K-column K tiles over as many stages as fit SHARED_BYTES (at most MAX_STAGES, 4
    under NORM). With SwiGLU, N is the gate/up weight's 2I and a program takes BLOCK_N / 2
    gate rows and as many up rows.
    fp32 (parity runs only): IEEE products on CUDA cores, small tiles, no pipeline.
    """
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"gemm_config: sizes must be positive, got M={m} N={n} K={k}")
    if m > GEMM_MAX_ROWS:
        raise ValueError(f"gemm_config: at most {GEMM_MAX_ROWS} rows, got {m}")
    if dtype not in _DTYPES:
        raise ValueError(f"gemm_config: dtype must be fp16/bf16/fp32, got {dtype}")
    block_m = 16 if m <= 16 else 64
    if dtype == torch.float32:
        return GemmConfig(block_m, 32, 32, 4, 1, pdl)  # no prefetch: parity runs only
    block_n = next((b for b in (128, 64, 32) if triton.cdiv(n, b) >= MIN_PROGRAMS), 16)
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(k)))
    stage_bytes = (block_m + block_n) * block_k * 2
    # Under NORM the x tile's fp32 copy lives in registers: more stages spill.
    max_stages = 4 if prologue == NORM else MAX_STAGES
    num_stages = max(1, min(max_stages, SHARED_BYTES // stage_bytes))
    # 16-bit weights only (lines of 64 elements).
    prefetch_k = PREFETCH_COLUMNS if pdl else 0
    return GemmConfig(block_m, block_n, block_k, 4, num_stages, pdl, prefetch_k)


def gemm_programs(config: GemmConfig, n: int, swiglu: bool = False) -> int:
    """Programs along the features: the rows of the ``row_sumsq`` partials a residual-adding
    launch writes. n: output features (I with ``swiglu``)."""
    return triton.cdiv(n, config.block_n // 2 if swiglu else config.block_n)


def gemm_launch_meta(config: GemmConfig, n: int, k: int, prologue: int, has_bias: bool,
                     add_residual: bool, swiglu: bool = False, write_sumsq: bool = False,
                     num_partials: int = 0) -> dict:
    """Constexprs and launch options of one launch (what the AOT test compiles); n: output
    features (I with ``swiglu``); num_partials: the rows of the partials PARTIAL_NORM reads."""
    tile_n = config.block_n // 2 if swiglu else config.block_n  # output features a program
    steps = triton.cdiv(k, config.block_k)
    per_step = triton.next_power_of_2(triton.cdiv(num_partials, steps)) if num_partials else 1
    return dict(PROLOGUE=prologue, HAS_BIAS=has_bias, ADD_RESIDUAL=add_residual,
                WRITE_SUMSQ=write_sumsq, PARTIALS_PER_STEP=per_step, SWIGLU=swiglu,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                EVEN_N=n % tile_n == 0, EVEN_K=k % config.block_k == 0, PDL=config.pdl,
                PREFETCH_K=config.prefetch_k if config.pdl else 0,
                PREFETCH_CHUNK=min(PREFETCH_COLUMNS, max(64, config.prefetch_k)),
                num_warps=config.num_warps, num_stages=config.num_stages)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, prologue: int = PLAIN,
                bias: torch.Tensor | None = None, eps: float = 0.0,
                add_residual: bool = False, swiglu: bool = False,
                row_sumsq: torch.Tensor | None = None,
                config: GemmConfig | None = None) -> torch.Tensor:
    """out = [out +] prologue(x) @ weight.T [+ bias], or silu(gate) * up of that product with
    ``swiglu``; returns out.

    x: [M, K], last dim contiguous, M <= GEMM_MAX_ROWS; weight: [N, K] contiguous (with
    ``swiglu``: the gate rows then the up rows, N = 2I); bias: [N] contiguous or None;
    NORM: A = RMSNorm(x) with ``eps`` and no weight; PARTIAL_NORM: the same, with x's sums of
    squares read from ``row_sumsq``; out: [M, N] ([M, I] with ``swiglu``) with a contiguous last
    dim, the residual when ``add_residual``; all x's dtype (fp16 / bf16 / fp32).
    row_sumsq: fp32 [P, M] contiguous. PARTIAL_NORM reads it (any P >= 1: rows that sum to
    each x row's sum of squares). With ``add_residual`` (and any prologue but PARTIAL_NORM) it
    is written, with P = ``gemm_programs(config, N)``: row j holds, for every row of the new
    out, the sum of squares of the features program j stored.
    The caller (``kernels.linear``) validates x, weight and out.
    """
    M, (N, K) = x.shape[0], weight.shape
    if swiglu and (bias is not None or add_residual or N % 2):
        raise ValueError("skinny_gemm: swiglu takes an even number of weight rows, no bias and "
                         "no residual")
    config = config or gemm_config(M, N, K, weight.dtype, prologue, pdl=has_pdl(x.device))
    features = N // 2 if swiglu else N
    reads_sumsq = prologue == PARTIAL_NORM
    writes_sumsq = row_sumsq is not None and not reads_sumsq
    num_partials = row_sumsq.shape[0] if reads_sumsq and row_sumsq is not None else 0
    if writes_sumsq and not add_residual:
        raise ValueError("skinny_gemm: row_sumsq is written by a residual add only")
    if reads_sumsq or writes_sumsq:
        if row_sumsq is None:
            raise ValueError("skinny_gemm: PARTIAL_NORM needs row_sumsq")
        rows = gemm_programs(config, features, swiglu) if writes_sumsq else num_partials
        if (row_sumsq.dtype != torch.float32 or row_sumsq.shape != (rows, M) or rows < 1
                or not row_sumsq.is_contiguous() or row_sumsq.device != x.device):
            raise ValueError(f"skinny_gemm: row_sumsq must be contiguous fp32 [{rows}, {M}] on "
                             f"{x.device}, got {row_sumsq.dtype} {tuple(row_sumsq.shape)}")
    if M == 0:
        return out
    grid = (gemm_programs(config, features, swiglu), triton.cdiv(M, config.block_m))
    # Unused pointer arguments get x (never read: their constexpr switches are off).
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        row_sumsq if row_sumsq is not None else x, M, features, K, x.stride(0),
        out.stride(0), eps, num_partials, launch_pdl=config.pdl,
        **gemm_launch_meta(config, features, K, prologue, bias is not None, add_residual, swiglu,
                           writes_sumsq, num_partials))
    return out


@triton.jit
def _prefetch_to_l2(ptrs):
    """Ask the memory system to bring the 128-byte lines at ``ptrs`` into L2 (no registers
    are filled, nothing waits). The returned zeros are unused."""
    return tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_partials(sumsq_ptr, part, offs_m, m_live, M, num_partials, LOAD: tl.constexpr,
                   PARTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """fp32 [PARTS, BLOCK_M]: rows ``part`` of the [num_partials, M] partial sums of squares,
    zero past the last (all zero, and no load, unless LOAD)."""
    if LOAD:
        mask = (part < num_partials)[:, None] & m_live[None, :]
        return tl.load(sumsq_ptr + part[:, None] * M + offs_m[None, :], mask=mask, other=0.0)
    return tl.zeros([PARTS, BLOCK_M], dtype=tl.float32)


@triton.jit
def _skinny_gemm_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, sumsq_ptr, M, N, K, stride_xm, stride_om, eps,
        num_partials, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
        ADD_RESIDUAL: tl.constexpr, WRITE_SUMSQ: tl.constexpr, PARTIALS_PER_STEP: tl.constexpr,
        SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
        PREFETCH_CHUNK: tl.constexpr):
    """Grid (cdiv(N, TILE_N), cdiv(M, BLOCK_M)): program (j, i) computes out tile (i, j), with
    TILE_N = BLOCK_N (BLOCK_N / 2 with SWIGLU).

    x: [M, K], rows ``stride_xm`` apart; W: [N, K] contiguous ([2N, K] with SWIGLU: gate rows
    then up rows); bias: [N]; out: [M, N], rows ``stride_om`` apart, read first
    when ADD_RESIDUAL. sumsq: fp32 [num_partials, M] contiguous, partial sums of squares of
    x's rows that sum to the whole row's (PARTIAL_NORM reads PARTIALS_PER_STEP of them per K
    step); with WRITE_SUMSQ (and ADD_RESIDUAL), row j of it gets program j's sums of its
    rounded output features. PDL: launched as a programmatic dependent launch (Hopper): release the
    next kernel, prefetch PREFETCH_K weight columns into L2, then wait for the previous grid.
    """
    TILE_N: tl.constexpr = BLOCK_N // 2 if SWIGLU else BLOCK_N
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * TILE_N + tl.arange(0, TILE_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_live = offs_m < M
    n_live = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    up_rows = w_rows + N.to(tl.int64) * K  # SWIGLU: the up row of each gate row
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        # One address per 128-byte line, clamped into the matrix (a tile may overhang it), in
        # chunks of PREFETCH_CHUNK columns (a few address registers per thread).
        rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * K
        for chunk in range(0, PREFETCH_K, PREFETCH_CHUNK):
            lines = tl.minimum(chunk + tl.arange(0, PREFETCH_CHUNK // 64) * 64, K - 1)
            _prefetch_to_l2(rows + lines[None, :])
            if SWIGLU:
                _prefetch_to_l2(rows + N.to(tl.int64) * K + lines[None, :])
        tl.extra.cuda.gdc_wait()

    acc = tl.zeros([BLOCK_M, TILE_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, TILE_N], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    # PARTIAL_NORM: a few partials per K step, each loaded a step before it is added, so the
    # load's round trip overlaps a step instead of stalling the warps that issue the products;
    # added elementwise (a sum across the partials would cross warps, a barrier every step)
    # and summed once after the loop.
    part = tl.arange(0, PARTIALS_PER_STEP)
    partials = _load_partials(sumsq_ptr, part, offs_m, m_live, M, num_partials, PROLOGUE == 2,
                              PARTIALS_PER_STEP, BLOCK_M)
    partial_sums = tl.zeros([PARTIALS_PER_STEP, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if PROLOGUE == 2:
            partial_sums += partials
            part += PARTIALS_PER_STEP
            partials = _load_partials(sumsq_ptr, part, offs_m, m_live, M, num_partials, True,
                                      PARTIALS_PER_STEP, BLOCK_M)
        k = k0 + offs_k
        k_live = k < K
        w_mask = n_live[:, None] & k_live[None, :]  # only used where a tile can overhang
        x_ptrs = x_rows + k[None, :]
        x_mask = m_live[:, None] & k_live[None, :]
        a = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if PROLOGUE == 1:  # NORM
            # A load of its own (an L1 hit): the tensor cores' operand tile stays a pure
            # pipelined load. Reading that tile into registers as well gave wrong products at
            # 64 x 64 x 256 tiles over three stages on the H100.
            xf = tl.load(x_ptrs, mask=x_mask, other=0.0, cache_modifier=".ca").to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        if SWIGLU:
            if EVEN_N and EVEN_K:
                w_up = tl.load(up_rows + k[None, :])
            else:
                w_up = tl.load(up_rows + k[None, :], mask=w_mask, other=0.0)
            acc_up = tl.dot(a, tl.trans(w_up), acc_up, input_precision="ieee")

    if PROLOGUE == 2:
        sum_sq = tl.sum(partial_sums, axis=0)
    if PROLOGUE != 0:
        inv_rms = tl.math.rsqrt(sum_sq / K + eps)[:, None]
        acc = acc * inv_rms
        if SWIGLU:
            acc_up = acc_up * inv_rms
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_live, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = m_live[:, None] & n_live[None, :]
    if ADD_RESIDUAL:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=out_mask)
    if WRITE_SUMSQ:  # of the values stored, as a NORM prologue reading them back would see
        squares = tl.where(out_mask, out.to(tl.float32) * out.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + tl.program_id(0) * M + offs_m, tl.sum(squares, axis=1),
                 mask=m_live)
