"""Compile the project's Triton kernels ahead of time for a GPU this machine lacks, specialised as the JIT would.

When a kernel is launched, Triton's JIT marks each pointer whose address is a multiple of 16 bytes and each integer
argument that is a multiple of 16 as divisible by 16 (on ROCm also pointers into buffers under 2 GB), and turns an
integer equal to 1 (and None) into a constant. Those marks decide whether loads are vectorised and whether the
software pipeliner multi-buffers them (cp.async / TMA on NVIDIA): a bare ``ASTSource`` signature without them lowers
a kernel with synchronous scalar loads and a third of the shared memory, not the one a GPU runs.

:func:`record_launches` runs the host code on CPU tensors with the kernels replaced by recorders (nothing is
launched), :func:`specialize` turns a recorded launch into the JIT's signature, constants and attributes for a
target, :func:`compile_launch` compiles it with a block configuration, and :func:`resources` reads what the compiler
reports: registers, spills (local memory / scratch), shared memory, pipelined loads and tensor-core instructions.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import native_specialize_impl

# The targets the project builds for: Hopper (H100/H200, Triton compiles sm_90a), Ampere (A100) and CDNA2 (MI250X)
TARGETS: dict[str, GPUTarget] = {
    "sm90": GPUTarget("cuda", 90, 32),
    "sm80": GPUTarget("cuda", 80, 32),
    "gfx90a": GPUTarget("hip", "gfx90a", 64),
}
# Shared memory (LDS) one program may use: 227 KB on H100, 163 KB on A100, 64 KB on MI250X
SHARED_LIMIT = {"sm90": 232448, "sm80": 166912, "gfx90a": 65536}


@dataclass
class Launch:
    """One recorded launch: the kernel (a ``JITFunction`` or an ``Autotuner`` around one) and its arguments."""

    name: str
    kernel: Any
    args: tuple
    kwargs: dict

    def options(self) -> dict[str, Any]:
        """The launch options among the keyword arguments (``num_warps``, ``num_stages``, ...): not parameters."""
        names = set(jit_function(self.kernel).arg_names)
        return {k: v for k, v in self.kwargs.items() if k not in names}


@dataclass
class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` appends a :class:`Launch` instead of launching."""

    name: str
    kernel: Any
    launches: list[Launch]

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append(Launch(self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def record_launches(module: ModuleType, names: list[str]) -> Iterator[list[Launch]]:
    """Replace ``module.<name>`` for each kernel name by a recorder while the block runs; yields the launches in
    call order (filled as the host code runs). Outputs the kernels would write stay uninitialised."""
    launches: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(n, k, launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def jit_function(kernel: Any) -> Any:
    """The ``JITFunction`` under an ``Autotuner`` (or heuristics) wrapper."""
    while not hasattr(kernel, "arg_names") or not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


@dataclass
class Specialized:
    """What ``triton.compile`` takes for one launch: signature types, constants and attributes by argument."""

    fn: Any
    signature: dict[str, str]
    constants: dict[str, Any]
    attrs: dict[tuple[int, ...], list]

    def with_constants(self, **extra: Any) -> Specialized:
        sig = {a: ("constexpr" if a in extra else t) for a, t in self.signature.items()}
        return Specialized(self.fn, sig, {**self.constants, **extra}, self.attrs)


def specialize(launch: Launch, target: GPUTarget) -> Specialized:
    """The JIT's specialisation of ``launch`` for ``target``'s backend: each argument's type, the divisibility
    (and on ROCm pointer-range) attributes, and constants (constexpr parameters, integers equal to 1, None).
    Constexpr parameters the launch leaves to an autotuner config (block sizes) are left out: give them with
    :meth:`Specialized.with_constants`."""
    fn = jit_function(launch.kernel)
    backend = make_backend(target)
    names = fn.arg_names
    bound = dict(zip(names, launch.args, strict=False)) | launch.kwargs
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, param) in enumerate(zip(names, fn.params, strict=True)):
        if name not in bound:
            signature[name] = "constexpr"
            continue
        value = bound[name]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(type(backend), value, False, True, True)
        if kind == "constexpr":
            signature[name], constants[name] = "constexpr", key
            continue
        signature[name] = kind
        if key:
            attrs[(i,)] = backend.parse_attr(key)
    return Specialized(fn, signature, constants, attrs)


def compile_launch(spec: Specialized, target: GPUTarget, num_warps: int, num_stages: int) -> Any:
    """``triton.compile`` of a specialised launch for ``target`` (block sizes already among its constants)."""
    missing = [a for a, t in spec.signature.items() if t == "constexpr" and a not in spec.constants]
    if missing:
        raise ValueError(f"{spec.fn.__name__}: no value for constexpr parameter(s) {', '.join(missing)}")
    src = ASTSource(spec.fn, spec.signature, spec.constants, spec.attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cubin_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from the cuobjdump that Triton carries."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _amdgcn_usage(asm: str) -> dict[str, int]:
    def first(pattern: str) -> int:
        m = re.search(pattern, asm)
        return int(m.group(1)) if m else 0

    return {
        "vgpr": first(r";\s*NumVgprs:\s*(\d+)"),
        "agpr": first(r";\s*NumAgprs:\s*(\d+)"),
        "scratch": first(r";\s*ScratchSize:\s*(\d+)"),
        "vgpr_spill": first(r"\.vgpr_spill_count:\s*(\d+)"),
        "sgpr_spill": first(r"\.sgpr_spill_count:\s*(\d+)"),
        "occupancy": first(r";\s*Occupancy:\s*(\d+)"),
    }


_ASYNC_LOAD = r"ttg\.async_copy_global_to_local|async_tma_copy_global_to_local"  # cp.async / TMA into shared


def resources(compiled: Any, target: GPUTarget) -> dict[str, Any]:
    """What the compiler reports for one compiled kernel. On CUDA: ``registers`` per thread, ``spill_bytes``
    (local memory per thread: register spills), ``shared`` bytes, ``pipelined_loads`` (asynchronous copies to
    shared memory in the TTGIR: cp.async or TMA; 0 means every tile load waits on global memory),
    ``tma_loads``, and the tensor-core instructions in the PTX (``wgmma``: Hopper's warpgroup MMA, ``mma``:
    the older per-warp mma.sync). On ROCm: VGPRs, AGPRs, scratch (spills), occupancy, LDS and MFMA count."""
    ttgir = compiled.asm.get("ttgir", "")
    row: dict[str, Any] = {"shared": int(compiled.metadata.shared)}
    if target.backend == "cuda":
        usage = _cubin_usage(compiled.asm["cubin"])
        ptx = compiled.asm.get("ptx", "")
        row |= {
            "registers": usage.get("reg", 0),
            "spill_bytes": usage.get("local", 0),
            "pipelined_loads": len(re.findall(_ASYNC_LOAD, ttgir)),
            "tma_loads": ttgir.count("async_tma_copy_global_to_local"),
            "wgmma": ptx.count("wgmma.mma_async"),
            "mma": ptx.count("mma.sync"),
        }
    else:
        usage = _amdgcn_usage(compiled.asm.get("amdgcn", ""))
        row |= usage | {"spill_bytes": usage["scratch"], "mfma": compiled.asm.get("amdgcn", "").count("v_mfma")}
    return row


def attention_launches(
    mask: str, t: int = 2048, heads: tuple[int, int] = (16, 16), head_dim: int = 64, dtype: str = "bfloat16"
) -> dict[str, Launch]:
    """The forward, dQ and dK/dV launches of one attention layer as the model makes them, recorded on CPU tensors
    (nothing runs): q, k and v are views of the packed qkv projection (1, t, (Hq + 2 Hkv) * D), the gradients views
    of one packed buffer, dO a view of the output projection's gradient. ``mask``: causal, bidirectional or prefix,
    with ``-docs`` for document ids (documents of 700 positions; the values change nothing the JIT specialises).
    Defaults: dual-470m (2048 positions, 16 + 16 heads of 64, bf16). One sequence: the batch size changes no
    stride the JIT specialises on. Keyed by kernel name."""
    import torch

    from megatron_dual.kernels import attention as K

    hq, hkv = heads
    kind = mask.removesuffix("-docs")
    docs = torch.arange(t).unsqueeze(0) // 700 if mask.endswith("-docs") else None
    prefix = torch.tensor([t // 3]) if kind == "prefix" else None
    meta = K._Meta(kind, docs, prefix, 0, t, t, 1, torch.device("cpu"), None)

    def split(buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        packed = buf.view(1, t, hq + 2 * hkv, head_dim)
        return tuple(x.transpose(1, 2) for x in packed.split([hq, hkv, hkv], dim=2))

    qkv = torch.zeros(1, t, (hq + 2 * hkv) * head_dim, dtype=getattr(torch, dtype))
    dqkv = torch.empty_like(qkv)
    do = torch.zeros(1, t, hq * head_dim, dtype=qkv.dtype).view(1, t, hq, head_dim).transpose(1, 2)
    scale = head_dim**-0.5
    with record_launches(K, ["_fwd_kernel", "_bwd_q_kernel", "_bwd_kv_kernel"]) as launches:
        o, lse = K._forward(*split(qkv), meta, scale)
        K._backward(do, *split(qkv), o, lse, meta, scale, grads=split(dqkv))
    return {launch.name: launch for launch in launches}
