"""The simulator plays the engine's part: run the same workload through the engine (dummy:tiny on
the CPU) and through the simulator with the engine's slab rules, and the batches must match
step for step: same batches, same decode steps in each, same overflows. Times differ (a CPU
is not the modelled GPU); what the engine does with its slabs must not."""

from __future__ import annotations

import dataclasses

import pytest

from bench import e2e
from bench.workloads import WorkloadSpec, simulate_with_batches
from scheduler.service import LinearServiceModel

# Long prompts against max_tokens and tight capacity buckets (7, 14, 28, 38): rows predicted a
# bin too low reach their slab's end; seed 1 gives 8 overflows (checked below).
CONFIG = dataclasses.replace(e2e.smoke_config(), lengths="uniform:1:24", prompts="uniform:10:14",
                             max_tokens=24, min_capacity=7, seed=1)
SERVICE = LinearServiceModel(step_s=1e-3, per_token_s=1e-8, prefill_s=1e-4, integer_steps=True)



@pytest.mark.parametrize("mode", ["static", "bin-continuous", "continuous"])
def test_simulated_batches_are_the_engines(mode):
    k = 1 if mode == "continuous" else 2
    predictor = "oracle" if mode == "continuous" else "bin-error:0.5"
    workload = WorkloadSpec(24, CONFIG.lengths, CONFIG.prompts, CONFIG.max_tokens, CONFIG.seed)
    # A long max wait: refills wait for nothing but free rows, so no wall-clock enters.
    run = e2e.CoreRun(4, k, mode, predictor, workload, max_wait_ms=60_000.0)
    row, _ = e2e.run_core(run, CONFIG, progress=False)
    sim = simulate_with_batches(run.sim_spec(CONFIG), SERVICE)
    measured = row["measured"]
    assert measured["token_mismatches"] == 0
    assert sim["overflows"] == measured["overflows"]
    if mode != "continuous":
        assert measured["overflows"] == 8  # the workload exercises the slab's end
    assert [b["steps"] for b in sim["batches"]] == [b["steps"] for b in row["batches"]]
    assert [b["n_requests"] for b in sim["batches"]] == [b["n_requests"] for b in row["batches"]]
    assert [b["capacity"] for b in sim["batches"]] == [b["capacity"] for b in row["batches"]]
    assert sum(b["steps"] for b in sim["batches"]) == measured["decode_steps"]
    assert sim["padding_waste"] == pytest.approx(measured["padding_waste"], abs=1e-12)


def test_engine_slab_rules_come_from_the_engine():
    config = e2e.StudyConfig()
    runs = {r.name: r for r in e2e.core_runs(config, rates=[10.0])}
    spec = runs["B64 k4 bin-continuous bin-error:0.2 t=0"].sim_spec(config)
    assert spec.capacities == (256, 512, 1024, 1536)  # powers of two x 256, capped at 1536
    assert spec.refill_min_free == 8 and spec.refill_max_wait_s == 0.05  # B // 8, 50 ms
    assert runs["B8 k1 static oracle t=0"].sim_spec(config).refill_min_free == 1
