"""bench.lm_head: its argument checks and the replot of the saved run (no GPU), and the
benchmark itself on a small head on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.lm_head import VARIANTS, main
from tests.bench.replot import assert_replots

SAVED = Path(__file__).resolve().parents[2] / "bench" / "results" / "lm_head.json"


@pytest.mark.parametrize("args", [["--rows", "0"], ["--rows", "257"], ["--heads", "llama-9"],
                                  ["--heads", "1000:0"], ["--rows", "x"]])
def test_bad_arguments_are_refused(args):
    with pytest.raises(SystemExit):
        main(args)


@pytest.mark.skipif(not SAVED.exists(), reason="no saved run")
def test_saved_run_replots_and_holds_every_variant(tmp_path):
    payload = json.loads(SAVED.read_text())
    for row in payload["rows"]:
        assert set(row["us"]) == set(VARIANTS) == set(row["weight_pct_copy"])
        assert row["same_tokens"] <= row["rows"]
    assert_replots(SAVED, main, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_head_runs_and_agrees(tmp_path):
    main(["--heads", "20000:512", "--rows", "1,17,200", "--rounds", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_head.json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 17, 200]
    for row in rows:
        # A token that differs must be a near tie of the fp32 logits.
        assert row["same_tokens"] == row["rows"] or row["max_logit_gap"] < 1e-3
        assert all(us > 0 for us in row["us"].values())
