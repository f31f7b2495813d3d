"""Roofline time of one decode step, as DESIGN.md defines it.

The step's time floor is the sum, over its matrix products and its attention, of
``max(bytes / copy bandwidth, FLOPs / matmul peak)``, with both ceilings measured on the device in
the same run. Bytes count each operand read once and each output written once; the lm_head output is
fp32 logits. Norms, RoPE and activations are small next to these and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    name: str
    bytes: float
    flops: float

    def seconds(self, bandwidth_bps: float, flops_per_s: float) -> float:
        return max(self.bytes / bandwidth_bps, self.flops / flops_per_s)


def _matmul(name: str, tokens: int, k: int, n: int, elem: int, out_elem: int | None = None) -> StepCost:
    out_elem = elem if out_elem is None else out_elem
    return StepCost(name, bytes=(k * n + tokens * k) * elem + tokens * n * out_elem,
                    flops=2.0 * tokens * k * n)


def decode_step_costs(cfg, batch: int, context_lens: list[int], elem_bytes: int = 2) -> list[StepCost]:
    """Costs of one decode step of ``batch`` rows whose caches hold ``context_lens`` tokens.

    ``cfg`` is an ``engine.model_config.ModelConfig`` (any object with its attribute names works).
    """
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    live = sum(context_lens)
    per_layer = [
        _matmul("qkv_proj", batch, h, qkv, elem_bytes),
        _matmul("o_proj", batch, cfg.num_heads * d, h, elem_bytes),
        _matmul("gate_up_proj", batch, h, 2 * cfg.intermediate_size, elem_bytes),
        _matmul("down_proj", batch, cfg.intermediate_size, h, elem_bytes),
        StepCost("attention",
                 bytes=2 * live * cfg.num_kv_heads * d * elem_bytes + 2 * batch * cfg.num_heads * d * elem_bytes,
                 flops=4.0 * live * cfg.num_heads * d),
    ]
    costs = [StepCost(c.name, c.bytes * cfg.num_layers, c.flops * cfg.num_layers) for c in per_layer]
    costs.append(_matmul("lm_head", batch, h, cfg.vocab_size, elem_bytes, out_elem=4))
    return costs


def decode_step_roofline_s(cfg, batch: int, context_lens: list[int], bandwidth_bps: float,
                           flops_per_s: float, elem_bytes: int = 2) -> float:
    """Roofline seconds for one decode step (see the module docstring)."""
    # Per-layer costs were summed over layers first; max() per layer equals max() of the sums
    # because every layer is the same shape.
    return sum(c.seconds(bandwidth_bps, flops_per_s)
               for c in decode_step_costs(cfg, batch, context_lens, elem_bytes))
