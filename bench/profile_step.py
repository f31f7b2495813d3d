"""Where a decode step's time goes: every kernel of the engine's CUDA-graph step, per step.

For each model and batch size B, one slab of B rows holding ``--prompt-len`` tokens is
prefilled, then ``--steps`` decode steps are replayed (the engine's own ``BatchRunner`` and
graphs, greedy) under ``torch.profiler``. Kernels are grouped into the step's parts
(matrix products, attention, the split merge, RoPE + KV write, norms, activation, argmax,
other), and each part's time is set beside its roofline share (``bench.roofline``, with the
copy bandwidth and matmul peak measured in the same run). "gaps" is step time minus kernel
time: the device idling between kernels.

    python -m bench.profile_step [--models dummy:llama-3.2-1b,dummy:llama-3.1-8b]
        [--batch-sizes 1,64,256] [--prompt-len 512] [--steps 32] [--out DIR] [--name profile]
    python -m bench.profile_step --replot bench/results/profile.json   # tables + PNG again
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, write_json

# Kernel name pattern -> step part (first match wins). cuBLAS/CUTLASS names vary by version.
PARTS = [
    # The B = 1 QKV kernel is a GEMV with RoPE and the K/V write as its epilogue: a projection.
    ("matmul", r"_qkv_rope_kernel"),
    ("attention", r"_decode_split_kernel"),
    ("merge", r"_merge_splits_kernel"),
    ("rope_kv_write", r"rope"),
    ("norm", r"rmsnorm"),
    ("activation", r"silu"),
    ("argmax", r"argmax"),
    ("matmul", r"gemm|gemv|nvjet|cutlass|xmma|splitK|cublas"),
]


def part_of(kernel_name: str) -> str:
    for part, pattern in PARTS:
        if re.search(pattern, kernel_name, re.IGNORECASE):
            return part
    return "other"


def _decode_runner(model_name: str, batch_size: int, prompt_len: int, steps: int):
    """A BatchRunner on a fresh model with B rows prefilled to ``prompt_len`` tokens."""
    from bench.engine import random_prompts
    from engine.kv_cache import KVArena
    from engine.model import load_model
    from engine.runner import BatchRunner, RowSampling, capacity_bucket

    model = load_model(model_name, torch.bfloat16, "cuda", backend="triton")
    c = model.config
    capacity = capacity_bucket(prompt_len + steps + 8, 256, c.max_position_embeddings)
    arena = KVArena(c.num_layers, c.num_kv_heads, c.head_dim, batch_size * capacity,
                    torch.bfloat16, "cuda")
    runner = BatchRunner(model, arena)
    runner.begin(batch_size, capacity)
    prompts = random_prompts(batch_size, prompt_len, c.vocab_size)
    greedy = RowSampling(temperature=0.0, top_k=-1, top_p=1.0, seed=0, logprobs=False)
    runner.prefill(list(range(batch_size)), prompts, [greedy] * batch_size).result()
    return model, runner, capacity


def profile_one(model_name: str, batch_size: int, prompt_len: int, steps: int,
                copy_gbps: float, matmul_tflops: float) -> dict:
    """Per-part and per-kernel device time of one decode step, with the step's roofline."""
    from torch.profiler import ProfilerActivity, profile

    from bench.roofline import decode_step_costs

    model, runner, capacity = _decode_runner(model_name, batch_size, prompt_len, steps)
    for _ in range(3):  # capture the graph, warm up
        runner.decode().result()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            runner.decode()
        end.record()
        torch.cuda.synchronize()
    step_us = start.elapsed_time(end) * 1e3 / steps

    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = per_kernel[event.name]
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    kernels = sorted(({"name": name, "part": part_of(name), "calls_per_step": n / steps,
                       "us_per_step": us / steps} for name, (n, us) in per_kernel.items()),
                     key=lambda k: -k["us_per_step"])
    parts: dict[str, dict] = {}
    for k in kernels:
        p = parts.setdefault(k["part"], {"calls_per_step": 0.0, "us_per_step": 0.0})
        p["calls_per_step"] += k["calls_per_step"]
        p["us_per_step"] += k["us_per_step"]

    # Roofline shares at the middle of the profiled window.
    context = prompt_len + 3 + steps // 2
    costs = decode_step_costs(model.config, batch_size, [context] * batch_size)
    roof = defaultdict(float)
    for cost in costs:
        name = "attention" if cost.name == "attention" else "matmul"
        roof[name] += cost.seconds(copy_gbps * 1e9, matmul_tflops * 1e12) * 1e6
    kernel_us = sum(p["us_per_step"] for p in parts.values())
    parts["gaps"] = {"calls_per_step": 0.0, "us_per_step": max(step_us - kernel_us, 0.0)}
    for name, p in parts.items():
        p["roofline_us"] = roof.get(name, 0.0)
    runner.end()
    del model, runner
    torch.cuda.empty_cache()
    return {"model": model_name, "B": batch_size, "capacity": capacity, "context": context,
            "step_us": step_us, "roofline_us": sum(roof.values()), "parts": parts,
            "kernels": kernels}


def format_report(row: dict) -> str:
    lines = [f"{row['model']} B={row['B']} C={row['capacity']} context~{row['context']}: "
             f"step {row['step_us']:.1f} us, roofline {row['roofline_us']:.1f} us "
             f"({100 * row['roofline_us'] / row['step_us']:.1f}%)",
             f"  {'part':<14}{'calls':>7}{'us/step':>10}{'% step':>8}{'roofline us':>13}"]
    for name, p in sorted(row["parts"].items(), key=lambda kv: -kv[1]["us_per_step"]):
        lines.append(f"  {name:<14}{p['calls_per_step']:>7.0f}{p['us_per_step']:>10.1f}"
                     f"{100 * p['us_per_step'] / row['step_us']:>7.1f}%"
                     f"{p['roofline_us']:>13.1f}")
    lines.append("  top kernels:")
    for k in row["kernels"][:8]:
        lines.append(f"    {k['us_per_step']:>8.1f} us  x{k['calls_per_step']:<5.0f} {k['name'][:90]}")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def replot(paths: list[Path], out: Path) -> None:
    """Print the tables of saved profiles and draw them together into ``out``."""
    import json

    from bench.plots import plot_profile

    rows = [row for path in paths for row in json.loads(path.read_text())["rows"]]
    for row in rows:
        print(format_report(row))
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_profile(rows, out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dummy:llama-3.2-1b,dummy:llama-3.1-8b")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parser.add_argument("--name", default="profile", help="file stem of the JSON and PNG")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="no GPU run: print and plot saved profiles (PNG to --out/--name)")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.replot, args.out / f"{args.name}.png")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_step needs a CUDA GPU")
    from bench.common import copy_bandwidth_gbps, matmul_tflops

    copy_gbps, tflops = copy_bandwidth_gbps(), matmul_tflops()
    print(f"ceilings: copy {copy_gbps:.0f} GB/s, matmul {tflops:.0f} TFLOP/s")
    rows = []
    for model_name in args.models.split(","):
        for batch_size in args.batch_sizes:
            rows.append(profile_one(model_name, batch_size, args.prompt_len, args.steps,
                                    copy_gbps, tflops))
            print(format_report(rows[-1]), flush=True)
    path = write_json(args.out / f"{args.name}.json", {
        "copy_gbps": copy_gbps, "matmul_tflops": tflops, "prompt_len": args.prompt_len,
        "steps": args.steps, "rows": rows})
    from bench.plots import plot_profile

    plot_profile(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
