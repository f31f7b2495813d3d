"""The greedy LM head at decode sizes: fp32 logits then argmax, against the fused head.

For each head shape (Llama-3.2-1B: V = 128256, K = 2048; Llama-3.1-8B: K = 4096; bf16 weights)
and row count, side by side in one run:

- ``logits + argmax``: what a step that samples runs, and what greedy steps ran before
  ``kernels.lm_head``: cuBLASLt writes the fp32 logits (its fastest candidate for the shape, as
  in the engine), then ``kernels.argmax`` reads them back;
- ``fused``: ``kernels.lm_head.fused_lm_head_argmax`` — the skinny GEMM's ROW_ARGMAX epilogue
  and the reduction over its programs, no logits;
- ``weight read``: one streaming read of the weight matrix, the pace any head could at best keep.

Each is a CUDA graph timed with ``triton.testing.do_bench`` (L2 flushed before each call),
interleaved over rounds (median). Reports µs and the weight bytes' rate as % of the copy
bandwidth measured in the same run; writes ``lm_head.json`` and ``lm_head.png``.

    python -m bench.lm_head [--heads llama-3.2-1b,llama-3.1-8b] [--rows 1,2,8,16,32,64,128,256]
                            [--rounds 5] [--out DIR]
    python -m bench.lm_head --replot bench/results/lm_head.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench.common import (RESULTS_DIR, copy_bandwidth_gbps, cuda_graph, replotted,
                          write_json)

HEADS = {"llama-3.2-1b": (128256, 2048), "llama-3.1-8b": (128256, 4096)}
VARIANTS = ("logits + argmax", "fused", "weight read")
READ_PROGRAMS, READ_BLOCK = 132 * 8, 4096


@triton.jit
def _read_kernel(w_ptr, sums_ptr, n, BLOCK: tl.constexpr):
    """Grid (P,): program p sums elements p * BLOCK, (p + P) * BLOCK, ... of w (so that the
    loads are not dead code); one fp32 per program."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < n).to(tl.float32)
    tl.store(sums_ptr + pid, tl.sum(acc, axis=0))


def run_head(vocab: int, hidden: int, rows: list[int], rounds: int) -> list[dict]:
    from triton.testing import do_bench

    from engine.blas import decode_blas
    from kernels import cublaslt
    from kernels.argmax import argmax
    from kernels.lm_head import fused_lm_head_argmax

    weight = (torch.randn(vocab, hidden, device="cuda") * hidden ** -0.5).to(torch.bfloat16)
    flat, sums = weight.view(-1), torch.empty(READ_PROGRAMS, device="cuda")
    graphs, outputs = {}, {}
    for m in rows:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(m, vocab, device="cuda", dtype=torch.float32)
        unfused = torch.empty(m, dtype=torch.int64, device="cuda")
        fused = torch.empty(m, dtype=torch.int64, device="cuda")
        outputs[m] = (unfused, fused, x)

        def logits_argmax(x=x, logits=logits, out=unfused):
            cublaslt.mm(x, weight, logits)
            argmax(logits, out=out)

        def fused_head(x=x, out=fused):
            fused_lm_head_argmax(x, weight, out)

        with decode_blas(weight.device):  # picks cuBLASLt's candidate, as the engine does
            graphs[(m, "logits + argmax")] = cuda_graph(logits_argmax)
        graphs[(m, "fused")] = cuda_graph(fused_head)
    graphs[(0, "weight read")] = cuda_graph(
        lambda: _read_kernel[(READ_PROGRAMS,)](flat, sums, flat.numel(), BLOCK=READ_BLOCK,
                                               num_warps=8))
    samples = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, replay in graphs.items():
            samples[key].append(do_bench(replay, return_mode="median") * 1e3)
    read_us = statistics.median(samples[(0, "weight read")])
    results = []
    for m in rows:
        unfused, fused, x = outputs[m]
        logits = x.float() @ weight.float().t()
        picked = logits.gather(1, torch.stack([unfused, fused], 1))
        results.append({
            "rows": m,
            "us": {"logits + argmax": statistics.median(samples[(m, "logits + argmax")]),
                   "fused": statistics.median(samples[(m, "fused")]), "weight read": read_us},
            "samples_us": {name: samples[(m, name)] for name in VARIANTS[:2]},
            "same_tokens": int((unfused == fused).sum()),
            # A differing token must be a near tie: its fp32 logit against the other's.
            "max_logit_gap": (picked[:, 0] - picked[:, 1]).abs().max().item(),
        })
    return results


def plot(payload: dict, path: Path) -> None:
    """Weight bytes' rate (% of copy) of each variant per head and row count (bars)."""
    from bench.plots import _pyplot, _save

    plt = _pyplot()
    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(max(9, 0.75 * len(rows)), 4.5))
    width = 0.8 / len(VARIANTS)
    for i, name in enumerate(VARIANTS):
        ax.bar([x + i * width for x in range(len(rows))],
               [r["weight_pct_copy"][name] for r in rows], width, label=name)
    ax.set_xticks([x + width for x in range(len(rows))])
    # "llama-3.2-1b" -> "1b": the full names overlap under twelve bars.
    ax.set_xticklabels([f"{r['head'].rsplit('-', 1)[-1]}\nM={r['rows']}" for r in rows],
                       fontsize=8)
    ax.set_ylabel("weight bytes / time (% of copy bandwidth)")
    ax.set_ylim(50, 105)
    ax.set_title("Greedy LM head: fp32 logits + argmax against the fused head")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(VARIANTS))
    _save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default=",".join(HEADS),
                        help=f"of {', '.join(HEADS)}, or VOCAB:HIDDEN")
    parser.add_argument("--rows", default="1,2,8,16,32,64,128,256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--replot", type=Path, help="draw the PNG of a saved JSON and exit")
    args = parser.parse_args(argv)
    if replotted(args, plot):
        return
    from kernels.lm_head import HEAD_MAX_ROWS

    try:
        heads = {h: HEADS.get(h) or tuple(int(n) for n in h.split(":"))
                 for h in args.heads.split(",") if h}
        rows = [int(m) for m in args.rows.split(",") if m]
    except ValueError:
        heads, rows = {}, []
    if (not heads or any(len(shape) != 2 or min(shape) < 1 for shape in heads.values())
            or not rows or not all(1 <= m <= HEAD_MAX_ROWS for m in rows)):
        parser.error(f"heads among {', '.join(HEADS)} or VOCAB:HIDDEN; rows in "
                     f"[1, {HEAD_MAX_ROWS}]")
    if not torch.cuda.is_available():
        raise SystemExit("bench.lm_head needs a CUDA GPU")
    copy_gbps = copy_bandwidth_gbps()
    out_rows = []
    for head, (vocab, hidden) in heads.items():
        weight_bytes = vocab * hidden * 2
        for row in run_head(vocab, hidden, rows, args.rounds):
            row.update(head=head, vocab=vocab, hidden=hidden, weight_pct_copy={
                name: 100 * weight_bytes / (us * 1e-6) / 1e9 / copy_gbps
                for name, us in row["us"].items()})
            out_rows.append(row)
            cells = "  ".join(f"{name} {us:.1f} µs ({row['weight_pct_copy'][name]:.1f}%)"
                              for name, us in row["us"].items())
            print(f"{head} M={row['rows']}: {cells}  same tokens {row['same_tokens']}/"
                  f"{row['rows']}")
        torch.cuda.empty_cache()
    payload = {"copy_gbps": copy_gbps, "rows": out_rows}
    path = write_json(args.out / "lm_head.json", payload)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
