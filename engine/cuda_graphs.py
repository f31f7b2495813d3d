"""Decode steps recorded as CUDA graphs, one per (batch size, slab capacity, sampling kind).

A decode step is dozens of small kernel launches; at small batch sizes launching them costs
more than running them. A graph records the whole step once and replays it with one launch.
Replays read and write the same addresses as the capture: the runner's static input buffers
and the slab, which always starts at the KV arena's first slot.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Hashable

import torch

log = logging.getLogger("bindecode.engine")


class DecodeGraphs:
    """Captured decode steps keyed by shape; all graphs share one memory pool.

    Only one batch runs at a time, so graphs never replay concurrently and sharing the pool
    keeps their intermediate tensors (the logits, above all) from multiplying.
    """

    def __init__(self, device: torch.device, warmup_runs: int = 2):
        self.device = device
        self.warmup_runs = warmup_runs
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.capture_seconds = 0.0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, key: Hashable, step: Callable[[], None]) -> None:
        """Run ``step`` a few times on a side stream (Triton compiles, allocator warms up),
        then record it. The caller makes the runs harmless (every row dead)."""
        start = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        torch.cuda.synchronize(self.device)
        self._graphs[key] = graph
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        free_after, _ = torch.cuda.mem_get_info(self.device)
        log.info("captured decode graph %s in %.2f s, %.1f MiB of GPU memory", key, seconds,
                 (free_before - free_after) / 2**20)

    def replay(self, key: Hashable) -> None:
        self._graphs[key].replay()
