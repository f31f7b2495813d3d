"""Every decode-attention kernel configuration the engine can launch compiles for the H100
(sm_90) without a GPU, without register spills; prints registers and shared memory.

"What the engine launches" includes Triton's specialisation of the launch: pointers from
torch's allocator are 16-byte aligned, and every integer argument the kernel does not exclude
from specialisation is marked divisible by 16 (or made a constant, when it is 1) from the value
it has in the engine's layout (q a view of the fused qkv projection, contiguous slab and out).
Compiles go through ``kernels.aot.compile_many``.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from kernels.aot import CompileJob, compile_many

# (H_q, H_kv, D): the CPU test model, Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B.
HEAD_SHAPES = [(4, 2, 64), (14, 2, 64), (32, 8, 64), (32, 8, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CAPACITIES = [256 << i for i in range(8)]  # 256 .. 32768
NUM_SMS = 132

POINTERS = ["q_ptr", "k_ptr", "v_ptr", "seq_lens_ptr", "out_ptr", "partial_out_ptr",
            "partial_lse_ptr", "counters_ptr"]
INT_ARGS = ["stride_qb", "stride_qh", "stride_kb", "stride_kn", "stride_kh", "stride_ob",
            "stride_oh", "batch", "capacity", "group", "num_q_heads", "num_splits", "fill_splits"]


def unspecialised_args(kernel) -> set[str]:
    """The kernel's do_not_specialize names (compiled: per parameter; interpreted: its kwargs)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return set(kernel.kwargs["do_not_specialize"] or ())


def engine_int_args(B: int, C: int, H_q: int, H_kv: int, D: int, num_splits: int,
                    fill_splits: int) -> dict:
    """The integer arguments ``decode_attention`` passes for the engine's tensors."""
    return {"stride_qb": (H_q + 2 * H_kv) * D, "stride_qh": D, "stride_kb": C * H_kv * D,
            "stride_kn": H_kv * D, "stride_kh": D, "stride_ob": H_q * D, "stride_oh": D,
            "batch": B, "capacity": C, "group": H_q // H_kv, "num_q_heads": H_q,
            "num_splits": num_splits, "fill_splits": fill_splits}


def distinct_launches() -> list[dict]:
    """One entry per distinct (dtype, constexprs, specialisation, launch options) the engine
    can issue."""
    from kernels import decode_attention as da

    unspecialised = unspecialised_args(da._decode_kernel)
    assert unspecialised <= set(INT_ARGS), unspecialised
    launches = {}
    for (H_q, H_kv, D) in HEAD_SHAPES:
        for dtype_name, dtype in DTYPES.items():
            for B in BATCHES:
                for C in CAPACITIES:
                    config = da.decode_config(B, C, H_q, H_kv, D, dtype, NUM_SMS)
                    ints = engine_int_args(B, C, H_q, H_kv, D, config.num_splits,
                                           config.fill_splits)
                    specialised = {name: ("one" if value == 1 else "div16" if value % 16 == 0
                                          else "") for name, value in ints.items()
                                   if name not in unspecialised}
                    launch = {"dtype": dtype_name,
                              "meta": da.attention_launch_meta(config, H_q, H_kv, D),
                              "ints": specialised}
                    launches[json.dumps(launch, sort_keys=True)] = launch
    return list(launches.values())


def compile_job(launch: dict) -> CompileJob:
    from kernels import decode_attention as da

    t = "*" + launch["dtype"]
    meta = dict(launch["meta"])
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    # With one split the kernel gets `out` for the partial pointers and seq_lens for the
    # counters (never touched).
    single = meta["SINGLE_SPLIT"]
    signature = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "seq_lens_ptr": "*i32", "out_ptr": t,
                 "partial_out_ptr": t if single else "*fp32",
                 "partial_lse_ptr": t if single else "*fp32",
                 "counters_ptr": "*i32"}
    aligned = list(POINTERS)
    for name in INT_ARGS:
        kind = launch["ints"].get(name, "")
        signature[name] = "constexpr" if kind == "one" else "i32"
        if kind == "one":
            meta[name] = 1
        elif kind == "div16":
            aligned.append(name)
    signature["qk_scale_log2"] = "fp32"
    signature.update({name: "constexpr" for name in launch["meta"]
                      if name not in ("num_warps", "num_stages")})
    assert list(signature) == da._decode_kernel.arg_names, "the kernel's arguments changed"
    return CompileJob.of(da._decode_kernel, signature, meta, num_warps, num_stages, aligned)


def test_every_decode_configuration_compiles_without_spills():
    launches = distinct_launches()
    assert 0 < len(launches) < 40, f"{len(launches)} distinct configurations: too many to compile"
    compiled = compile_many([compile_job(launch) for launch in launches])
    reports = [{**launch, **asdict(report)} for launch, report in zip(launches, compiled)]

    print(f"\n{'dtype':<6}{'constexprs':<92}{'warps':>6}{'stages':>7}"
          f"{'regs':>6}{'smem KB':>9}{'spill B':>8}")
    for r in sorted(reports, key=lambda r: (r["dtype"], sorted(r["meta"].items()))):
        meta = dict(r["meta"])
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items())
        print(f"{r['dtype']:<6}{consts:<92}{warps:>6}{stages:>7}"
              f"{r['registers']:>6}{r['shared_bytes'] / 1024:>9.1f}"
              f"{r['spill_stores'] + r['spill_loads']:>8}")
    spilling = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"register spills: {spilling}"
    # sm_90 gives a block at most 227 KB of shared memory.
    assert all(r["shared_bytes"] <= 227 * 1024 for r in reports)
