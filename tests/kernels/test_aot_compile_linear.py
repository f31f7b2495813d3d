"""Every fused-projection kernel configuration the engine can launch compiles for the H100
(sm_90) without a GPU and without register spills; prints registers and shared memory.

Configurations come from ``gemv_config`` / ``gemv_launch_meta`` for each projection of the
supported model shapes and each model dtype, compiled with the alignment facts the launcher
specialises on (16-byte aligned pointers, strides and sizes divisible by 16).
"""

from __future__ import annotations

import json

import pytest
import torch

from kernels import linear
from kernels.aot import CompileJob, compile_many
from tests.kernels.aot_checks import compile_and_check

# (name, hidden, intermediate, H_q, H_kv, D, QKV bias): the CPU test model, Qwen2.5-0.5B,
# Llama-3.2-1B, Llama-3.1-8B.
MODELS = [("tiny", 256, 512, 4, 2, 64, False), ("qwen2.5-0.5b", 896, 4864, 14, 2, 64, True),
          ("llama-3.2-1b", 2048, 8192, 32, 8, 64, False),
          ("llama-3.1-8b", 4096, 14336, 32, 8, 128, False)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_ARGS = ["N", "K", "stride_xm", "stride_rm", "stride_om"]


def projections(hidden, inter, hq, hkv, d, bias):
    """(N, K, prologue, has_bias, add_residual, has_norm_weight) of the layer's four
    projections; the normalised ones with the norm weight folded (the default) or not."""
    return [*(((hq + 2 * hkv) * d, hidden, linear.NORM, bias, False, w) for w in (False, True)),
            (hidden, hq * d, linear.PLAIN, False, True, False),
            *((2 * inter, hidden, linear.NORM, False, False, w) for w in (False, True)),
            (hidden, inter, linear.GATED, False, True, False)]


def distinct_launches() -> list[dict]:
    """Each projection as a plain launch and as a programmatic dependent one (the H100's)."""
    launches = {}
    for _name, *shape in MODELS:
        for (dtype_name, dtype), pdl in ((t, p) for t in DTYPES.items() for p in (False, True)):
            for n, k, prologue, has_bias, add_residual, has_norm_weight in projections(*shape):
                config = linear.gemv_config(n, k, dtype, pdl)
                meta = linear.gemv_launch_meta(config, n, k, prologue, has_bias, add_residual,
                                               has_norm_weight)
                # Divisibility of N and K (a specialisation the launcher makes) is part of the key.
                launch = {"dtype": dtype_name, "meta": meta, "n16": n % 16 == 0,
                          "k16": k % 16 == 0}
                launches[json.dumps(launch, sort_keys=True)] = launch
    return list(launches.values())


def compile_job(launch: dict) -> CompileJob:
    t = "*" + launch["dtype"]
    meta = dict(launch["meta"])
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    signature = {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "norm_w_ptr": t, "residual_ptr": t,
                 "out_ptr": t, **{name: "i32" for name in INT_ARGS}, "eps": "fp32",
                 **{name: "constexpr" for name in meta}}
    aligned = [name for name in signature if name.endswith("_ptr")]
    aligned += [name for name in INT_ARGS if name.startswith("stride")]
    aligned += ["N"] * launch["n16"] + ["K"] * launch["k16"]
    return CompileJob.of(linear._gemv_kernel, signature, meta, num_warps, num_stages,
                         aligned)


@pytest.mark.slow
def test_every_projection_configuration_compiles_without_spills():
    launches = distinct_launches()
    assert 0 < len(launches) < 150, f"{len(launches)} distinct configurations: too many to compile"
    compile_and_check(launches, [compile_job(launch) for launch in launches])


def rope_compile_jobs() -> list[CompileJob]:
    """``_qkv_rope_kernel`` for each model's QKV projection and dtype (caches in the model
    dtype), with the norm weight folded or not."""
    jobs = {}
    for _name, hidden, inter, hq, hkv, d, bias in MODELS:
        for (dtype_name, dtype), has_norm_weight, pdl in (
                (t, w, p) for t in DTYPES.items() for w in (False, True) for p in (False, True)):
            n = (hq + 2 * hkv) * d
            config = linear.gemv_config(n, hidden, dtype, pdl)
            meta = linear.qkv_rope_launch_meta(config, hidden, d, has_norm_weight, bias)
            num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
            t = "*" + dtype_name
            signature = {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "norm_w_ptr": t, "q_ptr": t,
                         "k_cache_ptr": t, "v_cache_ptr": t, "positions_ptr": "*i32",
                         "cos_ptr": "*fp32", "sin_ptr": "*fp32", "K": "i32", "eps": "fp32",
                         "stride_cache_slot": "i32", "stride_cache_head": "i32",
                         "num_q_heads": "i32", "num_kv_heads": "i32",
                         **{name: "constexpr" for name in meta}}
            aligned = [name for name in signature if name.endswith("_ptr")]
            aligned += ["K", "stride_cache_slot", "stride_cache_head"]
            key = json.dumps([dtype_name, meta], sort_keys=True)
            jobs[key] = CompileJob.of(linear._qkv_rope_kernel, signature, meta, num_warps,
                                      num_stages, aligned)
    return list(jobs.values())


@pytest.mark.slow
def test_qkv_rope_kernel_compiles_without_spills():
    reports = compile_many(rope_compile_jobs())
    for report in reports:
        print(f"\n_qkv_rope_kernel regs {report.registers} smem {report.shared_bytes} "
              f"spills {report.spill_stores + report.spill_loads}")
    assert reports and not [r for r in reports if r.spill_stores or r.spill_loads]
