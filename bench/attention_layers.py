"""Decode attention as the decode step runs it: one call per layer, the layers back to back in
one CUDA graph (no L2 flush between them), at the engine's slab shapes, for ``decode_config``'s
choice and alternatives side by side.

Shapes: the heads and layer counts of Llama-3.2-1B (H_q 32, H_kv 8, D 64, 16 layers) and
Llama-3.1-8B (D 128, 32 layers); B in {16, 32, 64, 128, 256} over a 1024-position slab with 531
live positions per row (prompt 512 plus the bench's mean generated length so far), and B = 64
skewed (lengths uniform in [66, 531]). Reported per call: the graph's median time over the
layer count, and the live K/V bytes' share of the copy bandwidth.

    python -m bench.attention_layers [--out DIR] [--head-dims 64,128] [--batch-sizes 1,2,8]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, copy_bandwidth_gbps, time_ms, write_json

H_Q, H_KV, CAPACITY, LIVE = 32, 8, 1024, 531
LAYERS = {64: 16, 128: 32}  # head dim -> layers of the model with those heads
SHAPES = [(16, False), (32, False), (64, False), (64, True), (128, False), (256, False)]


def candidates(default) -> dict:
    """decode_config's choice and the tile / pipeline alternatives around it."""
    from kernels.decode_attention import MAX_SPLITS

    replace = dataclasses.replace
    piped = dict(num_stages=3, evict_first=False)

    def more(factor: int) -> int:  # splits: the default's times factor, at most MAX_SPLITS
        return min(MAX_SPLITS, factor * default.num_splits)

    return {"default": default,
            "128-pos, 2 warps, 2 stages": replace(default, block_n=128, num_warps=2,
                                                  num_stages=2, evict_first=False),
            "128-pos, 4 warps, 2 stages": replace(default, block_n=128, num_warps=4,
                                                  num_stages=2, evict_first=False),
            "64-pos, 2 warps, 2 stages": replace(default, block_n=64, num_warps=2, num_stages=2,
                                                 evict_first=False),
            "64-pos, 2 warps, 3 stages": replace(default, block_n=64, num_warps=2, **piped),
            "32-pos, 1 warp, 3 stages": replace(default, block_n=32, num_warps=1, **piped),
            "32-pos, 2 warps, 3 stages": replace(default, block_n=32, num_warps=2, **piped),
            "two splits": replace(default, num_splits=2, merge_pdl=True),
            "splits x2": replace(default, num_splits=more(2), merge_pdl=True),
            "splits x4": replace(default, num_splits=more(4), merge_pdl=True),
            "splits x4, unpipelined": replace(default, num_splits=more(4), merge_pdl=True,
                                              num_stages=1, evict_first=True)}


def run(head_dims=(64, 128), shapes=SHAPES) -> dict:
    from kernels.decode_attention import decode_attention, decode_config
    from kernels.device import sm_count

    copy_gbps = copy_bandwidth_gbps()
    rows = []
    gen = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    for head_dim in head_dims:
        for batch, skewed in shapes:
            q = torch.randn(batch, H_Q, head_dim, dtype=bf16, device="cuda")
            caches = [(torch.randn(batch, CAPACITY, H_KV, head_dim, dtype=bf16, device="cuda"),
                       torch.randn(batch, CAPACITY, H_KV, head_dim, dtype=bf16, device="cuda"))
                      for _ in range(LAYERS[head_dim])]
            lens = (torch.randint(LIVE // 8, LIVE + 1, (batch,), generator=gen) if skewed
                    else torch.full((batch,), LIVE)).to(torch.int32).cuda()
            out = torch.empty_like(q)
            live_bytes = int(lens.sum()) * H_KV * head_dim * 2 * 2
            default = decode_config(batch, CAPACITY, H_Q, H_KV, head_dim, bf16,
                                    sm_count(q.device))
            row = {"head_dim": head_dim, "layers": LAYERS[head_dim], "B": batch,
                   "skewed": skewed, "capacity": CAPACITY, "live_mb": live_bytes / 1e6,
                   "configs": {}}
            for name, config in candidates(default).items():
                def layers(config=config):
                    for k, v in caches:
                        decode_attention(q, k, v, lens, out=out, config=config)
                try:
                    layers()
                    us = time_ms(layers) * 1e3 / LAYERS[head_dim]
                except Exception as exc:  # e.g. out of shared memory or registers
                    row["configs"][name] = {"config": dataclasses.asdict(config),
                                            "error": f"{type(exc).__name__}: {exc}"[:300]}
                    continue
                row["configs"][name] = {"config": dataclasses.asdict(config), "us": us,
                                        "pct_copy": 100 * live_bytes / (us * 1e-6) / 1e9
                                        / copy_gbps}
            print(f"D={head_dim:3d} B={batch:3d} {'skewed ' if skewed else 'uniform'} "
                  + "  ".join(f"{n}: {r['us']:.1f} us ({r['pct_copy']:.0f}%)"
                              for n, r in row["configs"].items() if "us" in r), flush=True)
            rows.append(row)
            del caches
            torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--head-dims", default="64,128",
                        help="comma-separated head dims: 64 (Llama-3.2-1B), 128 (Llama-3.1-8B)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated B, uniform lengths only (default: "
                             + ", ".join(f"{b}{' skewed' if s else ''}" for b, s in SHAPES) + ")")
    parser.add_argument("--name", default="attention_layers", help="stem of the JSON file")
    args = parser.parse_args()
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    unknown = set(head_dims) - set(LAYERS)
    if unknown:
        parser.error(f"--head-dims takes {sorted(LAYERS)}, got {sorted(unknown)}")
    shapes = SHAPES
    if args.batch_sizes:
        shapes = [(int(b), False) for b in args.batch_sizes.split(",")]
        if any(b < 1 for b, _ in shapes):
            parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    write_json(args.out / f"{args.name}.json", run(head_dims, shapes))


if __name__ == "__main__":
    main()
