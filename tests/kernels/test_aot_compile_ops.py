"""Every launch configuration of the small decode-step kernels compiles for the H100 (sm_90)
without spills. Configurations come from the same ``*_launch`` functions the wrappers use, for
each supported model shape and dtype, deduplicated by (kernel, signature, constexprs, warps).

The compiles run in one child process with ``TRITON_INTERPRET=0``: under the interpreter,
Triton's own library functions (``tl.sum``, ``tl.max``, ...) are decorated as interpreted
functions and the code generator cannot inline them. Run pytest with ``-s`` to see registers and
shared memory per configuration.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from kernels.activation import _silu_and_mul_kernel, silu_launch
from kernels.aot import compile_for_h100
from kernels.argmax import (_chunk_argmax_kernel, _reduce_chunks_kernel, argmax_launch,
                            reduce_launch_meta)
from kernels.gemm import gemm_programs
from kernels.lm_head import HEAD_MAX_ROWS, head_config
from kernels.positions import BLOCK as POSITIONS_BLOCK
from kernels.positions import NUM_WARPS as POSITIONS_WARPS
from kernels.positions import _advance_positions_kernel
from kernels.rmsnorm import _rmsnorm_kernel, rmsnorm_launch
from kernels.rope_kv_write import _rope_kv_write_kernel, rope_launch


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    vocab: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


MODELS = [
    ModelShape("tiny", 256, 512, 512, 4, 2, 64),
    ModelShape("qwen2.5-0.5b", 896, 4864, 151936, 14, 2, 64),
    ModelShape("llama-3.2-1b", 2048, 8192, 128256, 32, 8, 64),
    ModelShape("llama-3.1-8b", 4096, 14336, 128256, 32, 8, 128),
]
# Model dtype (the engine loads bf16, fp16 or fp32) -> cache dtypes it may pair with it; fp32
# caches exist for exact parity runs.
DTYPES = {"bf16": ("bf16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}
# Token counts that select each silu_and_mul block size (decode of few rows, larger batches).
SILU_TOKEN_COUNTS = (1, 256)


def signature(kernel, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument name -> Triton type: the given pointer types, "constexpr" for constexprs,
    fp32 for eps, i32 for every other (integer) argument."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types[name]
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    return sig


def configurations() -> dict[tuple, tuple]:
    """Deduplicated {key: (kernel, signature, constexprs, num_warps, where)} for all models."""
    found = {}

    def add(kernel, pointer_types, constexprs, num_warps, where):
        sig = signature(kernel, pointer_types, constexprs)
        key = (kernel.fn.__name__, tuple(sig.items()), tuple(sorted(constexprs.items())), num_warps)
        found.setdefault(key, (kernel, sig, constexprs, num_warps, where))

    for model in MODELS:
        for dtype, cache_dtypes in DTYPES.items():
            act = f"*{dtype}"
            # Decode steps of many rows defer a folded norm to this kernel (not in fp16).
            scales = (False, True) if dtype != "fp16" else (False,)
            for cache, has_rows, scale in ((c, r, s) for c in cache_dtypes for r in (False, True)
                                           for s in scales if not (r and s)):
                launch = rope_launch(model.num_q_heads, model.num_kv_heads, model.head_dim,
                                     has_rows, model.hidden if scale else 0, pdl=True)
                pointers = dict(q_ptr=act, k_ptr=act, v_ptr=act, k_cache_ptr=f"*{cache}",
                                v_cache_ptr=f"*{cache}", positions_ptr="*i32", rows_ptr="*i32",
                                cos_ptr="*fp32", sin_ptr="*fp32", norm_ptr=act)
                add(_rope_kv_write_kernel, pointers, launch.constexprs, launch.num_warps,
                    f"{model.name} {dtype} cache={cache} rows={has_rows} scale={scale}")
            # Hidden-size norms (with a weight, or without one once it is folded into the next
            # projection), plus a per-head (Qwen3-style q/k) norm at this head size.
            for hidden, add_residual, has_weight in ((model.hidden, False, True),
                                                     (model.hidden, True, True),
                                                     (model.hidden, False, False),
                                                     (model.head_dim, False, True)):
                launch = rmsnorm_launch(hidden, add_residual, has_weight)
                pointers = dict(x_ptr=act, residual_ptr=act, weight_ptr=act, out_ptr=act)
                add(_rmsnorm_kernel, pointers, launch.constexprs, launch.num_warps,
                    f"{model.name} {dtype} H={hidden} add={add_residual} weight={has_weight}")
            for tokens, scale in ((t, s) for t in SILU_TOKEN_COUNTS for s in scales):
                launch = silu_launch(tokens, model.intermediate, model.hidden if scale else 0)
                add(_silu_and_mul_kernel, dict(x_ptr=act, out_ptr=act, norm_ptr=act),
                    launch.constexprs, launch.num_warps, f"{dtype} T={tokens} scale={scale}")
        # Logits are fp32 whatever the model dtype.
        launch = argmax_launch(model.vocab)
        add(_chunk_argmax_kernel,
            dict(logits_ptr="*fp32", chunk_max_ptr="*fp32", chunk_idx_ptr="*i32"),
            dict(CHUNK=launch.chunk), launch.chunk_warps, f"V={model.vocab}")
        for meta in [reduce_launch_meta(launch.num_chunks), *lm_head_reduce_launches(model)]:
            meta = dict(meta)
            num_warps = meta.pop("num_warps")
            add(_reduce_chunks_kernel,
                dict(chunk_max_ptr="*fp32", chunk_idx_ptr="*i32", out_ptr="*i64"),
                meta, num_warps, f"{model.name} V={model.vocab} {meta['BLOCK_CHUNKS']} chunks")
    add(_advance_positions_kernel, dict(positions_ptr="*i32"), dict(BLOCK=POSITIONS_BLOCK),
        POSITIONS_WARPS, "every model")
    return found


def lm_head_reduce_launches(model: ModelShape) -> list[dict]:
    """The greedy LM head's second stage (``kernels.lm_head``) at every row count the fused
    head takes (16-bit weights: both dtypes give the same tiles)."""
    metas = []
    for rows in range(1, HEAD_MAX_ROWS + 1):
        config = head_config(rows, model.vocab, model.hidden, torch.bfloat16)
        meta = reduce_launch_meta(gemm_programs(config, model.vocab))
        if meta not in metas:
            metas.append(meta)
    return metas


CONFIGS = configurations()
REPO_ROOT = Path(__file__).resolve().parents[2]


def compile_all() -> None:
    """Child process: compile every configuration, one JSON line each (report or error)."""
    for index, (kernel, sig, constexprs, num_warps, where) in enumerate(CONFIGS.values()):
        try:
            result = asdict(compile_for_h100(kernel, sig, constexprs, num_warps=num_warps))
        except Exception as error:  # reported per configuration by the parent's tests
            result = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps({"index": index, **result}), flush=True)


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.test_aot_compile_ops"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(lines) == len(CONFIGS), (
        f"compile process failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return lines


@pytest.mark.slow  # the shared compile process takes about half a minute on two cores
@pytest.mark.parametrize("index", range(len(CONFIGS)),
                         ids=[v[4] + f" [{k[0]}]" for k, v in CONFIGS.items()])
def test_compiles_for_h100_without_spills(reports, index):
    kernel, sig, constexprs, num_warps, where = list(CONFIGS.values())[index]
    report = reports[index]
    assert "error" not in report, f"{where}: {report.get('error')}"
    print(f"{report['name']:24s} {where:44s} warps={num_warps:2d} regs={report['registers']:3d} "
          f"shared={report['shared_bytes']:6d} B spills={report['spill_stores']}/"
          f"{report['spill_loads']} stack={report['stack_bytes']}")
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{where}: register spills"
    assert report["registers"] <= 255


def test_every_model_shape_is_covered():
    """Guards the deduplication: each kernel family keeps a configuration per distinct
    compile-time shape the models need."""
    names = [key[0] for key in CONFIGS]
    rope_shapes = {(m.num_q_heads, m.num_kv_heads, m.head_dim) for m in MODELS}
    # Per shape at least: bf16 x {bf16, fp32 cache} + fp16 x {fp16, fp32 cache}, with and
    # without rows.
    assert names.count("_rope_kv_write_kernel") >= len(rope_shapes) * 8
    reduce_shapes = {(meta["BLOCK_CHUNKS"], meta["num_warps"]) for m in MODELS
                     for meta in [reduce_launch_meta(argmax_launch(m.vocab).num_chunks),
                                  *lm_head_reduce_launches(m)]}
    assert names.count("_reduce_chunks_kernel") == len(reduce_shapes)


if __name__ == "__main__":
    compile_all()
