"""BinDecode's Triton kernels. Each has a plain-torch twin of the same signature in
``kernels.reference`` (the test oracle and the CPU path).

Triton decides between compiling and interpreting a kernel when it is decorated, so without
CUDA the interpreter is switched on here, before any kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
