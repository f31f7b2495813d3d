"""The offline API on dummy:tiny: text in and out, stop strings, n, logprobs, timings, input
checks, and the Triton kernels (interpreted on CPU) against the reference ops end to end."""

from __future__ import annotations

import importlib

import pytest
import torch

from engine import LLM, EngineOptions, RequestOutput, SamplingParams

OPTIONS = dict(max_model_len=64, min_capacity=16, max_wait_ms=1e6)



@pytest.fixture(scope="module")
def llm():
    return LLM("dummy:tiny", batch_size=3, **OPTIONS)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_text_prompts_give_text_matching_the_ids(llm):
    prompts = ["hello world", "the quick brown fox", "é"]
    outputs = llm.generate(prompts, _greedy(10, logprobs=True), use_tqdm=True)
    assert all(isinstance(o, RequestOutput) for o in outputs)
    ids_out = llm.generate([llm.tokenizer.encode(p) for p in prompts], _greedy(10), use_tqdm=False)
    for o, same in zip(outputs, ids_out):
        assert o.token_ids == same.token_ids and len(o.token_ids) == 10
        assert o.text == llm.tokenizer.decode(o.token_ids)
        assert o.finish_reason == "length"
        assert len(o.logprobs) == 10 and all(lp <= 0 for lp in o.logprobs)
        assert o.arrival_time <= o.first_token_time <= o.finish_time
        assert o.ttft >= 0 and o.e2e >= o.ttft
    assert ids_out[0].logprobs is None


def test_stop_string_cuts_text_and_stops_generation(llm):
    prompt = "stop strings"
    full = llm.generate([prompt], _greedy(30), use_tqdm=False)[0]
    start = len(full.text) // 3
    stop = full.text[start:start + 3]
    cut = full.text.find(stop)
    out = llm.generate([prompt], _greedy(30, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    ids = out.token_ids
    assert ids == full.token_ids[:len(ids)] and len(ids) < 30
    assert stop in llm.tokenizer.decode(ids) and stop not in llm.tokenizer.decode(ids[:-1])
    assert not llm.core.has_unfinished()  # the aborted request left nothing behind


def test_stop_token_stays_in_the_ids_but_adds_no_text(llm):
    prompt = "stop tokens"
    full = llm.generate([prompt], _greedy(30), use_tqdm=False)[0]
    # A token that is not a byte (its text, <|id|>, is unmistakable), first seen past the start.
    cut, stop_id = next((i, t) for i, t in enumerate(full.token_ids)
                        if i >= 1 and t >= 256 and t not in full.token_ids[:i])
    out = llm.generate([prompt], _greedy(30, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:cut + 1]
    assert out.text == llm.tokenizer.decode(full.token_ids[:cut])


def test_n_completions_target_lens_and_per_prompt_params(llm):
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=11, n=3, ignore_eos=True)
    outputs = llm.generate(["abc", "xyz"], [sampled, _greedy(6)], use_tqdm=False,
                           target_lens=[8, None])
    assert len(outputs) == 4
    assert [len(o.token_ids) for o in outputs] == [8, 8, 8, 6]
    assert all(o.finish_reason == "length" for o in outputs)
    assert len({tuple(o.token_ids) for o in outputs[:3]}) == 3, "n completions repeated each other"
    again = llm.generate(["abc"], sampled, use_tqdm=False, target_lens=[8])
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs[:3]]


def test_bad_input_is_refused_and_leaves_the_engine_clean(llm):
    with pytest.raises(ValueError, match="params has 1 entries for 2 prompts"):
        llm.generate(["a", "b"], [_greedy(3)], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["a", 5], _greedy(3), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["a", ""], _greedy(3), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["a", "b" * 60], _greedy(10), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(["a"], SamplingParams(temperature=-1.0), use_tqdm=False)
    assert not llm.core.has_unfinished()
    assert len(llm.generate(["a"], _greedy(3), use_tqdm=False)[0].token_ids) == 3


def test_options_are_checked_and_picklable():
    import pickle

    options = EngineOptions(model="dummy:tiny", batch_size=4, bin_edges=[8, 32], mode="continuous")
    assert pickle.loads(pickle.dumps(options)) == options
    assert options.num_bins == 3
    for bad in (dict(batch_size=0), dict(bin_edges=[8, 4]), dict(kv_memory_fraction=0.0),
                dict(dtype="int8"), dict(device="tpu")):
        with pytest.raises(ValueError):
            EngineOptions(model="dummy:tiny", **bad)


def _triton_kernels_missing() -> str | None:
    from engine.backend import _TRITON_MODULES

    for op, module in _TRITON_MODULES.items():
        try:
            if not hasattr(importlib.import_module(module), op):
                return f"{module}.{op} is missing"
        except ImportError as e:
            return f"cannot import {module}: {e}"
    return None


def test_triton_backend_equals_reference_end_to_end():
    missing = _triton_kernels_missing()
    if missing:
        pytest.skip(f"Triton kernels not available: {missing}")
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 200, 3]]
    params = _greedy(6)
    ref = LLM("dummy:tiny", batch_size=2, max_model_len=32, min_capacity=16)
    tri = LLM("dummy:tiny", batch_size=2, max_model_len=32, min_capacity=16, backend="triton")
    assert tri.core.backend == "triton"
    want = [o.token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in tri.generate(prompts, params, use_tqdm=False)] == want


@pytest.mark.gpu
def test_llama_1b_shape_generates_with_cuda_graphs():
    prompts = [list(range(10 + 7 * i, 40 + 9 * i)) for i in range(8)]
    params = _greedy(32)
    graphs = LLM("dummy:llama-3.2-1b", batch_size=8, max_model_len=512)
    assert graphs.core.device.type == "cuda" and graphs.core.backend == "triton"
    with_graphs = [o.token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert graphs.core.stats()["graphs_captured"] >= 1
    assert all(len(t) == 32 for t in with_graphs)
    del graphs
    torch.cuda.empty_cache()
    eager = LLM("dummy:llama-3.2-1b", batch_size=8, max_model_len=512, enforce_eager=True)
    assert [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)] == with_graphs
