"""Plain-torch twins of every Triton kernel, with the same signatures.

They are the test oracle and the CPU path. Arithmetic is fp32 (inputs are upcast after the
load, as in the kernels); outputs come back in the input dtype unless a docstring says otherwise.
"""

from __future__ import annotations

import torch


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One query token per row against that row's first ``seq_lens[b]`` cached positions.

    q: [B, H_q, D]; k_cache, v_cache: [B, C, H_kv, D] (H_q % H_kv == 0); seq_lens: int32 [B],
    0 marks a dead row (its output is zeros). Returns [B, H_q, D] in q's dtype.
    """
    B, Hq, D = q.shape
    if not q.is_cuda and B > 0:
        # The CPU path: read up to the longest live row, not the whole slab (a host sync,
        # which only CUDA graphs would mind).
        longest = max(int(seq_lens.max()), 1)
        k_cache, v_cache = k_cache[:, :longest], v_cache[:, :longest]
    C, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    group = Hq // Hkv
    qf = q.float().view(B, Hkv, group, D)
    live = torch.arange(C, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # [B, C]
    # Slots past a row's length hold whatever the arena held (NaN included): a zero weight
    # times NaN is NaN, so they are zeroed, not just masked.
    k = k_cache.float().masked_fill(~live[:, :, None, None], 0.0)
    v = v_cache.float().masked_fill(~live[:, :, None, None], 0.0)
    scores = torch.einsum("bhgd,bchd->bhgc", qf, k) * scale
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # dead rows: all -inf -> zeros
    out = torch.einsum("bhgc,bchd->bhgd", probs, v)
    return out.reshape(B, Hq, D).to(q.dtype)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor | None = None,
                  norm_input: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """Rotate q and k of new tokens (rotate-half RoPE) and write k, v into the slab.

    q: [T, H_q, D], k, v: [T, H_kv, D] — one new token each; q is rotated in place.
    k_cache, v_cache: [B, C, H_kv, D]; positions: int32 [T], the slot each token goes to
    and its RoPE position (-1 = dead token: nothing written, its q left as is).
    cos, sin: fp32 [max_positions, D // 2] (``kernels.rope_table.rope_cos_sin``).
    rows: int32 [T], the slab row of each token; None means token t goes to row t (decode).
    norm_input: optional [T, H], the unnormalised rows q, k, v were projected from: q, k, v are
    first scaled by 1 / rms(norm_input[t]) (``_scale_by_rms``), q in place on every token.
    """
    T, dtype = q.shape[0], q.dtype
    q_in = q
    if norm_input is not None:  # fp32 from here; rounded once, on store
        q, k, v = (_scale_by_rms(t, norm_input, eps) for t in (q, k, v))
        q_in.copy_(q)  # a dead token's q is scaled but not rotated
    rows = torch.arange(T, device=q.device) if rows is None else rows.long()
    pos = positions.long()
    live = pos >= 0
    p = pos.clamp(min=0)
    c, s = cos[p][:, None, :], sin[p][:, None, :]  # [T, 1, D/2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(dtype)

    q_rot = rotate(q)
    q_in[live] = q_rot[live]
    k_rot = rotate(k)
    k_cache[rows[live], pos[live]] = k_rot[live].to(k_cache.dtype)
    v_cache[rows[live], pos[live]] = v[live].to(dtype).to(v_cache.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float | None = None) -> torch.Tensor:
    """Causal attention over packed variable-length prompts.

    q: [T, H_q, D]; k, v: [T, H_kv, D]; cu_seqlens: int32 [N + 1], sequence n is tokens
    ``cu_seqlens[n]:cu_seqlens[n+1]``; max_seqlen: the longest sequence (a launch-shape hint).
    Returns [T, H_q, D] in q's dtype.
    """
    del max_seqlen
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        L = end - start
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [T, H]; weight: [H] or None. Returns x / rms(x) * weight in x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed if weight is None else normed * weight.float()).to(x.dtype)


def _scale_by_rms(y: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """y [T, ...] (a projection of the unnormalised rows x [T, H]) times 1 / rms(x[t]), in
    fp32: a deferred RMSNorm whose weight is folded into the projection."""
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1) + eps).view(-1, *([1] * (y.dim() - 1)))
    return y.float() * inv_rms


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place), then RMSNorm of the sum.

    x, residual: [T, H] same dtype; weight: [H] or None. Returns (normed [T, H], residual).
    """
    residual.copy_((residual.float() + x.float()).to(residual.dtype))
    return rmsnorm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor, norm_input: torch.Tensor | None = None,
                 eps: float = 0.0) -> torch.Tensor:
    """x: [T, 2 * I] (gate then up). Returns silu(gate) * up: [T, I] in x's dtype.

    norm_input: optional [T, H], the unnormalised rows x was projected from: x is first scaled
    by 1 / rms(norm_input[t]) (``_scale_by_rms``)."""
    dtype = x.dtype
    if norm_input is not None:
        x = _scale_by_rms(x, norm_input, eps)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(dtype)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rmsnorm(x) @ weight.T (+ bias). x: [M, K]; norm_weight: [K] or None (folded into
    weight's columns); weight: [N, K]. Returns [M, N] in x's dtype."""
    return torch.nn.functional.linear(rmsnorm(x, norm_weight, eps), weight, bias)


def qkv_rope_write(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                   weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                   num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``norm_linear`` to q, k, v [T, heads, D], then ``rope_kv_write`` (token t in slab row t);
    returns the rotated q [T, H_q, D]."""
    D = k_cache.shape[-1]
    qkv = norm_linear(x, norm_weight, eps, weight, bias)
    q, k, v = (t.reshape(x.shape[0], -1, D) for t in
               qkv.split([num_q_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1))
    rope_kv_write(q, k, v, k_cache, v_cache, positions, cos, sin)
    return q


def qkv_decode_attention(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                         weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                         num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         positions: torch.Tensor, seq_lens: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
    """``qkv_rope_write``, then ``decode_attention`` over slots 0 .. positions[b] of each row
    (seq_lens = positions + 1); returns [T, H_q, D]."""
    q = qkv_rope_write(x, norm_weight, eps, weight, bias, num_q_heads, num_kv_heads, k_cache,
                       v_cache, positions, cos, sin)
    return decode_attention(q, k_cache, v_cache, seq_lens)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual += x @ weight.T`` in place (one rounding); returns residual [M, N]."""
    return residual.addmm_(x, weight.t())


def gated_linear_residual(gate_up: torch.Tensor, weight: torch.Tensor,
                          residual: torch.Tensor) -> torch.Tensor:
    """``residual += silu_and_mul(gate_up) @ weight.T`` in place; gate_up: [M, 2K]."""
    return residual.addmm_(silu_and_mul(gate_up), weight.t())


def advance_positions(positions: torch.Tensor) -> torch.Tensor:
    """positions: int32 [B]; in place, each entry >= 0 grows by one and -1 (a dead row) stays.
    Returns positions."""
    return positions.add_((positions >= 0).to(positions.dtype))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] (fp32). Returns int64 [B]: the first index of each row's maximum."""
    return logits.argmax(dim=-1)


def lm_head_argmax(x: torch.Tensor, weight: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's greedy token: argmax of the logits of x [M, K] @ weight [V, K].T, computed
    as ``kernels.cublaslt.logits`` does off the GPU (in x's dtype, then fp32). Returns int64 [M]
    (into ``out`` when given)."""
    return torch.argmax(torch.nn.functional.linear(x, weight).float(), dim=-1, out=out)


def mlp_residual(residual: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                 gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP block in place: ``residual += silu_and_mul(norm_linear(residual,
    norm_weight, eps, gate_up_weight)) @ down_weight.T``; returns residual [M, H]."""
    gate_up = norm_linear(residual, norm_weight, eps, gate_up_weight)
    return gated_linear_residual(gate_up, down_weight, residual)


def output_mlp_residual(attn: torch.Tensor, o_weight: torch.Tensor, residual: torch.Tensor,
                        norm_weight: torch.Tensor | None, eps: float,
                        gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """The rest of a layer after attention, in place: ``linear_residual(attn, o_weight,
    residual)``, then ``mlp_residual``; returns residual [M, H]."""
    linear_residual(attn, o_weight, residual)
    return mlp_residual(residual, norm_weight, eps, gate_up_weight, down_weight)
