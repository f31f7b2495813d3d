"""Microbenchmark of the fused decode projections (``kernels.linear``) at decode batch sizes.

For each projection of the Llama-3.2-1B and Llama-3.1-8B shapes and M in {1, 2, 4, 8} rows,
the same run times, as CUDA-graph replays with the L2 flushed:

- ours: the fused op (one GEMV Triton kernel: norm / SiLU-and-mul, product, residual add), also
  above ``GEMV_MAX_ROWS`` to show where the switch belongs;
- unfused: the same op from our norm / activation kernel and cuBLAS (``addmm_`` accumulating
  into the residual), which is what runs above ``GEMV_MAX_ROWS`` rows;
- cublas: ``F.linear`` alone, the bare product without its neighbours.

Bytes are the weight plus the activations read and written; "% copy" is ours against the
measured copy bandwidth.

    python -m bench.kernel_linear [--sweep] [--out DIR]   # on a GPU; a table and kernel_linear.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS_DIR, copy_bandwidth_gbps, time_ms, write_json
from kernels import linear
from kernels.activation import silu_and_mul
from kernels.rmsnorm import rmsnorm

DTYPE = torch.bfloat16
ROWS = (1, 2, 4, 8)
# (model, projection, N, K, op); op is what the decoder layer calls for that projection.
PROJECTIONS = [
    ("1b", "qkv", 3072, 2048, "norm_linear"),
    ("1b", "o", 2048, 2048, "linear_residual"),
    ("1b", "gate_up", 16384, 2048, "norm_linear"),
    ("1b", "down", 2048, 8192, "gated_linear_residual"),
    ("8b", "qkv", 6144, 4096, "norm_linear"),
    ("8b", "o", 4096, 4096, "linear_residual"),
    ("8b", "gate_up", 28672, 4096, "norm_linear"),
    ("8b", "down", 4096, 14336, "gated_linear_residual"),
]


def _problem(m: int, n: int, k: int, op: str) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    width = 2 * k if op == "gated_linear_residual" else k
    return {
        "x": torch.randn(m, width, dtype=DTYPE, device="cuda", generator=g),
        "w": torch.randn(n, k, dtype=DTYPE, device="cuda", generator=g) * k ** -0.5,
        "norm_w": torch.randn(k, dtype=DTYPE, device="cuda", generator=g),
        "residual": torch.randn(m, n, dtype=DTYPE, device="cuda", generator=g),
    }


def _fns(p: dict, op: str, config=None) -> dict:
    x, w, norm_w, residual = p["x"], p["w"], p["norm_w"], p["residual"]
    if op == "norm_linear":
        out = torch.empty(x.shape[0], w.shape[0], dtype=DTYPE, device="cuda")
        return {
            "ours": lambda: linear._gemv(x, w, out, linear.NORM, norm_weight=norm_w, eps=1e-5,
                                           config=config),
            "unfused": lambda: F.linear(rmsnorm(x, norm_w, 1e-5), w),
            "cublas": lambda: F.linear(x, w),
        }
    prologue = linear.GATED if op == "gated_linear_residual" else linear.PLAIN
    # The bare product's operand, computed once outside the timing.
    activated = silu_and_mul(x) if prologue == linear.GATED else x
    return {
        "ours": lambda: linear._gemv(x, w, residual, prologue, residual=residual,
                                       config=config),
        "unfused": lambda: residual.addmm_(
            silu_and_mul(x) if prologue == linear.GATED else x, w.t()),
        "cublas": lambda: F.linear(activated, w),
    }


def _bytes(p: dict, op: str) -> int:
    m, n = p["residual"].shape
    reads = p["w"].numel() + p["x"].numel() + (p["residual"].numel() if "residual" in op else 0)
    return (reads + m * n) * DTYPE.itemsize


def run(copy_gbps: float) -> list[dict]:
    """One row per (projection, M)."""
    rows = []
    for model, name, n, k, op in PROJECTIONS:
        for m in ROWS:
            p = _problem(m, n, k, op)
            times = {label: time_ms(fn) * 1e3 for label, fn in _fns(p, op).items()}
            nbytes = _bytes(p, op)
            gbps = nbytes / (times["ours"] * 1e-6) / 1e9
            rows.append({"kernel": f"linear {op}", "shape": f"{model} {name} M={m} N={n} K={k}",
                         "ours_us": times["ours"], "torch_us": times["unfused"],
                         "cublas_us": times["cublas"], "speedup": times["unfused"] / times["ours"],
                         "roofline_us": nbytes / (copy_gbps * 1e9) * 1e6,
                         "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
                         "config": dataclasses.asdict(linear.gemv_config(n, k, DTYPE))})
            del p
    return rows


def sweep(copy_gbps: float) -> list[dict]:
    """Alternative launch shapes of the GEMV kernel around ``gemv_config``, at M = 1."""
    rows = []
    for model, name, n, k, op in PROJECTIONS:
        default = linear.gemv_config(n, k, DTYPE)
        candidates = [default] + [
            dataclasses.replace(default, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((4, 1024, 4, 1), (16, 1024, 4, 1), (8, 512, 4, 1),
                                 (8, 2048, 4, 1), (4, 2048, 4, 1), (8, 2048, 8, 1),
                                 (8, 1024, 8, 1), (8, 1024, 2, 1), (8, 1024, 4, 2))]
        p = _problem(1, n, k, op)
        seen = []
        for config in candidates:
            if config in seen:
                continue
            seen.append(config)
            us = time_ms(_fns(p, op, config)["ours"]) * 1e3
            rows.append({"shape": f"{model} {name} M=1 N={n} K={k}",
                         "config": dataclasses.asdict(config), "is_default": config == default,
                         "us": us, "pct_copy": 100 * _bytes(p, op) / (us * 1e-6) / 1e9 / copy_gbps})
        del p
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch shapes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = parser.parse_args()
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'shape':<34}{'ours us':>9}{'unfused':>9}{'cublas':>9}{'roof us':>9}{'% copy':>8}")
    rows = run(copy_gbps)
    for r in rows:
        print(f"{r['shape']:<34}{r['ours_us']:>9.1f}{r['torch_us']:>9.1f}{r['cublas_us']:>9.1f}"
              f"{r['roofline_us']:>9.1f}{r['pct_copy']:>7.1f}%")
    sweep_rows = sweep(copy_gbps) if args.sweep else []
    if sweep_rows:
        for r in sweep_rows:
            c = r["config"]
            print(f"{r['shape']:<34} n{c['block_n']:<3} k{c['block_k']:<4} w{c['num_warps']} "
                  f"s{c['num_stages']}  {r['us']:>7.1f} us {r['pct_copy']:>6.1f}%"
                  f"{'  <- default' if r['is_default'] else ''}")
    path = write_json(args.out / "kernel_linear.json",
                      {"copy_gbps": copy_gbps, "rows": rows, "sweep": sweep_rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
