import math
import random

import pytest
import torch

from engine.request import INT64_MAX, INT64_MIN
from engine.sampling import (Penalties, apply_penalties, filter_kwargs, greedy_sample,
                             row_uniforms, sample)
from engine.seeds import derive_seed, draw_seed


def _chi2_critical(df: int, z: float = 4.265) -> float:
    """Upper chi-square quantile by the Wilson-Hilferty approximation; z = 4.265 is the normal
    quantile for a one-sided 1e-5 tail, so a correct sampler fails about once in 100k runs."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _rows(B: int, V: int, gen: torch.Generator):
    """A batch with every kind of row: greedy, plain temperature, top-k, top-p, both."""
    logits = torch.randn(B, V, generator=gen) * 3.0
    kind = torch.arange(B) % 5
    temperature = torch.where(kind == 0, 0.0, 0.3 + 1.5 * torch.rand(B, generator=gen))
    top_k = torch.where((kind == 2) | (kind == 4), torch.randint(1, 40, (B,), generator=gen), -1)
    top_p = torch.where((kind == 3) | (kind == 4), 0.2 + 0.75 * torch.rand(B, generator=gen), 1.0)
    seeds = torch.randint(INT64_MIN, INT64_MAX, (B,), generator=gen, dtype=torch.int64)
    positions = torch.randint(0, 5000, (B,), generator=gen, dtype=torch.int64)
    return logits, temperature.float(), top_k.to(torch.int32), top_p.float(), seeds, positions


def _take(batch, index):
    return tuple(t[index] for t in batch)


def _nucleus(logits_row, temperature, top_k, top_p):
    """Set of token ids allowed by top-k then top-p (reference, one row, plain Python loop)."""
    scaled = logits_row / temperature
    order = torch.argsort(scaled, descending=True).tolist()
    if 0 < top_k < len(order):
        order = order[:top_k]
    probs = torch.softmax(scaled[order], dim=0).tolist()
    kept, mass = [], 0.0
    for token, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.append(token)
        mass += p
    return set(kept)


def test_all_greedy_rows_are_argmax_with_logprobs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=gen) * 4
    B = logits.shape[0]
    args = (torch.zeros(B), torch.full((B,), -1, dtype=torch.int32), torch.ones(B),
            torch.arange(B, dtype=torch.int64), torch.arange(B, dtype=torch.int64))
    expected_lp = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1)[:, None]).squeeze(1)
    for tokens, logprobs in (sample(logits, *args), sample(logits, *args, all_greedy=True),
                             greedy_sample(logits)):
        assert torch.equal(tokens, logits.argmax(-1))
        assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
        torch.testing.assert_close(logprobs, expected_lp)


def test_greedy_rows_in_a_mixed_batch_are_exact_argmax():
    gen = torch.Generator().manual_seed(1)
    batch = _rows(40, 500, gen)
    logits, temperature = batch[0], batch[1]
    # Near-ties make an approximate argmax show up.
    logits[:, 7] = logits.max(dim=1).values - 1e-6
    tokens, _ = sample(*batch)
    greedy = temperature == 0
    assert greedy.sum() >= 8
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])


def test_logprobs_are_log_softmax_of_unmodified_logits():
    gen = torch.Generator().manual_seed(2)
    batch = _rows(30, 257, gen)
    tokens, logprobs = sample(*batch)
    expected = torch.log_softmax(batch[0], -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)
    assert (logprobs < 0).all()


def _penalties(B: int, V: int, gen: torch.Generator) -> Penalties:
    counts = torch.randint(0, 4, (B, V), generator=gen, dtype=torch.int32)
    counts[torch.rand(B, V, generator=gen) < 0.7] = 0
    return Penalties(counts, torch.rand(B, V, generator=gen) < 0.2,
                     torch.rand(B, generator=gen) * 4 - 2, torch.rand(B, generator=gen) * 4 - 2,
                     0.5 + torch.rand(B, generator=gen) * 1.5)


def test_penalties_follow_their_definition_element_by_element():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 50, generator=gen) * 3
    logits[:, :3] = torch.tensor([0.0, 1e-3, -1e-3])
    p = _penalties(6, 50, gen)
    got = apply_penalties(logits, p)
    for b in range(6):
        for t in range(50):
            x, n = float(logits[b, t]), int(p.output_counts[b, t])
            rep = float(p.repetition[b])
            if n > 0 or bool(p.prompt_seen[b, t]):
                x = x / rep if x > 0 else x * rep
            x -= float(p.frequency[b]) * n + (float(p.presence[b]) if n > 0 else 0.0)
            assert math.isclose(float(got[b, t]), x, rel_tol=1e-6, abs_tol=1e-6), (b, t)


def test_neutral_penalties_change_nothing_and_logprobs_stay_unpenalised():
    gen = torch.Generator().manual_seed(12)
    batch = _rows(20, 300, gen)
    p = _penalties(20, 300, gen)
    neutral = Penalties(p.output_counts, p.prompt_seen, torch.zeros(20), torch.zeros(20),
                        torch.ones(20))
    assert torch.equal(apply_penalties(batch[0], neutral), batch[0])
    assert torch.equal(sample(*batch, penalties=neutral)[0], sample(*batch)[0])
    tokens, logprobs = sample(*batch, penalties=p)
    greedy = batch[1] == 0
    assert torch.equal(tokens[greedy], apply_penalties(batch[0], p).argmax(-1)[greedy])
    assert not torch.equal(tokens[greedy], batch[0].argmax(-1)[greedy])
    expected = torch.log_softmax(batch[0], -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


def test_token_depends_only_on_own_row_not_batch():
    gen = torch.Generator().manual_seed(3)
    batch = _rows(25, 400, gen)
    reference, _ = sample(*batch)
    # Every filtering path: the default (full sort) and the host promises filter_kwargs gives.
    kwargs = filter_kwargs(batch[1].tolist(), batch[2].tolist(), batch[3].tolist())
    assert kwargs == {"all_greedy": False, "top_k_bound": 64, "use_top_p": True}
    tokens, _ = sample(*batch, **kwargs)
    assert torch.equal(tokens, reference)

    perm = torch.randperm(25, generator=gen)
    tokens, _ = sample(*_take(batch, perm))
    assert torch.equal(tokens, reference[perm])

    for size in (1, 4, 11):
        index = torch.randperm(25, generator=gen)[:size]
        sub = _take(batch, index)
        tokens, _ = sample(*sub, **filter_kwargs(sub[1].tolist(), sub[2].tolist(), sub[3].tolist()))
        assert torch.equal(tokens, reference[index])

    others = _rows(30, 400, torch.Generator().manual_seed(99))
    merged = tuple(torch.cat([a, b]) for a, b in zip(others, batch))
    tokens, _ = sample(*merged)
    assert torch.equal(tokens[30:], reference)


def test_top_k_only_path_matches_sort_path():
    gen = torch.Generator().manual_seed(4)
    logits, temperature, top_k, _, seeds, positions = _rows(40, 300, gen)
    top_p = torch.ones(40)
    batch = (logits, temperature, top_k, top_p, seeds, positions)
    kwargs = filter_kwargs(temperature.tolist(), top_k.tolist(), top_p.tolist())
    assert kwargs["use_top_p"] is False and kwargs["top_k_bound"] > 0
    assert torch.equal(sample(*batch, **kwargs)[0], sample(*batch)[0])
    # Rows without any filter: the unfiltered path agrees with the sort path too.
    no_k = torch.full((40,), -1, dtype=torch.int32)
    plain = (logits, temperature, no_k, top_p, seeds, positions)
    assert torch.equal(sample(*plain, top_k_bound=0, use_top_p=False)[0], sample(*plain)[0])


def test_different_seeds_and_positions_give_different_tokens():
    V, N = 1000, 64
    logits = torch.zeros(N, V)  # uniform: 64 draws land on ~62 distinct tokens
    one = torch.ones(N)
    no_k = torch.full((N,), -1, dtype=torch.int32)
    seeds = torch.arange(N, dtype=torch.int64) * 7919 + 5
    fixed = torch.full((N,), 123, dtype=torch.int64)
    by_seed, _ = sample(logits, one, no_k, one, seeds, fixed)
    by_position, _ = sample(logits, one, no_k, one, fixed, torch.arange(N, dtype=torch.int64))
    assert len(set(by_seed.tolist())) > 50
    assert len(set(by_position.tolist())) > 50
    # Seeds that differ only in their high 32 bits are distinct streams too.
    high = torch.tensor([5, 5 + (1 << 32), 5 - (1 << 40), -5], dtype=torch.int64)
    u = row_uniforms(high, torch.zeros(4, dtype=torch.int64))
    assert len(set(u.tolist())) == 4


def test_row_uniforms_range_and_moments():
    seeds = torch.full((50_000,), -987654321, dtype=torch.int64)
    u = row_uniforms(seeds, torch.arange(50_000, dtype=torch.int64))
    assert u.dtype == torch.float32
    assert u.min() >= 0 and u.max() <= 1 - 2.0 ** -23
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert _chi2(counts, torch.full((20,), 0.05)) < _chi2_critical(19)
    lag1 = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(lag1) < 0.025  # ~5 sigma for 50k samples


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, -1, 1.0),
    (0.6, -1, 1.0),
    (1.7, 0, 1.0),
    (0.9, 5, 1.0),
    (1.0, -1, 0.7),
    (1.3, 6, 0.8),
])
def test_empirical_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    V, N = 12, 30_000
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(V, generator=gen) * 1.5
    kept = sorted(_nucleus(row, temperature, top_k, top_p))
    expected = torch.zeros(V)
    expected[kept] = torch.softmax(row[kept] / temperature, dim=0)

    # Over positions of one seed, and over seeds at one position.
    for seeds, positions in ((torch.full((N,), 42, dtype=torch.int64), torch.arange(N)),
                             (torch.arange(N, dtype=torch.int64) * 31 - 7000, torch.full((N,), 9))):
        tokens, _ = sample(row.expand(N, V), torch.full((N,), temperature),
                           torch.full((N,), top_k, dtype=torch.int32), torch.full((N,), top_p),
                           seeds, positions.long())
        counts = torch.bincount(tokens, minlength=V).float()
        assert counts[expected == 0].sum() == 0
        stat = _chi2(counts[kept], expected[kept])
        assert stat < _chi2_critical(max(len(kept) - 1, 1)), (stat, counts, expected * N)


def test_top_k_never_returns_a_token_outside_the_k_largest():
    gen = torch.Generator().manual_seed(6)
    B, V = 64, 200
    logits = torch.randn(B, V, generator=gen)
    top_k = torch.randint(1, 12, (B,), generator=gen, dtype=torch.int32)
    temperature = 0.5 + 3 * torch.rand(B, generator=gen)  # hot: the tail is tempting
    allowed = torch.topk(logits, 12, dim=-1).indices
    for step in range(20):
        positions = torch.full((B,), step, dtype=torch.int64)
        tokens, _ = sample(logits, temperature, top_k, torch.ones(B),
                           torch.arange(B, dtype=torch.int64), positions, top_k_bound=16,
                           use_top_p=False)
        rank = (allowed == tokens[:, None]).int().argmax(dim=1)
        assert (allowed == tokens[:, None]).any(dim=1).all()
        assert (rank < top_k).all()


def test_top_p_never_returns_a_token_outside_the_nucleus():
    gen = torch.Generator().manual_seed(7)
    B, V = 48, 150
    logits = torch.randn(B, V, generator=gen) * 2
    temperature = 0.5 + torch.rand(B, generator=gen)
    top_p = 0.05 + 0.9 * torch.rand(B, generator=gen)
    top_k = torch.where(torch.arange(B) % 2 == 0, 10, -1).to(torch.int32)
    nuclei = [_nucleus(logits[b], temperature[b].item(), top_k[b].item(), top_p[b].item())
              for b in range(B)]
    for step in range(20):
        tokens, _ = sample(logits, temperature, top_k, top_p,
                           torch.arange(B, dtype=torch.int64) + 1000 * step,
                           torch.full((B,), step, dtype=torch.int64))
        for b in range(B):
            assert tokens[b].item() in nuclei[b]


def test_tiny_top_p_and_top_k_one_keep_exactly_the_argmax():
    gen = torch.Generator().manual_seed(8)
    B, V = 32, 100
    logits = torch.randn(B, V, generator=gen)
    one = torch.ones(B)
    seeds, positions = torch.arange(B, dtype=torch.int64), torch.arange(B, dtype=torch.int64)
    tokens, _ = sample(logits, one * 2, torch.full((B,), -1, dtype=torch.int32),
                       torch.full((B,), 1e-6), seeds, positions)
    assert torch.equal(tokens, logits.argmax(-1))
    tokens, _ = sample(logits, one * 2, torch.ones(B, dtype=torch.int32), one, seeds, positions)
    assert torch.equal(tokens, logits.argmax(-1))


def test_masked_logits_are_never_sampled():
    gen = torch.Generator().manual_seed(9)
    B, V = 16, 64
    logits = torch.randn(B, V, generator=gen)
    logits[:, 40:] = float("-inf")  # e.g. padded vocabulary
    one = torch.ones(B)
    no_k = torch.full((B,), -1, dtype=torch.int32)
    for step in range(30):
        tokens, logprobs = sample(logits, one * 5, no_k, one, torch.arange(B, dtype=torch.int64),
                                  torch.full((B,), step, dtype=torch.int64), top_k_bound=0,
                                  use_top_p=False)
        assert (tokens < 40).all() and torch.isfinite(logprobs).all()


def test_bad_shapes_raise():
    logits = torch.randn(4, 10)
    ok = (torch.ones(4), torch.ones(4, dtype=torch.int32), torch.ones(4),
          torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, ok[0], ok[1], torch.ones(3), ok[3], ok[4])
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], *ok)


def test_filter_kwargs_ignores_greedy_rows_and_rounds_the_bound():
    assert filter_kwargs([0.0, 0.0], [5, 3], [0.5, 1.0]) == {
        "all_greedy": True, "top_k_bound": 0, "use_top_p": False}
    assert filter_kwargs([0.0, 1.0, 0.7], [50, 20, -1], [0.5, 1.0, 1.0]) == {
        "all_greedy": False, "top_k_bound": 32, "use_top_p": False}


def test_seed_helpers():
    assert draw_seed(random.Random(0)) == draw_seed(random.Random(0))
    for _ in range(100):
        assert 0 <= draw_seed() <= INT64_MAX
    children = [derive_seed(-12345, i) for i in range(1000)]
    assert children[0] == -12345
    assert len(set(children)) == 1000
    assert all(INT64_MIN <= s <= INT64_MAX for s in children)
    with pytest.raises(ValueError, match="seed"):
        derive_seed(2**64, 1)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    gen = torch.Generator().manual_seed(10)
    batch = [t.cuda() for t in _rows(64, 32_000, gen)]
    expected, expected_lp = sample(*batch)
    static = [t.clone() for t in batch]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(*static)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs = sample(*static)
    # New inputs through the static buffers: the replay must follow them.
    other = [t.cuda() for t in _rows(64, 32_000, torch.Generator().manual_seed(11))]
    for buf, new in zip(static, other):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    want, want_lp = sample(*other)
    assert torch.equal(tokens, want)
    torch.testing.assert_close(logprobs, want_lp)
    for buf, new in zip(static, batch):
        buf.copy_(new)
    graph.replay()
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logprobs, expected_lp)


@pytest.mark.gpu
def test_gpu_tokens_follow_the_same_rules():
    gen = torch.Generator().manual_seed(12)
    batch = _rows(128, 50_000, gen)
    cuda_batch = [t.cuda() for t in batch]
    tokens, logprobs = sample(*cuda_batch)
    greedy = batch[1] == 0
    assert torch.equal(tokens.cpu()[greedy], batch[0].argmax(-1)[greedy])
    expected = torch.log_softmax(batch[0], -1).gather(1, tokens.cpu()[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.cpu(), expected, atol=1e-4, rtol=1e-4)
    perm = torch.randperm(128, generator=gen)
    permuted, _ = sample(*[t[perm.cuda()] for t in cuda_batch])
    assert torch.equal(permuted, tokens[perm.cuda()])
