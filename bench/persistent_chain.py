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
on the same buffers; cuBLAS beside both. 1B shapes, M = 64, L2 flushed before each replay.

    python -m bench.persistent_chain [--variants base,x6w16,...] [--layers 16] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

BM = gl.constexpr(64)   # rows (the batch)
BK = gl.constexpr(128)  # K per step


@gluon.jit
def _fence_proxy_global(x):
    """Orders this thread's global accesses of the generic proxy (plain loads / stores, the
    counters) with those of the async proxy (TMA); returns x so the compiler keeps it."""
    return gl.inline_asm_elementwise("fence.proxy.async.global; mov.b32 $0, $1;", "=r,r", [x],
                                     dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _wait_counter(ptr, target):
    """Spin until the int32 counter at ptr reaches target (an acquire load), then fence."""
    seen = gl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    _fence_proxy_global(seen)


@gluon.jit
def _w_load(desc, ring, ready, empty, i, layer, pid, G: gl.constexpr, N: gl.constexpr,
            K: gl.constexpr, BN: gl.constexpr, ROTATE: gl.constexpr):
    """Weight loader: this program's [BN, BK] tiles of one product (weight [L*N, K] bf16, this
    layer's rows) as BN // 32 TMA loads of [32, BK] into the ring; i: the ring's running
    count, returned advanced. ROTATE (0 / 1): tile t walks its K steps from step t on."""
    S: gl.constexpr = ring.type.shape[0]
    KSTEPS: gl.constexpr = K // BK
    SUB: gl.constexpr = desc.block_type.shape[0]
    for t in range(pid, N // BN, G):
        n0 = layer * N + t * BN
        for ks in range(KSTEPS):
            k0 = ((ks + t * ROTATE) % KSTEPS) * BK
            for sub in gl.static_range(BN // SUB):
                s = i % S
                mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)
                mbarrier.expect(ready.index(s), desc.block_type.nbytes)
                tma.async_copy_global_to_shared(desc, [n0 + sub * SUB, k0], ready.index(s),
                                                ring.index(s))
                i += 1
    return i


@gluon.jit
def _x_load(desc, row0, ring, ready, empty, xi, counter, target, pid, G: gl.constexpr,
            N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr, WAIT: gl.constexpr,
            ROTATE: gl.constexpr, LOAD_X: gl.constexpr):
    """Activation loader: once the previous product's counter reaches target, the [BM, BK]
    activation tiles (bf16, rows row0..row0+BM) of every K step of this program's tiles, in
    ``_w_load``'s order. LOAD_X=False (a timing probe) marks each slot ready unloaded."""
    S: gl.constexpr = ring.type.shape[0]
    KSTEPS: gl.constexpr = K // BK
    if WAIT:
        _wait_counter(counter, target)
    for t in range(pid, N // BN, G):
        for ks in range(KSTEPS):
            s = xi % S
            mbarrier.wait(empty.index(s), ((xi // S) & 1) ^ 1)
            if LOAD_X:
                mbarrier.expect(ready.index(s), desc.block_type.nbytes)
                tma.async_copy_global_to_shared(desc, [row0, ((ks + t * ROTATE) % KSTEPS) * BK],
                                                ready.index(s), ring.index(s))
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
def _mma(xring, xready, xempty, xi, wring, wready, wempty, wi, pid, out_ptr,
         OUT_STRIDE: gl.constexpr, counter, G: gl.constexpr, N: gl.constexpr, K: gl.constexpr,
         BN: gl.constexpr):
    """MMA partition for one product: out[:, tile] = x @ w[tile].T for this program's tiles
    (fp32 accumulators of [BM, 32], one per 32 features: BN in {32, 128}), stored as bf16 at
    out_ptr (row stride OUT_STRIDE); then one release increment of the product's counter."""
    XS: gl.constexpr = xring.type.shape[0]
    WS: gl.constexpr = wring.type.shape[0]
    SUB: gl.constexpr = wring.type.shape[1]
    NSUB: gl.constexpr = BN // SUB
    KSTEPS: gl.constexpr = K // BK
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, SUB, 16])
    for t in range(pid, N // BN, G):
        a0 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        a1 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        a2 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        a3 = gl.zeros([BM, SUB], gl.float32, acc_layout)
        for ks in range(KSTEPS):
            xs = xi % XS
            mbarrier.wait(xready.index(xs), (xi // XS) & 1)
            x = xring.index(xs)
            a0 = warpgroup_mma(x, _weight_slot(wring, wready, wi), a0, is_async=True)
            if NSUB == 4:
                a1 = warpgroup_mma(x, _weight_slot(wring, wready, wi + 1), a1, is_async=True)
                a2 = warpgroup_mma(x, _weight_slot(wring, wready, wi + 2), a2, is_async=True)
                a3 = warpgroup_mma(x, _weight_slot(wring, wready, wi + 3), a3, is_async=True)
                a0, a1, a2, a3 = warpgroup_mma_wait(num_outstanding=4, deps=(a0, a1, a2, a3))
            else:
                a0 = warpgroup_mma_wait(num_outstanding=1, deps=(a0, ))
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
        mbarrier.arrive(xempty.index((xi + XS - 1) % XS), count=1)
        for sub in gl.static_range(NSUB):
            mbarrier.arrive(wempty.index((wi + WS - NSUB + sub) % WS), count=1)
        _store_tile(a0, out_ptr, OUT_STRIDE, t * BN, acc_layout, SUB)
        if NSUB == 4:
            _store_tile(a1, out_ptr, OUT_STRIDE, t * BN + SUB, acc_layout, SUB)
            _store_tile(a2, out_ptr, OUT_STRIDE, t * BN + 2 * SUB, acc_layout, SUB)
            _store_tile(a3, out_ptr, OUT_STRIDE, t * BN + 3 * SUB, acc_layout, SUB)
    gl.thread_barrier()  # every warp's stores precede the release
    # The fence's result (0) is added to the pointer so that it is issued before the increment.
    gl.atomic_add(_fence_proxy_global(0) + counter, 1, sem="release", scope="gpu")
    return xi, wi


@gluon.jit
def _mma_partition(rings, bars, outs, counters, L: gl.constexpr, G: gl.constexpr,
                   H: gl.constexpr, QKV_N: gl.constexpr, I2: gl.constexpr, DOWN_K: gl.constexpr,
                   BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr):
    xring, wring = rings
    xr, xe, wr, we = bars
    q_ptr, o_ptr, g_ptr, d_ptr = outs
    pid = gl.program_id(0)
    xi = 0  # running counts of the two rings' slots
    wi = 0
    for layer in range(L):
        c = counters + layer * 4
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, q_ptr + layer * BM * QKV_N,
                      QKV_N, c + 0, G, QKV_N, H, BN0)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, o_ptr + layer * BM * H, H,
                      c + 1, G, H, H, BN1)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, g_ptr + layer * BM * I2, I2,
                      c + 2, G, I2, H, BN2)
        xi, wi = _mma(xring, xr, xe, xi, wring, wr, we, wi, pid, d_ptr + (layer + 1) * BM * H, H,
                      c + 3, G, H, DOWN_K, BN3)


@gluon.jit
def _w_partition(wdescs, rings, bars, ROTATE: gl.constexpr, L: gl.constexpr, G: gl.constexpr,
                 H: gl.constexpr, QKV_N: gl.constexpr, I2: gl.constexpr, DOWN_K: gl.constexpr,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr):
    d0, d1, d2, d3 = wdescs
    _, wring = rings
    _, _, wr, we = bars
    pid = gl.program_id(0)
    wi = 0
    for layer in range(L):
        wi = _w_load(d0, wring, wr, we, wi, layer, pid, G, QKV_N, H, BN0, ROTATE)
        wi = _w_load(d1, wring, wr, we, wi, layer, pid, G, H, H, BN1, ROTATE)
        wi = _w_load(d2, wring, wr, we, wi, layer, pid, G, I2, H, BN2, ROTATE)
        wi = _w_load(d3, wring, wr, we, wi, layer, pid, G, H, DOWN_K, BN3, ROTATE)


@gluon.jit
def _x_partition(xdescs, rings, bars, counters, WAIT: gl.constexpr, ROTATE: gl.constexpr,
                 LOAD_X: gl.constexpr, L: gl.constexpr,
                 G: gl.constexpr, H: gl.constexpr, QKV_N: gl.constexpr, I2: gl.constexpr,
                 DOWN_K: gl.constexpr,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr):
    dd, dq, do, dg = xdescs
    xring, _ = rings
    xr, xe, _, _ = bars
    pid = gl.program_id(0)
    xi = 0
    for layer in range(L):
        c = counters + layer * 4
        # Layer 0 reads the input: counters[-1] stays 0 and the target is 0.
        xi = _x_load(dd, layer * BM, xring, xr, xe, xi, c - 1, G * (layer > 0), pid, G, QKV_N,
                     H, BN0, WAIT, ROTATE, LOAD_X)
        xi = _x_load(dq, layer * BM, xring, xr, xe, xi, c + 0, G, pid, G, H, H, BN1, WAIT,
                     ROTATE, LOAD_X)
        xi = _x_load(do, layer * BM, xring, xr, xe, xi, c + 1, G, pid, G, I2, H, BN2, WAIT,
                     ROTATE, LOAD_X)
        xi = _x_load(dg, layer * BM, xring, xr, xe, xi, c + 2, G, pid, G, H, DOWN_K, BN3, WAIT,
                     ROTATE, LOAD_X)


@gluon.jit
def persistent_chain_kernel(wd0, wd1, wd2, wd3, xdd, xdq, xdo, xdg, q_ptr, o_ptr, g_ptr,
                            d_ptr, counters, L: gl.constexpr, G: gl.constexpr, H: gl.constexpr,
                            QKV_N: gl.constexpr, I2: gl.constexpr, DOWN_K: gl.constexpr,
                            BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr,
                            BN3: gl.constexpr, XS: gl.constexpr, WS: gl.constexpr,
                            WAIT: gl.constexpr = True, ROTATE: gl.constexpr = 0,
                            LOAD_X: gl.constexpr = True):
    """Every layer's QKV, output, gate/up and down products at M = BM rows in one launch of G
    programs (all resident: one per SM).

    wd*: TMA descriptors of the stacked weights [L*N, K] bf16, blocks [32, BK]; xd*: of the
    activations the products read ([(L+1)*BM, H], [L*BM, QKV_N], [L*BM, H], [L*BM, I2], blocks
    [BM, BK]); q/o/g/d_ptr: the same buffers as bf16 pointers for the outputs (down writes the
    next layer's input rows); counters: int32 [4L] zeros (one per product, counters[-1] must
    exist and stay 0). WAIT=False drops the waits (a timing probe: results race). ROTATE=1:
    each tile walks its K steps from its own step on, so the programs do not all read the same
    activation tile at once. LOAD_X=False: activation slots are marked ready unloaded (a
    timing probe: results are garbage).
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
        (_mma_partition, (rings, bars, (q_ptr, o_ptr, g_ptr, d_ptr), counters, L, G, H, QKV_N,
                          I2, DOWN_K, BN0, BN1, BN2, BN3)),
        (_w_partition, ((wd0, wd1, wd2, wd3), rings, bars, ROTATE, L, G, H, QKV_N, I2, DOWN_K,
                        BN0, BN1, BN2, BN3)),
        (_x_partition, ((xdd, xdq, xdo, xdg), rings, bars, counters, WAIT, ROTATE, LOAD_X, L,
                        G, H, QKV_N, I2, DOWN_K, BN0, BN1, BN2, BN3)),
    ], [1, 1], [24, 24])


# Llama-3.2-1B: hidden, QKV features, gate/up features (2I), down's K (I).
HIDDEN, QKV_N, GATE_UP_N, INTER = 2048, 3072, 16384, 8192
PRODUCTS = ((QKV_N, HIDDEN), (HIDDEN, HIDDEN), (GATE_UP_N, HIDDEN), (HIDDEN, INTER))  # (N, K)
# Features per tile (QKV on 96 programs, output and down on 64, gate/up on 128) and ring depths
# (XS activation tiles of 16 KB, WS weight tiles of 8 KB: 224 KB with the barriers' bytes).
# Variants: xAwB = A activation and B weight slots; gate-up-32: gate/up on 32-feature tiles
# (4 per program); no-waits: the counters are not waited on (a timing probe, results race);
# rotated: each tile walks its K steps from its own step on (ROTATE); no-x-loads: activation
# slots marked ready without loading them (a probe); weights-only: that and no waits.
MAX_REGISTERS = 168  # per thread, the limit warp specialisation redistributes from
CONFIG = dict(G=128, BN0=32, BN1=32, BN2=128, BN3=32, XS=6, WS=16)
VARIANTS = {"x2w24": dict(XS=2, WS=24), "x3w22": dict(XS=3, WS=22), "x4w20": dict(XS=4, WS=20),
            "x6w16": {}, "x8w12": dict(XS=8, WS=12), "x10w8": dict(XS=10, WS=8),
            "x4w20 gate-up-32": dict(XS=4, WS=20, BN2=32),
            "x4w20 no-waits": dict(XS=4, WS=20, WAIT=False),
            "x6w16 rotated": dict(ROTATE=1), "x4w20 rotated": dict(XS=4, WS=20, ROTATE=1),
            "x8w12 rotated": dict(XS=8, WS=12, ROTATE=1),
            "x6w16 no-waits": dict(WAIT=False), "x6w16 no-x-loads": dict(LOAD_X=False),
            "x6w16 weights-only": dict(LOAD_X=False, WAIT=False)}


def _shared_layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def descriptors(weights, acts):
    """TMA descriptors: weights [L*N, K] in [32, BK] blocks, activations in [BM, BK] blocks."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bm, bk = BM.value, BK.value
    return ([TensorDescriptor.from_tensor(w, [32, bk], _shared_layout([32, bk])) for w in weights],
            [TensorDescriptor.from_tensor(a, [bm, bk], _shared_layout([bm, bk])) for a in acts])


def activation_shapes(layers: int) -> list[tuple[int, int]]:
    """The buffers the products read and write: the layers' inputs (layer l + 1's written by
    layer l's down product), QKV, attention (the output product's input) and gate/up."""
    m = BM.value
    return [((layers + 1) * m, HIDDEN), (layers * m, QKV_N), (layers * m, HIDDEN),
            (layers * m, GATE_UP_N)]


def build(layers: int, seed: int = 0):
    """Stacked weights (scaled so activations stay O(1)), the activation buffers (input rows of
    layer 0 random, the rest zero) and the counters (one spare in front: counters[-1])."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    m = BM.value
    weights = [(torch.randn(layers * n, k, device="cuda", generator=g) * k ** -0.5)
               .to(torch.bfloat16) for n, k in PRODUCTS]
    acts = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
            for shape in activation_shapes(layers)]
    acts[0][:m] = torch.randn(m, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
    return weights, acts, torch.zeros(1 + 4 * layers, device="cuda", dtype=torch.int32)


def persistent(layers: int, config: dict, weights, acts, counters):
    """The one-launch chain (counters zeroed first) as a function."""
    config = {**CONFIG, **config}
    # The MMA partition hands a slot back one step late: a ring must hold two steps.
    if config["XS"] < 2 or config["WS"] < 2 * max(config[f"BN{i}"] for i in range(4)) // 32:
        raise ValueError(f"rings too shallow for two steps: {config}")
    wdescs, xdescs = descriptors(weights, acts)
    inputs, qkv, attn, gate_up = acts

    def run():
        counters.zero_()
        persistent_chain_kernel[(config["G"], )](
            *wdescs, *xdescs, qkv, attn, gate_up, inputs, counters[1:], L=layers, H=HIDDEN,
            QKV_N=QKV_N, I2=GATE_UP_N, DOWN_K=INTER, num_warps=4, maxnreg=MAX_REGISTERS,
            **config)
    return run


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
    acts = [torch.empty(shape, dtype=torch.bfloat16) for shape in activation_shapes(layers)]
    wdescs, xdescs = descriptors(weights, acts)
    names = persistent_chain_kernel.arg_names
    constexprs = dict(L=layers, H=HIDDEN, QKV_N=QKV_N, I2=GATE_UP_N, DOWN_K=INTER,
                      **{"WAIT": True, "ROTATE": 0, "LOAD_X": True, **config})
    signature = {n: mangle_type(d) for n, d in zip(names, wdescs + xdescs)}
    signature.update({n: "*bf16" for n in ("q_ptr", "o_ptr", "g_ptr", "d_ptr")})
    signature.update(counters="*i32", **{n: "constexpr" for n in constexprs})
    aligned = {(names.index(n), ): [["tt.divisibility", 16]]
               for n in ("q_ptr", "o_ptr", "g_ptr", "d_ptr", "counters")}
    source = GluonASTSource(persistent_chain_kernel, signature, constexprs, aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, maxnreg=MAX_REGISTERS))
    ptx = kernel.asm["ptx"]
    return dict(shared=kernel.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                tma_loads=ptx.count("cp.async.bulk.tensor"),
                acquire_loads=ptx.count("ld.global.gpu.acquire"),
                release_adds=ptx.count("atom.global.gpu.release.add"),
                proxy_fences=ptx.count("fence.proxy.async.global"))


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
    fns = {"cuBLAS": cublas(args.layers, weights, acts),
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


if __name__ == "__main__":
    main()
