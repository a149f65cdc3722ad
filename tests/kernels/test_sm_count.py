"""``kernels.gpu``: the one place the kernels' host code reads the GPU's size from."""

from types import SimpleNamespace

import torch

from megatron_dual.kernels import gpu


def test_sm_count_reads_the_indexed_device_and_the_current_one_without_index(monkeypatch):
    asked: list[int] = []

    def properties(index: int) -> SimpleNamespace:
        asked.append(index)
        return SimpleNamespace(multi_processor_count=100 + index)

    monkeypatch.setattr(gpu, "_multiprocessors", gpu._multiprocessors.__wrapped__)  # no cache across tests
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gpu.sm_count(torch.device("cuda", 1)) == 101
    assert gpu.sm_count(torch.device("cuda")) == 103  # not device 0: the current device, as an allocation would
    assert asked == [1, 3]
