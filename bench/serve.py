"""Serving load test: requests against a running ``python -m engine.serve``.

Prompts are random token ids (lengths from ``--prompts``, default U[64, 512]); each request's
output length is drawn from ``--lengths`` and sent as the benchmark-only ``target_len`` field
with ``ignore_eos``, so dummy models (which emit random tokens) stop exactly there, while
``max_tokens`` stays a loose cap. The server must run with ``--allow-target-len``;
``--launch-server`` starts one with the engine flags given here and stops it afterwards.

Arrivals are Poisson at ``--rate`` requests/s, or all at once (``--rate inf``). Reported:
requests/s, output tokens/s, TTFT, TPOT and end-to-end latency p50/p90/p99, written as JSON
(``bench.common.write_json``) and a PNG of the latency distributions.

``--compare-offline`` then runs the same requests through ``engine.LLM.generate`` in this
process (after the launched server has stopped, so the GPU is free) and reports HTTP throughput
as a fraction of offline throughput; the comparison is meaningful for all-at-once arrivals.

Examples:
    python -m bench.serve --launch-server --model dummy:llama-3.2-1b --batch-size 64 --bins 4 \\
        --num-requests 1024 --rate inf --compare-offline
    python -m bench.serve --url http://127.0.0.1:8000 --num-requests 512 --rate 16 \\
        --lengths lognormal:200:1500:2048
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import RESULTS_DIR, write_json
from engine.serve import ENGINE_FLAGS, add_engine_args
from scheduler.workload import make_workload, parse_lengths

PROMPT_TOKEN_RANGE = 256  # ids 0..255: bytes in the dummy tokenizer, valid in every vocabulary


@dataclass
class BenchRequest:
    prompt: list[int]
    target_len: int
    arrival: float  # seconds after the start


@dataclass
class Result:
    ok: bool
    start: float
    first_token: float | None
    end: float
    completion_tokens: int
    target_len: int
    error: str | None = None


def build_requests(n: int, lengths: str, prompts: str, rate: float,
                   seed: int) -> tuple[list[BenchRequest], int]:
    """``n`` requests (``scheduler.workload`` lengths and arrivals, integer output lengths) and
    the max_tokens cap (the length distribution's upper end)."""
    workload = make_workload(n, parse_lengths(lengths), prompts=parse_lengths(prompts),
                             arrival_rate=None if math.isinf(rate) else rate, integer=True,
                             seed=seed)
    rng = random.Random(f"{seed}:prompt-ids")
    shape = zip(workload.prompt_lens, workload.output_lens, workload.arrival_times)
    requests = [BenchRequest([rng.randrange(PROMPT_TOKEN_RANGE) for _ in range(p)], int(o), a)
                for p, o, a in shape]
    return requests, workload.max_tokens


async def _one(client, url: str, model: str, request: BenchRequest, max_tokens: int,
               t0: float) -> Result:
    """One streamed request; TTFT is the first chunk with a choice, the token count comes from
    the final usage chunk."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "target_len": request.target_len, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(False, start - t0, None, time.perf_counter() - t0, 0,
                              request.target_len,
                              f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", "error event")
                    break
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"]:
                    first = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return Result(error is None, start - t0, None if first is None else first - t0, end - t0,
                  tokens, request.target_len, error)


async def run_load(url: str, model: str, requests: list[BenchRequest], max_tokens: int,
                   api_key: str | None, timeout_s: float) -> tuple[list[Result], float]:
    """Send every request at its arrival time; returns the results and the wall time."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s, connect=60.0)) as client:
        t0 = time.perf_counter()

        async def scheduled(request: BenchRequest) -> Result:
            await asyncio.sleep(max(0.0, request.arrival - (time.perf_counter() - t0)))
            return await _one(client, url, model, request, max_tokens, t0)

        results = await asyncio.gather(*(scheduled(r) for r in requests))
        return list(results), time.perf_counter() - t0


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)
    pick = lambda p: ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "mean": statistics.fmean(ordered)}


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.first_token - r.start for r in ok if r.first_token is not None]
    tpot = [(r.end - r.first_token) / (r.completion_tokens - 1) for r in ok
            if r.first_token is not None and r.completion_tokens > 1]
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "wrong_length": sum(r.completion_tokens != r.target_len for r in ok),
        "duration_s": wall_s, "requests_per_s": len(ok) / wall_s, "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s,
        "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.end - r.start for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def plot(results: list[Result], summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok and r.first_token is not None]
    series = {
        "TTFT (s)": [r.first_token - r.start for r in ok],
        "TPOT (ms)": [1e3 * (r.end - r.first_token) / (r.completion_tokens - 1) for r in ok
                      if r.completion_tokens > 1],
        "end-to-end latency (s)": [r.end - r.start for r in ok],
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(values)
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    ends = sorted((r.end, r.completion_tokens) for r in ok)
    if ends:
        width = max(1.0, ends[-1][0] / 50)
        buckets = [0.0] * (int(ends[-1][0] / width) + 1)
        for end, n in ends:
            buckets[int(end / width)] += n / width
        axes[3].step([i * width for i in range(len(buckets))], buckets, where="post")
    axes[3].set_xlabel("time (s)")
    axes[3].set_ylabel("output tokens/s (by finish time)")
    axes[3].grid(alpha=0.3)
    fig.suptitle(f"{title}: {summary['requests_per_s']:.2f} req/s, "
                 f"{summary['output_tokens_per_s']:.0f} tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- server launch and offline run

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flag_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of this command line, to pass on to ``python -m engine.serve``."""
    argv = ["--model", args.model] if args.model else []
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def launch_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "engine.serve", "--port", str(port), "--allow-target-len",
               "--log-level", "warning", *engine_flag_argv(args)]
    print("launching:", " ".join(command), flush=True)
    return subprocess.Popen(command)


def wait_healthy(url: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not healthy within {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_offline(args: argparse.Namespace, requests: list[BenchRequest], max_tokens: int) -> dict:
    """The same requests through ``engine.LLM.generate``, all submitted at once."""
    from engine.llm import LLM
    from engine.request import SamplingParams
    from engine.serve import engine_options_from_args

    options = asdict(engine_options_from_args(args))
    llm = LLM(options.pop("model"), **options)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [r.prompt for r in requests]
    targets = [r.target_len for r in requests]
    if args.warmup:  # as for the HTTP run
        llm.generate(prompts[:args.warmup], params, use_tqdm=False,
                     target_lens=[min(t, 8) for t in targets[:args.warmup]])
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, target_lens=targets)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    close = getattr(llm, "close", None)
    if callable(close):
        close()
    return {"duration_s": wall, "requests_per_s": len(outputs) / wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall,
            "wrong_length": sum(len(o.token_ids) != t for o, t in zip(outputs, targets))}


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("load")
    g.add_argument("--url", default="http://127.0.0.1:8000",
                   help="server to load (without --launch-server)")
    g.add_argument("--api-key", default=os.environ.get("BINDECODE_API_KEY"))
    g.add_argument("--served-model-name", default=None,
                   help="`model` field (default: from /v1/models)")
    g.add_argument("--num-requests", type=int, default=256)
    g.add_argument("--rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s; inf = all at once (default)")
    g.add_argument("--lengths", default="uniform:1:1024",
                   help="output lengths (scheduler.workload spec), e.g. uniform:1:1024 or "
                        "lognormal:200:1500:2048")
    g.add_argument("--prompts", default="uniform:64:512", help="prompt lengths in tokens")
    g.add_argument("--workload-seed", type=int, default=0,
                   help="seed of lengths, prompts and arrivals")
    g.add_argument("--request-timeout", type=float, default=3600.0)
    g.add_argument("--warmup", type=int, default=8, help="untimed short requests sent first")
    g.add_argument("--out", default=None,
                   help="output path without extension "
                        "(default: bench/results/serve_<model>_<rate>_<lengths>)")
    g.add_argument("--launch-server", action="store_true",
                   help="start `python -m engine.serve` with the engine flags below, stop it after")
    g.add_argument("--startup-timeout", type=float, default=900.0)
    g.add_argument("--compare-offline", action="store_true",
                   help="then run the same requests through engine.LLM.generate in-process")
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    requests, max_tokens = build_requests(args.num_requests, args.lengths, args.prompts, args.rate,
                                          args.workload_seed)
    server, url = None, args.url.rstrip("/")
    if args.launch_server:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = launch_server(args, port)
    try:
        wait_healthy(url, server, args.startup_timeout)
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        card = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]
        model = args.served_model_name or card["id"]
        cap = min(max_tokens, card["max_model_len"] - max(len(r.prompt) for r in requests))
        if cap < max(r.target_len for r in requests):
            raise SystemExit(f"max_model_len {card['max_model_len']} is too small for this "
                             f"workload")
        load = lambda reqs: asyncio.run(run_load(url, model, reqs, cap, args.api_key,
                                                 args.request_timeout))
        if args.warmup:  # the first batches pay for graph capture and allocation
            load([BenchRequest(r.prompt, min(r.target_len, 8), 0.0)
                  for r in requests[:args.warmup]])
        results, wall = load(requests)
    finally:
        exit_code = stop_server(server) if server is not None else None
    summary = summarize(results, wall)
    payload = {"config": {"url": url, "model": model, "num_requests": args.num_requests,
                          "rate": args.rate, "lengths": args.lengths, "prompts": args.prompts,
                          "max_tokens": cap, "seed": args.workload_seed,
                          "engine_flags": engine_flag_argv(args) if args.launch_server else None},
               "http": summary, "server_exit_code": exit_code}
    if args.compare_offline:
        offline = run_offline(args, requests, cap)
        payload["offline"] = offline
        payload["http_over_offline_tokens_per_s"] = (summary["output_tokens_per_s"]
                                                     / offline["output_tokens_per_s"])
    rate = "burst" if math.isinf(args.rate) else f"rate{args.rate:g}"
    lengths = args.lengths.replace(":", "-")
    name = f"serve_{model.replace(':', '-').replace('/', '_')}_{rate}_{lengths}"
    stem = args.out or str(RESULTS_DIR / name)
    json_path = write_json(Path(stem + ".json"), payload)
    plot(results, summary, f"{model}, {rate}, {args.lengths}", Path(stem + ".png"))
    print(json.dumps({k: payload[k] for k in payload if k != "config"}, indent=1))
    print(f"wrote {json_path} and {stem}.png")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
