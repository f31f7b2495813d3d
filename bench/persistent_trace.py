"""Where the one-launch chain (``bench.persistent_chain``) loses time at its product boundaries:
the kernel's own timeline, recorded by every program (``TRACE=True``) and summed up per product.

For each product boundary (p -> p + 1), from the trace of one replay after an L2 flush:

- release skew: the last program's release of p after the median program's;
- notify: the median activation loader's sight of p's counter complete after that last release;
- first tile: the median program's first activation tile of p + 1 in shared memory after it;
- handover: the sum, the last release of p to the median first tile of p + 1.

And per product, over the programs that have tiles in it (medians): the MMA window (first
activation tile to last MMA), then the output tile's stores, the async-proxy fence and the
release increment that follow it; the MMA warps' waits for weight slots and for activation
slots, and the weight loader's wait for a free slot (its ring full), in µs.
The instrumented kernel is timed beside the plain one, so its overhead is in the same file.
Writes ``persistent_trace.json`` and ``persistent_trace.png`` (one layer's timeline).

    python -m bench.persistent_trace [--variants x6w16,...] [--layers 16] [--replays 5]
                                     [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

PRODUCT_NAMES = ("qkv", "output", "gate/up", "down")
# Field indices of bench.persistent_chain's trace (TRACE_*), as plain ints.
START, FIRST_X, DONE, RELEASED, W_WAIT, X_WAIT, SEEN, W_FULL, CLOCK, STORED, FENCED = range(11)


def summarise(trace: np.ndarray) -> dict:
    """Per boundary and per product statistics of one replay's trace, int64 [G, L, 4, fields]
    (global ns and cycles as the kernel wrote them; 0 where a program had no tile)."""
    g, layers, _, _ = trace.shape
    t = trace.reshape(g, layers * 4, -1).astype(np.float64)
    origin = t[:, 0, START].min()
    active = t[:, :, FIRST_X] > 0  # programs with tiles in a product
    # Cycles per ns of each program's SM, from its cycle counter and the global timer.
    span_ns = t[:, -1, START] - t[:, 0, START]
    ghz = (t[:, -1, CLOCK] - t[:, 0, CLOCK]) / span_ns
    boundaries = []
    for p in range(layers * 4 - 1):
        last_release = t[:, p, RELEASED].max()
        nxt = active[:, p + 1]
        seen = t[:, p + 1, SEEN]
        boundaries.append(dict(
            product=PRODUCT_NAMES[p % 4], next=PRODUCT_NAMES[(p + 1) % 4],
            release_skew_us=(last_release - np.median(t[:, p, RELEASED])) / 1e3,
            notify_us=(np.median(seen) - last_release) / 1e3 if seen.min() > 0 else None,
            first_tile_us=(np.median(t[nxt, p + 1, FIRST_X]) - np.median(seen)) / 1e3
            if seen.min() > 0 else None,
            handover_us=(np.median(t[nxt, p + 1, FIRST_X]) - last_release) / 1e3))
    products = []
    for p in range(layers * 4):
        a = active[:, p]
        us = t[:, p, :] / ghz[:, None] / 1e3  # the cycle fields in µs
        products.append(dict(
            product=PRODUCT_NAMES[p % 4], programs=int(a.sum()),
            start_us=(t[a, p, FIRST_X].min() - origin) / 1e3,
            end_us=(t[:, p, RELEASED].max() - origin) / 1e3,
            mma_us=float(np.median(t[a, p, DONE] - t[a, p, FIRST_X]) / 1e3),
            store_us=float(np.median(t[a, p, STORED] - t[a, p, DONE]) / 1e3),
            fence_us=float(np.median(t[a, p, FENCED] - t[a, p, STORED]) / 1e3),
            release_us=float(np.median(t[a, p, RELEASED] - t[a, p, FENCED]) / 1e3),
            mma_wait_weights_us=float(np.median(us[a, W_WAIT])),
            mma_wait_activations_us=float(np.median(us[a, X_WAIT])),
            loader_ring_full_us=float(np.median(us[a, W_FULL]))))
    return dict(kernel_us=(t[:, :, RELEASED].max() - origin) / 1e3,
                sm_clock_ghz=float(np.median(ghz)), boundaries=boundaries, products=products)


def by_product(summaries: list[dict]) -> dict:
    """Means over layers and replays, per product (boundaries keyed by the product before)."""
    out = {}
    for name in PRODUCT_NAMES:
        rows = [b for s in summaries for b in s["boundaries"] if b["product"] == name]
        prods = [p for s in summaries for p in s["products"] if p["product"] == name]
        entry = {k: statistics.fmean(r[k] for r in rows) for k in
                 ("release_skew_us", "notify_us", "first_tile_us", "handover_us")
                 if rows and all(r[k] is not None for r in rows)}
        entry.update({k: statistics.fmean(p[k] for p in prods) for k in
                      ("mma_us", "store_us", "fence_us", "release_us", "mma_wait_weights_us",
                       "mma_wait_activations_us", "loader_ring_full_us")})
        out[name] = entry
    return out


def plot_layer(trace: np.ndarray, layer: int, path: Path) -> None:
    """One layer's timeline: a row per program, a bar per product from its first activation tile
    to its last MMA, a dot where it released the product's counter."""
    from bench.plots import _pyplot, _save

    plt = _pyplot()
    g = trace.shape[0]
    t = trace.astype(np.float64)
    origin = t[:, layer, 0, FIRST_X][t[:, layer, 0, FIRST_X] > 0].min()
    fig, ax = plt.subplots(figsize=(10, 6))
    for p, name in enumerate(PRODUCT_NAMES):
        rows = np.nonzero(t[:, layer, p, FIRST_X] > 0)[0]
        x0 = (t[rows, layer, p, FIRST_X] - origin) / 1e3
        x1 = (t[rows, layer, p, DONE] - origin) / 1e3
        ax.barh(rows, x1 - x0, left=x0, height=0.8, color=f"C{p}", label=name)
        ax.plot((t[:, layer, p, RELEASED] - origin) / 1e3, np.arange(g), ".", ms=2,
                color="k")
    ax.set(xlabel="µs from the layer's first activation tile", ylabel="program",
           title=f"layer {layer}: first activation tile to last MMA per product "
                 "(dots: counter released)")
    ax.legend(loc="upper right", fontsize=7)
    _save(fig, path)


def main() -> None:
    import torch

    from bench.common import RESULTS_DIR, time_ms, write_json
    from bench.persistent_chain import VARIANTS, build, persistent, trace_shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--variants", default="x6w16,x6w16 no-x-loads")
    parser.add_argument("--replays", type=int, default=5)
    args = parser.parse_args()
    weights, acts, counters = build(args.layers)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    names = args.variants.split(",")
    results = {}
    for name in names:
        config = {**VARIANTS[name], "TRACE": True}
        trace = torch.zeros(trace_shape(args.layers, config), dtype=torch.int64, device="cuda")
        plain = persistent(args.layers, VARIANTS[name], weights, acts, counters)
        traced = persistent(args.layers, config, weights, acts, counters, trace)
        summaries = []
        for _ in range(args.replays + 1):  # the first compiles and warms
            trace.zero_()
            flush.zero_()
            traced()
            torch.cuda.synchronize()
            summaries.append(summarise(trace.cpu().numpy()))
        summaries = summaries[1:]
        if name == names[0]:
            last_trace = trace.cpu().numpy()
        results[name] = dict(
            plain_us=time_ms(plain) * 1e3, traced_us=time_ms(traced) * 1e3,
            kernel_us=[s["kernel_us"] for s in summaries],
            sm_clock_ghz=summaries[0]["sm_clock_ghz"], by_product=by_product(summaries),
            replays=summaries)
        r = results[name]
        print(f"{name}: plain {r['plain_us']:.1f} us, traced {r['traced_us']:.1f} us, "
              f"trace span {statistics.median(r['kernel_us']):.1f} us", flush=True)
        for product, entry in r["by_product"].items():
            print(f"  {product:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in entry.items()),
                  flush=True)
    write_json(args.out / "persistent_trace.json",
               dict(layers=args.layers, variants=results))
    plot_layer(last_trace, args.layers // 2, args.out / "persistent_trace.png")


if __name__ == "__main__":
    main()
