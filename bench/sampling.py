"""What a decode step costs with each way of picking tokens.

The engine's own decode step (``BatchRunner.decode``: model, sampler and position advance as
one CUDA graph per sampling kind, bf16, Triton backend) for B rows that all use one setting:

- ``greedy``: the fused greedy LM head (no logits);
- ``greedy + penalties``: presence 0.5, frequency 0.5, repetition 1.1, greedy: the logits, the
  penalties over the [B, V] token history and an argmax;
- ``temperature``: 0.8, no filter: softmax, CDF and one uniform per row;
- ``top-k 50``: the same after a ``torch.topk`` threshold;
- ``top-p 0.95``: the same after a full-vocabulary sort;
- ``top-p 0.95 + penalties``.

Each setting prefills B prompts of ``--context`` tokens, runs a few steps (its graph is
captured on the first), then times ``--steps`` steps between CUDA events; settings are
interleaved over rounds and the median is kept.

    python -m bench.sampling [--models dummy:llama-3.2-1b] [--batch-sizes 1,64] [--context 512]
                             [--steps 64] [--rounds 3] [--out DIR]
    python -m bench.sampling --replot bench/results/sampling.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, replotted, write_json

PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "greedy + penalties": dict(temperature=0.0, **PENALTIES),
    "temperature": dict(temperature=0.8),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "top-p 0.95 + penalties": dict(temperature=0.8, top_p=0.95, **PENALTIES),
}
WARMUP_STEPS = 3


def _row_sampling(setting: dict, seed: int):
    from engine.runner import RowSampling

    return RowSampling(temperature=setting["temperature"], top_k=setting.get("top_k", -1),
                       top_p=setting.get("top_p", 1.0), seed=seed, logprobs=False,
                       **{k: v for k, v in setting.items() if k.endswith("_penalty")})


def _time_setting(runner, prompts: list[list[int]], setting: dict, capacity: int,
                  steps: int) -> float:
    """ms per decode step of B rows prefilled with ``prompts``, all sampled by ``setting``."""
    B = len(prompts)
    runner.begin(B, capacity)
    runner.prefill(list(range(B)), prompts, [_row_sampling(setting, s) for s in range(B)])
    for _ in range(WARMUP_STEPS):
        runner.decode()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.decode()
    end.record()
    end.synchronize()
    runner.end()
    return start.elapsed_time(end) / steps


def run_model(model_name: str, batch_sizes: list[int], context: int, steps: int,
              rounds: int) -> list[dict]:
    from engine.kv_cache import KVArena
    from engine.model import load_model
    from engine.runner import BatchRunner, capacity_bucket

    model = load_model(model_name, torch.bfloat16, "cuda", backend="triton")
    c = model.config
    capacity = capacity_bucket(context + WARMUP_STEPS + steps + 1, 256, c.max_position_embeddings)
    rows = []
    for B in batch_sizes:
        arena = KVArena(c.num_layers, c.num_kv_heads, c.head_dim, B * capacity, torch.bfloat16,
                        "cuda")
        runner = BatchRunner(model, arena)
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(3, c.vocab_size, (B, context), generator=g).tolist()
        samples = {name: [] for name in SETTINGS}
        for _ in range(rounds):
            for name, setting in SETTINGS.items():
                samples[name].append(_time_setting(runner, prompts, setting, capacity, steps))
        step_ms = {name: statistics.median(s) for name, s in samples.items()}
        rows.append(dict(model=model_name, B=B, capacity=capacity, step_ms=step_ms,
                         samples_ms=samples,
                         vs_greedy={n: ms / step_ms["greedy"] for n, ms in step_ms.items()}))
        print(f"{model_name} B={B}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in step_ms.items()),
              flush=True)
        del runner, arena
        torch.cuda.empty_cache()
    return rows


def plot(payload: dict, path: Path) -> None:
    """Step time of each setting over the greedy step's, per model and batch size (bars)."""
    from bench.plots import grouped_bars

    rows = payload["rows"]
    grouped_bars(rows, list(rows[0]["step_ms"]), lambda row, name: row["vs_greedy"][name],
                 "decode step time / greedy step time",
                 "What each way of picking tokens costs a decode step", path, baseline=1.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="dummy:llama-3.2-1b")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--replot", type=Path, help="draw the PNG of a saved JSON and exit")
    args = parser.parse_args(argv)
    if replotted(args, plot):
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if not batch_sizes or min(batch_sizes) < 1 or args.context < 1 or args.steps < 1 \
            or args.rounds < 1:
        parser.error("--batch-sizes, --context, --steps and --rounds must be positive")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = [row for name in args.models.split(",") if name
            for row in run_model(name, batch_sizes, args.context, args.steps, args.rounds)]
    payload = dict(context=args.context, steps=args.steps, rounds=args.rounds,
                   settings=SETTINGS, rows=rows)
    path = write_json(args.out / "sampling.json", payload)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
