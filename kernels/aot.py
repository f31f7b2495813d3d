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


def compile_many(jobs: list[CompileJob], processes: int = 2) -> list[CompiledReport]:
    """Compile every job to an sm_90 cubin in ``processes`` children; reports in job order.
    Raises on a compile error, naming the kernel and its constexprs."""
    if not jobs:
        return []
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as cache:  # a private cache: no races with other runs
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")])}
        parts = [jobs[i::processes] for i in range(min(processes, len(jobs)))]
        children = [subprocess.Popen(
            [sys.executable, "-c", "from kernels.aot import _child_main; _child_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in parts]
        for child, part in zip(children, parts):
            child.stdin.write(json.dumps([asdict(j) for j in part]))
            child.stdin.close()
        results = []
        for child in children:
            stdout, stderr = child.stdout.read(), child.stderr.read()
            if child.wait() != 0:
                raise RuntimeError(f"AOT compile failed:\n{stderr[-4000:]}")
            results.append([CompiledReport(**r) for r in json.loads(stdout.strip().splitlines()[-1])])
    # Undo the round-robin split so reports line up with jobs.
    ordered = [None] * len(jobs)
    for i, part_reports in enumerate(results):
        ordered[i::len(parts)] = part_reports
    return ordered


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
