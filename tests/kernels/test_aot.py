"""Ahead-of-time compilation as the JIT specialises (``megatron_dual/kernels/aot.py``) and the compiler report
(``benchmarks/kernel_report.py``). Compiling runs in a subprocess: the kernels must be imported without
``TRITON_INTERPRET``, which the test session sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SPECIALIZE = r"""
import json
import torch
import triton
import triton.language as tl
from megatron_dual.kernels import aot


@triton.jit
def probe(X, Y, n, stride, one, scale, MODE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i * stride * one, tl.load(X + i, mask=i < n) * scale, mask=i < n)


class Host:
    probe = probe


x = torch.zeros(64, dtype=torch.bfloat16)
with aot.record_launches(Host, ["probe"]) as launches:
    Host.probe[(1,)](x, x[1:], 48, 7, 1, 0.5, MODE=2, num_warps=2)
out = {}
for name, target in aot.TARGETS.items():
    spec = aot.specialize(launches[0], target)
    out[name] = {"sig": spec.signature, "consts": {k: v for k, v in spec.constants.items()},
                 "attrs": {str(k[0]): v for k, v in spec.attrs.items()}, "options": launches[0].options()}
print(json.dumps(out))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_specialize_matches_the_jit_rules(tmp_path):
    """Pointers at 16-byte-aligned addresses and integers that are multiples of 16 get divisibility 16 (ROCm: also
    the 2 GB pointer range), an integer equal to 1 becomes a constant, constexprs stay constants, launch options
    (num_warps) are kept apart, and block sizes left to a config stay open."""
    script = tmp_path / "specialize.py"  # a file: @triton.jit reads its function's source
    script.write_text(SPECIALIZE)
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    cuda = out["sm90"]
    assert cuda["sig"] == {
        "X": "*bf16", "Y": "*bf16", "n": "i32", "stride": "i32", "one": "constexpr", "scale": "fp32",
        "MODE": "constexpr", "BLOCK": "constexpr",
    }  # fmt: skip
    assert cuda["consts"] == {"one": 1, "MODE": 2}
    div = [["tt.divisibility", 16]]
    assert cuda["attrs"] == {"0": div, "2": div}  # x aligned, x[1:] (2 bytes in) not; n = 48, stride = 7 not
    assert cuda["options"] == {"num_warps": 2}
    assert out["sm80"]["attrs"] == cuda["attrs"]
    amd = out["gfx90a"]["attrs"]
    assert amd["0"] == [*div, ["tt.pointer_range", 32]] and amd["1"] == [["tt.pointer_range", 32]]


@pytest.mark.slow
def test_report_first_configs_compile_pipelined_without_spills(tmp_path):
    """The report compiles the three attention kernels' first sm90 configs (what autotune mode "one" runs on an
    H100) as the dual-470m causal document launch is specialised: every one uses wgmma, multi-buffers its tile
    loads, spills nothing and fits in shared memory; with TMA descriptors each loads its streamed tiles through TMA."""
    out = tmp_path / "report.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--arch", "sm90", "--masks", "causal-docs"]
    cmd += ["--first", "--jobs", "1", "--out", str(out), "--check"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["kernel"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"fwd", "fwd_tma", "bwd_q", "bwd_q_tma", "bwd_kv", "bwd_kv_tma"}
    for row in rows.values():
        assert row["flags"] == [] and row["spill_bytes"] == 0 and 0 < row["shared"] <= 232448
        assert row["wgmma"] > 0 and row["mma"] == 0 and row["pipelined_buffers"] > 0 and 0 < row["registers"] <= 255
    for name in ("fwd", "bwd_q", "bwd_kv"):
        assert rows[name + "_tma"]["tma_loads"] > 0 and rows[name]["tma_loads"] == 0
    shas = [row["code_sha"] for row in rows.values()]  # machine code fingerprints: six different kernels
    assert len(set(shas)) == 6 and all(len(x) == 16 and int(x, 16) >= 0 for x in shas)
    assert "bwd_kv_tma" in r.stdout and "0 flagged or failed" in r.stdout


@pytest.mark.slow
def test_report_fused_kernels(tmp_path):
    """``--kernels`` takes fused kernels by name: one row per kernel and arch, compiled from the recorded dual-470m
    launch with its block sizes and warps and the backend's default stages; vectorised loads, no spills."""
    out = tmp_path / "report.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--arch", "sm90,gfx90a"]
    cmd += ["--kernels", "rmsnorm_bwd,ce_grad", "--jobs", "1", "--out", str(out), "--check"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {(row["arch"], row["kernel"]): row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == [(a, k) for a in ("sm90", "gfx90a") for k in ("rmsnorm_bwd", "ce_grad")]
    for (arch, _), row in rows.items():
        assert row["group"] == "fused" and row["flags"] == [] and row["spill_bytes"] == 0
        assert 0 < row["vec_loads"] <= row["loads"] and row["stages"] == (3 if arch == "sm90" else 2)
    assert rows[("sm90", "rmsnorm_bwd")]["blocks"] == {"BLOCK": 1024} and rows[("sm90", "rmsnorm_bwd")]["warps"] == 4
    assert rows[("sm90", "ce_grad")]["blocks"] == {"BLOCK_R": 8, "BLOCK_V": 512}  # the GPU tile, not the interpreter's
    assert "sm90 fused:" in r.stdout and "gfx90a fused:" in r.stdout and "0 flagged or failed" in r.stdout
    assert len({row["code_sha"] for row in rows.values()}) == 4  # a cubin's and an hsaco's .text fingerprinted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_binaries_match_the_ahead_of_time_compile():
    """On a GPU: the binaries the JIT builds for the dual-470m causal document launch (each kernel's first config)
    spill nothing and have the registers and shared memory that the ahead-of-time compile of the same launch,
    recorded and specialised by ``aot``, reports; and a launch recorded on CPU tensors is specialised as the one on
    the GPU (but for the device key, an autotuning key the kernels do not read): what the CPU report compiles is what
    the GPU runs."""
    import megatron_dual.kernels.attention as K
    from megatron_dual.kernels import aot

    arch = K.device_arch(torch.device("cuda"))
    if arch not in aot.TARGETS:
        pytest.skip(f"no ahead-of-time target for {arch}")
    previous = K.set_autotune("one")
    try:
        aot.attention_step("causal-docs", device="cuda")
    finally:
        K.set_autotune(previous)
    target = aot.TARGETS[arch]
    on_gpu = aot.attention_launches("causal-docs", device="cuda")
    on_cpu = aot.attention_launches("causal-docs")
    for name, kind in (("_fwd_kernel", "fwd"), ("_bwd_q_kernel", "bwd_q"), ("_bwd_kv_kernel", "bwd_kv")):
        bm, bn, warps, stages = K.ARCH_SHAPES[arch][kind][0]
        this = {"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": 64, "MASK_KIND": 1, "HAS_DOCS": True, "USE_TMA": False}
        this |= {"warps": warps, "stages": stages}
        built = [r for r in aot.compiled_binaries(getattr(K, name)) if all(r.get(k) == v for k, v in this.items())]
        assert len(built) == 1 and built[0]["spill_bytes"] == 0, (name, built)
        spec = aot.specialize(on_gpu[name], target)
        cpu_spec = aot.specialize(on_cpu[name], target)
        key = spec.fn.arg_names.index("DEVICE_KEY")
        assert {k: v for k, v in spec.attrs.items() if k != (key,)} == {
            k: v for k, v in cpu_spec.attrs.items() if k != (key,)
        }
        ahead = aot.resources(aot.compile_attention(spec, target, (bm, bn, warps, stages)), target)
        assert built[0]["shared"] == ahead["shared"], name
        if target.backend == "cuda":  # (ROCm: the driver's count is not the VGPR count the report reads)
            assert built[0]["registers"] == ahead["registers"], name


STAGES = r"""
import json
from megatron_dual.kernels import aot

t = aot.TARGETS["sm90"]
spec = aot.specialize(aot.attention_launches("causal-docs")["_fwd_kernel"], t)
out = {}
for stages in (1, 3):
    for tma in (False, True):
        r = aot.resources(aot.compile_attention(spec, t, (128, 64, 4, stages), tma), t)
        out[f"{stages}{'tma' if tma else ''}"] = [r["pipelined_buffers"], r["tma_loads"]]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_pipelined_buffers_tell_pipelined_from_synchronous_loads(tmp_path):
    """`pipelined_buffers` counts the pipeliner's staged tile buffers, not copy instructions: one stage (no
    pipelining) gives 0 with plain loads and with TMA copies alike, three stages give buffers for both."""
    script = tmp_path / "stages.py"
    script.write_text(STAGES)
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["1"] == [0, 0] and out["1tma"][0] == 0 and out["1tma"][1] > 0
    assert out["3"][0] > 0 and out["3tma"][0] > 0 and out["3tma"][1] > out["1tma"][1]


BINDER = r"""
import json
import torch
import triton
import triton.language as tl
from triton.compiler import make_backend
from triton.runtime import jit as J
from megatron_dual.kernels import aot


@triton.jit(do_not_specialize=["t16"])
def probe(X, Y, n, flag, f, none, t16, scale, MODE: tl.constexpr, B: tl.constexpr = 32):
    pass


class Host:
    probe = probe


def triton_binder(launch, target, extra):
    fn = aot.jit_function(launch.kernel)
    backend = make_backend(target)
    binder = J.create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs) | extra
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return sig, consts, attrs


def by_index(fn, consts):
    return {str((fn.arg_names.index(k),) if isinstance(k, str) else k): repr(v) for k, v in consts.items()}


try:
    J.create_function_from_signature, aot.jit_function(probe)._pack_args
except AttributeError as e:
    print(json.dumps({"skip": f"Triton's binder internals changed: {e}"}))
    raise SystemExit(0)
launches = {}
for mask in ("causal-docs", "prefix"):
    for name, launch in aot.attention_launches(mask, t=256, heads=(4, 2)).items():
        launches[f"{mask}:{name}"] = (launch, {"BLOCK_M": 64, "BLOCK_N": 64})
for name, launch in aot.fused_launches("bfloat16").items():
    launches[name] = (launch, {})
x = torch.zeros(64)
with aot.record_launches(Host, ["probe"]) as recorded:
    Host.probe[(1,)](x, x[1:], 1, True, 1.0, None, 16, 0.5, MODE=2)
launches["probe"] = (recorded[0], {})
diff = []
for arch, target in aot.TARGETS.items():
    for key, (launch, extra) in launches.items():
        fn = aot.jit_function(launch.kernel)
        ours = aot.specialize(launch, target)
        ours = ours.with_constants(**extra) if extra else ours
        sig, consts, attrs = triton_binder(launch, target, extra)
        a = (ours.signature, by_index(fn, ours.constants), {str(k): v for k, v in ours.attrs.items() if v})
        b = (sig, by_index(fn, consts), {str(k): v for k, v in attrs.items() if v})
        if a != b:
            diff.append(f"{arch} {key}: ours {a} / triton {b}")
print(json.dumps({"compared": len(launches) * len(aot.TARGETS), "diff": diff}))
"""


@pytest.mark.slow
def test_specialize_equals_triton_s_own_binder(tmp_path):
    """`aot.specialize` gives exactly what Triton's JIT binder computes at a launch (signature, constants,
    attributes) for every recorded attention and fused launch and a probe of the corner cases (a 1, a bool, a float,
    None, an unaligned pointer, a constexpr default, do_not_specialize), on sm90, sm80 and gfx90a. Skipped where
    Triton's internals (`create_function_from_signature`, `_pack_args`) are not there to compare with."""
    script = tmp_path / "binder.py"
    script.write_text(BINDER)
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["diff"] == [] and out["compared"] >= 3 * 17
