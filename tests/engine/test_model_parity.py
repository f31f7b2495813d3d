"""The engine's forward (packed prefill, then slab decode with a dead row) against transformers."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVArena
from engine.model import CausalLM, load_model
from tests.engine.conftest import FAMILIES, hf_next_token_logits

# Prompts of different lengths, including a single token; ids stay below the tiny vocabularies.
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [12], [200, 201, 202, 9, 8, 77, 66, 55, 44, 33, 22],
           [3, 1, 4, 1, 5]]
DECODE_STEPS = 8
DEAD_ROW = 1  # slab row that never holds a sequence
RETIRED = (4, 3)  # slab row 4 goes dead after this many decode steps
POISON = 1e3  # finite, so reference attention's 0-weight * value stays 0; any read of it shows


def run_engine(model: CausalLM, prompts: list[list[int]], steps: int, cache_dtype: torch.dtype,
               forced: list[list[int]] | None = None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill ``prompts`` packed into slab rows 0, 2, 3, ... (row 1 stays dead), then ``steps``
    decode steps; row 4 retires (positions = -1) after ``RETIRED[1]`` steps.

    Tokens are the engine's own greedy choices, or ``forced[n]`` (teacher forcing) when given.
    Returns per prompt the tokens fed to decode and its logits ``[1 + fed, V]`` (fp32, CPU).
    Also checks the slab's dead row was never written and every logit is finite.
    """
    config, device = model.config, model.device
    rows = [r for r in range(len(prompts) + 1) if r != DEAD_ROW]
    B, C = len(prompts) + 1, max(map(len, prompts)) + steps + 3
    arena = KVArena(config.num_layers, config.num_kv_heads, config.head_dim, B * C, cache_dtype,
                    device)
    arena.k.fill_(POISON)
    arena.v.fill_(-POISON)
    kv = arena.slab(B, C)

    lens = [len(p) for p in prompts]
    logits = model.prefill(
        torch.tensor(sum(prompts, []), dtype=torch.int64, device=device),
        torch.cat([torch.arange(n, dtype=torch.int32) for n in lens]).to(device),
        torch.cat([torch.full((n,), r, dtype=torch.int32) for n, r in zip(lens, rows)]).to(device),
        torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device),
        max(lens), kv)
    assert logits.dtype == torch.float32 and logits.shape == (len(prompts), config.vocab_size)
    per_prompt = [[row] for row in logits.cpu()]
    fed: list[list[int]] = [[] for _ in prompts]

    def next_token(n: int) -> int:
        step = len(fed[n])
        return forced[n][step] if forced is not None else int(per_prompt[n][-1].argmax())

    for step in range(steps):
        ids = torch.zeros(B, dtype=torch.int64)
        positions = torch.full((B,), -1, dtype=torch.int32)
        live = []
        for n, row in enumerate(rows):
            if row == RETIRED[0] and step >= RETIRED[1]:
                continue
            token = next_token(n)
            fed[n].append(token)
            ids[row], positions[row] = token, lens[n] + step
            live.append((n, row))
        out = model.decode(ids.to(device), positions.to(device), kv)
        assert out.dtype == torch.float32 and out.shape == (B, config.vocab_size)
        assert torch.isfinite(out).all(), "dead rows must still give finite logits"
        for n, row in live:
            per_prompt[n].append(out[row].cpu())

    for layer in range(config.num_layers):
        untouched = ((kv.k[layer][DEAD_ROW] == POISON).all()
                     and (kv.v[layer][DEAD_ROW] == -POISON).all())
        assert untouched, \
            f"layer {layer}: something was written into the dead row"
    retired_row, retired_after = RETIRED
    n_retired = rows.index(retired_row)
    end = lens[n_retired] + retired_after
    assert (kv.k[0][retired_row, end:] == POISON).all(), "a retired row was written after it died"
    return fed, [torch.stack(rows_) for rows_ in per_prompt]


def assert_matches_hf(ckpt_model, model: CausalLM, cache_dtype: torch.dtype, atol: float) -> None:
    fed, ours = run_engine(model, PROMPTS, DECODE_STEPS, cache_dtype)
    for prompt, tokens, logits in zip(PROMPTS, fed, ours):
        ref = hf_next_token_logits(ckpt_model, prompt, tokens).cpu()
        assert logits.shape == ref.shape
        diff = (logits - ref).abs().max().item()
        assert diff < atol, f"max |logit diff| {diff:.2e} vs transformers, prompt len {len(prompt)}"
        # The engine fed its own greedy choices; transformers must have chosen the same ones.
        assert ref[:len(tokens)].argmax(-1).tolist() == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_transformers(hf_checkpoint, family):
    ckpt = hf_checkpoint(family)
    model = load_model(str(ckpt.path), torch.float32, "cpu")
    assert_matches_hf(ckpt.hf_model, model, torch.float32, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # GQA group 7; per-head q/k norm
def test_triton_backend_matches_transformers(hf_checkpoint, family):
    reason = _triton_importable()
    if reason:
        pytest.skip(f"Triton kernels not importable yet: {reason}")
    ckpt = hf_checkpoint(family)
    model = load_model(str(ckpt.path), torch.float32, "cpu", backend="triton")
    assert_matches_hf(ckpt.hf_model, model, torch.float32, atol=1e-4)


def test_logits_are_not_degenerate(hf_checkpoint):
    """Guard on the test itself: the logits must spread enough that greedy ids mean something."""
    ckpt = hf_checkpoint("llama")
    ref = hf_next_token_logits(ckpt.hf_model, PROMPTS[0], [])
    top2 = ref[0].topk(2).values
    assert ref.std() > 0.1 and (top2[0] - top2[1]) > 1e-3


def _triton_importable() -> str | None:
    try:
        from engine.backend import get_ops

        get_ops("triton")
    except ImportError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_triton_backend_matches_reference_on_dummy_tiny():
    reason = _triton_importable()
    if reason:
        pytest.skip(f"Triton kernels not importable yet: {reason}")
    reference = load_model("dummy:tiny", torch.float32, "cpu", backend="reference", seed=3)
    triton = load_model("dummy:tiny", torch.float32, "cpu", backend="triton", seed=3)
    prompts = [p[:6] for p in PROMPTS]
    fed, ref_logits = run_engine(reference, prompts, 3, torch.float32)
    _, tri_logits = run_engine(triton, prompts, 3, torch.float32, forced=fed)
    for a, b in zip(tri_logits, ref_logits):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.slow
def test_folded_norm_weights_keep_the_logits(hf_checkpoint):
    """Folding the RMSNorm weights into the projections (and, on decode steps of several rows,
    applying 1 / rms after the product) changes rounding only: the Triton backend with and
    without folding, fed the same tokens."""
    reason = _triton_importable()
    if reason:
        pytest.skip(f"Triton kernels not importable yet: {reason}")
    path = str(hf_checkpoint("qwen3").path)
    plain = load_model(path, torch.float32, "cpu", backend="triton", fold_norms=False)
    folded = load_model(path, torch.float32, "cpu", backend="triton")
    assert plain.layers[0].input_norm is not None and folded.layers[0].input_norm is None
    fed, plain_logits = run_engine(plain, PROMPTS, 3, torch.float32)
    _, folded_logits = run_engine(folded, PROMPTS, 3, torch.float32, forced=fed)
    for a, b in zip(folded_logits, plain_logits):
        assert (a - b).abs().max().item() < 1e-4


# --- GPU: same parity on CUDA with the Triton kernels ------------------------------------------

def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_fp32_matches_transformers(hf_checkpoint, family):
    ckpt = hf_checkpoint(family)
    hf_cuda = ckpt.hf_model.to("cuda")
    try:
        model = load_model(str(ckpt.path), torch.float32, "cuda", backend="triton")
        assert_matches_hf(hf_cuda, model, torch.float32, atol=1e-3)
    finally:
        ckpt.hf_model.to("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_error_within_transformers_bf16_error(hf_checkpoint, family):
    """bf16 logits' error against transformers fp32 is at most 1.5x transformers' own bf16 run's.

    Both follow the fp32 greedy path (teacher forcing), so the comparison is position by position.
    """
    import copy

    ckpt = hf_checkpoint(family)
    hf_fp32 = copy.deepcopy(ckpt.hf_model).to("cuda")
    hf_bf16 = copy.deepcopy(ckpt.hf_model).to("cuda", torch.bfloat16)
    model32 = load_model(str(ckpt.path), torch.float32, "cuda", backend="triton")
    fed, _ = run_engine(model32, PROMPTS, DECODE_STEPS, torch.float32)
    model16 = load_model(str(ckpt.path), torch.bfloat16, "cuda", backend="triton")
    _, ours = run_engine(model16, PROMPTS, DECODE_STEPS, torch.bfloat16, forced=fed)
    exact = [hf_next_token_logits(hf_fp32, p, t).cpu() for p, t in zip(PROMPTS, fed)]
    theirs = [hf_next_token_logits(hf_bf16, p, t).cpu() for p, t in zip(PROMPTS, fed)]
    exact, theirs, ours = torch.cat(exact), torch.cat(theirs), torch.cat(ours)
    ours_err, theirs_err = _relative_error(ours, exact), _relative_error(theirs, exact)
    assert ours_err <= 1.5 * theirs_err, \
        f"bf16 relative error {ours_err:.2e} vs transformers' own {theirs_err:.2e}"
