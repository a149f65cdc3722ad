"""First contact with a GPU: one command, stage by stage, each with its own time budget, results as they come.

    PYTHONPATH=. python benchmarks/gpu_validate.py                    # every stage, about 8 minutes on H100/H200
    PYTHONPATH=. python benchmarks/gpu_validate.py --stages attention,train_step     # a partial rerun
    python benchmarks/gpu_validate.py --smoke                         # CPU: every stage at tiny shapes (tests)

Runs from a plain checkout (no ``pip install -e``; the kernels live in ``megatron_dual/kernels``),
on a bare CUDA image with torch and Triton; flash-attn, DeepSpeed, zstandard and a network are optional and never
needed. Each stage runs in a child process: over its budget (``--budget NAME=SECONDS``) it is stopped, recorded as
``timeout`` and the next stage starts; inside, a stage also skips its remaining measurements once its deadline is
near. Every measurement is appended to ``--out`` (JSONL, one object per line, flushed at once, ``run`` = this
run's id), so a killed stage keeps what it measured. The summary is printed last.

Stages (default budget in seconds):

* ``env`` (10): device, versions, optional packages, the device's dense bf16 peak (``model/flops.py``).
* ``ceilings`` (15): measured bf16 matmul FLOP/s and device-to-device copy bandwidth (read + write bytes).
* ``mlp_align`` (30): the six MLP matmuls of a dual-470m micro-batch (forward, input and weight gradients of
  up/gate and down) at width 3554 vs the padded 3584, with the kernel each one ran (torch.profiler).
* ``gpu_tests`` (110): ``pytest -m gpu`` over the test files that have GPU tests, with the attention kernels'
  autotuning cut to one config per kernel (``MEGATRON_DUAL_AUTOTUNE=one``).
* ``attention`` (100): fwd and fwd+bwd of our Triton kernel vs SDPA (flash and cuDNN backends; efficient with a
  dense mask for documents and prefixes), varlen for documents (flash-attn or torch's varlen), FlexAttention
  compiled once per mask (timed under ``fail_on_recompile``); full autotuning only for the two training masks; on
  sm90, for the document masks, ours again with TMA descriptors (``ours_tma``, last, so the first to be skipped).
* ``train_step`` (110): dual-470m AR and MD micro-batches (8 x 2048): fused+padded, unfused, fused unpadded; time,
  optimizer step, peak memory, MFU by executed FLOPs against the peak and against the measured matmul ceiling.
* ``fused_ops`` (35): ``benchmarks/fused_ops.py``'s ops, time and peak memory fused vs unfused.
* ``optimizer`` (15): ``benchmarks/optimizer.py``: a dual-470m Muon step with Newton-Schulz per block vs batched,
  AdamW single-tensor vs foreach vs fused, the gradient norm loop vs foreach (times, ratios, agreement).
* ``profile`` (30): 2 micro-batches (AR + MD) under torch.profiler, device time by kernel category, peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
# 455 s in all (+ ~30 s of process starts: the 8 minutes). The optimizer stage's 15 s came out of the three
# fixed-size stages (ceilings, mlp_align, profile: no autotuning; profile reuses train_step's compiled kernels from
# Triton's cache), not the compiling ones (gpu_tests, attention, train_step). Not yet measured on a GPU.
BUDGETS = {
    "env": 10,
    "ceilings": 15,
    "mlp_align": 30,
    "gpu_tests": 110,
    "attention": 100,
    "train_step": 110,
    "fused_ops": 35,
    "optimizer": 15,
    "profile": 30,
}
SMOKE_BUDGET = 120  # per stage on CPU (shared cores, the interpreter)
GRACE = 10.0  # seconds past a stage's budget before its child is killed (it stops itself at the budget)
STAGES: dict[str, Callable[[Ctx], None]] = {}  # filled by @stage below, in running order


def stage(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    STAGES[fn.__name__.removeprefix("stage_")] = fn
    return fn


# ------------------------------------------------------------------------------------------------ context
@dataclass
class Ctx:
    name: str
    run: str
    out: Path
    smoke: bool
    deadline: float
    device: str = "cpu"

    def record(self, **fields: Any) -> dict:
        row = {"run": self.run, "stage": self.name, "t": round(time.time(), 3), **fields}
        with open(self.out, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[{self.name}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)
        return row

    def left(self) -> float:
        return self.deadline - time.time()

    def enough(self, seconds: float, what: str) -> bool:
        """False (and a ``skipped`` record) when less than ``seconds`` remain of the budget."""
        if self.left() >= seconds:
            return True
        self.record(skipped=what, reason=f"{self.left():.0f}s of budget left, needs ~{seconds:.0f}s")
        return False

    def previous(self, stage_name: str) -> list[dict]:
        """Records of ``stage_name`` from this run (or, for a partial rerun, the latest run that has them)."""
        rows = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        mine = [r for r in rows if r.get("stage") == stage_name]
        same = [r for r in mine if r.get("run") == self.run]
        return same or [r for r in mine if r.get("run") == (mine[-1]["run"] if mine else None)]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def bench_ms(ctx: Ctx, fn: Callable[[], Any], reps: int = 20) -> float:
    """Median milliseconds of ``fn`` (CUDA: triton's do_bench after two untimed calls; CPU: host clock)."""

    if ctx.smoke:  # one timed call: paths, not speed
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    fn()
    if ctx.device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=max(20, 5 * reps), return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_names(ctx: Ctx, fn: Callable[[], Any], limit: int = 3) -> list[str]:
    """Names of the device kernels (CUDA) or the ops (CPU) ``fn`` runs, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(ctx)
    return [name for name, _ in _by_kernel(ctx, prof)[:limit]]


def _by_kernel(ctx: Ctx, prof: Any) -> list[tuple[str, float]]:
    """(name, self device time in ms) per kernel (CUDA) or per aten op (CPU), heaviest first."""
    rows = []
    for evt in prof.key_averages():
        if ctx.device == "cuda":
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
            if t and evt.key and not evt.key.startswith(("aten::", "cuda", "Activity")):
                rows.append((evt.key, t / 1e3))
        elif evt.key.startswith("aten::") and evt.self_cpu_time_total > 0:
            rows.append((evt.key, evt.self_cpu_time_total / 1e3))
    return sorted(rows, key=lambda r: -r[1])


def _sync(ctx: Ctx) -> None:
    if ctx.device == "cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ stages
@stage
def stage_env(ctx: Ctx) -> None:
    import importlib.metadata as md
    import importlib.util

    import torch

    from megatron_dual.model.flops import lookup_peak

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    import megatron_dual.kernels

    name = torch.cuda.get_device_name() if ctx.device == "cuda" else "cpu"
    peak = lookup_peak(name)
    props = torch.cuda.get_device_properties(0) if ctx.device == "cuda" else None
    ctx.record(
        device=name,
        capability=list(torch.cuda.get_device_capability()) if props else None,
        sms=getattr(props, "multi_processor_count", None),
        memory_gib=round(props.total_memory / 2**30, 1) if props else None,
        peak_label=peak.label if peak else None,
        peak_tflops=peak.flops / 1e12 if peak else None,
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=version("numpy"),
        cuda=torch.version.cuda,
        hip=torch.version.hip,
        triton=version("triton"),
        transformers=version("transformers"),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        deepspeed=importlib.util.find_spec("deepspeed") is not None,
        zstandard=importlib.util.find_spec("zstandard") is not None,
        matplotlib=importlib.util.find_spec("matplotlib") is not None,
        kernels_from=str(Path(megatron_dual.kernels.__file__).resolve().parent),
        autotune=os.environ.get("MEGATRON_DUAL_AUTOTUNE", "full"),
    )


@stage
def stage_ceilings(ctx: Ctx) -> None:
    import torch

    dtypes = [torch.bfloat16] if ctx.device == "cuda" else [torch.float32]
    size = 256 if ctx.smoke else 8192
    for dtype in dtypes:
        g = torch.Generator(device=ctx.device).manual_seed(0)
        a, b = (torch.randn(size, size, device=ctx.device, dtype=dtype, generator=g) for _ in range(2))
        ms = bench_ms(ctx, lambda a=a, b=b: a @ b)
        ctx.record(name="matmul", dtype=str(dtype), size=size, ms=ms, tflops=2 * size**3 / ms / 1e9)
    n = (1 << 22) if ctx.smoke else (1 << 30)  # bytes per buffer
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device).random_()
    dst = torch.empty_like(src)
    ms = bench_ms(ctx, lambda: dst.copy_(src))
    ctx.record(name="copy", bytes=n, ms=ms, gbps=2 * n / ms / 1e6)


def _mlp_matmuls(tokens: int, hidden: int, width: int, device: str, dtype: Any) -> dict[str, Callable[[], Any]]:
    """The six matmuls of one SwiGLU MLP micro-batch: forward, input gradient (dgrad), weight gradient (wgrad)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    x, w_up, h_grad = rnd(tokens, hidden), rnd(2 * width, hidden), rnd(tokens, 2 * width)
    a, w_down, y_grad = rnd(tokens, width), rnd(hidden, width), rnd(tokens, hidden)
    return {
        "up_fwd": lambda: x @ w_up.T,
        "up_dgrad": lambda: h_grad @ w_up,
        "up_wgrad": lambda: h_grad.T @ x,
        "down_fwd": lambda: a @ w_down.T,
        "down_dgrad": lambda: y_grad @ w_down,
        "down_wgrad": lambda: y_grad.T @ a,
    }


@stage
def stage_mlp_align(ctx: Ctx) -> None:
    import torch

    tokens, hidden = (16, 1024) if ctx.smoke else (16384, 1024)
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    times: dict[tuple[int, str], float] = {}
    for width in (3554, 3584):
        for name, fn in _mlp_matmuls(tokens, hidden, width, ctx.device, dtype).items():
            if not ctx.enough(2, f"{name} at {width}"):
                return
            ms = bench_ms(ctx, fn)
            flops = 2 * tokens * hidden * width * (2 if name.startswith("up") else 1)
            times[(width, name)] = ms
            ctx.record(name=name, width=width, ms=ms, tflops=flops / ms / 1e9, kernels=kernel_names(ctx, fn, 2))
    total = {w: sum(t for (ww, _), t in times.items() if ww == w) for w in (3554, 3584)}
    ctx.record(
        name="mlp_total",
        ms_3554=total[3554],
        ms_3584=total[3584],
        speedup_per_flop=total[3554] / total[3584] * 3584 / 3554,
    )


def _gpu_test_files() -> list[str]:
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text(errors="replace")
        if "mark.gpu" in text:
            files.append(str(path.relative_to(ROOT)))
    return files


@stage
def stage_gpu_tests(ctx: Ctx) -> None:
    files = _gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    if ctx.smoke:
        cmd.append("--collect-only")  # no GPU: only prove that they collect (they skip without CUDA)
    env = {**os.environ, "MEGATRON_DUAL_AUTOTUNE": "one", "PYTHONPATH": _pythonpath()}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(5, ctx.left() - 3))
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    tail = out.strip().splitlines()[-25:]
    counts = {
        word: int(n)
        for n, word in re.findall(
            r"(\d+) (passed|failed|skipped|errors?|deselected|tests? "
            r"collected)",
            " ".join(tail[-3:]),
        )
    }
    ctx.record(files=files, rc=rc, counts=counts, tail="\n".join(tail))
    if rc not in (0, 5):
        raise RuntimeError(f"pytest -m gpu exited with {rc}")


def _attention_peers(ctx: Ctx, q: Any, k: Any, v: Any, mask: Any) -> dict[str, Callable[[], Any]]:
    """name -> forward closure for every peer that can express ``mask`` here."""
    import importlib.util

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_dual.model.attention import _flex, attention, document_runs

    peers: dict[str, Callable[[], Any]] = {"ours": lambda: attention(q, k, v, mask, backend="triton")}
    plain = mask.doc_ids is None and mask.kind != "prefix"
    backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
    if not plain:
        dense = mask.dense(q.shape[2], k.shape[2], q.device)
        backends = [("sdpa_dense", SDPBackend.EFFICIENT_ATTENTION if ctx.device == "cuda" else SDPBackend.MATH)]
    elif ctx.device != "cuda":
        backends = [("sdpa", SDPBackend.MATH)]
    for name, backend in backends:

        def sdpa(backend: Any = backend) -> Any:
            with sdpa_kernel(backend):
                if plain:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=mask.kind == "causal")
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

        peers[name] = sdpa
    qf, kf, vf = (x.detach() for x in (q, k, v)) if ctx.device == "cpu" else (q, k, v)  # no CPU backward
    peers["flex"] = lambda: _flex(qf, kf, vf, mask)
    runs = document_runs(mask.doc_ids) if mask.doc_ids is not None and mask.kind != "prefix" else None
    if runs is not None and ctx.device == "cuda":
        varlen = _varlen(q, k, v, runs, mask.kind == "causal", importlib.util.find_spec("flash_attn") is not None)
        if varlen is not None:
            peers["varlen"] = varlen
    tma = _ours_with_tma(q, k, v, mask) if mask.doc_ids is not None and ctx.device == "cuda" else None
    if tma is not None:  # last: the first peer to go when the stage's budget runs short
        peers["ours_tma"] = tma
    return peers


def _ours_with_tma(q: Any, k: Any, v: Any, mask: Any) -> Callable[[], Any] | None:
    """Our kernels with their streamed tiles loaded through TMA descriptors (MEGATRON_DUAL_ATTN_TMA=1); sm90 only."""
    import megatron_dual.kernels.attention as K
    from megatron_dual.model.attention import attention

    if K.device_arch(q.device) != "sm90" or not hasattr(K.tl, "make_tensor_descriptor"):
        return None

    def ours_tma() -> Any:
        return attention(q, k, v, mask, backend="triton")

    # the flag on around forward *and* backward
    ours_tma.context = lambda: mock.patch.object(K, "TMA", True)  # type: ignore[attr-defined]
    return ours_tma


def _varlen(q: Any, k: Any, v: Any, runs: tuple, causal: bool, flash: bool) -> Callable[[], Any] | None:
    """Documents through a varlen kernel on (tokens, heads, dim): flash-attn's, else torch's (2.10+), else None."""
    import inspect

    b, h, t, d = q.shape
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    cu, longest = runs
    if flash:
        import flash_attn

        return lambda: flash_attn.flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=causal)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    extra = {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
    return lambda: varlen_attn(*flat, cu, cu, longest, longest, **extra)


@stage
def stage_attention(ctx: Ctx) -> None:
    import torch
    from attention import MASKS  # benchmarks/attention.py

    b, t, h, d = (2, 48, 2, 16) if ctx.smoke else (8, 2048, 16, 64)
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    order = ["doc-causal", "doc-bidirectional"] + [m for m in MASKS if not m.startswith("doc-")]
    try:
        _attention_masks(ctx, order, (b, t, h, d), dtype)
    finally:
        _record_binaries(ctx)


def _attention_masks(ctx: Ctx, order: list[str], shape: tuple[int, int, int, int], dtype: Any) -> None:
    import torch
    from attention import make_mask  # benchmarks/attention.py

    import megatron_dual.kernels.attention as K
    from megatron_dual.model.flops import attention_pairs

    b, t, h, d = shape
    for mask_name in order:
        K.set_autotune("full" if mask_name.startswith("doc-") and not ctx.smoke else "one")
        mask = make_mask(mask_name, b, t, 12 if ctx.smoke else 512, ctx.device)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, generator=g).to(ctx.device, dtype).requires_grad_() for _ in range(3))
        do = torch.randn(b, h, t, d, generator=g).to(ctx.device, dtype)
        fwd_flops = 4 * d * h * attention_pairs(mask, b, t)
        for peer, fwd in _attention_peers(ctx, q, k, v, mask).items():
            if not ctx.enough(3 if ctx.smoke else 8, f"{mask_name} {peer}"):
                return
            _attention_case(ctx, mask_name, peer, fwd, (q, k, v), do, fwd_flops)


def _record_binaries(ctx: Ctx) -> None:
    """Registers, spills and shared memory of every attention binary this stage built, as the driver reports them,
    and the config full autotuning chose per tuning key: the GPU's side of `benchmarks/kernel_report.py`."""
    import megatron_dual.kernels.attention as K
    from megatron_dual.kernels.aot import compiled_binaries

    for name in ("_fwd_kernel", "_bwd_q_kernel", "_bwd_kv_kernel"):
        kernel = getattr(K, name)
        try:
            rows = compiled_binaries(kernel)
        except Exception as exc:  # Triton internals: a changed attribute is a record, not a failed stage
            ctx.record(binaries=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        chosen = {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
        ctx.record(binaries=name, compiled=rows, autotuned=chosen)


def _attention_case(
    ctx: Ctx, mask_name: str, peer: str, fwd: Callable[[], Any], inputs: tuple, do: Any, fwd_flops: float
) -> None:
    import torch

    def fwd_bwd() -> Any:
        out = fwd()
        if out.shape != do.shape:  # varlen: (tokens, heads, dim)
            out = out.view(do.shape[0], do.shape[2], do.shape[1], do.shape[3]).transpose(1, 2)
        return torch.autograd.grad(out, inputs, do)

    backward = not (ctx.device == "cpu" and peer == "flex")  # FlexAttention has no CPU backward
    try:
        with getattr(fwd, "context", contextlib.nullcontext)():  # a peer's setting for the whole case
            ms_fwd, ms_all = _time_case(ctx, fwd, fwd_bwd, backward)
    except Exception as exc:  # one peer failing is a result, not the end of the stage
        ctx.record(mask=mask_name, peer=peer, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return
    ctx.record(
        mask=mask_name,
        peer=peer,
        ms_fwd=ms_fwd,
        ms_fwd_bwd=ms_all,
        tflops_fwd=fwd_flops / ms_fwd / 1e9 if ms_fwd else None,
        tflops_fwd_bwd=3.5 * fwd_flops / ms_all / 1e9 if ms_all else None,
    )


def _time_case(
    ctx: Ctx, fwd: Callable[[], Any], fwd_bwd: Callable[[], Any], backward: bool
) -> tuple[float | None, float | None]:
    """(forward ms, forward+backward ms) of one peer, after one untimed call that compiles and tunes."""
    import torch

    ms_fwd = ms_all = None
    with torch.set_grad_enabled(backward):
        fwd_bwd() if backward else fwd()  # compiles (Flex: once for this mask) and tunes
    with torch.compiler.set_stance("fail_on_recompile"):  # a recompile here would be timed: refuse it
        if not (ctx.smoke and backward):  # (the smoke run times one of the two: the interpreter is slow)
            with torch.no_grad():
                ms_fwd = bench_ms(ctx, fwd)
        if backward:
            ms_all = bench_ms(ctx, fwd_bwd)
    return ms_fwd, ms_all


def _model_and_batches(ctx: Ctx, fused: str, pad_to: int) -> tuple[Any, Any, dict, Any]:
    """(config, model, {objective: batch}, optimizers) of dual-470m (smoke: a tiny model) on the device."""
    import torch
    from train_step import synthetic_batches  # benchmarks/train_step.py

    from megatron_dual.config import load_config
    from megatron_dual.model.padding import pad, padding_of
    from megatron_dual.model.transformer import DualTransformer
    from megatron_dual.optim.muon import build_optimizers

    over = [f"model.fused_ops={fused}", f"model.pad_intermediate_to={pad_to}"]
    if ctx.smoke:
        over += [
            "model.hidden_size=64",
            "model.n_heads=4",
            "model.vocab_size=300",
            "model.intermediate_size=100",
            "model.n_layers=1",
            "model.max_seq_len=64",
            "data.seq_len=32",
        ]
    cfg = load_config(preset="dual-470m", overrides=over)
    mb, seq, mean_doc = (2, 24, 8) if ctx.smoke else (8, 2048, 1024)
    batches = synthetic_batches(cfg, mb, seq, mean_doc, ctx.device)
    torch.manual_seed(0)
    model = DualTransformer(cfg.model).to(ctx.device)
    with torch.no_grad():  # the reference init zeroes the out/down projections: give every path real work
        for p in model.parameters():  # (padded units stay zero)
            spec = padding_of(p)
            noise = 0.02 * torch.randn(spec.logical_shape(p.shape) if spec else p.shape, device=p.device)
            p.copy_(pad(noise, spec) if spec else noise)
    return cfg, model, batches, build_optimizers(model, cfg.optimizer)


def _micro(ctx: Ctx, cfg: Any, model: Any, batch: Any) -> float:
    import torch

    from megatron_dual.model.loss import labelled_loss

    with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=ctx.device == "cuda"):
        hidden = model(batch.input_ids, batch.mask)
        sums = labelled_loss(
            model.head, hidden, batch.labels, batch.weights, cfg.objective.z_loss, n_labelled=batch.n_labelled
        )
    loss = sums.weighted / batch.n_tokens
    loss.backward()
    return float(loss.detach())


def _use_tuned_attention(ctx: Ctx) -> str:
    """The training step's attention on the configs the attention stage tuned for the two training masks (same
    tuning key: 8 x 2048, 16 heads of 64, documents), read back from Triton's on-disk results instead of running
    the first candidate; only where that stage measured our kernel on them (else a full tuning here would eat the
    budget). Returns the mode set."""
    import megatron_dual.kernels.attention as K

    tuned = {r.get("mask") for r in ctx.previous("attention") if r.get("peer") == "ours" and r.get("ms_fwd_bwd")}
    mode = "full" if ctx.device == "cuda" and {"doc-causal", "doc-bidirectional"} <= tuned else "one"
    K.set_autotune(mode)
    return mode


@stage
def stage_train_step(ctx: Ctx) -> None:
    import torch

    from megatron_dual.model.flops import objective_batch_flops, peak_flops

    autotune = _use_tuned_attention(ctx)

    peak = peak_flops(ctx.device) if ctx.device == "cuda" else None
    ceiling = next((r["tflops"] * 1e12 for r in ctx.previous("ceilings") if r.get("name") == "matmul"), None)
    settings = [("fused+padded", "triton", 64), ("unfused+padded", "none", 64), ("fused", "triton", 1)]
    if ctx.smoke:  # the interpreter is slow: one fused setting; padded vs unpadded checked unfused
        settings[2] = ("unfused", "none", 1)
    losses: dict[str, list[float]] = {}
    for label, fused, pad in settings:
        if not ctx.enough(5 if ctx.smoke else 25, label):
            return
        cfg, model, batches, optimizers = _model_and_batches(ctx, fused, pad)
        for obj, batch in batches.items():
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            loss = _micro(ctx, cfg, model, batch)
            losses.setdefault(obj, []).append(loss)
            ms = bench_ms(ctx, lambda b=batch, m=model, c=cfg: _micro(ctx, c, m, b), reps=5)
            fl = objective_batch_flops(cfg.model, batch)
            mfu = fl["total"] / (ms / 1e3) / peak if peak else None
            ctx.record(
                setting=label,
                objective=obj,
                loss=loss,
                ms=ms,
                tflops=fl["total"] / ms / 1e9,
                mfu=mfu,
                mfu_vs_ceiling=fl["total"] / (ms / 1e3) / ceiling if ceiling else None,
                flops=fl,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.device == "cuda" else None,
                attention_autotune=autotune,
            )
        opt_ms = bench_ms(ctx, lambda opts=optimizers: [o.step() for o in opts.values()], reps=3)
        ctx.record(setting=label, optimizer_step_ms=opt_ms)
        del model, optimizers
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    _check_losses(ctx, losses)


def _check_losses(ctx: Ctx, losses: dict[str, list[float]]) -> None:
    """The settings compute one model: their first losses agree (fp32 on CPU; bf16 and other kernels on GPU)."""
    rtol = 2e-2 if ctx.device == "cuda" else 1e-4
    spread = {obj: (max(v) - min(v)) / max(abs(v[0]), 1e-12) for obj, v in losses.items()}
    ctx.record(losses=losses, relative_spread=spread, agree=all(x <= rtol for x in spread.values()), rtol=rtol)
    if any(x > rtol for x in spread.values()):
        raise RuntimeError(f"settings disagree on the loss: {losses}")


@stage
def stage_fused_ops(ctx: Ctx) -> None:
    import torch
    from fused_ops import OPS, build, fwd_bwd, max_err, peak_bytes  # benchmarks/fused_ops.py

    shapes = dict(
        tokens=16384, ce_tokens=16384, hidden=1024, intermediate=3584, heads=16, kv_heads=None, head_dim=64, vocab=51200
    )
    if ctx.smoke:
        shapes.update(
            tokens=66, ce_tokens=37, hidden=100, intermediate=172, heads=2, kv_heads=1, head_dim=50, vocab=300
        )
    a = argparse.Namespace(**shapes)
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    for op in OPS:
        if not ctx.enough(2 if ctx.smoke else 4, op):
            return
        fused, unfused, inputs = build(op, a, ctx.device, dtype)
        rf, ru = fwd_bwd(fused, inputs), fwd_bwd(unfused, inputs)
        err = max(max_err(fused(), unfused()), max_err(rf(), ru()))
        tf, tu = bench_ms(ctx, rf), bench_ms(ctx, ru)
        mem = (peak_bytes(rf), peak_bytes(ru)) if ctx.device == "cuda" else (None, None)
        ctx.record(
            op=op,
            fused_ms=tf,
            unfused_ms=tu,
            speedup=tu / tf,
            max_rel_err=err,
            fused_mib=_mib(mem[0]),
            unfused_mib=_mib(mem[1]),
            mem_ratio=mem[0] / mem[1] if mem[1] else None,
        )


@stage
def stage_optimizer(ctx: Ctx) -> None:
    from optimizer import rows  # benchmarks/optimizer.py

    def enough(name: str) -> bool:
        return ctx.enough(1 if ctx.smoke else 4, name)

    for row in rows(ctx.device, ctx.smoke, lambda fn: bench_ms(ctx, fn, reps=3), enough):
        ctx.record(**row)


def _mib(n: int | None) -> float | None:
    return n / 2**20 if n is not None else None


CATEGORIES = [  # (category, substrings of a kernel / op name), first match wins
    ("attention", ("_attn", "flash", "fmha", "sdpa", "attention")),
    (
        "gemm",
        (
            "gemm",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "sm90_",
            "sm80_",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::matmul",
            "aten::linear",
        ),
    ),
    ("fused_triton", ("rmsnorm", "rotary", "swiglu", "_ce_", "triton")),
    ("optimizer", ("foreach", "multi_tensor", "adam")),
    ("copy_cast", ("copy", "memcpy", "memset", "cast", "to_copy", "cat", "fill")),
    ("reduction", ("reduce", "sum", "norm", "softmax", "logsumexp", "max")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "silu", "gelu", "aten::")),
]


def categorize(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


@stage
def stage_profile(ctx: Ctx) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    autotune = _use_tuned_attention(ctx)
    cfg, model, batches, _ = _model_and_batches(ctx, "triton" if ctx.device == "cuda" else "none", 64)
    for batch in batches.values():  # warm-up: compile and tune outside the profile
        _micro(ctx, cfg, model, batch)
    _sync(ctx)
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for batch in batches.values():  # 2 micro-batches: one AR, one MD
            _micro(ctx, cfg, model, batch)
        _sync(ctx)
    wall = (time.perf_counter() - t0) * 1e3
    kernels = _by_kernel(ctx, prof)
    per_cat: dict[str, float] = {}
    for name, ms in kernels:
        per_cat[categorize(name)] = per_cat.get(categorize(name), 0.0) + ms
    total = sum(per_cat.values()) or 1.0
    ctx.record(
        attention_autotune=autotune,
        micro_batches=len(batches),
        wall_ms=wall,
        device_ms=total,
        categories={
            k: {"ms": round(v, 3), "share": round(v / total, 4)}
            for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])
        },
        top=[(n, round(ms, 3)) for n, ms in kernels[:12]],
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.device == "cuda" else None,
    )


# ------------------------------------------------------------------------------------------------ driver
def _pythonpath() -> str:
    parts = [str(ROOT), str(ROOT / "benchmarks")] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return ":".join(dict.fromkeys(parts))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order: {','.join(STAGES)}")
    p.add_argument(
        "--out",
        default=None,
        help="JSONL file to append to (default: $OUT/gpu_validate.jsonl if $OUT "
        "is set, else benchmarks/gpu_validate.jsonl)",
    )
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a budget")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the paths")
    p.add_argument("--grace", type=float, default=GRACE, help="seconds past a budget before a stage is killed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(a: argparse.Namespace) -> int:
    """Run one stage in this process (started by :func:`main`); exceptions are recorded, then exit 1."""
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("MEGATRON_DUAL_AUTOTUNE", "one")
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # tuned configs persist in Triton's cache for reruns
    for path in (str(ROOT / "benchmarks"), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    if a.smoke:
        torch.set_num_threads(1)
    ctx = Ctx(
        a.child, a.run, Path(a.out), a.smoke, a.deadline, "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    )
    try:
        STAGES[a.child](ctx)
    except Exception as exc:
        import traceback

        ctx.record(error=f"{type(exc).__name__}: {str(exc)[:500]}", traceback=traceback.format_exc()[-2000:])
        return 1
    return 0


def run_stage(a: argparse.Namespace, name: str, budget: float, out: Path, run: str) -> dict:
    """Run stage ``name`` in a child process for at most ``budget`` (+ grace) seconds; its status record."""
    start = time.time()
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--run",
        run,
        "--out",
        str(out),
        "--deadline",
        str(start + budget),
    ] + (["--smoke"] if a.smoke else [])
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc: int | str = proc.wait(timeout=budget + a.grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started (pytest, compile workers)
        proc.wait()
        rc = "timeout"
    status = "ok" if rc == 0 else "timeout" if rc == "timeout" else "error"
    row = {
        "run": run,
        "stage": name,
        "status": status,
        "rc": rc,
        "seconds": round(time.time() - start, 2),
        "budget": budget,
    }
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def summary(out: Path, run: str) -> list[str]:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("run") == run]
    lines = [f"{'stage':<11} {'status':<8} {'s':>6} {'budget':>6}  results"]
    for r in (r for r in rows if "status" in r):
        n = sum(1 for x in rows if x["stage"] == r["stage"] and "status" not in x)
        bad = [x for x in rows if x["stage"] == r["stage"] and ("error" in x or "skipped" in x)]
        note = f"{n} records" + (f", {len(bad)} errors/skips" if bad else "")
        lines.append(f"{r['stage']:<11} {r['status']:<8} {r['seconds']:>6.1f} {r['budget']:>6.0f}  {note}")
    lines += _headlines(rows)
    return lines


def _headlines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("name") == "matmul" or r.get("name") == "copy":
            out.append(
                f"ceiling {r['name']}: " + (f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s")
            )
        elif r.get("name") == "mlp_total":
            out.append(
                f"MLP matmuls 3554 -> 3584: {r['ms_3554']:.2f} -> {r['ms_3584']:.2f} ms, "
                f"speed per FLOP x{r['speedup_per_flop']:.2f}"
            )
        elif "setting" in r and "ms" in r:
            mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") else "MFU n/a"
            ceil = f", {r['mfu_vs_ceiling']:.1%} of ceiling" if r.get("mfu_vs_ceiling") else ""
            out.append(f"train {r['setting']} {r['objective']}: {r['ms']:.1f} ms/micro-batch, {mfu}{ceil}")
        elif r.get("stage") == "attention" and r.get("ms_fwd_bwd"):
            out.append(
                f"attention {r['mask']} {r['peer']}: fwd+bwd {r['ms_fwd_bwd']:.3f} ms "
                f"({r['tflops_fwd_bwd']:.1f} TFLOP/s)"
            )
        elif r.get("stage") == "optimizer" and "name" in r:
            old, new = {"muon": ("per_block", "batched"), "adamw": ("loop", r.get("default"))}.get(
                r["name"], ("loop", "foreach")
            )
            out.append(
                f"optimizer {r['name']}: {old} {r[old + '_ms']:.2f} ms -> {new} {r[new + '_ms']:.2f} ms "
                f"(x{r[old + '_ms'] / r[new + '_ms']:.2f})"
            )
        elif r.get("stage") == "gpu_tests" and "counts" in r:
            out.append(f"gpu tests: {r['counts']} (rc {r['rc']})")
        elif r.get("compiled"):
            loaded = [b for b in r["compiled"] if "registers" in b] or [{"registers": 0, "spill_bytes": 0}]
            regs = [b["registers"] for b in loaded]
            spilled = sum(b["spill_bytes"] for b in loaded)
            n = len(r["compiled"])
            out.append(f"{r['binaries']}: {n} binaries, {min(regs)}-{max(regs)} registers, {spilled} B spilled")
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.child:
        return child_main(a)
    names = [n.strip() for n in a.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        print(f"gpu_validate: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    budgets = {n: float(SMOKE_BUDGET if a.smoke else b) for n, b in BUDGETS.items()}
    for item in a.budget:
        key, _, value = item.partition("=")
        if key not in budgets:
            print(f"gpu_validate: --budget {item}: unknown stage {key!r}", file=sys.stderr)
            return 2
        budgets[key] = float(value)
    default_out = (
        Path(os.environ["OUT"]) / "gpu_validate.jsonl"
        if os.environ.get("OUT")
        else (ROOT / "benchmarks" / "gpu_validate.jsonl")
    )
    out = Path(a.out) if a.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    run = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    print(f"gpu_validate run {run}: stages {', '.join(names)}; results -> {out}", flush=True)
    statuses = [run_stage(a, n, budgets[n], out, run) for n in names]
    print("\n".join(["", "=" * 100, *summary(out, run)]), flush=True)
    return 0 if all(s["status"] == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
