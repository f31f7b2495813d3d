"""advance_positions against the reference: live rows move one slot on, dead rows stay -1."""

from __future__ import annotations

import os

import pytest
import torch

from kernels import reference
from kernels.positions import BLOCK, advance_positions


@pytest.mark.parametrize("B", [1, 7, BLOCK, BLOCK + 3])  # one program, a full one, two
def test_live_rows_advance_and_dead_rows_stay(B):
    positions = torch.randint(0, 5000, (B,), dtype=torch.int32)
    positions[0] = 0  # a row at its first slot
    positions[2::3] = -1  # dead rows
    expected = reference.advance_positions(positions.clone())
    assert advance_positions(positions) is positions
    assert torch.equal(positions, expected)
    assert positions[0] == 1 and (positions[2::3] == -1).all()


def test_all_dead_and_empty_batches():
    dead = torch.full((5,), -1, dtype=torch.int32)
    assert torch.equal(advance_positions(dead), torch.full((5,), -1, dtype=torch.int32))
    assert advance_positions(torch.empty(0, dtype=torch.int32)).numel() == 0


def test_views_past_the_batch_are_untouched():
    """The kernel writes only the B entries of its view, not the buffer's others."""
    buffer = torch.arange(10, dtype=torch.int32)
    advance_positions(buffer[:4])
    assert buffer.tolist() == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.int64),
                                 torch.zeros(2, 2, dtype=torch.int32),
                                 torch.zeros(8, dtype=torch.int32)[::2]])
def test_bad_positions_are_refused(bad):
    with pytest.raises(ValueError, match="contiguous int32"):
        advance_positions(bad)


@pytest.mark.gpu
def test_gpu_compiled_in_a_graph():
    from triton.runtime.jit import JITFunction

    from kernels.positions import _advance_positions_kernel

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    positions = torch.tensor([-1, 0, 5, -1, 511], dtype=torch.int32, device="cuda")
    advance_positions(positions)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        advance_positions(positions)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert positions.tolist() == [-1, 4, 9, -1, 515]
    assert isinstance(_advance_positions_kernel, JITFunction)
    compiled = _advance_positions_kernel.device_caches[torch.cuda.current_device()][0]
    assert all(c.n_regs > 0 and c.n_spills == 0 for c in compiled.values())
