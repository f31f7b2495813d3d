"""The KV arena: allocated once at start-up; each batch's slab [B, C] is a view of it.

Only one batch runs at a time, so every slab starts at the arena's first token slot. A slab
of a given (B, C) therefore always has the same addresses, which is what lets one captured
CUDA graph per (B, C) be replayed for every batch of that shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVSlab:
    """Per-layer K and V views, each ``[B, C, H_kv, D]`` (NHD), contiguous."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


class KVArena:
    """K and V storage for ``capacity_tokens`` token slots in every layer.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        capacity_tokens: token slots per layer; a slab needs ``B * C <= capacity_tokens``.
        dtype, device: cache element type (fp32 for exact parity tests) and placement.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 capacity_tokens: int, dtype: torch.dtype, device: torch.device | str):
        if capacity_tokens <= 0:
            raise ValueError(f"KV arena needs at least one token slot, got {capacity_tokens}")
        shape = (num_layers, capacity_tokens, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity_tokens = capacity_tokens

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one token slot costs across all layers, K and V."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def fits(self, batch_size: int, capacity: int) -> bool:
        return batch_size * capacity <= self.capacity_tokens

    def slab(self, batch_size: int, capacity: int) -> KVSlab:
        """The ``[B, C]`` view at the arena's start; raises if it does not fit."""
        if not self.fits(batch_size, capacity):
            raise ValueError(
                f"slab B={batch_size} x C={capacity} = {batch_size * capacity} token slots exceeds "
                f"the KV arena's {self.capacity_tokens}; raise --kv-cache-gb or lower --batch-size")
        n = batch_size * capacity
        views = lambda arena: [arena[layer, :n].view(batch_size, capacity, *arena.shape[2:])
                               for layer in range(arena.shape[0])]
        return KVSlab(k=views(self.k), v=views(self.v))
