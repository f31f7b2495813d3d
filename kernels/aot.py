"""Ahead-of-time compilation of Triton kernels for the H100, without a GPU.

Used by the CPU tests to prove every launch configuration the engine can issue really
compiles (the interpreter accepts code the compiler rejects), and to report registers,
shared memory and spills.

Under ``TRITON_INTERPRET=1`` (how the CPU tests run) Triton's own library functions
(``tl.sum``, ``tl.max``, ...) are decorated for the interpreter and cannot be inlined by the code
generator, so the compiles run in one child process with the interpreter off. Decorating and
compiling need no GPU; only launching does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

H100 = ("cuda", 90, 32)


@dataclass(frozen=True)
class CompileJob:
    """One kernel configuration: the kernel by module and name, its Triton signature (argument
    name -> ``"*bf16"``, ``"i32"``, ``"fp32"`` or ``"constexpr"``), constexpr values, launch
    options, and the arguments a real launch sees as divisible by 16 (pointers from torch's
    allocator, strides of 16-multiple sizes). Triton specialises a launch on that divisibility,
    so without the hints the compiled kernel is not the one that runs (vector widths differ)."""

    module: str
    name: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple = ()

    @classmethod
    def of(cls, kernel, signature: dict, constexprs: dict, num_warps: int = 4,
           num_stages: int = 3, divisible_by_16: tuple = ()) -> "CompileJob":
        fn = getattr(kernel, "fn", kernel)  # JITFunction and InterpretedFunction both wrap .fn
        return cls(fn.__module__, fn.__name__, dict(signature), dict(constexprs), num_warps,
                   num_stages, tuple(divisible_by_16))


@dataclass
class CompiledReport:
    name: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def compile_many(jobs: list[CompileJob]) -> list[CompiledReport]:
    """Compile every job to an sm_90 cubin; reports in the same order. Raises on the first
    compile error, naming the kernel and its constexprs."""
    if not jobs:
        return []
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", "from kernels.aot import _child_main; _child_main()"],
                          input=json.dumps([asdict(j) for j in jobs]), capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{proc.stderr[-4000:]}")
    return [CompiledReport(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def compile_for_h100(kernel, signature: dict, constexprs: dict, num_warps: int = 4,
                     num_stages: int = 3, divisible_by_16: tuple = ()) -> CompiledReport:
    """Compile one configuration (see ``compile_many``; batch jobs there: each call is a process)."""
    return compile_many([CompileJob.of(kernel, signature, constexprs, num_warps, num_stages,
                                       divisible_by_16)])[0]


def _child_main() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    ptxas = get_ptxas(H100[1]).path
    reports = []
    for job in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(job["module"]), job["name"])
        attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]]
                 for arg in job["divisible_by_16"]}
        src = ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
        try:
            compiled = triton.compile(src, target=GPUTarget(*H100), options={
                "num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        except Exception as exc:
            raise RuntimeError(f"{job['name']} with {job['constexprs']} "
                               f"(warps={job['num_warps']}, stages={job['num_stages']}): {exc}") from exc
        regs, stores, loads, stack = _ptxas_usage(compiled.asm["ptx"], ptxas)
        reports.append(dict(name=job["name"], registers=regs, shared_bytes=int(compiled.metadata.shared),
                            spill_stores=stores, spill_loads=loads, stack_bytes=stack))
    print(json.dumps(reports))


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
