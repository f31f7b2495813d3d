"""Every prefill_attention configuration the engine can launch compiles for the H100 (sm_90)
without spilling registers. Needs no GPU: Triton compiles to PTX and ptxas reports resources.

The compile runs in a child process with the interpreter off: under TRITON_INTERPRET=1 the
kernel's @triton.jit helpers (and Triton's own tl.max, tl.sum) are interpreter wrappers that
the compiler cannot inline. It passes the alignment facts the JIT specialises on at launch
(``kernels.aot.compile_for_h100`` has no way to): without them Triton emits scalar loads and
no cp.async pipeline, a different kernel from the one that runs, and ptxas reports spills
that never happen.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (H_q, H_kv, D): dummy:tiny, Qwen2.5-0.5B (group 7), Llama-3.2-1B, Llama-3.1-8B.
HEAD_SHAPES = [(4, 2, 64), (14, 2, 64), (32, 8, 64), (32, 8, 128)]
DTYPES = ("bf16", "fp16", "fp32")
H100_SHARED_BYTES = 227 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]

# What the JIT sees at launch: torch allocations are 16-byte aligned and, for D in {64, 128},
# every stride is a multiple of 16 elements; ``group`` (2, 7, 4 here) is not.
DIVISIBLE_BY_16 = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "cu_seqlens_ptr",
                   "stride_qt", "stride_qh", "stride_kt", "stride_kh",
                   "stride_vt", "stride_vh", "stride_ot", "stride_oh")


def launch_configurations() -> list[tuple[int, str, tuple[int, int, int, int]]]:
    """Distinct (D, dtype, config) compiles. H_q and H_kv reach the kernel only through the
    runtime ``group`` argument, so head shapes differing in them share one binary."""
    import torch

    from kernels.prefill_attention import prefill_config

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    configs = {(d, dtype, prefill_config(d, torch_dtype[dtype]))
               for _, _, d in HEAD_SHAPES for dtype in DTYPES}
    return sorted(configs)


def compile_all() -> None:
    """Child-process entry: compile each configuration, print one JSON report per line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from kernels.aot import H100, _ptxas_usage
    from kernels.prefill_attention import _block_d, _prefill_attention_kernel as kernel

    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in DIVISIBLE_BY_16}

    for head_dim, dtype, (block_m, block_n, num_warps, num_stages) in launch_configurations():
        signature = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        signature["cu_seqlens_ptr"] = "*i32"
        for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                     "stride_vh", "stride_ot", "stride_oh", "group"):
            signature[name] = "i32"
        signature["qk_scale"] = "fp32"
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m,
                          BLOCK_N=block_n, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        signature.update({name: "constexpr" for name in constexprs})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget(*H100),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        registers, spill_stores, spill_loads, stack = _ptxas_usage(compiled.asm["ptx"],
                                                                   get_ptxas(H100[1]).path)
        print(json.dumps({"head_dim": head_dim, "dtype": dtype,
                          "config": [block_m, block_n, num_warps, num_stages],
                          "registers": registers, "shared_bytes": int(compiled.metadata.shared),
                          "spill_stores": spill_stores, "spill_loads": spill_loads,
                          "stack_bytes": stack}))


@pytest.mark.slow
def test_every_prefill_configuration_compiles_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, "-c",
         "from tests.kernels.test_aot_compile_prefill import compile_all; compile_all()"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    reports = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(launch_configurations())
    for r in reports:
        print(f"prefill D={r['head_dim']:3d} {r['dtype']} config={tuple(r['config'])}: "
              f"{r['registers']} registers, {r['shared_bytes']} B shared, "
              f"spills {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack_bytes']} B")
    for r in reports:
        where = f"D={r['head_dim']} {r['dtype']} {r['config']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills registers"
        assert r["shared_bytes"] <= H100_SHARED_BYTES, f"{where} needs too much shared memory"
