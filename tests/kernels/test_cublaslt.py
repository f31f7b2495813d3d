"""``kernels.cublaslt``: PyTorch's product off the tuned path; on the GPU every cuBLASLt candidate
and the tuned choice against an fp32 reference, in and out of CUDA graphs."""

import math

import pytest
import torch

from kernels import cublaslt


def reference(x, weight, base=None):
    product = x.double() @ weight.double().t()
    return product if base is None else base.double() + product


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("tuned", [False, True])
def test_mm_off_the_gpu_is_torch(tuned):
    x, weight, base = torch.randn(5, 24), torch.randn(7, 24), torch.randn(5, 7)
    with cublaslt.tuned_products(tuned):
        out = cublaslt.mm(x, weight)
        acc = base.clone()
        returned = cublaslt.mm(x, weight, acc, accumulate=True)
    assert returned is acc
    torch.testing.assert_close(out, x @ weight.t())
    torch.testing.assert_close(acc, base + x @ weight.t())
    assert not cublaslt._choices


def test_accumulate_needs_out():
    with pytest.raises(ValueError, match="accumulate needs out"):
        cublaslt.mm(torch.randn(2, 8), torch.randn(3, 8), accumulate=True)


def test_tuned_products_restores_the_switch_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with cublaslt.tuned_products():
            assert cublaslt._tuning
            raise RuntimeError("boom")
    assert not cublaslt._tuning


def test_fastest_keeps_torch_unless_a_candidate_is_min_gain_faster():
    assert cublaslt.MIN_GAIN == 0.01
    assert cublaslt.fastest([10.0, 9.95, 10.2]) == -1  # 0.5% faster: not enough
    assert cublaslt.fastest([10.0, 9.95, 9.8]) == 1  # candidate 1, 2% faster
    assert cublaslt.fastest([10.0, 9.0, 9.0]) == 0  # ties go to the first


def test_timing_scratch_keeps_the_row_stride():
    """Candidates are timed on scratch operands: those must keep a row-strided view's leading
    dimension, or a plan made for it reads and writes past the scratch buffer's end."""
    wide = torch.zeros(6, 40)
    view = wide[:, 8:32]  # rows 40 apart
    scratch = cublaslt._scratch_like(view)
    assert scratch.shape == view.shape and scratch.stride() == view.stride()
    assert scratch.untyped_storage().nbytes() >= (5 * 40 + 24) * 4
    assert scratch.abs().sum() > 0  # random, not the view's zeros


# (M, N, K): decode-step-like shapes, with odd row counts and a K tail that is not a tile.
GPU_SHAPES = [(1, 256, 512), (7, 384, 1000), (64, 1024, 512), (128, 768, 2048), (200, 512, 328)]


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [False, True], ids=["store", "accumulate"])
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
def test_every_candidate_matches_the_reference(M, N, K, accumulate):
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / math.sqrt(K)
    base = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
    shape = cublaslt.ProductShape(M, N, K, x.dtype, x.dtype, K, K, N, accumulate)
    plan = cublaslt.LtPlan(shape)
    assert plan.candidates
    want = reference(x, weight, base if accumulate else None)
    for index in range(len(plan.candidates)):
        out = base.clone() if accumulate else torch.full_like(base, float("nan"))
        plan.run(index, x, weight, out)
        torch.cuda.synchronize()
        assert not out.isnan().any(), plan.describe(index)
        assert rel_err(out, want) < 1e-2, plan.describe(index)


@pytest.mark.gpu
def test_fp32_output_candidates():
    """The LM head's product: bf16 operands, fp32 logits."""
    M, N, K = 16, 4000, 256
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    plan = cublaslt.LtPlan(cublaslt.ProductShape(M, N, K, x.dtype, torch.float32, K, K, N, False))
    want = reference(x, weight)
    for index in range(len(plan.candidates)):
        out = torch.full((M, N), float("nan"), dtype=torch.float32, device="cuda")
        plan.run(index, x, weight, out)
        assert rel_err(out, want) < 1e-5, plan.describe(index)


@pytest.mark.gpu
def test_tuned_mm_chooses_once_and_replays_in_a_graph():
    M, N, K = 96, 1536, 1024
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / math.sqrt(K)
    residual = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
    start = residual.clone()
    shape = cublaslt.ProductShape(M, N, K, x.dtype, x.dtype, K, K, N, True)
    cublaslt._choices.pop((x.device, shape), None)
    with cublaslt.tuned_products():
        cublaslt.mm(x, weight, residual, accumulate=True)  # times the candidates, then runs
    choice = cublaslt.chosen(x.device, shape)
    assert choice is not None and choice.torch_us > 0 and choice.chosen_us <= choice.torch_us
    assert rel_err(residual, reference(x, weight, start)) < 1e-2

    residual.copy_(start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), cublaslt.tuned_products():
        cublaslt.mm(x, weight, residual, accumulate=True)
    assert cublaslt.chosen(x.device, shape) is choice
    for _ in range(2):
        graph.replay()
    want = start.double() + 2 * (x.double() @ weight.double().t())  # two replays, two adds
    assert rel_err(residual, want) < 1e-2


@pytest.mark.gpu
def test_tuned_mm_on_row_strided_views():
    """x and out as column slices of wider buffers (their rows a leading dimension apart):
    timed on like-strided scratch, the chosen product matches the reference and leaves the
    columns beside out untouched."""
    M, N, K = 200, 1024, 768
    wide_x = torch.randn(M, K + 256, dtype=torch.bfloat16, device="cuda")
    wide_out = torch.randn(M, N + 512, dtype=torch.bfloat16, device="cuda")
    x, out = wide_x[:, :K], wide_out[:, :N]
    weight = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / math.sqrt(K)
    shape = cublaslt._lt_shape(x, weight, out, True)
    assert shape is not None and shape.ld_x == K + 256 and shape.ld_out == N + 512
    cublaslt._choices.pop((x.device, shape), None)
    start, beside = out.clone(), wide_out[:, N:].clone()
    with cublaslt.tuned_products():
        cublaslt.mm(x, weight, out, accumulate=True)
    torch.cuda.synchronize()
    assert cublaslt.chosen(x.device, shape) is not None
    assert rel_err(out, reference(x, weight, start)) < 1e-2
    assert torch.equal(wide_out[:, N:], beside)


@pytest.mark.gpu
def test_unaligned_operands_take_torch():
    M, N, K = 32, 512, 264
    storage = torch.randn(M * K + 8, dtype=torch.bfloat16, device="cuda")
    x = storage[8:].view(M, K)  # 16 bytes past an allocation: not ALIGNMENT-aligned
    weight = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    assert cublaslt._lt_shape(x, weight, torch.empty(M, N, dtype=x.dtype, device="cuda"),
                              False) is None
    before = len(cublaslt._choices)
    with cublaslt.tuned_products():
        out = cublaslt.mm(x, weight)
    assert len(cublaslt._choices) == before
    assert rel_err(out, reference(x, weight)) < 1e-2


@pytest.mark.gpu
def test_chain_timing_counts_the_product_alone():
    """What the chain runs around each product (flush, copies) is taken out: nothing reads
    about zero, and two products about twice one. The weight (128 MB) outgrows the L2, so the
    second product streams it from memory again."""
    M, N, K = 128, 8192, 8192
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    once = lambda: torch.mm(x, weight.t(), out=out)  # noqa: E731
    nothing_us, once_us, twice_us = cublaslt.chain_product_us(
        [lambda: None, once, lambda: (once(), once())], x, out)
    assert abs(nothing_us) < 2.0
    assert once_us > 20.0  # 128 MB at most ~3.4 TB/s: at least 38 µs
    assert 1.5 < twice_us / once_us < 2.5
