"""The model shape BinDecode needs, read from a Hugging Face ``config.json``.

Supported families: LlamaForCausalLM (Llama 2/3/3.1/3.2), Qwen2ForCausalLM (bias on Q/K/V),
MistralForCausalLM and Qwen3ForCausalLM (RMSNorm on each q/k head, explicit ``head_dim``).
RoPE settings come in two spellings: Hub checkpoints carry ``rope_theta`` and ``rope_scaling``;
transformers 5's ``save_pretrained`` writes one ``rope_parameters`` dict holding both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                           "Qwen3ForCausalLM")
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelLoadError(ValueError):
    """A checkpoint or config BinDecode cannot load; the message names the file or tensor."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass and the KV arena need to know about a model.

    ``rope_scaling`` is None for plain RoPE, else a dict with ``rope_type`` (``linear`` or
    ``llama3``) and that type's parameters, as ``kernels.rope_table.rope_inv_freq`` takes it.
    ``sliding_window`` is None when every token attends to the whole prefix.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    name: str

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV projection: (H_q + 2 H_kv) * D."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def check_max_model_len(self, max_model_len: int) -> None:
        """Refuse a context length the model cannot serve exactly.

        A sliding window shorter than the longest sequence would change attention, and
        BinDecode's kernels always attend to the whole prefix: such a model is refused.
        """
        if max_model_len > self.max_position_embeddings:
            raise ModelLoadError(
                f"{self.name}: max_model_len {max_model_len} exceeds the model's "
                f"max_position_embeddings {self.max_position_embeddings}")
        if self.sliding_window is not None and self.sliding_window < max_model_len:
            raise ModelLoadError(
                f"{self.name}: sliding_window={self.sliding_window} is shorter than max_model_len="
                f"{max_model_len}; sliding-window attention is not supported, so serve at most "
                f"{self.sliding_window} tokens per sequence "
                f"(--max-model-len {self.sliding_window})")


def load_model_config(path_or_dict: str | Path | dict, name: str | None = None) -> ModelConfig:
    """Parse a Hugging Face config: a dict, a ``config.json`` file, or the folder holding one.

    From a folder, EOS ids of ``generation_config.json`` are added to the config's (Llama 3
    Instruct ends turns with an id only the generation config lists).
    Raises ``ModelLoadError`` for a missing config or an unsupported model.
    """
    extra_eos: list[int] = []
    if isinstance(path_or_dict, dict):
        raw = path_or_dict
        name = name or raw.get("_name_or_path") or "<config dict>"
    else:
        path = Path(path_or_dict)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(f"missing model config: {file} does not exist")
        raw = read_json_object(file)
        name = name or str(file.parent)
        generation = file.parent / "generation_config.json"
        if generation.is_file():
            extra_eos = _as_id_list(read_json_object(generation).get("eos_token_id"))
    return _parse(raw, name, extra_eos)


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file``; ``ModelLoadError`` naming the file if it is not one."""
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _parse(raw: dict, name: str, extra_eos: list[int]) -> ModelConfig:
    architecture = _architecture(raw, name)

    def need(key: str):
        if raw.get(key) is None:
            raise ModelLoadError(f"{name}: config has no {key!r}")
        return raw[key]

    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(
            f"{name}: hidden_act={raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise ModelLoadError(f"{name}: mlp_bias=True is not supported")
    # Qwen2 always has a bias on q/k/v and none on o_proj; in the other families
    # attention_bias would put one on o_proj as well, which this engine does not carry.
    qkv_bias = architecture == "Qwen2ForCausalLM"
    if not qkv_bias and raw.get("attention_bias"):
        raise ModelLoadError(f"{name}: attention_bias=True is not supported for {architecture}")

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{name}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
    if head_dim % 2:
        raise ModelLoadError(f"{name}: head_dim={head_dim} must be even for RoPE")

    theta, scaling = _rope(raw, name)
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(need("max_position_embeddings")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=_sliding_window(raw, architecture),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(_as_id_list(raw.get("eos_token_id")) + extra_eos)),
        name=name,
    )


def _architecture(raw: dict, name: str) -> str:
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _ARCHITECTURE_OF_MODEL_TYPE:
        archs = [_ARCHITECTURE_OF_MODEL_TYPE[raw["model_type"]]]
    if not archs:
        raise ModelLoadError(f"{name}: config names no 'architectures' and no known 'model_type'")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{name}: unsupported architecture {archs[0]!r} "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return archs[0]


def _rope(raw: dict, name: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either spelling; scaling is None for plain RoPE."""
    if raw.get("rope_parameters") is not None:
        params = dict(raw["rope_parameters"])
        theta = params.pop("rope_theta", raw.get("rope_theta"))
        scaling = params
    else:
        theta = raw.get("rope_theta")
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") is not None else {}
    if theta is None:
        # transformers' historical default for configs that predate the key (Llama 2).
        theta = 10000.0
    # Old configs spell the type "type"; transformers 5 "rope_type".
    kind = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"{name}: unsupported RoPE scaling {kind!r} "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}[kind]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ModelLoadError(f"{name}: RoPE scaling {kind!r} lacks {', '.join(missing)}")
    return float(theta), scaling


def _sliding_window(raw: dict, architecture: str) -> int | None:
    window = raw.get("sliding_window")
    # Qwen2/Qwen3 configs list a window but only use it when use_sliding_window is set.
    qwen = architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    if qwen and not raw.get("use_sliding_window"):
        return None
    if architecture == "LlamaForCausalLM":
        return None
    return int(window) if window is not None else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
