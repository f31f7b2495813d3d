"""The one-launch chain's trace summary (``bench.persistent_trace``) on a made-up trace whose
boundaries and waits are known."""

import numpy as np
import pytest

from bench.persistent_trace import (CLOCK, DONE, FENCED, FIRST_X, RELEASED, SEEN, START, STORED,
                                    W_FULL, W_WAIT, X_WAIT, by_product, summarise)


def made_up_trace():
    """Two programs, one layer; program 1 has no output tile. Product p's tiles arrive at
    10 µs * p + 1 µs (+ 0.2 µs for program 1), finish 6 µs later, are stored 0.1 µs, fenced
    0.3 µs and released 0.5 µs after that; the next product's counter is seen 0.8 µs after the
    last release. SM clock 2 GHz."""
    trace = np.zeros((2, 1, 4, 16), dtype=np.int64)
    for pid in range(2):
        for p in range(4):
            row = trace[pid, 0, p]
            row[START] = 10_000 * p + pid * 100
            row[CLOCK] = 2 * row[START] + 5_000_000 * pid  # SMs' counters disagree
            if not (pid == 1 and p == 1):
                row[FIRST_X] = 10_000 * p + 1_000 + 200 * pid
                row[DONE] = row[FIRST_X] + 6_000
                row[STORED], row[FENCED] = row[DONE] + 100, row[DONE] + 300
                row[W_WAIT], row[X_WAIT], row[W_FULL] = 2_000 * (p + 1), 4_000, 6_000
            row[RELEASED] = 10_000 * p + 7_500 + 200 * pid
            row[SEEN] = 10_000 * (p - 1) + 7_700 + 800 if p else 0
    return trace


def test_boundaries_and_waits():
    s = summarise(made_up_trace())
    assert s["sm_clock_ghz"] == pytest.approx(2.0)
    assert s["kernel_us"] == pytest.approx(37.7)
    qkv_to_out = s["boundaries"][0]
    assert (qkv_to_out["product"], qkv_to_out["next"]) == ("qkv", "output")
    assert qkv_to_out["release_skew_us"] == pytest.approx(0.1)  # 7.7 against the median 7.6
    assert qkv_to_out["notify_us"] == pytest.approx(0.8)
    # Only program 0 has an output tile: its first tile at 11.0, the counter seen at 8.5.
    assert qkv_to_out["first_tile_us"] == pytest.approx(2.5)
    assert qkv_to_out["handover_us"] == pytest.approx(3.3)
    out, gate_up = s["products"][1], s["products"][2]
    assert out["programs"] == 1 and gate_up["programs"] == 2
    assert gate_up["mma_us"] == pytest.approx(6.0)
    assert (gate_up["store_us"], gate_up["fence_us"], gate_up["release_us"]) == pytest.approx(
        (0.1, 0.2, 0.2))
    assert gate_up["mma_wait_weights_us"] == pytest.approx(3.0)  # 6000 cycles at 2 GHz
    assert gate_up["mma_wait_activations_us"] == pytest.approx(2.0)
    assert gate_up["loader_ring_full_us"] == pytest.approx(3.0)
    means = by_product([s, s])
    assert means["qkv"]["handover_us"] == pytest.approx(3.3)
    assert means["down"]["mma_wait_weights_us"] == pytest.approx(4.0)
    assert "handover_us" not in means["down"]  # the last product: no boundary after it
