"""Kernel microbenchmarks: decode attention on the canonical grid (DESIGN.md) against torch
SDPA and FlexAttention, then the other kernels' rows (small ops, fused projections, prefill
attention).

Canonical grid: bf16, H_q=32, H_kv=8, D=128, C = L; (B, L) in (1, 8192), (16, 2048),
(64, 2048), (256, 1024), (64, 8192), (8, 32768); every row at L ("uniform") or row lengths
uniform in [L/8, L] from a fixed seed ("skewed"). Implementations are timed interleaved
(round r times each of them once) with ``bench.common.time_ms``; the median of the rounds is
reported. Bandwidth counts the live K and V bytes only, so padding read by a peer counts
against it.

    python -m bench.kernels [--out DIR] [--sweep] [--quick] [--grid B:L,...] [--head-dim D]
        [--decode-only]

--sweep also times a handful of alternative (block_n, splits, warps, stages, launch order,
dependent merge launch, evict-first K/V loads) per shape around ``decode_config``'s choice, to
retune it from one GPU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import traceback
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, copy_bandwidth_gbps, time_ms, write_json

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
GRID = [(1, 8192), (16, 2048), (64, 2048), (256, 1024), (64, 8192), (8, 32768)]
QUICK_GRID = [(1, 8192), (64, 2048)]
SKEW_SEED = 0
ROUNDS = 3


@dataclasses.dataclass
class Shape:
    batch: int
    length: int
    skewed: bool
    head_dim: int = HEAD_DIM

    @property
    def label(self) -> str:
        dim = "" if self.head_dim == HEAD_DIM else f" D{self.head_dim}"
        return f"B{self.batch} L{self.length}{dim} {'skew' if self.skewed else 'unif'}"


def row_lengths(shape: Shape) -> torch.Tensor:
    """int32 [B] on the GPU: all L, or uniform in [L/8, L] from a fixed seed."""
    if not shape.skewed:
        return torch.full((shape.batch,), shape.length, dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(SKEW_SEED)
    lens = torch.randint(shape.length // 8, shape.length + 1, (shape.batch,), generator=g)
    return lens.to(torch.int32).cuda()


def num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def live_kv_bytes(lens: torch.Tensor, head_dim: int) -> int:
    """Bytes of K and V the attention must read: live positions only."""
    elem = torch.empty((), dtype=DTYPE).element_size()
    return int(lens.sum().item()) * NUM_KV_HEADS * head_dim * elem * 2


def make_problem(shape: Shape) -> dict:
    """Our inputs (NHD slab) plus each peer's preferred layout, all prepared outside timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, C, D = shape.batch, shape.length, shape.head_dim
    lens = row_lengths(shape)
    q = torch.randn(B, NUM_Q_HEADS, D, dtype=DTYPE, device="cuda")
    k = torch.randn(B, C, NUM_KV_HEADS, D, dtype=DTYPE, device="cuda")
    v = torch.randn(B, C, NUM_KV_HEADS, D, dtype=DTYPE, device="cuda")
    lens_long = lens.long()
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lens_long[b],
                                   B, None, 1, C, device="cuda")
    return {
        "lens": lens, "q": q, "k": k, "v": v, "out": torch.empty_like(q),
        "q_bhld": q[:, :, None, :],  # [B, H_q, 1, D]
        "k_bhld": k.permute(0, 2, 1, 3).contiguous(),  # [B, H_kv, C, D]
        "v_bhld": v.permute(0, 2, 1, 3).contiguous(),
        "mask": (torch.arange(C, device="cuda")[None, :] < lens[:, None])[:, None, None, :],
        "block_mask": block_mask,
    }


def ours_fn(p: dict, config=None):
    from kernels.decode_attention import decode_attention

    return lambda: decode_attention(p["q"], p["k"], p["v"], p["lens"], out=p["out"], config=config)


def sdpa_fn(p: dict):
    from torch.nn.functional import scaled_dot_product_attention

    return lambda: scaled_dot_product_attention(p["q_bhld"], p["k_bhld"], p["v_bhld"],
                                                attn_mask=p["mask"], enable_gqa=True)


_compiled_flex = None


def flex_fn(p: dict):
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compile per (B, C); the default recompile limit (8) is too low for the grid.
        torch._dynamo.config.recompile_limit = 64
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    flex = _compiled_flex
    return lambda: flex(p["q_bhld"], p["k_bhld"], p["v_bhld"], block_mask=p["block_mask"],
                        enable_gqa=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def interleaved_times(fns: dict, rounds: int = ROUNDS) -> dict:
    """Median ms over ``rounds`` rounds, each timing every fn once (``time_ms(repeats=1)``);
    a failing fn is timed no more and reported as {"error": ...}."""
    samples = {name: [] for name in fns}
    errors = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                samples[name].append(time_ms(fn, repeats=1))
            except Exception as e:  # a failing peer must not kill the run
                errors[name] = f"{type(e).__name__}: {e}"[:300]
    return {name: ({"error": errors[name]} if name in errors
                   else {"ms": statistics.median(samples[name])}) for name in fns}


def bench_shape(shape: Shape, copy_gbps: float) -> dict:
    from kernels.decode_attention import decode_config

    p = make_problem(shape)
    nbytes = live_kv_bytes(p["lens"], shape.head_dim)
    config = decode_config(shape.batch, shape.length, NUM_Q_HEADS, NUM_KV_HEADS, shape.head_dim, DTYPE,
                           num_sms())
    fns = {"ours": ours_fn(p), "sdpa": sdpa_fn(p), "flex": flex_fn(p)}
    row = {"shape": shape.label, "B": shape.batch, "L": shape.length, "D": shape.head_dim,
           "lengths": "skewed" if shape.skewed else "uniform", "live_kv_bytes": nbytes,
           "config": dataclasses.asdict(config)}

    # Correctness first (and compile/warm everything outside the timing).
    outputs = {}
    for name, fn in fns.items():
        try:
            outputs[name] = fn().reshape(shape.batch, NUM_Q_HEADS, shape.head_dim)
        except Exception as e:
            row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
    reference = outputs.get("sdpa", outputs.get("flex"))
    if reference is not None and "ours" in outputs:
        row["ours_rel_err_vs_peer"] = relative_error(outputs["ours"], reference)
    torch.cuda.synchronize()

    timed = interleaved_times({name: fn for name, fn in fns.items() if name in outputs})
    for name, result in timed.items():
        if "ms" in result:
            gbps = nbytes / (result["ms"] * 1e-3) / 1e9
            result = {"us": result["ms"] * 1e3, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps}
        row[name] = result
    peer_us = [row[n]["us"] for n in ("sdpa", "flex") if "us" in row.get(n, {})]
    if peer_us and "us" in row.get("ours", {}):
        # > 1: ours is faster than the best peer.
        row["ours_vs_best_peer"] = min(peer_us) / row["ours"]["us"]
    del p, outputs
    torch.cuda.empty_cache()
    return row


def sweep_candidates(default, batch: int, capacity: int) -> list:
    """Alternatives around ``default``, one knob at a time, plus the obvious big-tile pairing."""
    from kernels.decode_attention import MAX_SORTED_ROWS, MAX_SPLITS

    d = default
    out = [d]
    for splits in (d.num_splits // 4, d.num_splits // 2, d.num_splits * 2, d.num_splits * 4):
        if 1 <= splits <= MAX_SPLITS and capacity // splits >= d.block_n:
            out.append(dataclasses.replace(d, num_splits=splits, merge_pdl=splits > 1))
    if 2 <= batch <= MAX_SORTED_ROWS:  # launch order only matters with several rows
        out.append(dataclasses.replace(d, longest_first=not d.longest_first))
    if d.num_splits > 1:
        out.append(dataclasses.replace(d, merge_pdl=not d.merge_pdl))
    for block_n in (32, 64, 128):
        out.append(dataclasses.replace(d, block_n=block_n,
                                       num_stages=2 if block_n == 128 else d.num_stages))
    # 128-position tiles at D=64 are the bytes of 64-position tiles at D=128.
    out += [dataclasses.replace(d, block_n=128, num_warps=4, num_stages=s) for s in (2, 3)]
    out += [dataclasses.replace(d, num_warps=w) for w in (2, 4, 8)]
    out.append(dataclasses.replace(d, block_n=32, num_warps=1, num_stages=3))  # short D = 64
    out += [dataclasses.replace(d, num_stages=s, evict_first=False) for s in (1, 2, 4)]
    out.append(dataclasses.replace(d, num_stages=1, evict_first=True))
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def sweep_shape(shape: Shape, copy_gbps: float) -> list[dict]:
    from kernels.decode_attention import decode_config

    p = make_problem(shape)
    nbytes = live_kv_bytes(p["lens"], shape.head_dim)
    default = decode_config(shape.batch, shape.length, NUM_Q_HEADS, NUM_KV_HEADS, shape.head_dim, DTYPE,
                            num_sms())
    rows = []
    for config in sweep_candidates(default, shape.batch, shape.length):
        row = {"shape": shape.label, "config": dataclasses.asdict(config),
               "is_default": config == default}
        try:
            fn = ours_fn(p, config)
            fn()
            ms = time_ms(fn, repeats=1)
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(us=ms * 1e3, gbps=gbps, pct_copy=100 * gbps / copy_gbps)
        except Exception as e:  # e.g. out of shared memory
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    del p
    torch.cuda.empty_cache()
    return rows


def other_kernel_rows(module_name: str, copy_gbps: float) -> list[dict]:
    """Rows of ``bench.<module_name>.run(copy_gbps)``, or one error row."""
    import importlib

    try:
        module = importlib.import_module(f"bench.{module_name}")
    except Exception as e:  # missing or broken: record it, keep the decode results
        return [{"kernel": module_name, "error": f"not importable: {type(e).__name__}: {e}"[:300]}]
    try:
        return module.run(copy_gbps)
    except Exception as e:
        traceback.print_exc()
        return [{"kernel": module_name, "error": f"{type(e).__name__}: {e}"[:300]}]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["ours", "sdpa", "flex"]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    for i, name in enumerate(names):
        values = [r.get(name, {}).get("pct_copy", 0.0) for r in rows]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=name)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["shape"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("% of measured copy bandwidth (live KV)")
    dims = "/".join(str(d) for d in sorted({r.get("D", HEAD_DIM) for r in rows}))
    ax.set_title(f"Decode attention, bf16, H_q={NUM_Q_HEADS} H_kv={NUM_KV_HEADS} D={dims}")
    ax.axhline(100, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_decode_table(rows: list[dict]) -> str:
    def cell(row, name):
        r = row.get(name, {})
        return f"{r['us']:>9.1f} {r['pct_copy']:>5.1f}%" if "us" in r else f"{'error':>16}"

    lines = [f"{'shape':<18}{'live MB':>9}{'ours us  %copy':>17}{'sdpa us  %copy':>17}"
             f"{'flex us  %copy':>17}{'vs best':>9}{'rel err':>9}"]
    for r in rows:
        ratio = f"{r['ours_vs_best_peer']:.2f}x" if "ours_vs_best_peer" in r else "-"
        err = f"{r['ours_rel_err_vs_peer']:.1e}" if "ours_rel_err_vs_peer" in r else "-"
        lines.append(f"{r['shape']:<18}{r['live_kv_bytes'] / 1e6:>9.1f}{cell(r, 'ours'):>17}"
                     f"{cell(r, 'sdpa'):>17}{cell(r, 'flex'):>17}{ratio:>9}{err:>9}")
    return "\n".join(lines)


def format_sweep_table(rows: list[dict]) -> str:
    lines = [f"{'shape':<18}{'block_n':>8}{'splits':>7}{'warps':>6}{'stages':>7}{'sort':>5}"
             f"{'pdl':>4}{'evict':>6}{'us':>10}{'%copy':>7}"]
    for r in rows:
        c = r["config"]
        timing = (f"{r['us']:>10.1f}{r['pct_copy']:>6.1f}%" if "us" in r
                  else f"  {r['error'][:40]}")
        mark = "  <- default" if r["is_default"] else ""
        lines.append(f"{r['shape']:<18}{c['block_n']:>8}{c['num_splits']:>7}{c['num_warps']:>6}"
                     f"{c['num_stages']:>7}{c['longest_first']:>5d}{c['merge_pdl']:>4d}"
                     f"{c['evict_first']:>6d}{timing}"
                     f"{mark}")
    return "\n".join(lines)


def format_other_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('kernel', '?'):<20} error: {r['error'][:80]}")
            continue
        extras = " ".join(f"{k}={r[k]:.3g}" for k in ("speedup", "pct_copy", "tflops") if k in r)
        lines.append(f"{r.get('kernel', '?'):<20}{r.get('shape', ''):<34}"
                     f"ours {r.get('ours_us', float('nan')):>9.1f} us  "
                     f"torch {r.get('torch_us', float('nan')):>9.1f} us  {extras}")
    return "\n".join(lines)


def parse_grid(text: str) -> list[tuple[int, int]]:
    """"B:L,B:L" -> [(B, L), ...]."""
    try:
        return [(int(b), int(l)) for b, l in (item.split(":") for item in text.split(",") if item)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B:L,B:L,..., got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parser.add_argument("--sweep", action="store_true", help="also time alternative configs")
    parser.add_argument("--quick", action="store_true", help="two shapes only (smoke run)")
    parser.add_argument("--grid", type=parse_grid, default=None,
                        help="decode shapes as B:L,B:L,... (default: the canonical grid)")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM,
                        help=f"head dim of the decode shapes (default {HEAD_DIM})")
    parser.add_argument("--decode-only", action="store_true",
                        help="skip the other kernels' rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels needs a CUDA GPU")

    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    grid = args.grid or (QUICK_GRID if args.quick else GRID)
    shapes = [Shape(B, L, skewed, args.head_dim) for B, L in grid for skewed in (False, True)]
    decode_rows = []
    for shape in shapes:
        decode_rows.append(bench_shape(shape, copy_gbps))
        print(format_decode_table(decode_rows[-1:]).splitlines()[-1], flush=True)
    sweep_rows = []
    if args.sweep:
        for shape in shapes:
            sweep_rows += sweep_shape(shape, copy_gbps)
    other_rows = [] if args.decode_only else (other_kernel_rows("kernel_ops", copy_gbps)
                                              + other_kernel_rows("kernel_linear", copy_gbps)
                                              + other_kernel_rows("kernel_prefill", copy_gbps))

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "kernels.json", {
        "copy_gbps": copy_gbps,
        "decode_attention": {"dtype": "bf16", "num_q_heads": NUM_Q_HEADS,
                             "num_kv_heads": NUM_KV_HEADS, "head_dim": args.head_dim,
                             "skew": "row lengths U[L/8, L], seed 0", "rows": decode_rows},
        "decode_attention_sweep": sweep_rows,
        "other_kernels": other_rows,
    })
    plot(decode_rows, args.out / "kernels.png")

    print(f"\nDecode attention (copy bandwidth {copy_gbps:.0f} GB/s; 'vs best' = best peer time "
          f"/ our time)")
    print(format_decode_table(decode_rows))
    if sweep_rows:
        print("\nSweep")
        print(format_sweep_table(sweep_rows))
    print("\nOther kernels")
    print(format_other_table(other_rows))
    print(f"\nwrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")


if __name__ == "__main__":
    main()
