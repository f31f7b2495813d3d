"""Decode attention as the decode step runs it: one call per layer, the layers back to back in
one CUDA graph (no L2 flush between them), at the engine's slab shapes, for ``decode_config``'s
choice and alternatives side by side.

Shapes: Llama-3.2-1B heads (H_q 32, H_kv 8, D 64) and 16 layers; B in {64, 128, 256} over a
1024-position slab with 531 live positions per row (prompt 512 plus the bench's mean generated
length so far), and B = 64 skewed (lengths uniform in [66, 531]). Reported per call: the graph's
median time over the layer count, and the live K/V bytes' share of the copy bandwidth.

    python -m bench.attention_layers [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, copy_bandwidth_gbps, time_ms, write_json

H_Q, H_KV, HEAD_DIM, LAYERS, CAPACITY, LIVE = 32, 8, 64, 16, 1024, 531
SHAPES = [(64, False), (64, True), (128, False), (256, False)]


def candidates(default) -> dict:
    from kernels.decode_attention import DecodeConfig

    replace = dataclasses.replace
    return {"default": default,
            "128x64 tiles, 2 warps": DecodeConfig(128, default.num_splits, 2, 2),
            "64x64 tiles, 3 stages": DecodeConfig(64, default.num_splits, 2, 3),
            "32x64 tiles, 2 warps": DecodeConfig(32, default.num_splits, 2, 3),
            "two splits": replace(default, num_splits=2, merge_pdl=True)}


def run() -> dict:
    from kernels.decode_attention import decode_attention, decode_config
    from kernels.device import sm_count

    copy_gbps = copy_bandwidth_gbps()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch, skewed in SHAPES:
        bf16 = torch.bfloat16
        q = torch.randn(batch, H_Q, HEAD_DIM, dtype=bf16, device="cuda")
        caches = [(torch.randn(batch, CAPACITY, H_KV, HEAD_DIM, dtype=bf16, device="cuda"),
                   torch.randn(batch, CAPACITY, H_KV, HEAD_DIM, dtype=bf16, device="cuda"))
                  for _ in range(LAYERS)]
        lens = (torch.randint(LIVE // 8, LIVE + 1, (batch,), generator=gen) if skewed
                else torch.full((batch,), LIVE)).to(torch.int32).cuda()
        out = torch.empty_like(q)
        live_bytes = int(lens.sum()) * H_KV * HEAD_DIM * 2 * 2
        default = decode_config(batch, CAPACITY, H_Q, H_KV, HEAD_DIM, bf16, sm_count(q.device))
        row = {"B": batch, "skewed": skewed, "capacity": CAPACITY, "live_mb": live_bytes / 1e6,
               "configs": {}}
        for name, config in candidates(default).items():
            def layers(config=config):
                for k, v in caches:
                    decode_attention(q, k, v, lens, out=out, config=config)
            layers()
            us = time_ms(layers) * 1e3 / LAYERS
            row["configs"][name] = {"config": dataclasses.asdict(config), "us": us,
                                    "pct_copy": 100 * live_bytes / (us * 1e-6) / 1e9 / copy_gbps}
        print(f"B={batch:3d} {'skewed ' if skewed else 'uniform'} " + "  ".join(
            f"{n}: {r['us']:.1f} us ({r['pct_copy']:.0f}%)" for n, r in row["configs"].items()),
            flush=True)
        rows.append(row)
        del caches
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    write_json(args.out / "attention_layers.json", run())


if __name__ == "__main__":
    main()
