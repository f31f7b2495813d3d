"""Split-KV decode attention (flash-decoding) over a padded [B, C] KV slab.

One query token per row attends to that row's first ``seq_lens[b]`` cached positions.
Work is cut into programs of (row, KV head, split). Each program loads every K/V tile once
for the whole group of query heads that share its KV head (GQA), runs an online softmax in
fp32, and either writes the final output (one split) or a normalised partial output plus its
log-sum-exp, which a second small kernel merges.

The launch grid depends only on (B, C, head shape, SM count), never on ``seq_lens``, so one
CUDA graph serves every batch of a bin. Inside, each split covers an equal share of the row's
*live* length (read on the device), so padding costs memory but not bandwidth, and rows of
very different lengths still spread over all splits. When a batch of up to 64 rows has more
programs than the GPU holds at once, rows are launched longest first (each program sorts the
batch's lengths on the device): the last programs to start are then the shortest, and the grid
does not end on a few long rows streaming alone while the rest of the GPU idles. On Hopper
both kernels are programmatic dependent launches: the attention grid launches while the kernel
before it (RoPE + K/V write, or the QKV projection, in a decode step) finishes and waits on the
device for its writes; with one split it releases the next kernel (the output projection) at
once, so that kernel's weight prefetch overlaps the attention; with splits, the merge's programs
are scheduled while the attention grid drains and wait for its results, which hides the second
launch.

Many short splits (at most two tiles each) load K and V straight to registers with an L2
evict-first hint instead of through a software pipeline (see ``decode_config``). Given the new
token unrotated (``NewToken``), the kernel also does RoPE and the slab write: every program
rotates its q, and the program whose split holds the new slot writes the rotated k and v there
before it streams, which saves the RoPE kernel's launch on small decode steps.

Numerics: tiles are loaded in the cache dtype; the two matrix products take 16-bit operands
and accumulate in fp32 (the products of 16-bit numbers are exact in fp32), softmax statistics
and accumulators are fp32. The probabilities are rounded to the cache dtype before the P·V
product, as every flash-attention kernel does, so the tensor cores read V straight from shared
memory. An fp32 cache uses IEEE fp32 products (no tf32) for exact parity tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.device import H100_NUM_SMS, has_pdl, sm_count
from kernels.rmsnorm import check_norm_input, norm_block, row_inv_rms

LOG2_E = 1.4426950408889634

# Tuning knobs of ``decode_config`` (the benchmark's --sweep shows what to set them to).
PROGRAMS_PER_SM_TARGET = 2  # split until B * H_kv * splits reaches this many programs per SM
MIN_SPLIT_POSITIONS = 128  # a split shorter than this many positions is mostly overhead
# ... except in short slabs (C <= SHORT_SLAB), where only small batches reach the limit and a
# step's attention is a few microseconds of latency: in the decode step (bench.attention_layers,
# 531 live positions of 1024, H100) splits of 64 instead of 128 took B = 1 from 7.0 to 5.5 µs a
# layer (D = 128) and 5.3 to 5.1 (D = 64), B = 2 from 7.6 to 6.5 and 6.1 to 5.6
# (bench/RESULTS.md).
SHORT_SLAB_MIN_SPLIT_POSITIONS = 64
MAX_SPLITS = 64
# 64 x 128 bf16 tiles over two warps take 254 registers a thread: four programs fit an SM.
SMALL_TILE_PROGRAMS_PER_SM = 4
SHORT_SPLIT_TILES = 2  # splits of at most this many tiles load unpipelined (see decode_config)
LONG_SLAB = 2048  # positions from which D = 128 slabs take 128 x 128 tiles (see decode_config)
SHORT_SLAB = 1024  # positions up to which slabs may take 32-position tiles (see decode_config)
SHORT_SLAB_MAX_PROGRAMS_PER_SM = 8  # D = 128 short slabs take them up to this many per SM
# Head dims per merge program: (1, 8192) merges 64 splits of 32 heads, and 64-dim blocks
# spread that over 64 programs (H100: 22.3 against 22.6 µs whole-head, bench/RESULTS.md).
MERGE_BLOCK_D = 64
# Longest-first launch sorts the lengths in every program: batches up to this size (on the
# H100 sweep a 256-row sort cost more than it saved at B = 256, where the many waves of
# programs balance already). The sort key packs a clamped length above 10 bits of row index,
# so capacities stay below 2**21.
MAX_SORTED_ROWS = 64
MAX_SORTED_CAPACITY = 1 << 21

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeConfig:
    """How one decode-attention call is cut up and compiled.

    block_n: KV positions per tile; num_splits: programs per (row, KV head) — 1 means the
    attention kernel writes the output itself and no merge runs; num_warps, num_stages: Triton
    launch options of the attention kernel (num_stages = tiles in flight in its loop);
    longest_first: launch rows in decreasing order of live length (sorted on the device);
    merge_pdl: launch the merge as a programmatic dependent launch (ignored where the GPU has
    none, i.e. before Hopper, and in the interpreter);
    evict_first: load K and V with an L2 evict-first policy, so streaming them replaces each
    other rather than what the L2 held before (Triton drops the hint from pipelined copies:
    it takes num_stages == 1).
    """

    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    longest_first: bool = False
    merge_pdl: bool = False
    evict_first: bool = False


@dataclass(frozen=True)
class NewToken:
    """Each row's new token, unrotated, for ``decode_attention`` to finish: rotate q and k
    (rotate-half RoPE) at the token's slot ``seq_lens[b] - 1``, write k and v there, attend.

    k, v: [B, H_kv, D] in q's dtype, one set of strides, last dim contiguous (views of a fused
    QKV product are fine); cos, sin: fp32 [max_positions, D // 2], contiguous
    (``kernels.rope_table``); norm_input: optional [B, H], the unnormalised rows q, k, v were
    projected from, whose 1 / sqrt(mean(x^2) + eps) scales q, k and v first (a deferred RMSNorm,
    as in ``kernels.rope_kv_write``). The numerics are ``rope_kv_write``'s: the slab gets the
    same values, and attention reads q rounded to its dtype after the rotation.
    """

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    norm_input: torch.Tensor | None = None
    eps: float = 0.0


def min_split_positions(capacity: int) -> int:
    """The fewest positions a full-length split of a ``capacity``-position slab may span."""
    return SHORT_SLAB_MIN_SPLIT_POSITIONS if capacity <= SHORT_SLAB else MIN_SPLIT_POSITIONS


def decode_config(batch: int, capacity: int, num_q_heads: int, num_kv_heads: int,
                  head_dim: int, dtype: torch.dtype, num_sms: int = H100_NUM_SMS) -> DecodeConfig:
    """The launch configuration for a slab of shape (batch, capacity); a pure function.

    It never sees ``seq_lens``: the grid it implies must serve every batch of the same shape.
    Splits grow (powers of two) until B * H_kv * splits reaches ``PROGRAMS_PER_SM_TARGET``
    programs per SM, limited so that a full-length split still spans
    ``min_split_positions(capacity)`` positions and a whole tile. dtype is the cache's.
    """
    _check_head_shape(num_q_heads, num_kv_heads, head_dim)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"decode attention supports fp16, bf16 and fp32 caches, got {dtype}")
    if batch < 1 or capacity < 1 or num_sms < 1:
        raise ValueError(f"batch, capacity and num_sms must be positive, got "
                         f"batch={batch}, capacity={capacity}, num_sms={num_sms}")
    d_pad = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        # IEEE fp32 products run on CUDA cores with operands in registers: small tiles, no
        # prefetch (ptxas spills otherwise). fp32 caches exist for parity tests, not speed.
        block_n, num_warps, num_stages = 32, 4 if d_pad <= 128 else 8, 1
    elif d_pad > 128:
        block_n, num_warps, num_stages = 32, 8, 3
    elif d_pad <= 64 and capacity <= SHORT_SLAB:
        # 32 x 64 tiles on one warp, three in flight: in the decode step (bench.attention_layers:
        # 16 layers back to back, B = 64 / 128 / 256 over 531 of 1024 positions) they beat
        # 128 x 64 tiles over two warps by 3-11%, uniform and skewed.
        block_n, num_warps, num_stages = 32, 1, 3
    elif d_pad <= 64:
        # 128 x 64 tiles, 16 KB each. On the H100 (bench --sweep, CUDA-graph timing, commit
        # cd45d2d; bench/RESULTS.md) they matched or beat 64-position tiles on all six D = 64
        # shapes, and two warps beat four at B = 64.
        block_n, num_warps, num_stages = 128, 2, 2
    else:
        block_n, num_warps, num_stages = 64, 2, 2  # may grow to 128 below

    rows = batch * num_kv_heads
    max_splits = min(MAX_SPLITS, max(1, capacity // max(min_split_positions(capacity), block_n)))
    num_splits = 1
    while rows * num_splits < PROGRAMS_PER_SM_TARGET * num_sms and num_splits * 2 <= max_splits:
        num_splits *= 2
    programs = rows * num_splits

    # fp32 caches (parity tests) keep launch order: with the sort their IEEE products spill.
    longest_first = (dtype != torch.float32 and 2 <= batch <= MAX_SORTED_ROWS
                     and capacity < MAX_SORTED_CAPACITY)
    if (dtype != torch.float32 and d_pad == 128 and capacity <= SHORT_SLAB and num_splits == 1
            and programs <= SHORT_SLAB_MAX_PROGRAMS_PER_SM * num_sms):
        # Short rows, one program per (row, KV head), one or two waves: 32 x 128 tiles over two
        # warps, three in flight. In the decode step (bench.attention_layers: 32 layers of the
        # 8B heads, 531 live positions of 1024) they took B = 64 from 51.1 to 49.7 µs a layer
        # (skewed 34.4 -> 32.4) and B = 128 from 100.0 to 96.4; at B = 256 they only tie, and
        # the canonical (256, 1024) slab keeps the big tiles below.
        block_n, num_warps, num_stages = 32, 2, 3
        longest_first = False  # B <= 64 fits one wave; larger batches are not sorted
    elif (dtype != torch.float32 and d_pad == 128 and batch > 1
            and (capacity >= LONG_SLAB or programs > SMALL_TILE_PROGRAMS_PER_SM * num_sms)):
        # 128 x 128 tiles over four warps: two programs per SM, so the slab runs in two or more
        # waves and longest-first order balances skewed rows across them. With 64 x 128 tiles
        # (four programs per SM) a B = 64 slab is one wave, which ends on its longest rows: on
        # the H100 sweeps the big tiles were up to 11% faster on skewed slabs of C >= 2048 and
        # as fast on uniform ones, and as fast or faster at every B >= 128. A short slab
        # (C < 2048) that fits one wave keeps the small tiles: its rows are short streams, and
        # at the engine's shape (B = 64, ~530 positions) they were 6% faster uniform and 5%
        # slower skewed.
        block_n, num_warps, num_stages = 128, 4, 2
    elif programs <= SMALL_TILE_PROGRAMS_PER_SM * num_sms:
        longest_first = False  # one wave: every program starts at once, order is moot
    block_n = min(block_n, max(16, triton.next_power_of_2(capacity)))
    evict_first = False
    if (dtype != torch.float32 and num_splits > 1 and programs >= PROGRAMS_PER_SM_TARGET * num_sms
            and capacity <= SHORT_SPLIT_TILES * block_n * num_splits):
        # Many short splits (each at most two tiles, enough of them to fill the GPU): load
        # straight to registers, which keeps the evict-first hint that Triton drops from
        # pipelined copies, so the K/V stream replaces itself in the L2 instead of evicting
        # (and writing back) what the L2 held. On the H100 sweep this took (1, 8192) from 25.5
        # to 22.6 µs and was as fast or faster on every such shape; with fewer programs than
        # the GPU holds (one row of 1024) the pipelined loop stays faster (bench/RESULTS.md).
        num_stages, evict_first = 1, True
    return DecodeConfig(block_n, num_splits, num_warps, num_stages, longest_first,
                        merge_pdl=num_splits > 1, evict_first=evict_first)


def attention_launch_meta(config: DecodeConfig, num_q_heads: int, num_kv_heads: int,
                          head_dim: int, pdl: bool = False, new_token: bool = False,
                          norm_hidden: int = 0) -> dict:
    """Constexprs and launch options of the attention kernel for ``config`` (what the AOT
    test compiles, so it sees exactly the binaries the engine launches). ``pdl``: the launch
    is a programmatic dependent one (Hopper; see the module docstring); ``new_token``: the
    kernel rotates and writes each row's new token (``NewToken``), with a deferred norm over
    rows of ``norm_hidden`` elements when that is > 0."""
    return dict(HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
                NEW_TOKEN=new_token, SCALE_BY_RMS=new_token and norm_hidden > 0,
                NORM_BLOCK=norm_block(norm_hidden) if new_token and norm_hidden else 16,
                GROUP_PAD=_group_pad(num_q_heads // num_kv_heads), BLOCK_N=config.block_n,
                SINGLE_SPLIT=config.num_splits == 1,
                ROWS_PAD=MAX_SORTED_ROWS if config.longest_first else 1,
                LAUNCH_DEPENDENTS=config.merge_pdl and config.num_splits > 1, PDL=pdl,
                KV_EVICTION="evict_first" if config.evict_first else "",
                num_warps=config.num_warps, num_stages=config.num_stages)


def merge_launch_meta(config: DecodeConfig, head_dim: int) -> dict:
    """Constexprs and launch options of the merge kernel (only launched when num_splits > 1);
    its grid is (B, H_q, cdiv(D, BLOCK_D))."""
    # At least 16 split slots (masked): few distinct binaries to compile, at no cost that shows.
    d_pad = triton.next_power_of_2(head_dim)
    splits_pad = max(16, triton.next_power_of_2(config.num_splits))
    block_d = min(d_pad, MERGE_BLOCK_D)
    # The whole [splits, BLOCK_D] fp32 block sits in registers: more warps for big ones.
    num_warps = 4 if splits_pad * block_d <= 64 * 128 else 8
    return dict(HEAD_DIM=head_dim, SPLITS_PAD=splits_pad, BLOCK_D=block_d,
                WAIT_FOR_PRIMARY=config.merge_pdl, num_warps=num_warps, num_stages=1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None, *,
                     out: torch.Tensor | None = None,
                     config: DecodeConfig | None = None,
                     new_token: NewToken | None = None) -> torch.Tensor:
    """Attention of one new token per row over the row's first ``seq_lens[b]`` cached positions.

    q: [B, H_q, D] fp16/bf16/fp32, last dim contiguous (may be a strided view).
    k_cache, v_cache: [B, C, H_kv, D], same dtype, shape and strides, last dim contiguous;
    H_q % H_kv == 0; 16 <= D <= 256 (non-powers of two are masked up to the next one).
    seq_lens: int32 [B] on q's device; 0 marks a dead row (output zeros); values are clamped
    to [0, C] on the device (no host sync).
    scale: softmax scale, default D ** -0.5.
    out: optional [B, H_q, D] in q's dtype, last dim contiguous; written and returned.
    config: overrides ``decode_config`` (benchmark sweeps, tests).
    new_token: q is each row's new query unrotated, and the kernel first rotates it and the
    new key and writes k and v into slot seq_lens[b] - 1 (see ``NewToken``): RoPE and the slab
    write without a kernel of their own. The caller keeps q, k, v and seq_lens consistent.
    Returns [B, H_q, D] in q's dtype.
    """
    B, H_q, D, C, H_kv = _check_inputs(q, k_cache, v_cache, seq_lens)
    if new_token is not None:
        _check_new_token(new_token, q, H_kv)
    if out is None:
        out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    elif (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1
          or out.device != q.device):
        raise ValueError(f"out must be a [B, H_q, D] = {tuple(q.shape)} {q.dtype} tensor on "
                         f"{q.device} with a contiguous last dim, got {tuple(out.shape)} "
                         f"{out.dtype} strides {out.stride()} on {out.device}")
    if config is None:
        config = decode_config(B, C, H_q, H_kv, D, k_cache.dtype, sm_count(q.device))
    elif not (1 <= config.num_splits <= MAX_SPLITS and config.block_n >= 16
              and config.block_n & (config.block_n - 1) == 0):
        raise ValueError(f"config needs 1 <= num_splits <= {MAX_SPLITS} and block_n a power of "
                         f"two >= 16, got {config}")
    elif config.longest_first and not (B <= MAX_SORTED_ROWS and C < MAX_SORTED_CAPACITY):
        raise ValueError(f"longest_first sorts at most {MAX_SORTED_ROWS} rows of capacity below "
                         f"{MAX_SORTED_CAPACITY}, got B={B}, C={C}")
    pdl = has_pdl(q.device)
    if config.merge_pdl and not pdl:
        config = dataclasses.replace(config, merge_pdl=False)
    scale = D ** -0.5 if scale is None else scale
    splits = config.num_splits
    if splits == 1:
        partial_out, partial_lse = out, out  # not touched when the kernel writes out itself
    else:
        partial_out, partial_lse = _alloc_partials(B, H_q, splits, D, q.device)

    # Grid (split, KV head, rank): programs start in launch order, so a row's splits and heads
    # start together and rank 0 (the longest row, with longest_first) starts first.
    norm = None if new_token is None else new_token.norm_input
    _decode_split_kernel[(splits, H_kv, B)](
        q, k_cache, v_cache, seq_lens, out, partial_out, partial_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), C, H_q // H_kv, H_q, splits, scale * LOG2_E,
        *_new_token_args(new_token, q),
        launch_pdl=pdl, **attention_launch_meta(config, H_q, H_kv, D, pdl,
                                                new_token=new_token is not None,
                                                norm_hidden=0 if norm is None else norm.shape[1]))
    if splits > 1:
        meta = merge_launch_meta(config, D)
        _merge_splits_kernel[(B, H_q, triton.cdiv(D, meta["BLOCK_D"]))](
            partial_out, partial_lse, out, out.stride(0), out.stride(1), splits,
            launch_pdl=config.merge_pdl, **meta)
    return out


def _new_token_args(nt: NewToken | None, q: torch.Tensor) -> tuple:
    """The attention kernel's new-token arguments: k_new, v_new, cos, sin, norm (pointers),
    the new k / v strides, the norm rows' stride and length, eps. Without a new token (or
    without a deferred norm) the kernel never reads them, and q stands in for the pointers."""
    if nt is None:
        return q, q, q, q, q, 0, 0, 0, 0, 0.0
    norm = nt.norm_input
    return (nt.k, nt.v, nt.cos, nt.sin, q if norm is None else norm, nt.k.stride(0),
            nt.k.stride(1), 0 if norm is None else norm.stride(0),
            0 if norm is None else norm.shape[1], nt.eps)


def _alloc_partials(B: int, H_q: int, splits: int, D: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split outputs fp32 [B, H_q, S, D] and log-sum-exps fp32 [B, H_q, S] (uninitialised:
    the attention kernel writes every lse and every live split's output)."""
    return (torch.empty(B, H_q, splits, D, dtype=torch.float32, device=device),
            torch.empty(B, H_q, splits, dtype=torch.float32, device=device))


@triton.jit
def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, seq_lens_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_ob, stride_oh,
        capacity, group, num_q_heads, num_splits, qk_scale_log2,
        k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, norm_ptr, stride_new_b, stride_new_h,
        stride_norm, norm_hidden, eps,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NEW_TOKEN: tl.constexpr,
        SCALE_BY_RMS: tl.constexpr, NORM_BLOCK: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, ROWS_PAD: tl.constexpr,
        LAUNCH_DEPENDENTS: tl.constexpr, PDL: tl.constexpr, KV_EVICTION: tl.constexpr):
    """One (split, KV head, rank) program; the grid is (S, H_kv, B).

    q: [B, H_q, D]; k, v: [B, C, H_kv, D] (shared strides); seq_lens: int32 [B].
    ROWS_PAD > 1: rank r runs the row with the r-th longest live length (ties: lower row first;
    B <= ROWS_PAD); ROWS_PAD == 1: rank r runs row r.
    LAUNCH_DEPENDENTS: allow the merge kernel (a programmatic dependent launch) to be scheduled.
    PDL: launched as a programmatic dependent launch: wait for the previous kernel's writes
    before reading anything; with one split, first let the next kernel launch.
    KV_EVICTION: the L2 eviction policy of the K and V loads ("" or "evict_first").
    SINGLE_SPLIT: write softmax(qK)V to out [B, H_q, D] (q's dtype).
    Otherwise: write the split's normalised output to partial_out fp32 [B, H_q, S, D] and its
    log2-sum-exp2 (scores in log2 units) to partial_lse fp32 [B, H_q, S]; a split with no
    live positions writes only its lse, -inf, which tells the merge to skip it.
    NEW_TOKEN: q is the row's new query before RoPE; k_new, v_new: [B, H_kv, D] (strides
    stride_new_b, stride_new_h) the new key and value; cos, sin: fp32 [max_positions, D / 2].
    Every program rotates its q at slot seq_len - 1; the program whose split holds that slot
    rotates k, writes k and v there, and only then streams its tiles. With SCALE_BY_RMS, q, k
    and v are first scaled by 1 / sqrt(mean(norm[b]^2) + eps), norm: [B, norm_hidden].
    The query group is padded to GROUP_PAD >= 16 rows so both products run on tensor cores.
    """
    if PDL:
        if SINGLE_SPLIT:
            # The next kernel (the output projection) may take free slots and prefetch its
            # weights; it waits on the device for this grid's writes.
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    rank = tl.program_id(2)
    if ROWS_PAD > 1:
        row = _row_of_rank(seq_lens_ptr, rank, tl.num_programs(2), capacity, ROWS_PAD)
    else:
        row = rank
    row64 = row.to(tl.int64)

    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + row), 0), capacity)
    # Each split takes an equal share of the live length, rounded up to whole tiles.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), 1) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * group + offs_g
    head_live = offs_g < group
    if D_PAD == HEAD_DIM:
        d_live = offs_d < D_PAD  # all true; keeps the masks' shapes uniform
    else:
        d_live = offs_d < HEAD_DIM

    q_ptrs = q_ptr + row64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q_mask = head_live[:, None] & d_live[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    kv_offset = row64 * stride_kb + kv_head * stride_kh
    if NEW_TOKEN:
        q = _rope_and_write_new_token(
            q, q_ptr + row64 * stride_qb + heads[:, None] * stride_qh, q_mask,
            k_new_ptr + row64 * stride_new_b + kv_head * stride_new_h,
            v_new_ptr + row64 * stride_new_b + kv_head * stride_new_h,
            k_ptr + kv_offset, v_ptr + kv_offset, stride_kn, cos_ptr, sin_ptr,
            norm_ptr + row64 * stride_norm, norm_hidden, eps, seq_len, start, end,
            offs_d, d_live, HEAD_DIM, SCALE_BY_RMS, NORM_BLOCK)
    q = q.to(k_ptr.dtype.element_ty)

    k_tile_ptrs = k_ptr + kv_offset + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile_ptrs = v_ptr + kv_offset + offs_n[:, None] * stride_kn + offs_d[None, :]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos_live = (tile_start + offs_n) < end
        kv_mask = pos_live[:, None] & d_live[None, :]
        k = tl.load(k_tile_ptrs + tile_start * stride_kn, mask=kv_mask, other=0.0,
                    eviction_policy=KV_EVICTION)
        # "ieee" only matters for fp32 operands (no tf32); 16-bit products are exact in fp32.
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
        scores = tl.where(pos_live[None, :], scores, float("-inf"))
        # Every tile holds at least one live position, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_tile_ptrs + tile_start * stride_kn, mask=kv_mask, other=0.0,
                    eviction_policy=KV_EVICTION)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    if LAUNCH_DEPENDENTS:
        # Once every program is past its loop the merge's programs may take free slots (they
        # wait on the device for this grid's writes), so the second launch is off the path.
        tl.extra.cuda.gdc_launch_dependents()
    # A dead row or an empty split has l_i == 0: its output is zeros, never 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_tile = acc / l_safe[:, None]
    store_mask = head_live[:, None] & d_live[None, :]
    if SINGLE_SPLIT:
        out_ptrs = out_ptr + row64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out_tile.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        split_live = start < end
        slot = (row64 * num_q_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(partial_out_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], out_tile,
                 mask=store_mask & split_live)
        tl.store(partial_lse_ptr + slot, m_i + tl.math.log2(l_safe), mask=head_live)


@triton.jit
def _rope_and_write_new_token(q, q_row_ptr, q_mask, k_new_ptr, v_new_ptr, k_slab_ptr, v_slab_ptr,
                              stride_kn, cos_ptr, sin_ptr, norm_row_ptr, norm_hidden, eps,
                              seq_len, start, end, offs_d, d_live, HEAD_DIM: tl.constexpr,
                              SCALE_BY_RMS: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """The new token of one (row, KV head): q [GROUP_PAD, D_PAD] as loaded, rotated at slot
    seq_len - 1 and returned in its own dtype; k_new, v_new [D] (pointers at the head) written
    into the slab (pointers at the row and head, slot stride stride_kn) by the program whose
    split [start, end) holds the slot, which then waits for its own stores before any tile load.
    Arithmetic and roundings are ``_rope_kv_write_kernel``'s."""
    HALF = HEAD_DIM // 2
    pos = seq_len - 1  # -1 on a dead row: its output is zeros whatever q holds
    scale = 1.0
    if SCALE_BY_RMS:
        scale = row_inv_rms(norm_row_ptr, norm_hidden, eps, NORM_BLOCK)
    # Rotate-half: element d pairs with d +- HALF; the first half takes -sin.
    first_half = offs_d < HALF
    partner = tl.where(first_half, offs_d + HALF, offs_d - HALF)
    table = tl.maximum(pos, 0).to(tl.int64) * HALF + tl.where(first_half, offs_d, offs_d - HALF)
    cos = tl.load(cos_ptr + table, mask=d_live, other=0.0)
    sin = tl.load(sin_ptr + table, mask=d_live, other=0.0)
    sin = tl.where(first_half, -sin, sin)

    q_pair = tl.load(q_row_ptr + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q = q.to(tl.float32)
    if SCALE_BY_RMS:
        q, q_pair = q * scale, q_pair * scale
    q = (q * cos[None, :] + q_pair * sin[None, :]).to(q_row_ptr.dtype.element_ty)

    writes = d_live & (start <= pos) & (pos < end)
    k = tl.load(k_new_ptr + offs_d, mask=writes, other=0.0).to(tl.float32)
    k_pair = tl.load(k_new_ptr + partner, mask=writes, other=0.0).to(tl.float32)
    v = tl.load(v_new_ptr + offs_d, mask=writes, other=0.0).to(tl.float32)
    if SCALE_BY_RMS:
        k, k_pair, v = k * scale, k_pair * scale, v * scale
    new_dtype = k_new_ptr.dtype.element_ty
    k = (k * cos + k_pair * sin).to(new_dtype)
    slot = tl.maximum(pos, 0).to(tl.int64) * stride_kn
    tl.store(k_slab_ptr + slot + offs_d, k.to(k_slab_ptr.dtype.element_ty), mask=writes)
    tl.store(v_slab_ptr + slot + offs_d, v.to(new_dtype).to(v_slab_ptr.dtype.element_ty),
             mask=writes)
    if (start <= pos) & (pos < end):
        # The stores come from some threads, the tile loads from others; programs that write
        # nothing go straight on to their tiles.
        tl.debug_barrier()
    return q


@triton.jit
def _row_of_rank(seq_lens_ptr, rank, batch, capacity, ROWS_PAD: tl.constexpr):
    """The row with the rank-th longest live length of seq_lens int32 [batch] (clamped to
    [0, capacity] as the kernel reads them; ties go to the lower row). batch <= ROWS_PAD <= 1024,
    capacity < 2**21: the int32 key is the length above 10 bits of the row's complement, so
    keys are distinct and a descending sort puts longer rows, then lower rows, first."""
    rows = tl.arange(0, ROWS_PAD)
    live = rows < batch
    lens = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + rows, mask=live, other=0), 0), capacity)
    keys = tl.where(live, lens * 1024 + (1023 - rows), -1)
    ordered = tl.sort(keys, descending=True)
    key = tl.sum(tl.where(rows == rank, ordered, 0))
    return 1023 - key % 1024


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, stride_ob, stride_oh,
                         num_splits, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         BLOCK_D: tl.constexpr, WAIT_FOR_PRIMARY: tl.constexpr):
    """One (row b, query head, block of BLOCK_D dims) program: combine the splits' partial
    outputs by their weights.

    partial_out: fp32 [B, H_q, S, D] (written for live splits only), partial_lse: fp32
    [B, H_q, S] (log2 units, -inf for a split without live positions), as written by
    ``_decode_split_kernel``; out: [B, H_q, D]. A dead row (no live split) gets zeros.
    WAIT_FOR_PRIMARY: launched as a programmatic dependent launch; wait until the attention
    grid has finished and its writes are visible before reading them.
    """
    row = tl.program_id(0)
    head = tl.program_id(1)
    num_q_heads = tl.num_programs(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    slot = (row.to(tl.int64) * num_q_heads + head) * num_splits + offs_s
    if WAIT_FOR_PRIMARY:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel waits for our writes too
        tl.extra.cuda.gdc_wait()
    split_in = offs_s < num_splits
    d_live = offs_d < HEAD_DIM
    # Weights and partials load together (one round trip); the partials of empty splits
    # (never written: they may hold anything, NaN included) are dropped by the where below.
    lse = tl.load(partial_lse_ptr + slot, mask=split_in, other=float("-inf"))
    parts = tl.load(partial_out_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=split_in[:, None] & d_live[None, :], other=0.0)
    split_live = lse > float("-inf")
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)
    weight = tl.where(split_live, tl.math.exp2(lse - lse_max), 0.0)
    total = tl.sum(weight, axis=0)
    weighted = tl.where(split_live[:, None], parts, 0.0) * weight[:, None]
    merged = tl.sum(weighted, axis=0) / tl.where(total > 0, total, 1.0)
    out_ptrs = out_ptr + row.to(tl.int64) * stride_ob + head * stride_oh + offs_d
    tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=d_live)


def _group_pad(group: int) -> int:
    """Query rows per program: the GQA group padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(group))


def _check_head_shape(num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} must be a positive multiple of H_kv={num_kv_heads}")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in [16, 256], got {head_dim}")


def _check_inputs(q, k_cache, v_cache, seq_lens) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, H_q, D] and k_cache [B, C, H_kv, D], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    B, H_q, D = q.shape
    _, C, H_kv, D_kv = k_cache.shape
    if k_cache.shape[0] != B or D_kv != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} "
                         f"(batch and head_dim must agree)")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache must have k_cache's shape and strides: {tuple(v_cache.shape)} "
                         f"{v_cache.stride()} vs {tuple(k_cache.shape)} {k_cache.stride()}")
    _check_head_shape(H_q, H_kv, D)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,) or seq_lens.device != q.device:
        raise ValueError(f"seq_lens must be int32 [B={B}] on {q.device}, got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)} on {seq_lens.device}")
    return B, H_q, D, C, H_kv


def _check_new_token(nt: NewToken, q: torch.Tensor, num_kv_heads: int) -> None:
    B, _, D = q.shape
    shape = (B, num_kv_heads, D)
    if nt.k.shape != shape or nt.v.shape != shape or nt.k.stride() != nt.v.stride():
        raise ValueError(f"new_token: k and v must both be [B, H_kv, D] = {shape} with one set "
                         f"of strides, got {tuple(nt.k.shape)} {nt.k.stride()} and "
                         f"{tuple(nt.v.shape)} {nt.v.stride()}")
    if nt.k.dtype != q.dtype or nt.v.dtype != q.dtype or nt.k.stride(-1) != 1:
        raise ValueError(f"new_token: k and v must be q's dtype ({q.dtype}) with a contiguous "
                         f"last dim, got {nt.k.dtype}, {nt.v.dtype}, strides {nt.k.stride()}")
    if D % 2:
        raise ValueError(f"new_token: rotate-half RoPE needs an even head size, got {D}")
    for name, table in (("cos", nt.cos), ("sin", nt.sin)):
        if (table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != D // 2
                or not table.is_contiguous() or table.device != q.device):
            raise ValueError(f"new_token: {name} must be a contiguous fp32 [max_positions, "
                             f"{D // 2}] table on {q.device}, got {table.dtype} "
                             f"{tuple(table.shape)} on {table.device}")
    if nt.k.device != q.device or nt.v.device != q.device:
        raise ValueError(f"new_token: k and v must be on {q.device}")
    if nt.norm_input is not None:
        check_norm_input("new_token", nt.norm_input, B, q.device)
