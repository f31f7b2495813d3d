"""Microbenchmarks of the small decode-step kernels against their eager torch references.

Each row times our Triton kernel and the plain-torch twin from ``kernels.reference`` on the same
inputs in the same run (bf16 activations, fp32 logits), and reports the bytes the operation must
move, the kernel's GB/s and its share of the measured copy bandwidth.

    python -m bench.kernel_ops          # on a GPU; prints a table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import copy_bandwidth_gbps, time_ms
from kernels import reference
from kernels.activation import silu_and_mul
from kernels.argmax import argmax
from kernels.rmsnorm import fused_add_rmsnorm
from kernels.rope_kv_write import rope_kv_write
from kernels.rope_table import rope_cos_sin

DTYPE = torch.bfloat16
LLAMA_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, hidden=4096, intermediate=14336,
                vocab=128256)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DECODE_BATCHES = (1, 64, 256)
CACHE_CAPACITY = 2048


def _row(kernel: str, shape: str, ours_ms: float, torch_ms: float, nbytes: int,
         copy_gbps: float) -> dict:
    gbps = nbytes / (ours_ms * 1e-3) / 1e9
    return {"kernel": kernel, "shape": shape, "ours_us": ours_ms * 1e3, "torch_us": torch_ms * 1e3,
            "speedup": torch_ms / ours_ms, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps}


def bench_rope_kv_write(batch: int, copy_gbps: float) -> dict:
    """Decode step: one new token per row, q/k/v as views of the fused QKV projection."""
    hq, hkv, d = LLAMA_8B["num_q_heads"], LLAMA_8B["num_kv_heads"], LLAMA_8B["head_dim"]
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, dtype=DTYPE, device="cuda")
    q = qkv[:, : hq * d].view(batch, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(batch, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(batch, hkv, d)
    k_cache = torch.zeros(batch, CACHE_CAPACITY, hkv, d, dtype=DTYPE, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    positions = torch.randint(0, CACHE_CAPACITY, (batch,), dtype=torch.int32, device="cuda")
    cos, sin = rope_cos_sin(d, CACHE_CAPACITY, 500000.0, LLAMA3_SCALING, device="cuda")
    args = (q, k, v, k_cache, v_cache, positions, cos, sin)
    # Rotation keeps norms, so rotating q again and again on each timed call stays finite.
    ours = time_ms(lambda: rope_kv_write(*args))
    # The reference selects live tokens with boolean masks (a host sync): it cannot be captured
    # in a CUDA graph, so it is timed eagerly, launch costs included.
    eager = time_ms(lambda: reference.rope_kv_write(*args), graph=False)
    element = DTYPE.itemsize
    nbytes = (2 * batch * hq * d * element          # q read and written back
              + 2 * batch * hkv * d * element       # k and v read
              + 2 * batch * hkv * d * element       # k and v written to the cache
              + 2 * batch * (d // 2) * 4 + batch * 4)  # cos, sin rows and positions
    return _row("rope_kv_write", f"B={batch} Hq={hq} Hkv={hkv} D={d}", ours, eager, nbytes,
                copy_gbps)


def bench_fused_add_rmsnorm(tokens: int, copy_gbps: float) -> dict:
    hidden = LLAMA_8B["hidden"]
    x = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
    residual = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
    weight = torch.randn(hidden, dtype=DTYPE, device="cuda")
    out = torch.empty_like(x)
    ours = time_ms(lambda: fused_add_rmsnorm(x, residual, weight, 1e-5, out=out))
    eager = time_ms(lambda: reference.fused_add_rmsnorm(x, residual, weight, 1e-5))
    # x read, residual read and written, normed output written, weight read.
    nbytes = (4 * tokens * hidden + hidden) * DTYPE.itemsize
    return _row("fused_add_rmsnorm", f"T={tokens} H={hidden}", ours, eager, nbytes, copy_gbps)


def bench_silu_and_mul(tokens: int, copy_gbps: float) -> dict:
    inter = LLAMA_8B["intermediate"]
    x = torch.randn(tokens, 2 * inter, dtype=DTYPE, device="cuda")
    out = torch.empty(tokens, inter, dtype=DTYPE, device="cuda")
    ours = time_ms(lambda: silu_and_mul(x, out=out))
    eager = time_ms(lambda: reference.silu_and_mul(x))
    nbytes = 3 * tokens * inter * DTYPE.itemsize  # gate and up read, product written
    return _row("silu_and_mul", f"T={tokens} I={inter}", ours, eager, nbytes, copy_gbps)


def bench_argmax(batch: int, copy_gbps: float) -> dict:
    vocab = LLAMA_8B["vocab"]
    logits = torch.randn(batch, vocab, dtype=torch.float32, device="cuda")
    out = torch.empty(batch, dtype=torch.int64, device="cuda")
    ours = time_ms(lambda: argmax(logits, out=out))
    eager = time_ms(lambda: reference.argmax(logits))
    nbytes = batch * vocab * 4 + batch * 8
    return _row("argmax", f"B={batch} V={vocab} fp32", ours, eager, nbytes, copy_gbps)


def run(copy_gbps: float) -> list[dict]:
    """All rows; ``copy_gbps`` is the measured device copy bandwidth (read + write)."""
    torch.manual_seed(0)
    rows = [bench_rope_kv_write(b, copy_gbps) for b in DECODE_BATCHES]
    rows += [bench_fused_add_rmsnorm(t, copy_gbps) for t in DECODE_BATCHES]
    rows.append(bench_silu_and_mul(256, copy_gbps))
    rows.append(bench_argmax(256, copy_gbps))
    return rows


def format_table(rows: list[dict], copy_gbps: float) -> str:
    lines = [f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)",
             f"{'kernel':20s} {'shape':28s} {'ours us':>9s} {'torch us':>9s} {'speedup':>8s} "
             f"{'GB/s':>7s} {'% copy':>7s}"]
    for r in rows:
        lines.append(f"{r['kernel']:20s} {r['shape']:28s} {r['ours_us']:9.2f} {r['torch_us']:9.2f} "
                     f"{r['speedup']:7.2f}x {r['gbps']:7.0f} {r['pct_copy']:6.1f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernel_ops needs a CUDA GPU")
    copy_gbps = copy_bandwidth_gbps()
    rows = run(copy_gbps)
    print(format_table(rows, copy_gbps))
    if args.json:
        from bench.common import write_json

        write_json(args.json, {"copy_gbps": copy_gbps, "rows": rows})


if __name__ == "__main__":
    main()
