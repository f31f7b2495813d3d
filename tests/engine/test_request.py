import math

import pytest

from engine.request import EngineRequest, RequestOutput, SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"n": 0}, "n"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": 7}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"repetition_penalty": True}, "repetition_penalty"),
])
def test_validate_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate()


@pytest.mark.parametrize("kwargs", [
    {},
    {"temperature": 0.0},
    {"top_k": 0},
    {"top_k": -1},
    {"top_k": 1},
    {"top_p": 1.0},
    {"top_p": 1e-6},
    {"seed": 2**63 - 1},
    {"seed": -(2**63)},
    {"stop": ["a", "bc"], "stop_token_ids": [0, 5]},
    {"n": 4, "max_tokens": 1},
    {"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1e-3},
])
def test_validate_accepts_edge_values(kwargs):
    SamplingParams(**kwargs).validate()


def test_single_stop_string_is_normalised_to_a_list():
    params = SamplingParams(stop="###")
    assert params.stop == ["###"]
    params.stop = "END"  # set after construction: validate normalises too
    params.validate()
    assert params.stop == ["END"]
    params = SamplingParams(stop=None, stop_token_ids=None)
    assert params.stop == [] and params.stop_token_ids == []


def test_defaults_are_not_shared_between_instances():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams().greedy


def test_engine_request_validation():
    ok = EngineRequest("r1", [1, 2, 3], SamplingParams())
    ok.validate(vocab_size=10)
    with pytest.raises(ValueError, match="empty"):
        EngineRequest("r2", [], SamplingParams()).validate()
    with pytest.raises(ValueError, match="outside"):
        EngineRequest("r3", [1, 10], SamplingParams()).validate(vocab_size=10)
    with pytest.raises(ValueError, match="max_tokens"):
        EngineRequest("r4", [1], SamplingParams(max_tokens=0)).validate()
    with pytest.raises(ValueError, match="target_len"):
        EngineRequest("r5", [1], SamplingParams(), target_len=0).validate()


def test_request_output_latencies():
    out = RequestOutput("r", [1], [2, 3], "hi", "length", None, arrival_time=10.0,
                        first_token_time=10.25, finish_time=11.5)
    assert out.ttft == pytest.approx(0.25)
    assert out.e2e == pytest.approx(1.5)
    pending = RequestOutput("r", [1], [], "", None, None, 1.0, None, None)
    assert pending.ttft is None and pending.e2e is None
