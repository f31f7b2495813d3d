"""bench.sampling: its argument checks and the replot of a saved run (no GPU), and a short
run on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.sampling import SETTINGS, _row_sampling, main
from tests.bench.replot import assert_replots

SAVED = Path(__file__).resolve().parents[2] / "bench" / "results" / "sampling.json"


@pytest.mark.parametrize("args", [["--batch-sizes", "0"], ["--steps", "0"], ["--rounds", "-1"]])
def test_non_positive_sizes_are_refused(args):
    with pytest.raises(SystemExit):
        main(args)


def test_each_setting_is_the_row_sampling_it_names():
    rows = {name: _row_sampling(setting, seed=3) for name, setting in SETTINGS.items()}
    assert rows["greedy"].temperature == 0 and not rows["greedy"].penalized
    assert rows["greedy + penalties"].penalized and rows["greedy + penalties"].temperature == 0
    assert rows["top-k 50"].top_k == 50 and rows["top-k 50"].top_p == 1.0
    assert rows["top-p 0.95"].top_p == 0.95 and rows["top-p 0.95"].top_k == -1
    assert rows["top-p 0.95 + penalties"].repetition_penalty == 1.1
    assert {r.seed for r in rows.values()} == {3}


@pytest.mark.skipif(not SAVED.exists(), reason="no saved run")
def test_saved_run_replots_and_holds_every_setting(tmp_path):
    payload = json.loads(SAVED.read_text())
    for row in payload["rows"]:
        assert set(row["step_ms"]) == set(SETTINGS)
        assert row["vs_greedy"]["greedy"] == 1.0
    assert_replots(SAVED, main, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_short_run_times_every_setting(tmp_path):
    main(["--models", "dummy:tiny", "--batch-sizes", "3", "--context", "20", "--steps", "4",
          "--rounds", "1", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "sampling.json").read_text())["rows"][0]
    assert set(row["step_ms"]) == set(SETTINGS) and all(ms > 0 for ms in row["step_ms"].values())
    assert (tmp_path / "sampling.png").stat().st_size > 10_000
