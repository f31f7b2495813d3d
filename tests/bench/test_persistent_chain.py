"""The persistent-chain design study (``bench.persistent_chain``): it compiles for the H100 on
the CPU, and on a GPU every product it writes matches torch."""

import json
import os
import subprocess
import sys

import pytest
import torch

H100_SHARED_BYTES = 232448  # the most shared memory one program may take on sm_90


def test_compiles_for_h100_within_shared_memory():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = ("import json; from bench.persistent_chain import compile_for_h100; "
            "print(json.dumps(compile_for_h100()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert 200 * 1024 < report["shared"] <= H100_SHARED_BYTES
    # Four products, each a 32-feature or a 4 x 32-feature wgmma path; loads through TMA;
    # the counters' acquire spins and release increments, fenced against the async proxy.
    assert report["wgmma"] >= 4 and report["tma_loads"] >= 8
    assert report["acquire_loads"] >= 4 and report["release_adds"] == 4
    assert report["proxy_fences"] >= 8


def test_plot_marks_the_probes(tmp_path):
    from bench.persistent_chain import VARIANTS, is_probe, plot

    assert is_probe(VARIANTS["x6w16 weights-only"]) and is_probe(VARIANTS["x6w16 no-waits"])
    assert not is_probe(VARIANTS["x6w16 chunk-waits"]) and not is_probe(VARIANTS["x6w16"])

    rows = [dict(name=name, round=r, us=us + r, worst_rel_err=err)
            for r in range(2) for name, us, err in (("cuBLAS", 960.0, 1.7e-3),
                                                     ("persistent x6w16", 850.0, 1.7e-3),
                                                     ("persistent x6w16 weights-only", 735.0, 1.0))]
    plot(rows, 644.7, 16, {"persistent x6w16 weights-only"}, tmp_path / "chain.png")
    assert (tmp_path / "chain.png").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{}, {"SPLIT": 2}, {"TILED": True}, {"WAIT": 2}],
                         ids=["whole-K", "split-K", "tiled-weights", "chunk-waits"])
def test_every_product_matches_torch(config):
    from bench.persistent_chain import (CHUNKS, CONFIG, GATE_UP_N, HIDDEN, QKV_N, build,
                                        persistent, split_counters, worst_error)

    layers = 2
    weights, acts, counters = build(layers)
    for a in acts[1:]:
        a.fill_(float("nan"))  # every output element must be written
    acts[0][64:].fill_(float("nan"))
    persistent(layers, config, weights, acts, counters)()
    torch.cuda.synchronize()
    assert not any(a.isnan().any().item() for a in acts)
    products, tiles, chunks = split_counters(counters, layers)
    assert counters[0].item() == 0  # the spare layer 0's input waits on
    assert products.tolist() == [CONFIG["G"]] * (4 * layers)
    # With split K every output and down tile was summed once, after both its pieces.
    assert tiles.tolist() == [config.get("SPLIT", 0)] * (2 * layers * HIDDEN // 32)
    # With chunk waits every BK columns of every output were announced by all their tiles.
    chunks = chunks.view(layers, 4, CHUNKS).cpu()
    for product, (n, tile) in enumerate(zip((QKV_N, HIDDEN, GATE_UP_N, HIDDEN),
                                            (CONFIG[f"BN{i}"] for i in range(4)))):
        expected = torch.zeros(CHUNKS.value, dtype=torch.int32)
        if config.get("WAIT") == 2:
            expected[:n // 128] = 128 // tile
        assert all(torch.equal(chunks[l, product], expected) for l in range(layers))
    assert worst_error(layers, weights, acts) < 1e-2


@pytest.mark.gpu
def test_traced_chain_records_an_ordered_timeline():
    from bench.persistent_chain import CONFIG, build, persistent, trace_shape, worst_error
    from bench.persistent_trace import DONE, FIRST_X, RELEASED, SEEN, START

    layers = 2
    weights, acts, counters = build(layers)
    for a in acts[1:]:
        a.fill_(float("nan"))
    acts[0][64:].fill_(float("nan"))
    trace = torch.full(trace_shape(layers, {}), -1, dtype=torch.int64, device="cuda")
    persistent(layers, {"TRACE": True}, weights, acts, counters, trace)()
    torch.cuda.synchronize()
    assert worst_error(layers, weights, acts) < 1e-2  # the trace does not change the products
    t = trace.view(CONFIG["G"], 4 * layers, -1).cpu()
    active = t[:, :, FIRST_X] != -1
    # Programs with tiles: QKV on 96, output and down on 64, gate/up on all 128.
    assert active.sum(0).tolist() == [96, 64, 128, 64] * layers
    assert (t[:, :, START] > 0).all() and (t[:, :, RELEASED] > 0).all()
    assert (t[:, 1:, SEEN] > 0).all()
    a = active
    assert (t[:, :, START][a] <= t[:, :, FIRST_X][a]).all()
    assert (t[:, :, FIRST_X][a] <= t[:, :, DONE][a]).all()
    assert (t[:, :, DONE][a] <= t[:, :, RELEASED][a]).all()
    # A product's first activation tile comes after every program's last MMA of the previous
    # one (which precedes its release, which precedes the counter being seen complete).
    last_done = torch.where(a, t[:, :, DONE], 0).max(0).values
    first_tile = torch.where(a, t[:, :, FIRST_X], torch.iinfo(torch.int64).max).min(0).values
    assert (first_tile[1:] > last_done[:-1]).all()
