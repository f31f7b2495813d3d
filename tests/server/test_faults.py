"""Engine faults seen through the server: a failing batch (500 before the first token, an SSE
error event after), and an engine process that dies (pending requests fail, /health and new
requests get 503, nothing hangs, SIGTERM still exits 0)."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.server.conftest import assert_error_body, metric, running_server
from tests.server.faulty_engine import CRASH_ID, FAIL_DECODE_ID, FAIL_PREFILL_ID

MODEL = "dummy:tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Continuous mode: a new request is prefilled into the running batch, which lets the crash
    # test kill the engine while another request is streaming.
    with running_server(tmp_path_factory.mktemp("faults"), "--mode", "continuous", "--batch-size", "4",
                        "--max-wait-ms", "5", module="tests.server.faulty_engine") as s:
        yield s


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, **body}, timeout=60)


def sse_events(response: httpx.Response) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in response.iter_lines() if line.startswith("data: ")]


def test_batch_failure_before_first_token_is_500(server):
    for stream in (False, True):
        r = post(server, {"prompt": [FAIL_PREFILL_ID, 1, 2], "max_tokens": 5, "stream": stream})
        error = assert_error_body(r, 500, "server_error")
        assert "injected prefill fault" in error["message"]


def test_batch_failure_after_first_tokens_is_sse_error_event(server):
    body = {"model": MODEL, "prompt": [FAIL_DECODE_ID, 1, 2], "max_tokens": 20, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
    tokens = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in chunks)
    assert tokens == 2
    assert "injected decode fault" in events[-2]["error"]["message"] and events[-1] == "[DONE]"


def test_server_keeps_serving_after_batch_failures(server):
    r = post(server, {"prompt": "fine", "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    assert metric(server.url, "bindecode_engine_alive") == 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_engine_death_fails_pending_and_refuses_new(server):
    body = {"model": MODEL, "prompt": "victim", "max_tokens": 240, "ignore_eos": True, "stream": True}
    crash: list[httpx.Response] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as victim:
        lines = victim.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        crash_request = lambda: crash.append(post(server, {"prompt": [CRASH_ID], "max_tokens": 4}))
        killer = threading.Thread(target=crash_request)
        killer.start()
        rest = [line for line in lines if line.startswith("data: ")]
        killer.join(timeout=60)
    assert rest[-1] == "data: [DONE]" and "engine failed" in json.loads(rest[-2][6:])["error"]["message"]
    assert assert_error_body(crash[0], 500, "server_error")["code"] == "engine_failed"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    error = assert_error_body(post(server, {"prompt": "after", "max_tokens": 2}), 503, "server_error")
    assert error["code"] == "engine_unavailable"
    assert metric(server.url, "bindecode_engine_alive") == 0


def test_sigterm_with_dead_engine_exits_0(server):
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
