"""Bad start-up input ends ``python -m engine.serve`` with one line that says what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.serve", "--model", "dummy:tiny", *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, code, message", [
    (["--port", "99999"], 2, "port number in 0-65535"),
    (["--kv-cache-gb", "inf"], 2, "kv_cache_gb must be a finite number"),
    (["--max-model-len", "100000", "--port", "0"], 1,
     "max_model_len 100000 exceeds the model's max_position_embeddings"),
])
def test_bad_start_up_input_is_one_clear_error(flags, code, message):
    done = _serve(*flags)
    assert done.returncode == code, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
