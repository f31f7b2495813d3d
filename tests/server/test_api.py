"""The OpenAI-compatible routes end to end: the real ``openai`` client, raw httpx for bad input,
64 concurrent streams, and a client that disconnects mid-stream."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import assert_error_body, metric, running_server, wait_until

MODEL = "dummy:tiny"
MAX_BODY = 65536


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("api"), "--allow-target-len", "--batch-size", "16",
                        "--max-wait-ms", "5", "--max-body-bytes", str(MAX_BODY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


# ---------------------------------------------------------------- openai client

def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 256


def test_completion_counts_usage_and_shape(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=7,
                                    extra_body={"ignore_eos": True})
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.created > 0
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 7, 12)


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt=[10, 20, 30, 40], max_tokens=9, temperature=0.0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)


def test_chat_non_stream_and_stream(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                         temperature=0.0, extra_body={"ignore_eos": True})
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_n_choices_differ_and_are_indexed(client):
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=8, seed=7,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 32 and out.usage.prompt_tokens == 4
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] != by_index[1]  # choice seeds are distinct


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=5, logprobs=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
    assert all(v <= 0.0 for v in lp.token_logprobs) and len(set(lp.token_logprobs)) > 1
    # Streamed offsets are the whole response's, also where text was held back (the dummy
    # model's bytes often end inside a UTF-8 character).
    greedy = dict(model=MODEL, prompt="hello", max_tokens=12, temperature=0.0, logprobs=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**greedy).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **greedy)
              if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert [o for c in chunks for o in c.text_offset] == whole.text_offset
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=5, logprobs=True, top_logprobs=0,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(c.logprob <= 0.0 and c.top_logprobs == [] for c in content)


def test_seed_determinism(client):
    run = lambda seed: client.completions.create(model=MODEL, prompt="seed", max_tokens=12, seed=seed,
                                                 temperature=1.0, extra_body={"ignore_eos": True}
                                                 ).choices[0].text
    first = run(1234)
    assert run(1234) == first
    assert run(99) != first


def test_penalties_reach_the_engine(client):
    run = lambda **penalties: client.completions.create(
        model=MODEL, prompt="penalties", max_tokens=24, temperature=0.0,
        extra_body={"ignore_eos": True, **penalties.pop("extra", {})}, **penalties
    ).choices[0].text
    plain = run()
    penalised = run(frequency_penalty=2.0, presence_penalty=1.0, extra={"repetition_penalty": 2.0})
    assert penalised != plain
    assert run(frequency_penalty=2.0, presence_penalty=1.0,
               extra={"repetition_penalty": 2.0}) == penalised
    assert run(extra={"repetition_penalty": 2.0}) != plain
    assert run(frequency_penalty=2.0) != plain


def test_stop_string_cuts_text_and_frees_row(client, server):
    kwargs = dict(model=MODEL, prompt="stop test", max_tokens=40, temperature=0.0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[:full.find(stop)]
    cut = client.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert wait_until(lambda: metric(server.url, "bindecode_running_requests") == 0)


def test_target_len_stops_generation(client):
    out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=50,
                                    extra_body={"ignore_eos": True, "target_len": 6})
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"


def test_predicted_tokens_and_top_k_accepted(client):
    out = client.completions.create(model=MODEL, prompt="k", max_tokens=4,
                                    extra_body={"ignore_eos": True, "top_k": 5, "predicted_tokens": 4})
    assert out.usage.completion_tokens == 4


# ---------------------------------------------------------------- bad input (raw httpx)

GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": "4"}, "max_tokens"),
    ({"max_tokens": 10 ** 9}, "max_tokens"),
    ({"max_tokens": 255}, "max_tokens"),          # 2 prompt tokens + 255 > 256
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": "two"}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 600]}, "prompt"),             # outside the 512-token vocabulary
    ({"prompt": "x" * 300}, "prompt"),            # the prompt alone fills the context
    ({"stop": 5}, "stop"),
    ({"target_len": 0}, "target_len"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_bad_completion_input_is_400(server, change, param):
    error = assert_error_body(post(server, "/v1/completions", {**GOOD, **change}), 400)
    assert error["param"] == param, error


def test_unknown_model_is_404(server):
    error = assert_error_body(post(server, "/v1/completions", {**GOOD, "model": "gpt-4"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_invalid_json_and_wrong_body_type(server):
    for raw in (b'{"model": "dummy:tiny", "prompt": ', b"[1, 2]", b"", b"\xff\xfe"):
        r = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=30,
                       headers={"content-type": "application/json"})
        assert_error_body(r, 400)


def test_bad_chat_input_is_400(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for change in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                   {"max_completion_tokens": 0}, {"temperature": -0.5}, {"logprobs": 2},
                   {"max_tokens": 1000}):
        assert_error_body(post(server, "/v1/chat/completions", {**chat, **change}), 400)


def test_oversized_body_is_413(server):
    big = {**GOOD, "prompt": "x" * (MAX_BODY + 10)}
    error = assert_error_body(post(server, "/v1/completions", big), 413)
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced on the streamed bytes
        yield b'{"model": "dummy:tiny", "prompt": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    assert_error_body(r, 413)


def test_unknown_route_is_openai_shaped_404(server):
    assert_error_body(httpx.get(f"{server.url}/v1/nothing", timeout=10), 404)


# ---------------------------------------------------------------- load and disconnects

async def _stream_one(http: httpx.AsyncClient, url: str, i: int) -> tuple[int, int, str | None]:
    body = {"model": MODEL, "prompt": [(7 * i + j) % 256 for j in range(3 + i % 5)], "max_tokens": 8,
            "ignore_eos": True, "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    tokens, usage, done = 0, None, False
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    tokens += len(chunk["choices"][0]["logprobs"]["tokens"])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
    return tokens, usage, done


def test_64_concurrent_streams_all_complete(server):
    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(_stream_one(http, server.url, i) for i in range(64)))

    results = asyncio.run(main())
    assert results == [(8, 8, True)] * 64
    assert wait_until(lambda: metric(server.url, "bindecode_requests_in_flight") == 0)


def _settled(url: str, name: str, quiet_s: float = 1.0) -> float:
    """The metric's value once it has not changed for ``quiet_s`` (the engine's stats arrive
    a few times a second)."""
    value = metric(url, name)
    while True:
        time.sleep(quiet_s)
        now = metric(url, name)
        if now == value:
            return value
        value = now


def test_disconnect_mid_stream_frees_the_row(server):
    engine_tokens = "bindecode_engine_generated_tokens_total"
    before = _settled(server.url, engine_tokens)
    body = {"model": MODEL, "prompt": "long", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data: "))
        # Leaving the block closes the connection after the first chunk.
    assert wait_until(lambda: metric(server.url, "bindecode_requests_in_flight") == 0)
    # Had the request not been aborted, the engine would have generated all 240 tokens.
    assert _settled(server.url, engine_tokens) - before < 240
    assert metric(server.url, "bindecode_running_requests") == 0
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    out = post(server, "/v1/completions", {**GOOD, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4


def test_metrics_exposition(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("bindecode_queue_depth{bin=\"0\"}", "bindecode_batches_formed_total{bin=\"0\"}",
                 "bindecode_batch_occupancy", "bindecode_padding_waste", "bindecode_overflows_total",
                 "bindecode_generation_tokens_per_second", "bindecode_time_to_first_token_seconds_bucket",
                 "bindecode_time_per_output_token_seconds_bucket",
                 "bindecode_e2e_request_latency_seconds_bucket"):
        assert name in text, name
    assert metric(server.url, "bindecode_time_to_first_token_seconds_count") > 64
    assert metric(server.url, "bindecode_engine_alive") == 1
