"""The HTTP process's modules load without torch: it serves requests, the engine process runs
the model (the default-model choice, which asks torch for a GPU, is the one exception)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_server_modules_do_not_import_torch():
    code = ("import sys\n"
            "import engine.api_server, engine.serve, engine.tokenizer, engine.seeds\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(loaded[:5])\n"
            "sys.exit(1 if loaded else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"torch modules loaded: {done.stdout}{done.stderr[-2000:]}"
