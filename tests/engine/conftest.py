"""Tiny random Hugging Face checkpoints for parity tests, built with transformers itself.

Each family is a real ``save_pretrained`` folder (config.json in transformers 5's spelling,
model.safetensors, a small byte-level BPE tokenizer with a chat template), so the engine's
loader, model and tokenizer are tested on exactly what they meet in practice.

Use the ``hf_checkpoint`` fixture (session-scoped, each family built once)::

    def test_something(hf_checkpoint):
        ckpt = hf_checkpoint("qwen2")        # TinyCheckpoint(path, hf_model, family)
        llm = load_model(str(ckpt.path), torch.float32, "cpu")
        ref = hf_next_token_logits(ckpt.hf_model, prompt, continuation)

Outside ``tests/engine``, import the builders: ``from tests.engine.conftest import
build_hf_checkpoint, hf_next_token_logits, FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VOCAB_SIZE = 320  # the tokenizer uses ids 0..297; the rest are never produced by encode
BOS_ID, EOS_ID = 0, 1

# family -> (transformers class names, config overrides). Every family is 2 layers, fp32.
_COMMON = dict(vocab_size=VOCAB_SIZE, num_hidden_layers=2, max_position_embeddings=256,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=0.1,
               rms_norm_eps=1e-6)
FAMILY_SPECS: dict[str, tuple[str, str, dict]] = {
    # GQA group 7 as in Qwen2.5-0.5B (14 q heads over 2 kv heads); head_dim * H_q != hidden.
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=112, intermediate_size=96, num_attention_heads=14,
                   num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    # Llama 3.1-style frequency scaling, with an original context short enough to matter.
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 32})),
    # Qwen2 derives head_dim = hidden / heads: 224 / 14 = 16, the Triton kernels' minimum.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=224, intermediate_size=96, num_attention_heads=14,
                   num_key_value_heads=2, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # sliding_window covers max_position_embeddings, so it never changes attention.
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, sliding_window=256,
                     tie_word_embeddings=False)),
    # head_dim 32 with hidden 64 and 4 heads: head_dim must come from the config.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}
FAMILIES = tuple(FAMILY_SPECS)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class TinyCheckpoint:
    path: Path  # the save_pretrained folder
    hf_model: torch.nn.Module  # the transformers model it was saved from (fp32, eval, CPU)
    family: str


def hf_config(family: str, **overrides):
    """The transformers config object of ``family`` (see ``FAMILY_SPECS``)."""
    import transformers

    config_class, _, extra = FAMILY_SPECS[family]
    return getattr(transformers, config_class)(**{**_COMMON, **extra, **overrides})


def build_tiny_tokenizer():
    """A byte-level BPE fast tokenizer (~300 ids, BOS 0, EOS 1) with a one-line chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog, hello world"] * 8
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_checkpoint(family: str, folder: Path, seed: int = 0, with_tokenizer: bool = True,
                        max_shard_size: str | None = None, **config_overrides) -> torch.nn.Module:
    """Build a random ``family`` model, ``save_pretrained`` it into ``folder``, return it.

    Norm weights and biases are randomised too (transformers initialises them to 1 and 0),
    so a loader that skipped or swapped them would be caught.
    """
    import transformers

    _, model_class, _ = FAMILY_SPECS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(hf_config(family, **config_overrides)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if with_tokenizer:
        build_tiny_tokenizer().save_pretrained(folder)
    return model


@torch.no_grad()
def hf_next_token_logits(hf_model: torch.nn.Module, prompt: list[int],
                         continuation: list[int]) -> torch.Tensor:
    """Transformers' own fp32 logits for the token after the prompt and after each continuation
    token except the last: ``[1 + len(continuation), V]`` — what prefill and then each decode
    step of the engine must return when fed ``continuation`` one token at a time."""
    ids = torch.tensor([prompt + continuation], device=hf_model.device)
    logits = hf_model(ids).logits[0].float()
    return logits[len(prompt) - 1:]


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory ``(family) -> TinyCheckpoint``; each family is built once per session."""
    built: dict[str, TinyCheckpoint] = {}

    def get(family: str) -> TinyCheckpoint:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"hf-{family}")
            built[family] = TinyCheckpoint(folder, build_hf_checkpoint(family, folder), family)
        return built[family]

    return get
