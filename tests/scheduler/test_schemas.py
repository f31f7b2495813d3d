import json
import random

import pytest

from scheduler.interpolate import PiecewiseLinear
from scheduler.schemas import (BATCH_LOG_SCHEMA_VERSION, STEP_TABLE_SCHEMA_VERSION, BatchRecord,
                               StepTimeTable)


def _record(**overrides):
    fields = dict(bin=2, batch_size=8, capacity=1536, n_requests=3, prompt_lens=[100, 300, 512],
                  output_lens=[700, 1024, 5], steps=1024, idle_row_steps=8 * 1024 - 1729,
                  overflows=1, prefill_s=0.012, decode_s=3.25, wall_s=3.27,
                  tokens_per_s=1729 / 3.27, mode="static", request_ids=["a", "b", "c"],
                  max_new_tokens_bound=1024, formed_at=1.5, started_at=2.0,
                  extra={"k": 4, "predictor": "oracle"})
    fields.update(overrides)
    return BatchRecord(**fields)


def test_batch_record_round_trip():
    record = _record()
    line = record.to_json_line()
    assert "\n" not in line
    assert line.startswith('{"schema_version":%d,' % BATCH_LOG_SCHEMA_VERSION)
    assert BatchRecord.from_json_line(line) == record
    defaults = BatchRecord(bin=0, batch_size=1, capacity=8, n_requests=0, prompt_lens=[],
                           output_lens=[], steps=0, idle_row_steps=0, overflows=0, prefill_s=0.0,
                           decode_s=0.0, wall_s=0.0, tokens_per_s=0.0, mode="continuous")
    assert BatchRecord.from_json_line(defaults.to_json_line()) == defaults


def test_batch_record_rejects_other_versions_and_fields():
    record = json.loads(_record().to_json_line())
    for version in (BATCH_LOG_SCHEMA_VERSION + 1, 0, None, "1"):
        record["schema_version"] = version
        with pytest.raises(ValueError, match="schema_version"):
            BatchRecord.from_json_line(json.dumps(record))
    record["schema_version"] = BATCH_LOG_SCHEMA_VERSION
    with pytest.raises(ValueError, match=r"unknown fields \['surprise'\]"):
        BatchRecord.from_json_line(json.dumps({**record, "surprise": 1}))
    del record["steps"]
    with pytest.raises(ValueError, match=r"lacks required fields \['steps'\]"):
        BatchRecord.from_json_line(json.dumps(record))
    with pytest.raises(ValueError, match="not a JSON object"):
        BatchRecord.from_json_line("[1, 2]")


def test_batch_record_validates_itself():
    with pytest.raises(ValueError, match="n_requests=3 but 2 prompt_lens"):
        _record(prompt_lens=[1, 2])
    with pytest.raises(ValueError, match="unknown mode"):
        _record(mode="eager")


def _table():
    decode = [(1, 0, 1.0e-3), (1, 1000, 1.5e-3), (1, 4000, 3.0e-3),
              (8, 0, 1.2e-3), (8, 1000, 1.8e-3), (8, 8000, 6.0e-3)]
    prefill = [(1, 128, 2e-3), (1, 1024, 8e-3), (8, 1024, 9e-3), (8, 8192, 40e-3)]
    return StepTimeTable("NVIDIA H100 80GB HBM3", "dummy:llama-3.2-1b", decode, prefill,
                         meta={"commit": "abc", "dtype": "bfloat16"})


def test_step_table_round_trip(tmp_path):
    table = _table()
    path = table.save(tmp_path / "steps.json")
    loaded = StepTimeTable.load(path)
    assert loaded == table
    assert json.loads(path.read_text())["version"] == STEP_TABLE_SCHEMA_VERSION


def test_step_table_rejects_other_versions_and_fields(tmp_path):
    payload = json.loads(_table().save(tmp_path / "t.json").read_text())
    for change, message in (({"version": 2}, "version 2"), ({"extra": 1}, "unknown"),
                            ({"version": None}, "version None")):
        (tmp_path / "bad.json").write_text(json.dumps({**payload, **change}))
        with pytest.raises(ValueError, match=message):
            StepTimeTable.load(tmp_path / "bad.json")
    del payload["prefill"]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="lacks field 'prefill'"):
        StepTimeTable.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="same token count"):
        StepTimeTable("d", "m", [(1, 5, 1.0), (1, 5, 2.0)], [(1, 1, 1.0)])
    with pytest.raises(ValueError, match="no measured rows"):
        StepTimeTable("d", "m", [(1, 5, 1.0)], [])


def test_step_table_interpolation():
    table = _table()
    assert table.decode_time(1, 1000) == pytest.approx(1.5e-3)  # a measured point
    assert table.decode_time(1, 500) == pytest.approx(1.25e-3)  # between tokens
    assert table.decode_time(1, -10) == pytest.approx(1.0e-3)  # clamped below
    assert table.decode_time(1, 5000) == pytest.approx(3.5e-3)  # last segment extended
    # Between batch sizes: linear in B at fixed tokens.
    assert table.decode_time(4, 1000) == pytest.approx(1.5e-3 + 3 / 7 * 0.3e-3)
    assert table.decode_time(0, 0) == pytest.approx(1.0e-3)  # below the smallest B
    assert table.decode_time(15, 0) == pytest.approx(1.2e-3 + (0.2e-3 / 7) * 7)  # extended
    assert table.prefill_time(8, 4608) == pytest.approx(9e-3 + 31e-3 / 2)
    assert table.prefill_time(0, 0) == 0.0


def test_sums_over_arithmetic_runs_match_brute_force():
    rng = random.Random(0)
    table = _table()
    for _ in range(300):
        b = rng.choice([1, 3, 8, 12])
        start, step, n = rng.uniform(-50, 9000), rng.choice([0, 1, 3, 64, 500]), rng.randint(0, 60)
        brute = sum(table.decode_time(b, start + step * j) for j in range(n))
        assert table.decode_sum(b, start, step, n) == pytest.approx(brute, rel=1e-12, abs=1e-15)
        if n and brute > 0:
            duration = rng.uniform(0, brute)
            m = table.steps_in(b, start, step, duration)
            assert table.decode_sum(b, start, step, m) >= duration
            assert m == 0 or table.decode_sum(b, start, step, m - 1) < duration
    with pytest.raises(ValueError, match="whole steps"):
        table.decode_sum(1, 0, 1, 2.5)


def test_piecewise_linear_edges():
    single = PiecewiseLinear([10], [4.0])
    assert single(0) == single(1e6) == 4.0
    assert single.sum_arithmetic(0, 7, 5) == 20.0
    falling = PiecewiseLinear([0, 10], [5.0, 3.0])
    assert falling(20) == 3.0  # a falling last segment is not extended below its end
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseLinear([1, 1], [0, 0])
