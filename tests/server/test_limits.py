"""API key, a full queue (429, never a hang) and graceful shutdown on SIGTERM.

The server runs the real EngineCore through ``tests.server.faulty_engine``, whose SLOW_ID
prompt makes decode steps slow enough to outlast the shutdown drain."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import assert_error_body, metric, running_server, wait_until
from tests.server.faulty_engine import SLOW_DECODE_S, SLOW_ID

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-under-test"  # --served-model-name
SHUTDOWN_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("limits"), "--api-key", KEY, "--max-queue", "2",
                        "--served-model-name", MODEL,
                        "--batch-size", "2", "--max-wait-ms", "500",
                        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
                        module="tests.server.faulty_engine") as s:
        yield s


def completion(server, headers=None, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, **fields}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers or {}, timeout=60)


def test_api_key_required_except_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        assert assert_error_body(completion(server, headers), 401)["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{server.url}{path}", headers=headers, timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert completion(server, AUTH).status_code == 200
    assert httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=10).status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert completion(server, AUTH, model="dummy:tiny").status_code == 404  # not the served name
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="a", max_tokens=2)
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_group_larger_than_queue_is_400_and_leaves_nothing_behind(server):
    # 400, not 429: retrying (as OpenAI clients do on 429) could never succeed.
    start = time.monotonic()
    error = assert_error_body(completion(server, AUTH, n=3), 400)
    assert "exceed the server's --max-queue 2" in error["message"]
    assert time.monotonic() - start < 10
    assert wait_until(lambda: metric(server.url, "bindecode_requests_in_flight", AUTH) == 0)
    assert wait_until(lambda: metric(server.url, "bindecode_queue_depth_total", AUTH) == 0)
    assert completion(server, AUTH, ignore_eos=True).json()["usage"]["completion_tokens"] == 3


def test_burst_beyond_queue_gets_429_at_once(server):
    async def one(http):
        start = time.monotonic()
        r = await http.post(f"{server.url}/v1/completions", headers=AUTH, json={
            "model": MODEL, "prompt": "q", "max_tokens": 100, "ignore_eos": True})
        return r, time.monotonic() - start

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http) for _ in range(8)))

    results = asyncio.run(burst())
    refused = [(r, t) for r, t in results if r.status_code == 429]
    served = [r for r, _ in results if r.status_code == 200]
    assert len(refused) + len(served) == 8 and refused and served
    assert all(assert_error_body(r, 429, "rate_limit_error")["code"] == "queue_full" for r, _ in refused)
    # Refusals come back before any accepted request has finished, not after a wait.
    assert max(t for _, t in refused) < min(t for r, t in results if r.status_code == 200)
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in served)


def _read_stream(http: httpx.Client, url: str, body: dict, first_chunk: threading.Event,
                 into: list) -> None:
    with http.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                into.append(line[6:])
                first_chunk.set()


def test_sigterm_drains_then_cuts_off_and_exits_0(server):
    """After SIGTERM a stream that can finish in the drain time does; one that cannot ends with
    an SSE error event; the process exits 0 within the shutdown timeout."""
    common = {"model": MODEL, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    short = {**common, "prompt": "bye", "max_tokens": 20}                  # ~20 slow steps: ~2 s
    long = {**common, "prompt": [SLOW_ID, 1, 2], "max_tokens": 240}       # ~24 s of slow steps
    assert 20 * SLOW_DECODE_S < 0.5 * SHUTDOWN_TIMEOUT_S < 240 * SLOW_DECODE_S
    short_lines, long_lines = [], []
    started = [threading.Event(), threading.Event()]
    with httpx.Client(timeout=60) as http:
        jobs = ((long, started[0], long_lines), (short, started[1], short_lines))
        threads = [threading.Thread(target=_read_stream, args=(http, server.url, *job)) for job in jobs]
        for t in threads:  # together, so that they share one batch (B=2)
            t.start()
        assert started[0].wait(30) and started[1].wait(30)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=SHUTDOWN_TIMEOUT_S + 5)
    assert short_lines[-1] == "[DONE]" and json.loads(short_lines[-2])["usage"]["completion_tokens"] == 20
    assert long_lines[-1] == "[DONE]"
    assert "shutting down" in json.loads(long_lines[-2])["error"]["message"]
    try:
        refused = httpx.get(f"{server.url}/health", timeout=5).status_code == 503
    except httpx.TransportError:
        refused = True  # the listening socket is already closed
    assert refused
    assert server.process.wait(timeout=SHUTDOWN_TIMEOUT_S + 5) == 0
    assert time.monotonic() - start < SHUTDOWN_TIMEOUT_S + 5
