"""LLM.generate against transformers' own generate: greedy fp32 token ids must be identical,
for every model family, every execution mode, with refills, several batches and overflows.
Seeded sampling must not depend on batch size or mode."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

PROMPT_LENGTHS = (3, 8, 13, 21)
NEW_TOKENS = 32



def _prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 298, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _hf_greedy(hf_model, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding involved), EOS ignored."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=hf_model.device)
        generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      eos_token_id=None, pad_token_id=0)
        out.append(generated[0, len(prompt):].tolist())
    return out


def _greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_reference(hf_checkpoint):
    """The GQA-7, tied-embedding llama checkpoint, five prompts and transformers' tokens."""
    ckpt = hf_checkpoint("llama")
    prompts = _prompts((5, 2, 17, 9, 12), seed=1)
    return ckpt, prompts, _hf_greedy(ckpt.hf_model, prompts)


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "mistral", "qwen3"])
def test_greedy_ids_equal_transformers(hf_checkpoint, family):
    ckpt = hf_checkpoint(family)
    prompts = _prompts(PROMPT_LENGTHS)
    want = _hf_greedy(ckpt.hf_model, prompts)
    llm = LLM(str(ckpt.path), batch_size=4, max_model_len=64, min_capacity=16)
    outputs = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.token_ids for o in outputs] == want
    assert [o.finish_reason for o in outputs] == ["length"] * len(prompts)
    assert [r.n_requests for r in llm.core.batch_records] == [4]  # one batch of four rows


@pytest.mark.parametrize("mode", ["static", "bin-continuous", "continuous"])
def test_every_mode_equals_transformers_with_bins_refills_and_several_batches(llama_reference, mode):
    ckpt, prompts, want = llama_reference
    max_tokens = [32, 9, 20, 32, 14]
    # Two bins split at 16 new tokens (requests binned by max_tokens), two rows per slab for
    # five requests: several batches, partial batches, and refills in the refilling modes.
    llm = LLM(str(ckpt.path), batch_size=2, mode=mode, bin_edges=[16], max_output_len=32,
              predictor="max-tokens", max_model_len=64, min_capacity=16, max_wait_ms=1e6)
    outputs = llm.generate(prompts, [_greedy(n) for n in max_tokens], use_tqdm=False)
    assert [o.token_ids for o in outputs] == [w[:n] for w, n in zip(want, max_tokens)]
    records = llm.core.batch_records
    assert sum(r.n_requests for r in records) == len(prompts)
    if mode == "static":
        assert len(records) >= 3 and {r.bin for r in records} == {0, 1}
    else:
        assert any(r.n_requests > r.batch_size for r in records), "no row was refilled"
    if mode == "continuous":
        assert {r.capacity for r in records} == {64}


def test_overflow_recompute_equals_transformers(llama_reference):
    ckpt, prompts, want = llama_reference
    # Every request hints 1 token: bin 0 (< 8 tokens), a slab of 16 or 32 slots. They overflow
    # into bin 1 and are recomputed there; the tokens must not change.
    llm = LLM(str(ckpt.path), batch_size=3, bin_edges=[8], max_output_len=32, predictor="hint",
              max_model_len=64, min_capacity=16)
    outputs = llm.generate(prompts, _greedy(), use_tqdm=False, hints=[1] * len(prompts))
    assert [o.token_ids for o in outputs] == want
    stats = llm.core.stats()
    assert stats["overflows"] >= 3
    assert sum(r.overflows for r in llm.core.batch_records) == stats["overflows"]


class _OutputPenalties:
    """OpenAI's frequency and presence penalties as a transformers logits processor: counts
    over the generated tokens only (input_ids past the prompt)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


@torch.no_grad()
def _hf_penalised_greedy(hf_model, prompts, penalties, new_tokens: int = NEW_TOKENS):
    """transformers' greedy generate with its repetition penalty (prompt and output tokens)
    and then the processor above, the order vLLM applies them in."""
    from transformers import LogitsProcessorList

    out = []
    for prompt, (presence, frequency, repetition) in zip(prompts, penalties):
        ids = torch.tensor([prompt], device=hf_model.device)
        processors = LogitsProcessorList([_OutputPenalties(len(prompt), frequency, presence)])
        generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      eos_token_id=None, pad_token_id=0,
                                      repetition_penalty=repetition, logits_processor=processors)
        out.append(generated[0, len(prompt):].tolist())
    return out


# (presence, frequency, repetition) per prompt of llama_reference; one row without penalties.
PENALTIES = [(0.0, 0.0, 1.3), (0.4, 0.0, 1.0), (0.0, 0.0, 1.0), (0.3, 0.6, 1.2), (-0.5, 0.2, 0.9)]


@pytest.mark.parametrize("setup", ["one-batch", "refills", "overflows"])
def test_penalties_equal_transformers(llama_reference, setup):
    """Greedy rows with repetition, presence and frequency penalties (and one without, in the
    same batches) give transformers' tokens: in one batch, with refills in continuous mode,
    and when every request overflows and is recomputed, its generated tokens still counted as
    output rather than prompt."""
    ckpt, prompts, plain = llama_reference
    want = _hf_penalised_greedy(ckpt.hf_model, prompts, PENALTIES)
    assert want[2] == plain[2]
    assert all(w != p for w, p, pen in zip(want, plain, PENALTIES) if pen != (0, 0, 1)), \
        "a penalty left its row's tokens unchanged: the comparison would prove nothing"
    options, hints = {
        "one-batch": (dict(batch_size=5), None),
        "refills": (dict(batch_size=2, mode="continuous"), None),
        "overflows": (dict(batch_size=3, bin_edges=[8], predictor="hint"), [1] * len(prompts)),
    }[setup]
    llm = LLM(str(ckpt.path), max_model_len=64, min_capacity=16, max_output_len=32, **options)
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                             presence_penalty=pres, frequency_penalty=freq,
                             repetition_penalty=rep) for pres, freq, rep in PENALTIES]
    outputs = llm.generate(prompts, params, use_tqdm=False, hints=hints)
    assert [o.token_ids for o in outputs] == want
    if setup == "overflows":
        assert llm.core.stats()["overflows"] >= 3


def test_seeded_sampling_is_independent_of_batch_size_and_mode(llama_reference):
    ckpt, prompts, want = llama_reference
    params = [SamplingParams(max_tokens=n, temperature=t, top_p=p, top_k=k, seed=s, ignore_eos=True)
              for n, t, p, k, s in [(20, 1.0, 1.0, -1, 1), (12, 0.8, 0.9, -1, 2),
                                    (24, 1.3, 1.0, 20, 3), (16, 0.0, 1.0, -1, 4),
                                    (20, 1.0, 0.5, 5, 5)]]
    params[2].frequency_penalty, params[4].repetition_penalty = 0.5, 1.4
    runs = []
    for options in (dict(batch_size=1), dict(batch_size=3, mode="bin-continuous", bins=2),
                    dict(batch_size=4, mode="continuous")):
        llm = LLM(str(ckpt.path), max_model_len=64, min_capacity=16, max_output_len=32, **options)
        runs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][3] == want[3][:16]  # the greedy row
    assert runs[0][0] != want[0][:20], "temperature 1 reproduced greedy decoding"


@pytest.mark.gpu
def test_cuda_fp32_cache_equals_transformers(hf_checkpoint):
    for family in ("llama", "qwen2"):
        ckpt = hf_checkpoint(family)
        prompts = _prompts(PROMPT_LENGTHS, seed=2)
        want = _hf_greedy(ckpt.hf_model, prompts)
        llm = LLM(str(ckpt.path), device="cuda", dtype="float32", backend="triton", batch_size=4,
                  max_model_len=64, min_capacity=16)
        outputs = llm.generate(prompts, _greedy(), use_tqdm=False)
        assert [o.token_ids for o in outputs] == want, family
        assert llm.core.stats()["graphs_captured"] >= 1
