"""prefill_attention (Triton) against the plain-torch reference on random packed batches.

On the CPU the kernel runs through Triton's interpreter, so shapes stay tiny; small-block
configurations make short prompts cross several key blocks and diagonal blocks.
"""

import pytest
import torch

from kernels import reference
from kernels.prefill_attention import prefill_attention, prefill_config
from tests.kernels.numerics import rel_l2

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
SMALL_BLOCKS = (32, 16, 4, 1)  # BLOCK_M, BLOCK_N, num_warps, num_stages


def make_batch(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device="cpu", seed=0):
    """Random q, k, v [T, H, D] for the packed ``lengths`` and their int32 cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, head_dim, generator=gen).to(device=device, dtype=dtype)
               for h in (num_q_heads, num_kv_heads, num_kv_heads))
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return q, k, v, cu_seqlens.to(device)


def check_against_reference(q, k, v, cu_seqlens, max_seqlen, scale=None, config=None):
    # out is a view into a NaN buffer with a head either side and a token after the last:
    # those must stay NaN, every element of the view must be written.
    T, H_q, D = q.shape
    buffer = torch.full((T + 1, H_q + 2, D), float("nan"), dtype=q.dtype, device=q.device)
    out = buffer[:T, 1:H_q + 1]
    result = prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, out=out, config=config)
    assert result is out
    expected = reference.prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    assert torch.isfinite(out).all(), "rows left unwritten (NaN poison survived)"
    assert buffer[T].isnan().all() and buffer[:, 0].isnan().all() and buffer[:, -1].isnan().all()
    error = rel_l2(out, expected)
    assert error < TOLERANCE[q.dtype], f"relative L2 error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [SMALL_BLOCKS, None], ids=["small-blocks", "default"])
def test_mixed_lengths_not_multiples_of_blocks(dtype, config):
    lengths = [1, 17, 64, 5, 83, 31]
    check_against_reference(*make_batch(lengths, 8, 2, 64, dtype), max(lengths), config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_token_sequences(dtype):
    lengths = [1, 1, 1, 1]
    check_against_reference(*make_batch(lengths, 4, 2, 64, dtype), 1, config=SMALL_BLOCKS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_long_sequence_with_default_blocks(dtype):
    check_against_reference(*make_batch([300], 2, 1, 64, dtype), 300)


@pytest.mark.parametrize("lengths", [[7, 0, 33], [0, 12, 0, 0, 20, 0]],
                         ids=["middle", "ends-and-runs"])
def test_empty_sequences_are_skipped(lengths):
    check_against_reference(*make_batch(lengths, 4, 2, 64, torch.float32), max(lengths),
                            config=SMALL_BLOCKS)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (14, 2), (6, 1)],
                         ids=["group1", "group4", "group7", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa_groups(num_q_heads, num_kv_heads, dtype):
    lengths = [19, 40, 3]
    check_against_reference(*make_batch(lengths, num_q_heads, num_kv_heads, 64, dtype, seed=1),
                            max(lengths), config=SMALL_BLOCKS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dim_128(dtype):
    lengths = [45, 9, 70]
    check_against_reference(*make_batch(lengths, 4, 2, 128, dtype, seed=2), max(lengths),
                            config=SMALL_BLOCKS)


@pytest.mark.parametrize("head_dim", [40, 80])
def test_head_dim_not_a_power_of_two(head_dim):
    lengths = [21, 50]
    check_against_reference(*make_batch(lengths, 4, 2, head_dim, torch.float32, seed=3),
                            max(lengths), config=SMALL_BLOCKS)


def test_strided_views_of_a_fused_qkv_output():
    lengths, num_q_heads, num_kv_heads, head_dim = [30, 11, 52], 8, 2, 64
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(sum(lengths), (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q = q.view(-1, num_q_heads, head_dim)
    k = k.view(-1, num_kv_heads, head_dim)
    v = v.view(-1, num_kv_heads, head_dim)
    assert not q.is_contiguous()
    cu_seqlens = torch.tensor([0, 30, 41, 93], dtype=torch.int32)
    check_against_reference(q, k, v, cu_seqlens, max(lengths), config=SMALL_BLOCKS)


def test_explicit_scale_and_fresh_output():
    q, k, v, cu_seqlens = make_batch([25, 38], 4, 2, 64, torch.float32, seed=5)
    out = prefill_attention(q, k, v, cu_seqlens, 38, scale=0.3, config=SMALL_BLOCKS)
    expected = reference.prefill_attention(q, k, v, cu_seqlens, 38, scale=0.3)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_l2(out, expected) < TOLERANCE[torch.float32]


def test_max_seqlen_larger_than_needed_is_harmless():
    q, k, v, cu_seqlens = make_batch([10, 20], 2, 1, 64, torch.float32, seed=6)
    check_against_reference(q, k, v, cu_seqlens, 100, config=SMALL_BLOCKS)


def test_no_sequences_returns_without_launching():
    q, k, v, _ = make_batch([4], 2, 1, 64, torch.float32)
    out = prefill_attention(q[:0], k[:0], v[:0], torch.zeros(1, dtype=torch.int32), 0)
    assert out.shape == (0, 2, 64)


def test_config_is_pure_and_valid():
    for head_dim in (64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            block_m, block_n, num_warps, num_stages = prefill_config(head_dim, dtype)
            assert prefill_config(head_dim, dtype) == (block_m, block_n, num_warps, num_stages)
            assert block_m % block_n == 0 and block_n >= 16 and num_warps in (4, 8)
    assert prefill_config(128, torch.bfloat16)[0] == 128


@pytest.mark.parametrize("mutate,message", [
    (lambda a: {**a, "k": a["k"][:, :1].expand(-1, 3, -1), "v": a["v"][:, :1].expand(-1, 3, -1)},
     "multiple of H_kv"),
    (lambda a: {**a, "v": a["v"].half()}, "one dtype"),
    (lambda a: {**a, "q": a["q"].to(torch.float64)}, "one dtype"),
    (lambda a: {**a, "q": a["q"].transpose(0, 2).contiguous().transpose(0, 2)},
     "contiguous last dim"),
    (lambda a: {**a, "cu_seqlens": a["cu_seqlens"].long()}, "int32"),
    (lambda a: {**a, "k": a["k"][:-1], "v": a["v"][:-1]}, "share T and D"),
    (lambda a: {**a, "v": a["v"][:, :, :32]}, "shapes differ"),
    (lambda a: {**a, "max_seqlen": -1}, "max_seqlen"),
    (lambda a: {**a, "scale": 0.0}, "scale"),
    (lambda a: {**a, "config": (32, 64, 4, 1)}, "multiple of BLOCK_N"),
    (lambda a: {**a, "config": (32, 8, 4, 1)}, "power of two"),
    (lambda a: {**a, "out": torch.empty(3, 2, 64)}, "out must be"),
])
def test_bad_input_is_rejected_with_a_clear_message(mutate, message):
    q, k, v, cu_seqlens = make_batch([8], 4, 2, 64, torch.float32)
    args = mutate(dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=8))
    with pytest.raises((ValueError, TypeError), match=message):
        prefill_attention(**args)


@pytest.mark.gpu
def test_bf16_benchmark_shape_on_gpu():
    lengths = [2048] * 8
    check_against_reference(*make_batch(lengths, 32, 8, 128, torch.bfloat16, device="cuda"),
                            2048)


@pytest.mark.gpu
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim",
                         [(32, 8, 128), (14, 2, 64), (4, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mixed_batch_on_gpu(num_q_heads, num_kv_heads, head_dim, dtype):
    lengths = [1, 700, 0, 129, 64, 1000, 3]
    check_against_reference(
        *make_batch(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device="cuda", seed=7),
        max(lengths))
