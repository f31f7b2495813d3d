"""RoPE tables against transformers' own frequency functions (the kernels and their references
share these tables, so only an outside reference can catch a wrong one)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kernels.rope_table import rope_cos_sin, rope_inv_freq

LLAMA_31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def transformers_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                         rope_parameters={"rope_type": "default", **(scaling or {}),
                                          "rope_theta": theta})
    return LlamaRotaryEmbedding(config).inv_freq.float()


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (64, 10000.0, None),
    (128, 500000.0, None),
    (128, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (128, 500000.0, LLAMA_31),  # Llama 3.1 8B
    (64, 500000.0, {**LLAMA_31, "factor": 32.0}),  # Llama 3.2 1B
])
def test_inverse_frequencies_match_transformers(head_dim, theta, scaling):
    ours = rope_inv_freq(head_dim, theta, scaling)
    theirs = transformers_inv_freq(head_dim, theta, scaling)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def test_llama3_scaling_changes_only_the_long_wavelengths():
    plain, scaled = rope_inv_freq(128, 500000.0), rope_inv_freq(128, 500000.0, LLAMA_31)
    wavelength = 2 * math.pi / plain.double()
    short = wavelength < 8192 / 4.0
    long = wavelength > 8192 / 1.0
    assert short.any() and long.any()
    assert torch.equal(scaled[short], plain[short])
    assert torch.allclose(scaled[long], plain[long] / 8.0, rtol=1e-6)


def test_cos_sin_tables_hold_each_position_angle():
    cos, sin = rope_cos_sin(64, 4097, 10000.0, LLAMA_31)
    assert cos.shape == sin.shape == (4097, 32) and cos.dtype == sin.dtype == torch.float32
    inv_freq = rope_inv_freq(64, 10000.0, LLAMA_31).double()
    for position in (0, 1, 17, 4096):
        angles = position * inv_freq
        assert torch.allclose(cos[position].double(), angles.cos(), atol=1e-7, rtol=0)
        assert torch.allclose(sin[position].double(), angles.sin(), atol=1e-7, rtol=0)


def test_unsupported_scaling_is_refused():
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})
