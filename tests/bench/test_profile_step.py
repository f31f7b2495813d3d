"""bench.profile_step's kernel grouping and its replot of saved profiles (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.profile_step import main, part_of

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
SAVED = sorted(RESULTS.glob("profile_*.json"))


@pytest.mark.parametrize("name,part", [
    ("_decode_split_kernel", "attention"),
    ("_merge_splits_kernel", "merge"),
    ("_rope_kv_write_kernel", "rope_kv_write"),
    ("_rmsnorm_kernel", "norm"),
    ("_silu_and_mul_kernel", "activation"),
    ("_chunk_argmax_kernel", "argmax"),
    ("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "other"),
])
def test_kernels_are_grouped_into_step_parts(name, part):
    assert part_of(name) == part


@pytest.mark.skipif(not SAVED, reason="no saved profile")
def test_saved_profiles_account_for_the_whole_step():
    for path in SAVED:
        for row in json.loads(path.read_text())["rows"]:
            total = sum(p["us_per_step"] for p in row["parts"].values())
            assert total == pytest.approx(row["step_us"], rel=1e-6), (path.name, row["B"])
            assert {k["part"] for k in row["kernels"]} <= set(row["parts"])


@pytest.mark.skipif(not SAVED, reason="no saved profile")
def test_replot_draws_saved_profiles(tmp_path, capsys):
    assert main(["--replot", *map(str, SAVED), "--out", str(tmp_path), "--name", "p"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "roofline" in capsys.readouterr().out
