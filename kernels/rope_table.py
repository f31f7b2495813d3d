"""RoPE cos/sin tables, including the ``llama3`` frequency scaling (Llama 3.1 and 3.2)."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """fp32 [head_dim // 2] inverse frequencies; ``scaling`` is the checkpoint's rope_scaling.

    Supported scalings: None / ``default``, ``linear`` (factor) and ``llama3`` (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings), the latter as
    published with Llama 3.1: long wavelengths are divided by ``factor``, short ones kept,
    and the band between them interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind != "llama3":
        raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled).float()


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin tables, each [max_positions, head_dim // 2]."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).double()
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)
