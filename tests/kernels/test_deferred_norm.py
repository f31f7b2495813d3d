"""The deferred RMSNorm: with the norm weight folded into the projection, the product is taken
of the raw rows and the kernel after it (RoPE + K/V write, SiLU-and-mul) applies 1 / rms(x).

Every op is compared with its plain-torch twin, which normalises first and multiplies after,
on random inputs with outputs and slabs poisoned or filled with random values first.
"""

from __future__ import annotations

import pytest
import torch

from kernels import gemm, linear, reference
from kernels.activation import silu_and_mul
from kernels.rmsnorm import rmsnorm
from kernels.rope_kv_write import rope_kv_write
from kernels.rope_table import rope_cos_sin
from tests.kernels.numerics import rel_l2

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-5


def rows(t: int, hidden: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Rows of very different scales, as a residual stream has: a missing or misplaced 1 / rms
    cannot hide."""
    scales = torch.logspace(-1, 1.5, t, device=device)[:, None]
    return (torch.randn(t, hidden, device=device) * scales).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 96), (5, 300), (3, 4, 16)])
def test_rmsnorm_without_weight(dtype, shape):
    x = torch.randn(*shape, dtype=dtype) * 3
    out = torch.full(shape, float("nan"), dtype=dtype)
    rmsnorm(x, None, EPS, out=out)
    expected = reference.rmsnorm(x.reshape(-1, shape[-1]), None, EPS).reshape(shape)
    assert rel_l2(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,inter,hidden", [(1, 300, 96), (3, 1100, 1500), (17, 1500, 2100),
                                            (2, 50, 9000), (300, 40, 64)])
def test_silu_and_mul_scales_by_rms(dtype, T, inter, hidden):
    """Both block sizes with partial last blocks, and rows of x longer than one norm block."""
    x = rows(T, hidden, dtype)
    gate_up = torch.randn(T, 2 * inter).to(dtype)
    out = torch.full((T, inter), float("nan"), dtype=dtype)
    silu_and_mul(gate_up, out=out, norm_input=x, eps=EPS)
    expected = reference.silu_and_mul(gate_up.float(), norm_input=x.float(), eps=EPS)
    assert rel_l2(out, expected) < TOLERANCE[dtype]
    unscaled = reference.silu_and_mul(gate_up.float())
    assert rel_l2(out, unscaled) > 0.1  # the scale is really applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,D", [((4, 2), 32), ((7, 1), 64)])
def test_rope_kv_write_scales_by_rms(dtype, heads, D):
    """q (in place), k and v scaled by their token's 1 / rms; a dead token writes nothing to
    the slab and its q is scaled, not rotated; the whole slab is compared."""
    H_q, H_kv = heads
    T, hidden, B, C = 4, 200, 5, 16
    x = rows(T, hidden, dtype)
    qkv = torch.randn(T, (H_q + 2 * H_kv) * D, dtype=dtype)
    slab = torch.randn(B, C, H_kv, D, dtype=dtype)
    cos, sin = rope_cos_sin(D, C, 10000.0, None)
    positions = torch.tensor([3, -1, 0, C - 1], dtype=torch.int32)

    results = []
    for op in (rope_kv_write, reference.rope_kv_write):
        buffer, k_cache, v_cache = qkv.clone(), slab.clone(), slab.clone()
        q, k, v = (t.view(T, -1, D) for t in buffer.split([H_q * D, H_kv * D, H_kv * D], -1))
        op(q, k, v, k_cache, v_cache, positions, cos, sin, norm_input=x, eps=EPS)
        results.append((q, k_cache, v_cache))
    (q, k_cache, v_cache), (q_ref, k_ref, v_ref) = results
    assert rel_l2(q, q_ref) < TOLERANCE[dtype]
    dead_q = qkv[1, : H_q * D].view(H_q, D).float() * torch.rsqrt(x[1].float().pow(2).mean() + EPS)
    assert rel_l2(q[1], dead_q) < TOLERANCE[dtype]  # dead token: scaled, not rotated
    for actual, wanted in ((k_cache, k_ref), (v_cache, v_ref)):
        assert rel_l2(actual, wanted) < TOLERANCE[dtype]
        written = torch.zeros(B, C, dtype=torch.bool)
        written[[0, 2, 3], [3, 0, C - 1]] = True
        assert torch.equal(actual[~written], slab[~written])
    # The value rows are the scaled projections themselves.
    v_new = qkv[:, (H_q + H_kv) * D:].view(T, H_kv, D).float()
    scale = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)[:, None, None]
    assert rel_l2(v_cache[3, C - 1], (v_new * scale)[3]) < TOLERANCE[dtype]


def qkv_case(dtype, T, with_bias=False, hidden=96, heads=(4, 2), D=32):
    H_q, H_kv = heads
    N = (H_q + 2 * H_kv) * D
    cos, sin = rope_cos_sin(D, 64, 10000.0, None)
    slab = torch.randn(T + 1, 12, H_kv, D).to(dtype)
    return dict(x=rows(T, hidden, dtype), norm_weight=None, eps=EPS,
                weight=(torch.randn(N, hidden) * hidden ** -0.5).to(dtype),
                bias=(torch.randn(N) * 0.1).to(dtype) if with_bias else None,
                num_q_heads=H_q, num_kv_heads=H_kv, k_cache=slab.clone(), v_cache=slab.clone(),
                positions=torch.tensor(([5, -1, 11, 2] * T)[:T], dtype=torch.int32), cos=cos,
                sin=sin)


@pytest.mark.parametrize("dtype,T,with_bias,heads", [
    (torch.float32, 1, False, (4, 2)), (torch.float32, 4, False, (4, 2)),
    (torch.float32, 3, True, (4, 2)), (torch.float16, 4, False, (4, 2)),
    (torch.float16, 1, True, (4, 2)), (torch.float32, 19, False, (4, 2)),
    (torch.float16, 19, False, (4, 2)), (torch.float32, 19, True, (4, 2)),
    (torch.float32, 4, False, (7, 1)), (torch.float16, 19, False, (14, 2))])  # MQA, GQA 7
def test_qkv_rope_write_with_a_folded_norm(dtype, T, with_bias, heads):
    """One token: the GEMV kernel normalising without a weight. More tokens: the raw rows'
    product (kernels.gemm from GEMM_MIN_ROWS rows) and the deferred scale in
    rope_kv_write (fp32), or the norm first (a bias, fp16: the norm kernel, or kernels.gemm's
    NORM prologue)."""
    case = qkv_case(dtype, T, with_bias, heads=heads)
    copy = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    fp32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in copy.items()}
    q = linear.qkv_rope_write(**case)
    q_ref = reference.qkv_rope_write(**fp32)
    assert rel_l2(q, q_ref) < TOLERANCE[dtype]
    for name in ("k_cache", "v_cache"):
        assert rel_l2(case[name], fp32[name]) < TOLERANCE[dtype]


def test_deferral_is_taken_only_where_it_is_exact(monkeypatch):
    """Several rows on cuBLAS (4, with the small-rows GEMM off) with a folded norm in fp32 /
    bf16: no norm kernel. With a norm weight, a QKV bias or fp16 (whose raw products may
    overflow): the norm kernel runs first."""
    monkeypatch.setattr(linear, "SMALL_ROWS_GEMM", False)
    calls = []
    original = linear.rmsnorm
    monkeypatch.setattr(linear, "rmsnorm", lambda *a, **k: calls.append(1) or original(*a, **k))
    linear.qkv_rope_write(**qkv_case(torch.float32, 4))
    linear.mlp_residual(*mlp_case(torch.float32, 4, with_norm_weight=False))
    assert calls == []
    linear.qkv_rope_write(**qkv_case(torch.float32, 3, with_bias=True))
    linear.qkv_rope_write(**qkv_case(torch.float16, 4))
    linear.mlp_residual(*mlp_case(torch.float16, 4, with_norm_weight=False))
    linear.mlp_residual(*mlp_case(torch.float32, 4, with_norm_weight=True))
    assert len(calls) == 4


def mlp_case(dtype, M, with_norm_weight, hidden=96, inter=160):
    return (rows(M, hidden, dtype),
            torch.randn(hidden).to(dtype) if with_norm_weight else None, EPS,
            (torch.randn(2 * inter, hidden) * hidden ** -0.5).to(dtype),
            (torch.randn(hidden, inter) * inter ** -0.5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 19])
@pytest.mark.parametrize("with_norm_weight", [False, True])
def test_mlp_residual_matches_reference(dtype, M, with_norm_weight):
    residual, norm_weight, eps, gate_up_weight, down_weight = mlp_case(dtype, M, with_norm_weight)
    expected = reference.mlp_residual(
        residual.float(), None if norm_weight is None else norm_weight.float(), eps,
        gate_up_weight.float(), down_weight.float())
    result = linear.mlp_residual(residual, norm_weight, eps, gate_up_weight, down_weight)
    assert result is residual
    assert rel_l2(residual, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [2, 19, 64])
@pytest.mark.parametrize("with_norm_weight", [False, True])
def test_output_mlp_residual_matches_reference(dtype, M, with_norm_weight):
    """The rest of the layer after attention; with a folded norm, 2 (the transposed tile in
    fp16), 19 and 64 rows take the output product's partial sums of squares into the gate/up
    product."""
    residual, norm_weight, eps, gate_up_weight, down_weight = mlp_case(dtype, M, with_norm_weight)
    attn = rows(M, 64, dtype)
    o_weight = (torch.randn(residual.shape[1], 64) * 64 ** -0.5).to(dtype)
    expected = reference.output_mlp_residual(
        attn.float(), o_weight.float(), residual.float(),
        None if norm_weight is None else norm_weight.float(), eps, gate_up_weight.float(),
        down_weight.float())
    result = linear.output_mlp_residual(attn, o_weight, residual, norm_weight, eps,
                                        gate_up_weight, down_weight)
    assert result is residual
    assert rel_l2(residual, expected) < TOLERANCE[dtype]


def test_output_mlp_residual_takes_the_norm_from_the_output_product(monkeypatch):
    """A folded norm at GEMM_MIN_ROWS..GEMM_MAX_ROWS rows: the output product writes the
    partials that the gate/up product reads; other cases run the ops one after the other."""
    prologues = []
    original = linear.skinny_gemm

    def spy(x, weight, out, prologue=gemm.PLAIN, **kw):
        prologues.append((prologue, kw.get("row_sumsq") is not None))
        return original(x, weight, out, prologue, **kw)

    monkeypatch.setattr(linear, "skinny_gemm", spy)
    residual, _, eps, gate_up_weight, down_weight = mlp_case(torch.float32, 19, False)
    attn, o_weight = rows(19, 64, torch.float32), torch.randn(residual.shape[1], 64) * 0.125
    linear.output_mlp_residual(attn, o_weight, residual, None, eps, gate_up_weight, down_weight)
    assert prologues == [(gemm.PLAIN, True), (gemm.PARTIAL_NORM, True), (gemm.PLAIN, False)]
    prologues.clear()
    linear.output_mlp_residual(attn, o_weight, residual, torch.randn(residual.shape[1]), eps,
                               gate_up_weight, down_weight)
    assert [p for p, _ in prologues] == [gemm.PLAIN, gemm.PLAIN, gemm.PLAIN]  # rmsnorm first
    assert not any(sumsq for _, sumsq in prologues)


def test_mlp_residual_refuses_mismatched_weights():
    residual, _, eps, gate_up_weight, down_weight = mlp_case(torch.float32, 2, False)
    with pytest.raises(ValueError, match=r"\[2 I, H\] and \[H, I\]"):
        linear.mlp_residual(residual, None, eps, gate_up_weight, down_weight.t().contiguous())
    with pytest.raises(ValueError, match="does not match weight"):
        linear.mlp_residual(residual[:, :64], None, eps, gate_up_weight, down_weight)
    with pytest.raises(ValueError, match="share one of"):
        linear.mlp_residual(residual, None, eps, gate_up_weight, down_weight.half())


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 256])
@pytest.mark.parametrize("hidden,inter,D", [(2048, 8192, 64), (4096, 14336, 128)])
def test_gpu_bf16_decode_layer_ops_with_folded_norms(M, hidden, inter, D):
    """The compiled kernels on the Llama-3.2-1B / 3.1-8B shapes in bf16 at the engine's batch
    sizes, against the fp32 twins: the QKV projection with RoPE and the slab write, and the MLP."""
    dev, bf16 = "cuda", torch.bfloat16
    x = rows(M, hidden, bf16, dev)
    H_q, H_kv = 32, 8
    weight = (torch.randn((H_q + 2 * H_kv) * D, hidden, device=dev) * hidden ** -0.5).to(bf16)
    cos, sin = rope_cos_sin(D, 1024, 500000.0, None, device=dev)
    slab = torch.randn(M, 1024, H_kv, D, device=dev).to(bf16)
    positions = torch.randint(0, 1024, (M,), dtype=torch.int32, device=dev)
    args = dict(eps=EPS, bias=None, num_q_heads=H_q, num_kv_heads=H_kv, positions=positions,
                cos=cos, sin=sin)
    k_cache, v_cache = slab.clone(), slab.clone()
    k_ref, v_ref = slab.float(), slab.float()
    q = linear.qkv_rope_write(x, None, weight=weight, k_cache=k_cache, v_cache=v_cache, **args)
    q_ref = reference.qkv_rope_write(x.float(), None, weight=weight.float(), k_cache=k_ref,
                                     v_cache=v_ref, **args)
    assert rel_l2(q, q_ref) < 1e-2
    assert rel_l2(k_cache, k_ref) < 1e-2 and rel_l2(v_cache, v_ref) < 1e-2

    gate_up = (torch.randn(2 * inter, hidden, device=dev) * hidden ** -0.5).to(bf16)
    down = (torch.randn(hidden, inter, device=dev) * inter ** -0.5).to(bf16)
    expected = reference.mlp_residual(x.float(), None, EPS, gate_up.float(), down.float())
    assert rel_l2(linear.mlp_residual(x.clone(), None, EPS, gate_up, down), expected) < 1e-2

    attn = rows(M, H_q * D, bf16, dev)
    o_weight = (torch.randn(hidden, H_q * D, device=dev) * (H_q * D) ** -0.5).to(bf16)
    expected = reference.output_mlp_residual(attn.float(), o_weight.float(), x.float(), None, EPS,
                                             gate_up.float(), down.float())
    result = linear.output_mlp_residual(attn, o_weight, x, None, EPS, gate_up, down)
    assert rel_l2(result, expected) < 1e-2


def test_bad_norm_input_is_refused():
    gate_up = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"silu_and_mul: norm_input must be a float \[T=3, H\]"):
        silu_and_mul(gate_up, norm_input=torch.randn(2, 8))
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    slab = torch.zeros(2, 4, 2, 8)
    cos, sin = rope_cos_sin(8, 4, 10000.0, None)
    with pytest.raises(ValueError, match="rope_kv_write: norm_input"):
        rope_kv_write(q, k, v, slab, slab.clone(), torch.zeros(2, dtype=torch.int32), cos, sin,
                      norm_input=torch.randn(2, 8).t())


@pytest.mark.parametrize("dtype,T,with_bias,heads", [
    (torch.float32, 1, False, (4, 2)), (torch.float32, 4, False, (4, 2)),
    (torch.float32, 3, True, (4, 2)), (torch.float16, 4, False, (4, 2)),
    (torch.float32, 19, False, (4, 2)),
    (torch.float32, 4, False, (14, 2)), (torch.float32, 1, False, (7, 1)),  # GQA 7, MQA
    (torch.float16, 4, True, (7, 1))])
def test_qkv_decode_attention_matches_the_composition(dtype, T, with_bias, heads):
    """The decode step's attention input and attention in one op: one row through the GEMV
    kernel's epilogue, several with RoPE and the slab write inside the attention kernel (the
    1 / rms deferred to it in fp32 without a bias); against the reference's qkv_rope_write then
    decode_attention in fp32, output and slab (dead rows: zeros, nothing written)."""
    case = qkv_case(dtype, T, with_bias, heads=heads)
    case["k_cache"], case["v_cache"] = case["k_cache"][:T], case["v_cache"][:T]  # B = T rows
    case["seq_lens"] = case["positions"] + 1
    before_k = case["k_cache"].clone()
    fp32 = {k: v.float().clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in case.items()}
    out = linear.qkv_decode_attention(**case)
    expected = reference.qkv_decode_attention(**fp32)
    live = case["positions"] >= 0
    assert out.shape == (T, heads[0], 32) and not out.isnan().any()
    assert rel_l2(out[live], expected[live]) < TOLERANCE[dtype]
    assert (out[~live] == 0).all()
    for name in ("k_cache", "v_cache"):
        assert rel_l2(case[name], fp32[name]) < TOLERANCE[dtype]
    assert torch.equal(case["k_cache"][~live], before_k[~live])


def test_rotates_in_attention_rule():
    """Few rows, and many rows with small heads, rotate in attention; one row (the GEMV
    epilogue), 17-64 rows (our QKV product) and many rows with D = 128 keep the RoPE kernel."""
    top = linear.ROPE_IN_ATTENTION_MAX_ROWS
    wide = linear.GEMM_MAX_ROWS + 1
    for rows, head_dim, expected in ((1, 64, False), (2, 64, True), (top, 128, True),
                                     (top + 1, 64, False), (wide - 1, 64, False),
                                     (wide, 64, True), (256, 32, True), (wide, 128, False),
                                     (256, 96, False)):
        assert linear.rotates_in_attention(rows, head_dim) is expected, (rows, head_dim)


@pytest.mark.parametrize("T,D", [(2, 32), (linear.ROPE_IN_ATTENTION_MAX_ROWS, 32),
                                 (linear.ROPE_IN_ATTENTION_MAX_ROWS + 1, 32), (1, 32),
                                 (linear.GEMM_MAX_ROWS + 1, 32), (linear.GEMM_MAX_ROWS + 1, 128)])
def test_qkv_decode_attention_rotates_where_the_rule_says(monkeypatch, T, D):
    """Where ``rotates_in_attention``: no RoPE kernel, the attention kernel gets the new token.
    Elsewhere past one row: the RoPE kernel, then plain attention. Output and slab match the
    reference either way."""
    rope_calls, new_tokens = [], []
    original_rope, original_attention = linear.rope_kv_write, linear.decode_attention
    monkeypatch.setattr(linear, "rope_kv_write",
                        lambda *a, **k: rope_calls.append(1) or original_rope(*a, **k))
    monkeypatch.setattr(linear, "decode_attention", lambda *a, new_token=None, **k: (
        new_tokens.append(new_token is not None) or original_attention(*a, new_token=new_token,
                                                                       **k)))
    folded = linear.rotates_in_attention(T, D)
    case = qkv_case(torch.float32, T, D=D)
    case["k_cache"], case["v_cache"] = case["k_cache"][:T], case["v_cache"][:T]
    case["seq_lens"] = case["positions"] + 1
    copy = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    out = linear.qkv_decode_attention(**case)
    assert new_tokens == [folded] and rope_calls == ([] if folded or T == 1 else [1])
    expected = reference.qkv_decode_attention(**copy)
    assert rel_l2(out, expected) < 1e-4
    for name in ("k_cache", "v_cache"):
        assert rel_l2(case[name], copy[name]) < 1e-5
