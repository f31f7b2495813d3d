"""argmax against torch.argmax: exact indices, ties to the lowest index, output poisoned."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.argmax import argmax, argmax_launch

CHUNK = argmax_launch(1).chunk


def check(logits: torch.Tensor) -> None:
    out = torch.full((logits.shape[0],), -7, dtype=torch.int64, device=logits.device)
    result = argmax(logits, out=out)
    assert result is out
    assert torch.equal(out, reference.argmax(logits))


@pytest.mark.parametrize("B,V", [(1, 1), (3, 5), (2, CHUNK), (2, CHUNK + 1), (4, 3 * CHUNK - 17)])
def test_random_rows(B, V):
    check(torch.randn(B, V))


def test_half_precision_logits():
    check(torch.randn(3, CHUNK + 100, dtype=torch.float16))


def test_ties_resolve_to_lowest_index():
    """Integer-valued logits repeat the maximum within and across chunks."""
    check(torch.randint(-3, 3, (6, 2 * CHUNK + 9)).float())


def test_ties_placed_across_chunk_boundaries():
    V = 3 * CHUNK + 5
    logits = torch.randn(5, V)
    top = logits.max() + 1
    placements = [(CHUNK - 1, CHUNK), (CHUNK, 2 * CHUNK + 3), (V - 1, 0), (7, V - 1),
                  (2 * CHUNK, CHUNK + 1)]
    for row, cols in enumerate(placements):
        logits[row, list(cols)] = top
    check(logits)
    assert argmax(logits).tolist() == [min(cols) for cols in placements]


def test_constant_and_negative_infinite_rows():
    logits = torch.stack([torch.full((CHUNK + 3,), -float("inf")), torch.full((CHUNK + 3,), 2.5)])
    check(logits)


def test_nan_counts_as_the_maximum_as_in_torch():
    """A row with NaN (an overflowed model) picks its first NaN, across chunks and next to
    +inf; every index stays inside the vocabulary."""
    V = 3 * CHUNK + 5
    logits = torch.randn(5, V)
    nan, inf = float("nan"), float("inf")
    logits[0, [2 * CHUNK + 1, V - 1]] = nan
    logits[1, 5] = inf
    logits[1, [CHUNK + 2, 3]] = nan
    logits[2] = nan
    logits[3, :CHUNK] = -inf
    logits[3, V - 1] = nan
    check(logits)
    assert argmax(logits).tolist()[:4] == [2 * CHUNK + 1, 3, 0, V - 1]


def test_strided_rows():
    wide = torch.randn(3, CHUNK + 500)
    check(wide[:, 7: CHUNK + 400])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        argmax(torch.randn(4))
    with pytest.raises(ValueError, match="int64"):
        argmax(torch.randn(2, 10), out=torch.empty(2, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("B,V", [(1, 128256), (256, 128256), (64, 151936)])
def test_gpu_real_sizes(B, V):
    logits = torch.randn(B, V, device="cuda") * 5
    check(logits)
    check(logits.round())  # many repeated maxima
