"""Load Hugging Face safetensors checkpoints into ``engine.model.CausalLM``, fusing as we go.

``q_proj``/``k_proj``/``v_proj`` are stacked into the model's ``qkv_proj`` (and their biases into
``qkv_bias``), ``gate_proj``/``up_proj`` into ``gate_up_proj``. Only safetensors are read:
pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``) can run arbitrary code when loaded, so a
folder holding only those is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.model_config import ModelConfig, ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Present in some checkpoints, never needed: RoPE tables are rebuilt from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes: rows ``row_start:row_start+shape[0]`` of ``param``."""

    param: str
    row_start: int
    shape: tuple[int, ...]


def checkpoint_placements(config: ModelConfig) -> dict[str, Placement]:
    """Every tensor name the checkpoint must hold -> where it lands in the model."""
    c = config
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    H, I = c.hidden_size, c.intermediate_size
    out = {"model.embed_tokens.weight": Placement("embed_tokens", 0, (c.vocab_size, H)),
           "model.norm.weight": Placement("norm", 0, (H,))}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = Placement("lm_head", 0, (c.vocab_size, H))
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = Placement(ours + "input_norm", 0, (H,))
        out[hf + "post_attention_layernorm.weight"] = Placement(ours + "post_attention_norm", 0,
                                                                (H,))
        for part, start, rows in (("q", 0, q_rows), ("k", q_rows, kv_rows),
                                  ("v", q_rows + kv_rows, kv_rows)):
            proj = hf + f"self_attn.{part}_proj."
            out[proj + "weight"] = Placement(ours + "qkv_proj", start, (rows, H))
            if c.qkv_bias:
                out[proj + "bias"] = Placement(ours + "qkv_bias", start, (rows,))
        if c.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = Placement(ours + "q_norm", 0, (c.head_dim,))
            out[hf + "self_attn.k_norm.weight"] = Placement(ours + "k_norm", 0, (c.head_dim,))
        out[hf + "self_attn.o_proj.weight"] = Placement(ours + "o_proj", 0, (H, q_rows))
        out[hf + "mlp.gate_proj.weight"] = Placement(ours + "gate_up_proj", 0, (I, H))
        out[hf + "mlp.up_proj.weight"] = Placement(ours + "gate_up_proj", I, (I, H))
        out[hf + "mlp.down_proj.weight"] = Placement(ours + "down_proj", 0, (H, I))
    return out


def safetensors_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it, from the shard index or a single file.

    Raises ``ModelLoadError`` when there is no safetensors file (naming any pickle files
    found instead) or when the index points to a missing shard.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ModelLoadError(f"{index} has no 'weight_map'")
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ModelLoadError(f"{index} lists shard {shard}, which is not in {folder}")
        return {name: folder / shard for name, shard in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); they are refused "
                f"because unpickling can run arbitrary code. Convert them to safetensors.")
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update((name, file) for name in f.keys())
    return names


@torch.no_grad()
def load_safetensors(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy (casting to the model's dtype) every checkpoint tensor into ``model``'s parameters.

    ``model`` is a ``CausalLM`` with allocated parameters. Every tensor is shape-checked;
    a missing, misshapen or unexpected tensor raises ``ModelLoadError`` naming it and its file.
    A tied checkpoint's ``lm_head.weight``, when present, is ignored (the embedding is used).
    """
    config: ModelConfig = model.config
    placements = checkpoint_placements(config)
    files = safetensors_files(folder)
    missing = [name for name in placements if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"checkpoint in {folder} lacks tensor {missing[0]!r}{more}")
    unexpected = [n for n in files if n not in placements and not _ignorable(n, config)]
    if unexpected:
        raise ModelLoadError(
            f"checkpoint tensor {unexpected[0]!r} in {files[unexpected[0]].name} is not part of "
            f"a {config.architecture} of this config ({len(unexpected)} unexpected tensors)")

    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name in placements:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                where = placements[name]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != where.shape:
                    raise ModelLoadError(f"tensor {name!r} in {file.name} has shape {list(shape)}, "
                                         f"expected {list(where.shape)} from the config")
                rows = slice(where.row_start, where.row_start + shape[0])
                params[where.param][rows].copy_(f.get_tensor(name))


def _ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings
                                                and name == "lm_head.weight")
