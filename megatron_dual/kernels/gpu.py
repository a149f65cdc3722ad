"""What the kernels' host code asks of the GPU it launches on.

One place for it, so that ``kernels.aot`` can stand in a GPU of a given size for a CPU recording by patching a single
function (:func:`sm_count`) instead of a copy in every kernel module.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (compute units on ROCm) of a CUDA ``device``; one without an index is the current
    device, as for a tensor allocation on it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)
