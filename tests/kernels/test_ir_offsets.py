"""The int64 offset check of ``ir_offsets`` on a small kernel compiled ahead of time (it can fail), and the host-side
bounds checks that keep the kernels' int32 in-tile offsets in range."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ir_offsets import narrow_base_offsets

import megatron_dual.kernels.attention as K
from megatron_dual.kernels.rotary import apply_rotary

PROBE = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def probe(X, Y, s, n, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + pid * s + offs, mask=offs < n)  # a base offset from the program id
    for i in range(0, n):  # and one through a loop-carried value
        x += tl.load(X + (pid + i) * s + offs)
    tl.store(Y + n + offs, x, mask=offs < n)  # not from a program id: fine in i32

sig = {"X": "*fp32", "Y": "*fp32", "s": "i32", "n": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}
for wide in (False, True):
    done = triton.compile(ASTSource(probe, sig, {"WIDE": wide, "BLOCK": 64}), target=GPUTarget("cuda", 90, 32))
    print(done.asm["ttir"])
    print("=====")
"""


def test_narrow_base_offsets_flags_int32_program_id_offsets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "probe.py"  # @triton.jit wants its source in a file
    script.write_text(PROBE)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    narrow, wide = r.stdout.split("=====")[:2]
    bad = narrow_base_offsets(narrow)
    assert len(bad) == 2 and all(line.endswith("i32") for line in bad), bad
    assert narrow_base_offsets(wide) == []


def test_attention_rejects_sequences_past_int32_tile_offsets():
    """A (B, H, T, D) view of packed qkv memory whose one sequence spans > 2^31 elements is refused (the kernels'
    in-tile offsets are int32); one that fits passes (its batch offsets are int64 in the kernels)."""
    hd, heads = 128, 48  # 32 + 2 x 8 heads of 128: T stride 6144
    fits, over = (2**31 - 1) // (heads * hd), (2**31 - 1) // (heads * hd) + 2
    for t, ok in ((fits, True), (over, False)):
        x = torch.empty_strided((64, 32, t, hd), (t * heads * hd, hd, heads * hd, 1), device="meta")
        if ok:
            assert K._strides(x) == (t * heads * hd, hd, heads * hd)  # 63 x that batch stride is far past 2^31
        else:
            with pytest.raises(ValueError, match="2\\^31"):
                K._strides(x)


def test_rotary_rejects_heads_past_int32_offsets():
    t, h, d = 4, 1024, 64
    cos = torch.empty((t, d), device="meta")
    x = torch.empty_strided((1, h, t, d), (0, 2**22, d, 1), device="meta")  # (B, H, T, D), huge head stride
    with pytest.raises(ValueError, match="2\\^31"):
        apply_rotary(x, cos, cos)
