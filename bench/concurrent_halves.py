"""A design study: a decode step of B rows as two concurrent half-steps of B / 2 rows.

Every kernel of a decode step pays a fixed cost at its start and end (launch, pipeline fill,
drain; bench/RESULTS.md puts it at ~3.2 µs per product launch), during which the memory system
is not streaming. Two independent half-batches, captured on two streams of one CUDA graph, can
fill each other's gaps, and as both halves stream the same weights at about the same time, the
second reader may find them in the L2. This times, for the engine's own model and kernels
(``CausalLM.decode`` with the Triton backend, bf16, random K/V over ``--context`` live
positions of a 1024-slot slab):

- ``one batch``: the step over all B rows (what the engine runs);
- ``halves, one stream``: the two half-steps one after the other;
- ``halves, two streams``: the two half-steps on two streams of one graph.

Each is one CUDA graph, replayed back to back (no L2 flush between steps, as in the engine),
interleaved over rounds; the step's roofline is ``bench.roofline``'s at full B. The logits of
the halves are compared with the full step's (relative L2): the two streams share the split-K
counters and the cuBLASLt workspace, so a race between them would show there.

    python -m bench.concurrent_halves [--models dummy:llama-3.2-1b] [--batch-sizes 64,128,256]
                                      [--context 640] [--rounds 5] [--out DIR]
    python -m bench.concurrent_halves --replot bench/results/concurrent_halves.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.common import (RESULTS_DIR, copy_bandwidth_gbps, matmul_tflops, replotted,
                          write_json)

CAPACITY = 1024
REPLAYS = 20


def _graph(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured as the engine captures a step: under its cuBLAS choice, after two
    warm-up calls (where each product shape's algorithm is picked)."""
    from engine.blas import decode_blas

    with decode_blas(torch.device("cuda")):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph


def _step_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPLAYS


def run_one(model, batch: int, context: int, rounds: int) -> dict:
    from engine.kv_cache import KVArena, KVSlab

    c = model.config
    arena = KVArena(c.num_layers, c.num_kv_heads, c.head_dim, batch * CAPACITY, torch.bfloat16,
                    "cuda")
    arena.k.normal_()
    arena.v.normal_()
    slab = arena.slab(batch, CAPACITY)
    rows = (slice(0, batch // 2), slice(batch // 2, batch))
    halves = [KVSlab(k=[k[r] for k in slab.k], v=[v[r] for v in slab.v]) for r in rows]
    ids = torch.randint(0, c.vocab_size, (batch,), device="cuda")
    # Every step writes slot context - 1 and attends over 0 .. context - 1.
    positions = torch.full((batch,), context - 1, dtype=torch.int32, device="cuda")
    outputs = {}

    def one_batch():
        outputs["one batch"] = model.decode(ids, positions, slab)

    def halves_one_stream():
        outputs["halves, one stream"] = torch.cat(
            [model.decode(ids[r], positions[r], kv) for r, kv in zip(rows, halves)])

    side = torch.cuda.Stream()

    def halves_two_streams():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        first = model.decode(ids[rows[0]], positions[rows[0]], halves[0])
        with torch.cuda.stream(side):
            second = model.decode(ids[rows[1]], positions[rows[1]], halves[1])
        main.wait_stream(side)
        outputs["halves, two streams"] = torch.cat([first, second])

    graphs = {name: _graph(fn) for name, fn in
              (("one batch", one_batch), ("halves, one stream", halves_one_stream),
               ("halves, two streams", halves_two_streams))}
    for graph in graphs.values():
        graph.replay()
    torch.cuda.synchronize()
    reference = outputs["one batch"].float()
    rel_err = {name: ((out.float() - reference).norm() / reference.norm()).item()
               for name, out in outputs.items()}
    samples = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            samples[name].append(_step_ms(graph))
    del arena, slab, halves, graphs, outputs
    torch.cuda.empty_cache()
    return {"B": batch, "context": context,
            "step_ms": {name: statistics.median(s) for name, s in samples.items()},
            "samples_ms": samples, "logits_rel_err_vs_one_batch": rel_err}


def plot(payload: dict, path: Path) -> None:
    """Roofline / step time of each variant, per model and batch size (bars)."""
    from bench.plots import grouped_bars

    rows = payload["rows"]
    grouped_bars(rows, list(rows[0]["step_ms"]),
                 lambda row, name: 100 * row["roofline_ms"] / row["step_ms"][name],
                 "roofline / step time (%)", "A decode step as two concurrent half-steps", path)


def main(argv=None) -> None:
    from bench.roofline import decode_step_costs
    from engine.model import load_model
    from kernels.gemm import SWAP_AB_ROWS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="dummy:llama-3.2-1b")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--context", type=int, default=640, help="live positions per row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="concurrent_halves", help="stem of the JSON file")
    parser.add_argument("--replot", type=Path, help="draw the PNG of a saved JSON and exit")
    args = parser.parse_args(argv)
    if replotted(args, plot):
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    # Halves of up to SWAP_AB_ROWS rows split K through device-wide arrival counters, which
    # two streams must not use at once.
    if (any(b % 2 or b // 2 <= SWAP_AB_ROWS for b in batch_sizes)
            or not 1 <= args.context <= CAPACITY):
        parser.error(f"batch sizes must be even with halves of more than {SWAP_AB_ROWS} rows, "
                     f"context in [1, {CAPACITY}]")

    copy_gbps, tflops = copy_bandwidth_gbps(), matmul_tflops()
    rows = []
    for model_name in args.models.split(","):
        model = load_model(model_name, torch.bfloat16, "cuda", backend="triton")
        for batch in batch_sizes:
            row = run_one(model, batch, args.context, args.rounds)
            costs = decode_step_costs(model.config, batch, [args.context] * batch)
            roof_ms = sum(c.seconds(copy_gbps * 1e9, tflops * 1e12) for c in costs) * 1e3
            row.update(model=model_name, roofline_ms=roof_ms)
            rows.append(row)
            cells = "  ".join(f"{name}: {ms:.3f} ms ({100 * roof_ms / ms:.1f}%)"
                              for name, ms in row["step_ms"].items())
            errs = ", ".join(f"{e:.1e}" for e in row["logits_rel_err_vs_one_batch"].values())
            print(f"{model_name} B={batch}: roofline {roof_ms:.3f} ms  {cells}  (logits err {errs})")
        del model
        torch.cuda.empty_cache()
    payload = {"copy_gbps": copy_gbps, "matmul_tflops": tflops, "capacity": CAPACITY,
               "rows": rows}
    path = write_json(args.out / f"{args.name}.json", payload)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
