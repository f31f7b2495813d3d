"""What the kernels need to know about the GPU they launch on (cached per device)."""

from __future__ import annotations

import functools
import os

import torch

H100_NUM_SMS = 132
# BINDECODE_PDL=0 turns programmatic dependent launches off everywhere (to measure what they
# give); read once, so no launch pays for the lookup.
_PDL_ENABLED = os.environ.get("BINDECODE_PDL") != "0"


@functools.lru_cache(maxsize=None)
def _cuda_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def device_properties(device: torch.device):
    """The CUDA properties of ``device`` (cached), or None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_properties(device.index if device.index is not None
                            else torch.cuda.current_device())


def has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA GPUs from Hopper (sm_90) on; not the interpreter,
    nor with ``BINDECODE_PDL=0`` in the environment."""
    props = device_properties(device)
    return _PDL_ENABLED and props is not None and props.major >= 9


def sm_count(device: torch.device) -> int:
    """SMs of the GPU; without one (the interpreter) the H100's, so configs match the GPU's."""
    props = device_properties(device)
    return H100_NUM_SMS if props is None else props.multi_processor_count
