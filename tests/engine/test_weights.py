"""Checkpoint folders: safetensors loading and fusion, refusals, dummy weights, tokenizers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.kv_cache import KVArena
from engine.model import CausalLM, load_model
from engine.model_config import ModelLoadError, load_model_config
from engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from engine.weights import checkpoint_placements, safetensors_files
from tests.engine.conftest import EOS_ID, build_hf_checkpoint


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _rewrite_weights(folder: Path, edit) -> None:
    """Apply ``edit(tensors)`` to the single model.safetensors of ``folder``."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --- loading and fusion --------------------------------------------------------------------------

def test_fused_weights_hold_the_checkpoint_tensors(hf_checkpoint):
    ckpt = hf_checkpoint("qwen2")
    model = load_model(str(ckpt.path), torch.float32, "cpu", fold_norms=False)
    hf = dict(ckpt.hf_model.named_parameters())
    c = model.config
    for i, layer in enumerate(model.layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        expected_qkv = torch.cat([hf[attn + f"{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(layer.qkv_proj, expected_qkv)
        assert torch.equal(layer.input_norm, hf[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(layer.post_attention_norm,
                           hf[f"model.layers.{i}.post_attention_layernorm.weight"])
        assert torch.equal(layer.qkv_bias, torch.cat([hf[attn + f"{p}_proj.bias"] for p in "qkv"]))
        assert torch.equal(layer.gate_up_proj, torch.cat([hf[mlp + "gate_proj.weight"],
                                                          hf[mlp + "up_proj.weight"]]))
        assert torch.equal(layer.o_proj, hf[attn + "o_proj.weight"])
        assert layer.qkv_proj.shape == (c.qkv_size, c.hidden_size)
    assert model.lm_head is model.embed_tokens  # tied
    assert torch.equal(model.norm, hf["model.norm.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_scales_each_projection_by_its_norm_weight(hf_checkpoint, dtype):
    """The default load folds each layer's RMSNorm weights into the columns of the projection
    that reads the norm (fp32 product, rounded once) and leaves the norms None."""
    path = str(hf_checkpoint("llama").path)
    plain = load_model(path, dtype, "cpu", fold_norms=False)
    folded = load_model(path, dtype, "cpu")
    for raw, layer in zip(plain.layers, folded.layers):
        assert layer.input_norm is None and layer.post_attention_norm is None
        for projection, unfolded, norm in ((layer.qkv_proj, raw.qkv_proj, raw.input_norm),
                                           (layer.gate_up_proj, raw.gate_up_proj,
                                            raw.post_attention_norm)):
            assert not torch.equal(projection, unfolded)  # the norm weights are not all ones
            assert torch.equal(projection, (unfolded.float() * norm.float()).to(dtype))
        assert torch.equal(layer.o_proj, raw.o_proj) and torch.equal(layer.down_proj, raw.down_proj)
    assert torch.equal(folded.norm, plain.norm)  # the final norm is not folded


def test_every_placement_fills_its_parameter_exactly_once(hf_checkpoint):
    """The placement table tiles each parameter's rows with no gap and no overlap."""
    for family in ("llama", "qwen2", "qwen3", "llama3"):
        model = load_model(str(hf_checkpoint(family).path), torch.float32, "cpu",
                           fold_norms=False)
        covered: dict[str, list[tuple[int, int]]] = {}
        for place in checkpoint_placements(model.config).values():
            covered.setdefault(place.param, []).append((place.row_start, place.shape[0]))
        params = dict(model.named_parameters())
        assert set(covered) == set(params)
        for name, spans in covered.items():
            spans.sort()
            starts = [0] + [s + n for s, n in spans[:-1]]
            assert [s for s, _ in spans] == starts
            assert sum(n for _, n in spans) == params[name].shape[0]


def test_sharded_checkpoint_loads_the_same_weights(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("llama3")
    build_hf_checkpoint("llama3", tmp_path, max_shard_size="100KB", with_tokenizer=False)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    single = load_model(str(ckpt.path), torch.float32, "cpu")
    sharded = load_model(str(tmp_path), torch.float32, "cpu")
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_are_cast_to_the_requested_dtype(hf_checkpoint, dtype):
    ckpt = hf_checkpoint("mistral")
    model = load_model(str(ckpt.path), dtype, "cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    expected = ckpt.hf_model.model.embed_tokens.weight.to(dtype)
    assert torch.equal(model.embed_tokens, expected)
    assert model.rope_cos.dtype == torch.float32  # RoPE tables stay fp32


def test_tied_checkpoint_with_a_stored_lm_head_is_accepted_if_it_is_the_embedding(
        hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama").path, tmp_path)
    _rewrite_weights(folder, lambda t: t.__setitem__("lm_head.weight",
                                                     t["model.embed_tokens.weight"].clone()))
    model = load_model(str(folder), torch.float32, "cpu")
    assert model.lm_head is model.embed_tokens
    # A different head would be used untied by transformers: refused, not silently dropped.
    _rewrite_weights(folder, lambda t: t.__setitem__("lm_head.weight", torch.randn_like(
        t["model.embed_tokens.weight"])))
    with pytest.raises(ModelLoadError, match=r"lm_head\.weight in model\.safetensors differs "
                                             r"from model\.embed_tokens\.weight"):
        load_model(str(folder), torch.float32, "cpu")


def test_a_stray_safetensors_file_beside_model_safetensors_is_not_read(hf_checkpoint, tmp_path):
    """As in transformers: without an index, model.safetensors is the checkpoint."""
    folder = _copy(hf_checkpoint("llama3").path, tmp_path)
    reference = load_model(str(folder), torch.float32, "cpu")
    tensors = load_file(folder / "model.safetensors")
    save_file({"model.norm.weight": -tensors["model.norm.weight"]}, folder / "zz.safetensors")
    model = load_model(str(folder), torch.float32, "cpu")
    assert torch.equal(model.norm, reference.norm)
    # Without model.safetensors every file is read, and two copies of a tensor are refused.
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight' is in both "
                                             r"weights\.safetensors and zz\.safetensors"):
        load_model(str(folder), torch.float32, "cpu")


# --- refusals ------------------------------------------------------------------------------------

def test_pickle_checkpoint_is_refused_without_unpickling(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama").path, tmp_path)
    (folder / "model.safetensors").unlink()
    # Not a valid pickle: if anything tried to unpickle it, the error would differ.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ModelLoadError,
                       match=r"only pickle weights \(pytorch_model\.bin\).*refused"):
        load_model(str(folder), torch.float32, "cpu")


def test_folder_without_weights(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama").path, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights in"):
        load_model(str(folder), torch.float32, "cpu")


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("qwen2").path, tmp_path)
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError,
                       match=r"lacks tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_model(str(folder), torch.float32, "cpu")


def test_shape_mismatch_names_tensor_and_file(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("qwen3").path, tmp_path)
    _rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                                                     torch.randn(127, 64)))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' in "
                                             r"model\.safetensors has shape \[127, 64\], "
                                             r"expected \[128, 64\]"):
        load_model(str(folder), torch.float32, "cpu")


def test_unexpected_tensor_is_refused(hf_checkpoint, tmp_path):
    """A tensor the model has no place for (here: an o_proj bias) would be silently dropped."""
    folder = _copy(hf_checkpoint("llama3").path, tmp_path)
    _rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias",
                                                     torch.randn(64)))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.self_attn\.o_proj\.bias' in "
                                             r"model\.safetensors is not part of"):
        load_model(str(folder), torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_non_float_tensor_is_refused(hf_checkpoint, tmp_path, dtype):
    folder = _copy(hf_checkpoint("llama3").path, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_weights(folder, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(ModelLoadError, match=rf"'{re.escape(name)}' in model\.safetensors has "
                                             rf"dtype \w+; weights must be one of"):
        load_model(str(folder), torch.float32, "cpu")


def test_broken_index_and_files_are_named(tmp_path):
    build_hf_checkpoint("llama3", tmp_path, max_shard_size="100KB", with_tokenizer=False)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # The index maps a tensor to an existing shard that does not hold it.
    name = next(n for n, shard in index["weight_map"].items() if shard == shards[0])
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"],
                                                              name: shards[-1]}}))
    with pytest.raises(ModelLoadError, match=rf"maps '{re.escape(name)}' to {shards[-1]}, which "
                                             rf"does not hold it"):
        load_model(str(tmp_path), torch.float32, "cpu")
    index_path.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        safetensors_files(tmp_path)
    index_path.write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(ModelLoadError, match="'weight_map' must map tensor names"):
        safetensors_files(tmp_path)
    index_path.unlink()
    (tmp_path / shards[0]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # truncated
    with pytest.raises(ModelLoadError, match=rf"cannot read .*{shards[0]}"):
        safetensors_files(tmp_path)


def test_missing_shard_is_named(tmp_path):
    build_hf_checkpoint("llama3", tmp_path, max_shard_size="100KB", with_tokenizer=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"lists shard {shard}, which is not in"):
        safetensors_files(tmp_path)


def test_missing_config_unsupported_architecture_and_bad_names(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("llama").path, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["PhiForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'PhiForCausalLM'"):
        load_model(str(folder), torch.float32, "cpu")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing model config"):
        load_model(str(folder), torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match="neither a local folder nor a dummy:NAME"):
        load_model(str(tmp_path / "nowhere"), torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model("dummy:tiny", torch.float64, "cpu")
    weights_file = hf_checkpoint("llama").path / "model.safetensors"
    with pytest.raises(ModelLoadError, match="model.safetensors is not valid JSON"):
        load_model_config(str(weights_file))
    folder = _copy(hf_checkpoint("llama").path, tmp_path / "again")
    (folder / "generation_config.json").write_text("{'eos_token_id': 2}")
    with pytest.raises(ModelLoadError, match="generation_config.json is not valid JSON"):
        load_model(str(folder), torch.float32, "cpu")


def test_sliding_window_shorter_than_max_model_len_is_refused(tmp_path):
    build_hf_checkpoint("mistral", tmp_path, sliding_window=64, with_tokenizer=False)
    load_model(str(tmp_path), torch.float32, "cpu", max_model_len=64)  # window never reached
    with pytest.raises(ModelLoadError, match="sliding_window=64 is shorter than max_model_len=65"):
        load_model(str(tmp_path), torch.float32, "cpu", max_model_len=65)
    with pytest.raises(ModelLoadError, match="max_model_len=256"):  # default: the whole context
        load_model(str(tmp_path), torch.float32, "cpu")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        load_model("dummy:tiny", torch.float32, "cpu", backend="cuda")


# --- dummy weights -------------------------------------------------------------------------------

def test_dummy_weights_are_seeded_and_fully_initialised():
    a = load_model("dummy:tiny", torch.float32, "cpu", seed=1)
    b = load_model("dummy:tiny", torch.float32, "cpu", seed=1)
    c = load_model("dummy:tiny", torch.float32, "cpu", seed=2)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                            c.named_parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), name
        assert torch.isfinite(pa).all(), name
        if name.endswith("norm"):
            assert (pa.mean() - 1).abs() < 0.01 and pa.std() < 0.05, name
        else:
            assert pa.mean().abs() < 0.005 and 0.015 < pa.std() < 0.025, name


def _decode_and_prefill(model) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [V] of decoding token t after a 9-token prompt (with a dead row beside it in
    the decode batch), and of prefilling prompt + [t] at once."""
    c, device = model.config, model.device
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(0)).to(device)

    def slab(batch):
        arena = KVArena(c.num_layers, c.num_kv_heads, c.head_dim, batch * 16, model.dtype, device)
        # Finite poison in unwritten slots: the reference attention multiplies them by 0.
        arena.k.fill_(100.0)
        arena.v.fill_(-100.0)
        return arena.slab(batch, 16)

    def prefill(ids, kv):
        n = len(ids)
        return model.prefill(ids, torch.arange(n, dtype=torch.int32, device=device),
                             torch.zeros(n, dtype=torch.int32, device=device),
                             torch.tensor([0, n], dtype=torch.int32, device=device), n, kv)

    kv = slab(2)
    prefill(prompt[:-1], kv)
    stepped = model.decode(torch.stack([prompt[-1], prompt[0]]),
                           torch.tensor([8, -1], dtype=torch.int32, device=device), kv)
    whole = prefill(prompt, slab(1))
    assert torch.isfinite(stepped).all()
    assert whole.std() > 0  # random weights must give non-constant logits
    return stepped[0].float(), whole[0].float()


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _assert_decode_continues_prefill(model, rel_tol: float) -> None:
    """Decode's logits equal prefill's to ``rel_tol`` in relative L2 norm."""
    stepped, whole = _decode_and_prefill(model)
    rel = _relative(stepped, whole)
    assert rel < rel_tol, f"decode vs prefill logits: relative error {rel:.2e}"


def test_dummy_decode_continues_prefill_consistently():
    _assert_decode_continues_prefill(load_model("dummy:tiny", torch.float32, "cpu", seed=4), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dummy:qwen2.5-0.5b", "dummy:llama-3.2-1b"])
def test_dummy_models_on_cuda(name):
    model = load_model(name, torch.float32, "cuda", backend="triton")
    _assert_decode_continues_prefill(model, 1e-4)


@pytest.mark.gpu
def test_dummy_8b_is_created_on_the_gpu_in_bf16():
    """The 8B shape in bf16 on the GPU, and its decode step continuing its prefill as closely as
    bf16 allows: against the same weights in fp32 (where decode equals prefill to 1e-4), the
    decode step's logits are no further off than the prefill's. A wrong slot, row or position
    would put them O(1) off."""
    model = load_model("dummy:llama-3.1-8b", torch.bfloat16, "cuda", backend="triton",
                       fold_norms=False)
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head is not model.embed_tokens
    twin = CausalLM(model.config, torch.float32, "cuda", backend="triton")
    with torch.no_grad():
        for (name, fp32), (_, bf16) in zip(twin.named_parameters(), model.named_parameters()):
            fp32.copy_(bf16)
    truth_stepped, truth = _decode_and_prefill(twin)
    assert _relative(truth_stepped, truth) < 1e-4
    del twin
    torch.cuda.empty_cache()
    model.fold_norm_weights()  # as load_model does by default
    stepped, whole = _decode_and_prefill(model)
    prefill_error = _relative(whole, truth)
    assert prefill_error < 0.1
    assert _relative(stepped, truth) < 1.25 * prefill_error
    del model
    torch.cuda.empty_cache()


# --- tokenizers ----------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_placeholders():
    tok = load_tokenizer("dummy:llama-3.2-1b")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 128256
    assert tok.eos_token_id == 257 and tok.bos_token_id == 256
    text = "héllo, wörld — 你好"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256, 9000, 257]) == "hi<|9000|>"
    assert tok.decode([104, 256, 257], skip_special_tokens=False) == "h<|bos|><|eos|>"
    assert tok.decode([0xE4, 104]) == "\ufffdh"  # a cut multi-byte character stays visible


def test_byte_tokenizer_chat_template():
    tok = load_tokenizer("dummy:tiny")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages)
    assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode(text)
    assert not tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False) \
        .endswith("<|assistant|>\n")


def test_hf_tokenizer_from_checkpoint_folder(hf_checkpoint):
    tok = load_tokenizer(str(hf_checkpoint("qwen3").path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_id == EOS_ID and tok.vocab_size <= 320
    ids = tok.encode("the lazy fox says hello")
    assert all(isinstance(i, int) for i in ids) and tok.decode(ids) == "the lazy fox says hello"
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert isinstance(chat, list) and chat[0] == tok.bos_token_id
    assert tok.decode(chat, skip_special_tokens=False) == "<|bos|><|user|>\nhello\n<|assistant|>\n"


def test_folder_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no tokenizer in"):
        load_tokenizer(str(tmp_path))
