"""Prefill attention benchmark: our varlen causal kernel against torch SDPA's flash backend.

Two shapes, bf16, H_q=32, H_kv=8, D=128: 8 prompts of 2048 tokens (SDPA runs them as one
[N, H, L, D] batch), and a packed batch of mixed lengths (SDPA runs one call per prompt, as it
has no varlen entry point). Prefill is compute-bound, so rows report TFLOP/s, counting the
causal half only: FLOPs = 2 * 2 * sum(L^2 / 2) * H_q * D.

    python -m bench.kernel_prefill            # the two rows
    python -m bench.kernel_prefill --sweep    # also time candidate launch configurations
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch

from bench.common import time_ms, write_json

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
UNIFORM_LENGTHS = [2048] * 8
MIXED_SEED, MIXED_COUNT, MIXED_RANGE = 0, 16, (64, 2048)


def mixed_lengths() -> list[int]:
    """16 prompt lengths uniform in [64, 2048], fixed seed (most are not block multiples)."""
    rng = random.Random(MIXED_SEED)
    return [rng.randint(*MIXED_RANGE) for _ in range(MIXED_COUNT)]


def causal_flops(lengths: list[int], num_q_heads: int, head_dim: int) -> float:
    """Two matrix products (QK^T and PV) of 2 FLOPs per multiply-add over the causal half."""
    return 2 * 2 * sum(length * length / 2 for length in lengths) * num_q_heads * head_dim


def packed_inputs(lengths: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Random packed q [T, H_q, D], k, v [T, H_kv, D] on the GPU and int32 cu_seqlens [N+1]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, head_dim, device="cuda", dtype=dtype, generator=gen)
               for h in (num_q_heads, num_kv_heads, num_kv_heads))
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    return q, k, v, cu_seqlens


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [N, H_q, L, D], k, v [N, H_kv, L, D]; causal; GQA inside the flash kernel."""
    from torch.nn.functional import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _as_sdpa_batch(x: torch.Tensor, num_seqs: int) -> torch.Tensor:
    # [N * L, H, D] -> [N, H, L, D] as a strided view: flash reads this layout natively.
    return x.view(num_seqs, -1, x.shape[1], x.shape[2]).transpose(1, 2)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _row(shape: str, lengths: list[int], head_dim: int, ours_ms: float, torch_ms: float) -> dict:
    flops = causal_flops(lengths, NUM_Q_HEADS, head_dim)
    return {"kernel": "prefill_attention", "shape": shape, "ours_us": ours_ms * 1e3,
            "torch_us": torch_ms * 1e3, "speedup": torch_ms / ours_ms,
            "tflops": flops / (ours_ms * 1e-3) / 1e12}


def bench_uniform(head_dim: int = HEAD_DIM,
                  config: tuple[int, int, int, int] | None = None) -> dict:
    """8 x 2048 tokens: ours on the packed batch vs SDPA flash on [8, H, 2048, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.prefill_attention import prefill_attention

    lengths = UNIFORM_LENGTHS
    q, k, v, cu_seqlens = packed_inputs(lengths, NUM_Q_HEADS, NUM_KV_HEADS, head_dim)
    out = torch.empty_like(q)
    seq_len, num_seqs = lengths[0], len(lengths)
    q4, k4, v4 = (_as_sdpa_batch(x, num_seqs) for x in (q, k, v))

    def ours():
        prefill_attention(q, k, v, cu_seqlens, seq_len, out=out, config=config)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        expected = _sdpa_flash(q4, k4, v4).transpose(1, 2).reshape_as(q)
        ours()
        error = _relative_error(out, expected)
        if error > 1e-2:
            raise RuntimeError(f"prefill_attention differs from SDPA: relative error {error:.2e}")
        ours_ms = time_ms(ours)
        torch_ms = time_ms(lambda: _sdpa_flash(q4, k4, v4))
    shape = f"{num_seqs}x{seq_len} causal H_q={NUM_Q_HEADS} H_kv={NUM_KV_HEADS} D={head_dim} bf16"
    return _row(shape, lengths, head_dim, ours_ms, torch_ms)


def bench_mixed() -> dict:
    """Packed mixed-length batch: ours in one launch vs one SDPA flash call per prompt."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.prefill_attention import prefill_attention

    lengths = mixed_lengths()
    q, k, v, cu_seqlens = packed_inputs(lengths, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, seed=1)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    per_prompt = [tuple(_as_sdpa_batch(x[s:e], 1) for x in (q, k, v))
                  for s, e in zip(bounds[:-1], bounds[1:])]

    def ours():
        prefill_attention(q, k, v, cu_seqlens, max(lengths), out=out)

    def sdpa_per_prompt():
        return [_sdpa_flash(*qkv) for qkv in per_prompt]

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        expected = torch.cat([o[0].transpose(0, 1) for o in sdpa_per_prompt()])
        ours()
        error = _relative_error(out, expected)
        if error > 1e-2:
            raise RuntimeError(f"prefill_attention differs from SDPA: relative error {error:.2e}")
        ours_ms = time_ms(ours)
        torch_ms = time_ms(sdpa_per_prompt)
    shape = (f"{len(lengths)} prompts U[{MIXED_RANGE[0]},{MIXED_RANGE[1]}] seed {MIXED_SEED} "
             f"({sum(lengths)} tokens) causal H_q={NUM_Q_HEADS} H_kv={NUM_KV_HEADS} D={HEAD_DIM} "
             f"bf16; SDPA per prompt")
    return _row(shape, lengths, HEAD_DIM, ours_ms, torch_ms)


def run(copy_gbps: float) -> list[dict]:
    """Benchmark rows for ``bench.kernels``. ``copy_gbps`` is accepted for the shared interface
    but unused: prefill attention is compute-bound, so rows carry TFLOP/s, not bandwidth."""
    del copy_gbps
    return [bench_uniform(), bench_mixed()]


def sweep_configs(head_dim: int) -> list[dict]:
    """Time every plausible (BLOCK_M, BLOCK_N, num_warps, num_stages) on the uniform shape at
    ``head_dim``; configurations that do not fit the SM's shared memory are reported as such."""
    from triton.runtime.errors import OutOfResources

    rows = []
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8),
                                                             (2, 3, 4)):
        if block_m % block_n:
            continue
        config = (block_m, block_n, warps, stages)
        try:
            row = bench_uniform(head_dim, config)
            rows.append({"head_dim": head_dim, "config": config, "ours_us": row["ours_us"],
                         "tflops": row["tflops"], "speedup": row["speedup"]})
        except OutOfResources as err:
            rows.append({"head_dim": head_dim, "config": config, "error": str(err)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time candidate configurations")
    parser.add_argument("--json", help="write the rows (and sweep) to this JSON file")
    args = parser.parse_args()
    from kernels.prefill_attention import prefill_config

    print(f"default config (BLOCK_M, BLOCK_N, warps, stages) at D={HEAD_DIM} bf16: "
          f"{prefill_config(HEAD_DIM, torch.bfloat16)}")
    rows = run(copy_gbps=0.0)
    for row in rows:
        print(f"{row['shape']}\n  ours {row['ours_us']:9.1f} us  SDPA flash {row['torch_us']:9.1f} us"
              f"  speedup {row['speedup']:.2f}x  {row['tflops']:.0f} TFLOP/s")
    payload = {"rows": rows}
    if args.sweep:
        payload["sweep"] = []
        for head_dim in (128, 64):
            print(f"sweep at D={head_dim}, default {prefill_config(head_dim, torch.bfloat16)}:")
            entries = sweep_configs(head_dim)
            payload["sweep"] += entries
            for entry in sorted(entries, key=lambda e: e.get("ours_us", float("inf"))):
                detail = (f"{entry['ours_us']:9.1f} us {entry['tflops']:5.0f} TFLOP/s "
                          f"{entry['speedup']:.2f}x SDPA" if "ours_us" in entry
                          else entry["error"])
                print(f"  config {entry['config']}: {detail}")
    if args.json:
        from pathlib import Path

        print(f"wrote {write_json(Path(args.json), payload)}")


if __name__ == "__main__":
    main()
