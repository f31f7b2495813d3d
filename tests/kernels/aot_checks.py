"""What every AOT compile test checks: each launch compiles for the H100 (sm_90) without
register spills and within a block's shared memory; the table of registers and shared memory
is printed (pytest -s)."""

from __future__ import annotations

from dataclasses import asdict

from kernels.aot import CompileJob, compile_many

BLOCK_SHARED_BYTES = 227 * 1024  # the most shared memory sm_90 gives a block


def compile_and_check(launches: list[dict], jobs: list[CompileJob],
                      labels: tuple[str, ...] = ("dtype",)) -> list[dict]:
    """Compile ``jobs`` (one per launch: a dict with ``meta``, the constexprs and launch
    options, and the ``labels`` columns), print one row per launch, assert no spills and at
    most BLOCK_SHARED_BYTES of shared memory; returns launch + report dicts."""
    reports = [{**launch, **asdict(report)}
               for launch, report in zip(launches, compile_many(jobs))]
    print("\n" + "".join(f"{label:<10}" for label in labels)
          + f"{'constexprs':<100}{'warps':>6}{'stages':>7}{'regs':>6}{'smem KB':>9}{'spill B':>8}")
    for r in sorted(reports, key=lambda r: ([str(r[label]) for label in labels],
                                            sorted(r["meta"].items()))):
        meta = dict(r["meta"])
        warps, stages = meta.pop("num_warps", "-"), meta.pop("num_stages", "-")
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items())
        print("".join(f"{str(r[label]):<10}" for label in labels)
              + f"{consts:<100}{warps:>6}{stages:>7}{r['registers']:>6}"
              f"{r['shared_bytes'] / 1024:>9.1f}{r['spill_stores'] + r['spill_loads']:>8}")
    spilling = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"register spills: {spilling}"
    assert all(r["shared_bytes"] <= BLOCK_SHARED_BYTES for r in reports)
    return reports
