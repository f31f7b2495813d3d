"""The fused projections of kernels.linear against their plain-torch twins.

Rows up to GEMV_MAX_ROWS run the GEMV Triton kernel (through the interpreter here); more
rows take the cuBLAS composition. Outputs and the unused parts of strided residual buffers are
poisoned with NaN first: the kernel must write exactly its [M, N] block.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import linear, reference
from kernels.linear import (GEMV_MAX_ROWS, gated_linear_residual, linear_residual, norm_linear,
                            gemv_config)
from tests.kernels.numerics import assert_margins_untouched, poisoned_view, rel_l2, weights

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
EPS = 1e-5
# (M, N, K): rows the kernel takes with even and uneven N and K tiles, K over two tiles; the
# cuBLAS side of the switch.
SHAPES = [(1, 64, 256), (GEMV_MAX_ROWS, 40, 96), (1, 17, 300), (1, 24, 1100),
          (GEMV_MAX_ROWS + 3, 32, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_norm_linear_matches_reference(dtype, M, N, K, with_bias):
    x = torch.randn(M, K, dtype=dtype) * 3
    norm_w = torch.randn(K, dtype=dtype)
    w = weights(N, K, dtype)
    bias = torch.randn(N, dtype=dtype) if with_bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype)
    result = norm_linear(x, norm_w, EPS, w, bias, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = reference.norm_linear(x.float(), norm_w.float(), EPS, w.float(),
                                     None if bias is None else bias.float())
    assert rel_l2(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_residual_adds_in_place(dtype, M, N, K):
    x = torch.randn(M, K, dtype=dtype)
    w = weights(N, K, dtype)
    buffer, residual = poisoned_view(M, N, dtype, fill=torch.randn(M, N, dtype=dtype))
    expected = residual.float() + x.float() @ w.float().t()
    result = linear_residual(x, w, residual)
    assert result.data_ptr() == residual.data_ptr()
    assert rel_l2(residual, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gated_linear_residual_adds_in_place(dtype, M, N, K):
    gate_up = torch.randn(M, 2 * K, dtype=dtype) * 2
    w = weights(N, K, dtype)
    buffer, residual = poisoned_view(M, N, dtype, fill=torch.randn(M, N, dtype=dtype))
    expected = residual.float() + reference.silu_and_mul(gate_up.float()) @ w.float().t()
    gated_linear_residual(gate_up, w, residual)
    assert rel_l2(residual, expected) < TOLERANCE[dtype]
    assert_margins_untouched(buffer, N)


def test_strided_rows_of_a_wider_activation():
    """x rows taken from a wider buffer (the attention output is contiguous, but a caller's
    activations need not be)."""
    wide = torch.randn(4, 300)
    x = wide[:, 10:266]
    w = weights(32, 256, torch.float32)
    norm_w = torch.randn(256)
    out = norm_linear(x, norm_w, EPS, w)
    assert rel_l2(out, reference.norm_linear(x, norm_w, EPS, w)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("prologue", [linear.PLAIN, linear.NORM, linear.GATED])
def test_kernel_handles_several_rows(prologue):
    """The kernel itself takes any M (one program row each), as the benchmark uses it."""
    M, N, K = 3, 24, 300
    x = torch.randn(M, 2 * K if prologue == linear.GATED else K)
    w, norm_w, residual = weights(N, K, torch.float32), torch.randn(K), torch.randn(M, N)
    if prologue == linear.NORM:
        expected = reference.norm_linear(x, norm_w, EPS, w)
        actual = linear._gemv(x, w, torch.full((M, N), float("nan")), prologue,
                              norm_weight=norm_w, eps=EPS)
    else:
        ref = reference.gated_linear_residual if prologue == linear.GATED else reference.linear_residual
        expected = ref(x, w, residual.clone())
        actual = linear._gemv(x, w, residual, prologue, residual=residual)
    assert rel_l2(actual, expected) < TOLERANCE[torch.float32]


def test_kernel_path_is_taken_for_few_rows(monkeypatch):
    """Up to GEMV_MAX_ROWS rows the fused kernel runs, beyond it the composition."""
    calls = []
    original = linear._gemv
    monkeypatch.setattr(linear, "_gemv", lambda *a, **k: calls.append(1) or original(*a, **k))
    w = weights(16, 64, torch.float32)
    linear_residual(torch.randn(GEMV_MAX_ROWS, 64), w, torch.zeros(GEMV_MAX_ROWS, 16))
    assert calls == [1]
    linear_residual(torch.randn(GEMV_MAX_ROWS + 1, 64), w, torch.zeros(GEMV_MAX_ROWS + 1, 16))
    assert calls == [1]


@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),
                                 (6144, 4096), (4096, 14336), (28672, 4096), (40, 96)])
def test_gemv_config_fills_the_gpu(n, k):
    config = gemv_config(n, k, torch.bfloat16)
    if n >= 2048:  # every projection of the served models: a program for every SM
        assert -(-n // config.block_n) >= 132
    # Several 16-byte weight loads in flight per thread and iteration (or the whole row).
    per_thread_bytes = config.block_n * config.block_k * 2 // (32 * config.num_warps)
    assert per_thread_bytes >= 64 or config.block_k >= k
    assert 16 <= config.block_k <= 1024 and config.block_k & (config.block_k - 1) == 0
    assert gemv_config(n, k, torch.bfloat16) == config  # a pure function
    assert not config.pdl and config.prefetch_k == 0


@pytest.mark.parametrize("k", [96, 2048, 8192])
def test_gemv_config_prefetches_whole_lines_of_the_first_k_tile_under_pdl(k):
    """A dependent launch prefetches its rows' first columns, in whole 128-byte lines of 16-bit
    weights and never past the first K tile; fp32 weights (parity runs) prefetch nothing."""
    for dtype in (torch.bfloat16, torch.float16):
        config = gemv_config(4096, k, dtype, pdl=True)
        assert config.pdl and 0 < config.prefetch_k <= min(linear.GEMV_PREFETCH_K,
                                                            config.block_k)
        assert config.prefetch_k % 64 == 0
        assert dataclasses.replace(config, pdl=False, prefetch_k=0) == gemv_config(4096, k, dtype)
    assert gemv_config(4096, k, torch.float32, pdl=True).prefetch_k == 0


def test_bad_inputs_are_refused_with_clear_errors():
    x, w = torch.randn(2, 64), weights(16, 64, torch.float32)
    with pytest.raises(ValueError, match="does not match weight"):
        norm_linear(torch.randn(2, 32), torch.ones(32), EPS, w)
    with pytest.raises(ValueError, match="norm_weight"):
        norm_linear(x, torch.ones(63), EPS, w)
    with pytest.raises(ValueError, match="share one of"):
        linear_residual(x.half(), w, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="residual must be"):
        linear_residual(x, w, torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        gated_linear_residual(torch.randn(2, 65), w, torch.zeros(2, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, GEMV_MAX_ROWS])
@pytest.mark.parametrize("N,K", [(3072, 2048), (2048, 8192), (6144, 4096), (1152, 896)])
def test_gpu_bf16_model_projections(M, N, K):
    """The compiled kernel (every prologue) on model projection shapes, bf16 against fp32."""
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(M, 2 * K, dtype=bf16, device=dev)
    w = (torch.randn(N, K, device=dev) * K ** -0.5).to(bf16)
    norm_w = torch.randn(K, dtype=bf16, device=dev)
    bias = torch.randn(N, dtype=bf16, device=dev)
    out = torch.full((M, N), float("nan"), dtype=bf16, device=dev)
    norm_linear(x[:, :K], norm_w, EPS, w, bias, out=out)
    expected = reference.norm_linear(x[:, :K].float(), norm_w.float(), EPS, w.float(), bias.float())
    assert rel_l2(out, expected) < 1e-2
    residual = torch.randn(M, N, dtype=bf16, device=dev)
    expected = reference.gated_linear_residual(x.float(), w.float(), residual.float())
    assert rel_l2(gated_linear_residual(x, w, residual), expected) < 1e-2
    residual = torch.randn(M, N, dtype=bf16, device=dev)
    expected = reference.linear_residual(x[:, :K].float(), w.float(), residual.float())
    assert rel_l2(linear_residual(x[:, :K], w, residual), expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,inter", [(2048, 8192), (4096, 14336), (896, 4864)])
def test_gpu_one_row_layers_in_a_graph(hidden, inter):
    """The one-row GEMV kernels as programmatic dependent launches (L2 prefetch, then the wait)
    on model shapes: two layers' projections, each reading what the one before wrote (QKV-sized
    norm_linear, the output projection's residual add, the MLP's norm + gate/up and SiLU-and-mul
    + down), captured in a CUDA graph; bf16 against fp32 references of each step."""
    dev, bf16 = "cuda", torch.bfloat16
    assert linear.gemv_config(hidden, inter, bf16, linear._gemv_pdl(torch.device(dev))).pdl
    layers = [dict(qkv=(torch.randn(3 * hidden, hidden, device=dev) * hidden ** -0.5).to(bf16),
                   o=(torch.randn(hidden, 3 * hidden, device=dev) * (3 * hidden) ** -0.5).to(bf16),
                   gate_up=(torch.randn(2 * inter, hidden, device=dev) * hidden ** -0.5).to(bf16),
                   down=(torch.randn(hidden, inter, device=dev) * inter ** -0.5).to(bf16))
              for _ in range(2)]
    start = torch.randn(1, hidden, dtype=bf16, device=dev)
    residual = start.clone()
    qkvs = [torch.full((1, 3 * hidden), float("nan"), dtype=bf16, device=dev) for _ in layers]
    after_o = [torch.full((1, hidden), float("nan"), dtype=bf16, device=dev) for _ in layers]

    def step():
        residual.copy_(start)
        for layer, qkv, snapshot in zip(layers, qkvs, after_o):
            norm_linear(residual, None, EPS, layer["qkv"], out=qkv)
            linear_residual(qkv, layer["o"], residual)
            snapshot.copy_(residual)
            linear.mlp_residual(residual, None, EPS, layer["gate_up"], layer["down"])

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t in (residual, *qkvs, *after_o):
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    layer_input = start.float()
    for layer, qkv, snapshot in zip(layers, qkvs, after_o):
        w = {name: t.float() for name, t in layer.items()}
        assert rel_l2(qkv, reference.norm_linear(layer_input, None, EPS, w["qkv"])) < 1e-2
        assert rel_l2(snapshot, layer_input + qkv.float() @ w["o"].t()) < 1e-2
        gate_up = reference.norm_linear(snapshot.float(), None, EPS, w["gate_up"])
        layer_input = snapshot.float() + reference.silu_and_mul(gate_up) @ w["down"].t()
    assert rel_l2(residual, layer_input) < 1e-2


def rope_case(dtype, T=1, hidden=96, heads=(4, 2), D=32, with_bias=True, cache_dtype=None,
              positions=None):
    """Inputs of qkv_rope_write: x [T, hidden], weights, a [T + 1, 12, H_kv, D] slab filled with
    random values (so any stray write shows), positions and RoPE tables."""
    from kernels.rope_table import rope_cos_sin

    H_q, H_kv = heads
    N = (H_q + 2 * H_kv) * D
    cos, sin = rope_cos_sin(D, 64, 10000.0, None)
    slab = torch.randn(T + 1, 12, H_kv, D).to(cache_dtype or dtype)
    return dict(x=torch.randn(T, hidden, dtype=dtype) * 2, norm_weight=torch.randn(hidden, dtype=dtype),
                eps=EPS, weight=weights(N, hidden, dtype),
                bias=torch.randn(N, dtype=dtype) if with_bias else None,
                num_q_heads=H_q, num_kv_heads=H_kv, k_cache=slab.clone(), v_cache=slab.clone(),
                positions=torch.tensor(positions or [7] * T, dtype=torch.int32), cos=cos, sin=sin)


def run_both(case: dict):
    """(ours, reference): each returns (q, k_cache, v_cache) on its own copy of the slab."""
    copy = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    ours = linear.qkv_rope_write(**case)
    expected = reference.qkv_rope_write(**copy)
    return (ours, case["k_cache"], case["v_cache"]), (expected, copy["k_cache"], copy["v_cache"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,D,with_bias", [((4, 2), 32, True), ((7, 1), 64, False),
                                               ((2, 2), 16, True)])
def test_qkv_rope_write_one_token_matches_reference(dtype, heads, D, with_bias):
    """One token: the fused kernel (projection + RoPE + slab write) against the composition;
    the whole slab is compared, so a write to any other slot or row fails."""
    ours, expected = run_both(rope_case(dtype, heads=heads, D=D, with_bias=with_bias))
    assert ours[0].shape == (1, heads[0], D)
    assert rel_l2(ours[0], expected[0]) < TOLERANCE[dtype]
    for actual, wanted in zip(ours[1:], expected[1:]):
        assert_slot_written(actual, wanted, row=0, slot=7, tolerance=TOLERANCE[dtype])


def assert_slot_written(actual: torch.Tensor, wanted: torch.Tensor, row: int, slot: int,
                        tolerance: float) -> None:
    """The slab slot (row, slot) matches within tolerance; every other slot is untouched."""
    assert rel_l2(actual[row, slot], wanted[row, slot].to(actual.dtype)) < tolerance
    others = torch.ones(actual.shape[:2], dtype=torch.bool)
    others[row, slot] = False
    assert torch.equal(actual[others], wanted[others].to(actual.dtype))


def test_qkv_rope_write_dead_row_writes_nothing():
    case = rope_case(torch.float32, positions=[-1])
    before_k, before_v = case["k_cache"].clone(), case["v_cache"].clone()
    ours, expected = run_both(case)
    assert torch.equal(ours[1], before_k) and torch.equal(ours[2], before_v)
    assert rel_l2(ours[0], expected[0]) < TOLERANCE[torch.float32]  # q unrotated, as the reference


def test_qkv_rope_write_fp32_cache_and_several_tokens():
    """An fp16 model over an fp32 slab (the kernel casts on store), and the T > 1 composition."""
    ours, expected = run_both(rope_case(torch.float16, cache_dtype=torch.float32))
    assert all(rel_l2(a, b) < TOLERANCE[torch.float16] for a, b in zip(ours, expected))
    ours, expected = run_both(rope_case(torch.float32, T=3, positions=[5, -1, 11]))
    assert all(rel_l2(a, b) < TOLERANCE[torch.float32] for a, b in zip(ours, expected))


def test_qkv_rope_write_takes_the_kernel_for_one_token(monkeypatch):
    calls = []
    original = linear._qkv_rope_kernel
    monkeypatch.setattr(linear, "_qkv_rope_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: calls.append(grid)
                                         or original[grid]})())
    run_both(rope_case(torch.float32))
    assert len(calls) == 1
    run_both(rope_case(torch.float32, T=2))
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,D", [(2048, 64), (4096, 128)])
def test_gpu_qkv_rope_write_model_shapes(hidden, D):
    """The compiled fused kernel on the Llama-3.2-1B / 3.1-8B QKV shapes in bf16, against the
    composition in fp32; the slab is compared whole."""
    case = rope_case(torch.bfloat16, hidden=hidden, heads=(32, 8), D=D, with_bias=False)
    case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    fp32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in case.items()}
    expected = reference.qkv_rope_write(**fp32)
    q = linear.qkv_rope_write(**case)
    assert rel_l2(q, expected) < 1e-2
    for name in ("k_cache", "v_cache"):
        assert_slot_written(case[name].cpu(), fp32[name].cpu(), row=0, slot=7, tolerance=1e-2)
