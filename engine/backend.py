"""Which implementation of the kernel ops the model calls.

Both backends expose the same functions with the same signatures (``kernels.reference``
documents them): ``rmsnorm``, ``fused_add_rmsnorm``, ``rope_kv_write``, ``decode_attention``,
``prefill_attention``, ``silu_and_mul``, ``norm_linear``, ``qkv_rope_write``,
``qkv_decode_attention``, ``linear_residual``, ``gated_linear_residual``, ``mlp_residual``,
``output_mlp_residual``, ``argmax``, ``lm_head_argmax`` and ``advance_positions``.
"""

from __future__ import annotations

import importlib
from types import ModuleType, SimpleNamespace

import torch

BACKENDS = ("reference", "triton")

# op name -> the kernels module holding its Triton version
_TRITON_MODULES = {
    "rmsnorm": "kernels.rmsnorm",
    "fused_add_rmsnorm": "kernels.rmsnorm",
    "rope_kv_write": "kernels.rope_kv_write",
    "decode_attention": "kernels.decode_attention",
    "prefill_attention": "kernels.prefill_attention",
    "silu_and_mul": "kernels.activation",
    "norm_linear": "kernels.linear",
    "qkv_rope_write": "kernels.linear",
    "qkv_decode_attention": "kernels.linear",
    "linear_residual": "kernels.linear",
    "gated_linear_residual": "kernels.linear",
    "mlp_residual": "kernels.linear",
    "output_mlp_residual": "kernels.linear",
    "argmax": "kernels.argmax",
    "lm_head_argmax": "kernels.lm_head",
    "advance_positions": "kernels.positions",
}


def get_ops(backend: str) -> ModuleType | SimpleNamespace:
    """The op namespace for ``backend``: ``"reference"`` (plain torch) or ``"triton"``.

    The Triton modules are imported here, not at the top of the file, so that the reference
    path never pulls Triton in. Raises ``ValueError`` for an unknown backend and
    ``ImportError`` naming the module when a Triton kernel is missing.
    """
    if backend == "reference":
        import kernels.reference

        return kernels.reference
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")
    import kernels  # noqa: F401  (switches the Triton interpreter on when CUDA is absent)

    ops = {}
    for op, module_name in _TRITON_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"triton backend: cannot import {module_name} for {op}: {e}") from e
        if not hasattr(module, op):
            raise ImportError(f"triton backend: {module_name} has no function {op!r}")
        ops[op] = getattr(module, op)
    return SimpleNamespace(**ops)


def default_backend(device: torch.device | str) -> str:
    """``"triton"`` on CUDA, ``"reference"`` elsewhere (the interpreter is for tests only)."""
    return "triton" if torch.device(device).type == "cuda" else "reference"
