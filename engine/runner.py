"""BatchRunner: prefill and decode steps of one bin-shaped batch on a slab of the KV arena.

A batch owns a slab ``[B, C]`` (a view at the arena's start). Per-row state lives on the device
in static buffers — the last sampled token, the slot it goes to (-1 = dead row) and the row's
sampling settings — so a decode step needs no input from the host: it feeds each row's last
token, samples the next one, and advances the positions itself. That is what lets the engine
keep one step in flight and replay each step as a CUDA graph.

Every launch returns a ``PendingTokens``: the sampled tokens on their way to the host. The
caller reads them after it has launched the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.blas import decode_blas
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import KVArena, KVSlab
from engine.request import has_penalties
from engine.sampling import Penalties, filter_kwargs, sample

# How a step picks tokens: argmax alone, argmax plus its logprob, or the sampler. A kind is
# a tuple, part of the CUDA graph's key: ("sample", top_k_bound, use_top_p, penalized,
# all_greedy) carries the sampler's promises about the live rows, which let it skip the
# full-vocabulary sort (or, all greedy, everything but the argmax), and whether any of them has
# penalties (greedy rows with penalties take the sampler too).
GREEDY, GREEDY_LOGPROBS, SAMPLE = ("greedy",), ("greedy+logprobs",), "sample"


@dataclass
class RowSampling:
    """One row's sampling settings (``temperature == 0`` means greedy)."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    logprobs: bool
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def penalized(self) -> bool:
        return has_penalties(self.presence_penalty, self.frequency_penalty,
                             self.repetition_penalty)

    @property
    def penalty_weights(self) -> list[float]:
        """[presence, frequency, repetition], a column of ``_StepBuffers.penalty_weights``."""
        return [self.presence_penalty, self.frequency_penalty, self.repetition_penalty]


def capacity_bucket(needed: int, min_capacity: int, max_model_len: int) -> int:
    """Slab capacity C for ``needed`` token slots: the next power of two times ``min_capacity``,
    capped at ``max_model_len``. Few distinct C values means few CUDA graphs."""
    if needed > max_model_len:
        raise ValueError(f"a batch needs {needed} token slots per row, more than max_model_len "
                         f"{max_model_len}")
    capacity = min_capacity
    while capacity < needed:
        capacity *= 2
    return min(capacity, max_model_len)


class PendingTokens:
    """Tokens (and logprobs) of one launch, copied to the host without blocking the launcher.

    tokens: int64 [N] and logprobs: fp32 [N] or None, on the device; ``rows[i]`` is the slab
    row of entry i. On CUDA the copy goes to pinned memory behind an event; ``result()``
    waits for that event only.
    """

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, rows: list[int]):
        self.rows = rows
        self._event = None
        if tokens.is_cuda:
            self._tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._tokens.copy_(tokens, non_blocking=True)
            self._logprobs = None
            if logprobs is not None:
                self._logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
                self._logprobs.copy_(logprobs, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._tokens = tokens.clone()
            self._logprobs = None if logprobs is None else logprobs.clone()

    def result(self) -> tuple[list[int], list[float] | None]:
        """(token ids, logprobs or None), one entry per row in ``rows``."""
        if self._event is not None:
            self._event.synchronize()
        logprobs = None if self._logprobs is None else self._logprobs.tolist()
        return self._tokens.tolist(), logprobs


class Stopwatch:
    """Elapsed time of device work between ``start()`` and ``stop()``, read later.

    On CUDA it records events, so timing never stalls the launching thread; ``seconds()``
    waits for the stop event (by then usually long done).
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._begin = self._end = None

    def start(self) -> None:
        if self._cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._end = time.perf_counter()

    def seconds(self) -> float:
        if self._cuda:
            self._end.synchronize()
            return self._begin.elapsed_time(self._end) / 1e3
        return self._end - self._begin


class _StepBuffers:
    """The decode step's static tensors for one batch size B; their addresses never change."""

    def __init__(self, batch_size: int, device: torch.device):
        B = batch_size
        self.tokens = torch.zeros(B, dtype=torch.int64, device=device)
        self.positions = torch.full((B,), -1, dtype=torch.int32, device=device)
        self.logprobs = torch.zeros(B, dtype=torch.float32, device=device)
        self.temperature = torch.zeros(B, dtype=torch.float32, device=device)
        self.top_k = torch.full((B,), -1, dtype=torch.int32, device=device)
        self.top_p = torch.ones(B, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(B, dtype=torch.int64, device=device)
        # Rows' presence, frequency and repetition penalties, fp32 [3, B].
        self.penalty_weights = torch.tensor([[0.0], [0.0], [1.0]], device=device).repeat(1, B)
        # Token history for penalties, [B, V]: allocated when a batch of this size first
        # prefills a penalised row (B x V int32 is 131 MB at B = 256 with a 128k vocabulary).
        self.output_counts: torch.Tensor | None = None
        self.prompt_seen: torch.Tensor | None = None

    def penalties(self, vocab_size: int) -> Penalties:
        """All rows' penalties and history; the history is allocated on first use, and a row's
        is only meaningful after a prefill that reset it (rows without penalties never read
        theirs: 0, 0 and 1 leave the logits as they are)."""
        if self.output_counts is None:
            B, device = self.tokens.shape[0], self.tokens.device
            self.output_counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
            self.prompt_seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        return Penalties(self.output_counts, self.prompt_seen, *self.penalty_weights)


class BatchRunner:
    """Runs one batch at a time: ``begin(B, C)``, then any mix of ``prefill`` (into free rows),
    ``retire`` (rows that must stop) and ``decode``, then ``end()``.

    Args:
        model: an ``engine.model.CausalLM``.
        arena: the KV arena every slab is cut from.
        enforce_eager: never capture CUDA graphs (always true off CUDA).
        max_prefill_tokens: prompts are prefilled in packs of at most this many tokens (a
            longer prompt goes alone), which bounds the prefill's activation memory.
    """

    def __init__(self, model, arena: KVArena, enforce_eager: bool = False,
                 max_prefill_tokens: int = 16384):
        self.model = model
        self.arena = arena
        self.device = model.device
        self.max_prefill_tokens = max_prefill_tokens
        self.graphs = None if enforce_eager or self.device.type != "cuda" else DecodeGraphs(self.device)
        self._buffers: dict[int, _StepBuffers] = {}
        self._slab: KVSlab | None = None
        self._rows: list[RowSampling | None] = []  # host mirror: None = dead row

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def capacity(self) -> int:
        return self._slab.capacity

    def live_rows(self) -> list[int]:
        return [row for row, s in enumerate(self._rows) if s is not None]

    def begin(self, batch_size: int, capacity: int) -> None:
        """Take the ``[batch_size, capacity]`` slab; every row starts dead."""
        self._slab = self.arena.slab(batch_size, capacity)
        if batch_size not in self._buffers:
            self._buffers[batch_size] = _StepBuffers(batch_size, self.device)
        buf = self._buffers[batch_size]
        buf.positions.fill_(-1)
        self._rows = [None] * batch_size

    def end(self) -> None:
        self._slab = None
        self._rows = []

    def retire(self, rows: list[int]) -> None:
        """Mark rows dead from the next decode step on (position -1: no KV read or write)."""
        if not rows:
            return
        buf = self._buffers[self.batch_size]
        buf.positions.index_fill_(0, self._to_device(rows, torch.int64), -1)
        for row in rows:
            self._rows[row] = None

    @torch.no_grad()
    def prefill(self, rows: list[int], prompts: list[list[int]],
                sampling: list[RowSampling], generated: list[int] | None = None) -> PendingTokens:
        """Prefill ``prompts[i]`` into slab row ``rows[i]`` and sample each one's first token.

        The rows' previous contents are overwritten (rows still live in an earlier, unread
        step are safe: the device runs launches in order). Each first token goes to slot
        ``len(prompt)``, which is also its RNG position. ``generated[i]``: how many of
        ``prompts[i]``'s last tokens the request generated itself (a request re-queued after
        an overflow); penalties count them as output, not prompt. Returns the first tokens.
        """
        generated = [0] * len(rows) if generated is None else generated
        C = self.capacity
        for row, prompt in zip(rows, prompts):
            if not 0 < len(prompt) <= C:
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit slab row {row} "
                                 f"of capacity {C}")
            if self._rows[row] is not None:
                raise ValueError(f"slab row {row} is still live")
        buf = self._buffers[self.batch_size]
        tokens_out, logprobs_out = [], []
        for lo, hi in self._packs([len(p) for p in prompts]):
            pack_rows, pack_prompts = rows[lo:hi], prompts[lo:hi]
            lens = [len(p) for p in pack_prompts]
            input_ids = self._to_device([t for p in pack_prompts for t in p], torch.int64)
            positions = self._to_device([i for n in lens for i in range(n)], torch.int32)
            token_rows = self._to_device([r for r, n in zip(pack_rows, lens) for _ in range(n)],
                                         torch.int32)
            cu_seqlens = self._to_device([0] + _cumsum(lens), torch.int32)
            logits = self.model.prefill(input_ids, positions, token_rows, cu_seqlens, max(lens),
                                        self._slab)
            params = sampling[lo:hi]
            temperature, top_k, top_p, seeds = self._sampling_tensors(params)
            first_slots = self._to_device(lens, torch.int32)
            kind = _kind(params)
            index = self._to_device(pack_rows, torch.int64)
            # Every row sets its penalties (0, 0, 1 without): a later step may run penalised
            # for another row, and must not apply an earlier request's to this one.
            weights = self._to_device([p.penalty_weights for p in params], torch.float32)
            buf.penalty_weights.index_copy_(1, index, weights.T)
            penalties = None
            if kind[0] == SAMPLE and kind[3]:
                penalties = self._start_history(buf, pack_rows, index, pack_prompts,
                                                generated[lo:hi], logits.shape[-1])
            tokens, logprobs = self._pick(logits, kind, temperature, top_k, top_p, seeds,
                                          first_slots.long(), penalties)
            if penalties is not None:
                buf.output_counts.index_put_((index, tokens), self._ones(len(lens)),
                                             accumulate=True)
            buf.tokens.index_copy_(0, index, tokens)
            buf.positions.index_copy_(0, index, first_slots)
            buf.temperature.index_copy_(0, index, temperature)
            buf.top_k.index_copy_(0, index, top_k)
            buf.top_p.index_copy_(0, index, top_p)
            buf.seeds.index_copy_(0, index, seeds)
            tokens_out.append(tokens)
            logprobs_out.append(logprobs if logprobs is not None
                                else torch.zeros(len(lens), device=self.device))
        for row, params in zip(rows, sampling):
            self._rows[row] = params
        want_logprobs = any(s.logprobs for s in sampling)
        return PendingTokens(torch.cat(tokens_out),
                             torch.cat(logprobs_out) if want_logprobs else None, list(rows))

    @torch.no_grad()
    def decode(self) -> PendingTokens:
        """Launch one decode step for every live row; returns its tokens for all B rows."""
        B, C = self.batch_size, self.capacity
        live = [s for s in self._rows if s is not None]
        if not live:
            raise RuntimeError("decode step with no live row")
        kind = _kind(live)
        buf = self._buffers[B]
        if self.graphs is None:
            self._step(buf, self._slab, kind)
        else:
            key = (B, C, kind)
            if key not in self.graphs:
                self._capture(key, buf, kind)
            self.graphs.replay(key)
        return PendingTokens(buf.tokens, None if kind == GREEDY else buf.logprobs, list(range(B)))

    def _step(self, buf: _StepBuffers, slab: KVSlab, kind: tuple) -> None:
        """One decode step, all on the device: feed, sample, advance live positions."""
        if kind == GREEDY:
            # The tokens go straight into the next step's input (read at the step's start),
            # and the head may skip the logits altogether (ops.lm_head_argmax).
            with decode_blas(buf.tokens.device):
                self.model.decode_greedy(buf.tokens, buf.positions, slab, out=buf.tokens)
        else:
            with decode_blas(buf.tokens.device):
                logits = self.model.decode(buf.tokens, buf.positions, slab)
            # The sampled token goes to the next slot, which is also its RNG position.
            rng_positions = buf.positions.long() + 1 if kind[0] == SAMPLE else None
            penalties = buf.penalties(logits.shape[-1]) if kind[0] == SAMPLE and kind[3] else None
            tokens, logprobs = self._pick(logits, kind, buf.temperature, buf.top_k, buf.top_p,
                                          buf.seeds, rng_positions, penalties)
            if penalties is not None:
                # Every row counts its token; dead rows' history is reset before reuse.
                penalties.output_counts.scatter_add_(
                    1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
            buf.tokens.copy_(tokens)
            if logprobs is not None:
                buf.logprobs.copy_(logprobs)
        self.model.ops.advance_positions(buf.positions)  # dead rows stay -1

    def _capture(self, key, buf: _StepBuffers, kind: tuple) -> None:
        # Warm-up runs execute for real: run them with every row dead (no KV traffic) and put
        # the live batch's state back afterwards.
        saved_tokens, saved_positions = buf.tokens.clone(), buf.positions.clone()
        buf.positions.fill_(-1)
        slab = self._slab
        self.graphs.capture(key, lambda: self._step(buf, slab, kind))
        buf.tokens.copy_(saved_tokens)
        buf.positions.copy_(saved_positions)

    def _pick(self, logits: torch.Tensor, kind: tuple, temperature, top_k, top_p, seeds,
              rng_positions, penalties: Penalties | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if kind[0] == SAMPLE:
            return sample(logits, temperature, top_k, top_p, seeds, rng_positions,
                          top_k_bound=kind[1], use_top_p=kind[2], all_greedy=kind[4],
                          penalties=penalties)
        tokens = self.model.ops.argmax(logits)
        if kind == GREEDY:
            return tokens, None
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return tokens, logprobs

    def _start_history(self, buf: _StepBuffers, rows: list[int], index: torch.Tensor,
                       prompts: list[list[int]], generated: list[int],
                       vocab_size: int) -> Penalties:
        """Reset the token history of the pack's slab rows (``index``: ``rows`` on the device)
        to their prompts and generated tokens; returns the pack's rows of the penalties, for
        sampling their first tokens."""
        state = buf.penalties(vocab_size)
        state.output_counts.index_fill_(0, index, 0)
        state.prompt_seen.index_fill_(0, index, False)
        seen_rows, seen_ids, out_rows, out_ids = [], [], [], []
        for row, prompt, n_out in zip(rows, prompts, generated):
            cut = len(prompt) - n_out
            seen_rows += [row] * cut
            seen_ids += prompt[:cut]
            out_rows += [row] * n_out
            out_ids += prompt[cut:]
        if seen_ids:
            state.prompt_seen[self._to_device(seen_rows, torch.int64),
                              self._to_device(seen_ids, torch.int64)] = True
        if out_ids:
            state.output_counts.index_put_(
                (self._to_device(out_rows, torch.int64), self._to_device(out_ids, torch.int64)),
                self._ones(len(out_ids)), accumulate=True)
        return Penalties(state.output_counts[index], state.prompt_seen[index],
                         *buf.penalty_weights[:, index])

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.int32, device=self.device)

    def _sampling_tensors(self, params: list[RowSampling]):
        return (self._to_device([p.temperature for p in params], torch.float32),
                self._to_device([p.top_k for p in params], torch.int32),
                self._to_device([p.top_p for p in params], torch.float32),
                self._to_device([p.seed for p in params], torch.int64))

    def _packs(self, lens: list[int]) -> list[tuple[int, int]]:
        """[lo, hi) index ranges of consecutive prompts with at most max_prefill_tokens tokens."""
        packs, lo, total = [], 0, 0
        for i, n in enumerate(lens):
            if i > lo and total + n > self.max_prefill_tokens:
                packs.append((lo, i))
                lo, total = i, 0
            total += n
        packs.append((lo, len(lens)))
        return packs

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cuda":
            host = torch.tensor(values, dtype=dtype, pin_memory=True)
            return host.to(self.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)


def _kind(params: list[RowSampling]) -> tuple:
    penalized = any(p.penalized for p in params)
    if penalized or any(p.temperature > 0 for p in params):
        promises = filter_kwargs([p.temperature for p in params], [p.top_k for p in params],
                                 [p.top_p for p in params])
        return (SAMPLE, promises["top_k_bound"], promises["use_top_p"], penalized,
                promises["all_greedy"])
    return GREEDY_LOGPROBS if any(p.logprobs for p in params) else GREEDY


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
