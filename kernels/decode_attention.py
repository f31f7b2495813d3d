"""Split-KV decode attention (flash-decoding) over a padded [B, C] KV slab, in one kernel.

One query token per row attends to that row's first ``seq_lens[b]`` cached positions.
Work is cut into programs of (row, KV head, split). Each program loads every K/V tile once
for the whole group of query heads that share its KV head (GQA) and runs an online softmax in
fp32 over its piece of the row. A row cut into one piece is written straight to the output;
a row cut into several pieces has each piece write a normalised partial output plus its
log-sum-exp, count itself in on a per-(row, KV head) counter, and the piece that arrives last
merges all of them and resets the counter to zero. There is no second kernel.

The launch grid depends only on (B, C, head shape, SM count), never on ``seq_lens``, so one
CUDA graph serves every batch of a bin. How a row is cut is decided on the device from
``seq_lens``: a row of the batch's mean length is cut into ``fill_splits`` pieces, and longer
rows into proportionally more (up to ``num_splits``), so every piece holds about the same
number of positions and rows of very different lengths still finish together. Padding costs
memory, never bandwidth.

Numerics: tiles are loaded in the cache dtype; the two matrix products take 16-bit operands
and accumulate in fp32 (the products of 16-bit numbers are exact in fp32), softmax statistics,
accumulators and partial outputs are fp32. The probabilities are rounded to the cache dtype
before the P·V product, as every flash-attention kernel does, so the tensor cores read V
straight from shared memory. An fp32 cache uses IEEE fp32 products (no tf32) for exact parity
tests.

Counters: one int32 per (row, KV head) in a buffer allocated once per device (a larger one when
a bigger batch comes; the old one is kept, since CUDA graphs hold its address). Every launch
leaves it all zero, so graph replays need no reset. Launches on concurrent streams of one device
must not overlap: they would share counters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

# Tuning knobs of ``decode_config`` and the launch (the benchmark's --sweep shows what to set them
# to). The merge costs one extra pass over G x pieces x D fp32 partials in the last program.
PROGRAMS_PER_SM_TARGET = 2  # cut mean-length rows until B * H_kv * fill_splits reaches this per SM
BALANCE_SPLITS = 2  # grid slots per fill split: rows up to this many times the mean length are cut
#                     as finely as the mean row (U[L/8, L] rows reach 1.8x the mean)
MIN_TILES_PER_SPLIT = 4  # a full-length piece spans at least this many tiles
MAX_SPLITS = 64  # grid slots per (row, KV head) at most
MERGE_VALUES_PER_THREAD = 64  # fp32 partial values each thread holds per merge step
LENS_BLOCK = 256  # seq_lens entries summed per step when a program takes the batch's mean length
H100_NUM_SMS = 132

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeConfig:
    """How one decode-attention call is cut up and compiled.

    block_n: KV positions per tile. num_splits: programs per (row, KV head) in the grid, the most
    pieces a row can be cut into; 1 compiles the kernel without partials or counters.
    fill_splits (1 <= fill_splits <= num_splits): pieces a row of the batch's mean live length is
    cut into; a row L times longer gets about L times as many. num_warps, num_stages: Triton
    launch options (num_stages = tiles in flight in the main loop).
    """

    block_n: int
    num_splits: int
    fill_splits: int
    num_warps: int
    num_stages: int


def decode_config(batch: int, capacity: int, num_q_heads: int, num_kv_heads: int,
                  head_dim: int, dtype: torch.dtype, num_sms: int = H100_NUM_SMS) -> DecodeConfig:
    """The launch configuration for a slab of shape (batch, capacity); a pure function.

    It never sees ``seq_lens``: the grid it implies must serve every batch of the same shape.
    fill_splits grows (powers of two) until B * H_kv * fill_splits reaches
    ``PROGRAMS_PER_SM_TARGET`` programs per SM, limited so that a full-length piece still spans
    ``MIN_TILES_PER_SPLIT`` tiles; num_splits adds ``BALANCE_SPLITS`` times as many grid slots
    for rows longer than the mean, under the same limit. dtype is the cache's.
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
    elif d_pad <= 128:
        # K and V tiles of 64 x 128 bf16 are 16 KB each. On the H100 sweep (bench --sweep,
        # CUDA-graph timing) two warps and two stages were the only setting within 3% of the
        # best on every canonical shape; four warps lost 5-10% on uniform B >= 64 slabs.
        block_n, num_warps, num_stages = 64, 2, 2
    else:
        block_n, num_warps, num_stages = 32, 8, 3
    block_n = min(block_n, max(16, triton.next_power_of_2(capacity)))

    rows = batch * num_kv_heads
    max_splits = min(MAX_SPLITS, max(1, capacity // (MIN_TILES_PER_SPLIT * block_n)))
    fill_splits = 1
    while rows * fill_splits < PROGRAMS_PER_SM_TARGET * num_sms and fill_splits * 2 <= max_splits:
        fill_splits *= 2
    num_splits = max(fill_splits, min(fill_splits * BALANCE_SPLITS, max_splits))
    return DecodeConfig(block_n, num_splits, fill_splits, num_warps, num_stages)


def attention_launch_meta(config: DecodeConfig, num_q_heads: int, num_kv_heads: int,
                          head_dim: int) -> dict:
    """Constexprs and launch options of the attention kernel for ``config`` (what the AOT
    test compiles, so it sees exactly the binaries the engine launches)."""
    d_pad = triton.next_power_of_2(head_dim)
    if config.num_splits == 1:
        merge_heads = merge_splits = 1  # no merge: one binary whatever the head shape
    else:
        merge_heads = triton.next_power_of_2(num_q_heads // num_kv_heads)
        # The merge holds [heads, MERGE_SPLITS, D] fp32 partials at a time; all three sizes
        # are powers of two, so the quotient is one too.
        merge_splits = max(1, min(16, MERGE_VALUES_PER_THREAD * 32 * config.num_warps
                                  // (merge_heads * d_pad)))
    return dict(HEAD_DIM=head_dim, D_PAD=d_pad,
                GROUP_PAD=_group_pad(num_q_heads // num_kv_heads), BLOCK_N=config.block_n,
                SINGLE_SPLIT=config.num_splits == 1, MERGE_HEADS=merge_heads,
                MERGE_SPLITS=merge_splits, LENS_BLOCK=LENS_BLOCK,
                num_warps=config.num_warps, num_stages=config.num_stages)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None, *,
                     out: torch.Tensor | None = None,
                     config: DecodeConfig | None = None) -> torch.Tensor:
    """Attention of one new token per row over the row's first ``seq_lens[b]`` cached positions.

    q: [B, H_q, D] fp16/bf16/fp32, last dim contiguous (may be a strided view).
    k_cache, v_cache: [B, C, H_kv, D], same dtype, shape and strides, last dim contiguous;
    H_q % H_kv == 0; 16 <= D <= 256 (non-powers of two are masked up to the next one).
    seq_lens: int32 [B] on q's device; 0 marks a dead row (output zeros); values are clamped
    to [0, C] on the device (no host sync).
    scale: softmax scale, default D ** -0.5.
    out: optional [B, H_q, D] in q's dtype, last dim contiguous; written and returned.
    config: overrides ``decode_config`` (benchmark sweeps, tests).
    Returns [B, H_q, D] in q's dtype.

    CUDA graphs: call once with the batch shape before capturing (as a warm-up does), so that
    the split counters exist; they cannot be allocated and zeroed inside a capture.
    """
    B, H_q, D, C, H_kv = _check_inputs(q, k_cache, v_cache, seq_lens)
    if out is None:
        out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    elif (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1
          or out.device != q.device):
        raise ValueError(f"out must be a [B, H_q, D] = {tuple(q.shape)} {q.dtype} tensor on "
                         f"{q.device} with a contiguous last dim, got {tuple(out.shape)} "
                         f"{out.dtype} strides {out.stride()} on {out.device}")
    if config is None:
        config = decode_config(B, C, H_q, H_kv, D, k_cache.dtype, _num_sms(q.device))
    elif not (1 <= config.fill_splits <= config.num_splits <= MAX_SPLITS
              and config.block_n >= 16 and config.block_n & (config.block_n - 1) == 0):
        raise ValueError(f"config needs 1 <= fill_splits <= num_splits <= {MAX_SPLITS} and "
                         f"block_n a power of two >= 16, got {config}")
    scale = D ** -0.5 if scale is None else scale
    splits = config.num_splits
    if splits == 1:
        # Not touched: with one split the kernel writes out itself and never counts.
        partial_out, partial_lse, counters = out, out, seq_lens
    else:
        partial_out, partial_lse = _alloc_partials(B, H_q, splits, D, q.device)
        counters = _split_counters(q.device, B * H_kv)

    _decode_kernel[(B, H_kv, splits)](
        q, k_cache, v_cache, seq_lens, out, partial_out, partial_lse, counters,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), B, C, H_q // H_kv, H_q, splits, config.fill_splits,
        scale * LOG2_E, **attention_launch_meta(config, H_q, H_kv, D))
    return out


def _alloc_partials(B: int, H_q: int, splits: int, D: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-piece outputs fp32 [B, H_q, S, D] and log2-sum-exp2s fp32 [B, H_q, S] (uninitialised:
    only the pieces that hold live positions of a row cut into several are written, and only
    those are read back)."""
    return (torch.empty(B, H_q, splits, D, dtype=torch.float32, device=device),
            torch.empty(B, H_q, splits, dtype=torch.float32, device=device))


# Per device, every counter buffer ever made, smallest first; the last one is in use. Older ones
# are kept because a captured CUDA graph keeps using the address it saw.
_counter_buffers: dict[torch.device, list[torch.Tensor]] = {}


def _split_counters(device: torch.device, count: int) -> torch.Tensor:
    """The device's int32 counters, at least ``count`` of them (one per (row, KV head)), all
    zero between launches: allocated once (at least 4096, grown in powers of two), zeroed once,
    and reset by the kernel itself after every use."""
    buffers = _counter_buffers.setdefault(device, [])
    if buffers and buffers[-1].numel() >= count:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"decode_attention: {count} split counters are needed on {device} and cannot be "
            f"allocated and zeroed inside a CUDA graph capture; call decode_attention once with "
            f"this batch shape before capturing")
    counters = torch.zeros(max(4096, triton.next_power_of_2(count)), dtype=torch.int32,
                           device=device)
    if device.type == "cuda":
        # Zeroed on this stream; a later launch may come from another one.
        torch.cuda.current_stream(device).synchronize()
    buffers.append(counters)
    return counters


@triton.jit
def _piece_length(seq_lens_ptr, seq_len, batch, capacity, num_splits, fill_splits,
                  BLOCK_N: tl.constexpr, LENS_BLOCK: tl.constexpr):
    """Positions per piece of a row of ``seq_len`` live positions, a whole number of tiles.

    A row of the batch's mean length gets ``fill_splits`` pieces; a longer row gets pieces of
    the same size (more of them) until it reaches ``num_splits``, then longer pieces. Every
    program of a row computes the same value from the same loads, so they all agree on how many
    pieces the row has without talking to each other.
    """
    total = tl.full([], 0, tl.int32)
    for first in range(0, batch, LENS_BLOCK):
        offs = first + tl.arange(0, LENS_BLOCK)
        lens = tl.load(seq_lens_ptr + offs, mask=offs < batch, other=0)
        total += tl.sum(tl.minimum(tl.maximum(lens, 0), capacity), axis=0)
    fill_len = tl.cdiv(tl.cdiv(total, batch), fill_splits)
    even_len = tl.cdiv(seq_len, num_splits)
    return tl.maximum(tl.cdiv(tl.maximum(fill_len, even_len), BLOCK_N), 1) * BLOCK_N


@triton.jit(do_not_specialize=["batch", "capacity", "group", "num_q_heads", "num_splits",
                               "fill_splits"])
def _decode_kernel(
        q_ptr, k_ptr, v_ptr, seq_lens_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
        counters_ptr,
        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_ob, stride_oh,
        batch, capacity, group, num_q_heads, num_splits, fill_splits, qk_scale_log2,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, MERGE_HEADS: tl.constexpr,
        MERGE_SPLITS: tl.constexpr, LENS_BLOCK: tl.constexpr):
    """One (row b, KV head, split) program.

    q: [B, H_q, D]; k, v: [B, C, H_kv, D] (shared strides); seq_lens: int32 [B]; out:
    [B, H_q, D] (q's dtype). SINGLE_SPLIT: the row is one piece, written to out.
    Otherwise the row is cut as ``_piece_length`` says. One piece (or a dead row): split 0
    writes out, the other splits do nothing. Several pieces: each writes its normalised output
    to partial_out fp32 [B, H_q, S, D] and its log2-sum-exp2 to partial_lse fp32 [B, H_q, S],
    then adds one to counters[b * H_kv + kv_head] (int32); the piece that sees the count
    reach pieces - 1 merges all pieces into out and sets the counter back to 0. Splits past the
    row's last piece do nothing and never count.
    The query group is padded to GROUP_PAD >= 16 rows so both products run on tensor cores.
    The do_not_specialize list keeps sizes that gain nothing from it (== 1, divisible by 16)
    from multiplying the compiled variants.
    """
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row64 = row.to(tl.int64)

    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + row), 0), capacity)
    if SINGLE_SPLIT:
        start = 0
        end = seq_len
    else:
        piece_len = _piece_length(seq_lens_ptr, seq_len, batch, capacity, num_splits,
                                  fill_splits, BLOCK_N, LENS_BLOCK)
        pieces = tl.cdiv(seq_len, piece_len)
        start = split * piece_len
        end = tl.minimum(start + piece_len, seq_len)

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
    # A program without live positions skips the load (its loop below does not run).
    q = tl.load(q_ptrs, mask=head_live[:, None] & d_live[None, :] & (start < end), other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    kv_offset = row64 * stride_kb + kv_head * stride_kh
    k_tile_ptrs = k_ptr + kv_offset + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile_ptrs = v_ptr + kv_offset + offs_n[:, None] * stride_kn + offs_d[None, :]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos_live = (tile_start + offs_n) < end
        kv_mask = pos_live[:, None] & d_live[None, :]
        k = tl.load(k_tile_ptrs + tile_start * stride_kn, mask=kv_mask, other=0.0)
        # "ieee" only matters for fp32 operands (no tf32); 16-bit products are exact in fp32.
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
        scores = tl.where(pos_live[None, :], scores, float("-inf"))
        # Every tile holds at least one live position, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_tile_ptrs + tile_start * stride_kn, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # A dead row has l_i == 0: its output is zeros, never 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_tile = acc / l_safe[:, None]
    store_mask = head_live[:, None] & d_live[None, :]
    out_ptrs = out_ptr + row64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptrs, out_tile.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        if pieces <= 1:
            tl.store(out_ptrs, out_tile.to(out_ptr.dtype.element_ty),
                     mask=store_mask & (split == 0))
        elif split < pieces:
            slot = (row64 * num_q_heads + heads) * num_splits + split  # [GROUP_PAD]
            tl.store(partial_out_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], out_tile,
                     mask=store_mask)
            tl.store(partial_lse_ptr + slot, m_i + tl.math.log2(l_safe), mask=head_live)
            # Release: every thread's partial stores come before the one thread's increment
            # (the barrier), and the increment publishes them to the program that reads the
            # final count (acquire), which then reads them through L2 (.cg), not a stale L1.
            tl.debug_barrier()
            counter = counters_ptr + row * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == pieces - 1:
                _merge_pieces(partial_out_ptr, partial_lse_ptr, out_ptr, row64, kv_head, group,
                              num_q_heads, num_splits, pieces, stride_ob, stride_oh,
                              HEAD_DIM, D_PAD, MERGE_HEADS, MERGE_SPLITS)
                # Every piece has counted (this was the last increment): the next launch on
                # this stream finds zero.
                tl.store(counter, 0)


@triton.jit
def _merge_pieces(partial_out_ptr, partial_lse_ptr, out_ptr, row64, kv_head, group,
                  num_q_heads, num_splits, pieces, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MERGE_HEADS: tl.constexpr,
                  MERGE_SPLITS: tl.constexpr):
    """out[b, group heads] = the pieces' partial outputs weighted by exp2(lse) (normalised).

    Reads pieces 0 .. pieces-1 of partial_out fp32 [B, H_q, S, D] and partial_lse fp32
    [B, H_q, S], MERGE_SPLITS at a time, with a running maximum so no weight overflows.
    """
    offs_h = tl.arange(0, MERGE_HEADS)
    offs_s = tl.arange(0, MERGE_SPLITS)
    offs_d = tl.arange(0, D_PAD)
    heads = kv_head * group + offs_h
    head_live = offs_h < group
    d_live = offs_d < HEAD_DIM
    first_slot = (row64 * num_q_heads + heads) * num_splits  # [H]

    m = tl.full([MERGE_HEADS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([MERGE_HEADS], dtype=tl.float32)
    acc = tl.zeros([MERGE_HEADS, D_PAD], dtype=tl.float32)
    for first in range(0, pieces, MERGE_SPLITS):
        slot = first_slot[:, None] + first + offs_s[None, :]  # [H, S]
        live = head_live[:, None] & (first + offs_s < pieces)[None, :]
        lse = tl.load(partial_lse_ptr + slot, mask=live, other=float("-inf"),
                      cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, axis=1))
        # Padding heads never see a live piece: keep their reference finite (weights 0).
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.math.exp2(m - m_ref)
        weight = tl.math.exp2(lse - m_ref[:, None])  # 0 where masked
        parts = tl.load(partial_out_ptr + slot[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                        mask=live[:, :, None] & d_live[None, None, :], other=0.0,
                        cache_modifier=".cg")
        acc = acc * alpha[:, None] + tl.sum(parts * weight[:, :, None], axis=1)
        total = total * alpha + tl.sum(weight, axis=1)
        m = m_new
    merged = acc / tl.where(total > 0, total, 1.0)[:, None]
    out_ptrs = out_ptr + row64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty),
             mask=head_live[:, None] & d_live[None, :])


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


@functools.lru_cache(maxsize=None)
def _num_sms_cached(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """SMs of q's GPU; without one (the interpreter) the H100's, so configs match the GPU's."""
    if device.type != "cuda":
        return H100_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms_cached(index)
