"""The server on a GPU with its default model, and the serving benchmark's plumbing."""

from __future__ import annotations

import json
import signal

import openai
import pytest

from tests.server.conftest import running_server

pytestmark = pytest.mark.gpu


def test_default_model_serves_on_gpu(tmp_path):
    # No --model: on a GPU the server picks dummy:llama-3.2-1b.
    with running_server(tmp_path, "--log-level", "warning", base_flags=[],
                        startup_timeout_s=600) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        assert model.id == "dummy:llama-3.2-1b"
        out = client.completions.create(model=model.id, prompt=[1, 2, 3] * 100, max_tokens=64,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 64
        chunks = list(client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=32, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == 32
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0


def test_bench_serve_against_offline(tmp_path):
    from bench.serve import main

    out = tmp_path / "serve_bench"
    code = main(["--launch-server", "--model", "dummy:llama-3.2-1b", "--batch-size", "16", "--bins", "4",
                 "--num-requests", "64", "--lengths", "uniform:1:128", "--compare-offline",
                 "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert code == 0 and result["http"]["failed"] == 0 and result["http"]["wrong_length"] == 0
    assert result["offline"]["wrong_length"] == 0 and result["server_exit_code"] == 0
    assert out.with_suffix(".png").exists()
