"""The end-to-end benchmarks on the CPU: ``bench.engine`` and ``bench.e2e`` run their whole code
path on ``dummy:tiny`` with tiny sizes (``--smoke``), and the GPU configurations are built and
estimated without a GPU, so the scripts cannot rot between GPU runs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bench import e2e
from bench import engine as engine_bench
from bench.workloads import (CLOSED_FORM_GAIN_PCT, EqualKVSpec, SimSpec, WorkloadSpec, bin_edges,
                             run_simulations, simulate_equal_kv, simulate_spec)
from scheduler.bins import equal_width_edges
from scheduler.schemas import StepTimeTable
from scheduler.service import LinearServiceModel

# Whole-token steps, so the simulator accepts it like a measured table.
SERVICE = LinearServiceModel(step_s=1e-3, per_token_s=2e-8, prefill_s=1e-4,
                             prefill_per_token_s=1e-6, integer_steps=True)



def synthetic_table() -> StepTimeTable:
    """A plausible decode/prefill table (times grow with B and tokens)."""
    decode = [(B, B * L, 1e-3 * (1 + B / 64) + 3e-8 * B * L)
              for B in (1, 8, 16, 32, 64, 128) for L in (64, 512, 1024, 1536, 2048)]
    prefill = [(B, B * L, 1e-4 + 4e-9 * B * L) for B in (1, 8, 32, 64) for L in (64, 256, 512)]
    return StepTimeTable("synthetic", "dummy:llama-3.2-1b", decode, prefill)


# ---- bench.engine --------------------------------------------------------------------------


def test_engine_smoke(tmp_path):
    assert engine_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "engine.json").read_text())
    config = engine_bench.SMOKE_CONFIG
    assert payload["meta"]["gpu"] == "cpu"
    assert [r["B"] for r in payload["ours"]] == config.batch_sizes
    for row in payload["ours"]:
        # N tokens per row: one from the prefill, N-1 decode steps, plus the step in flight.
        assert config.new_tokens - 1 <= row["decode_steps"] <= config.new_tokens + 1
        assert row["step_ms_p10"] <= row["step_ms_median"] <= row["step_ms_p90"]
        assert row["decode_tok_s"] > 0 and row["generate_tok_s"] > 0
        assert row["generate_s"] > row["decode_wall_s"] > 0
    (hf,) = payload["transformers"]
    assert hf["variant"] == "eager" and hf["B"] == config.hf_batch_size
    assert hf["generate_tok_s"] > 0 and hf["ours_over_hf_generate"] > 0
    assert (tmp_path / "engine.png").stat().st_size > 10_000


def test_mean_roofline_averages_the_steps_context_lengths():
    from bench.roofline import decode_step_roofline_s
    from engine.dummy import dummy_config

    cfg = dummy_config("dummy:llama-3.2-1b")
    ceilings = engine_bench.Ceilings(copy_gbps=3000.0, matmul_tflops=700.0)
    one = lambda n: decode_step_roofline_s(cfg, 4, [n] * 4, 3000e9, 700e12)
    assert engine_bench.mean_roofline_s(cfg, 4, 512, 3, ceilings) == pytest.approx(
        (one(513) + one(514) + one(515)) / 3, rel=1e-12)


@pytest.mark.parametrize("name", ["dummy:llama-3.2-1b", "dummy:llama-3.1-8b"])
def test_transformers_baseline_has_the_dummy_models_shape(name):
    from transformers import LlamaForCausalLM

    from engine.dummy import dummy_config

    c = dummy_config(name)
    with torch.device("meta"):
        hf = LlamaForCausalLM(engine_bench.hf_llama_config(c))
    per_layer = (c.qkv_size * c.hidden_size + c.num_heads * c.head_dim * c.hidden_size
                 + 3 * c.intermediate_size * c.hidden_size + 2 * c.hidden_size)
    ours = (c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
            + c.num_layers * per_layer + c.hidden_size)
    assert sum(p.numel() for p in hf.parameters()) == ours
    assert hf.config.rope_parameters["rope_type"] == "llama3"


# ---- bench.workloads -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 16])
def test_uniform_bins_are_the_engines_bins(k):
    # EngineCore builds equal_width_edges(k, 1, max_output_len, max_output_len) from --bins k.
    assert bin_edges("uniform:1:1024", k, 1024) == equal_width_edges(k, 1, 1024, 1024)


def test_workload_prefix_and_poisson_share_lengths():
    spec = lambda n, rate=None: WorkloadSpec(n, "uniform:1:1024", "uniform:64:512", 1024, seed=3,
                                             arrival_rate=rate).build()
    small, big, timed = spec(8), spec(32), spec(8, rate=5.0)
    assert small.output_lens == big.output_lens[:8] == timed.output_lens
    assert small.prompt_lens == big.prompt_lens[:8] == timed.prompt_lens
    assert all(1 <= v <= 1024 and float(v).is_integer() for v in big.output_lens)
    assert all(64 <= p <= 512 for p in big.prompt_lens)
    assert timed.arrival_times[0] > 0 and small.arrival_times == [0.0] * 8


@pytest.mark.parametrize("mode", ["static", "bin-continuous"])
def test_equal_kv_bin_by_bin_matches_the_direct_simulation(mode):
    # With every bin at the same capacity each bin gets B rows: splitting by bin must give the
    # same makespan as simulating the k-bin scheduler directly.
    workload = WorkloadSpec(300, "uniform:1:64", "uniform:4:32", 64, seed=1)
    direct = simulate_spec(SimSpec(workload, 8, 4, mode, "oracle"), SERVICE)
    split = simulate_equal_kv(EqualKVSpec(workload, 8 * 96, 4, mode, (96,) * 4, "test"), SERVICE)
    assert split["rows_per_bin"] == [8] * 4
    assert split["throughput"] == pytest.approx(direct["throughput"], rel=1e-9)


def test_equal_kv_gives_short_bins_more_rows():
    workload = WorkloadSpec(300, "uniform:1:64", "uniform:4:32", 64, seed=1)
    spec = EqualKVSpec(workload, 8 * 96, 2, "static", (64, 96), "test")
    result = simulate_equal_kv(spec, SERVICE)
    assert result["rows_per_bin"] == [12, 8]
    baseline = simulate_spec(SimSpec(workload, 8, 2, "static", "oracle"), SERVICE)
    assert result["throughput"] > baseline["throughput"]


# ---- bench.e2e: the GPU configuration, built and estimated on the CPU -----------------------


def test_default_study_configuration():
    config = e2e.StudyConfig()
    assert config.max_model_len == 1536
    runs = e2e.core_runs(config, rates=[10.0, 20.0])
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 16
    assert sum(r.workload.arrival_rate is not None for r in runs) == 4
    assert {r.batch_size for r in runs} == {8, 64}
    by_name = {r.name: r for r in runs}
    assert e2e.slab_capacities(by_name["B64 k16 static oracle t=0"], config) == \
        [256, 512, 1024, 1536]
    assert e2e.slab_capacities(by_name["B64 k1 static oracle t=0"], config) == [1536]
    assert e2e.slab_capacities(by_name["B64 k1 continuous oracle t=0"], config) == [1536]
    options = e2e.engine_options(by_name["B64 k4 bin-continuous bin-error:0.2 t=0"], config)
    assert options.num_bins == 4 and options.max_output_len == 1024
    e2e.check_closed_form()


def test_budget_shrinks_request_counts_in_whole_batches():
    config = dataclasses.replace(e2e.StudyConfig(), core_budget_s=60.0)
    table = synthetic_table()
    rates = [0.5 * e2e.simulated_capacity(config, table)]
    full = sum(e2e.estimate_core(e2e.core_runs(config, rates), config, table))
    assert full > 60.0
    shrunk, runs, estimates = e2e.fit_to_budget(config, rates, table)
    assert shrunk.requests_big < config.requests_big and shrunk.requests_big % 64 == 0
    assert shrunk.requests_small % 8 == 0 and shrunk.poisson_requests % 64 == 0
    assert len(runs) == len(estimates) == 14 and sum(estimates) < full
    assert all(math.isfinite(e) and e > 0 for e in estimates)


# ---- bench.e2e: the whole study on dummy:tiny ------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    payload = e2e.run(e2e.smoke_config(), out, progress=False)
    return out, json.loads((out / "e2e.json").read_text()), payload


def test_e2e_writes_every_output(study):
    out, saved, _ = study
    for name in ("e2e.json", "step_times.json", "e2e_table.md", "e2e_throughput_vs_k.png",
                 "e2e_gain_vs_paper.png", "e2e_sim_vs_measured.png", "e2e_latency.png"):
        assert (out / name).stat().st_size > 0, name
    table = StepTimeTable.load(out / "step_times.json")
    config = e2e.smoke_config()
    assert len(table.decode) == len(config.table_decode_batches) * len(config.table_decode_lens)
    assert all(t > 0 for _, _, t in table.decode + table.prefill)
    markdown = (out / "e2e_table.md").read_text()
    assert markdown.count("\n| 4 | ") + markdown.count("\n| 2 | ") >= len(saved["core"])
    assert "equal KV memory" in markdown and "transformers" in markdown


def test_e2e_measured_runs_are_complete_and_exact(study):
    _, saved, _ = study
    assert len(saved["core"]) == 16
    for row in saved["core"]:
        assert "error" not in row, row
        m = row["measured"]
        assert m["token_mismatches"] == 0, row["name"]
        # Every token generated once, overflows included (evicted rows keep their tokens).
        assert m["tokens_generated"] == m["output_tokens"], row["name"]
        assert m["throughput"] > 0 and 0 <= m["latency_p50"] <= m["latency_p99"]
        assert 0 <= m["padding_waste"] < 1
        # The warm-up covered every slab capacity the run used.
        assert set(m["capacities_used"]) <= set(m["warmup_capacities"]), row["name"]
        if row["predictor"] == "oracle":
            assert m["overflows"] == 0, row["name"]
        assert "error" not in row["sim"] and row["sim_error"]["throughput"] >= 0


def test_e2e_simulations_and_gains(study):
    _, saved, _ = study
    for key in ("sim_grid", "equal_kv", "latency_sweep", "latency_sweep_steady", "paper_model"):
        assert saved[key] and not [r for r in saved[key] if "error" in r], key
    gains = saved["gains_pct"]
    assert {int(k): round(v) for k, v in gains["closed_form"].items()} == CLOSED_FORM_GAIN_PCT
    # The simulator under the paper's service model reproduces Theorem 4.2 (within a point:
    # integer lengths and a finite workload).
    for k, closed in gains["closed_form"].items():
        assert gains["simulated_paper_model"][k] == pytest.approx(closed, abs=1.0), k
    assert set(gains["measured"]) == {"16"}
    hf = saved["transformers"]
    assert hf["throughput"] > 0 and hf["ours_throughput"] > 0


def test_simulations_in_worker_processes_match_in_process():
    workload = WorkloadSpec(120, "uniform:1:64", "uniform:4:32", 64, seed=2)
    specs = [SimSpec(workload, 8, k, "static", "bin-error:0.2") for k in (1, 2, 4)]
    serial = run_simulations(simulate_spec, specs, SERVICE, workers=1, progress=False)
    parallel = run_simulations(simulate_spec, specs, SERVICE, workers=2, progress=False)
    assert parallel == serial
    assert [r["k"] for r in serial] == [1, 2, 4] and not any("error" in r for r in serial)


def test_e2e_measures_the_one_row_table_and_the_engine_overheads(study):
    out, saved, _ = study
    one_row = StepTimeTable.load(out / saved["step_table"]["one_row_file"])
    table = StepTimeTable.load(out / "step_times.json")
    assert [(b, round(x / b)) for b, x, _ in table.decode] == \
        [(b, x) for b, x, _ in one_row.decode]
    calibration = saved["calibration"]
    assert "error" not in calibration, calibration
    config = e2e.smoke_config()
    assert [b for b, _ in calibration["decode_step_s"]] == [config.small_batch, config.big_batch]
    for run in calibration["runs"]:
        assert [b["steps"] for b in run["batches"]] == list(config.calibration_new_tokens)
        assert run["engine_step_s"] > 0 and run["table_step_s"] > 0
    assert saved["predictor_draws"] == "keyed"
    for row in saved["core"]:
        assert len(row["batches"]) == row["measured"]["n_batches"] == len(row["sim_batches"])
        # Static batches of requests all there at t=0 depend on no clock: the simulator ran
        # the engine's batches.
        if row["mode"] == "static" and row["arrival_rate"] is None:
            assert row["batch_check"]["same_batches"], row["name"]


def test_resimulate_rewrites_only_the_simulated_side(study, tmp_path):
    out, saved, _ = study
    again = tmp_path / "again"
    payload = e2e.resimulate(out / "e2e.json", again, progress=False)
    rewritten = json.loads((again / "e2e.json").read_text())
    assert rewritten["meta"] == saved["meta"]  # still the measured run's commit and command
    assert rewritten["resimulated"]["source"] == str(out / "e2e.json")
    for before, after in zip(saved["core"], rewritten["core"]):
        assert after["measured"] == before["measured"]
        assert after["sim_error_before"] == before["sim_error"]
        # Same simulator, same tables and overheads: the same simulation.
        assert after["sim"]["makespan"] == pytest.approx(before["sim"]["makespan"], rel=1e-9)
    rules = payload["resimulated"]["slab_rules"]
    assert all(r["sequential_draws_after"] is None for r in rules.values())
    assert "sim error saved" in (again / "e2e_table.md").read_text()
    assert (again / "e2e_sim_vs_measured.png").stat().st_size > 0
    with pytest.raises(ValueError, match="never overwrites"):
        e2e.resimulate(out / "e2e.json", out, progress=False)
    with pytest.raises(SystemExit):
        e2e.main(["--resimulate", str(out / "e2e.json")])  # no --out


def test_resimulate_replays_the_draws_of_results_saved_before_keyed_draws(study, tmp_path):
    out, saved, _ = study
    old = dict(saved, core=[{k: v for k, v in row.items() if k != "batches"}
                            for row in saved["core"]])
    del old["predictor_draws"]
    source = tmp_path / "old"
    source.mkdir()
    (source / "e2e.json").write_text(json.dumps(old))
    for name in ("step_times.json", "step_times_one_row.json"):
        (source / name).write_text((out / name).read_text())
    payload = e2e.resimulate(source / "e2e.json", tmp_path / "new", progress=False)
    skips = [r["sequential_draws_after"] for r in payload["resimulated"]["slab_rules"].values()]
    assert skips == [len(r["measured"]["warmup_capacities"]) for r in saved["core"]]


def test_sequential_replay_draws_the_old_stream():
    import random

    from bench.workloads import SequentialBinErrorPredictor
    from scheduler.predictors import BinErrorPredictor
    from scheduler.types import Request

    keyed = BinErrorPredictor({"a": 3.0, "b": 9.0}, equal_width_edges(3, 0, 12), 0.4, seed=7)
    replay = SequentialBinErrorPredictor(keyed, skip=3)
    stream = random.Random(7)
    expected = [stream.random() for _ in range(6)][3:]
    requests = [Request(rid, 1, 12) for rid in ("a", "b", "a")]
    assert [replay.draw(r) for r in requests] == expected


def test_gemm_chain_variants_are_launchable_configs():
    """Every ``bench.gemm_chain --sweep`` variant of every product is a config the kernel can
    launch: a K tile that divides the product, a pipeline within the H100's shared memory, a
    power-of-two prefetch; the default variant is gemm_config's own choice."""
    from bench.gemm_chain import MODELS, VARIANTS, variant
    from kernels.gemm import NORM, PLAIN, gemm_config

    for shape in MODELS.values():
        h, inter = shape["hidden"], shape["inter"]
        for n, k, prologue in ((shape["q"] + 2 * shape["kv"], h, PLAIN), (h, shape["q"], PLAIN),
                               (2 * inter, h, NORM), (h, inter, PLAIN)):
            config = gemm_config(64, n, k, torch.bfloat16, prologue, pdl=True)
            assert variant(config, n, k, *VARIANTS["default"]) == config
            for changes in VARIANTS.values():
                v = variant(config, n, k, *changes)
                assert k % v.block_k == 0 and v.num_stages >= 1
                assert (v.block_m + v.block_n) * v.block_k * 2 * v.num_stages <= 227 * 1024
                assert v.prefetch_k >= config.prefetch_k
                assert v.prefetch_k & (v.prefetch_k - 1) == 0


def test_l2_flush_table_and_plot_cover_every_implementation(tmp_path):
    from bench import l2_flush

    def result(us):
        return {"dirty": {"us": us, "pct_copy": 50.0}, "clean": {"us": us / 2, "pct_copy": 99.0}}

    rows = [{"shape": "B1 L8192 unif", "live_kv_bytes": 33_554_432,
             "results": {"ours": result(22.6), "ours, pipelined": result(25.5), "sdpa": result(33.2)}},
            {"shape": "B64 L2048 skew", "live_kv_bytes": 292_000_000,
             "results": {"ours": result(112.9), "sdpa": result(199.2)}}]
    table = l2_flush.format_table(rows).splitlines()
    assert len(table) == 3 and "ours, pipelined dirty / clean" in table[0]
    assert "22.6 / 11.3 (50 / 99%)" in table[1] and table[2].count("-") >= 1
    l2_flush.plot(rows, tmp_path / "l2.png")
    assert (tmp_path / "l2.png").stat().st_size > 0
