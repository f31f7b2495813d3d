"""bench.blas_dependent_launch: the products it checks (no GPU), and on the GPU that its
harness tells a consumer that waits for the previous grid from one that does not."""

from __future__ import annotations

import pytest
import torch

from bench.blas_dependent_launch import check, copy_consumer, layer_products


def test_layer_products_are_the_decode_layers_products():
    assert layer_products("dummy:llama-3.2-1b") == [
        ("qkv", 3072, 2048, False), ("output", 2048, 2048, True),
        ("gate_up", 16384, 2048, False), ("down", 2048, 8192, True)]
    assert layer_products("dummy:llama-3.1-8b") == [
        ("qkv", 6144, 4096, False), ("output", 4096, 4096, True),
        ("gate_up", 28672, 4096, False), ("down", 4096, 14336, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m, k", [(64, 2048), (3, 1000)])
def test_harness_tells_a_waiting_consumer_from_one_that_reads_early(m, k):
    early = check(copy_consumer(wait=False), m, k, k, None, spin_us=30, replays=3)
    waits = check(copy_consumer(wait=True), m, k, k, None, spin_us=30, replays=3)
    assert early["kernel"] == waits["kernel"] == "_copy_kernel"
    assert early["captured"]["wrong_replays"] == 0  # an ordinary edge orders them
    assert early["programmatic"]["wrong_replays"] == 3  # reads x before the producer wrote it
    assert waits["captured"]["wrong_replays"] == waits["programmatic"]["wrong_replays"] == 0
