"""``python -m engine.serve``: the OpenAI-compatible server.

With no arguments it serves ``dummy:llama-3.2-1b`` on a GPU, or the CPU-sized ``dummy:tiny``
without one, on http://127.0.0.1:8000. The engine loop runs in its own process; this process
tokenises, detokenises and streams (see ``engine.api_server`` and ``engine.engine_process``).

Examples:
    python -m engine.serve --model dummy:llama-3.2-1b --batch-size 64 --bins 4 --mode static
    python -m engine.serve --model /models/Llama-3.2-1B-Instruct --api-key "$KEY" --port 8080

SIGTERM or Ctrl-C: new requests get 503, in-flight ones finish (or are cut off with an error
after most of ``--shutdown-timeout``), the engine process stops, and the server exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable

DEFAULT_GPU_MODEL = "dummy:llama-3.2-1b"
DEFAULT_CPU_MODEL = "dummy:tiny"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that map onto ``EngineOptions`` fields of the same name (shared with
    ``bench.serve``). Flags left unset keep EngineOptions' defaults; it validates them."""
    g = parser.add_argument_group("engine (see engine.options.EngineOptions)")
    g.add_argument("--model", default=None,
                   help=f"local Hugging Face folder or dummy:NAME (default: {DEFAULT_GPU_MODEL} "
                        f"with a GPU, {DEFAULT_CPU_MODEL} without)")
    g.add_argument("--dtype", default=None, help="auto, bfloat16, float16 or float32")
    g.add_argument("--kv-dtype", default=None, help="KV cache type; auto = --dtype")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--backend", default=None,
                   help="kernels: auto (triton on CUDA, reference on CPU), triton or reference")
    g.add_argument("--seed", type=int, default=None,
                   help="dummy weights; seeds of unseeded requests")
    g.add_argument("--batch-size", type=int, default=None, help="B: rows of every slab")
    g.add_argument("--bins", type=int, default=None, help="k: number of output-length bins")
    g.add_argument("--bin-edges", type=_number_list, default=None,
                   help="inner bin edges in tokens, comma-separated (overrides --bins)")
    g.add_argument("--mode", default=None, help="static, bin-continuous or continuous")
    g.add_argument("--predictor", default=None,
                   help="hint, max-tokens, online[:Q], oracle, bin-error:P, lognormal:SIGMA")
    g.add_argument("--batch-order", default=None, help="formation or shortest")
    g.add_argument("--max-wait-ms", type=float, default=None,
                   help="a partial batch forms when its oldest request waited this long")
    g.add_argument("--starvation-wait-ms", type=float, default=None)
    g.add_argument("--max-queue", type=int, default=None,
                   help="waiting requests beyond this are refused with 429")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    g.add_argument("--max-output-len", type=int, default=None,
                   help="largest max_tokens; the bins span [1, this]")
    g.add_argument("--min-capacity", type=int, default=None, help="smallest slab capacity bucket")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV arena size")
    g.add_argument("--kv-memory-fraction", type=float, default=None,
                   help="KV arena as a fraction of free GPU memory (without --kv-cache-gb)")
    g.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    g.add_argument("--overflow", default=None, help="recompute")
    g.add_argument("--refill-min-free", type=int, default=None)
    g.add_argument("--max-prefill-tokens", type=int, default=None)
    g.add_argument("--log-batches", default=None, metavar="FILE",
                   help="append one JSON record per batch to FILE")


ENGINE_FLAGS = ("dtype", "kv_dtype", "device", "backend", "seed", "batch_size", "bins", "bin_edges",
                "mode", "predictor", "batch_order", "max_wait_ms", "starvation_wait_ms",
                "max_queue", "max_model_len", "max_output_len", "min_capacity", "kv_cache_gb",
                "kv_memory_fraction", "enforce_eager", "overflow", "refill_min_free",
                "max_prefill_tokens", "log_batches")


def _number_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0-65535, got {text!r}")
    return port


def default_model() -> str:
    import torch

    return DEFAULT_GPU_MODEL if torch.cuda.is_available() else DEFAULT_CPU_MODEL


def engine_options_from_args(args: argparse.Namespace):
    """``EngineOptions`` with every flag the user set; the rest keep their defaults."""
    from engine.options import EngineOptions

    given = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    return EngineOptions(model=args.model or default_model(), **given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    g.add_argument("--port", type=_port, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: --model)")
    g.add_argument("--api-key", default=os.environ.get("BINDECODE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $BINDECODE_API_KEY)")
    g.add_argument("--max-body-bytes", type=int, default=None,
                   help="refuse larger request bodies with 413 (default 8 MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to finish in-flight requests after SIGTERM/SIGINT")
    g.add_argument("--allow-target-len", action="store_true",
                   help="honour the benchmark-only `target_len` field of /v1/completions")
    g.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return parser


def main(argv: list[str] | None = None,
         core_factory: Callable[[Any], Any] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code. ``core_factory`` (a
    picklable top-level function ``options -> EngineCore``) replaces the engine core, for tests."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("engine.serve")

    # Until uvicorn takes over, a signal only asks the start-up to stop. These handlers are
    # also what uvicorn restores and re-raises into after a graceful shutdown, so the process
    # exits 0 instead of dying of the re-raised signal.
    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))

    from engine.engine_process import EngineClient

    try:
        options = engine_options_from_args(args)
    except (TypeError, ValueError) as e:
        log.error("bad engine options: %s", e)
        return 2
    # Start the engine process first: it loads torch and the model while this process imports
    # the web stack and the tokenizer.
    client = EngineClient(options) if core_factory is None else EngineClient(options, core_factory)
    log.info("starting the engine process for %s", options.model)
    client.start()
    try:
        import uvicorn

        from engine.api_server import DEFAULT_MAX_BODY_BYTES, ServerConfig, ServerState, build_app
        from engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(options.model)
        info = client.wait_ready(should_stop=lambda: bool(stop_requested))
    except Exception as e:  # noqa: BLE001 - start-up failures end the process with a message
        client.stop()
        if stop_requested:
            return 0
        log.error("%s", e)
        return 1
    log.info("engine ready: %s on %s (%s backend), max_model_len %d", info.model, info.device,
             info.backend, info.max_model_len)

    config = ServerConfig(served_model_name=args.served_model_name or options.model,
                          api_key=args.api_key or None,
                          max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                          allow_target_len=args.allow_target_len,
                          shutdown_timeout=args.shutdown_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this address can "
                    "use the server", args.host)
    state = ServerState(config, client, info, tokenizer)
    if stop_requested:
        client.stop()
        return 0
    try:
        _draining_server(uvicorn, build_app(state), state, args).run()
    finally:
        client.stop(timeout=1.0)
    return 0


def _draining_server(uvicorn, app, state, args: argparse.Namespace):
    """A uvicorn server whose SIGTERM/SIGINT first starts ``state.begin_drain`` (503 for new
    requests, in-flight ones cut off after 70% of the timeout); uvicorn then waits for open
    connections (up to 85%) and runs the app's shutdown, which stops the engine."""
    import asyncio

    class DrainingServer(uvicorn.Server):
        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            # A signal handler: hand the drain to the event loop.
            self.loop.call_soon_threadsafe(state.begin_drain)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=0.85 * args.shutdown_timeout)
    return DrainingServer(config)


if __name__ == "__main__":
    sys.exit(main())
