"""``dummy:NAME`` models: real shapes, seeded random weights, no download.

The shapes follow the published configs of Qwen2.5-0.5B, Llama 3.2 1B and Llama 3.1 8B; their
text goes through ``engine.tokenizer.ByteTokenizer``, whose BOS and EOS ids are 256 and 257.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.model_config import ModelConfig, ModelLoadError

if TYPE_CHECKING:
    from torch import nn

BYTE_BOS_ID = 256
BYTE_EOS_ID = 257

_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _config(name: str, architecture: str, vocab: int, hidden: int, intermediate: int, layers: int,
            heads: int, kv_heads: int, head_dim: int, eps: float, theta: float,
            scaling: dict | None, max_positions: int, tied: bool,
            qkv_bias: bool = False) -> ModelConfig:
    return ModelConfig(
        architecture=architecture, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=eps, rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=max_positions, tie_word_embeddings=tied,
        qkv_bias=qkv_bias, qk_norm=False, sliding_window=None, bos_token_id=BYTE_BOS_ID,
        eos_token_ids=(BYTE_EOS_ID,), name=name)


DUMMY_CONFIGS: dict[str, ModelConfig] = {
    "dummy:tiny": _config(
        "dummy:tiny", "LlamaForCausalLM", vocab=512, hidden=256, intermediate=512, layers=4,
        heads=4, kv_heads=2, head_dim=64, eps=1e-5, theta=10000.0, scaling=None,
        max_positions=4096, tied=False),
    "dummy:qwen2.5-0.5b": _config(
        "dummy:qwen2.5-0.5b", "Qwen2ForCausalLM", vocab=151936, hidden=896, intermediate=4864,
        layers=24, heads=14, kv_heads=2, head_dim=64, eps=1e-6, theta=1000000.0, scaling=None,
        max_positions=32768, tied=True, qkv_bias=True),
    "dummy:llama-3.2-1b": _config(
        "dummy:llama-3.2-1b", "LlamaForCausalLM", vocab=128256, hidden=2048, intermediate=8192,
        layers=16, heads=32, kv_heads=8, head_dim=64, eps=1e-5, theta=500000.0,
        scaling={**_LLAMA3_SCALING, "factor": 32.0}, max_positions=131072, tied=True),
    "dummy:llama-3.1-8b": _config(
        "dummy:llama-3.1-8b", "LlamaForCausalLM", vocab=128256, hidden=4096, intermediate=14336,
        layers=32, heads=32, kv_heads=8, head_dim=128, eps=1e-5, theta=500000.0,
        scaling={**_LLAMA3_SCALING, "factor": 8.0}, max_positions=131072, tied=False),
}


def dummy_config(name: str) -> ModelConfig:
    """The config of ``dummy:NAME``; raises ``ModelLoadError`` listing the known names."""
    if name not in DUMMY_CONFIGS:
        raise ModelLoadError(f"unknown dummy model {name!r} (known: {', '.join(DUMMY_CONFIGS)})")
    return DUMMY_CONFIGS[name]


def init_random_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter in place on its own device: matrices and biases ~ N(0, std),
    norm weights ~ N(1, std) (1-D parameters whose name ends in ``norm``).

    The generator lives on the weights' device, so an 8B model initialises in seconds on a
    GPU, and the same seed gives the same weights on the same device type.
    """
    import torch  # here, not at the top: the HTTP process reads dummy configs without torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean = 1.0 if name.endswith("norm") else 0.0
            param.normal_(mean, std, generator=generator)
