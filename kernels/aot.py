"""Ahead-of-time compilation of a Triton kernel for the H100, without a GPU.

Used by the CPU tests to prove every launch configuration the engine can issue really
compiles (the interpreter accepts code the compiler rejects), and to report registers,
shared memory and spills.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

H100 = ("cuda", 90, 32)


@dataclass
class CompiledReport:
    name: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def compile_for_h100(fn, signature: dict[str, str], constexprs: dict[str, object],
                     num_warps: int = 4, num_stages: int = 3) -> CompiledReport:
    """Compile ``fn`` (a ``@triton.jit`` function) to an sm_90 cubin and report its resources.

    ``signature`` maps every argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the constexpr values.
    Works under ``TRITON_INTERPRET=1`` too: the interpreted wrapper keeps the original function.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # Under the interpreter the decorator returned a wrapper: compile the function it wraps.
    jit_fn = JITFunction(fn.fn) if isinstance(fn, InterpretedFunction) else fn
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget(*H100),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    shared = int(kernel.metadata.shared)
    regs, stores, loads, stack = _ptxas_usage(kernel.asm["ptx"], get_ptxas(90).path)
    return CompiledReport(jit_fn.__name__, regs, shared, stores, loads, stack)


def _ptxas_usage(ptx: str, ptxas: str) -> tuple[int, int, int, int]:
    """Registers, spill stores, spill loads and stack frame bytes as ``ptxas -v`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else 0
    return (num(r"Used (\d+) registers"), num(r"(\d+) bytes spill stores"),
            num(r"(\d+) bytes spill loads"), num(r"(\d+) bytes stack frame"))
