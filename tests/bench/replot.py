"""What the benchmarks' replot tests share: a saved run redrawn from a copy."""

from __future__ import annotations

import shutil
from pathlib import Path


def assert_replots(saved: Path, main, tmp_path: Path) -> None:
    """``main(["--replot", copy])`` on a copy of ``saved`` draws a PNG beside the copy."""
    copy = tmp_path / saved.name
    shutil.copy(saved, copy)
    main(["--replot", str(copy)])
    assert copy.with_suffix(".png").stat().st_size > 10_000
