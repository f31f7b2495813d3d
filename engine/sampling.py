"""Token sampling for a batch of rows: greedy, temperature, top-k and top-p, with per-request seeds.

Randomness is counter based. Row b draws one uniform ``u = hash(seeds[b], positions[b])`` from an
integer hash, so a request's tokens depend only on its own seed, the position of the token being
sampled and its logits: never on the batch it lands in, its row, or the other rows. ``positions``
is the index the sampled token will have in the sequence (prompt length for the first token), so
a request that is evicted and recomputed after an overflow continues the same random stream.

The token is then drawn by inverting the CDF of the filtered distribution in vocabulary order:
the first index whose cumulative weight exceeds ``u * total``. One uniform per row keeps the
randomness O(B) instead of hashing all B * V logits (as Gumbel-max would): with a 150k
vocabulary, some twenty int64 passes over a [B, V] tensor per step would cost more than the
rest of the sampler. Top-k and top-p only move a per-row threshold on the scaled logits (ties at the
threshold are kept); the sort that finds it never changes the order the CDF is summed in, so
the same row samples the same token whichever filtering path its batch takes.

"Same token" assumes the same logits row. The model's own logits already differ in their last
bits between batch sizes on a GPU; the sampler adds one smaller effect of the same kind:
torch's CUDA cumsum runs a different scan for a one-row tensor, so B = 1 and B > 1 can round
the CDF differently (rows of any B > 1 agree exactly, in any order; on the CPU every B does).
Probabilities are resolved to about 2**-23 (the uniform's grid and the fp32 CDF's spacing):
tokens far less likely than that are drawn inexactly or not at all.

Everything runs on the device with static shapes and no host reads, so ``sample`` can be
recorded in a CUDA graph. The keyword flags are host-side promises about the whole batch
(``filter_kwargs`` computes them) that skip work the batch does not need.

Requests without a seed get one from ``engine.seeds.draw_seed`` when the engine admits them; the sampler
itself always needs a seed per row.

Penalties (``Penalties``) change the logits the token is picked from, before temperature and
filtering: vLLM's order, repetition over the prompt's and the output's tokens, then frequency
and presence over the output's.

Reported logprobs are those of the *unmodified* distribution, ``log_softmax(logits)`` at
temperature 1 before penalties and top-k/top-p, at the chosen token: what vLLM returns by
default, and a value that stays meaningful for greedy rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import GREEDY_TEMPERATURE

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one stays below 2**63 and int64 never
# overflows; taken from the 2-round 32-bit hash with shifts 16/15/15 listed in Chris Wellons'
# hash-prospector results (low avalanche bias).
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_GOLDEN = 0x9E3779B9  # keeps seed 0 away from the hash's fixed point at 0
_UNIFORM_BITS = 23


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mix. x: int64 holding values in [0, 2**32); returns the same."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def row_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform per row as a pure function of (seed, position).

    seeds: int64 [B], any int64. positions: int64 [B]. Returns fp32 [B] in [0, 1 - 2**-23].
    23 bits keep ``u * total`` strictly below ``total`` after fp32 rounding, so the CDF search
    always lands inside the vocabulary.
    """
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32  # arithmetic shift, then mask: the top 32 bits of the two's complement
    key = _hash32(_hash32(lo ^ _GOLDEN) ^ hi)
    h = _hash32(key ^ (positions & _MASK32))
    return (h >> (32 - _UNIFORM_BITS)).to(torch.float32) * (2.0 ** -_UNIFORM_BITS)


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax of every row (ties: lowest index) and its logprob.

    logits: fp32 [B, V]. Returns tokens int64 [B], logprobs fp32 [B].
    """
    tokens = logits.argmax(dim=-1)
    return tokens, _logprobs(logits, tokens)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)


@dataclass
class Penalties:
    """Each row's penalties and the token history they act on (one device state per batch).

    output_counts: int32 [B, V], how often each token occurs in the row's generated tokens;
    prompt_seen: bool [B, V], the tokens of its prompt; presence, frequency, repetition: fp32
    [B] (0, 0, 1 leave a row's logits exactly as they are).
    """

    output_counts: torch.Tensor
    prompt_seen: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Penalised logits, fp32 [B, V]: where a token was seen (prompt or output), a positive
    logit is divided by the repetition penalty and a negative one multiplied by it; then every
    output occurrence subtracts the frequency penalty, and any output occurrence the presence
    penalty once."""
    counts = p.output_counts.float()
    in_output = p.output_counts > 0
    repetition = p.repetition[:, None]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(p.prompt_seen | in_output, repeated, logits)
    return logits - p.frequency[:, None] * counts - p.presence[:, None] * in_output


def _thresholds_from_sorted(sorted_desc: torch.Tensor, top_k: torch.Tensor,
                            top_p: torch.Tensor) -> torch.Tensor:
    """Per-row lowest scaled logit that survives top-k then top-p (top-p renormalised over the
    top-k survivors, as Hugging Face and vLLM order them). sorted_desc: fp32 [B, V] scaled
    logits in descending order; top_k int32 [B] (<= 0 off); top_p fp32 [B]. Returns fp32 [B]."""
    V = sorted_desc.shape[-1]
    k_on = (top_k > 0) & (top_k < V)
    k_eff = torch.where(k_on, top_k.long(), V)
    thr_k = sorted_desc.gather(1, (k_eff - 1)[:, None]).squeeze(1)
    thr_k = torch.where(k_on, thr_k, float("-inf"))

    ranks = torch.arange(V, device=sorted_desc.device)
    in_top_k = ranks[None, :] < k_eff[:, None]
    probs = torch.softmax(torch.where(in_top_k, sorted_desc, float("-inf")), dim=-1)
    # Mass strictly before each token: a token is kept while the tokens above it have not yet
    # reached top_p, so the first token is always kept.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    n_keep = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)
    thr_p = sorted_desc.gather(1, (n_keep - 1)[:, None]).squeeze(1)
    thr_p = torch.where(top_p < 1.0, thr_p, float("-inf"))
    return torch.maximum(thr_k, thr_p)


def _thresholds_from_topk(scaled: torch.Tensor, top_k: torch.Tensor, bound: int) -> torch.Tensor:
    """Like ``_thresholds_from_sorted`` for top-k only, when every row's k is <= ``bound``."""
    V = scaled.shape[-1]
    largest = torch.topk(scaled, min(bound, V), dim=-1).values
    k_on = (top_k > 0) & (top_k < V)
    index = (top_k.long().clamp(1, largest.shape[-1]) - 1)[:, None]
    return torch.where(k_on, largest.gather(1, index).squeeze(1), float("-inf"))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, *,
           all_greedy: bool = False, top_k_bound: int | None = None,
           use_top_p: bool = True,
           penalties: Penalties | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    Args:
        logits: fp32 [B, V].
        temperature: fp32 [B]; rows below ``GREEDY_TEMPERATURE`` (0) take the exact argmax.
        top_k: int32 [B]; <= 0 or >= V turns it off for the row.
        top_p: fp32 [B] in (0, 1]; 1 turns it off.
        seeds: int64 [B]; positions: int64 [B], the index the sampled token gets in its sequence.
        all_greedy: host promise that every row is greedy: one argmax, nothing else.
        top_k_bound: host promise about top-k: None = unknown, 0 = no sampled row uses top-k,
            K > 0 = every sampled row's k is <= K (then ``torch.topk(K)`` replaces a full sort
            when no row uses top-p).
        use_top_p: host promise; False = no sampled row has top_p < 1.
        A broken promise silently drops the filter it promised away; ``filter_kwargs`` derives
        the promises from the rows' settings.
        penalties: applied to the logits first (greedy rows pick the penalised argmax).

    Returns:
        tokens int64 [B] and logprobs fp32 [B] (``log_softmax(logits)`` at the token).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("seeds", seeds), ("positions", positions)):
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape [{B}], got {tuple(t.shape)}")
    logits = logits.float()
    scores = logits if penalties is None else apply_penalties(logits, penalties)
    greedy_tokens = scores.argmax(dim=-1)
    if all_greedy:
        return greedy_tokens, _logprobs(logits, greedy_tokens)

    is_greedy = temperature < GREEDY_TEMPERATURE
    scaled = scores / torch.where(is_greedy, 1.0, temperature)[:, None]
    threshold = None
    if use_top_p or top_k_bound is None:
        sorted_desc = torch.sort(scaled, dim=-1, descending=True).values
        threshold = _thresholds_from_sorted(sorted_desc, top_k, top_p)
    elif top_k_bound > 0:
        threshold = _thresholds_from_topk(scaled, top_k, top_k_bound)
    if threshold is not None:
        scaled = torch.where(scaled >= threshold[:, None], scaled, float("-inf"))

    probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = row_uniforms(seeds, positions) * cdf[:, -1]
    drawn = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    drawn = drawn.clamp(max=logits.shape[-1] - 1)
    # Only reachable if fp32 rounding made the CDF non-monotone: never return a filtered token.
    drawn = torch.where(probs.gather(1, drawn[:, None]).squeeze(1) > 0, drawn, greedy_tokens)

    tokens = torch.where(is_greedy, greedy_tokens, drawn)
    return tokens, _logprobs(logits, tokens)


def filter_kwargs(temperature: Sequence[float], top_k: Sequence[int],
                  top_p: Sequence[float]) -> dict[str, int | bool]:
    """Host side: the ``all_greedy`` / ``top_k_bound`` / ``use_top_p`` arguments of ``sample``
    that are safe for rows with these settings. The top-k bound is rounded up to a power of two
    so that few distinct values (and CUDA graphs) arise."""
    sampled = [i for i, t in enumerate(temperature) if t >= GREEDY_TEMPERATURE]
    ks = [top_k[i] for i in sampled if top_k[i] > 0]
    bound = 0
    if ks:
        bound = 1
        while bound < max(ks):
            bound *= 2
    return {"all_greedy": not sampled, "top_k_bound": bound,
            "use_top_p": any(top_p[i] < 1.0 for i in sampled)}
