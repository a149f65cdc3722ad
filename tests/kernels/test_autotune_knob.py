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
