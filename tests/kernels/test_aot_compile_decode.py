"""Every decode-attention kernel configuration the engine can launch compiles for the H100
(sm_90) without a GPU, without register spills; prints registers and shared memory.

Compiles go through ``kernels.aot.compile_many`` with the alignment facts the launcher
specialises on (16-byte aligned pointers, strides divisible by 16).
"""

from __future__ import annotations

import json

import torch

from kernels.aot import CompileJob
from kernels.linear import rotates_in_attention
from tests.kernels.aot_checks import compile_and_check

# (H_q, H_kv, D): the CPU test model, Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B.
HEAD_SHAPES = [(4, 2, 64), (14, 2, 64), (32, 8, 64), (32, 8, 128)]
# Decode steps of 2 to 16 rows, and of more than 64 rows with D = 64, hand RoPE and the slab
# write to the attention kernel (NewToken, ``kernels.linear.rotates_in_attention``),
# with the 1 / rms of the rows deferred to it in bf16 (their hidden size here) unless the QKV
# projection has a bias (Qwen2.5: 0); fp16 never defers it.
DEFERRED_NORM_HIDDEN = {(4, 2, 64): 128, (14, 2, 64): 0, (32, 8, 64): 2048, (32, 8, 128): 4096}
NEW_TOKEN_DTYPES = ("bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CAPACITIES = [256 << i for i in range(8)]  # 256 .. 32768
NUM_SMS = 132

ATTENTION_INT_ARGS = ["stride_qb", "stride_qh", "stride_kb", "stride_kn", "stride_kh",
                      "stride_ob", "stride_oh", "capacity", "group", "num_q_heads", "num_splits"]
STRIDES = [name for name in ATTENTION_INT_ARGS if name.startswith("stride")]


def distinct_launches() -> list[dict]:
    """One entry per distinct (kernel, dtype, constexprs, launch options) the engine can issue."""
    from kernels import decode_attention as da

    launches = {}
    for (H_q, H_kv, D) in HEAD_SHAPES:
        for dtype_name, dtype in DTYPES.items():
            for B in BATCHES:
                for C in CAPACITIES:
                    config = da.decode_config(B, C, H_q, H_kv, D, dtype, NUM_SMS)
                    # On the H100 every launch is a programmatic dependent one.
                    entries = [("attention", da.attention_launch_meta(config, H_q, H_kv, D, True))]
                    if rotates_in_attention(B, D) and dtype_name in NEW_TOKEN_DTYPES:
                        hidden = DEFERRED_NORM_HIDDEN[H_q, H_kv, D] if dtype_name == "bf16" else 0
                        entries.append(("attention", da.attention_launch_meta(
                            config, H_q, H_kv, D, True, new_token=True, norm_hidden=hidden)))
                    if config.num_splits > 1:
                        entries.append(("merge", da.merge_launch_meta(config, D)))
                    for kernel, meta in entries:
                        launch = {"kernel": kernel, "dtype": dtype_name, "meta": meta}
                        launches[json.dumps(launch, sort_keys=True)] = launch
    return list(launches.values())


def _signature(launch: dict) -> tuple[dict, list[str]]:
    """Triton types of every argument, as the wrapper passes them, and the arguments that the
    launcher would find 16-byte aligned / divisible by 16 at run time (pointers, strides)."""
    t = "*" + launch["dtype"]
    meta = {k: "constexpr" for k in launch["meta"] if k not in ("num_warps", "num_stages")}
    if launch["kernel"] == "attention":
        # With one split the kernel writes out directly and gets `out` for the partial pointers.
        partial = t if launch["meta"]["SINGLE_SPLIT"] else "*fp32"
        sig = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "seq_lens_ptr": "*i32", "out_ptr": t,
               "partial_out_ptr": partial, "partial_lse_ptr": partial,
               **{name: "i32" for name in ATTENTION_INT_ARGS}, "qk_scale_log2": "fp32",
               # Without a new token the wrapper passes q for these pointers, zeros for the rest.
               "k_new_ptr": t, "v_new_ptr": t, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
               "norm_ptr": t, "stride_new_b": "i32", "stride_new_h": "i32", "stride_norm": "i32",
               "norm_hidden": "i32", "eps": "fp32", **meta}
        aligned = ([n for n in sig if n.endswith("_ptr")] + STRIDES
                   + ["stride_new_b", "stride_new_h", "stride_norm"])
    else:
        sig = {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": t,
               "stride_ob": "i32", "stride_oh": "i32", "num_splits": "i32", **meta}
        aligned = ["partial_out_ptr", "partial_lse_ptr", "out_ptr", "stride_ob", "stride_oh"]
    return sig, aligned


def compile_jobs(launches: list[dict]) -> list[CompileJob]:
    from kernels import decode_attention as da

    jobs = []
    for launch in launches:
        fn = da._decode_split_kernel if launch["kernel"] == "attention" else da._merge_splits_kernel
        signature, aligned = _signature(launch)
        meta = dict(launch["meta"])
        num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
        jobs.append(CompileJob.of(fn, signature, meta, num_warps, num_stages, aligned))
    return jobs


def test_every_decode_configuration_compiles_without_spills():
    launches = distinct_launches()
    assert 0 < len(launches) < 100, f"{len(launches)} distinct configurations: too many to compile"
    compile_and_check(launches, compile_jobs(launches), labels=("kernel", "dtype"))

