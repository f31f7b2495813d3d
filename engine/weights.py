"""Load Hugging Face safetensors checkpoints into ``engine.model.CausalLM``, fusing as we go.

``q_proj``/``k_proj``/``v_proj`` are stacked into the model's ``qkv_proj`` (and their biases into
``qkv_bias``), ``gate_proj``/``up_proj`` into ``gate_up_proj``. Only safetensors are read:
pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``) can run arbitrary code when loaded, so a
folder holding only those is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.model_config import ModelConfig, ModelLoadError, read_json_object

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Present in some checkpoints, never needed: RoPE tables are rebuilt from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype names the loader casts from: floating point only (an integer or fp8 tensor
# of the right shape would be cast silently into nonsense).
LOADABLE_DTYPES = ("F16", "BF16", "F32", "F64")


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
    """Tensor name -> the file that holds it: from the shard index, else from
    ``model.safetensors`` alone (as transformers reads a folder), else from every
    ``*.safetensors`` file, which must not share a tensor name.

    Raises ``ModelLoadError`` when there is no safetensors file (naming any pickle files
    found instead), when the index is malformed or points to a missing shard, or when a file
    cannot be read.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not weight_map:
            raise ModelLoadError(f"{index} has no 'weight_map'")
        if not isinstance(weight_map, dict) or not all(
                isinstance(shard, str) for shard in weight_map.values()):
            raise ModelLoadError(f"{index}: 'weight_map' must map tensor names to shard files")
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ModelLoadError(f"{index} lists shard {shard}, which is not in {folder}")
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); they are refused "
                f"because unpickling can run arbitrary code. Convert them to safetensors.")
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    names: dict[str, Path] = {}
    for file in files:
        for name in _tensor_names(file):
            if name in names:
                raise ModelLoadError(f"tensor {name!r} is in both {names[name].name} and "
                                     f"{file.name} in {folder}, and no index says which to use")
            names[name] = file
    return names


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from e


@torch.no_grad()
def load_safetensors(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy (casting to the model's dtype) every checkpoint tensor into ``model``'s parameters.

    ``model`` is a ``CausalLM`` with allocated parameters. Every tensor is shape- and
    dtype-checked; a missing, misshapen, non-float or unexpected tensor raises
    ``ModelLoadError`` naming it and its file. A tied checkpoint's ``lm_head.weight``, when
    present, must equal the embedding (transformers would use a different one untied).
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
        try:
            with safe_open(str(file), framework="pt") as f:
                held = set(f.keys())
                for name in names:
                    where = placements[name]
                    _check_tensor(f, held, name, file, where.shape)
                    rows = slice(where.row_start, where.row_start + where.shape[0])
                    params[where.param][rows].copy_(f.get_tensor(name))
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e
    if config.tie_word_embeddings and "lm_head.weight" in files:
        _check_tied_head(params["embed_tokens"], files["lm_head.weight"])


def _check_tensor(f, held: set[str], name: str, file: Path, shape: tuple[int, ...]) -> None:
    """That open safetensors file ``f`` (``file``, holding ``held``) has tensor ``name`` with
    the config's ``shape`` and a float dtype."""
    if name not in held:
        raise ModelLoadError(f"the shard index maps {name!r} to {file.name}, which does not "
                             f"hold it")
    tensor = f.get_slice(name)
    found, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
    if found != shape:
        raise ModelLoadError(f"tensor {name!r} in {file.name} has shape {list(found)}, "
                             f"expected {list(shape)} from the config")
    if dtype not in LOADABLE_DTYPES:
        raise ModelLoadError(f"tensor {name!r} in {file.name} has dtype {dtype}; weights must be "
                             f"one of {', '.join(LOADABLE_DTYPES)}")


def _check_tied_head(embedding: torch.Tensor, file: Path) -> None:
    with safe_open(str(file), framework="pt") as f:
        head = f.get_tensor("lm_head.weight")
    if head.shape != embedding.shape or not torch.equal(head.to(embedding), embedding):
        raise ModelLoadError(
            f"config.json ties the output head to the embedding, but lm_head.weight in "
            f"{file.name} differs from model.embed_tokens.weight; set tie_word_embeddings to "
            f"false to use it")


def _ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings
                                                and name == "lm_head.weight")
