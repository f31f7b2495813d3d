"""A real ``python -m engine.serve`` subprocess per test module (dummy:tiny on the CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
# A small context keeps every slab (and so every reference-op step) small.
BASE_FLAGS = ["--model", "dummy:tiny", "--max-model-len", "256", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@contextmanager
def running_server(tmp_dir: Path, *flags: str, module: str = "engine.serve",
                   base_flags: list[str] = BASE_FLAGS, startup_timeout_s: float = STARTUP_TIMEOUT_S):
    """Start the server, wait for /health (hard timeout), always stop it afterwards."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    # One intra-op thread: the reference ops on a tiny model are far slower with two threads
    # competing for two cores with the HTTP process (and other test processes).
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    with open(log_path, "wb") as log_file:
        command = [sys.executable, "-m", module, "--port", str(port), *base_flags, *flags]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode} while starting:\n{server.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy within {startup_timeout_s} s:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The value of one unlabelled sample of /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"{name} not in /metrics")


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def assert_error_body(response: httpx.Response, status: int,
                      type_: str = "invalid_request_error") -> dict:
    """The response has ``status`` and exactly OpenAI's error body; returns ``body["error"]``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and isinstance(error["message"], str) and error["message"]
    return error
