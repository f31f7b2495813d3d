"""A design study: every layer's four decode products in one persistent, warp-specialised
launch (Gluon: TMA, mbarriers, wgmma), against the chain of dependent launches the engine runs.

The engine's B = 64 step runs 64 product launches for Llama-3.2-1B, and each costs a fixed ~3.2 µs
(RESULTS.md, "What does limit it"). Here one launch of G programs (one per SM) runs all of them.
Each program has three partitions:

- a weight loader (1 warp) streams the program's weight tiles of every product of every layer
  through one shared-memory ring, in the order they are consumed. Weights do not depend on
  activations, so it never waits on another program and keeps streaming across product
  boundaries, up to the ring's depth ahead;
- an activation loader (1 warp) waits until every program has finished the previous product
  (one int32 counter per product in global memory, acquire loads) and streams that product's
  activation tiles through a second ring;
- the MMA partition (4 warps) runs wgmma over both rings, stores its bf16 output tile and
  increments the product's counter (release).

Products are plain (no norm, residual or SwiGLU), as in the ``ours`` column they are timed
against: ``kernels.gemm`` as ``gemm_config`` launches it, with programmatic dependent launches,
on the same buffers; cuBLAS beside both; and a plain read of every weight byte, the pace any
chain of these products could at best keep. 1B shapes, M = 64, L2 flushed before each replay.

Variants (``VARIANTS``) change one design choice (ring depths, split K, waits per 128
activation columns, tiled weights, K order) or leave part of the work out to time the rest
(probes: no waits, no activation loads, no wgmma). Writes ``persistent_chain.json`` and a bar
chart, ``persistent_chain.png``. Built with TRACE=True the kernel records every program's
timeline (``trace_shape``); ``bench.persistent_trace`` times and reads it.

    python -m bench.persistent_chain [--variants x6w16,x8w12,...] [--layers 16] [--rounds 2]
                                     [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

BM = gl.constexpr(64)   # rows (the batch)
BK = gl.constexpr(128)  # K per step
CHUNKS = gl.constexpr(128)  # BK-column chunks of the widest output (gate/up: 16384 / BK)
# A trace (TRACE=True) holds int64 [G, L, 4, TRACE_FIELDS]: per program, layer and product,
# global-timer ns (start, first activation tile in, last MMA done, counter released, previous
# counter seen by the activation loader), cycles (the MMA warps waiting for weight slots and for
# activation slots, the weight loader waiting for a free slot), the cycle counter at the start,
# and global-timer ns once the output tile is stored and once the proxy fence has passed.
TRACE_START, TRACE_FIRST_X, TRACE_DONE, TRACE_RELEASED = (gl.constexpr(0), gl.constexpr(1),
                                                          gl.constexpr(2), gl.constexpr(3))
TRACE_W_WAIT, TRACE_X_WAIT, TRACE_SEEN, TRACE_W_FULL = (gl.constexpr(4), gl.constexpr(5),
                                                        gl.constexpr(6), gl.constexpr(7))
TRACE_CLOCK, TRACE_STORED, TRACE_FENCED = gl.constexpr(8), gl.constexpr(9), gl.constexpr(10)
TRACE_FIELDS = gl.constexpr(16)


@gluon.jit
def _fence_proxy_global(x):
    """Orders this thread's global accesses of the generic proxy (plain loads / stores, the
    counters) with those of the async proxy (TMA); returns x so the compiler keeps it."""
    return gl.inline_asm_elementwise("fence.proxy.async.global; mov.b32 $0, $1;", "=r,r", [x],
                                     dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _globaltimer(dep):
    """The GPU's global nanosecond timer (int64, the same clock on every SM); dep (an int32
    scalar) only orders the read after it."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep],
                                     dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _clock(dep):
    """This SM's cycle counter (int64), for durations inside one program."""
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _trace_rows(trace, pid, layer, L: gl.constexpr):
    """Where this program's trace rows of one layer start (four rows of TRACE_FIELDS, one per
    product, in ``trace_shape``'s layout)."""
    return trace + (pid * L + layer) * 4 * TRACE_FIELDS


@gluon.jit
def _wait_counter(ptr, target):
    """Spin until the int32 counter at ptr reaches target (an acquire load), then fence."""
    seen = gl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    _fence_proxy_global(seen)


@gluon.jit
def _poll_chunks(chunks, offs, n):
    """The int32 counters chunks[0..n) (acquire loads; zero beyond n), then fence. Loads, not
    atomics: 128 programs polling the same counters would serialise on read-modify-writes."""
    live = offs < n
    seen = gl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l",
                                     [chunks + gl.where(live, offs, 0)], dtype=gl.int32,
                                     is_pure=False, pack=1)
    seen = gl.where(live, seen, 0)
    _fence_proxy_global(gl.sum(seen, axis=0))
    return seen


@gluon.jit
def _w_load(desc, ring, ready, empty, i, layer, pid, G: gl.constexpr, N: gl.constexpr,
            K: gl.constexpr, BN: gl.constexpr, SPLIT: gl.constexpr, ROTATE: gl.constexpr,
            TILED: gl.constexpr, trace_row, TRACE: gl.constexpr):
    """Weight loader: this program's [BN, BK] tiles of one product (weight [L*N, K] bf16, this
    layer's rows) as BN // 32 TMA loads of [32, BK] into the ring; i: the ring's running
    count, returned advanced. Work item t is K piece t % SPLIT of tile t // SPLIT. ROTATE
    (0 / 1): item t walks its piece's K steps from step t on. TILED: the weight is stored as
    contiguous [32, BK] tiles, row block r and K step k at rows (r * K / BK + k) * 32 of a
    [L * N * K / BK, BK] matrix (``tile_weights``), so each load reads 8 KB in one piece.
    TRACE: trace_row[TRACE_W_FULL] gets the cycles it waited for a free slot (the ring full)."""
    S: gl.constexpr = ring.type.shape[0]
    KSTEPS: gl.constexpr = K // BK // SPLIT
    SUB: gl.constexpr = desc.block_type.shape[0]
    if TRACE:
        full_cycles = _clock(0) * 0
    for t in range(pid, N // BN * SPLIT, G):
        n0 = layer * N + t // SPLIT * BN
        for ks in range(KSTEPS):
            k0 = (t % SPLIT * KSTEPS + (ks + t * ROTATE) % KSTEPS) * BK
            for sub in gl.static_range(BN // SUB):
                s = i % S
                if TRACE:
                    c0 = _clock(i)
                mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)
                if TRACE:
                    full_cycles += _clock(i) - c0
                mbarrier.expect(ready.index(s), desc.block_type.nbytes)
                if TILED:
                    r0 = ((n0 + sub * SUB) // SUB * (K // BK) + k0 // BK) * SUB
                    tma.async_copy_global_to_shared(desc, [r0, 0], ready.index(s),
                                                    ring.index(s))
                else:
                    tma.async_copy_global_to_shared(desc, [n0 + sub * SUB, k0], ready.index(s),
                                                    ring.index(s))
                i += 1
    if TRACE:
        gl.store(trace_row + TRACE_W_FULL, full_cycles)
    return i


@gluon.jit
def _x_load(desc, row0, ring, ready, empty, xi, counter, target, chunks, need, pid,
            G: gl.constexpr, N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr,
            SPLIT: gl.constexpr, WAIT: gl.constexpr, ROTATE: gl.constexpr,
            LOAD_X: gl.constexpr, trace_row, TRACE: gl.constexpr):
    """Activation loader: the [BM, BK] activation tiles (bf16, rows row0..row0+BM) of every
    K step of this program's tiles, in ``_w_load``'s order. WAIT=1: first wait until the
    previous product's counter reaches target; WAIT=2 (SPLIT = 1, ROTATE = 0): before K step k,
    wait until chunks[k] (tiles written in the activation's columns k*BK..) reaches need.
    LOAD_X=False (a timing probe) marks each slot ready unloaded. TRACE (WAIT=1):
    trace_row[TRACE_SEEN] gets the time the previous product's counter was seen complete."""
    S: gl.constexpr = ring.type.shape[0]
    KSTEPS: gl.constexpr = K // BK // SPLIT
    if WAIT == 1:
        _wait_counter(counter, target)
        if TRACE:
            gl.store(trace_row + TRACE_SEEN, _globaltimer(target))
    offs = gl.arange(0, 64, layout=gl.BlockedLayout([2], [32], [1], [0]))  # K steps <= 64
    if WAIT == 2:
        seen = _poll_chunks(chunks, offs, KSTEPS)
    for t in range(pid, N // BN * SPLIT, G):
        for ks in range(KSTEPS):
            if WAIT == 2:
                done = gl.sum(gl.where(offs == ks, seen, 0), axis=0)
                while done < need:
                    seen = _poll_chunks(chunks, offs, KSTEPS)
                    done = gl.sum(gl.where(offs == ks, seen, 0), axis=0)
            s = xi % S
            mbarrier.wait(empty.index(s), ((xi // S) & 1) ^ 1)
            if LOAD_X:
                mbarrier.expect(ready.index(s), desc.block_type.nbytes)
                k0 = (t % SPLIT * KSTEPS + (ks + t * ROTATE) % KSTEPS) * BK
                tma.async_copy_global_to_shared(desc, [row0, k0], ready.index(s), ring.index(s))
            else:
                mbarrier.arrive(ready.index(s), count=1)
            xi += 1
    return xi


@gluon.jit
def _weight_slot(wring, wready, wi):
    """Wait for weight slot wi and view it as the [BK, 32] B operand."""
    WS: gl.constexpr = wring.type.shape[0]
    mbarrier.wait(wready.index(wi % WS), (wi // WS) & 1)
    return wring.index(wi % WS).permute((1, 0))


@gluon.jit
def _store_tile(acc, out_ptr, OUT_STRIDE: gl.constexpr, col0, layout: gl.constexpr,
                SUB: gl.constexpr):
    """Store an fp32 [BM, SUB] accumulator as bf16 at columns col0.. of out."""
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, SUB, layout=gl.SliceLayout(0, layout))
    gl.store(out_ptr + rows[:, None] * OUT_STRIDE + cols[None, :], acc.to(gl.bfloat16))


@gluon.jit
def _sum_pieces(acc, scratch, tile_counter, item, SPLIT: gl.constexpr, layout: gl.constexpr):
    """Split K: park this piece's fp32 [BM, 32] partial at scratch[item]; the tile's last
    piece to arrive (its int32 counter, acq_rel) returns the sum of all SPLIT pieces, added in
    piece order so the result does not depend on which arrives last, and True; the others
    return (acc, False)."""
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, 32, layout=gl.SliceLayout(0, layout))
    tile_offs = rows[:, None] * 32 + cols[None, :]
    gl.store(scratch + item * (BM * 32) + tile_offs, acc)
    gl.thread_barrier()  # every warp's partial precedes the arrival
    last = gl.atomic_add(tile_counter, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    if last:
        # .cg: the L2's copy; an L1 line of an earlier layer's partial would be stale.
        first = item - item % SPLIT
        acc = gl.load(scratch + first * (BM * 32) + tile_offs, cache_modifier=".cg")
        for piece in gl.static_range(1, SPLIT):
            acc += gl.load(scratch + (first + piece) * (BM * 32) + tile_offs,
                           cache_modifier=".cg")
    return acc, last


@gluon.jit
def _mma(xring, xready, xempty, xi, wring, wready, wempty, wi, pid, out_ptr,
         OUT_STRIDE: gl.constexpr, counter, scratch, tile_counters, chunks, G: gl.constexpr,
         N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr, SPLIT: gl.constexpr,
         WAIT: gl.constexpr, MMA: gl.constexpr, trace_row, TRACE: gl.constexpr,
         PROXY_FENCE: gl.constexpr):
    """MMA partition for one product: out[:, tile] = x @ w[tile].T for this program's tiles
    (fp32 accumulators of [BM, 32], one per 32 features: BN in {32, 128}), stored as bf16 at
    out_ptr (row stride OUT_STRIDE); then one release increment of the product's counter.
    SPLIT > 1 (BN = 32 only): work item t is K piece t % SPLIT of tile t // SPLIT, and the
    pieces are summed through scratch fp32 [items, BM, 32] (``_sum_pieces``; tile_counters:
    int32 zeros, one per tile) by whichever arrives last, which stores the tile. WAIT=2: after
    each tile, a release increment of chunks[column // BK] for the BK columns it lies in.
    MMA=False (a timing probe) consumes the slots without multiplying: the tiles hold zeros.
    PROXY_FENCE=False drops the async-proxy fence before the product's release (the activation
    loaders fence after their acquire either way).
    TRACE: trace_row gets the times it started, had its first activation tile, finished its
    last MMA, had stored its output, passed the proxy fence and released the counter (global
    ns), the cycles it waited for weight and for activation slots, and its cycle counter at the
    start (``TRACE_FIELDS``)."""
    XS: gl.constexpr = xring.type.shape[0]
    WS: gl.constexpr = wring.type.shape[0]
    SUB: gl.constexpr = wring.type.shape[1]
    NSUB: gl.constexpr = BN // SUB
    KSTEPS: gl.constexpr = K // BK // SPLIT
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, SUB, 16])
    if TRACE:
        w_cycles = _clock(0) * 0
        x_cycles = w_cycles
        gl.store(trace_row + TRACE_START, _globaltimer(xi))
        gl.store(trace_row + TRACE_CLOCK, _clock(xi))
    for t in range(pid, N // BN * SPLIT, G):
        a0 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        a1 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        a2 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        a3 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        for ks in range(KSTEPS):
            xs = xi % XS
            if TRACE:
                c0 = _clock(xi)
            mbarrier.wait(xready.index(xs), (xi // XS) & 1)
            if TRACE:
                c1 = _clock(xi)
                x_cycles += c1 - c0
                if ks == 0 and t == pid:
                    gl.store(trace_row + TRACE_FIRST_X, _globaltimer(xi))
                for sub in gl.static_range(NSUB):  # the waits below then pass at once
                    _weight_slot(wring, wready, wi + sub)
                w_cycles += _clock(wi) - c1
            x = xring.index(xs)
            if MMA:
                a0 = warpgroup_mma(x, _weight_slot(wring, wready, wi), a0, is_async=True)
                if NSUB == 4:
                    a1 = warpgroup_mma(x, _weight_slot(wring, wready, wi + 1), a1, is_async=True)
                    a2 = warpgroup_mma(x, _weight_slot(wring, wready, wi + 2), a2, is_async=True)
                    a3 = warpgroup_mma(x, _weight_slot(wring, wready, wi + 3), a3, is_async=True)
                    a0, a1, a2, a3 = warpgroup_mma_wait(num_outstanding=4,
                                                        deps=(a0, a1, a2, a3))
                else:
                    a0 = warpgroup_mma_wait(num_outstanding=1, deps=(a0, ))
            else:
                for sub in gl.static_range(NSUB):
                    _weight_slot(wring, wready, wi + sub)
            # The previous step's MMAs are done: hand their slots back.
            mbarrier.arrive(xempty.index((xi + XS - 1) % XS), count=1, pred=ks > 0)
            for sub in gl.static_range(NSUB):
                mbarrier.arrive(wempty.index((wi + WS - NSUB + sub) % WS), count=1, pred=ks > 0)
            xi += 1
            wi += NSUB
        if NSUB == 4:
            a0, a1, a2, a3 = warpgroup_mma_wait(num_outstanding=0, deps=(a0, a1, a2, a3))
        else:
            a0 = warpgroup_mma_wait(num_outstanding=0, deps=(a0, ))
        if TRACE:
            gl.store(trace_row + TRACE_DONE, _globaltimer(xi))
        mbarrier.arrive(xempty.index((xi + XS - 1) % XS), count=1)
        for sub in gl.static_range(NSUB):
            mbarrier.arrive(wempty.index((wi + WS - NSUB + sub) % WS), count=1)
        if SPLIT > 1:
            a0, last = _sum_pieces(a0, scratch, tile_counters + t // SPLIT, t, SPLIT,
                                   acc_layout)
            if last:
                _store_tile(a0, out_ptr, OUT_STRIDE, t // SPLIT * BN, acc_layout, SUB)
        else:
            _store_tile(a0, out_ptr, OUT_STRIDE, t * BN, acc_layout, SUB)
        if NSUB == 4:
            _store_tile(a1, out_ptr, OUT_STRIDE, t * BN + SUB, acc_layout, SUB)
            _store_tile(a2, out_ptr, OUT_STRIDE, t * BN + 2 * SUB, acc_layout, SUB)
            _store_tile(a3, out_ptr, OUT_STRIDE, t * BN + 3 * SUB, acc_layout, SUB)
        if WAIT == 2:
            gl.thread_barrier()  # every warp's stores precede the release
            gl.atomic_add(_fence_proxy_global(0) + chunks + t * BN // BK, 1, sem="release",
                          scope="gpu")
    gl.thread_barrier()  # every warp's stores precede the release
    if TRACE:
        gl.store(trace_row + TRACE_STORED, _globaltimer(xi))
    # The fence's result (0) is added to the pointer so that it is issued before the increment.
    fenced = 0
    if PROXY_FENCE:
        fenced = _fence_proxy_global(0)
    if TRACE:
        gl.store(trace_row + TRACE_FENCED, _globaltimer(fenced))
    released = gl.atomic_add(fenced + counter, 1, sem="release", scope="gpu")
    if TRACE:
        gl.store(trace_row + TRACE_RELEASED, _globaltimer(released))
        gl.store(trace_row + TRACE_W_WAIT, w_cycles)
        gl.store(trace_row + TRACE_X_WAIT, x_cycles)
    return xi, wi


@gluon.jit
def _mma_partition(rings, bars, outs, counters, scratch, tile_counters, chunk_counters, trace,
                   SPLIT: gl.constexpr, WAIT: gl.constexpr, MMA: gl.constexpr,
                   TRACE: gl.constexpr, PROXY_FENCE: gl.constexpr,
                   L: gl.constexpr, G: gl.constexpr, H: gl.constexpr, QKV_N: gl.constexpr,
                   I2: gl.constexpr, DOWN_K: gl.constexpr,
                   BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr):
    xring, wring = rings
    xr, xe, wr, we = bars
    q_ptr, o_ptr, g_ptr, d_ptr = outs
    pid = gl.program_id(0)
    xi = 0  # running counts of the two rings' slots
    wi = 0
    for layer in range(L):
        c = counters + layer * 4
        tc = tile_counters + layer * 2 * (H // BN1)  # the output's tiles, then down's
        cc = chunk_counters + layer * 4 * CHUNKS  # per product, per BK output columns
        tr = _trace_rows(trace, pid, layer, L)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, q_ptr + layer * BM * QKV_N,
                      QKV_N, c + 0, scratch, tc, cc, G, QKV_N, H, BN0, 1, WAIT, MMA, tr, TRACE,
                      PROXY_FENCE)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, o_ptr + layer * BM * H, H,
                      c + 1, scratch, tc, cc + CHUNKS, G, H, H, BN1, SPLIT, WAIT, MMA,
                      tr + TRACE_FIELDS, TRACE, PROXY_FENCE)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, g_ptr + layer * BM * I2, I2,
                      c + 2, scratch, tc, cc + 2 * CHUNKS, G, I2, H, BN2, 1, WAIT, MMA,
                      tr + 2 * TRACE_FIELDS, TRACE, PROXY_FENCE)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, d_ptr + (layer + 1) * BM * H, H,
                      c + 3, scratch, tc + H // BN1, cc + 3 * CHUNKS, G, H, DOWN_K, BN3, SPLIT,
                      WAIT, MMA, tr + 3 * TRACE_FIELDS, TRACE, PROXY_FENCE)


@gluon.jit
def _w_partition(wdescs, rings, bars, trace, SPLIT: gl.constexpr, ROTATE: gl.constexpr,
                 TILED: gl.constexpr, TRACE: gl.constexpr, L: gl.constexpr, G: gl.constexpr,
                 H: gl.constexpr, QKV_N: gl.constexpr, I2: gl.constexpr, DOWN_K: gl.constexpr,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr):
    d0, d1, d2, d3 = wdescs
    _, wring = rings
    _, _, wr, we = bars
    pid = gl.program_id(0)
    wi = 0
    for layer in range(L):
        tr = _trace_rows(trace, pid, layer, L)
        wi = _w_load(d0, wring, wr, we, wi, layer, pid, G, QKV_N, H, BN0, 1, ROTATE, TILED,
                     tr, TRACE)
        wi = _w_load(d1, wring, wr, we, wi, layer, pid, G, H, H, BN1, SPLIT, ROTATE, TILED,
                     tr + TRACE_FIELDS, TRACE)
        wi = _w_load(d2, wring, wr, we, wi, layer, pid, G, I2, H, BN2, 1, ROTATE, TILED,
                     tr + 2 * TRACE_FIELDS, TRACE)
        wi = _w_load(d3, wring, wr, we, wi, layer, pid, G, H, DOWN_K, BN3, SPLIT, ROTATE,
                     TILED, tr + 3 * TRACE_FIELDS, TRACE)


@gluon.jit
def _x_partition(xdescs, rings, bars, counters, chunk_counters, trace, SPLIT: gl.constexpr,
                 WAIT: gl.constexpr, ROTATE: gl.constexpr, LOAD_X: gl.constexpr,
                 TRACE: gl.constexpr, L: gl.constexpr, G: gl.constexpr, H: gl.constexpr,
                 QKV_N: gl.constexpr, I2: gl.constexpr, DOWN_K: gl.constexpr,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr):
    dd, dq, do, dg = xdescs
    xring, _ = rings
    xr, xe, _, _ = bars
    pid = gl.program_id(0)
    xi = 0
    for layer in range(L):
        c = counters + layer * 4
        cc = chunk_counters + layer * 4 * CHUNKS
        # Layer 0 reads the input: counters[-1] stays 0, and both targets are 0.
        first = layer > 0
        tr = _trace_rows(trace, pid, layer, L)
        xi = _x_load(dd, layer * BM, xring, xr, xe, xi, c - 1, G * first,
                     cc - CHUNKS * first, BK // BN3 * first, pid, G, QKV_N, H, BN0, 1, WAIT,
                     ROTATE, LOAD_X, tr, TRACE)
        xi = _x_load(dq, layer * BM, xring, xr, xe, xi, c + 0, G, cc, BK // BN0, pid, G, H, H,
                     BN1, SPLIT, WAIT, ROTATE, LOAD_X, tr + TRACE_FIELDS, TRACE)
        xi = _x_load(do, layer * BM, xring, xr, xe, xi, c + 1, G, cc + CHUNKS, BK // BN1, pid,
                     G, I2, H, BN2, 1, WAIT, ROTATE, LOAD_X, tr + 2 * TRACE_FIELDS, TRACE)
        xi = _x_load(dg, layer * BM, xring, xr, xe, xi, c + 2, G, cc + 2 * CHUNKS, BK // BN2,
                     pid, G, H, DOWN_K, BN3, SPLIT, WAIT, ROTATE, LOAD_X,
                     tr + 3 * TRACE_FIELDS, TRACE)


@gluon.jit
def persistent_chain_kernel(wd0, wd1, wd2, wd3, xdd, xdq, xdo, xdg, q_ptr, o_ptr, g_ptr,
                            d_ptr, counters, scratch, tile_counters, chunk_counters, trace,
                            L: gl.constexpr, G: gl.constexpr, H: gl.constexpr,
                            QKV_N: gl.constexpr, I2: gl.constexpr, DOWN_K: gl.constexpr,
                            BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr,
                            BN3: gl.constexpr, XS: gl.constexpr, WS: gl.constexpr,
                            SPLIT: gl.constexpr = 1, WAIT: gl.constexpr = 1,
                            ROTATE: gl.constexpr = 0, LOAD_X: gl.constexpr = True,
                            TILED: gl.constexpr = False, MMA: gl.constexpr = True,
                            TRACE: gl.constexpr = False, PROXY_FENCE: gl.constexpr = True):
    """Every layer's QKV, output, gate/up and down products at M = BM rows in one launch of G
    programs (all resident: one per SM).

    wd*: TMA descriptors of the stacked weights [L*N, K] bf16, blocks [32, BK]; xd*: of the
    activations the products read ([(L+1)*BM, H], [L*BM, QKV_N], [L*BM, H], [L*BM, I2], blocks
    [BM, BK]); q/o/g/d_ptr: the same buffers as bf16 pointers for the outputs (down writes the
    next layer's input rows); counters: int32 [4L] zeros (one per product, counters[-1] must
    exist and stay 0). SPLIT > 1: the output and down products (BN1 = BN3 = 32) cut K into
    SPLIT pieces, one work item each, summed through scratch fp32 [H / 32 * SPLIT, BM, 32]
    with tile_counters int32 [L, 2, H / 32] zeros (``_sum_pieces``). WAIT=1: each product
    waits for the whole previous one (its counter); WAIT=2: K step k waits only for the tiles
    that wrote the activation's columns k*BK.. (chunk_counters int32 [L, 4, CHUNKS] zeros, one
    per product and BK output columns); WAIT=0 drops the waits (a timing probe: results race).
    ROTATE=1: each tile walks its K steps from its own step on, so the programs do not all read
    the same activation tile at once. TILED: wd* describe ``tile_weights``' layout. Probes
    (timing only, the outputs are garbage): LOAD_X=False marks activation slots ready unloaded;
    MMA=False consumes the slots without wgmma. PROXY_FENCE=False: no async-proxy fence before
    a product's release (the activation loaders still fence after their acquire). TRACE: record
    each program's timeline in trace, int64 [G, L, 4, TRACE_FIELDS] (see TRACE_FIELDS);
    otherwise trace is not touched.
    """
    xring = gl.allocate_shared_memory(xdd.dtype, [XS, BM, BK], xdd.layout)
    wring = gl.allocate_shared_memory(wd0.dtype, [WS] + wd0.block_type.shape, wd0.layout)
    xr = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    xe = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    wr = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    we = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(XS):
        mbarrier.init(xr.index(i), count=1)
        mbarrier.init(xe.index(i), count=1)
    for i in gl.static_range(WS):
        mbarrier.init(wr.index(i), count=1)
        mbarrier.init(we.index(i), count=1)
    fence_async_shared()
    rings = (xring, wring)
    bars = (xr, xe, wr, we)
    gl.warp_specialize([
        (_mma_partition, (rings, bars, (q_ptr, o_ptr, g_ptr, d_ptr), counters, scratch,
                          tile_counters, chunk_counters, trace, SPLIT, WAIT, MMA, TRACE,
                          PROXY_FENCE, L, G, H, QKV_N, I2, DOWN_K, BN0, BN1, BN2, BN3)),
        (_w_partition, ((wd0, wd1, wd2, wd3), rings, bars, trace, SPLIT, ROTATE, TILED, TRACE,
                        L, G, H, QKV_N, I2, DOWN_K, BN0, BN1, BN2, BN3)),
        (_x_partition, ((xdd, xdq, xdo, xdg), rings, bars, counters, chunk_counters, trace,
                        SPLIT, WAIT, ROTATE, LOAD_X, TRACE, L, G, H, QKV_N, I2, DOWN_K, BN0,
                        BN1, BN2, BN3)),
    ], [1, 1], [24, 24])


# Llama-3.2-1B: hidden, QKV features, gate/up features (2I), down's K (I).
HIDDEN, QKV_N, GATE_UP_N, INTER = 2048, 3072, 16384, 8192
PRODUCTS = ((QKV_N, HIDDEN), (HIDDEN, HIDDEN), (GATE_UP_N, HIDDEN), (HIDDEN, INTER))  # (N, K)
# Features per tile (QKV on 96 programs, output and down on 64, gate/up on 128) and ring depths
# (XS activation tiles of 16 KB, WS weight tiles of 8 KB: 224 KB with the barriers' bytes).
# Variants: xAwB = A activation and B weight slots; gate-up-32: gate/up on 32-feature tiles
# (4 per program); split2: the output and down products' K in two pieces (on 128 programs);
# no-waits: the counters are not waited on (a timing probe, results race);
# tiled: weights stored as contiguous 8 KB tiles (``tile_weights``);
# chunk-waits: each K step waits only for the tiles that wrote its activation columns;
# rotated: each tile walks its K steps from its own step on (ROTATE); no-x-loads: activation
# slots marked ready without loading them (a probe); weights-only: that and no waits; no-mma:
# the slots consumed without wgmma (a probe); no-release-fence: no async-proxy fence before a
# product's release (PROXY_FENCE).
MAX_REGISTERS = 168  # per thread, the limit warp specialisation redistributes from
CONFIG = dict(G=128, BN0=32, BN1=32, BN2=128, BN3=32, XS=6, WS=16)
# The kernel's defaulted constexprs (an ahead-of-time compile does not apply defaults).
KERNEL_DEFAULTS = dict(SPLIT=1, WAIT=1, ROTATE=0, LOAD_X=True, TILED=False, MMA=True,
                       TRACE=False, PROXY_FENCE=True)
VARIANTS = {"x2w24": dict(XS=2, WS=24), "x3w22": dict(XS=3, WS=22), "x4w20": dict(XS=4, WS=20),
            "x6w16": {}, "x8w12": dict(XS=8, WS=12), "x10w8": dict(XS=10, WS=8),
            "x6w12": dict(WS=12), "x6w10": dict(WS=10), "x6w8": dict(WS=8),
            "x4w12": dict(XS=4, WS=12), "x4w8": dict(XS=4, WS=8),
            "x4w20 gate-up-32": dict(XS=4, WS=20, BN2=32),
            "x4w20 no-waits": dict(XS=4, WS=20, WAIT=0),
            "x6w16 rotated": dict(ROTATE=1), "x4w20 rotated": dict(XS=4, WS=20, ROTATE=1),
            "x8w12 rotated": dict(XS=8, WS=12, ROTATE=1),
            "x6w16 no-waits": dict(WAIT=0), "x6w16 no-x-loads": dict(LOAD_X=False),
            "x6w16 weights-only": dict(LOAD_X=False, WAIT=0),
            "x2w24 weights-only": dict(XS=2, WS=24, LOAD_X=False, WAIT=0),
            "x6w16 split2": dict(SPLIT=2), "x8w12 split2": dict(XS=8, WS=12, SPLIT=2),
            "x6w16 split2 weights-only": dict(SPLIT=2, LOAD_X=False, WAIT=0),
            "x6w16 tiled": dict(TILED=True), "x8w12 tiled": dict(XS=8, WS=12, TILED=True),
            "x6w16 tiled weights-only": dict(TILED=True, LOAD_X=False, WAIT=0),
            "x6w16 chunk-waits": dict(WAIT=2), "x8w12 chunk-waits": dict(XS=8, WS=12, WAIT=2),
            "x6w16 chunk-waits no-x-loads": dict(WAIT=2, LOAD_X=False),
            "x6w16 weights-only no-mma": dict(LOAD_X=False, WAIT=0, MMA=False),
            "x6w16 no-mma": dict(MMA=False),
            "x6w16 no-x-loads no-mma": dict(LOAD_X=False, MMA=False),
            "x2w24 no-x-loads no-mma": dict(XS=2, WS=24, LOAD_X=False, MMA=False),
            "x2w24 weights-only no-mma": dict(XS=2, WS=24, LOAD_X=False, WAIT=0, MMA=False),
            "x6w16 split2 no-x-loads no-mma": dict(SPLIT=2, LOAD_X=False, MMA=False),
            "x6w16 no-release-fence": dict(PROXY_FENCE=False),
            "x6w16 no-x-loads no-mma no-release-fence": dict(LOAD_X=False, MMA=False,
                                                             PROXY_FENCE=False)}


def is_probe(variant: dict) -> bool:
    """Whether a variant leaves out part of the work (its outputs are not the products)."""
    config = {**KERNEL_DEFAULTS, **variant}
    return config["WAIT"] == 0 or not config["LOAD_X"] or not config["MMA"]


def _shared_layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def descriptors(weights, acts):
    """TMA descriptors: weights [L*N, K] in [32, BK] blocks, activations in [BM, BK] blocks."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bm, bk = BM.value, BK.value
    return ([TensorDescriptor.from_tensor(w, [32, bk], _shared_layout([32, bk])) for w in weights],
            [TensorDescriptor.from_tensor(a, [bm, bk], _shared_layout([bm, bk])) for a in acts])


def tile_weights(weights):
    """Each [L*N, K] weight as contiguous [32, BK] tiles: tile (r, k) (rows 32r.., K step k)
    at rows (r * K / BK + k) * 32 of a [L*N*K / BK, BK] matrix."""
    bk = BK.value
    return [w.view(w.shape[0] // 32, 32, w.shape[1] // bk, bk).transpose(1, 2).reshape(-1, bk)
            for w in weights]


def activation_shapes(layers: int) -> list[tuple[int, int]]:
    """The buffers the products read and write: the layers' inputs (layer l + 1's written by
    layer l's down product), QKV, attention (the output product's input) and gate/up."""
    m = BM.value
    return [((layers + 1) * m, HIDDEN), (layers * m, QKV_N), (layers * m, HIDDEN),
            (layers * m, GATE_UP_N)]


def counter_sizes(layers: int) -> tuple[int, int, int]:
    """Entries of the counters buffer after its spare: one per product, one per split output
    and down tile, one per product and BK output columns (chunks)."""
    return 4 * layers, 2 * layers * HIDDEN // 32, 4 * layers * CHUNKS.value


def split_counters(counters: torch.Tensor, layers: int) -> tuple[torch.Tensor, ...]:
    """Views of the buffer's product, tile and chunk counters (past the spare in front)."""
    return torch.split(counters[1:], counter_sizes(layers))


def build(layers: int, seed: int = 0):
    """Stacked weights (scaled so activations stay O(1)), the activation buffers (input rows of
    layer 0 random, the rest zero) and the counters: one spare in front (counters[-1]), one
    per product, the split products' tile counters, then the chunk counters."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    m = BM.value
    weights = [(torch.randn(layers * n, k, device="cuda", generator=g) * k ** -0.5)
               .to(torch.bfloat16) for n, k in PRODUCTS]
    acts = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
            for shape in activation_shapes(layers)]
    acts[0][:m] = torch.randn(m, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
    counters = torch.zeros(1 + sum(counter_sizes(layers)), device="cuda", dtype=torch.int32)
    return weights, acts, counters


def persistent(layers: int, config: dict, weights, acts, counters, trace=None):
    """The one-launch chain (counters zeroed first) as a function; with TRACE in config it
    records its timeline in trace, int64 of ``trace_shape(layers, config)``."""
    config = {**CONFIG, **config}
    if config.get("TRACE") and (trace is None or trace.shape != trace_shape(layers, config)):
        raise ValueError("a traced chain takes a trace buffer of trace_shape(layers, config)")
    # The MMA partition hands a slot back one step late: a ring must hold two steps.
    if config["XS"] < 2 or config["WS"] < 2 * max(config[f"BN{i}"] for i in range(4)) // 32:
        raise ValueError(f"rings too shallow for two steps: {config}")
    split = config.get("SPLIT", 1)
    if split > 1 and (config["BN1"] != 32 or config["BN3"] != 32 or HIDDEN // BK.value % split):
        raise ValueError(f"split K takes 32-feature output and down tiles: {config}")
    if config.get("WAIT") == 2 and (split > 1 or config.get("ROTATE")):
        raise ValueError(f"chunk waits take whole, unrotated K loops: {config}")
    if config.get("TILED"):
        weights = tile_weights(weights)
    wdescs, xdescs = descriptors(weights, acts)
    inputs, qkv, attn, gate_up = acts
    scratch = torch.empty(HIDDEN // 32 * split * BM.value * 32, device="cuda",
                          dtype=torch.float32)
    product_counters, tile_counters, chunk_counters = split_counters(counters, layers)

    def run():
        counters.zero_()
        persistent_chain_kernel[(config["G"], )](
            *wdescs, *xdescs, qkv, attn, gate_up, inputs, product_counters, scratch,
            tile_counters, chunk_counters, trace if trace is not None else counters,
            L=layers, H=HIDDEN, QKV_N=QKV_N, I2=GATE_UP_N, DOWN_K=INTER, num_warps=4,
            maxnreg=MAX_REGISTERS, **config)
    return run


def trace_shape(layers: int, config: dict) -> tuple[int, ...]:
    """The trace buffer's shape: programs, layers, products, fields."""
    return ({**CONFIG, **config}["G"], layers, 4, TRACE_FIELDS.value)


def _layer_products(layers: int, weights, acts):
    """Per layer and product: (input rows, weight rows, output rows) views."""
    inputs, qkv, attn, gate_up = acts
    m = BM.value
    out = []
    for l in range(layers):
        r = slice(l * m, (l + 1) * m)
        w = [weights[p][l * n:(l + 1) * n] for p, (n, _) in enumerate(PRODUCTS)]
        out.append(((inputs[r], w[0], qkv[r]), (qkv[r][:, :HIDDEN], w[1], attn[r]),
                    (attn[r], w[2], gate_up[r]),
                    (gate_up[r][:, :INTER], w[3], inputs[(l + 1) * m:(l + 2) * m])))
    return out


def worst_error(layers: int, weights, acts) -> float:
    """Largest relative L2 error of any product against fp32 torch on its own input buffer."""
    worst = 0.0
    for layer in _layer_products(layers, weights, acts):
        for x, w, y in layer:
            ref = x.float() @ w.float().t()
            worst = max(worst, ((y.float() - ref).norm() / ref.norm()).item())
    return worst


def dependent_launches(layers: int, weights, acts):
    from kernels.gemm import PLAIN, gemm_config, skinny_gemm

    configs = [gemm_config(BM.value, n, k, torch.bfloat16, PLAIN, pdl=True) for n, k in PRODUCTS]

    def run():
        for layer in _layer_products(layers, weights, acts):
            for (x, w, y), config in zip(layer, configs):
                skinny_gemm(x, w, y, PLAIN, config=config)
    return run


@triton.jit
def _read_kernel(w_ptr, sums_ptr, numel, BLOCK: tl.constexpr):
    """Sum a flat bf16 tensor's elements [pid * BLOCK ...) in strides of the grid (fp32, one
    partial per program): a pure read of every byte, the streaming ceiling of the chain."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(sums_ptr + pid, tl.sum(acc))


READ_PROBE = "weights read once (no products)"


def read_stream(weights, programs: int = 132 * 4):
    """Every weight byte read once, the products' arithmetic left out (a probe of how fast the
    chain's bytes can stream at all)."""
    sums = torch.empty(programs, device="cuda", dtype=torch.float32)

    def run():
        for w in weights:
            _read_kernel[(programs, )](w, sums, w.numel(), BLOCK=4096, num_warps=8)
    return run


def cublas(layers: int, weights, acts):
    def run():
        for layer in _layer_products(layers, weights, acts):
            for x, w, y in layer:
                torch.mm(x, w.t(), out=y)
    return run


def compile_for_h100(layers: int = 2, config: dict | None = None) -> dict:
    """Compile the kernel for sm_90 without a GPU (run with TRITON_INTERPRET=0): shared bytes
    and counts of the PTX instructions the design rests on."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    config = {**CONFIG, **(config or {})}
    weights = [torch.empty(layers * n, k, dtype=torch.bfloat16) for n, k in PRODUCTS]
    if config.get("TILED"):
        weights = tile_weights(weights)
    acts = [torch.empty(shape, dtype=torch.bfloat16) for shape in activation_shapes(layers)]
    wdescs, xdescs = descriptors(weights, acts)
    names = persistent_chain_kernel.arg_names
    constexprs = dict(L=layers, H=HIDDEN, QKV_N=QKV_N, I2=GATE_UP_N, DOWN_K=INTER,
                      **{**KERNEL_DEFAULTS, **config})
    signature = {n: mangle_type(d) for n, d in zip(names, wdescs + xdescs)}
    signature.update({n: "*bf16" for n in ("q_ptr", "o_ptr", "g_ptr", "d_ptr")})
    signature.update(counters="*i32", scratch="*fp32", tile_counters="*i32",
                     chunk_counters="*i32", trace="*i64", **{n: "constexpr" for n in constexprs})
    aligned = {(names.index(n), ): [["tt.divisibility", 16]]
               for n in ("q_ptr", "o_ptr", "g_ptr", "d_ptr", "counters", "scratch", "trace")}
    source = GluonASTSource(persistent_chain_kernel, signature, constexprs, aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, maxnreg=MAX_REGISTERS))
    ptx = kernel.asm["ptx"]
    return dict(shared=kernel.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                tma_loads=ptx.count("cp.async.bulk.tensor"),
                acquire_loads=ptx.count("ld.global.gpu.acquire"),
                release_adds=ptx.count("atom.global.gpu.release.add"),
                proxy_fences=ptx.count("fence.proxy.async.global"))


def plot(rows: list[dict], roofline_us: float, layers: int, probes: set[str],
         path: Path) -> None:
    """One bar per chain: the median of its rounds' times, as % of the roofline time (the
    chains named in probes, whose results are not the products, hatched)."""
    import statistics

    from bench.plots import _pyplot, _save

    plt = _pyplot()
    names = list(dict.fromkeys(r["name"] for r in rows))
    pct = [100 * roofline_us / statistics.median(r["us"] for r in rows if r["name"] == name)
           for name in names]
    probe = [name in probes for name in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    ax.barh(names, pct, color=["C1" if p else "C0" for p in probe],
            hatch=[("//" if p else "") for p in probe])
    for y, value in enumerate(pct):
        ax.text(value + 0.5, y, f"{value:.1f}%", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.axvline(100, color="grey", lw=0.5)
    ax.set(xlim=(0, 110), xlabel="% of roofline (roofline / chain time)",
           title=f"1B products at M = {BM.value}, {layers} layers: roofline {roofline_us:.0f} us "
                 "(hatched: probes)")
    ax.tick_params(axis="y", labelsize=7)
    _save(fig, path)


def main() -> None:
    from bench.common import RESULTS_DIR, copy_bandwidth_gbps, time_ms, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="names of VARIANTS, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    copy = copy_bandwidth_gbps()
    roof_us = args.layers * sum(n * k * 2 for n, k in PRODUCTS) / (copy * 1e3)
    weights, acts, counters = build(args.layers)
    fns = {READ_PROBE: read_stream(weights),
           "cuBLAS": cublas(args.layers, weights, acts),
           "dependent launches (kernels.gemm)": dependent_launches(args.layers, weights, acts)}
    for name in args.variants.split(","):
        fns[f"persistent {name}"] = persistent(args.layers, VARIANTS[name], weights, acts,
                                               counters)
    errors = {}
    for name, fn in fns.items():
        for a in acts[1:]:
            a.zero_()
        acts[0][BM.value:].zero_()
        fn()
        torch.cuda.synchronize()
        errors[name] = worst_error(args.layers, weights, acts)
    rows = []
    for rnd in range(args.rounds):
        for name, fn in fns.items():
            us = time_ms(fn) * 1e3
            rows.append(dict(name=name, round=rnd, us=us, roofline_pct=100 * roof_us / us,
                             worst_rel_err=errors[name]))
            print(f"round {rnd}  {name:44s} {us:8.1f} us  {100 * roof_us / us:5.1f}% of roofline"
                  f"  err {errors[name]:.1e}", flush=True)
    write_json(args.out / "persistent_chain.json",
               dict(copy_gbps=copy, roofline_us=roof_us, layers=args.layers, rows=rows,
                    config=CONFIG,
                    variants={n: VARIANTS[n] for n in args.variants.split(",")}))
    probes = {READ_PROBE} | {f"persistent {n}" for n in args.variants.split(",")
                             if is_probe(VARIANTS[n])}
    plot(rows, roof_us, args.layers, probes, args.out / "persistent_chain.png")


if __name__ == "__main__":
    main()
