"""Whether cuBLASLt's decode-step kernels wait for the previous grid before they read.

On Hopper a programmatic dependent launch is scheduled while the kernel before it still runs,
and must itself wait on the device (``griddepcontrol.wait``) before it reads that kernel's
output. Our kernels do both. cuBLASLt's API has no such launch, so past 64 rows, where the
decode step's products are cuBLASLt's, each product starts only after the kernel before it has
finished. A captured CUDA graph would allow more: any edge between two kernel nodes can be made
programmatic after capture. That is only correct if the product's kernel waits.

This checks it, for every decode-layer product of the given models and row counts as the engine
runs it (``kernels.cublaslt.mm`` under ``engine.blas.decode_blas``). Each graph holds two
kernels: a producer of one program that lets its dependents launch at once, spins for
``--spin-us`` and only then writes the product's input x (NaN until then), and the product.
Each graph is replayed ``--replays`` times with the captured (ordinary) edge and as many with
that edge made programmatic; a replay is wrong if the output is not finite or is off the
reference. A product that waits is never wrong; one that does not reads the NaN. Where the
node after the producer is not a kernel (PyTorch's own call can start with a memset), there is
no edge to change and the row says so.
Two controls show the harness tells them apart: one copy kernel that reads x at once and the
same kernel waiting for the previous grid first.

    python -m bench.blas_dependent_launch [--models dummy:llama-3.2-1b,...] [--rows 96,128,256]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench.common import RESULTS_DIR, write_json

MODELS = ("dummy:llama-3.2-1b", "dummy:llama-3.1-8b")
ROWS = (96, 128, 256)
SPIN_US = 30
REPLAYS = 5
MAX_REL_ERR = 2e-2  # bf16 products against an fp32 reference

# cuda.h: CUgraphNodeType, CUgraphDependencyType, CUgraphKernelNodePort.
_NODE_KERNEL = 0
_DEPENDENCY_PROGRAMMATIC = 1
_PORT_PROGRAMMATIC = 1


class _EdgeData(ctypes.Structure):  # CUgraphEdgeData
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte),
                ("type", ctypes.c_ubyte), ("reserved", ctypes.c_ubyte * 5)]


class _KernelNodeParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p), ("grid", ctypes.c_uint * 3),
                ("block", ctypes.c_uint * 3), ("shared_mem_bytes", ctypes.c_uint),
                ("kernel_params", ctypes.c_void_p), ("extra", ctypes.c_void_p),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _call(name: str, *args) -> None:
    status = getattr(_driver(), name)(*args)
    if status != 0:
        raise RuntimeError(f"CUDA driver: {name} returned {status}")


def _kernel_name(node: int) -> str | None:
    """The kernel a graph node runs, or None for any other node (CUDA 12.3+)."""
    kind = ctypes.c_int()
    _call("cuGraphNodeGetType", ctypes.c_void_p(node), ctypes.byref(kind))
    if kind.value != _NODE_KERNEL:
        return None
    params = _KernelNodeParams()
    _call("cuGraphKernelNodeGetParams_v2", ctypes.c_void_p(node), ctypes.byref(params))
    name = ctypes.c_char_p()
    if params.func:
        _call("cuFuncGetName", ctypes.byref(name), ctypes.c_void_p(params.func))
    else:
        _call("cuKernelGetName", ctypes.byref(name), ctypes.c_void_p(params.kern))
    return name.value.decode()


def _edges(graph: int) -> list[tuple[int, int, _EdgeData]]:
    """(from node, to node, edge data) for every edge of a CUgraph."""
    count = ctypes.c_size_t()
    _call("cuGraphGetEdges_v2", ctypes.c_void_p(graph), None, None, None, ctypes.byref(count))
    n = count.value
    sources, targets, data = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (_EdgeData * n)()
    _call("cuGraphGetEdges_v2", ctypes.c_void_p(graph), sources, targets, data,
          ctypes.byref(count))
    return [(sources[i], targets[i], data[i]) for i in range(count.value)]


def _make_programmatic(graph: int, source: int, target: int, data: _EdgeData) -> None:
    src, dst = ctypes.c_void_p(source), ctypes.c_void_p(target)
    _call("cuGraphRemoveDependencies_v2", ctypes.c_void_p(graph), ctypes.byref(src),
          ctypes.byref(dst), ctypes.byref(data), ctypes.c_size_t(1))
    programmatic = _EdgeData(from_port=_PORT_PROGRAMMATIC, type=_DEPENDENCY_PROGRAMMATIC)
    _call("cuGraphAddDependencies_v2", ctypes.c_void_p(graph), ctypes.byref(src),
          ctypes.byref(dst), ctypes.byref(programmatic), ctypes.c_size_t(1))


@triton.jit
def _globaltimer():
    """The GPU's nanosecond clock (int64)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _late_copy_kernel(src_ptr, dst_ptr, n, spin_ns, BLOCK: tl.constexpr):
    """dst[:n] = src[:n] (contiguous, one 16-bit dtype) after ``spin_ns`` of busy waiting;
    one program, which lets its dependents launch first thing."""
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()
    start = _globaltimer()
    now = start
    while now - start < spin_ns:
        now = _globaltimer()
    for first in range(0, n, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def late_copy(src: torch.Tensor, dst: torch.Tensor, spin_us: float) -> None:
    """``dst.copy_(src)``, written only after ``spin_us`` µs (one program: the rest of the GPU
    is free for a dependent kernel that starts early)."""
    _late_copy_kernel[(1,)](src, dst, src.numel(), int(spin_us * 1e3), BLOCK=4096, num_warps=8)


def layer_products(model: str) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, accumulates into the residual) of each decode-layer product of ``model``."""
    from engine.dummy import dummy_config

    c = dummy_config(model)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return [("qkv", q + 2 * kv, c.hidden_size, False), ("output", c.hidden_size, q, True),
            ("gate_up", 2 * c.intermediate_size, c.hidden_size, False),
            ("down", c.hidden_size, c.intermediate_size, True)]


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, WAIT: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:n] = src[:n] (contiguous, one 16-bit dtype), waiting for the previous grid first
    only with WAIT: the controls' consumer."""
    if WAIT:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def copy_consumer(wait: bool):
    """A control consumer: out = x, from a kernel that waits for the previous grid or not."""
    def consumer(x, weight, out):
        _copy_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), WAIT=wait, BLOCK=1024)
    return consumer


def product_consumer(accumulate: bool):
    """The engine's decode product: out (+)= x @ weight.T through ``kernels.cublaslt.mm``."""
    from kernels import cublaslt

    def consumer(x, weight, out):
        cublaslt.mm(x, weight, out, accumulate=accumulate)
    return consumer


def check(consumer, m: int, n: int, k: int, accumulate: bool | None, spin_us: float,
          replays: int) -> dict:
    """Capture [late copy of x [m, k], consumer(x, weight [n, k], out [m, n])] and count the
    wrong replays with the captured edge and with it made programmatic. ``out`` must then hold
    out0 + x @ weight.T (accumulate), x @ weight.T (not accumulate) or x (None: a copy)."""
    device = torch.device("cuda")
    source = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
    base = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    x, out = torch.empty_like(source), torch.empty_like(base)
    if accumulate is None:
        reference = source.float()
    else:
        reference = (base.float() if accumulate else 0) + source.float() @ weight.float().t()

    def step():
        late_copy(source, x, spin_us)
        consumer(x, weight, out)

    x.copy_(source)
    step()  # compiles; cuBLASLt's candidates are timed here, outside the capture
    torch.cuda.synchronize()
    result = {}
    for edge in ("captured", "programmatic"):
        graph = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(graph):
            step()
        handle = graph.raw_cuda_graph()
        (producer, target, data), = [e for e in _edges(handle)
                                     if _kernel_name(e[0]) == "_late_copy_kernel"]
        result["kernel"] = _kernel_name(target)
        if result["kernel"] is None:  # e.g. a memset first: no kernel-to-kernel edge to change
            return {"kernel": None, "captured": None, "programmatic": None}
        if edge == "programmatic" and data.type != _DEPENDENCY_PROGRAMMATIC:
            _make_programmatic(handle, producer, target, data)
        graph.instantiate()
        wrong = 0
        for _ in range(replays):
            x.fill_(float("nan"))
            out.copy_(base)
            graph.replay()
            torch.cuda.synchronize()
            err = ((out.float() - reference).norm() / reference.norm()).item()
            wrong += not (torch.isfinite(out).all().item() and err < MAX_REL_ERR)
        result[edge] = {"wrong_replays": wrong, "replays": replays}
    return result


def run(models: list[str], rows: list[int], spin_us: float, replays: int) -> dict:
    from engine.blas import decode_blas

    out = []
    for label, wait in (("control: copy without a wait", False),
                        ("control: copy with a wait", True)):
        out.append({"model": "control", "product": label, "M": 64, "N": 2048, "K": 2048,
                    **check(copy_consumer(wait), 64, 2048, 2048, None, spin_us, replays)})
        print(format_row(out[-1]), flush=True)
    with decode_blas(torch.device("cuda")):
        for model in models:
            for m in rows:
                for name, n, k, accumulate in layer_products(model):
                    out.append({"model": model, "product": name, "M": m, "N": n, "K": k,
                                **check(product_consumer(accumulate), m, n, k, accumulate,
                                        spin_us, replays)})
                    print(format_row(out[-1]), flush=True)
    return {"spin_us": spin_us, "replays": replays, "rows": out}


def format_row(r: dict) -> str:
    if r["kernel"] is None:
        return (f"{r['model']:<20}{r['product']:<30}{r['M']:>5}{r['N']:>7}{r['K']:>7}  "
                f"no kernel right after the producer (not checked)")
    wrong = "  ".join(f"{edge} {r[edge]['wrong_replays']}/{r[edge]['replays']}"
                      for edge in ("captured", "programmatic"))
    return (f"{r['model']:<20}{r['product']:<30}{r['M']:>5}{r['N']:>7}{r['K']:>7}  "
            f"wrong: {wrong}  {r['kernel']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="dummy models, comma-separated")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)),
                        help="rows M of the products (more than 64: cuBLASLt's regime)")
    parser.add_argument("--spin-us", type=float, default=SPIN_US,
                        help="how long the producer holds x back")
    parser.add_argument("--replays", type=int, default=REPLAYS, help="replays per graph and edge")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--name", default="blas_dependent_launch", help="result file stem")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.blas_dependent_launch needs a CUDA GPU")
    payload = run(args.models.split(","), [int(r) for r in args.rows.split(",")], args.spin_us,
                  args.replays)
    path = write_json(args.out / f"{args.name}.json", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
