"""How a cuBLASLt candidate's timing predicts the decode step it runs in.

Past 64 rows the decode step's products run on ``kernels.cublaslt``: per product shape, the
fastest of PyTorch's call and cuBLASLt's heuristic candidates. What "fastest" means depends on
how a candidate is timed. This runs the engine (``EngineCore``, a static batch of B rows,
prompt 512, greedy) and, for every product shape of its decode step (M = B), times PyTorch's
call and every candidate three ways:

- alone: each call between two events after an L2 flush, every operand cold;
- in a chain: ``kernels.cublaslt.chain_product_us``, how the engine chooses (weight cold,
  activation and output hot, back to back with other kernels in a CUDA graph);
- in the step: the median decode step (ms) over ``--new-tokens`` greedy steps with that
  candidate and every other shape on the engine's choice, the step's graph captured anew.

Each row also names what each timing would pick (``kernels.cublaslt.fastest``: PyTorch's
call unless a candidate is ``MIN_GAIN`` faster; the step: the shortest step), and the step
time of that pick.

    python -m bench.blas_choice [--models dummy:llama-3.2-1b] [--batch-sizes 96,128,256]
        [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, write_json
from bench.engine import (DecodeStepTimer, EngineBenchConfig, _engine_options, _greedy,
                          _int_list, _run_to_completion, random_prompts)

MODELS = ("dummy:llama-3.2-1b",)
BATCH_SIZES = (96, 128, 256)
NEW_TOKENS = 48
SKIPPED_STEPS = 3  # the first steps of a run include the graph's capture
ALONE_REPEATS = 10
TORCH = -1  # candidate index of PyTorch's own call


def alone_us(runs: list, flush: torch.Tensor) -> list[float]:
    """Median µs of each run called alone: L2 flushed (a read) before every call, calls
    interleaved, the GPU held asleep while they are queued (how ``kernels.cublaslt`` timed
    candidates before it timed them in a chain)."""
    from kernels import cublaslt

    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(ALONE_REPEATS)] for _ in runs]
    for run in runs:
        run()
    torch.cuda._sleep(cublaslt.SLEEP_CYCLES)
    for repeat in range(ALONE_REPEATS):
        for run, pairs in zip(runs, events):
            flush.sum()
            pairs[repeat][0].record()
            run()
            pairs[repeat][1].record()
    torch.cuda.synchronize()
    return [statistics.median(s.elapsed_time(e) * 1e3 for s, e in pairs) for pairs in events]


class StepTimer:
    """The engine's decode step at one batch size, timed with any product choices."""

    def __init__(self, model: str, batch_size: int, new_tokens: int):
        from engine.engine_core import EngineCore
        from engine.request import EngineRequest

        config = EngineBenchConfig(models=[model], batch_sizes=[batch_size], hf_batch_size=0,
                                   new_tokens=new_tokens)
        self.core = EngineCore(_engine_options(model, batch_size, config))
        vocab = self.core.model_config.vocab_size
        self._requests = lambda tag: [
            EngineRequest(f"{tag}-{i}", prompt, _greedy(new_tokens))
            for i, prompt in enumerate(random_prompts(batch_size, config.prompt_len, vocab))]
        self._runs = 0
        _run_to_completion(self.core, self._requests("warm-up"))  # times the products, compiles

    def step_ms(self) -> float:
        """Median decode step of one batch, on a graph captured with the current choices."""
        from engine.cuda_graphs import DecodeGraphs

        runner = self.core.runner
        runner.graphs = DecodeGraphs(runner.device)
        timer = DecodeStepTimer(runner)
        self._runs += 1
        try:
            _run_to_completion(self.core, self._requests(f"run{self._runs}"))
            steps = timer.seconds()[SKIPPED_STEPS:]
        finally:
            timer.remove()
        return statistics.median(steps) * 1e3

    def close(self) -> None:
        self.core.close()


def measure(model: str, batch_size: int, new_tokens: int) -> list[dict]:
    """One row per product shape of the decode step at M = batch_size (see the module
    docstring)."""
    from kernels import cublaslt

    timer = StepTimer(model, batch_size, new_tokens)
    try:
        shapes = [(d, s) for d, s in cublaslt.timed_shapes() if s.m == batch_size]
        engine_choice = {key: cublaslt.chosen(*key) for key in shapes}
        flush = torch.empty(cublaslt.FLUSH_BYTES // 4, dtype=torch.float32,
                            device="cuda").fill_(1.0)
        rows = []
        for device, shape in shapes:
            plan = engine_choice[(device, shape)].plan or cublaslt.LtPlan(shape)
            weight = torch.randn(shape.n, shape.k, dtype=shape.dtype, device=device)
            x = torch.empty_strided((shape.m, shape.k), (shape.ld_x, 1), dtype=shape.dtype,
                                    device=device).normal_()
            out = torch.empty_strided((shape.m, shape.n), (shape.ld_out, 1),
                                      dtype=shape.out_dtype, device=device).normal_()
            runs = [lambda: cublaslt._torch_mm(x, weight, out, shape.accumulate)]
            runs += [lambda i=i: plan.run(i, x, weight, out) for i in range(len(plan.candidates))]
            alone = alone_us(runs, flush)
            chain = cublaslt.chain_product_us(runs, x, out)
            del weight, x, out
            step = []
            for index in [TORCH, *range(len(plan.candidates))]:
                cublaslt.use(device, shape, cublaslt.Choice(None if index == TORCH else plan,
                                                            index, float("nan"), float("nan")))
                step.append(timer.step_ms())
            cublaslt.use(device, shape, engine_choice[(device, shape)])
            picks = {"alone": cublaslt.fastest(alone), "chain": cublaslt.fastest(chain),
                     "step": min(range(len(step)), key=step.__getitem__) - 1}
            rows.append({
                "model": model, "B": batch_size, "N": shape.n, "K": shape.k,
                "accumulate": shape.accumulate,
                "candidates": [{"index": i - 1,
                                "kernel": "torch" if i == 0 else plan.describe(i - 1),
                                "alone_us": alone[i], "chain_us": chain[i], "step_ms": step[i]}
                               for i in range(len(step))],
                "engine_pick": engine_choice[(device, shape)].index,
                "picks": picks,
                "pick_step_ms": {how: step[index + 1] for how, index in picks.items()},
            })
        return rows
    finally:
        timer.close()


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<20}{'B':>5}{'N x K':>13}  {'pick: alone':>14}{'chain':>14}{'step':>14}"
             "   (candidate: step ms)"]
    for r in rows:
        cells = "".join(f"{r['picks'][h]:>6}: {r['pick_step_ms'][h]:.3f}"
                        for h in ("alone", "chain", "step"))
        lines.append(f"{r['model']:<20}{r['B']:>5}{r['N']:>7} x {r['K']:<5}{cells}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """One panel per product shape: each candidate's step time against its time alone (open)
    and in a chain (filled), every time over the shape's fastest of its kind."""
    from bench.plots import _pyplot, _save

    plt = _pyplot()
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        c = r["candidates"]
        step = [x["step_ms"] / min(y["step_ms"] for y in c) for x in c]
        for how, color, face in (("alone", "C0", "none"), ("chain", "C1", "C1")):
            times = [x[f"{how}_us"] for x in c]
            ax.plot([t / min(times) for t in times], step, "o", color=color, mfc=face,
                    ls="none", label=how)
        ax.set(title=f"{r['model'].split(':')[-1]} B={r['B']} {r['N']}x{r['K']}",
               xlabel="time / fastest", ylabel="step / shortest step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--batch-sizes", type=_int_list, default=list(BATCH_SIZES),
                        help="decode batch sizes; past 64 rows the products are cuBLASLt's")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                        help="greedy steps per timed batch (the step time is their median)")
    parser.add_argument("--name", default="blas_choice", help="file name stem of the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.blas_choice needs a CUDA GPU")
    if args.new_tokens <= SKIPPED_STEPS + 1:
        raise SystemExit(f"--new-tokens must exceed {SKIPPED_STEPS + 1}")
    from engine.blas import DECODE_BLAS

    if DECODE_BLAS != "tuned":
        raise SystemExit(f"BINDECODE_DECODE_BLAS is {DECODE_BLAS!r}: the products are not chosen")
    rows = []
    for model in [m for m in args.models.split(",") if m]:
        for batch_size in args.batch_sizes:
            rows += measure(model, batch_size, args.new_tokens)
            torch.cuda.empty_cache()
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", {"config": vars(args) | {"out": str(args.out)},
                                                "rows": rows})
    plot(rows, args.out / f"{args.name}.png")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
