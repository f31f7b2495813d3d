"""EngineOptions: every knob of the engine in one picklable dataclass.

A batch-shape study changes nothing but these fields, so each one is also a flag of
``python -m engine.serve`` and an argument of ``LLM(...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("static", "bin-continuous", "continuous")
OVERFLOW_POLICIES = ("recompute",)
DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("auto", "reference", "triton")
ORDERS = ("formation", "shortest")


@dataclass
class EngineOptions:
    """Engine configuration.

    Attributes:
        model: local Hugging Face folder or ``dummy:NAME``.
        dtype: weights and activations; "auto" = bfloat16 on CUDA, float32 on CPU.
        kv_dtype: KV cache element type; "auto" = ``dtype`` (float32 for exact parity tests).
        device: "auto" (CUDA when present), "cuda", "cuda:N" or "cpu".
        backend: kernels; "auto" = triton on CUDA, reference on CPU. "triton" on CPU runs
            the kernels through Triton's interpreter (slow; tiny models only).
        seed: dummy weights, and the seeds of requests that bring none.
        batch_size: B, rows of every slab.
        bins: k, the number of output-length bins: equal width over [1, max_output_len] at start,
            then equal-mass edges of recently finished lengths (scheduler.bins.AdaptiveEdges).
        bin_edges: explicit inner bin edges in tokens (k = len + 1); overrides ``bins``.
        mode: "static" (a batch runs until its longest row ends), "bin-continuous" (finished
            rows are refilled from the same bin) or "continuous" (one max_model_len slab,
            refilled from any bin).
        predictor: output-length predictor spec (``scheduler.predictors.predictor_from_spec``):
            hint, max-tokens, online[:Q], oracle, bin-error:P, lognormal:SIGMA. The last three
            read each request's hidden ``target_len`` (its max_tokens when it has none).
        batch_order: the central queue's order of formed batches: "formation" or "shortest".
        max_wait_ms: a bin's partial batch forms when its oldest request has waited this
            long; in the refilling modes, free rows are also refilled after this wait even if
            fewer than ``refill_min_free`` are free.
        starvation_wait_ms: a formed batch waiting this long is served next (None: never).
        max_queue: requests waiting beyond this are refused (``QueueFull``).
        max_model_len: longest prompt + output (default: the model's, capped at 4096).
        max_output_len: the largest max_tokens accepted; the bins span [1, max_output_len]
            (default: max_model_len).
        min_capacity: the smallest slab capacity bucket; C is min_capacity * 2^i, capped at
            max_model_len.
        kv_cache_gb: KV arena size; None = ``kv_memory_fraction`` of the free GPU memory after
            the weights are loaded (on CPU: 0.25 GiB).
        kv_memory_fraction: see ``kv_cache_gb``.
        enforce_eager: no CUDA graphs (CPU always runs eagerly).
        overflow: what happens to a row that reaches its slab's end: "recompute" (evict, re-queue
            prompt + generated tokens into a higher bin). ("grow" is not offered.)
        refill_min_free: refilling modes prefill new rows once this many rows are free
            (None: max(1, batch_size // 8)).
        max_prefill_tokens: prompts are prefilled in packs of at most this many tokens.
        log_batches: append one ``scheduler.schemas.BatchRecord`` JSON line per batch here.
        log_labels: free-form labels copied into every record's ``extra``.
    """

    model: str = "dummy:tiny"
    dtype: str = "auto"
    kv_dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    seed: int = 0
    batch_size: int = 8
    bins: int = 1
    bin_edges: list[float] | None = None
    mode: str = "static"
    predictor: str = "hint"
    batch_order: str = "formation"
    max_wait_ms: float = 50.0
    starvation_wait_ms: float | None = None
    max_queue: int = 65536
    max_model_len: int | None = None
    max_output_len: int | None = None
    min_capacity: int = 256
    kv_cache_gb: float | None = None
    kv_memory_fraction: float = 0.7
    enforce_eager: bool = False
    overflow: str = "recompute"
    refill_min_free: int | None = None
    max_prefill_tokens: int = 16384
    log_batches: str | None = None
    log_labels: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        _choice("dtype", self.dtype, DTYPES)
        _choice("kv_dtype", self.kv_dtype, DTYPES)
        _choice("backend", self.backend, BACKENDS)
        _choice("mode", self.mode, MODES)
        _choice("batch_order", self.batch_order, ORDERS)
        if self.overflow == "grow":
            raise ValueError("overflow='grow' (copying a row to a larger slab) is not offered; "
                             "use overflow='recompute'")
        _choice("overflow", self.overflow, OVERFLOW_POLICIES)
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _positive_int("batch_size", self.batch_size)
        _positive_int("bins", self.bins)
        _positive_int("max_queue", self.max_queue)
        _positive_int("min_capacity", self.min_capacity)
        _positive_int("max_prefill_tokens", self.max_prefill_tokens)
        for name in ("max_model_len", "max_output_len", "refill_min_free"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.bin_edges is not None:
            edges = list(self.bin_edges)
            if any(not isinstance(e, (int, float)) or not 0 < e < math.inf for e in edges):
                raise ValueError(f"bin_edges must be positive finite numbers, got {edges}")
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"bin_edges must be strictly increasing, got {edges}")
        if not self.max_wait_ms >= 0:  # also refuses NaN
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.starvation_wait_ms is not None and not self.starvation_wait_ms >= 0:
            raise ValueError(f"starvation_wait_ms must be >= 0 or None, got {self.starvation_wait_ms}")
        if self.kv_cache_gb is not None and not 0 < self.kv_cache_gb < math.inf:
            raise ValueError(f"kv_cache_gb must be a finite number > 0, got {self.kv_cache_gb}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a folder or dummy:NAME, got {self.model!r}")

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1 if self.bin_edges is not None else self.bins


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
