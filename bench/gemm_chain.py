"""A decode step's matrix products without the rest: every layer's QKV, output, gate/up and
down projections, each reading what the one before wrote, captured in one CUDA graph; ours
(``kernels.gemm``, programmatic dependent launches) against cuBLAS, side by side in one run.

Per model and row count M: cuBLAS (``torch.mm`` and ``addmm_`` for the residual adds, as the
engine ran them before) and ours with and without PDL, timed with ``bench.common.time_ms``
(median of 3, L2 flushed before each replay of the whole chain), against the chain's roofline
(sum over products of max(bytes / copy bandwidth, FLOPs / matmul peak), both measured here).
Ours runs the engine's kernels: QKV on the raw rows (the norm goes to the RoPE kernel), the
gate/up product with RMSNorm and SiLU-and-mul fused (work cuBLAS skips here, so the comparison
is conservative for ours), down and output with the residual add.

With ``--sweep`` it instead times the chain of ours once per variant of every product's launch
shape (K tile, pipeline depth, shared-memory budget, how much of each program's weights is
prefetched into L2 before its wait), each against ``gemm_config``'s choice in the same run.

    python -m bench.gemm_chain [--out DIR] [--rows 8,16,32,64] [--sweep [--variants A,B,...]]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, copy_bandwidth_gbps, matmul_tflops, time_ms, write_json

MODELS = {"dummy:llama-3.2-1b": dict(hidden=2048, q=2048, kv=512, inter=8192, layers=16),
          "dummy:llama-3.1-8b": dict(hidden=4096, q=4096, kv=1024, inter=14336, layers=32)}
EPS = 1e-5


# name: (shared-memory budget per program, K tile, most pipeline stages, weight bytes per product
# prefetched into L2 before the wait); None keeps gemm_config's choice. Earlier sweeps on the
# H100 are in bench/RESULTS.md ("What else was tried on the product chain").
VARIANTS = {"default": (None, None, None, None),
            "prefetch 4 MB": (None, None, None, 4 << 20),
            "K tile 256, 4 stages, 200 KB": (200 << 10, 256, 4, None),
            "K tile 128, 4 stages": (None, 128, 4, None),
            "110 KB (two programs per SM)": (110 << 10, None, None, None),
            "K tile 64, 12 stages": (None, 64, 12, None)}


def variant(config, n: int, k: int, shared: int | None, block_k: int | None,
            max_stages: int | None, prefetch_bytes: int | None):
    """``config`` with the variant's shared-memory budget, K tile, stage limit and prefetch
    volume (n: the weight's rows); the stages refitted to the budget when any of the first
    three is set."""
    from kernels import gemm

    block_k = block_k or config.block_k
    stages = config.num_stages
    if shared or block_k != config.block_k or max_stages:
        stage_bytes = (config.block_m + config.block_n) * block_k * 2
        stages = max(1, min(max_stages or gemm.MAX_STAGES,
                            (shared or gemm.SHARED_BYTES) // stage_bytes))
    prefetch_k = config.prefetch_k
    if prefetch_bytes:
        columns = min(prefetch_bytes // (2 * n), k)
        prefetch_k = max(prefetch_k, 64 * 2 ** max(0, (columns // 64).bit_length() - 1))
    return dataclasses.replace(config, block_k=block_k, num_stages=stages, prefetch_k=prefetch_k)


def chain_fns(shape: dict, m: int, variants: tuple[tuple, ...] = ()) -> dict:
    """{name: fn} running every layer's four products, plus the roofline inputs; with
    ``variants`` (values of VARIANTS) only ours, once per variant."""
    from kernels.gemm import PARTIAL_NORM, PLAIN, gemm_config, gemm_programs, skinny_gemm

    h, q, inter = shape["hidden"], shape["q"], shape["inter"]
    qkv_n = q + 2 * shape["kv"]
    bf16 = torch.bfloat16
    layers = [dict(qkv=torch.randn(qkv_n, h, dtype=bf16, device="cuda") * h ** -0.5,
                   o=torch.randn(h, q, dtype=bf16, device="cuda") * q ** -0.5,
                   gate_up=torch.randn(2 * inter, h, dtype=bf16, device="cuda") * h ** -0.5,
                   down=torch.randn(h, inter, dtype=bf16, device="cuda") * inter ** -0.5)
              for _ in range(shape["layers"])]
    residual = torch.randn(m, h, dtype=bf16, device="cuda")
    qkv = torch.empty(m, qkv_n, dtype=bf16, device="cuda")
    gate_up = torch.empty(m, 2 * inter, dtype=bf16, device="cuda")
    act = torch.empty(m, inter, dtype=bf16, device="cuda")

    def cublas():
        for w in layers:
            torch.mm(residual, w["qkv"].t(), out=qkv)
            residual.addmm_(qkv[:, :q], w["o"].t())
            torch.mm(residual, w["gate_up"].t(), out=gate_up)
            residual.addmm_(gate_up[:, :inter], w["down"].t())

    def ours(pdl: bool, changes: tuple = (None, None, None, None)):
        configs = {name: variant(gemm_config(m, n, k, bf16, prologue, pdl,
                                             swiglu=name == "gate_up"), n, k, *changes)
                   for name, n, k, prologue in (("qkv", qkv_n, h, PLAIN), ("o", h, q, PLAIN),
                                                ("gate_up", 2 * inter, h, PARTIAL_NORM),
                                                ("down", h, inter, PLAIN))}

        # The output product leaves the residual's partial sums of squares for gate/up's norm.
        sumsq = torch.empty(gemm_programs(configs["o"], h), m, device="cuda")

        def run():
            for w in layers:
                skinny_gemm(residual, w["qkv"], qkv, PLAIN, config=configs["qkv"])
                skinny_gemm(qkv[:, :q], w["o"], residual, PLAIN, add_residual=True,
                            row_sumsq=sumsq, config=configs["o"])
                skinny_gemm(residual, w["gate_up"], act, PARTIAL_NORM, eps=EPS, swiglu=True,
                            row_sumsq=sumsq, config=configs["gate_up"])
                skinny_gemm(act, w["down"], residual, PLAIN, add_residual=True,
                            config=configs["down"])
        return run, {k: dataclasses.asdict(v) for k, v in configs.items()}

    products = [(qkv_n, h), (h, q), (2 * inter, h), (h, inter)]
    if variants:
        return [ours(True, v) for v in variants], products
    ours_pdl, configs = ours(True)
    return {"cublas": cublas, "ours_no_pdl": ours(False)[0], "ours": ours_pdl}, products, configs


def sweep(rows: list[int], names: list[str]) -> dict:
    """Chain time of ours per variant of the launch shapes (names: keys of VARIANTS, the
    first the baseline), against the first."""
    results = []
    for model, shape in MODELS.items():
        for m in rows:
            runs, _ = chain_fns(shape, m, tuple(VARIANTS[name] for name in names))
            base_us = None
            for name, (fn, configs) in zip(names, runs):
                try:
                    fn()
                except Exception as exc:  # e.g. a pipeline beyond the shared memory
                    print(f"{model} M={m} {name}: {type(exc).__name__}: {exc}"[:300], flush=True)
                    continue
                us = time_ms(fn) * 1e3
                base_us = base_us or us
                row = {"model": model, "M": m, "variant": name, "us": us,
                       "vs_default": base_us / us, "configs": configs}
                print(f"{model:22s} M={m:3d} {name:36s} {us:8.1f} us  "
                      f"{row['vs_default']:.3f}x", flush=True)
                results.append(row)
            del runs
            torch.cuda.empty_cache()
    return {"rows": results}


def run(rows: list[int]) -> dict:
    copy_gbps = copy_bandwidth_gbps()
    peak = matmul_tflops()
    results = []
    for model, shape in MODELS.items():
        for m in rows:
            fns, products, configs = chain_fns(shape, m)
            roof_us = shape["layers"] * sum(
                max(n * k * 2 / (copy_gbps * 1e3), 2 * m * n * k / (peak * 1e6))
                for n, k in products)
            row = {"model": model, "M": m, "roofline_us": roof_us, "configs": configs}
            for name, fn in fns.items():
                fn()
                row[f"{name}_us"] = time_ms(fn) * 1e3
            row["ours_vs_cublas"] = row["cublas_us"] / row["ours_us"]
            row["ours_roof_pct"] = 100 * roof_us / row["ours_us"]
            row["cublas_roof_pct"] = 100 * roof_us / row["cublas_us"]
            print(f"{model:22s} M={m:3d} roof {roof_us:8.1f} us  cuBLAS {row['cublas_us']:8.1f}"
                  f"  ours {row['ours_us']:8.1f} (no PDL {row['ours_no_pdl_us']:8.1f})"
                  f"  {row['ours_vs_cublas']:.2f}x  roof% {row['cublas_roof_pct']:.1f} -> "
                  f"{row['ours_roof_pct']:.1f}", flush=True)
            results.append(row)
            del fns
            torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "matmul_tflops": peak, "rows": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--rows", default="2,8,16,32,64", help="row counts M, comma-separated")
    parser.add_argument("--sweep", action="store_true",
                        help="time variants of the launch shapes (K tile, stages, prefetch)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="with --sweep: names of VARIANTS, comma-separated, the baseline first")
    args = parser.parse_args()
    rows = [int(m) for m in args.rows.split(",")]
    if args.sweep:
        write_json(args.out / "gemm_sweep.json", sweep(rows, args.variants.split(",")))
    else:
        write_json(args.out / "gemm_chain.json", run(rows))


if __name__ == "__main__":
    main()
