"""Request parsing and validation of the OpenAI-compatible API (no server, no engine)."""

import json

import pytest

from engine.api_protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_model_name,
                                 check_token_ids, parse_request, resolve_max_tokens)


def completion(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def refused(model_class, body: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(model_class, body)
    assert info.value.status == 400
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    return info.value


def test_defaults_and_prompt_shapes():
    req = parse_request(CompletionRequest, completion())
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.n, req.stop) == \
        (["hi"], 16, 1.0, 1.0, 1, [])
    assert parse_request(CompletionRequest, completion(prompt=["a", "b"])).prompt == ["a", "b"]
    assert parse_request(CompletionRequest, completion(prompt=[5, 6, 7])).prompt == [[5, 6, 7]]
    assert parse_request(CompletionRequest, completion(prompt=[[1], [2, 3]])).prompt == [[1], [2, 3]]
    assert parse_request(CompletionRequest, completion(stop="x")).stop == ["x"]
    assert parse_request(CompletionRequest, completion(temperature=0)).temperature == 0.0


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 10 ** 30}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": True}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": 3}, "logprobs"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": 2 ** 64}, "seed"),
    ({"top_k": -2}, "top_k"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_bad_fields_are_named(fields, param):
    err = refused(CompletionRequest, completion(**fields))
    assert err.param == param, err.message
    assert param in err.message


def test_missing_model_and_bad_json():
    assert refused(CompletionRequest, b'{"prompt": "x"}').param == "model"
    assert "not valid JSON" in refused(CompletionRequest, b'{"model": ').message
    assert "JSON object" in refused(CompletionRequest, b'[1, 2]').message
    nan = b'{"model": "m", "prompt": "x", "temperature": NaN}'
    assert refused(CompletionRequest, nan).param == "temperature"


def test_penalties_in_range_accepted_outside_refused():
    req = parse_request(CompletionRequest, completion(presence_penalty=0.5, frequency_penalty=-2,
                                                      repetition_penalty=1.2))
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty) == (0.5, -2, 1.2)
    assert refused(CompletionRequest, completion(presence_penalty=2.5)).param == "presence_penalty"
    assert refused(CompletionRequest, completion(frequency_penalty=-3)).param == "frequency_penalty"
    assert refused(CompletionRequest, completion(repetition_penalty=0)).param == "repetition_penalty"
    assert refused(ChatCompletionRequest, chat(repetition_penalty="1")).param == "repetition_penalty"


def test_unsupported_fields_refused_with_reason():
    assert "logit_bias" in refused(CompletionRequest, completion(logit_bias={"1": 5})).message
    usage_without_stream = completion(stream_options={"include_usage": True})
    assert "stream_options" in refused(CompletionRequest, usage_without_stream).message
    assert "echo" in refused(CompletionRequest, completion(echo=True)).message


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_chat_fields():
    req = parse_request(ChatCompletionRequest,
                        chat(max_completion_tokens=7, logprobs=True, top_logprobs=0))
    assert req.max_new_tokens == 7 and req.logprobs
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts = chat(messages=[{"role": "user", "content": content}])
    assert parse_request(ChatCompletionRequest, parts).chat_messages() == \
        [{"role": "user", "content": "ab"}]
    assert refused(ChatCompletionRequest, chat(messages=[])).param == "messages"
    wizard = chat(messages=[{"role": "wizard", "content": "x"}])
    assert refused(ChatCompletionRequest, wizard).param.startswith("messages")
    assert refused(ChatCompletionRequest, chat(logprobs=1)).param == "logprobs"
    assert refused(ChatCompletionRequest, chat(logprobs=True, top_logprobs=2)).param == "top_logprobs"
    assert "top_logprobs requires" in refused(ChatCompletionRequest, chat(top_logprobs=0)).message
    two_caps = chat(max_tokens=3, max_completion_tokens=4)
    assert "max_completion_tokens" in refused(ChatCompletionRequest, two_caps).message


def test_context_length_checks():
    assert resolve_max_tokens(10, 20, 100) == 10
    assert resolve_max_tokens(None, 20, 100) == 80
    assert resolve_max_tokens(80, 20, 100) == 80
    with pytest.raises(APIError, match="over the model's maximum context length of 100") as info:
        resolve_max_tokens(81, 20, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(APIError, match="leaving no room"):
        resolve_max_tokens(None, 100, 100)
    assert resolve_max_tokens(None, 20, 100, max_output_len=30) == 30
    with pytest.raises(APIError, match="limit of 30 new tokens") as info:
        resolve_max_tokens(31, 20, 100, max_output_len=30)
    assert info.value.param == "max_tokens"
    with pytest.raises(APIError, match="outside the vocabulary"):
        check_token_ids([1, 512], 512)
    check_token_ids([0, 511], 512)
    with pytest.raises(APIError) as info:
        check_model_name("other", "dummy:tiny")
    assert info.value.code == "model_not_found" and info.value.status == 404


def test_coalesce_merges_updates_of_one_request_in_order():
    from engine.api_server import _coalesce
    from engine.request import TokenUpdate

    a1 = TokenUpdate("a", [1], [-0.1])
    b1 = TokenUpdate("b", [7], None)
    a2 = TokenUpdate("a", [2, 3], [-0.2, -0.3], finished=True, finish_reason="length")
    after = TokenUpdate("a", [9], [-0.9])  # after a finished update: kept apart
    marker = object()
    out = _coalesce([a1, b1, marker, a2, after])
    assert [type(e) for e in out] == [TokenUpdate, TokenUpdate, object, TokenUpdate]
    assert (out[0].new_token_ids, out[0].new_logprobs, out[0].finished, out[0].finish_reason) == \
        ([1, 2, 3], [-0.1, -0.2, -0.3], True, "length")
    assert out[1] == b1 and out[3].new_token_ids == [9]
    assert a1.new_token_ids == [1]  # the inputs are not modified
