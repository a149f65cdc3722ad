"""Compile the project's Triton kernels ahead of time for a GPU this machine lacks, specialised as the JIT would.

When a kernel is launched, Triton's JIT marks each pointer whose address is a multiple of 16 bytes and each integer
argument that is a multiple of 16 as divisible by 16 (on ROCm also pointers into buffers under 2 GB), and turns an
integer equal to 1 (and None) into a constant. Those marks decide whether loads are vectorised and whether the
software pipeliner multi-buffers them (cp.async / TMA on NVIDIA): a bare ``ASTSource`` signature without them lowers
a kernel with synchronous scalar loads and a third of the shared memory, not the one a GPU runs.

:func:`record_launches` runs the host code on CPU tensors with the kernels replaced by recorders (nothing is
launched), :func:`specialize` turns a recorded launch into the JIT's signature, constants and attributes for a
target, :func:`compile_launch` compiles it with a block configuration, and :func:`resources` reads what the compiler
reports: registers, spills (local memory / scratch), shared memory, pipelined loads and tensor-core instructions;
:func:`memory_ops` counts global loads and stores and how many are vectorised. :func:`attention_launches` and
:func:`fused_launches` record the attention kernels' and the fused kernels' (RMSNorm, rotary, SwiGLU,
cross-entropy) launches as the model makes them.
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
from unittest import mock

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
    with _patched({(module, n): _Recorder(n, getattr(module, n), launches) for n in names}):
        yield launches


@contextlib.contextmanager
def _patched(values: dict[tuple[Any, str], Any]) -> Iterator[None]:
    """``setattr(obj, name, value)`` for each ``(obj, name): value`` while the block runs, restored after it."""
    with contextlib.ExitStack() as stack:
        for (obj, name), value in values.items():
            stack.enter_context(mock.patch.object(obj, name, value))
        yield


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
        if name not in bound and param.has_default:
            bound[name] = param.default
        if name not in bound:  # left to an autotuner config (block sizes): see Specialized.with_constants
            signature[name] = "constexpr"
            continue
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", bound[name]
            continue
        kind, key = _specialize_value(backend, param, name, bound[name])
        if kind == "constexpr":
            signature[name], constants[name] = "constexpr", key
            continue
        signature[name] = kind
        if key:
            attrs[(i,)] = backend.parse_attr(key)
    return Specialized(fn, signature, constants, attrs)


def _specialize_value(backend: Any, param: Any, name: str, value: Any) -> tuple[str, Any]:
    """(type, specialisation key) of one runtime argument, by the JIT's binder's rules (``const`` pointers,
    ``do_not_specialize``, alignment, annotated types; annotated floats and bools are never specialised)."""
    if isinstance(value, tuple):
        raise ValueError(f"{name}: tuple arguments are not supported by aot.specialize")
    specialize = not param.do_not_specialize
    align = not getattr(param, "do_not_specialize_on_alignment", False)
    kind, key = native_specialize_impl(type(backend), value, param.is_const, specialize, align)
    annotation = param.annotation_type
    if isinstance(annotation, str) and annotation:
        plain = annotation == "u1" or annotation[:2] in ("fp", "bf") or not specialize
        return annotation, (None if plain else key)
    return kind, key


def compile_launch(spec: Specialized, target: GPUTarget, num_warps: int, num_stages: int | None = None) -> Any:
    """``triton.compile`` of a specialised launch for ``target`` (block sizes already among its constants);
    ``num_stages`` None: the backend's default, as for a launch that gives none (3 on CUDA, 2 on ROCm)."""
    missing = [a for a, t in spec.signature.items() if t == "constexpr" and a not in spec.constants]
    if missing:
        raise ValueError(f"{spec.fn.__name__}: no value for constexpr parameter(s) {', '.join(missing)}")
    src = ASTSource(spec.fn, spec.signature, spec.constants, spec.attrs)
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    return triton.compile(src, target=target, options=options)


def compile_attention(
    spec: Specialized, target: GPUTarget, config: tuple[int, int, int, int], tma: bool = False
) -> Any:
    """:func:`compile_launch` of a specialised attention launch (forward, dQ or dK/dV) with one autotune candidate
    ``config`` = (BLOCK_M, BLOCK_N, warps, stages), its streamed tiles through TMA descriptors or not (``tma``)."""
    bm, bn, warps, stages = config
    return compile_launch(spec.with_constants(BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma), target, warps, stages)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cubin_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from the cuobjdump that Triton carries."""
    tool = _cuobjdump()
    if not os.path.exists(tool):
        raise RuntimeError(f"cuobjdump not found at {tool} (Triton's NVIDIA backend carries it): cannot read registers")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{tool} -res-usage exited with {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}")
    out = r.stdout
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


def _elf_text(binary: bytes) -> bytes:
    """The bytes of every ``.text*`` section of an ELF64 binary (a cubin or an hsaco): the machine code, without the
    debug sections whose line numbers move whenever the source does."""
    shoff = int.from_bytes(binary[0x28:0x30], "little")
    shentsize, shnum, shstrndx = (int.from_bytes(binary[o : o + 2], "little") for o in (0x3A, 0x3C, 0x3E))

    def section(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        h = binary[shoff + i * shentsize : shoff + (i + 1) * shentsize]
        return int.from_bytes(h[0:4], "little"), int.from_bytes(h[24:32], "little"), int.from_bytes(h[32:40], "little")

    _, names_at, _ = section(shstrndx)
    out = b""
    for i in range(shnum):
        name_off, at, size = section(i)
        name = binary[names_at + name_off : binary.index(b"\0", names_at + name_off)]
        if name.startswith(b".text"):
            out += name + b"\0" + binary[at : at + size]
    return out


def code_sha(compiled: Any, target: GPUTarget) -> str:
    """A fingerprint (16 hex digits of sha256) of the compiled kernel's machine code alone: equal before and after a
    change to a kernel's source means the GPU runs the same instructions (a pure refactor), whatever moved in the
    debug information."""
    import hashlib

    binary = compiled.asm["cubin" if target.backend == "cuda" else "hsaco"]
    return hashlib.sha256(_elf_text(binary)).hexdigest()[:16]


# A shared-memory tile buffer with a leading stage dimension (``!ttg.memdesc<3x64x64xbf16 ...>``; 1 deep at
# num_stages=2 on sm80, which still issues the next tile's copy before this one's use): the software pipeliner's,
# into which cp.async or TMA copies run ahead of their use. An unpipelined load (even a TMA one) gets a plain
# (BLOCK, D) buffer.
_STAGED_BUFFER = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x")


def resources(compiled: Any, target: GPUTarget) -> dict[str, Any]:
    """What the compiler reports for one compiled kernel. On CUDA: ``registers`` per thread, ``spill_bytes``
    (local memory per thread: register spills), ``shared`` bytes, ``pipelined_buffers`` (tile buffers with a stage
    dimension: loads the software pipeliner issues ahead of their use; 0 means every tile load waits on global
    memory), ``tma_loads``
    (TMA copies in the TTGIR), and the tensor-core instructions in the PTX (``wgmma``: Hopper's warpgroup MMA, ``mma``:
    the older per-warp mma.sync). On ROCm: VGPRs, AGPRs, scratch (spills), SGPRs spilled into VGPR lanes, occupancy,
    LDS and MFMA count. Both: ``code_sha``, the machine code's fingerprint (:func:`code_sha`)."""
    ttgir = compiled.asm.get("ttgir", "")
    row: dict[str, Any] = {"shared": int(compiled.metadata.shared), "code_sha": code_sha(compiled, target)}
    if target.backend == "cuda":
        usage = _cubin_usage(compiled.asm["cubin"])
        ptx = compiled.asm.get("ptx", "")
        row |= {
            "registers": usage.get("reg", 0),
            "spill_bytes": usage.get("local", 0),
            "pipelined_buffers": len(_STAGED_BUFFER.findall(ttgir)),
            "tma_loads": ttgir.count("async_tma_copy_global_to_local"),
            "wgmma": ptx.count("wgmma.mma_async"),
            "mma": ptx.count("mma.sync"),
        }
    else:
        usage = _amdgcn_usage(compiled.asm.get("amdgcn", ""))
        row |= usage | {"spill_bytes": usage["scratch"], "mfma": compiled.asm.get("amdgcn", "").count("v_mfma")}
    return row


# Global-memory loads and stores in the PTX (``ld.global.v4.b32``: a 16-byte vector) and in the AMDGCN
# (``buffer_load_dwordx4``, ``global_store_dword``, ...); on AMD dwordx2 and wider count as vectors.
_PTX_MEMORY = r"\b(ld|st)\.global\.[\w:.]+"
_GCN_MEMORY = r"\b(?:global|buffer)_(load|store)_(\w+)"


def memory_ops(compiled: Any, target: GPUTarget) -> dict[str, int]:
    """Global loads and stores in the compiled code (instructions, not executions), and how many of them move a
    vector per thread (``.v2``/``.v4`` in the PTX; ``dwordx2`` and wider in the AMDGCN): a streaming kernel whose
    row loads are not vectorised was compiled without the alignment its launch gives (or cannot use it)."""
    out = {"loads": 0, "vec_loads": 0, "stores": 0, "vec_stores": 0}
    if target.backend == "cuda":
        for m in re.finditer(_PTX_MEMORY, compiled.asm.get("ptx", "")):
            kind = "loads" if m.group(1) == "ld" else "stores"
            out[kind] += 1
            out["vec_" + kind] += bool(re.search(r"\.v[248]\.", m.group(0)))
    else:
        for op, width in re.findall(_GCN_MEMORY, compiled.asm.get("amdgcn", "")):
            out[op + "s"] += 1
            out["vec_" + op + "s"] += bool(re.fullmatch(r"dwordx[234]", width))
    return out


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters): a compiler error as one report field."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def compiled_binaries(kernel: Any) -> list[dict[str, Any]]:
    """Every binary Triton's JIT built for ``kernel`` in this process, with what the loaded binary reports: registers
    per thread and spilled bytes (read by the driver when the binary is loaded), shared memory, warps, stages and the
    constexpr arguments (block sizes, mask kind, ...). The GPU's counterpart of :func:`resources`, to hold the
    ahead-of-time figures against; empty under the interpreter."""
    if triton.knobs.runtime.interpret:
        return []
    fn = jit_function(kernel)
    rows = []
    for cache in list(getattr(fn, "device_caches", {}).values()):
        for compiled in list(cache[0].values()):
            rows.append(_binary_row(fn, compiled))
    return rows


def _binary_row(fn: Any, compiled: Any) -> dict[str, Any]:
    consts = getattr(compiled.src, "constants", {})
    named = {fn.arg_names[k[0]]: v for k, v in consts.items() if isinstance(k, tuple) and len(k) == 1}
    row = {"kernel": fn.__name__, "shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps}
    row |= {"stages": compiled.metadata.num_stages}
    row |= {k: v for k, v in named.items() if k.isupper() and isinstance(v, (bool, int, str))}
    try:  # loads the binary if no launch has yet (n_regs / n_spills come from it)
        compiled._init_handles()
    except Exception as e:  # noqa: BLE001 (a config autotuning tried that does not fit: OutOfResources)
        return row | {"error": error_line(e)}
    return row | {"registers": compiled.n_regs, "spill_bytes": compiled.n_spills}


def attention_launches(
    mask: str,
    t: int = 2048,
    heads: tuple[int, int] = (16, 16),
    head_dim: int = 64,
    dtype: str = "bfloat16",
    device: str = "cpu",
) -> dict[str, Launch]:
    """The forward, dQ and dK/dV launches of one attention layer as the model makes them, recorded (nothing runs):
    see :func:`attention_step`. Keyed by kernel name."""
    from megatron_dual.kernels import attention as K

    with record_launches(K, ["_fwd_kernel", "_bwd_q_kernel", "_bwd_kv_kernel"]) as launches:
        attention_step(mask, t, heads, head_dim, dtype, device)
    return {launch.name: launch for launch in launches}


def attention_step(
    mask: str,
    t: int = 2048,
    heads: tuple[int, int] = (16, 16),
    head_dim: int = 64,
    dtype: str = "bfloat16",
    device: str = "cpu",
) -> None:
    """Forward and backward of one attention layer on tensors laid out as the model lays them out: q, k and v are
    views of the packed qkv projection (1, t, (Hq + 2 Hkv) * D), the gradients views of one packed buffer, dO a view
    of the output projection's gradient. ``mask``: causal, bidirectional or prefix, with ``-docs`` for document ids
    (documents of 700 positions; the values change nothing the JIT specialises). Defaults: dual-470m (2048
    positions, 16 + 16 heads of 64, bf16). One sequence: the batch size changes no stride the JIT specialises on."""
    import torch

    from megatron_dual.kernels import attention as K

    hq, hkv = heads
    kind = mask.removesuffix("-docs")
    docs = torch.arange(t, device=device).unsqueeze(0) // 700 if mask.endswith("-docs") else None
    prefix = torch.tensor([t // 3], device=device) if kind == "prefix" else None
    meta = K._Meta(kind, docs, prefix, 0, t, t, 1, torch.device(device), None)

    def split(buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        packed = buf.view(1, t, hq + 2 * hkv, head_dim)
        return tuple(x.transpose(1, 2) for x in packed.split([hq, hkv, hkv], dim=2))

    g = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(1, t, (hq + 2 * hkv) * head_dim, generator=g, device=device).to(getattr(torch, dtype))
    dqkv = torch.empty_like(qkv)
    do = torch.randn(1, t, hq * head_dim, generator=g, device=device).to(qkv.dtype)
    do = do.view(1, t, hq, head_dim).transpose(1, 2)
    scale = head_dim**-0.5
    o, lse = K._forward(*split(qkv), meta, scale)
    K._backward(do, *split(qkv), o, lse, meta, scale, grads=split(dqkv))


FUSED_KERNELS: dict[str, tuple[str, ...]] = {
    "rmsnorm": ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"),
    "rotary": ("_rotary_kernel",),
    "swiglu": ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"),
    "cross_entropy": ("_ce_stats_kernel", "_ce_grad_kernel"),
}
# a kernel's constexpr switches that make another kernel of it, and the suffix its key in fused_launches gets
VARIANTS = {"BACKWARD": "_bwd", "HAS_DELTA": "_add", "HAS_DXO": "_add"}
# Streaming multiprocessors (CUs of one MI250X GCD) the host code sizes its persistent grids by: H100/H200 SXM,
# A100, MI250X
SM_COUNT = {"sm90": 132, "sm80": 108, "gfx90a": 110}


def fused_launches(
    dtype: str = "bfloat16",
    sm_count: int | None = SM_COUNT["sm90"],
    *,
    rows: int = 16384,
    t: int = 2048,
    hidden: int = 1024,
    mlp_width: int = 3584,
    heads: tuple[int, int] = (16, 16),
    head_dim: int = 64,
    vocab: int = 51200,
    labelled: int = 64,
) -> dict[str, Launch]:
    """Every fused (non-attention) kernel's launch as the model makes it under autocast in ``dtype``, recorded on
    CPU tensors (nothing runs), keyed by kernel name and variant (:data:`VARIANTS`): the rotary kernel's inverse
    (its backward, ``BACKWARD``) is ``_rotary_kernel_bwd``, the norms with the residual add
    (``HAS_DELTA`` / ``HAS_DXO``) ``_rmsnorm_fwd_kernel_add`` and ``_rmsnorm_bwd_kernel_add``. The defaults are
    dual-470m's: hidden size 1024, the MLP executed 3584 wide (3554 padded), 16 query and 16 key/value heads of 64,
    vocabulary 51200, 2048 positions, and a micro-batch of 8 x 2048 = ``rows`` tokens.

    * RMSNorm (the first block's attention norm, the head's norm) of the fp32 residual stream, fp32 weight, output
      in ``dtype``; backward with ``dy`` in ``dtype``, writing an fp32 ``dx``.
    * add-RMSNorm: the fp32 stream plus a sublayer's output in ``dtype``, the sum in fp32, output in ``dtype``;
      backward with the fp32 residual gradient, writing the fp32 ``dx`` and the ``dd`` in ``dtype`` (``WRITE_DD``).
    * rotary as the Triton attention applies it: in place on the q and k heads of the packed qkv projection
      (1, t, (Hq + 2 Hkv) * D), inverted on the packed gradient; one sequence (the batch size changes no stride the
      JIT specialises on).
    * SwiGLU on the up projection's output (rows, 2 x ``mlp_width``), forward and backward.
    * the fused linear + cross-entropy + z-loss over ``labelled`` rows of head features in ``dtype`` against the
      fp32 output layer and bias (its gradient kernel runs in the forward). A few hundred rows keep the matmuls
      cheap: chunks of 64 rows instead of a GPU micro-batch's 4096, with the same (rows, vocabulary) contiguous
      logits, so the same strides.

    Block sizes are the GPU's: the cross-entropy picks its CUDA tiles, not the interpreter's bigger ones. Integers
    the host code derives from the device's SM count (persistent grids) are those of a GPU with ``sm_count`` SMs
    (:data:`SM_COUNT`); ``None`` leaves the CPU's 4 programs, which change two arguments: the backward norms'
    ``rows_per_program`` (4096 instead of 32 on an H100 and 38 on an A100 or MI250X: divisible by 16 unlike the
    A100's and MI250X's, which leaves their compiled code unchanged) and the cross-entropy gradient kernel's (the
    whole 64-row chunk instead of 8, and 376 on an H100 or 456 on an A100 or MI250X with 4096-row chunks: divisible
    by 16 only on the CPU, which does change its compiled code). What still differs from a GPU launch: the
    chunk's row count (64 instead of 4096, both multiples of 16) and grid sizes (not arguments)."""
    import importlib

    import torch

    mods = {m: importlib.import_module(f"megatron_dual.kernels.{m}") for m in FUSED_KERNELS}
    act = getattr(torch, dtype)
    with contextlib.ExitStack() as stack:
        recorded = [stack.enter_context(record_launches(mods[m], list(n))) for m, n in FUSED_KERNELS.items()]
        stack.enter_context(_patched(_gpu_host_choices(mods["rmsnorm"], mods["cross_entropy"], sm_count)))
        _norm_host_code(mods["rmsnorm"], rows, hidden, act)
        _rotary_host_code(mods["rotary"], t, heads, head_dim, act)
        _swiglu_host_code(mods["swiglu"], rows, mlp_width, act)
        _ce_host_code(mods["cross_entropy"], labelled, hidden, vocab, act)
    out: dict[str, Launch] = {}
    for launch in (x for launches in recorded for x in launches):
        out.setdefault(launch.name + "".join(s for k, s in VARIANTS.items() if launch.kwargs.get(k)), launch)
    return out


def _gpu_host_choices(rn: ModuleType, ce: ModuleType, sm_count: int | None) -> dict[tuple[ModuleType, str], Any]:
    """What to patch (:func:`_patched`) for the cross-entropy's GPU block sizes and, with ``sm_count``, the program
    counts of a GPU with that many SMs (the host code computes them for a CUDA device from its SM count)."""
    import torch

    from . import gpu

    cuda = torch.device("cuda", 0)  # a device object only: nothing is allocated on it
    patches: dict[tuple[ModuleType, str], Any] = {(ce, "_compiled"): lambda: True}
    if sm_count is not None:
        num_programs, row_programs = rn._num_programs, ce._row_programs
        patches[(gpu, "sm_count")] = lambda _device: sm_count
        patches[(rn, "_num_programs")] = lambda n_rows, _device: num_programs(n_rows, cuda)
        patches[(ce, "_row_programs")] = lambda n, n_vocab, _device: row_programs(n, n_vocab, cuda)
    return patches


def _norm_host_code(rn: ModuleType, rows: int, hidden: int, act: Any) -> None:
    import torch

    x = torch.empty(rows, hidden, requires_grad=True)  # the fp32 residual stream (uninitialised: nothing runs)
    w = torch.empty(hidden, requires_grad=True)
    y = rn.rms_norm(x, w, 1e-7, act)
    torch.autograd.grad(y, (x, w), torch.empty_like(y))
    d = torch.empty(rows, hidden, dtype=act, requires_grad=True)
    xo, y = rn.add_rms_norm(x, d, w, 1e-7, act)
    torch.autograd.grad((xo, y), (x, d, w), (torch.empty_like(xo), torch.empty_like(y)))


def _rotary_host_code(ro: ModuleType, t: int, heads: tuple[int, int], head_dim: int, act: Any) -> None:
    """As ``attention.FlashAttentionQKVFunction`` rotates the packed projection and its gradient."""
    import torch

    from megatron_dual.model.rope import RotaryEmbedding

    hq, hkv = heads
    cos, sin = RotaryEmbedding(head_dim, t, 160_000.0).cos_sin(torch.arange(t))
    for inverse in (False, True):
        packed = torch.empty(1, t, (hq + 2 * hkv) * head_dim, dtype=act).view(1, t, hq + 2 * hkv, head_dim)
        ro.rotate_heads_(packed[:, :, : hq + hkv], cos, sin, inverse=inverse)


def _swiglu_host_code(sw: ModuleType, rows: int, width: int, act: Any) -> None:
    import torch

    h = torch.empty(rows, 2 * width, dtype=act, requires_grad=True)
    out = sw.swiglu(h)
    torch.autograd.grad(out, h, torch.empty_like(out))


def _ce_host_code(ce: ModuleType, labelled: int, hidden: int, vocab: int, act: Any) -> None:
    """As ``loss._fused`` calls it: features in the autocast dtype, fp32 output layer, bias and token weights.
    Forward only: its gradient kernel runs there (the backward scales the gradients, no kernel)."""
    import torch

    h = torch.zeros(labelled, hidden, dtype=act, requires_grad=True)
    weight = torch.zeros(vocab, hidden, requires_grad=True)
    bias = torch.zeros(vocab, requires_grad=True)
    labels = torch.zeros(labelled, dtype=torch.long)
    with torch.autocast("cpu", dtype=act):
        ce.fused_linear_cross_entropy(h, weight, bias, labels, torch.ones(labelled), z_loss=1e-4)
