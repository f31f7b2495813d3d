"""Parsing config.json for every family, both RoPE spellings, dummy shapes, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from engine.dummy import DUMMY_CONFIGS, dummy_config
from engine.model_config import ModelConfig, ModelLoadError, load_model_config
from tests.engine.conftest import hf_config

# Abridged from the published config.json of Llama 3.2 1B Instruct (Hub spelling of RoPE).
LLAMA_3_2_1B_HUB = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
# Abridged from Qwen2.5-0.5B-Instruct: a window is listed but use_sliding_window is off.
QWEN2_5_HUB = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
}
# Abridged from Mistral 7B v0.1: a real 4096-token sliding window.
MISTRAL_V01_HUB = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "vocab_size": 32000,
}


def _saved_config(family: str, tmp_path, **overrides) -> dict:
    """config.json exactly as transformers 5's save_pretrained writes it."""
    hf_config(family, **overrides).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_hub_llama_3_2_config_from_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B_HUB))
    generation = {"eos_token_id": [128001, 128009, 7]}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    c = load_model_config(tmp_path)
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == \
        ("LlamaForCausalLM", 16, 2048, 8192)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (32, 8, 64, 128256)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert c.tie_word_embeddings and not c.qkv_bias and not c.qk_norm and c.sliding_window is None
    assert c.bos_token_id == 128000
    assert c.eos_token_ids == (128001, 128008, 128009, 7)  # config's first, then generation's new
    assert c.name == str(tmp_path)
    assert c.qkv_size == (32 + 2 * 8) * 64


def test_hub_qwen2_5_config_ignores_unused_sliding_window():
    c = load_model_config(QWEN2_5_HUB)
    assert c.qkv_bias and c.tie_word_embeddings and not c.qk_norm
    assert c.head_dim == 64 and c.sliding_window is None and c.rope_scaling is None
    assert c.eos_token_ids == (151645,)
    c.check_max_model_len(32768)


def test_mistral_sliding_window_is_honoured_or_refused():
    c = load_model_config(MISTRAL_V01_HUB)
    assert c.sliding_window == 4096
    c.check_max_model_len(4096)  # the window covers every sequence: no effect
    with pytest.raises(ModelLoadError, match="sliding_window=4096.*--max-model-len 4096"):
        c.check_max_model_len(4097)
    with pytest.raises(ModelLoadError, match="max_position_embeddings"):
        c.check_max_model_len(40000)
    no_window = load_model_config({**MISTRAL_V01_HUB, "sliding_window": None})
    no_window.check_max_model_len(32768)


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "mistral", "qwen3"])
def test_save_pretrained_configs_of_every_family(family, hf_checkpoint):
    folder = hf_checkpoint(family).path
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw  # transformers 5's spelling
    c = load_model_config(folder)
    reference = hf_config(family)
    assert c.architecture == raw["architectures"][0]
    assert c.num_layers == reference.num_hidden_layers
    assert c.num_heads == reference.num_attention_heads
    assert c.num_kv_heads == reference.num_key_value_heads
    # Qwen2 configs carry no head_dim: it is hidden / heads there.
    assert c.head_dim == (getattr(reference, "head_dim", None)
                          or reference.hidden_size // reference.num_attention_heads)
    assert c.rope_theta == reference.rope_parameters["rope_theta"]
    assert c.qkv_bias == (family == "qwen2")
    assert c.qk_norm == (family == "qwen3")
    assert c.tie_word_embeddings == reference.tie_word_embeddings
    assert c.eos_token_ids == (1,) and c.bos_token_id == 0


def test_qwen3_head_dim_comes_from_config(tmp_path):
    c = load_model_config(_saved_config("qwen3", tmp_path))
    assert c.head_dim == 32 and c.hidden_size // c.num_heads == 16


def test_both_rope_spellings_give_the_same_config(tmp_path):
    new = _saved_config("llama3", tmp_path)
    params = dict(new["rope_parameters"])
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    a, b = load_model_config(new), load_model_config(old)
    assert a == b
    assert a.rope_theta == 500000.0
    assert a.rope_scaling["rope_type"] == "llama3" and a.rope_scaling["factor"] == 8.0


def test_legacy_rope_spellings():
    linear = load_model_config({**QWEN2_5_HUB, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    default = load_model_config({**QWEN2_5_HUB, "rope_scaling": {"rope_type": "default"}})
    assert default.rope_scaling is None
    no_theta = dict(LLAMA_3_2_1B_HUB)
    del no_theta["rope_theta"], no_theta["rope_scaling"]
    assert load_model_config(no_theta).rope_theta == 10000.0  # Llama 2 configs lack the key


def test_missing_optional_keys_fall_back_like_transformers():
    dropped = ("num_key_value_heads", "architectures")
    raw = {k: v for k, v in MISTRAL_V01_HUB.items() if k not in dropped}
    c = load_model_config(raw)
    assert c.architecture == "MistralForCausalLM"  # from model_type
    assert c.num_kv_heads == c.num_heads and c.head_dim == 4096 // 32


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"architectures": None, "model_type": "gpt2"}, "no 'architectures'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads=5"),
    ({"head_dim": 63}, "head_dim=63 must be even"),
    ({"vocab_size": None}, "no 'vocab_size'"),
])
def test_bad_configs_are_refused_clearly(change, message):
    with pytest.raises(ModelLoadError, match=message.replace("[", r"\[")):
        load_model_config({**LLAMA_3_2_1B_HUB, **change})


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ModelLoadError, match=r"missing model config: .*config\.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model_config(tmp_path / "config.json")


@pytest.mark.parametrize(
    "name, layers, hidden, inter, heads, kv_heads, head_dim, vocab, tied, bias, factor", [
    ("dummy:tiny", 4, 256, 512, 4, 2, 64, 512, False, False, None),
    ("dummy:qwen2.5-0.5b", 24, 896, 4864, 14, 2, 64, 151936, True, True, None),
    ("dummy:llama-3.2-1b", 16, 2048, 8192, 32, 8, 64, 128256, True, False, 32.0),
    ("dummy:llama-3.1-8b", 32, 4096, 14336, 32, 8, 128, 128256, False, False, 8.0),
])
def test_dummy_configs_have_the_published_shapes(name, layers, hidden, inter, heads, kv_heads,
                                                 head_dim, vocab, tied, bias, factor):
    c = dummy_config(name)
    assert isinstance(c, ModelConfig) and c.name == name
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (layers, hidden, inter)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (heads, kv_heads, head_dim)
    assert c.vocab_size == vocab
    assert (c.tie_word_embeddings, c.qkv_bias) == (tied, bias)
    assert (c.rope_scaling or {}).get("factor") == factor
    assert c.eos_token_ids == (257,) and c.bos_token_id == 256


def test_dummy_parameter_counts_match_the_real_models():
    from engine.model import CausalLM

    # Published sizes: Qwen2.5-0.5B 0.49B, Llama 3.2 1B 1.24B, Llama 3.1 8B 8.03B parameters.
    expected = {"dummy:qwen2.5-0.5b": 0.494e9, "dummy:llama-3.2-1b": 1.236e9,
                "dummy:llama-3.1-8b": 8.030e9}
    for name, count in expected.items():
        model = CausalLM(DUMMY_CONFIGS[name], torch.bfloat16, "meta")
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.005, (name, n)


def test_unknown_dummy_is_refused():
    with pytest.raises(ModelLoadError, match="unknown dummy model 'dummy:gpt5'.*dummy:tiny"):
        dummy_config("dummy:gpt5")
