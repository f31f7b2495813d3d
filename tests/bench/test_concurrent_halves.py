"""bench.concurrent_halves: its argument checks and the replot of a saved run (no GPU), and the
study itself on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.concurrent_halves import main
from tests.bench.replot import assert_replots

SAVED = Path(__file__).resolve().parents[2] / "bench" / "results" / "concurrent_halves.json"


@pytest.mark.parametrize("batch_sizes", ["32", "63", "64,16"])
def test_halves_that_would_split_k_on_two_streams_are_refused(batch_sizes):
    # Halves of up to 16 rows share the split-K arrival counters across the two streams.
    with pytest.raises(SystemExit):
        main(["--batch-sizes", batch_sizes])


@pytest.mark.skipif(not SAVED.exists(), reason="no saved run")
def test_saved_run_replots_and_holds_every_variant(tmp_path):
    payload = json.loads(SAVED.read_text())
    for row in payload["rows"]:
        assert set(row["step_ms"]) == {"one batch", "halves, one stream", "halves, two streams"}
        assert all(len(s) == len(row["samples_ms"]["one batch"]) for s in row["samples_ms"].values())
    assert_replots(SAVED, main, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_halves_on_one_stream_match_the_whole_step(tmp_path):
    main(["--models", "dummy:tiny", "--batch-sizes", "34", "--context", "40", "--rounds", "1",
          "--out", str(tmp_path)])
    row = json.loads((tmp_path / "concurrent_halves.json").read_text())["rows"][0]
    # Each half runs other launch shapes than the whole batch, so bf16 roundings differ (the 1B
    # and 8B shapes on the H100: 0.024-0.042 relative); wrong rows or slab views would be ~1.
    assert row["logits_rel_err_vs_one_batch"]["halves, one stream"] < 0.1
    assert all(ms > 0 for ms in row["step_ms"].values())
