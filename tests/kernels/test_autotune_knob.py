"""The attention kernels' autotuning knob: ``one`` keeps a single candidate per kernel (no benchmarking), ``full``
all that fit; switchable at run time for tuning keys not seen yet (``benchmarks/gpu_validate.py`` uses both)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
K = pytest.importorskip("megatron_dual.kernels.attention")


def _candidates() -> list:
    shapes = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def test_one_keeps_the_first_fitting_candidate_and_full_keeps_all():
    previous = K.set_autotune("one")
    try:
        assert K._prune(_candidates(), {"HEAD_DIM": 64}) == _candidates()[:1]
        assert [c.kwargs for c in K._prune(_candidates(), {"HEAD_DIM": 256})] == [{"BLOCK_M": 64, "BLOCK_N": 64}]
        assert K.set_autotune("full") == "one"
        assert K._prune(_candidates(), {"HEAD_DIM": 64}) == _candidates()
        assert len(K._prune(_candidates(), {"HEAD_DIM": 256})) == 1  # only (64, 64) fits D = 256
    finally:
        K.set_autotune(previous)
    with pytest.raises(ValueError, match="autotune mode"):
        K.set_autotune("fast")


@pytest.mark.parametrize("arch", ["sm80", "sm90", "gfx90a"])
@pytest.mark.parametrize("kind", ["fwd", "bwd_kv", "bwd_q"])
def test_each_arch_tunes_from_its_own_list(monkeypatch, arch, kind):
    """From the union of every arch's candidates, the pruner keeps the device's list in its order (mode ``one``: its
    first entry); each list has tiles that fit D = 256."""
    shapes = K.ARCH_SHAPES[arch][kind]
    union = [K._config(x) for x in dict.fromkeys(x for a in K.ARCH_SHAPES for x in K.ARCH_SHAPES[a][kind])]
    monkeypatch.setattr(K, "device_arch", lambda device: arch)
    args = {"Q": K.torch.zeros(1), "HEAD_DIM": 64}
    previous = K.set_autotune("full")
    try:
        assert [K._shape(c) for c in K._prune(union, args, kind=kind)] == shapes
        assert all(
            max(m, n) <= 64 for m, n, _, _ in map(K._shape, K._prune(union, {**args, "HEAD_DIM": 256}, kind=kind))
        )
        K.set_autotune("one")
        assert [K._shape(c) for c in K._prune(union, args, kind=kind)] == shapes[:1]
    finally:
        K.set_autotune(previous)
    if arch != "gfx90a" and kind != "fwd":  # on CUDA the smallest backward tile pipelines deeper than the largest
        by_size = sorted(shapes, key=lambda x: x[0] * x[1])
        assert by_size[0][3] > by_size[-1][3] >= 2


def test_device_arch_and_key_on_cpu():
    assert K.device_arch(K.torch.device("cpu")) == "interpret" and K._device_key(K.torch.device("cpu")) == 0
