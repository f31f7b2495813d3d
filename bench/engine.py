"""End-to-end decode throughput against the roofline, with transformers' ``generate`` beside it.

DESIGN.md "Canonical benchmarks", End-to-end: ``dummy:llama-3.2-1b`` and ``dummy:llama-3.1-8b``,
bf16, B in {1, 2, 8, 16, 64, 128, 256}, prompt 512, 256 generated tokens, greedy. Per model and B:

- decode-step time: median over the run's decode steps, timed with CUDA events around each
  of the engine's graph replays (``BatchRunner.decode``), prefill excluded;
- tokens/s: the decode phase (tokens the decode steps produced over the wall time from the
  prefill's first tokens to the last token) and the whole generate (B x 256 over the wall time
  of every engine step, prefill included);
- roofline fraction: ``bench.roofline.decode_step_roofline_s`` averaged over the run's steps
  (step j holds prompt + j tokens per row) over the measured median step, with the copy
  bandwidth and the matmul peak measured in the same run.

Baseline, same run: transformers' ``generate`` with ``cache_implementation="static"`` on a
``LlamaForCausalLM`` of the same shape with random weights, at B=128, eager
(``disable_compile``) and, with ``--hf-compile``, with transformers' automatic compilation.

    python -m bench.engine [--out DIR] [--models dummy:llama-3.2-1b,dummy:llama-3.1-8b]
        [--batch-sizes 1,2,8,16,64,128,256] [--hf-compile] [--smoke]

``--smoke`` runs the same code on ``dummy:tiny`` on the CPU with tiny sizes (the CI test).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, write_json

SEED = 0


@dataclass
class EngineBenchConfig:
    """What ``run`` measures. ``hf_batch_size`` 0 skips the transformers baseline."""

    models: list[str] = field(default_factory=lambda: ["dummy:llama-3.2-1b", "dummy:llama-3.1-8b"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 8, 16, 64, 128, 256])
    prompt_len: int = 512
    new_tokens: int = 256
    hf_batch_size: int = 128
    hf_compile: bool = False
    device: str = "cuda"
    dtype: str = "bfloat16"
    min_capacity: int = 256


SMOKE_CONFIG = EngineBenchConfig(models=["dummy:tiny"], batch_sizes=[1, 2], prompt_len=12,
                                 new_tokens=6, hf_batch_size=2, device="cpu", dtype="float32",
                                 min_capacity=8)


# ---- shared helpers (bench.e2e uses them too) --------------------------------------------


def random_prompts(n: int, length: int, vocab_size: int, seed: int = SEED) -> list[list[int]]:
    """n prompts of ``length`` token ids drawn uniformly from the vocabulary (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g).tolist()


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_device_memory() -> None:
    """Return what dropped objects held (weights, KV arena, graph pools) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Ceilings:
    """Device ceilings measured in this run (``bench.common``)."""

    copy_gbps: float
    matmul_tflops: float


def measure_ceilings(device: str) -> Ceilings | None:
    """Copy bandwidth and bf16 matmul peak on CUDA; None elsewhere (no roofline on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    from bench.common import copy_bandwidth_gbps, matmul_tflops

    ceilings = Ceilings(copy_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops())
    free_device_memory()
    return ceilings


class DecodeStepTimer:
    """Times every ``BatchRunner.decode`` call of one runner, on the device.

    Installed as the runner's ``decode`` (an instance attribute shadowing the method), so the
    engine loop runs unchanged. On CUDA each call is bracketed by timing events: their interval
    is the graph replay's device time (the loop keeps a step queued, so the device does not wait
    for the host between the events). On the CPU, wall time.
    """

    def __init__(self, runner):
        self._runner = runner
        self._decode = runner.decode
        self._cuda = runner.device.type == "cuda"
        self._marks: list = []
        runner.decode = self

    def __call__(self):
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            pending = self._decode()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            start = time.perf_counter()
            pending = self._decode()
            end = time.perf_counter()
        self._marks.append((start, end))
        return pending

    def seconds(self) -> list[float]:
        """Per-step seconds, in launch order (waits for the last step to finish)."""
        if self._cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self._marks]
        return [e - s for s, e in self._marks]

    def remove(self) -> None:
        """Give the runner its own ``decode`` back (and drop the references to it)."""
        del self._runner.decode
        self._runner = self._decode = None


def hf_llama_config(model_config):
    """A transformers ``LlamaConfig`` with the shape of an ``engine.model_config.ModelConfig``."""
    from transformers import LlamaConfig

    c = model_config
    if c.architecture != "LlamaForCausalLM" or c.qkv_bias or c.qk_norm:
        raise ValueError(f"the transformers baseline covers Llama shapes; {c.name} is "
                         f"{c.architecture} (qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm})")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {**c.rope_scaling, "rope_theta": c.rope_theta}
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids), rope_parameters=rope)


def build_hf_llama(model: str, dtype: torch.dtype, device: str, seed: int = SEED):
    """``LlamaForCausalLM`` with the shape of ``dummy:NAME`` and random weights, on ``device``."""
    from transformers import LlamaForCausalLM

    from engine.dummy import dummy_config

    config = hf_llama_config(dummy_config(model))
    torch.manual_seed(seed)
    with torch.device(device):
        hf_model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return hf_model.eval()


@torch.no_grad()
def hf_generate_seconds(hf_model, prompts: list[list[int]], new_tokens: int,
                        compile: bool = False) -> float:
    """Wall seconds of one static-cache greedy ``generate`` of exactly ``new_tokens`` per row.

    prompts: token-id lists, left-padded here to the longest (attention mask 0 on the padding).
    ``min_new_tokens = max_new_tokens`` keeps an EOS from ending a row early. ``compile=False``
    sets ``disable_compile`` (transformers compiles static-cache decoding on CUDA by default).
    """
    device = hf_model.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    eos = hf_model.config.eos_token_id
    synchronize(device)
    start = time.perf_counter()
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False,
                            cache_implementation="static", pad_token_id=0, eos_token_id=eos,
                            disable_compile=not compile)
    synchronize(device)
    seconds = time.perf_counter() - start
    if out.shape != (len(prompts), width + new_tokens):
        raise RuntimeError(f"transformers generate returned shape {tuple(out.shape)}, expected "
                           f"{(len(prompts), width + new_tokens)}")
    return seconds


# ---- our engine ----------------------------------------------------------------------------


def _engine_options(model: str, batch_size: int, config: EngineBenchConfig):
    from engine.options import EngineOptions

    return EngineOptions(model=model, dtype=config.dtype, device=config.device, seed=SEED,
                         batch_size=batch_size, bins=1, mode="static", predictor="max-tokens",
                         max_model_len=config.prompt_len + config.new_tokens,
                         min_capacity=config.min_capacity)


def _greedy(max_tokens: int):
    from engine.request import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _run_to_completion(core, requests) -> tuple[float, float, int]:
    """Add ``requests``, step until done. Returns (seconds of all steps, seconds from the first
    tokens (the prefill's) to the end, tokens generated)."""
    for request in requests:
        core.add_request(request)
    start = time.perf_counter()
    first_tokens_at = None
    tokens = 0
    while core.has_unfinished():
        updates = core.step(time.monotonic(), flush=True)
        for u in updates:
            if u.finish_reason == "error":
                raise RuntimeError(f"request {u.request_id} failed: {u.error}")
            tokens += len(u.new_token_ids)
        if first_tokens_at is None and tokens:
            first_tokens_at = time.perf_counter()
    end = time.perf_counter()
    return end - start, end - first_tokens_at, tokens


def mean_roofline_s(model_config, batch_size: int, prompt_len: int, n_steps: int,
                    ceilings: Ceilings) -> float:
    """Roofline seconds averaged over decode steps 1..n_steps; step j holds prompt + j tokens
    in each of the B rows."""
    from bench.roofline import decode_step_roofline_s

    total = sum(decode_step_roofline_s(model_config, batch_size, [prompt_len + j] * batch_size,
                                       ceilings.copy_gbps * 1e9, ceilings.matmul_tflops * 1e12)
                for j in range(1, n_steps + 1))
    return total / n_steps


def measure_ours(model: str, batch_size: int, config: EngineBenchConfig,
                 ceilings: Ceilings | None) -> dict:
    """One B of one model through ``EngineCore``: a warm-up request (compiles kernels, captures
    the decode graph of this slab shape), then the timed batch."""
    from engine.engine_core import EngineCore
    from engine.request import EngineRequest

    core = EngineCore(_engine_options(model, batch_size, config))
    try:
        cfg = core.model_config
        P, N = config.prompt_len, config.new_tokens
        # One request with the same prompt length and max_tokens gets the same slab (B, C).
        warm = random_prompts(1, P, cfg.vocab_size, seed=SEED + 1)[0]
        _run_to_completion(core, [EngineRequest("warm-up", warm, _greedy(N), target_len=2)])
        timer = DecodeStepTimer(core.runner)
        prompts = random_prompts(batch_size, P, cfg.vocab_size)
        requests = [EngineRequest(f"b{batch_size}-{i}", p, _greedy(N))
                    for i, p in enumerate(prompts)]
        generate_s, decode_wall_s, tokens = _run_to_completion(core, requests)
        steps = timer.seconds()
        timer.remove()
        if tokens != batch_size * N:
            raise RuntimeError(f"{model} B={batch_size}: generated {tokens} tokens, expected "
                               f"{batch_size * N}")
        step_s = statistics.median(steps)
        row = {
            "model": model, "B": batch_size, "prompt_len": P, "new_tokens": N,
            "decode_steps": len(steps), "step_ms_median": step_s * 1e3,
            "step_ms_p10": _quantile(steps, 0.1) * 1e3, "step_ms_p90": _quantile(steps, 0.9) * 1e3,
            # The prefill made each row's first token; the decode steps made the rest.
            "decode_tok_s": batch_size * (N - 1) / decode_wall_s,
            "generate_tok_s": batch_size * N / generate_s,
            "generate_s": generate_s, "decode_wall_s": decode_wall_s,
            "graph_capture_s": core.stats()["graph_capture_s"],
        }
        if ceilings is not None:
            roof = mean_roofline_s(cfg, batch_size, P, len(steps), ceilings)
            row.update(roofline_ms=roof * 1e3, roofline_fraction=roof / step_s)
        return row
    finally:
        core.close()
        del core
        free_device_memory()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_transformers(model: str, config: EngineBenchConfig) -> list[dict]:
    """transformers' static-cache generate at ``hf_batch_size``: eager, and compiled if asked."""
    B, P, N = config.hf_batch_size, config.prompt_len, config.new_tokens
    hf_model = build_hf_llama(model, getattr(torch, config.dtype), config.device)
    try:
        prompts = random_prompts(B, P, hf_model.config.vocab_size)
        rows = []
        for compiled in ([False, True] if config.hf_compile else [False]):
            # Warm-up: the eager path only needs its kernels loaded; the compiled one compiles for
            # the exact cache shape, so it warms up on the full run.
            hf_generate_seconds(hf_model, prompts, N if compiled else 2, compile=compiled)
            prefill_s = hf_generate_seconds(hf_model, prompts, 1, compile=False)
            seconds = hf_generate_seconds(hf_model, prompts, N, compile=compiled)
            rows.append({"model": model, "B": B, "prompt_len": P, "new_tokens": N,
                         "variant": "compiled" if compiled else "eager",
                         "generate_s": seconds, "generate_tok_s": B * N / seconds,
                         "decode_tok_s": B * (N - 1) / max(seconds - prefill_s, 1e-9),
                         "prefill_s": prefill_s})
        return rows
    finally:
        del hf_model
        free_device_memory()


def run(config: EngineBenchConfig, progress: bool = True) -> dict:
    """Measure every model and batch size; returns the JSON payload (without ``meta``)."""
    from tqdm.auto import tqdm

    ceilings = measure_ceilings(config.device)
    if ceilings is not None:
        print(f"copy bandwidth {ceilings.copy_gbps:.0f} GB/s, bf16 matmul "
              f"{ceilings.matmul_tflops:.0f} TFLOP/s")
    ours, baseline = [], []
    jobs = [(m, B) for m in config.models for B in config.batch_sizes]
    bar = tqdm(total=len(jobs) + (len(config.models) if config.hf_batch_size else 0),
               desc="engine bench", disable=not progress)
    for model in config.models:
        for B in config.batch_sizes:
            bar.set_postfix_str(f"{model} B={B}")
            ours.append(measure_ours(model, B, config, ceilings))
            bar.update(1)
        if config.hf_batch_size:
            bar.set_postfix_str(f"{model} transformers B={config.hf_batch_size}")
            baseline += measure_transformers(model, config)
            bar.update(1)
    bar.close()
    for row in baseline:
        match = [r for r in ours if r["model"] == row["model"] and r["B"] == row["B"]]
        if match:
            row["ours_over_hf_generate"] = match[0]["generate_tok_s"] / row["generate_tok_s"]
            row["ours_over_hf_decode"] = match[0]["decode_tok_s"] / row["decode_tok_s"]
    from engine.blas import DECODE_BLAS
    from kernels.cublaslt import choices_made

    return {"config": asdict(config),
            "ceilings": asdict(ceilings) if ceilings is not None else None,
            "ours": ours, "transformers": baseline,
            "decode_blas": DECODE_BLAS, "product_choices": choices_made()}


def format_table(payload: dict) -> str:
    lines = [f"{'model':<22}{'B':>5}{'step ms':>9}{'roof ms':>9}{'roof %':>8}{'decode tok/s':>14}"
             f"{'generate tok/s':>16}"]
    for r in payload["ours"]:
        roof = (f"{r['roofline_ms']:>9.3f}{100 * r['roofline_fraction']:>7.1f}%"
                if "roofline_ms" in r else f"{'-':>9}{'-':>8}")
        lines.append(f"{r['model']:<22}{r['B']:>5}{r['step_ms_median']:>9.3f}{roof}"
                     f"{r['decode_tok_s']:>14.0f}{r['generate_tok_s']:>16.0f}")
    for r in payload["transformers"]:
        ratio = (f"  ours/hf: generate {r['ours_over_hf_generate']:.2f}x, decode "
                 f"{r['ours_over_hf_decode']:.2f}x" if "ours_over_hf_generate" in r else "")
        lines.append(f"{r['model']:<22}{r['B']:>5}  transformers {r['variant']:<8}"
                     f"{r['decode_tok_s']:>14.0f}{r['generate_tok_s']:>16.0f}{ratio}")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    parser.add_argument("--models", default=",".join(EngineBenchConfig().models),
                        help="comma-separated dummy:NAME models")
    parser.add_argument("--batch-sizes", type=_int_list, default=EngineBenchConfig().batch_sizes)
    parser.add_argument("--hf-batch-size", type=int, default=128,
                        help="B of the transformers baseline (0: skip it)")
    parser.add_argument("--hf-compile", action="store_true",
                        help="also time transformers with its automatic torch.compile (slow to "
                             "compile)")
    parser.add_argument("--smoke", action="store_true", help="dummy:tiny on the CPU, tiny sizes")
    args = parser.parse_args(argv)
    if args.smoke:
        config = SMOKE_CONFIG
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.engine needs a CUDA GPU (or --smoke for the CPU check)")
        config = EngineBenchConfig(models=[m for m in args.models.split(",") if m],
                                   batch_sizes=args.batch_sizes, hf_batch_size=args.hf_batch_size,
                                   hf_compile=args.hf_compile)
    payload = run(config)
    print(format_table(payload))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "engine.json", payload)
    from bench.plots import plot_engine

    plot_engine(payload, args.out / "engine.png")
    print(f"wrote {args.out / 'engine.json'} and {args.out / 'engine.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
