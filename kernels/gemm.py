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
neither a kernel nor a round trip of the [M, 2I] product through memory; ROW_ARGMAX
(``skinny_gemm_row_argmax``, the greedy LM head): each program stores, per row, only the maximum
of its fp32 tile and the first feature holding it, so the [M, V] logits are never written
(the head also runs past GEMM_MAX_ROWS, on ``kernels.lm_head``'s 128-row tiles).

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

Up to 16 rows (a decode step of 2-16 rows) the tile is computed transposed, out^T = W @ x^T
(SWAP_AB): Hopper's warpgroup MMA takes 64 rows on its A side and as few as 8 on its B side,
so the weights go on the A side and the batch rows on the narrow one, instead of a 16-row
tile on the older mma instructions. A program then covers at least 64 features, too few
programs for the narrow products, so those split K, and the last piece of each output tile
to arrive sums the pieces' fp32 partials in piece order and applies the epilogue. In the
chain at 8 rows: 1B 801 us against cuBLAS's 916, 8B 5012 against 5323 (bench/RESULTS.md).

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
# products (bench.gemm_chain, H100) it beat cuBLAS by 5-14% at 2 to 64 rows. At 128 rows it
# lost by 17-34% with 128-row tiles on two warpgroups (also with 64 features per program and
# split K) and with two 64-row tiles (bench/RESULTS.md).
GEMM_MIN_ROWS, GEMM_MAX_ROWS = 2, 64
PREFETCH_COLUMNS = 256  # weight columns per program prefetched into L2 before the wait
# A program per BLOCK_N features: the largest tile that still gives this many programs.
MIN_PROGRAMS = 96
# The pipeline: 128-column K tiles, as many stages as fit this budget (the H100 has 227 KB per
# block), at most MAX_STAGES. In the 1B chain on the H100 this beat 256-column tiles over four
# stages by 2.5-3% (bench/results/gemm_sweep_stages_b6e5fff.json); more stages of 64 columns
# ran 1.4-1.7x slower, and a 110 KB budget (two programs per SM) 1.1-1.8x slower.
SHARED_BYTES, MAX_STAGES, BLOCK_K = 220 * 1024, 8, 128

# Up to SWAP_AB_ROWS rows the product runs transposed, out^T = W @ x^T: the features fill the
# 64-row side of Hopper's warpgroup MMA and the rows its narrow side (16). A 16-row tile on the
# rows' side takes the older mma instructions, which ran 30-40% behind cuBLAS at 8 and 16 rows
# (bench/RESULTS.md). A program then takes at least SWAP_AB_FEATURES features, and a PLAIN
# product with too few such tiles splits K into up to MAX_SPLIT_K pieces to keep MIN_PROGRAMS
# (fewer programs, 64, made the 1B chain 5-8% slower). Transposed 32- and 64-row tiles lost to
# the 64-row tile in the chain (1% at 32 rows, 6% at 64), so more rows keep it.
SWAP_AB_ROWS, SWAP_AB_FEATURES, MAX_SPLIT_K = 16, 64, 8
SPLIT_COUNTERS = 4096  # output tiles a split-K launch may have (one arrival counter each)

PLAIN, NORM, PARTIAL_NORM = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of ``_skinny_gemm_kernel``: the tile (rows, features, K columns), warps,
    software-pipeline stages, whether the launch is a programmatic dependent one, and how many
    weight columns of its tile a program prefetches into L2 before it waits (a power-of-two
    multiple of 64, or 0); whether the tile is computed transposed (features on the MMA's
    64-row side); how many programs share one output tile's K loop (1: no split)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    pdl: bool = False
    prefetch_k: int = 0
    swap_ab: bool = False
    split_k: int = 1


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, prologue: int = PLAIN,
                pdl: bool = False, swiglu: bool = False) -> GemmConfig:
    """The launch shape for [M, K] x [N, K]^T in ``dtype``; a pure function.

    16-bit: every row in one M tile (16 or 64); BLOCK_N the largest of 128/64/32/16 that
    leaves >= MIN_PROGRAMS programs (the 1B products: QKV 32, output 16, gate/up 128, down 16;
    the 8B ones: 64, 32, 128, 32 — each the fastest alone of a 16-config sweep on the H100);
    BLOCK_K-column K tiles over as many stages as fit SHARED_BYTES (at most MAX_STAGES, 4
    under NORM). With SwiGLU, N is the gate/up weight's 2I and a program takes BLOCK_N / 2
    gate rows and as many up rows. Up to SWAP_AB_ROWS rows the tile is transposed and a
    program takes SWAP_AB_FEATURES features (twice that with SwiGLU), or 128 where that still
    leaves MIN_PROGRAMS; a PLAIN product short of MIN_PROGRAMS splits K in a power of two.
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
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(k)))
    swap_ab, split_k = m <= SWAP_AB_ROWS, 1
    if swap_ab:
        block_n = 2 * SWAP_AB_FEATURES if swiglu or triton.cdiv(n, 128) >= MIN_PROGRAMS \
            else SWAP_AB_FEATURES
        if prologue == PLAIN and not swiglu:
            k_steps = triton.cdiv(k, block_k)
            while (triton.cdiv(n, block_n) * split_k < MIN_PROGRAMS and split_k < MAX_SPLIT_K
                   and 2 * split_k <= k_steps):
                split_k *= 2
    else:
        block_n = next((b for b in (128, 64, 32) if triton.cdiv(n, b) >= MIN_PROGRAMS), 16)
    stage_bytes = (block_m + block_n) * block_k * 2
    # Under NORM the x tile's fp32 copy lives in registers: more stages spill.
    max_stages = 4 if prologue == NORM else MAX_STAGES
    num_stages = max(1, min(max_stages, SHARED_BYTES // stage_bytes))
    # 16-bit weights only (lines of 64 elements).
    prefetch_k = PREFETCH_COLUMNS if pdl else 0
    return GemmConfig(block_m, block_n, block_k, 4, num_stages, pdl, prefetch_k, swap_ab,
                      split_k)


def gemm_programs(config: GemmConfig, n: int, swiglu: bool = False) -> int:
    """Programs along the features: the rows of the ``row_sumsq`` partials a residual-adding
    launch writes. n: output features (I with ``swiglu``)."""
    return triton.cdiv(n, config.block_n // 2 if swiglu else config.block_n)


def gemm_launch_meta(config: GemmConfig, n: int, k: int, prologue: int, has_bias: bool,
                     add_residual: bool, swiglu: bool = False, write_sumsq: bool = False,
                     num_partials: int = 0, row_argmax: bool = False) -> dict:
    """Constexprs and launch options of one launch (what the AOT test compiles); n: output
    features (I with ``swiglu``); num_partials: the rows of the partials PARTIAL_NORM reads;
    row_argmax: the ``skinny_gemm_row_argmax`` epilogue instead of a stored product."""
    tile_n = config.block_n // 2 if swiglu else config.block_n  # output features a program
    steps = triton.cdiv(k, config.block_k)
    per_step = triton.next_power_of_2(triton.cdiv(num_partials, steps)) if num_partials else 1
    return dict(PROLOGUE=prologue, HAS_BIAS=has_bias, ADD_RESIDUAL=add_residual,
                WRITE_SUMSQ=write_sumsq, PARTIALS_PER_STEP=per_step, SWIGLU=swiglu,
                ROW_ARGMAX=row_argmax, SWAP_AB=config.swap_ab, SPLIT_K=config.split_k,
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
    config = config or gemm_config(M, N, K, weight.dtype, prologue, pdl=has_pdl(x.device),
                                   swiglu=swiglu)
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
    grid = (gemm_programs(config, features, swiglu) * triton.cdiv(M, config.block_m), 1,
            config.split_k)
    # Unused pointer arguments get x (never read: their constexpr switches are off).
    partials, counters, k_piece = x, x, K
    if config.split_k > 1:
        if swiglu or prologue != PLAIN:
            raise ValueError("skinny_gemm: split K takes the PLAIN prologue and no SwiGLU")
        if grid[0] > SPLIT_COUNTERS:
            raise ValueError(f"skinny_gemm: split K takes at most {SPLIT_COUNTERS} output "
                             f"tiles, got {grid[0]}")
        if M:
            partials = _alloc_split_partials(config.split_k, M, features, x.device)
            counters = _split_counters(x.device)
        k_piece = triton.cdiv(triton.cdiv(K, config.split_k), config.block_k) * config.block_k
    if M == 0:
        return out
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        row_sumsq if row_sumsq is not None else x, partials, counters, x, M, features, K,
        k_piece, x.stride(0), out.stride(0), eps, num_partials, launch_pdl=config.pdl,
        **gemm_launch_meta(config, features, K, prologue, bias is not None, add_residual, swiglu,
                           writes_sumsq, num_partials))
    return out


def _alloc_split_partials(split_k: int, rows: int, features: int,
                          device: torch.device) -> torch.Tensor:
    """fp32 [split_k, rows, features]: each K piece's products, summed by the last to arrive
    (its own function so tests can hand the kernel a poisoned buffer)."""
    return torch.empty(split_k, rows, features, dtype=torch.float32, device=device)


def skinny_gemm_row_argmax(x: torch.Tensor, weight: torch.Tensor, best: torch.Tensor,
                           first: torch.Tensor, config: GemmConfig) -> None:
    """Per row of x @ weight.T (fp32), each program's maximum over its features and the first
    feature holding it: the first stage of a greedy LM head that never writes the logits
    (``kernels.lm_head`` reduces over the programs). A NaN counts as the maximum (the first
    NaN wins), as in ``torch.argmax``.

    x: [M, K], last dim contiguous, any M (the M tiles of one weight tile run side by side);
    weight: [N, K] contiguous, x's dtype; best: fp32 [M, P] and first: int32 [M, P],
    contiguous, P = ``gemm_programs(config, N)``: column j gets program j's maximum and its
    feature index; config: a tile without split K (``kernels.lm_head.head_config``). The
    caller validates x and weight.
    """
    M, (N, K) = x.shape[0], weight.shape
    if config.split_k != 1:
        raise ValueError("skinny_gemm_row_argmax: split K is not supported")
    programs = gemm_programs(config, N)
    for name, t, dtype in (("best", best, torch.float32), ("first", first, torch.int32)):
        if (t.dtype != dtype or t.shape != (M, programs) or not t.is_contiguous()
                or t.device != x.device):
            raise ValueError(f"skinny_gemm_row_argmax: {name} must be contiguous {dtype} "
                             f"[{M}, {programs}] on {x.device}, got {t.dtype} {tuple(t.shape)}")
    if N >= 2 ** 31 - 1:
        raise ValueError(f"skinny_gemm_row_argmax: {N} features are too many for int32 indices")
    if M == 0:
        return
    grid = (programs * triton.cdiv(M, config.block_m), 1, 1)
    _skinny_gemm_kernel[grid](
        x, weight, x, best, x, x, x, first, M, N, K, K, x.stride(0), programs, 0.0, 0,
        launch_pdl=config.pdl,
        **gemm_launch_meta(config, N, K, PLAIN, False, False, row_argmax=True))


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """The device's split-K arrival counters: int32 [SPLIT_COUNTERS], zero between launches
    (the last program of each output tile resets its own), so every launch and CUDA graph
    shares them; kernels on one stream never run their reductions at once (a dependent
    launch reaches its reduction only after its wait for the previous grid)."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_gemm: run a split-K launch once before capturing a CUDA "
                               "graph; its counters are allocated then")
        counters = _counters[device] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32,
                                                   device=device)
    return counters


@triton.jit
def prefetch_to_l2(ptrs):
    """Ask the memory system to bring the 128-byte lines at ``ptrs`` into L2 (no registers
    are filled, nothing waits). The returned zeros are unused."""
    return tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_columns_to_l2(rows, first, K, COLUMNS: tl.constexpr):
    """Ask the L2 for columns [first, first + COLUMNS) of the 16-bit weight rows ``rows``
    ([R, 1] pointers to rows of length K): one address per 128-byte line, clamped into the
    row (a tile may overhang it). COLUMNS: a multiple of 64."""
    lines = tl.minimum(first + tl.arange(0, COLUMNS // 64) * 64, K - 1)
    prefetch_to_l2(rows + lines[None, :])


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
def _accumulate(a, w, acc, SWAP_AB: tl.constexpr):
    """acc + a @ w^T (a: [BLOCK_M, BLOCK_K] x tile, w: [TILE_N, BLOCK_K] weight tile, acc:
    fp32 [BLOCK_M, TILE_N]), or with SWAP_AB its transpose acc + w @ a^T (acc [TILE_N,
    BLOCK_M]), which puts the features on the MMA's 64-row side."""
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    return acc


@triton.jit
def _sum_split_k(acc, partials_ptr, counter_ptr, offs_m, offs_n, mask, M, N,
                 SPLIT_K: tl.constexpr):
    """Publish this program's partial product of its output tile and, in the tile's last
    program to arrive, return the sum of all SPLIT_K partials, added in piece order (so the
    result does not depend on which program came last); returns (sum or the partial, is_last).

    partials: fp32 [SPLIT_K, M, N]; counter: one int32 per output tile, zero on entry and
    reset by the last program.
    """
    tile = tl.program_id(0)
    ptrs = partials_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptrs + tl.program_id(2) * M * N, acc, mask=mask)
    # Every thread's stores come before the release of the counter increment.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    is_last = arrived == SPLIT_K - 1
    if is_last:
        acc = tl.zeros_like(acc)
        for piece in tl.static_range(SPLIT_K):
            # .cg: from L2, where the other SMs' partials are (never a stale L1 line).
            acc += tl.load(ptrs + piece * M * N, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")
    return acc, is_last


@triton.jit
def _tile_row_argmax(acc, live, offs_n, N):
    """Per row of the fp32 tile acc [BLOCK_M, TILE_N] (features offs_n [TILE_N], ``live``
    masking the tile's overhang): the maximum and the first feature holding it, both [BLOCK_M].
    A NaN counts as larger than any number and the first NaN wins, as in ``torch.argmax``."""
    values = tl.where(live, acc, float("-inf"))
    is_nan = values != values
    first_nan = tl.min(tl.where(is_nan, offs_n[None, :], N), axis=1)
    values = tl.where(is_nan, float("-inf"), values)
    best = tl.max(values, axis=1)
    # Overhanging lanes hold -inf too, but their indices come after every real one.
    first = tl.min(tl.where(values == best[:, None], offs_n[None, :], N), axis=1)
    has_nan = first_nan < N
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, first_nan, first)


@triton.jit
def _skinny_gemm_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, sumsq_ptr, partials_ptr, counter_ptr, idx_ptr, M, N,
        K, K_PIECE, stride_xm, stride_om, eps, num_partials, PROLOGUE: tl.constexpr,
        HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr, WRITE_SUMSQ: tl.constexpr,
        PARTIALS_PER_STEP: tl.constexpr, SWIGLU: tl.constexpr, ROW_ARGMAX: tl.constexpr,
        SWAP_AB: tl.constexpr,
        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr, PREFETCH_CHUNK: tl.constexpr):
    """Grid (cdiv(N, TILE_N) * cdiv(M, BLOCK_M), 1, SPLIT_K): program (j * cdiv(M, BLOCK_M) + i,
    0, s) computes out tile (i, j) over K columns [s * K_PIECE, (s + 1) * K_PIECE), with
    TILE_N = BLOCK_N (BLOCK_N / 2 with SWIGLU).

    x: [M, K], rows ``stride_xm`` apart; W: [N, K] contiguous ([2N, K] with SWIGLU: gate rows
    then up rows); bias: [N]; out: [M, N], rows ``stride_om`` apart, read first
    when ADD_RESIDUAL. sumsq: fp32 [num_partials, M] contiguous, partial sums of squares of
    x's rows that sum to the whole row's (PARTIAL_NORM reads PARTIALS_PER_STEP of them per K
    step); with WRITE_SUMSQ (and ADD_RESIDUAL), row j of it gets program j's sums of its
    rounded output features. SWAP_AB: the tile is accumulated transposed, [TILE_N, BLOCK_M]
    = W tile @ x tile^T (TILE_N a multiple of 64), and turned back once after the loop.
    SPLIT_K > 1 (PLAIN, no SWIGLU; K_PIECE a multiple of BLOCK_K): the pieces meet in fp32
    ``partials`` [SPLIT_K, M, N] and the last to finish applies the epilogue
    (``_sum_split_k``); counter: int32 [tiles], zero on entry and on exit.
    ROW_ARGMAX (PLAIN, no bias, residual or SWIGLU, SPLIT_K = 1): nothing is stored but, at
    column j of out (fp32) and idx (int32), both [M, stride_om], each row's maximum over
    program j's features and the first feature holding it (``_tile_row_argmax``).
    PDL: launched as a programmatic dependent launch (Hopper): release the next kernel,
    prefetch PREFETCH_K weight columns into L2, then wait for the previous grid.
    """
    TILE_N: tl.constexpr = BLOCK_N // 2 if SWIGLU else BLOCK_N
    # The M tiles of one weight tile are neighbours in launch order, so they run side by side
    # and share its stream through the L2 instead of reading the weights once per M tile.
    m_tiles = tl.cdiv(M, BLOCK_M)
    tile_m = tl.program_id(0) % m_tiles
    tile_n = tl.program_id(0) // m_tiles
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * TILE_N + tl.arange(0, TILE_N)
    offs_k = tl.arange(0, BLOCK_K)
    if SPLIT_K == 1:
        k_begin = 0
        k_end = K
    else:
        k_begin = tl.program_id(2) * K_PIECE
        k_end = tl.minimum(K, k_begin + K_PIECE)
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
            prefetch_columns_to_l2(rows, k_begin + chunk, K, PREFETCH_CHUNK)
            if SWIGLU:
                prefetch_columns_to_l2(rows + N.to(tl.int64) * K, k_begin + chunk, K,
                                       PREFETCH_CHUNK)
        tl.extra.cuda.gdc_wait()

    if SWAP_AB:
        acc = tl.zeros([TILE_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([TILE_N, BLOCK_M], dtype=tl.float32)
    else:
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
    for k0 in range(k_begin, k_end, BLOCK_K):
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
        acc = _accumulate(a, w, acc, SWAP_AB)
        if SWIGLU:
            if EVEN_N and EVEN_K:
                w_up = tl.load(up_rows + k[None, :])
            else:
                w_up = tl.load(up_rows + k[None, :], mask=w_mask, other=0.0)
            acc_up = _accumulate(a, w_up, acc_up, SWAP_AB)

    if SWAP_AB:  # back to [BLOCK_M, TILE_N] for the epilogue (one shared-memory round trip)
        acc = tl.trans(acc)
        if SWIGLU:
            acc_up = tl.trans(acc_up)
    out_mask = m_live[:, None] & n_live[None, :]
    if SPLIT_K > 1:
        acc, is_last = _sum_split_k(acc, partials_ptr, counter_ptr, offs_m, offs_n, out_mask, M,
                                    N, SPLIT_K)
        out_mask = out_mask & is_last  # the other pieces are done
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
    if ROW_ARGMAX:
        best, first = _tile_row_argmax(acc, out_mask, offs_n, N)
        at = offs_m.to(tl.int64) * stride_om + tile_n
        tl.store(out_ptr + at, best, mask=m_live)
        tl.store(idx_ptr + at, first, mask=m_live)
    else:
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        if ADD_RESIDUAL:
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, out, mask=out_mask)
        if WRITE_SUMSQ:  # of the values stored, as a NORM prologue reading them back would see
            squares = tl.where(out_mask, out.to(tl.float32) * out.to(tl.float32), 0.0)
            rows_stored = m_live
            if SPLIT_K > 1:
                rows_stored = rows_stored & is_last
            tl.store(sumsq_ptr + tile_n * M + offs_m, tl.sum(squares, axis=1),
                     mask=rows_stored)
