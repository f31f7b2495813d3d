"""The decoder-only transformer (Llama / Qwen2 / Mistral / Qwen3), in one file.

Weights are stored fused for fewer, larger matrix products: one QKV projection
``[(H_q + 2 H_kv) * D, hidden]`` (plus its bias for Qwen2) and one gate/up projection
``[2 I, hidden]``. Once loaded, each layer's two RMSNorm weights are folded into the columns of
the projection that follows them (``fold_norm_weights``): RMSNorm(x) * g @ W.T equals
RMSNorm(x) @ (W * g).T, and a norm without a weight is a per-row scalar 1 / rms(x) that the ops
may apply after the product instead of before it — which lets a decode step of many rows skip
the norm kernels (``kernels.linear``).

Every op but the embedding and the lm_head's logits goes through ``ops``
(``engine.backend.get_ops``), so the same code runs the plain-torch reference ops or our Triton
kernels. The layer is written as its projections with their neighbours attached
(``qkv_decode_attention`` and ``output_mlp_residual``, the rest of the layer after attention):
the residual stream is updated in place by the ops that end each half of the layer, and the
norms are taken by the ops that start them; the ops decide what to fuse. A greedy decode step
ends in ``ops.lm_head_argmax``, which may pick each row's token without writing its logits.

Two entry points, both writing K/V into a ``KVSlab`` ``[B, C, H_kv, D]`` per layer:
``prefill`` runs packed prompts; ``decode`` runs one new token per slab row and is CUDA-graph
capturable (no host syncs, no value-dependent shapes).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine import dummy, weights
from engine.backend import get_ops
from engine.kv_cache import KVSlab
from engine.model_config import ModelConfig, ModelLoadError, load_model_config
from kernels import cublaslt
from kernels.rope_table import rope_cos_sin

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: the checkpoint loader or the dummy initialiser fills every element.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP. Parameter names are what ``engine.weights`` maps to;
    ``input_norm`` and ``post_attention_norm`` are None once folded
    (``CausalLM.fold_norm_weights``)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        c, kw = config, dict(dtype=dtype, device=device)
        self.input_norm = _weight(c.hidden_size, **kw)
        self.qkv_proj = _weight(c.qkv_size, c.hidden_size, **kw)
        self.qkv_bias = _weight(c.qkv_size, **kw) if c.qkv_bias else None
        self.q_norm = _weight(c.head_dim, **kw) if c.qk_norm else None
        self.k_norm = _weight(c.head_dim, **kw) if c.qk_norm else None
        self.o_proj = _weight(c.hidden_size, c.num_heads * c.head_dim, **kw)
        self.post_attention_norm = _weight(c.hidden_size, **kw)
        self.gate_up_proj = _weight(2 * c.intermediate_size, c.hidden_size, **kw)
        self.down_proj = _weight(c.hidden_size, c.intermediate_size, **kw)


class CausalLM(nn.Module):
    """Token ids in, fp32 next-token logits out; K/V live in a caller-owned ``KVSlab``.

    Args:
        config: the model shape.
        dtype, device: where the (uninitialised) weights are allocated.
        backend: ``"reference"`` or ``"triton"`` (see ``engine.backend``).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 backend: str = "reference"):
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.backend = backend
        self.ops = get_ops(backend)
        kw = dict(dtype=dtype, device=device)
        self.embed_tokens = _weight(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device)
                                    for _ in range(config.num_layers))
        self.norm = _weight(config.hidden_size, **kw)
        self.lm_head = (self.embed_tokens if config.tie_word_embeddings
                        else _weight(config.vocab_size, config.hidden_size, **kw))
        # fp32 [max_position_embeddings, D // 2], built once; indexed by position.
        cos, sin = rope_cos_sin(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                config.rope_scaling, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def fold_norm_weights(self) -> None:
        """Multiply each layer's ``input_norm`` into the columns of ``qkv_proj`` and its
        ``post_attention_norm`` into those of ``gate_up_proj`` (in fp32, rounded once to the
        weights' dtype), then set both norms to None: the ops then normalise without a weight.
        Qwen3's per-head q/k norms and the final norm (the lm_head may be the tied embedding)
        stay as they are. Idempotent."""
        for layer in self.layers:
            for norm_name, projection in (("input_norm", layer.qkv_proj),
                                          ("post_attention_norm", layer.gate_up_proj)):
                norm_weight = getattr(layer, norm_name)
                if norm_weight is None:
                    continue
                projection.copy_(projection.float() * norm_weight.float())
                setattr(layer, norm_name, None)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, kv: KVSlab) -> torch.Tensor:
        """Run N packed prompts, write their K/V into the slab, return their next-token logits.

        input_ids: int64 [T], the prompts back to back; positions: int32 [T], 0..len-1 within
        each prompt (also the slab slot); rows: int32 [T], the slab row of each token;
        cu_seqlens: int32 [N + 1], prompt n is tokens ``cu_seqlens[n]:cu_seqlens[n+1]`` (every
        prompt non-empty); max_seqlen: the longest prompt.
        Returns fp32 [N, V]: logits at each prompt's last token.
        """
        ops, c = self.ops, self.config

        def attention(layer_index: int, layer: DecoderLayer,
                      residual: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(layer, residual)
            k_cache, v_cache = kv.k[layer_index], kv.v[layer_index]
            ops.rope_kv_write(q, k, v, k_cache, v_cache, positions, self.rope_cos, self.rope_sin,
                              rows)
            # rope_kv_write rotates q in place but k only into the cache: read the rotated k back.
            k_rotated = k_cache[rows.long(), positions.long()].to(k.dtype)
            return ops.prefill_attention(q, k_rotated, v, cu_seqlens, max_seqlen)

        residual = self._layers(input_ids, attention)
        last = cu_seqlens[1:].long() - 1
        x = ops.rmsnorm(residual[last], self.norm, c.rms_norm_eps)
        return self._logits(x)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVSlab) -> torch.Tensor:
        """One new token for every slab row.

        input_ids: int64 [B] (any valid id on a dead row); positions: int32 [B], the slot the
        new token goes to, -1 for a dead row (nothing written; its logits are finite and meaningless).
        Attention covers slots ``0 .. positions[b]``. Returns fp32 [B, V].
        CUDA-graph capturable with the Triton backend: fixed shapes, no host syncs.
        """
        return self._logits(self._decode_hidden(input_ids, positions, kv))

    @torch.no_grad()
    def decode_greedy(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVSlab,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """``decode``, then each row's argmax (ties: the lowest id), through
        ``ops.lm_head_argmax``, which may never write the logits. Arguments as ``decode``'s;
        out: optional int64 [B], which may be ``input_ids`` itself (read before it is written).
        Returns int64 [B]: each row's greedy token."""
        x = self._decode_hidden(input_ids, positions, kv)
        return self.ops.lm_head_argmax(x, self.lm_head, out=out)

    def _decode_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv: KVSlab) -> torch.Tensor:
        """Every layer of a decode step and the final norm: [B, hidden], the lm_head's input."""
        ops, c = self.ops, self.config
        seq_lens = positions + 1  # 0 on dead rows

        def attention(layer_index: int, layer: DecoderLayer,
                      residual: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = kv.k[layer_index], kv.v[layer_index]
            if c.qk_norm:  # Qwen3 normalises q and k between the projection and RoPE
                q, k, v = self._qkv(layer, residual)
                ops.rope_kv_write(q, k, v, k_cache, v_cache, positions, self.rope_cos,
                                  self.rope_sin)
                return ops.decode_attention(q, k_cache, v_cache, seq_lens)
            return ops.qkv_decode_attention(
                residual, layer.input_norm, c.rms_norm_eps, layer.qkv_proj, layer.qkv_bias,
                c.num_heads, c.num_kv_heads, k_cache, v_cache, positions, seq_lens,
                self.rope_cos, self.rope_sin)

        residual = self._layers(input_ids, attention)
        return ops.rmsnorm(residual, self.norm, c.rms_norm_eps)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, V] of normalised x [T, hidden]."""
        return cublaslt.logits(x, self.lm_head)

    def _layers(self, input_ids: torch.Tensor, attention) -> torch.Tensor:
        """Embedding and every decoder layer; returns the residual stream [T, hidden].

        ``attention(layer_index, layer, residual)`` returns the attention heads' output
        [T, H_q, D] (before the output projection); ``output_mlp_residual`` adds the output
        projection and then the MLP to ``residual`` in place. The final norm is left to the
        caller, which may only need some tokens.
        """
        ops, c = self.ops, self.config
        residual = F.embedding(input_ids, self.embed_tokens)
        for i, layer in enumerate(self.layers):
            out = attention(i, layer, residual)
            ops.output_mlp_residual(out.reshape(residual.shape[0], c.num_heads * c.head_dim),
                                    layer.o_proj, residual, layer.post_attention_norm,
                                    c.rms_norm_eps, layer.gate_up_proj, layer.down_proj)
        return residual

    def _qkv(self, layer: DecoderLayer, residual: torch.Tensor):
        """Normalise the residual stream [T, hidden] and project it to q [T, H_q, D], k and v
        [T, H_kv, D].

        q, k and v are strided views of the fused output (the ops take any strides with a
        contiguous last dim), except under Qwen3's per-head q/k RMSNorm (applied before RoPE).
        """
        c = self.config
        T = residual.shape[0]
        qkv = self.ops.norm_linear(residual, layer.input_norm, c.rms_norm_eps, layer.qkv_proj,
                                   layer.qkv_bias)
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                             c.num_kv_heads * c.head_dim], dim=-1)
        if c.qk_norm:
            q = self.ops.rmsnorm(q.reshape(-1, c.head_dim), layer.q_norm, c.rms_norm_eps)
            k = self.ops.rmsnorm(k.reshape(-1, c.head_dim), layer.k_norm, c.rms_norm_eps)
        return (q.view(T, c.num_heads, c.head_dim), k.view(T, c.num_kv_heads, c.head_dim),
                v.view(T, c.num_kv_heads, c.head_dim))


def load_model(model: str, dtype: torch.dtype, device: torch.device | str,
               backend: str = "reference", seed: int = 0,
               max_model_len: int | None = None, fold_norms: bool = True) -> CausalLM:
    """Build a ``CausalLM`` from a local Hugging Face folder or a ``dummy:NAME`` model.

    model: a folder with ``config.json`` and ``*.safetensors``, or ``dummy:tiny``,
    ``dummy:qwen2.5-0.5b``, ``dummy:llama-3.2-1b``, ``dummy:llama-3.1-8b`` (seeded random weights
    of the real shape, created on ``device``). dtype: bf16, fp16 or fp32.
    max_model_len: the longest sequence to be served (default: max_position_embeddings);
    a model whose sliding window is shorter is refused.
    fold_norms: fold the layers' RMSNorm weights into their projections
    (``CausalLM.fold_norm_weights``); off keeps the checkpoint's tensors as they are.
    Raises ``ModelLoadError`` with a message naming the file or tensor at fault.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype} (choose bfloat16, float16 or float32)")
    device = torch.device(device)
    if model.startswith("dummy:"):
        config = dummy.dummy_config(model)
    elif Path(model).is_dir():
        config = load_model_config(model)
    else:
        raise ModelLoadError(f"model {model!r} is neither a local folder nor a dummy:NAME model")
    config.check_max_model_len(max_model_len or config.max_position_embeddings)
    lm = CausalLM(config, dtype, device, backend)
    if model.startswith("dummy:"):
        dummy.init_random_weights(lm, seed)
    else:
        weights.load_safetensors(lm, model)
    if fold_norms:
        lm.fold_norm_weights()
    return lm.eval()

