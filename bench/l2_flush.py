"""What the L2 flush between timed calls costs a decode-attention benchmark.

``triton.testing.do_bench`` (the timing DESIGN.md prescribes) clears the L2 before every call
by writing zeros over a 256 MB buffer, so every call starts with an L2 full of dirty lines.
Reading the K/V stream evicts them, and their write-back shares the DRAM with the reads. This
times each implementation on the canonical grid after that dirty flush and after a clean one
(a read of the same buffer), in one harness (CUDA-graph replays between CUDA events, the two
flushes and all implementations interleaved), so the difference is what the write-back costs:

- ``ours``: ``decode_attention`` as ``decode_config`` launches it;
- ``ours, pipelined``: the same grid with pipelined K/V loads and no cache hint (the layout
  before short splits loaded unpipelined with an evict-first hint);
- ``sdpa``: torch SDPA over the padded cache with a boolean mask, as in ``bench.kernels``.

    python -m bench.l2_flush [--out DIR] [--grid B:L,...] [--reps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, copy_bandwidth_gbps, cuda_graph, write_json
from bench.kernels import (DTYPE, GRID, HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, Shape, live_kv_bytes,
                           make_problem, ours_fn, parse_grid, sdpa_fn)

FLUSH_BYTES = 256 << 20  # do_bench's buffer: five times the H100's 50 MB L2
REPS = 50


def implementations(problem: dict, shape: Shape) -> dict:
    from kernels.decode_attention import decode_config
    from kernels.device import sm_count

    default = decode_config(shape.batch, shape.length, NUM_Q_HEADS, NUM_KV_HEADS, shape.head_dim,
                            DTYPE, sm_count(torch.device("cuda")))
    fns = {"ours": ours_fn(problem, default)}
    if default.evict_first:
        pipelined = dataclasses.replace(default, num_stages=2, evict_first=False)
        fns["ours, pipelined"] = ours_fn(problem, pipelined)
    fns["sdpa"] = sdpa_fn(problem)
    return fns


def time_after_flushes(fns: dict, reps: int) -> dict:
    """Median µs of each fn's graph replay after a dirty and after a clean flush:
    {(name, flush): us}. Round r times every (fn, flush) pair once."""
    buffer = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    flushes = {"dirty": buffer.zero_, "clean": lambda: buffer.sum(dtype=torch.int32)}
    replays = {name: cuda_graph(fn) for name, fn in fns.items()}
    pairs = [(name, flush) for name in replays for flush in flushes]
    events = {pair: [] for pair in pairs}
    for _ in range(reps):
        for name, flush in pairs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flushes[flush]()
            start.record()
            replays[name]()
            end.record()
            events[name, flush].append((start, end))
    torch.cuda.synchronize()
    return {pair: 1e3 * statistics.median(s.elapsed_time(e) for s, e in timed)
            for pair, timed in events.items()}


def run(grid: list[tuple[int, int]], reps: int) -> dict:
    copy_gbps = copy_bandwidth_gbps()
    rows = []
    for batch, length in grid:
        for skewed in (False, True):
            shape = Shape(batch, length, skewed)
            problem = make_problem(shape)
            nbytes = live_kv_bytes(problem["lens"], shape.head_dim)
            times = time_after_flushes(implementations(problem, shape), reps)
            row = {"shape": shape.label, "live_kv_bytes": nbytes, "results": {}}
            for (name, flush), us in times.items():
                pct = 100 * nbytes / (us * 1e-6) / 1e9 / copy_gbps
                row["results"].setdefault(name, {})[flush] = {"us": us, "pct_copy": pct}
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
            del problem
            torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "flush_bytes": FLUSH_BYTES, "reps": reps, "rows": rows}


def format_table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(name for r in rows for name in r["results"]))
    head = "".join(f"{name + ' dirty / clean µs':>34}" for name in names)
    lines = [f"{'shape':<18}{'live MB':>9}{head}"]
    for r in rows:
        cells = ""
        for name in names:
            res = r["results"].get(name)
            cells += (f"{'-':>34}" if res is None else
                      f"{res['dirty']['us']:>13.1f} / {res['clean']['us']:.1f}"
                      f" ({res['dirty']['pct_copy']:.0f} / {res['clean']['pct_copy']:.0f}%)"
                      .rjust(34))
        lines.append(f"{r['shape']:<18}{r['live_kv_bytes'] / 1e6:>9.1f}{cells}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """% of copy bandwidth per shape: each implementation after the dirty flush (solid) and
    after the clean one (hatched)."""
    from bench.plots import _pyplot, _save

    plt = _pyplot()
    names = list(dict.fromkeys(name for r in rows for name in r["results"]))
    width = 0.8 / (2 * len(names))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 4.5))
    for i, name in enumerate(names):
        for j, flush in enumerate(("dirty", "clean")):
            values = [r["results"].get(name, {}).get(flush, {}).get("pct_copy", 0.0) for r in rows]
            offset = (2 * i + j - len(names) + 0.5) * width
            ax.bar([x + offset for x in range(len(rows))], values, width, color=f"C{i}",
                   hatch="//" if flush == "clean" else None, alpha=0.6 if flush == "clean" else 1,
                   label=f"{name}, {flush} L2")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["shape"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("% of measured copy bandwidth (live KV)")
    ax.set_title(f"Decode attention after a dirty vs a clean L2 flush, bf16, D={HEAD_DIM}")
    ax.axhline(100, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    _save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parser.add_argument("--grid", type=parse_grid, default=None,
                        help="decode shapes as B:L,B:L,... (default: the canonical grid)")
    parser.add_argument("--reps", type=int, default=REPS, help="timed calls per (fn, flush)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.l2_flush needs a CUDA GPU")
    payload = run(args.grid or GRID, args.reps)
    write_json(args.out / "l2_flush.json", payload)
    plot(payload["rows"], args.out / "l2_flush.png")
    print(format_table(payload["rows"]))
    print(f"\nwrote {args.out / 'l2_flush.json'} and {args.out / 'l2_flush.png'}")


if __name__ == "__main__":
    main()
