"""bench.blas_choice: the table and the plot (no GPU); on the GPU, every candidate of a small
model's decode products timed three ways, and the engine's choices left as they were."""

from __future__ import annotations

import math

import pytest
import torch

from bench.blas_choice import TORCH, format_table, measure, plot


def _row(step_ms):
    candidates = [{"index": i - 1, "kernel": "torch" if i == 0 else f"algo 66 tile {i}",
                   "alone_us": 20.0 + i, "chain_us": 22.0 - i, "step_ms": s}
                  for i, s in enumerate(step_ms)]
    picks = {"alone": TORCH, "chain": 1, "step": 1}
    return {"model": "dummy:llama-3.2-1b", "B": 256, "N": 2048, "K": 8192, "accumulate": True,
            "candidates": candidates, "engine_pick": 1, "picks": picks,
            "pick_step_ms": {h: step_ms[i + 1] for h, i in picks.items()}}


def test_table_and_plot(tmp_path):
    rows = [_row([3.13, 3.12, 3.07]), _row([2.10, 2.11, 2.12])]
    table = format_table(rows).splitlines()
    assert len(table) == 3
    assert "2048 x 8192" in table[1] and "-1: 3.130" in table[1] and "1: 3.070" in table[1]
    plot(rows, tmp_path / "choice.png")
    assert (tmp_path / "choice.png").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_candidate_of_the_step_timed_three_ways():
    from kernels import cublaslt

    rows = measure("dummy:tiny", 72, new_tokens=6)
    assert rows and all(r["B"] == 72 for r in rows)
    for r in rows:
        n = len(r["candidates"])
        assert n >= 2 and r["candidates"][0]["kernel"] == "torch"
        for c in r["candidates"]:
            assert all(math.isfinite(c[k]) for k in ("alone_us", "chain_us", "step_ms"))
            assert c["alone_us"] > 0 and c["step_ms"] > 0
        assert all(TORCH <= p < n - 1 for p in r["picks"].values())
        step = [c["step_ms"] for c in r["candidates"]]
        assert r["pick_step_ms"]["step"] == min(step)
    # The engine's choices are back in place for the shapes it timed.
    for device, shape in cublaslt.timed_shapes():
        if shape.m == 72:
            row = next(r for r in rows if (r["N"], r["K"], r["accumulate"])
                       == (shape.n, shape.k, shape.accumulate))
            assert cublaslt.chosen(device, shape).index == row["engine_pick"]
