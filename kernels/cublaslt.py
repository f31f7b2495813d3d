"""Matrix products of the decode step on the fastest of cuBLASLt's candidate algorithms.

    out[M, N] = x[M, K] @ weight[N, K]^T  (+ out, with ``accumulate``)

PyTorch runs a 16-bit product on the first algorithm of cuBLASLt's heuristic. cuBLASLt offers a
few more for the same call (other tiles, other kernel orders) and, for some decode shapes, one
of them is faster: on the H100 the LM head by 2-5% at every batch size, the 8B down projection
at 256 rows by 6% (bench/RESULTS.md). Inside ``tuned_products()`` the first product of each
shape times PyTorch's own call against every candidate and keeps the fastest; later products
of that shape, and the CUDA graphs captured from them, run it.

Each candidate is timed as the decode step runs it (``chain_product_us``): in a CUDA graph,
back to back with other kernels, its weight cold (the L2 flushed) and its activation and
output hot and dirty, as the step's previous kernels leave them. Timed alone between two
events after a flush, with every operand cold, the candidates' order changed from process to
process; one such choice (the 1B down product at 256 rows) made the whole decode step 2.5%
slower (``python -m bench.blas_choice``, bench/RESULTS.md).

Outside ``tuned_products()``, and wherever the binding does not apply (CPU, fp32, unaligned
or strided operands, a graph capture reaching an untimed shape), ``mm`` is PyTorch's product.

The binding is ctypes over the libcublasLt that PyTorch loaded. Row-major tensors are handed
over as their column-major transposes: D = out^T [N, M], A = weight^T seen as [K, N] and
transposed (op T), B = x^T [K, M].
"""

from __future__ import annotations

import ctypes
import logging
import statistics
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# cublasLt.h: cublasLtMatmulDescAttributes_t, cublasLtMatmulPreferenceAttributes_t,
# cublasComputeType_t, cudaDataType_t, cublasOperation_t, cublasLtMatmulAlgoConfigAttributes_t.
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE_BYTES = 1
_COMPUTE_32F = 68
_CUDA_TYPES = {torch.float16: 2, torch.bfloat16: 14, torch.float32: 0}
_OP_N, _OP_T = 0, 1
_CONFIG_ID, _CONFIG_TILE_ID = 0, 1

WORKSPACE_BYTES = 32 << 20  # what PyTorch gives cuBLASLt on Hopper
ALIGNMENT = 256  # bytes; the heuristic assumes operands this aligned unless told otherwise
MAX_CANDIDATES = 16
CHAIN_LENGTH = 8  # products in one timed graph
TIMING_REPEATS = 7  # replays of each graph; the median counts
FLUSH_BYTES = 64 << 20  # more than the H100's 50 MB L2
SLEEP_CYCLES = 50_000_000  # ~25 ms at 2 GHz: longer than queueing every timed replay
# A candidate replaces PyTorch's call only when its median is this much faster.
MIN_GAIN = 0.01

_P, _I, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {
    "cublasLtCreate": [_P],
    "cublasLtMatmulDescCreate": [_P, _I, _I],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _SIZE],
    "cublasLtMatrixLayoutCreate": [_P, _I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _SIZE],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulAlgoGetHeuristic": [_P] * 7 + [_I, _P, _P],
    "cublasLtMatmulAlgoConfigGetAttribute": [_P, _I, _P, _SIZE, _P],
    "cublasLtMatmul": [_P] * 14 + [_SIZE, _P],
}


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class _Library:
    """libcublasLt (PyTorch's copy, found among the process's mapped files) and one handle."""

    def __init__(self):
        self.dll = ctypes.CDLL(_loaded_library_path())
        for name, argtypes in _SIGNATURES.items():
            function = getattr(self.dll, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        self.handle = ctypes.c_void_p()
        self.check(self.dll.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt: {what} returned status {status}")


def _loaded_library_path() -> str:
    a = torch.ones(8, 8, dtype=torch.bfloat16, device="cuda")
    torch.mm(a, a)  # makes PyTorch load cuBLAS and cuBLASLt
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcublasLt.so" in line:
                return line.split()[-1]
    raise RuntimeError("cuBLASLt: PyTorch has not loaded libcublasLt")


_library: _Library | None = None
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _lib() -> _Library:
    global _library
    if _library is None:
        _library = _Library()
    return _library


@dataclass(frozen=True)
class ProductShape:
    """What a product's descriptors and algorithms depend on (leading dims in elements)."""

    m: int
    n: int
    k: int
    dtype: torch.dtype
    out_dtype: torch.dtype
    ld_x: int
    ld_weight: int
    ld_out: int
    accumulate: bool


class LtPlan:
    """The cuBLASLt descriptors of one ``ProductShape`` and the heuristic's candidates for it."""

    def __init__(self, shape: ProductShape, max_candidates: int = MAX_CANDIDATES):
        lib = _lib()
        self.lib, self.shape = lib, shape
        self.desc = ctypes.c_void_p()
        lib.check(lib.dll.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F,
                                                   _CUDA_TYPES[torch.float32]), "DescCreate")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int32(op)
            lib.check(lib.dll.cublasLtMatmulDescSetAttribute(
                self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)), "DescSetAttribute")
        s = shape
        self.a, self.b, self.c = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        for layout, dtype, rows, cols, ld in ((self.a, s.dtype, s.k, s.n, s.ld_weight),
                                              (self.b, s.dtype, s.k, s.m, s.ld_x),
                                              (self.c, s.out_dtype, s.n, s.m, s.ld_out)):
            lib.check(lib.dll.cublasLtMatrixLayoutCreate(
                ctypes.byref(layout), _CUDA_TYPES[dtype], rows, cols, ld), "LayoutCreate")
        pref = ctypes.c_void_p()
        lib.check(lib.dll.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        workspace = ctypes.c_uint64(WORKSPACE_BYTES)
        lib.check(lib.dll.cublasLtMatmulPreferenceSetAttribute(
            pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(workspace), ctypes.sizeof(workspace)),
            "PreferenceSetAttribute")
        results = (_HeuristicResult * max_candidates)()
        returned = ctypes.c_int(0)
        status = lib.dll.cublasLtMatmulAlgoGetHeuristic(
            lib.handle, self.desc, self.a, self.b, self.c, self.c, pref, max_candidates,
            ctypes.byref(results), ctypes.byref(returned))
        lib.dll.cublasLtMatmulPreferenceDestroy(pref)
        lib.check(status, "AlgoGetHeuristic")
        self.candidates = [results[i] for i in range(returned.value) if results[i].state == 0]

    def describe(self, index: int) -> str:
        """The candidate's cuBLASLt algorithm id and tile id."""
        values = []
        for attr in (_CONFIG_ID, _CONFIG_TILE_ID):
            value, written = ctypes.c_int32(0), ctypes.c_size_t(0)
            self.lib.dll.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(self.candidates[index].algo), attr, ctypes.byref(value),
                ctypes.sizeof(value), ctypes.byref(written))
            values.append(value.value)
        return f"algo {values[0]} tile {values[1]}"

    def run(self, index: int, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """out (+)= x @ weight.T with candidate ``index``, on the current stream."""
        workspace = _workspace(out.device)
        beta = _ONE if self.shape.accumulate else _ZERO
        self.lib.check(self.lib.dll.cublasLtMatmul(
            self.lib.handle, self.desc, ctypes.byref(_ONE), weight.data_ptr(), self.a,
            x.data_ptr(), self.b, ctypes.byref(beta), out.data_ptr(), self.c, out.data_ptr(),
            self.c, ctypes.byref(self.candidates[index].algo), workspace.data_ptr(),
            WORKSPACE_BYTES, torch.cuda.current_stream(out.device).cuda_stream), "Matmul")


_workspaces: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


@dataclass
class Choice:
    """The product a shape runs: ``plan``'s candidate ``index``, or PyTorch's call (plan None),
    with the medians that decided it (µs)."""

    plan: LtPlan | None
    index: int
    torch_us: float
    chosen_us: float


_choices: dict[tuple[torch.device, ProductShape], Choice] = {}
_tuning = False


@contextmanager
def tuned_products(enabled: bool = True):
    """Inside, ``mm`` picks each product shape's fastest algorithm (see the module docstring)."""
    global _tuning
    previous, _tuning = _tuning, enabled
    try:
        yield
    finally:
        _tuning = previous


def chosen(device: torch.device, shape: ProductShape) -> Choice | None:
    """The choice made for ``shape`` on ``device``, if it was timed."""
    return _choices.get((device, shape))


def use(device: torch.device, shape: ProductShape, choice: Choice) -> None:
    """From now on ``shape`` runs ``choice`` (benchmarks compare choices in the step)."""
    _choices[(device, shape)] = choice


def timed_shapes() -> list[tuple[torch.device, ProductShape]]:
    """Every (device, shape) timed so far, in the order they were first run."""
    return list(_choices)


def choices_made() -> list[dict]:
    """Every timed shape and what it runs, as JSON-ready rows (benchmarks record them)."""
    rows = []
    for (device, s), choice in _choices.items():
        rows.append({"device": str(device), "M": s.m, "N": s.n, "K": s.k,
                     "dtype": str(s.dtype), "out_dtype": str(s.out_dtype),
                     "accumulate": s.accumulate, "torch_us": choice.torch_us,
                     "chosen_us": choice.chosen_us,
                     "runs": ("torch" if choice.plan is None else
                              f"candidate {choice.index}: {choice.plan.describe(choice.index)}")})
    return rows


def mm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, *,
       accumulate: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out = x @ weight.T, or out += x @ weight.T with ``accumulate``; returns out.

    x: [M, K] with a contiguous last dim; weight: [N, K] contiguous, x's dtype; out: [M, N] with
    a contiguous last dim (required with ``accumulate``), in ``out_dtype`` (default x's dtype;
    fp32 gives logits straight from the fp32 accumulator).
    """
    if out is None:
        if accumulate:
            raise ValueError("mm: accumulate needs out")
        out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype,
                          device=x.device)
    shape = _lt_shape(x, weight, out, accumulate) if _tuning else None
    if shape is None:
        return _torch_mm(x, weight, out, accumulate)
    key = (x.device, shape)
    choice = _choices.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return _torch_mm(x, weight, out, accumulate)  # cannot time here; not remembered
        choice = _choices[key] = _choose(shape, x, weight, out)
    if choice.plan is None:
        return _torch_mm(x, weight, out, accumulate)
    choice.plan.run(choice.index, x, weight, out)
    return out


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [M, V] of x [M, K] and the lm_head weight [V, K]. On CUDA in 16 bits the
    product writes fp32 from its fp32 accumulator (``mm``): no 16-bit logits, no conversion
    pass; elsewhere torch's product in x's dtype, then fp32."""
    if x.is_cuda and x.dtype != torch.float32:
        return mm(x, weight, out_dtype=torch.float32)
    return torch.nn.functional.linear(x, weight).float()


def _torch_mm(x, weight, out, accumulate):
    if accumulate:
        return out.addmm_(x, weight.t())
    if out.dtype != x.dtype:
        return torch.mm(x, weight.t(), out_dtype=out.dtype, out=out)
    return torch.mm(x, weight.t(), out=out)


def _lt_shape(x, weight, out, accumulate) -> ProductShape | None:
    """The product's shape if the binding takes it: CUDA, 16-bit operands, row-major with
    ALIGNMENT-aligned bases and 16-byte-aligned rows, at least one row."""
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and out.dtype in (x.dtype, torch.float32) and x.dim() == 2 and out.dim() == 2
            and weight.is_contiguous() and x.stride(1) == 1 and out.stride(1) == 1
            and x.shape[0] > 0):
        return None
    for t in (x, weight, out):
        if t.data_ptr() % ALIGNMENT or (t.stride(0) * t.element_size()) % 16:
            return None
    (m, k), n = x.shape, weight.shape[0]
    return ProductShape(m, n, k, x.dtype, out.dtype, x.stride(0), weight.stride(0),
                        out.stride(0), accumulate)


def _scratch_like(t: torch.Tensor) -> torch.Tensor:
    """Random values laid out as t, row stride included. The candidates are planned for t's
    leading dimension; a row-strided view (rows of a wider buffer) given a packed scratch
    copy would send them past its end."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).normal_()


def _choose(shape: ProductShape, x, weight, out) -> Choice:
    """Time PyTorch's call and every candidate on scratch activations and the real weight,
    as the step runs them (``chain_product_us``); the fastest wins (PyTorch's unless a
    candidate is MIN_GAIN faster)."""
    try:
        plan = LtPlan(shape)
    except (RuntimeError, OSError) as exc:  # no libcublasLt found, or it refused the shape
        log.warning("product M=%d N=%d K=%d: %s; PyTorch's call runs it", shape.m, shape.n,
                    shape.k, exc)
        return Choice(None, -1, float("nan"), float("nan"))
    if not plan.candidates:
        return Choice(None, -1, float("nan"), float("nan"))
    _workspace(x.device)  # allocated here, outside any graph capture
    x_scratch, out_scratch = _scratch_like(x), _scratch_like(out)
    runs = [lambda: _torch_mm(x_scratch, weight, out_scratch, shape.accumulate)]
    runs += [lambda i=i: plan.run(i, x_scratch, weight, out_scratch)
             for i in range(len(plan.candidates))]
    medians = chain_product_us(runs, x_scratch, out_scratch)
    torch_us, best = medians[0], fastest(medians)
    if best >= 0:
        choice = Choice(plan, best, torch_us, medians[1 + best])
        what = f"cuBLASLt candidate {best} of {len(plan.candidates)} ({plan.describe(best)})"
    else:
        choice = Choice(None, -1, torch_us, torch_us)
        what = "PyTorch's call"
    log.info("product M=%d N=%d K=%d%s: %s, %.1f us against PyTorch's %.1f us", shape.m,
             shape.n, shape.k, " accumulate" if shape.accumulate else "", what, choice.chosen_us,
             torch_us)
    return choice


def fastest(times: list[float]) -> int:
    """The candidate that ``times`` (PyTorch's call first, then candidate 0, 1, ...) pick:
    the fastest candidate if it beats PyTorch's call by MIN_GAIN, else -1 (PyTorch's call)."""
    best_time, best = min((t, i) for i, t in enumerate(times[1:]))
    return best if best_time < times[0] * (1 - MIN_GAIN) else -1


def chain_product_us(runs: list, x: torch.Tensor, out: torch.Tensor) -> list[float]:
    """Device µs of each product in ``runs`` (callables computing out (+)= x @ weight.T) as a
    decode step sees it.

    One CUDA graph per run repeats CHAIN_LENGTH times: an L2 flush (a read, so no dirty lines
    are left to write back), a copy into x and out (hot and dirty, as the previous kernels
    leave them), the product. A graph without the product times the rest; each run's
    median over TIMING_REPEATS interleaved replays, less that, over CHAIN_LENGTH, is its
    product's time.
    """
    device = x.device
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device).fill_(1.0)
    flush_sum = torch.empty((), dtype=torch.float32, device=device)
    x_source, out_source = x.clone(), out.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for run in runs:
            run()  # first calls (cuBLAS's own set-up) outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = []
    for run in [None, *runs]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CHAIN_LENGTH):
                torch.sum(flush, 0, out=flush_sum)
                x.copy_(x_source)
                out.copy_(out_source)
                if run is not None:
                    run()
        graphs.append(graph)
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(TIMING_REPEATS)] for _ in graphs]
    for graph in graphs:
        graph.replay()
    # The GPU sleeps while every replay is queued, so the events measure the GPU's time and
    # not the host's launch latency.
    torch.cuda._sleep(SLEEP_CYCLES)
    for repeat in range(TIMING_REPEATS):
        for graph, pairs in zip(graphs, events):
            pairs[repeat][0].record()
            graph.replay()
            pairs[repeat][1].record()
    torch.cuda.current_stream(device).synchronize()
    medians = [statistics.median(start.elapsed_time(end) * 1e3 for start, end in pairs)
               for pairs in events]
    return [(median - medians[0]) / CHAIN_LENGTH for median in medians[1:]]
