"""Which cuBLAS path the decode step's matrix products take.

PyTorch routes a bf16/fp16 product to cuBLAS or cuBLASLt by a process-wide preference; a CUDA
graph keeps the kernels chosen when it was captured. On the H100 cuBLASLt chose a faster kernel
for Llama-3.1-8B's down projection at 128 rows (56.7 against 62.0 µs) and the same or as fast ones
for the other decode-step products measured (QKV, output, gate/up, down, lm_head of the 1B and 8B
shapes at 64-256 rows). Whole steps, side by side: 8B B = 128 9.93 against 10.25 ms, 1B B = 128
and 256 1% faster, B = 8 and 8B B = 256 unchanged (bench/RESULTS.md). So the decode step runs under
cuBLASLt. With ``tuned`` (the default) each product shape of the step also runs the fastest of
cuBLASLt's candidate algorithms, timed on its first use (``kernels.cublaslt``).

``BINDECODE_DECODE_BLAS`` = ``tuned`` / ``cublaslt`` / ``cublas`` picks one, for side-by-side runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from kernels.cublaslt import tuned_products

DECODE_BLAS = os.environ.get("BINDECODE_DECODE_BLAS", "tuned")
if DECODE_BLAS not in ("cublas", "cublaslt", "tuned"):
    raise ValueError(f"BINDECODE_DECODE_BLAS must be tuned, cublaslt or cublas, got "
                     f"{DECODE_BLAS!r}")


@contextmanager
def decode_blas(device: torch.device):
    """Prefer cuBLASLt (or cuBLAS) for the products issued inside and, when ``DECODE_BLAS`` is
    ``tuned``, run each shape on its fastest candidate; on CUDA only. The previous preference
    is restored on exit (it is process-wide state)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublas" if DECODE_BLAS == "cublas" else "cublaslt")
    try:
        with tuned_products(DECODE_BLAS == "tuned"):
            yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
