"""EngineCore: finish rules, one step in flight, refills, aborts, overflow, errors, batch log.

All on ``dummy:tiny`` (CPU, reference ops). Reference token streams come from a plain run of
the same engine with nothing interesting happening (one request at a time, roomy slabs).
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.engine_core import EngineCore
from engine.options import EngineOptions
from engine.request import EngineRequest, SamplingParams
from scheduler.schemas import BatchRecord

BASE = dict(model="dummy:tiny", max_model_len=64, min_capacity=16, max_wait_ms=1e6)



def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(L),), generator=g).tolist()
            for L in torch.randint(2, 12, (n,), generator=g)]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def _apply(out: dict, updates) -> None:
    """Fold updates into {id: (tokens, finish_reason, error)}."""
    for u in updates:
        tokens, reason, _ = out.setdefault(u.request_id, ([], None, None))
        assert reason is None, f"update after the final one for {u.request_id}"
        tokens.extend(u.new_token_ids)
        out[u.request_id] = (tokens, u.finish_reason if u.finished else None, u.error)


def _run(core: EngineCore, requests: list[EngineRequest], out: dict | None = None) -> dict:
    """Add requests, step until done; returns {id: (tokens, finish_reason, error)}."""
    for r in requests:
        core.add_request(r)
    out = {} if out is None else out
    t = 0.0
    while core.has_unfinished():
        t += 0.001
        _apply(out, core.step(t, flush=True))
    return out


@pytest.fixture(scope="module")
def reference():
    """Greedy 40-token streams of _prompts(6), each run alone."""
    core = EngineCore(EngineOptions(**BASE, batch_size=1))
    prompts = _prompts(6)
    out = _run(core, [EngineRequest(f"r{i}", p, _greedy(40)) for i, p in enumerate(prompts)])
    return prompts, [out[f"r{i}"][0] for i in range(len(prompts))]


def test_finish_rules_and_extra_tokens_are_discarded(reference):
    prompts, ref = reference
    stop_token = ref[2][5]
    first_stop = ref[2].index(stop_token)
    core = EngineCore(EngineOptions(**BASE, batch_size=4))
    core.eos_token_ids = frozenset({ref[3][3]})
    out = _run(core, [
        EngineRequest("one", prompts[0], _greedy(1)),
        EngineRequest("len", prompts[1], _greedy(7)),
        EngineRequest("stop", prompts[2], _greedy(20, stop_token_ids=[stop_token])),
        EngineRequest("eos", prompts[3], SamplingParams(max_tokens=20, temperature=0.0)),
        EngineRequest("target", prompts[4], _greedy(30), target_len=9),
        EngineRequest("ignore", prompts[3], _greedy(12)),
    ])
    assert out["one"][:2] == (ref[0][:1], "length")
    assert out["len"][:2] == (ref[1][:7], "length")
    assert out["stop"][:2] == (ref[2][:first_stop + 1], "stop")
    assert out["eos"][:2] == (ref[3][:ref[3].index(ref[3][3]) + 1], "stop")
    assert out["target"][:2] == (ref[4][:9], "length")
    assert out["ignore"][:2] == (ref[3][:12], "length")


def test_finished_row_is_dead_from_two_steps_later():
    # Row A finishes on its prefill token (step 0); the step launched before that was known
    # (step 1) still computes it; from step 2 on it is idle. Row B runs 6 tokens: steps 1..5
    # produce tokens 2..6, step 6 was in flight when B finished.
    core = EngineCore(EngineOptions(**BASE, batch_size=2))
    prompts = _prompts(2, seed=1)
    out = _run(core, [EngineRequest("a", prompts[0], _greedy(1)),
                      EngineRequest("b", prompts[1], _greedy(6))])
    assert len(out["a"][0]) == 1 and len(out["b"][0]) == 6
    (record,) = core.batch_records
    assert record.steps == 6
    assert record.idle_row_steps == 5
    assert record.output_lens == [1, 6]


@pytest.mark.parametrize("min_free, refills", [(1, 2), (2, 1)])
def test_bin_continuous_refills_when_enough_rows_are_free(reference, min_free, refills):
    prompts, ref = reference
    lengths = [3, 6, 10, 10, 5, 5]
    core = EngineCore(EngineOptions(**BASE, batch_size=4, mode="bin-continuous",
                                    refill_min_free=min_free))
    out = _run(core, [EngineRequest(f"r{i}", p, _greedy(n))
                      for i, (p, n) in enumerate(zip(prompts, lengths))])
    for i, n in enumerate(lengths):
        assert out[f"r{i}"][:2] == (ref[i][:n], "length")
    (record,) = core.batch_records  # every request went through one slab
    assert record.n_requests == 6 and record.mode == "bin-continuous"
    assert record.extra["refills"] == refills
    assert sorted(record.output_lens) == sorted(lengths)


def test_abort_frees_the_row_for_a_queued_request(reference):
    prompts, ref = reference
    core = EngineCore(EngineOptions(**BASE, batch_size=2, mode="bin-continuous"))
    for i in range(3):
        core.add_request(EngineRequest(f"r{i}", prompts[i], _greedy(20)))
    out, t = {}, 0.0
    while len(out.get("r0", ([],))[0]) < 4:
        t += 0.001
        _apply(out, core.step(t, flush=True))
    core.abort_request("r0")
    updates = core.step(t + 0.001, flush=True)
    finished = [(u.request_id, u.finish_reason) for u in updates if u.finished]
    assert finished == [("r0", "abort")]
    # The next step already refilled r0's row with r2 and prefilled it (its first token).
    assert any(u.request_id == "r2" and u.new_token_ids for u in updates)
    assert core.stats()["running"] == 2
    _apply(out, updates)
    _run(core, [], out)
    assert out["r0"][0] == ref[0][:len(out["r0"][0])] and len(out["r0"][0]) >= 4
    for i in (1, 2):
        assert out[f"r{i}"][:2] == (ref[i][:20], "length")
    assert [r.n_requests for r in core.batch_records] == [3]
    assert core.stats()["running"] == 0 and not core.has_unfinished()


def test_abort_of_a_queued_request():
    core = EngineCore(EngineOptions(**BASE, batch_size=1))
    prompts = _prompts(2, seed=2)
    core.add_request(EngineRequest("run", prompts[0], _greedy(5)))
    core.add_request(EngineRequest("queued", prompts[1], _greedy(5)))
    core.step(0.0, flush=True)
    core.abort_request("queued")
    updates = core.step(0.001, flush=True)
    assert [(u.request_id, u.finish_reason) for u in updates if u.finished] == [("queued", "abort")]
    with pytest.raises(KeyError):
        core.abort_request("queued")
    out = _run(core, [])
    assert set(out) == {"run"} and out["run"][1] == "length"  # nothing more for "queued"
    assert core.scheduler.pending() == 0 and not core.has_unfinished()
    assert [r.request_ids for r in core.batch_records] == [["run"]]


@pytest.mark.parametrize("mode", ["static", "bin-continuous"])
def test_overflow_recomputes_without_changing_the_output(reference, tmp_path, mode):
    prompts, ref = reference
    sampled = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    requests = lambda hint: [EngineRequest(f"g{i}", p, _greedy(30), hint=hint)
                             for i, p in enumerate(prompts)] + [
        EngineRequest("s", prompts[0], sampled, hint=hint)]
    # Bins [0, 8) and [8, 32]: a hint of 2 puts every request in bin 0, whose slab (C=16 or
    # 32 for these prompts) mostly ends before 30 tokens.
    opts = dict(**BASE, batch_size=3, mode=mode, bin_edges=[8], max_output_len=32,
                predictor="hint")
    log = tmp_path / "batches.jsonl"
    core = EngineCore(EngineOptions(**opts, log_batches=str(log)))
    out = _run(core, requests(hint=2))
    roomy = EngineCore(EngineOptions(**opts))
    want = _run(roomy, requests(hint=None))  # no hint: max_tokens, the top bin, no overflow
    assert roomy.stats()["overflows"] == 0
    for i in range(len(prompts)):
        assert out[f"g{i}"][:2] == (ref[i][:30], "length")
    assert out["s"][:2] == want["s"][:2]
    stats = core.stats()
    assert stats["overflows"] > 0
    assert stats["overflow_recompute_tokens"] > 0
    core.close()
    records = [BatchRecord.from_json_line(line) for line in log.read_text().splitlines()]
    assert sum(r.overflows for r in records) == stats["overflows"]
    assert sum(sum(r.output_lens) for r in records) == 30 * (len(prompts) + 1)
    assert {r.bin for r in records} == {0, 1}
    assert all(r.mode == mode and r.steps > 0 and r.wall_s > 0 for r in records)
    assert all(json.loads(line)["schema_version"] == 1 for line in log.read_text().splitlines())


def test_error_in_one_batch_fails_only_its_requests(reference, monkeypatch):
    prompts, ref = reference
    core = EngineCore(EngineOptions(**BASE, batch_size=2))
    real_decode, calls = core.runner.decode, []

    def failing_decode():
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("injected failure")
        return real_decode()

    monkeypatch.setattr(core.runner, "decode", failing_decode)
    out = _run(core, [EngineRequest(f"r{i}", prompts[i], _greedy(8)) for i in range(4)])
    for i in (0, 1):
        tokens, reason, error = out[f"r{i}"]
        assert reason == "error" and "injected failure" in error
        assert tokens == ref[i][:len(tokens)]
    for i in (2, 3):
        assert out[f"r{i}"][:2] == (ref[i][:8], "length")
    assert core.stats()["errors"] == 1


def test_device_poisoning_errors_propagate(monkeypatch):
    core = EngineCore(EngineOptions(**BASE, batch_size=2))

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(core.runner, "decode", broken)
    core.add_request(EngineRequest("x", [1, 2, 3], _greedy(4)))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        core.step(0.0, flush=True)


def test_kv_budget_too_small_is_refused_up_front():
    with pytest.raises(ValueError, match="KV cache budget too small.*batch_size 64"):
        EngineCore(EngineOptions(model="dummy:tiny", max_model_len=1024, batch_size=64,
                                 kv_cache_gb=0.01))


def test_plan_that_does_not_fit_the_arena_fails_its_requests_clearly():
    core = EngineCore(EngineOptions(**BASE, batch_size=2))
    core.arena.capacity_tokens = 16  # as if the arena were smaller than the plan's slab
    out = _run(core, [EngineRequest("a", [1, 2, 3], _greedy(4))])
    tokens, reason, error = out["a"]
    assert tokens == [] and reason == "error"
    assert "exceeds the KV arena" in error and "B=2" in error


def test_invalid_requests_are_refused():
    core = EngineCore(EngineOptions(**BASE, batch_size=2))
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        core.add_request(EngineRequest("long", [1] * 40, _greedy(30)))
    with pytest.raises(ValueError, match="empty"):
        core.add_request(EngineRequest("empty", [], _greedy(3)))
    with pytest.raises(ValueError, match="outside"):
        core.add_request(EngineRequest("vocab", [10**6], _greedy(3)))
    core.add_request(EngineRequest("ok", [1, 2], _greedy(3)))
    with pytest.raises(ValueError, match="already"):
        core.add_request(EngineRequest("ok", [1, 2], _greedy(3)))
    with pytest.raises(ValueError, match="grow"):
        EngineOptions(overflow="grow")
    with pytest.raises(ValueError, match="mode"):
        EngineOptions(mode="paged")


@pytest.mark.parametrize("top_k", [2**31, 2**70])
def test_top_k_beyond_the_vocabulary_samples_as_top_k_off(top_k):
    # Such a top_k keeps every token; it must not break the int32 tensors of its batch.
    sampled = lambda k: SamplingParams(max_tokens=8, temperature=1.0, top_k=k, seed=5,
                                       ignore_eos=True)
    prompts = _prompts(2)
    off = _run(EngineCore(EngineOptions(**BASE, batch_size=2)),
               [EngineRequest("a", prompts[0], sampled(-1)), EngineRequest("b", prompts[1], _greedy(8))])
    big = _run(EngineCore(EngineOptions(**BASE, batch_size=2)),
               [EngineRequest("a", prompts[0], sampled(top_k)), EngineRequest("b", prompts[1], _greedy(8))])
    assert big == off
    assert [big[r][1:] for r in "ab"] == [("length", None)] * 2


def test_stats_and_deadline():
    core = EngineCore(EngineOptions(**{**BASE, "max_wait_ms": 50.0}, batch_size=4, bins=2))
    assert core.next_deadline() is None
    core.add_request(EngineRequest("a", [1, 2, 3], _greedy(4), arrival_time=10.0))
    assert core.next_deadline() == pytest.approx(10.05)
    assert core.step(10.01) == []  # partial batch not due yet
    assert core.stats()["queue_depth"] == [1, 0]
    updates = core.step(10.06)
    assert [u.request_id for u in updates] == ["a"]
    stats = core.stats()
    assert stats["running"] == 1 and stats["occupancy"] == 0.25
    assert 0 < stats["padding_waste"] < 1
    assert stats["batches_formed"] == [1, 0]
    while core.has_unfinished():
        core.step(10.1)
    assert core.stats()["tokens_generated"] == 4
