"""The decoder layer's linear layers with their neighbours fused in.

These ops cover every projection of a layer (``kernels.reference`` has their plain-torch twins):

- ``norm_linear(x, norm_weight, eps, weight, bias)``: RMSNorm(x) @ W.T (+ bias) — QKV, gate/up;
- ``qkv_rope_write(...)``: the decode step's QKV projection with RoPE and the K/V slab write;
- ``qkv_decode_attention(...)``: that, then decode attention — from 2 to 16 rows the RoPE and
  the write run inside the attention kernel (``kernels.decode_attention.NewToken``);
- ``linear_residual(x, weight, residual)``: residual += x @ W.T — the output projection;
- ``gated_linear_residual(gate_up, weight, residual)``: residual += (silu(gate) * up) @ W.T —
  the down projection;
- ``mlp_residual(residual, norm_weight, eps, gate_up_weight, down_weight)``: the whole SwiGLU
  block, residual += MLP(RMSNorm(residual));
- ``output_mlp_residual(attn, o_weight, residual, norm_weight, eps, gate_up_weight,
  down_weight)``: the rest of the layer after attention, ``linear_residual`` then
  ``mlp_residual``, with the MLP's norm taken from the output product's epilogue.

``norm_weight`` may be None: the model folds each RMSNorm weight into the columns of the
projection that follows it (``engine.model``), RMSNorm(x) * g @ W.T = RMSNorm(x) @ (W * g).T.

Three regimes by the number of rows M:

- M <= ``GEMV_MAX_ROWS`` (one row, a B = 1 decode step) is a stream over the weight matrix:
  each weight byte is read once and the activation is a few KB. One Triton kernel
  (``_gemv_kernel``) does the norm or the activation on the fly as it loads the activation, the
  product as CUDA-core FMAs, and the bias and residual add before its single store, instead of
  cuBLAS plus three small kernels (each one a launch and a round trip of the activations
  through memory). The norm needs the whole row's sum of squares, which is only known at the
  end of the K loop, so the kernel multiplies by the RMSNorm weight on load and by 1 / rms(x)
  after the loop (a per-row scalar commutes with the product). A row has no tile of 16 for
  the tensor cores to fill; FMAs keep up with the weight stream (2 FLOP per 2 bytes). On
  Hopper each launch is a programmatic dependent one, as ``kernels.gemm``'s are: its programs
  start while the previous kernel drains, ask the L2 for their first weight columns, and wait
  on the device before they read the activation.
- ``GEMM_MIN_ROWS`` <= M <= ``GEMM_MAX_ROWS`` (a decode step of 2 to 64 rows) runs
  ``kernels.gemm`` on the tensor cores, as programmatic dependent launches that overlap each
  product's start with the previous kernel's end: the MLP is two launches (gate/up with RMSNorm
  and SiLU-and-mul fused, then down with the residual add); after the output product, which
  leaves each row's partial sums of squares behind, the gate/up product's RMSNorm costs only
  their sum (``kernels.gemm`` PARTIAL_NORM); a folded QKV norm is deferred to the kernel that
  reads q, k and v next (RoPE, or attention: ``rotates_in_attention``) as
  below. Up to 16 rows the kernel's tile is transposed (``kernels.gemm.SWAP_AB_ROWS``).
- Over 64 rows M goes to cuBLAS (``kernels.cublaslt.mm``: in a decode step, the fastest of
  cuBLASLt's algorithms for the shape), which is the better GEMM there, with the residual add as the
  GEMM's own accumulate (beta = 1), which costs no extra kernel or pass. The RMSNorm
  before it is deferred when its weight is folded: cuBLAS multiplies the raw rows x, and the
  kernel that reads the product next — RoPE + K/V write after QKV (or attention,
  ``rotates_in_attention``), SiLU-and-mul after gate/up
  — scales each row by 1 / rms(x) (a per-row scalar commutes with the product). That removes
  both norm kernels of a layer. Not for fp16, whose unnormalised products can overflow, nor
  with a QKV bias, which must come after the scale: those run our RMSNorm kernel first.

Numerics: fp32 accumulation; the normalised or activated operand is rounded to the weight
dtype before the product (as the unfused ops round their outputs); the residual sum is
rounded once. A deferred norm's product is rounded once by cuBLAS and scaled in fp32. The
kernel's products are IEEE fp32 FMAs in every dtype (no tf32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import cublaslt
from kernels.activation import silu_and_mul
from kernels.decode_attention import NewToken, decode_attention
from kernels.device import has_pdl
from kernels.gemm import (GEMM_MAX_ROWS, GEMM_MIN_ROWS, NORM, PARTIAL_NORM, PLAIN,
                          SWAP_AB_ROWS, gemm_config, gemm_programs, prefetch_columns_to_l2,
                          skinny_gemm)
from kernels.rmsnorm import rmsnorm
from kernels.rope_kv_write import _check as _check_rope
from kernels.rope_kv_write import rope_kv_write

# BINDECODE_ROPE_IN_ATTENTION=0 keeps RoPE and the slab write in their own kernel on every decode
# step (to measure what moving them into the attention kernel gives); read once.
ROPE_IN_ATTENTION = os.environ.get("BINDECODE_ROPE_IN_ATTENTION") != "0"
# BINDECODE_PARTIAL_NORM=0 runs output_mlp_residual as its two ops (the gate/up product then
# squares its x tiles for the norm), to measure what the partial sums give; read once.
PARTIAL_NORM_AFTER_OUTPUT = os.environ.get("BINDECODE_PARTIAL_NORM") != "0"
# BINDECODE_SMALL_ROWS_GEMM=0 sends 2 to SWAP_AB_ROWS rows to cuBLAS, as before the transposed
# tile (to measure what it gives); read once.
SMALL_ROWS_GEMM = os.environ.get("BINDECODE_SMALL_ROWS_GEMM") != "0"
# BINDECODE_GEMV_PDL=0 launches the one-row GEMV kernels as plain launches, as before they were
# programmatic dependent ones (to measure what that gives); read once.
GEMV_PDL = os.environ.get("BINDECODE_GEMV_PDL") != "0"

# Rows the GEMV kernel takes. Against the transposed kernels.gemm tile at one row, B = 1 steps
# with its dependent launches measured 1.108 against 1.112 ms for the 1B shape and 5.364
# against 5.606 ms for the 8B one on the H100 (bench/RESULTS.md).
GEMV_MAX_ROWS = 1
# Decode steps of 2 to ROPE_IN_ATTENTION_MAX_ROWS rows rotate in attention, and so do steps
# of more than GEMM_MAX_ROWS rows (cuBLAS projections) with heads of at most
# ROPE_IN_ATTENTION_WIDE_HEAD_DIM dims (``rotates_in_attention``; the measurements behind it are
# in ``qkv_decode_attention``'s docstring).
ROPE_IN_ATTENTION_MAX_ROWS = 16
ROPE_IN_ATTENTION_WIDE_HEAD_DIM = 64
# Weight columns of each of its rows a GEMV program asks the L2 for before it waits on the
# previous kernel, when launched as a programmatic dependent launch (16-bit weights). B = 1
# steps on the H100 with 0 / 64 / 128 / 256 / 512 / 1024 columns: 1B 1.126 / 1.120 / 1.117 /
# 1.112 / 1.108 / 1.131 ms, 8B 5.439 / 5.422 / 5.411 / 5.395 / 5.368 / 5.421 (bench/RESULTS.md).
GEMV_PREFETCH_K = 512
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATED = 2  # the GEMV kernel's third prologue (PLAIN and NORM are kernels.gemm's)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of ``_gemv_kernel``: output features per program, the K tile, warps and
    software-pipeline stages; whether the launch is a programmatic dependent one, and how many
    weight columns of each of its rows a program prefetches into L2 before it waits (a
    multiple of 64, or 0)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    pdl: bool = False
    prefetch_k: int = 0


def gemv_config(n: int, k: int, dtype: torch.dtype, pdl: bool = False) -> GemvConfig:
    """The launch shape for an [N, K] weight of ``dtype``; a pure function.

    8 output features per program and K tiles of up to 1024: with 4 warps each thread loads
    64 weight elements per iteration (eight 16-byte loads in flight for 16-bit weights), which
    is what keeps a weight stream near the copy bandwidth without a shared-memory pipeline.
    Measured on the H100 against 4/16 features, 256/512 tiles, 2/8 warps and 1-3 stages
    (``python -m bench.kernel_linear --sweep``): best or within 3% of best on every projection
    of Llama-3.2-1B and Llama-3.1-8B; 1024 tiles beat 512 by up to 14% on the down projections.
    The loop's loads feed no tensor-core product, so there is no multi-stage pipeline to ask for.
    ``pdl``: a programmatic dependent launch, which prefetches the first GEMV_PREFETCH_K
    columns (at most the first K tile) of 16-bit weights.
    """
    block_k = min(1024, max(16, triton.next_power_of_2(k)))
    prefetch_k = min(GEMV_PREFETCH_K, block_k) if pdl and dtype != torch.float32 else 0
    return GemvConfig(block_n=8, block_k=block_k, num_warps=4, num_stages=1, pdl=pdl,
                      prefetch_k=prefetch_k // 64 * 64)


def gemv_launch_meta(config: GemvConfig, n: int, k: int, prologue: int, has_bias: bool,
                     add_residual: bool, has_norm_weight: bool = False) -> dict:
    """Constexprs and launch options of one launch (what the AOT test compiles)."""
    return dict(PROLOGUE=prologue, HAS_NORM_WEIGHT=has_norm_weight, HAS_BIAS=has_bias,
                ADD_RESIDUAL=add_residual, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
                PDL=config.pdl, PREFETCH_K=config.prefetch_k,
                num_warps=config.num_warps, num_stages=config.num_stages)


def qkv_rope_launch_meta(config: GemvConfig, hidden: int, head_dim: int,
                         has_norm_weight: bool, has_bias: bool) -> dict:
    """Constexprs and launch options of one ``_qkv_rope_kernel`` launch (what the AOT test
    compiles)."""
    return dict(HAS_NORM_WEIGHT=has_norm_weight, HAS_BIAS=has_bias, HALF=head_dim // 2,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                EVEN_K=hidden % config.block_k == 0, PDL=config.pdl,
                PREFETCH_K=config.prefetch_k, num_warps=config.num_warps,
                num_stages=config.num_stages)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x) * norm_weight @ weight.T (+ bias).

    x: [M, K] (fp16 / bf16 / fp32, last dim contiguous); norm_weight: [K] contiguous float, or
    None (no norm weight: it was folded into ``weight``'s columns); weight: [N, K] contiguous,
    x's dtype; bias: [N] contiguous or None; out: optional [M, N] in x's dtype with a
    contiguous last dim. Returns [M, N] in x's dtype.
    """
    M, K = _check(x, weight, x.shape[-1] if x.dim() == 2 else -1, "norm_linear")
    N = weight.shape[0]
    if norm_weight is not None:
        _check_vector("norm_weight", norm_weight, K, x.device)
    if bias is not None:
        _check_vector("bias", bias, N, x.device)
    if out is not None and (out.shape != (M, N) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"norm_linear: out must be [{M}, {N}] {x.dtype} with a contiguous last "
                         f"dim, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if M > GEMV_MAX_ROWS and not _takes_skinny_gemm(M):
        result = F.linear(rmsnorm(x, norm_weight, eps), weight, bias)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if _takes_skinny_gemm(M):
        if norm_weight is not None:  # unfolded: normalise first (see kernels.gemm)
            return skinny_gemm(rmsnorm(x, norm_weight, eps), weight, out, PLAIN, bias=bias)
        return skinny_gemm(x, weight, out, NORM, bias=bias, eps=eps)
    return _gemv(x, weight, out, prologue=NORM, bias=bias, norm_weight=norm_weight, eps=eps)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual += x @ weight.T, in place (one rounding of the sum); returns residual.

    x: [M, K]; weight: [N, K] contiguous; residual: [M, N] with a contiguous last dim; all one
    dtype (fp16 / bf16 / fp32).
    """
    _check(x, weight, x.shape[-1] if x.dim() == 2 else -1, "linear_residual")
    _check_residual(residual, x.shape[0], weight)
    if _takes_skinny_gemm(x.shape[0]):
        return skinny_gemm(x, weight, residual, PLAIN, add_residual=True)
    if x.shape[0] > GEMV_MAX_ROWS:
        return cublaslt.mm(x, weight, residual, accumulate=True)
    return _gemv(x, weight, residual, prologue=PLAIN, residual=residual)


def gated_linear_residual(gate_up: torch.Tensor, weight: torch.Tensor,
                          residual: torch.Tensor) -> torch.Tensor:
    """residual += (silu(gate) * up) @ weight.T, in place; returns residual.

    gate_up: [M, 2 K] (gate then up, last dim contiguous); weight: [N, K] contiguous;
    residual: [M, N]; all one dtype.
    """
    inner = gate_up.shape[-1] // 2 if gate_up.dim() == 2 and gate_up.shape[-1] % 2 == 0 else -1
    _check(gate_up, weight, inner, "gated_linear_residual")
    _check_residual(residual, gate_up.shape[0], weight)
    if _takes_skinny_gemm(gate_up.shape[0]):
        return skinny_gemm(silu_and_mul(gate_up), weight, residual, PLAIN, add_residual=True)
    if gate_up.shape[0] > GEMV_MAX_ROWS:
        return cublaslt.mm(silu_and_mul(gate_up), weight, residual, accumulate=True)
    return _gemv(gate_up, weight, residual, prologue=GATED, residual=residual)


def qkv_rope_write(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                   weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                   num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A decode step's attention input: q, k, v = RMSNorm(x) @ weight.T (+ bias); q and k
    rotated (rotate-half RoPE) at ``positions``; k and v written into the slab. Returns q.

    x: [T, hidden], token t in slab row t; weight: [(H_q + 2 H_kv) * D, hidden] contiguous,
    bias: [(H_q + 2 H_kv) * D] or None; k_cache, v_cache: [B, C, H_kv, D]; positions: int32
    [T] (-1 = dead row: nothing written, its q unrotated); cos, sin: fp32 [max_positions,
    D // 2]. Returns q [T, H_q, D] in x's dtype.

    One token (B = 1 decode) runs as one kernel: the projection's GEMV with RoPE and the slab
    write as its epilogue (``_qkv_rope_kernel``). More tokens run the projection, then
    ``rope_kv_write`` — which also applies the 1 / rms when the norm is deferred (see the
    module docstring).
    """
    _check_qkv_weight("qkv_rope_write", weight, num_q_heads, num_kv_heads, k_cache)
    if not _qkv_gemv_fuses_rope(x, weight, k_cache, v_cache):
        q, k, v, norm_input = _project_qkv("qkv_rope_write", x, norm_weight, eps, weight, bias,
                                           num_q_heads, num_kv_heads, k_cache.shape[-1])
        rope_kv_write(q, k, v, k_cache, v_cache, positions, cos, sin, norm_input=norm_input,
                      eps=eps)
        return q
    head_dim = k_cache.shape[-1]
    config = gemv_config(weight.shape[0], weight.shape[1], weight.dtype, _gemv_pdl(x.device))
    _check(x, weight, weight.shape[1], "qkv_rope_write")
    if norm_weight is not None:
        _check_vector("norm_weight", norm_weight, weight.shape[1], x.device)
    if bias is not None:
        _check_vector("bias", bias, weight.shape[0], x.device)
    q = torch.empty(1, num_q_heads, head_dim, dtype=x.dtype, device=x.device)
    # The unfused path's checks cover the RoPE operands (q, k, v views of the right shapes).
    _check_rope(q, q.new_empty(1, num_kv_heads, head_dim), q.new_empty(1, num_kv_heads, head_dim),
                k_cache, v_cache, positions, cos, sin, None)
    _qkv_rope_kernel[(weight.shape[0] // config.block_n,)](
        x, weight, bias if bias is not None else x,
        norm_weight if norm_weight is not None else x, q, k_cache, v_cache, positions,
        cos, sin, weight.shape[1], eps, k_cache.stride(1), k_cache.stride(2), num_q_heads,
        num_kv_heads, launch_pdl=config.pdl,
        **qkv_rope_launch_meta(config, weight.shape[1], head_dim, norm_weight is not None,
                               bias is not None))
    return q


def qkv_decode_attention(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                         weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int,
                         num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         positions: torch.Tensor, seq_lens: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
    """A decode step's attention from its residual rows: ``qkv_rope_write``, then
    ``decode_attention`` over each row's slots 0 .. positions[b]. Returns [T, H_q, D].

    Arguments as ``qkv_rope_write``'s (token t in slab row t, T = the slab's B), plus seq_lens:
    int32 [T] = positions + 1, which the caller computes once per step for all layers (here it
    would be one more kernel per layer). One row keeps the GEMV kernel with RoPE and the slab
    write in its epilogue. Where ``rotates_in_attention`` says so, RoPE and the write move into
    the attention kernel (``NewToken``), which saves the RoPE kernel's launch but delays every
    attention program's first tile (the rotation, the write and the deferred 1 / rms, a load
    of the row). Measured side by side on the H100 (bench/RESULTS.md):
    - 2-16 rows: B = 8 steps 0.9% (1B) and 2.3% (8B) shorter with cuBLAS projections, and with
      ours (transposed tiles, dependent launches) 1B level and 8B 0.7% shorter;
    - 17-64 rows, where the QKV product and the RoPE kernel are dependent launches that overlap
      each other's edges: 1B B = 32 0.8% longer, B = 64 level (8B 0.4-0.7% shorter);
    - more rows, where the QKV product is cuBLAS's and the RoPE launch is exposed: 1B (D = 64)
      B = 96 / 128 / 256 3.7-3.8 / 0.9-1.4 / 0.4-1.0% shorter, 8B (D = 128, twice the rotation
      and a 4096-wide row to load) level at 96 and 128 rows and 0.6% longer at 256.
    """
    rows = x.shape[0] if x.dim() == 2 else -1
    if not rotates_in_attention(rows, k_cache.shape[-1]):
        q = qkv_rope_write(x, norm_weight, eps, weight, bias, num_q_heads, num_kv_heads,
                           k_cache, v_cache, positions, cos, sin)
        return decode_attention(q, k_cache, v_cache, seq_lens)
    _check_qkv_weight("qkv_decode_attention", weight, num_q_heads, num_kv_heads, k_cache)
    q, k, v, norm_input = _project_qkv("qkv_decode_attention", x, norm_weight, eps, weight, bias,
                                       num_q_heads, num_kv_heads, k_cache.shape[-1])
    _check_rope(q, k, v, k_cache, v_cache, positions, cos, sin, None)
    return decode_attention(q, k_cache, v_cache, seq_lens,
                            new_token=NewToken(k, v, cos, sin, norm_input, eps))


def rotates_in_attention(rows: int, head_dim: int) -> bool:
    """Whether a decode step of ``rows`` rows with heads of ``head_dim`` dims hands RoPE and
    the slab write to the attention kernel (``qkv_decode_attention``); a pure function."""
    if not ROPE_IN_ATTENTION or rows <= GEMV_MAX_ROWS:
        return False
    return rows <= ROPE_IN_ATTENTION_MAX_ROWS or (
        rows > GEMM_MAX_ROWS and head_dim <= ROPE_IN_ATTENTION_WIDE_HEAD_DIM)


def _check_qkv_weight(op: str, weight, num_q_heads, num_kv_heads, k_cache) -> None:
    head_dim = k_cache.shape[-1]
    if (weight.dim() != 2 or k_cache.dim() != 4
            or weight.shape[0] != (num_q_heads + 2 * num_kv_heads) * head_dim):
        raise ValueError(f"{op}: weight {tuple(weight.shape)} does not hold "
                         f"{num_q_heads} + 2 x {num_kv_heads} heads of the cache's size "
                         f"{head_dim} (k_cache {tuple(k_cache.shape)})")


def _qkv_gemv_fuses_rope(x, weight, k_cache, v_cache) -> bool:
    """Whether ``qkv_rope_write`` runs as one GEMV kernel with RoPE and the slab write in its
    epilogue (one row)."""
    head_dim = k_cache.shape[-1]
    block_n = gemv_config(weight.shape[0], weight.shape[1], weight.dtype).block_n
    return (x.dim() == 2 and x.shape[0] == 1 and head_dim % 2 == 0
            and (head_dim // 2) % (block_n // 2) == 0 and k_cache.stride() == v_cache.stride())


def _project_qkv(op, x, norm_weight, eps, weight, bias, num_q_heads, num_kv_heads, head_dim):
    """q [T, H_q, D], k, v [T, H_kv, D] (views of one product) and the rows whose 1 / rms the
    next kernel still owes them (None when the norm ran before the product); ``op`` names the
    caller in errors."""
    T = x.shape[0] if x.dim() == 2 else -1
    if _defers_norm(x, norm_weight, bias):
        _check(x, weight, weight.shape[1], op)
        qkv = (skinny_gemm(x, weight, x.new_empty(T, weight.shape[0]), PLAIN)
               if _takes_skinny_gemm(T) else cublaslt.mm(x, weight))
        norm_input = x
    else:
        qkv = norm_linear(x, norm_weight, eps, weight, bias)
        norm_input = None
    sizes = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = (t.view(T, -1, head_dim) for t in qkv.split(sizes, dim=-1))
    return q, k, v, norm_input


def mlp_residual(residual: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                 gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP block in place: residual += (silu(gate) * up) @ down_weight.T with
    gate, up = RMSNorm(residual) (* norm_weight) @ gate_up_weight.T. Returns residual.

    residual: [M, H] with a contiguous last dim; norm_weight: [H] or None (folded);
    gate_up_weight: [2 I, H] (gate rows then up rows) and down_weight: [H, I], contiguous,
    residual's dtype.

    One row: two GEMV launches (norm on load; SiLU-and-mul on load, residual add on store).
    GEMM_MIN_ROWS to GEMM_MAX_ROWS rows: two ``kernels.gemm`` launches (norm and SiLU-and-mul
    fused into the gate/up product, the residual add into the down product).
    More rows with a folded norm weight: cuBLAS on the raw rows, our SiLU-and-mul kernel with
    the deferred 1 / rms, cuBLAS accumulating into the residual — three launches.
    """
    _check_mlp("mlp_residual", residual, gate_up_weight, down_weight)
    M = residual.shape[0]
    if _takes_skinny_gemm(M):
        if norm_weight is not None:
            _check_vector("norm_weight", norm_weight, residual.shape[1], residual.device)
        act = residual.new_empty(M, down_weight.shape[1])
        if norm_weight is None:
            skinny_gemm(residual, gate_up_weight, act, NORM, eps=eps, swiglu=True)
        else:  # unfolded: normalise first
            skinny_gemm(rmsnorm(residual, norm_weight, eps), gate_up_weight, act, swiglu=True)
        return skinny_gemm(act, down_weight, residual, PLAIN, add_residual=True)
    if not _defers_norm(residual, norm_weight, None):
        gate_up = norm_linear(residual, norm_weight, eps, gate_up_weight)
        return gated_linear_residual(gate_up, down_weight, residual)
    gate_up = cublaslt.mm(residual, gate_up_weight)  # unnormalised: the 1 / rms comes next
    return cublaslt.mm(silu_and_mul(gate_up, norm_input=residual, eps=eps), down_weight, residual,
                       accumulate=True)


def output_mlp_residual(attn: torch.Tensor, o_weight: torch.Tensor, residual: torch.Tensor,
                        norm_weight: torch.Tensor | None, eps: float,
                        gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """The rest of a layer after attention, in place: ``linear_residual(attn, o_weight,
    residual)``, then ``mlp_residual(residual, norm_weight, eps, gate_up_weight,
    down_weight)``. Returns residual.

    attn: [M, H_q * D]; o_weight: [H, H_q * D] contiguous; the rest as ``mlp_residual``'s.

    ``GEMM_MIN_ROWS`` to ``GEMM_MAX_ROWS`` rows with a folded norm: three ``kernels.gemm``
    launches. Each program of the output product also stores, per row, the sum of squares of
    the residual features it wrote ([programs, M] fp32); the gate/up product sums those
    partials for its 1 / rms (PARTIAL_NORM) instead of squaring the x tiles it streams. Other
    rows and unfolded norms: the two ops one after the other.
    """
    M = residual.shape[0] if residual.dim() == 2 else -1
    if not (PARTIAL_NORM_AFTER_OUTPUT and _takes_skinny_gemm(M) and norm_weight is None):
        linear_residual(attn, o_weight, residual)
        return mlp_residual(residual, norm_weight, eps, gate_up_weight, down_weight)
    _check(attn, o_weight, attn.shape[-1] if attn.dim() == 2 else -1, "output_mlp_residual")
    _check_residual(residual, attn.shape[0], o_weight)
    _check_mlp("output_mlp_residual", residual, gate_up_weight, down_weight)
    hidden = residual.shape[1]
    # The partials' rows: one per output-product program (its tile does not depend on PDL).
    programs = gemm_programs(gemm_config(M, hidden, o_weight.shape[1], o_weight.dtype), hidden)
    sumsq = torch.empty(programs, M, dtype=torch.float32, device=residual.device)
    skinny_gemm(attn, o_weight, residual, PLAIN, add_residual=True, row_sumsq=sumsq)
    act = residual.new_empty(M, down_weight.shape[1])
    skinny_gemm(residual, gate_up_weight, act, PARTIAL_NORM, eps=eps, swiglu=True,
                row_sumsq=sumsq)
    return skinny_gemm(act, down_weight, residual, PLAIN, add_residual=True)


def _check_mlp(op: str, residual: torch.Tensor, gate_up_weight: torch.Tensor,
               down_weight: torch.Tensor) -> None:
    _check(residual, gate_up_weight, residual.shape[-1] if residual.dim() == 2 else -1, op)
    if gate_up_weight.shape[0] % 2 or down_weight.shape != (residual.shape[1],
                                                            gate_up_weight.shape[0] // 2):
        raise ValueError(f"{op}: gate_up_weight {tuple(gate_up_weight.shape)} and "
                         f"down_weight {tuple(down_weight.shape)} do not fit a hidden size of "
                         f"{residual.shape[1]} (expected [2 I, H] and [H, I])")
    _check(residual, down_weight, down_weight.shape[1], op)  # dtype, contiguity


def _takes_skinny_gemm(m: int) -> bool:
    """Whether m rows run ``kernels.gemm`` (else the GEMV kernel or cuBLAS)."""
    return GEMM_MIN_ROWS <= m <= GEMM_MAX_ROWS and (SMALL_ROWS_GEMM or m > SWAP_AB_ROWS)


def _defers_norm(x: torch.Tensor, norm_weight: torch.Tensor | None,
                 bias: torch.Tensor | None) -> bool:
    """Whether a normalised projection of x runs as cuBLAS on the raw rows with the 1 / rms
    applied by the next kernel (see the module docstring)."""
    return (x.dim() == 2 and x.shape[0] > GEMV_MAX_ROWS and norm_weight is None and bias is None
            and x.dtype != torch.float16)


def _gemv_pdl(device: torch.device) -> bool:
    """Whether the GEMV kernels launch as programmatic dependent launches on ``device``."""
    return GEMV_PDL and has_pdl(device)


def _gemv(x, weight, out, prologue: int, bias=None, norm_weight=None, eps: float = 0.0,
          residual=None, config: GemvConfig | None = None) -> torch.Tensor:
    M, (N, K) = x.shape[0], weight.shape
    if M == 0:
        return out
    config = config or gemv_config(N, K, weight.dtype, _gemv_pdl(x.device))
    # Rows vary fastest, so the programs that share a weight slice run together and all but
    # the first read it from L2.
    grid = (M, triton.cdiv(N, config.block_n))
    # Unused pointer arguments get x (never read: their constexpr switches are off).
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else x,
        norm_weight if norm_weight is not None else x,
        residual if residual is not None else x, out,
        N, K, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), eps,
        launch_pdl=config.pdl, **gemv_launch_meta(config, N, K, prologue, bias is not None, residual is not None,
                           norm_weight is not None))
    return out


@triton.jit
def _wait_for_previous_grid(w_ptr, offs_n, n_live, K, PDL: tl.constexpr,
                            PREFETCH_K: tl.constexpr):
    """As a programmatic dependent launch (PDL): let the next kernel launch, ask the L2 for the
    first PREFETCH_K columns of the weight rows ``offs_n`` (weights never depend on the
    previous kernel), then wait for the previous grid's writes. Nothing without PDL.

    W: [N, K] contiguous, 16-bit when PREFETCH_K > 0 (a multiple of 64)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH_K > 0:
            rows = w_ptr + tl.where(n_live, offs_n, 0).to(tl.int64)[:, None] * K
            prefetch_columns_to_l2(rows, 0, K, PREFETCH_K)
        tl.extra.cuda.gdc_wait()


@triton.jit
def _row_times_weight(x_row, w_ptr, norm_w_ptr, offs_n, n_live, K, eps,
                      PROLOGUE: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """sum_k A[k] * W[n, k] for the BLOCK_N features ``offs_n``: fp32 [BLOCK_N].

    W: [N, K] contiguous. A is the activation row at x_row after the prologue: PLAIN: x [K];
    NORM: x * norm_w [K] / rms(x) (no norm_w without HAS_NORM_WEIGHT); GATED: silu(x[:K]) *
    x[K:] with x [2K]. The product accumulates elementwise into a [BLOCK_N, BLOCK_K] fp32 tile,
    reduced over K once after the loop (no cross-thread reduction inside it).
    """
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    dtype = w_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_live = k < K
        # Masks only where a tile can overhang (the weight stream stays vectorised).
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + k[None, :])
        elif EVEN_N:
            w = tl.load(w_rows + k[None, :], mask=k_live[None, :], other=0.0)
        elif EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_live[:, None], other=0.0)
        else:
            w = tl.load(w_rows + k[None, :], mask=n_live[:, None] & k_live[None, :], other=0.0)
        if PROLOGUE == 2:  # GATED
            gate = tl.load(x_row + k, mask=k_live, other=0.0).to(tl.float32)
            up = tl.load(x_row + K + k, mask=k_live, other=0.0).to(tl.float32)
            a = gate / (1.0 + tl.exp(-gate)) * up
        elif PROLOGUE == 1:  # NORM
            xf = tl.load(x_row + k, mask=k_live, other=0.0).to(tl.float32)
            sum_sq += xf * xf
            a = xf
            if HAS_NORM_WEIGHT:
                a *= tl.load(norm_w_ptr + k, mask=k_live, other=0.0).to(tl.float32)
        else:
            a = tl.load(x_row + k, mask=k_live, other=0.0).to(tl.float32)
        # The activation is rounded to the weight dtype, as the unfused ops round their outputs.
        a = a.to(dtype).to(tl.float32)
        acc += w.to(tl.float32) * a[None, :]

    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y * tl.math.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)
    return y


@triton.jit
def _gemv_kernel(
        x_ptr, w_ptr, bias_ptr, norm_w_ptr, residual_ptr, out_ptr,
        N, K, stride_xm, stride_rm, stride_om, eps,
        PROLOGUE: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        ADD_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr):
    """out[m, n] = residual[m, n] + bias[n] + sum_k A[m, k] * W[n, k] for one row m and one
    BLOCK_N slice of n; the grid is (M, cdiv(N, BLOCK_N)).

    x: [M, K] ([M, 2K] for GATED), rows ``stride_xm`` apart; W: [N, K] contiguous; A as in
    ``_row_times_weight``. bias [N], residual [M, N] and out [M, N] (out may alias residual:
    each element is read and written by the same program). fp32 accumulation.
    PDL: a programmatic dependent launch (``_wait_for_previous_grid``).
    """
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    _wait_for_previous_grid(w_ptr, offs_n, n_live, K, PDL, PREFETCH_K)
    y = _row_times_weight(x_ptr + m.to(tl.int64) * stride_xm, w_ptr, norm_w_ptr, offs_n, n_live,
                          K, eps, PROLOGUE, HAS_NORM_WEIGHT, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_live, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        y += tl.load(residual_ptr + m.to(tl.int64) * stride_rm + offs_n, mask=n_live,
                     other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty),
             mask=n_live)


@triton.jit
def _qkv_rope_kernel(
        x_ptr, w_ptr, bias_ptr, norm_w_ptr, q_ptr, k_cache_ptr, v_cache_ptr, positions_ptr,
        cos_ptr, sin_ptr, K, eps, stride_cache_slot, stride_cache_head, num_q_heads,
        num_kv_heads, HAS_NORM_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
        PREFETCH_K: tl.constexpr):
    """One token's QKV projection with RMSNorm, RoPE and the K/V write: q, k, v =
    RMSNorm(x) (* norm_w) @ W.T (+ bias); q and k rotated (rotate-half) at positions[0]; q to q_ptr,
    k and v into row 0 of the slab at slot positions[0] (nothing written to the slab when
    it is -1, a dead row, and q is left unrotated).

    x: [1, K]; W: [(H_q + 2 H_kv) * 2 HALF, K] contiguous (q heads, k heads, v heads);
    q: [H_q, 2 HALF] contiguous; caches: [B, C, H_kv, 2 HALF] with the given slot and head
    strides (k and v alike); cos, sin: fp32 [max_positions, HALF].
    Each program takes BLOCK_N / 2 rotation pairs (features i and i + HALF of one head;
    HALF % (BLOCK_N / 2) == 0), so both halves of a pair are in its registers.
    PDL: a programmatic dependent launch (``_wait_for_previous_grid``).
    """
    PAIRS: tl.constexpr = BLOCK_N // 2
    first = tl.program_id(0) * PAIRS  # first pair index over all heads
    head = first // HALF
    i = first % HALF + tl.arange(0, PAIRS)
    lane = tl.arange(0, BLOCK_N)
    offs_n = head * 2 * HALF + first % HALF + lane % PAIRS + (lane // PAIRS) * HALF
    _wait_for_previous_grid(w_ptr, offs_n, offs_n >= 0, K, PDL, PREFETCH_K)
    y = _row_times_weight(x_ptr, w_ptr, norm_w_ptr, offs_n, offs_n >= 0, K, eps, 1,
                          HAS_NORM_WEIGHT, BLOCK_N, BLOCK_K, True, EVEN_K)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n).to(tl.float32)
    # Round as the unfused projection does before RoPE reads it.
    dtype = w_ptr.dtype.element_ty
    y = y.to(dtype).to(tl.float32)
    lo, hi = tl.split(tl.permute(tl.reshape(y, [2, PAIRS]), [1, 0]))

    pos = tl.load(positions_ptr)
    live = pos >= 0
    table = tl.maximum(pos, 0).to(tl.int64) * HALF + i
    cos = tl.load(cos_ptr + table)
    sin = tl.load(sin_ptr + table)
    rot_lo = lo * cos - hi * sin
    rot_hi = hi * cos + lo * sin
    if head < num_q_heads:
        q_row = q_ptr + head * 2 * HALF + i
        tl.store(q_row, tl.where(live, rot_lo, lo).to(dtype))
        tl.store(q_row + HALF, tl.where(live, rot_hi, hi).to(dtype))
    else:
        slot = pos.to(tl.int64) * stride_cache_slot
        if head < num_q_heads + num_kv_heads:
            k_row = k_cache_ptr + slot + (head - num_q_heads) * stride_cache_head + i
            # Round to the model dtype before the cache's, as rope_kv_write does.
            tl.store(k_row, rot_lo.to(dtype).to(k_cache_ptr.dtype.element_ty), mask=live & (i >= 0))
            tl.store(k_row + HALF, rot_hi.to(dtype).to(k_cache_ptr.dtype.element_ty),
                     mask=live & (i >= 0))
        else:
            v_row = v_cache_ptr + slot + (head - num_q_heads - num_kv_heads) * stride_cache_head + i
            tl.store(v_row, lo.to(v_cache_ptr.dtype.element_ty), mask=live & (i >= 0))
            tl.store(v_row + HALF, hi.to(v_cache_ptr.dtype.element_ty), mask=live & (i >= 0))


def _check(x: torch.Tensor, weight: torch.Tensor, k: int, name: str) -> tuple[int, int]:
    """Validates x and weight; returns (M, K)."""
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{name}: x {tuple(x.shape)} does not match weight "
                         f"{tuple(weight.shape)} (expected x [M, K]"
                         f"{' = [M, 2K]' if name.startswith('gated') else ''}, weight [N, K])")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"{name}: x and weight must share one of fp16/bf16/fp32, got "
                         f"{x.dtype} and {weight.dtype}")
    if x.stride(-1) != 1 or not weight.is_contiguous() or x.device != weight.device:
        raise ValueError(f"{name}: x needs a contiguous last dim and weight must be contiguous "
                         f"on x's device (strides {x.stride()} / {weight.stride()})")
    return x.shape[0], weight.shape[1]


def _check_vector(name: str, v: torch.Tensor, size: int, device: torch.device) -> None:
    if (v.shape != (size,) or not v.is_floating_point() or not v.is_contiguous()
            or v.device != device):
        raise ValueError(f"{name} must be a contiguous float [{size}] tensor on {device}, got "
                         f"{v.dtype} {tuple(v.shape)} on {v.device}")


def _check_residual(residual: torch.Tensor, m: int, weight: torch.Tensor) -> None:
    if (residual.shape != (m, weight.shape[0]) or residual.dtype != weight.dtype
            or residual.stride(-1) != 1 or residual.device != weight.device):
        raise ValueError(f"residual must be [{m}, {weight.shape[0]}] {weight.dtype} with a "
                         f"contiguous last dim on {weight.device}, got {residual.dtype} "
                         f"{tuple(residual.shape)} strides {residual.stride()}")
