"""Every skinny-GEMM configuration the engine can launch compiles for the H100 (sm_90) with the
programmatic-dependent-launch prologue, without register spills and within the shared memory
of a block; prints registers and shared memory (pytest -s).

Configurations come from ``gemm_config`` / ``gemm_launch_meta`` for each served model's four
projections and its greedy LM head (``kernels.lm_head``) at every row count the kernel takes, compiled with the alignment facts the launcher
specialises on (16-byte aligned pointers, sizes and strides divisible by 16), so the software
pipeline compiled here is the one that runs.
"""

from __future__ import annotations

import json

import torch

from kernels import gemm
from kernels.aot import CompileJob
from kernels.lm_head import HEAD_MAX_ROWS, NARROW_TILE_MAX_ROWS, head_config
from tests.kernels.aot_checks import compile_and_check

# (name, hidden, intermediate, H_q, H_kv, D, qkv bias, vocabulary)
MODELS = [("tiny", 256, 512, 4, 2, 64, False, 512),
          ("qwen2.5-0.5b", 896, 4864, 14, 2, 64, True, 151936),
          ("llama-3.2-1b", 2048, 8192, 32, 8, 64, False, 128256),
          ("llama-3.1-8b", 4096, 14336, 32, 8, 128, False, 128256)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# kernels.lm_head fuses the argmax for 16-bit weights only; its one-row launches are the
# transposed 16-row tile's.
LM_HEAD_DTYPES = ("bf16", "fp16")
# GEMM_MIN_ROWS .. GEMM_MAX_ROWS: the transposed 16-row tile (with and without split K) and one
# 64-row tile.
ROWS = [2, 16, 17, 32, 64]
# The head's rows past GEMM_MAX_ROWS: the 128-row tile of 128 and of 256 features.
HEAD_ROWS = [NARROW_TILE_MAX_ROWS, HEAD_MAX_ROWS]
INT_ARGS = ["M", "N", "K", "K_PIECE", "stride_xm", "stride_om", "num_partials"]


def distinct_launches() -> list[dict]:
    launches = {}
    for _, hidden, inter, H_q, H_kv, D, bias, vocab in MODELS:
        # (N, K, prologue, bias, residual add, SwiGLU, writes sums of squares): QKV (raw rows,
        # the norm deferred to RoPE; or normalised, with Qwen2's bias / in fp16), output +
        # residual (with and without the partial sums of squares), gate/up with norm and
        # SwiGLU (from its x tiles or from the output product's partials), down + residual.
        projections = [((H_q + 2 * H_kv) * D, hidden, gemm.PLAIN, False, False, False, False),
                       ((H_q + 2 * H_kv) * D, hidden, gemm.NORM, bias, False, False, False),
                       (hidden, H_q * D, gemm.PLAIN, False, True, False, False),
                       (hidden, H_q * D, gemm.PLAIN, False, True, False, True),
                       (2 * inter, hidden, gemm.NORM, False, False, True, False),
                       (2 * inter, hidden, gemm.PARTIAL_NORM, False, False, True, False),
                       (hidden, inter, gemm.PLAIN, False, True, False, False)]
        for dtype_name, dtype in DTYPES.items():
            for m in ROWS:
                # The partials the gate/up product reads: one per output-product program.
                partials = gemm.gemm_programs(gemm.gemm_config(m, hidden, H_q * D, dtype), hidden)
                for n, k, prologue, has_bias, add, swiglu, sumsq in projections:
                    config = gemm.gemm_config(m, n, k, dtype, prologue, pdl=True, swiglu=swiglu)
                    features = n // 2 if swiglu else n
                    meta = gemm.gemm_launch_meta(
                        config, features, k, prologue, has_bias, add, swiglu, sumsq,
                        partials if prologue == gemm.PARTIAL_NORM else 0)
                    launch = {"dtype": dtype_name, "meta": meta}
                    launches[json.dumps(launch, sort_keys=True)] = launch
            if dtype_name not in LM_HEAD_DTYPES:
                continue
            # The greedy head (PLAIN with ROW_ARGMAX), past GEMM_MAX_ROWS too.
            for m in [*ROWS, *HEAD_ROWS]:
                config = head_config(m, vocab, hidden, dtype, pdl=True)
                meta = gemm.gemm_launch_meta(config, vocab, hidden, gemm.PLAIN, False, False,
                                             row_argmax=True)
                launch = {"dtype": dtype_name, "meta": meta}
                launches[json.dumps(launch, sort_keys=True)] = launch
    return list(launches.values())


def compile_jobs(launches: list[dict]) -> list[CompileJob]:
    jobs = []
    for launch in launches:
        t = "*" + launch["dtype"]
        meta = dict(launch["meta"])
        num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
        # ROW_ARGMAX stores fp32 maxima where the product would go, and int32 indices.
        out = "*fp32" if meta["ROW_ARGMAX"] else t
        signature = {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "out_ptr": out,
                     "sumsq_ptr": "*fp32", "partials_ptr": "*fp32", "counter_ptr": "*i32",
                     "idx_ptr": "*i32", **{name: "i32" for name in INT_ARGS}, "eps": "fp32",
                     **{name: "constexpr" for name in meta}}
        # stride_om is the programs' count under ROW_ARGMAX (1002 for a 128k vocabulary).
        aligned = ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "sumsq_ptr", "partials_ptr",
                   "counter_ptr", "idx_ptr", "N", "K", "K_PIECE", "stride_xm",
                   *([] if meta["ROW_ARGMAX"] else ["stride_om"])]
        jobs.append(CompileJob.of(gemm._skinny_gemm_kernel, signature, meta, num_warps,
                                  num_stages, aligned))
    return jobs


def test_every_gemm_configuration_compiles_without_spills():
    launches = distinct_launches()
    assert 0 < len(launches) < 220, f"{len(launches)} distinct configurations: too many to compile"
    compile_and_check(launches, compile_jobs(launches))
