"""Shared measurement plumbing for the GPU benchmarks: ceilings, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def time_ms(fn, repeats: int = 3, graph: bool = True) -> float:
    """Median over ``repeats`` of ``triton.testing.do_bench``'s median (it flushes the L2 before
    every call).

    With ``graph`` (the default) ``fn`` is captured once into a CUDA graph and its replay is
    timed, so the GPU time of a kernel is measured rather than the Python cost of launching it
    (a Triton launch costs tens of microseconds on the host; kernels here last 5 to 500). The
    engine runs its decode step as a CUDA graph too. Functions that cannot be captured are timed
    eagerly, with a note on stderr.
    """
    from triton.testing import do_bench

    if graph:
        try:
            fn = cuda_graph(fn)
        except Exception as exc:  # e.g. an op that syncs with the host
            print(f"time_ms: timing eagerly, capture failed: {type(exc).__name__}: {exc}"[:200],
                  file=sys.stderr)
    return statistics.median(do_bench(fn, return_mode="median") for _ in range(repeats))


def cuda_graph(fn):
    """Capture ``fn()`` (after two warm-up calls on a side stream) and return the graph's replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    # Eager: a captured copy becomes a graph memcpy node, measured slower than the copy kernel.
    ms = time_ms(lambda: dst.copy_(src), graph=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 matrix-product peak on random data."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: a @ b, graph=False)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def run_metadata() -> dict:
    """GPU, commit, date and command of this run (the commit comes from BINDECODE_COMMIT when
    the checkout travelled without its .git)."""
    import torch

    commit = os.environ.get("BINDECODE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "torch": torch.__version__,
    }


def _command_line() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([program, *sys.argv[1:]])


def replotted(args, plot) -> bool:
    """With ``--replot FILE`` among ``args``: draw FILE's PNG beside it with ``plot(payload,
    png_path)`` and return True (the benchmark then exits without measuring)."""
    if args.replot is None:
        return False
    plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
    return True


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` with ``run_metadata()`` under key ``meta``; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": run_metadata(), **payload}, indent=1))
    return path
