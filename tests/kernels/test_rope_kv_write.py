"""rope_kv_write against the plain-torch reference, with the whole cache poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.rope_kv_write import rope_kv_write
from kernels.rope_table import rope_cos_sin
from tests.kernels.numerics import rel_l2

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 1e-2}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def fused_qkv(T: int, hq: int, hkv: int, d: int, dtype, device="cpu"):
    """Random [T, (hq + 2 hkv) * d] projection output and its q, k, v head views (strided)."""
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    return qkv, q, k, v


def run_both(T, hq, hkv, d, B, C, positions, rows=None, dtype=torch.float32, cache_dtype=None,
             scaling=None, device="cpu"):
    """Runs kernel and reference on identical inputs; checks everything; returns the kernel's
    (qkv, k_cache) for extra checks."""
    cache_dtype = cache_dtype or dtype
    qkv, q, k, v = fused_qkv(T, hq, hkv, d, dtype, device)
    qkv_ref = qkv.clone()
    q_ref = qkv_ref[:, : hq * d].view(T, hq, d)
    qkv_before = qkv.clone()
    k_cache = torch.full((B, C, hkv, d), float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    cos, sin = rope_cos_sin(d, C, 500000.0, scaling, device=device)
    positions = torch.tensor(positions, dtype=torch.int32, device=device)
    rows = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=device)

    rope_kv_write(q, k, v, k_cache, v_cache, positions, cos, sin, rows)
    reference.rope_kv_write(q_ref, k.clone(), v.clone(), k_cache_ref, v_cache_ref, positions,
                            cos, sin, rows)

    # Exactly the live tokens' slots were written, every head and element of them.
    written = torch.zeros(B, C, dtype=torch.bool, device=device)
    live = positions >= 0
    token_rows = torch.arange(T, device=device) if rows is None else rows.long()
    written[token_rows[live], positions[live].long()] = True
    for cache in (k_cache, v_cache):
        assert not cache[written].isnan().any(), "a target slot was left unwritten"
        assert cache[~written].isnan().all(), "a slot outside the targets was written"

    if live.any():
        assert rel_l2(k_cache[written], k_cache_ref[written]) < TOLERANCE[cache_dtype]
        assert torch.equal(v_cache[written], v_cache_ref[written]), "v must be copied exactly"
        assert rel_l2(q[live], q_ref[live]) < TOLERANCE[dtype]
    # Dead tokens' q, and all of k and v, are left exactly as they were.
    assert torch.equal(q[~live], qkv_before[:, : hq * d].view(T, hq, d)[~live])
    assert torch.equal(qkv[:, hq * d:], qkv_before[:, hq * d:])
    return qkv_before, q, k_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_single_token_last_slot(dtype):
    run_both(T=1, hq=4, hkv=2, d=64, B=1, C=8, positions=[7], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
def test_decode_gqa7_dead_rows(dtype, scaling):
    """Qwen2.5-0.5B's 14/2 heads; rows at slot 0, the last slot C-1 and dead (-1) mixed in."""
    run_both(T=5, hq=14, hkv=2, d=64, B=6, C=12, positions=[0, -1, 11, 5, -1], dtype=dtype,
             scaling=scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_packed_rows(dtype):
    """Three prompts packed into one launch: rows given explicitly, one padding token."""
    rows = [2, 2, 2, 0, 0, 3, 1]
    positions = [0, 1, 2, 0, 1, -1, 15]
    run_both(T=7, hq=8, hkv=2, d=128, B=4, C=16, positions=positions, rows=rows, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp32_cache(dtype):
    run_both(T=3, hq=4, hkv=2, d=64, B=3, C=5, positions=[4, 0, -1], dtype=dtype,
             cache_dtype=torch.float32)


def test_head_dim_not_power_of_two():
    run_both(T=2, hq=6, hkv=3, d=96, B=2, C=4, positions=[3, 1], dtype=torch.float32)


def test_position_zero_is_identity():
    """cos(0) = 1, sin(0) = 0: a token at slot 0 keeps q and k bit for bit."""
    qkv_before, q, k_cache = run_both(T=2, hq=4, hkv=2, d=64, B=2, C=4, positions=[0, 0])
    assert torch.equal(q, qkv_before[:, : 4 * 64].view(2, 4, 64))
    assert torch.equal(k_cache[:, 0], qkv_before[:, 4 * 64: 6 * 64].view(2, 2, 64))


def test_all_tokens_dead_writes_nothing():
    run_both(T=3, hq=4, hkv=2, d=64, B=3, C=4, positions=[-1, -1, -1])


def test_rejects_bad_inputs():
    _, q, k, v = fused_qkv(2, 4, 2, 64, torch.float16)
    cache = torch.zeros(2, 4, 2, 64, dtype=torch.float16)
    cos, sin = rope_cos_sin(64, 4, 10000.0)
    pos = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="positions must be int32"):
        rope_kv_write(q, k, v, cache, cache.clone(), pos.long(), cos, sin)
    with pytest.raises(ValueError, match="k_cache dtype"):
        rope_kv_write(q, k, v, cache.bfloat16(), cache.bfloat16(), pos, cos, sin)
    with pytest.raises(ValueError, match=r"\[B, C, H_kv=2, D=64\]"):
        rope_kv_write(q, k, v, cache[:, :, :1], cache[:, :, :1], pos, cos, sin)
    with pytest.raises(ValueError, match="exceeds the slab's B=1"):
        rope_kv_write(q, k, v, cache[:1], cache[:1], pos, cos, sin)
    with pytest.raises(ValueError, match="cos must be a contiguous fp32"):
        rope_kv_write(q, k, v, cache, cache.clone(), pos, cos.half(), sin)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 64), (32, 8, 128), (14, 2, 64)],
                         ids=["llama-1b", "llama-8b", "qwen-0.5b"])
@pytest.mark.parametrize("T", [1, 256])
def test_gpu_bf16_real_sizes(hq, hkv, d, T):
    C = 512
    positions = torch.randint(0, C, (T,)).tolist()
    positions[T // 2] = -1 if T > 1 else positions[0]
    run_both(T=T, hq=hq, hkv=hkv, d=d, B=T, C=C, positions=positions, dtype=torch.bfloat16,
             scaling=LLAMA3_SCALING, device="cuda")


@pytest.mark.gpu
def test_gpu_bf16_prefill_rows():
    T, C = 512, 1024
    slots = torch.randperm(4 * C)[:T]  # distinct (row, position) pairs
    rows, positions = (slots // C).tolist(), (slots % C).tolist()
    run_both(T=T, hq=32, hkv=8, d=128, B=4, C=C, positions=positions, rows=rows,
             dtype=torch.bfloat16, device="cuda")
