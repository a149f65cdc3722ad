"""What the compiler makes of the attention and fused kernels for H100 (sm90), A100 (sm80) and MI250X (gfx90a) on a
CPU.

For each attention kernel (forward, dQ, dK/dV; on sm90 also the forward with TMA descriptors) and each block
configuration its autotuner may pick on that architecture (``attention.ARCH_SHAPES``), compiled with the
specialisation Triton's JIT gives the dual-470m training launch (the packed qkv projection of 2048 positions x 48
heads x 64, bf16, document ids, under the two training masks; launches recorded from the host code, see
``megatron_dual/kernels/aot.py``): registers per thread, spilled bytes, shared memory (LDS) against the device's
limit, how many tile loads the software pipeliner made asynchronous (cp.async or TMA into shared memory), and which
tensor-core instructions carry the products (Hopper's wgmma, the older mma.sync, AMD's MFMA).

``--kernels fused`` (or single names: ``rmsnorm_fwd``, ``ce_grad``, ...) adds the fused kernels (RMSNorm and
add-RMSNorm forward and backward, rotary and its inverse, SwiGLU forward and backward, the cross-entropy's
statistics and gradient kernels): one row per kernel and arch, compiled as the JIT specialises dual-470m's launches
(``aot.fused_launches``: bf16 activations, fp32 residual stream, the arch's SM count for persistent grids) with the
block size and warps its host code picks and the backend's default stages; besides registers, spills and shared
memory, the global loads and stores and how many of them are vectorised (16-byte ``ld.global.v4``, AMD dwordx2
and wider).

These are the compiler's figures for the code the GPU will run, not timings. A configuration that spills, overflows
shared memory or (on CUDA, with more than one stage) loads every tile synchronously is flagged, as is a fused
kernel without a vectorised load; ``--check`` exits 1 when any is, so a change to a kernel that makes it spill is
seen before a GPU is at hand.

    python benchmarks/kernel_report.py                                   # every arch, kernel, mask and config
    python benchmarks/kernel_report.py --arch sm90 --kernels fwd --first  # the first (autotune "one") config only
    python benchmarks/kernel_report.py --kernels fused                   # the fused kernels, every arch
    python benchmarks/kernel_report.py --out report.jsonl --check        # rows to JSONL, exit 1 on a flag
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter (read when triton is imported)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9+ warns unless told; 1 = what the JIT does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = ("sm90", "sm80", "gfx90a")
KERNELS = {"fwd": "_fwd_kernel", "bwd_q": "_bwd_q_kernel", "bwd_kv": "_bwd_kv_kernel"}
# the fused kernels by report name: the key of aot.fused_launches (the rotary inverse is "_rotary_kernel_bwd")
FUSED = {
    "rmsnorm_fwd": "_rmsnorm_fwd_kernel",
    "rmsnorm_bwd": "_rmsnorm_bwd_kernel",
    "add_rmsnorm_fwd": "_rmsnorm_fwd_kernel_add",
    "add_rmsnorm_bwd": "_rmsnorm_bwd_kernel_add",
    "rotary": "_rotary_kernel",
    "rotary_bwd": "_rotary_kernel_bwd",
    "swiglu_fwd": "_swiglu_fwd_kernel",
    "swiglu_bwd": "_swiglu_bwd_kernel",
    "ce_stats": "_ce_stats_kernel",
    "ce_grad": "_ce_grad_kernel",
}
KERNEL_CHOICES = (*KERNELS, "fused", *FUSED)
MASKS = ("causal-docs", "bidirectional-docs", "prefix-docs", "causal", "bidirectional", "prefix")
TRAINING_MASKS = ("causal-docs", "bidirectional-docs")
# dual-470m: 16 query and 16 key/value heads of 64, 2048 positions, bf16; one sequence is enough (the batch size
# changes no stride the JIT specialises on)
SHAPE = {"t": 2048, "hq": 16, "hkv": 16, "d": 64}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated: {', '.join(ARCHS)}")
    p.add_argument(
        "--kernels",
        default=",".join(KERNELS),
        help=f"comma-separated: {', '.join(KERNEL_CHOICES)} (fused: all of those after it)",
    )
    p.add_argument("--masks", default=",".join(TRAINING_MASKS), help=f"comma-separated: {', '.join(MASKS)}")
    p.add_argument("--first", action="store_true", help="only each list's first config (what autotune 'one' runs)")
    p.add_argument("--no-tma", action="store_true", help="leave out the sm90 kernels with TMA descriptors")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPU count)")
    p.add_argument("--out", type=Path, help="also write one JSON row per compiled kernel to this file")
    p.add_argument("--check", action="store_true", help="exit 1 when a config spills, overflows or loads sync")
    a = p.parse_args(argv)
    for name, value, allowed in (
        ("arch", a.arch, ARCHS),
        ("kernels", a.kernels, KERNEL_CHOICES),
        ("masks", a.masks, MASKS),
    ):
        bad = [x for x in value.split(",") if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return a


@functools.cache
def recorded_launches(mask: str) -> dict[str, Any]:
    from megatron_dual.kernels.aot import attention_launches

    return attention_launches(mask, SHAPE["t"], (SHAPE["hq"], SHAPE["hkv"]), SHAPE["d"])


@functools.cache
def recorded_fused(arch: str) -> dict[str, Any]:
    from megatron_dual.kernels.aot import SM_COUNT, fused_launches

    return fused_launches("bfloat16", SM_COUNT[arch])


def configs(arch: str, kernel: str, first: bool) -> list[tuple[int, int, int, int]]:
    import megatron_dual.kernels.attention as K

    shapes = K.ARCH_SHAPES[arch][kernel]
    return shapes[:1] if first else list(shapes)


def compile_one(job: tuple[str, str, str, tuple[int, int, int, int], bool]) -> dict[str, Any]:
    """Compile one (arch, kernel, mask, config, tma) job and return its report row (``error`` if it failed)."""
    from megatron_dual.kernels import aot

    arch, kernel, mask, config, tma = job
    row: dict[str, Any] = {"arch": arch, "kernel": kernel + "_tma" * tma, "mask": mask}
    row |= dict(zip(("block_m", "block_n", "warps", "stages"), config, strict=True))
    target = aot.TARGETS[arch]
    spec = aot.specialize(recorded_launches(mask)[KERNELS[kernel]], target)
    start = time.perf_counter()
    try:
        compiled = aot.compile_attention(spec, target, config, tma)
        row |= aot.resources(compiled, target) | {"compile_s": round(time.perf_counter() - start, 1)}
    except Exception as e:  # noqa: BLE001 (a config the compiler rejects is a row of the report, not a crash)
        return row | {"error": aot.error_line(e)}
    return row | {"flags": flags(row)}


def compile_fused(job: tuple[str, str]) -> dict[str, Any]:
    """Compile one fused (arch, kernel) job as its recorded launch asks (block sizes and warps; stages: the
    backend's default) and return its report row: resources and global loads/stores (``error`` if it failed)."""
    from megatron_dual.kernels import aot

    arch, kernel = job
    launch = recorded_fused(arch)[FUSED[kernel]]
    options = launch.options()
    blocks = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK")}
    row: dict[str, Any] = {"arch": arch, "kernel": kernel, "group": "fused", "blocks": blocks}
    row["warps"] = options.get("num_warps", 4)
    target = aot.TARGETS[arch]
    start = time.perf_counter()
    try:
        compiled = aot.compile_launch(aot.specialize(launch, target), target, row["warps"], options.get("num_stages"))
        row |= {"stages": compiled.metadata.num_stages} | aot.resources(compiled, target)
        row |= aot.memory_ops(compiled, target) | {"compile_s": round(time.perf_counter() - start, 1)}
    except Exception as e:  # noqa: BLE001 (a kernel the compiler rejects is a row of the report, not a crash)
        return row | {"error": aot.error_line(e)}
    return row | {"flags": flags(row)}


def compile_job(job: tuple) -> dict[str, Any]:
    return compile_fused(job) if len(job) == 2 else compile_one(job)


def flags(row: dict[str, Any]) -> list[str]:
    """What in a row would cost speed or fail at launch."""
    from megatron_dual.kernels.aot import SHARED_LIMIT

    out = []
    if row.get("spill_bytes", 0) > 0:
        out.append(f"spills {row['spill_bytes']} B")
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"shared {row['shared']} > {SHARED_LIMIT[row['arch']]}")
    if row.get("group") == "fused":
        if row["vec_loads"] == 0:
            out.append("no vectorised load")
    elif row["arch"] != "gfx90a" and row["stages"] > 1 and row.get("pipelined_buffers", 0) == 0:
        out.append("loads not pipelined")
    return out


def jobs(a: argparse.Namespace) -> list[tuple]:
    """Attention jobs (arch, kernel, mask, config, tma), then fused ones (arch, kernel)."""
    out: list[tuple] = []
    kernels = a.kernels.split(",")
    for arch in a.arch.split(","):
        for kernel in (k for k in kernels if k in KERNELS):
            variants = [False, True] if arch == "sm90" and not a.no_tma else [False]
            for mask in a.masks.split(","):
                for cfg in configs(arch, kernel, a.first):
                    out += [(arch, kernel, mask, cfg, tma) for tma in variants]
    fused = dict.fromkeys(n for k in kernels if k == "fused" or k in FUSED for n in (FUSED if k == "fused" else [k]))
    return out + [(arch, kernel) for arch in a.arch.split(",") for kernel in fused]


COLUMNS = {
    "sm90": ("registers", "spill_bytes", "shared", "pipelined_buffers", "tma_loads", "wgmma", "mma"),
    "sm80": ("registers", "spill_bytes", "shared", "pipelined_buffers", "mma"),
    "gfx90a": ("vgpr", "agpr", "spill_bytes", "sgpr_spill", "shared", "occupancy", "mfma"),
}


FUSED_COLUMNS = {
    "sm90": ("registers", "spill_bytes", "shared", "pipelined_buffers", "loads", "vec_loads", "stores", "vec_stores"),
    "sm80": ("registers", "spill_bytes", "shared", "pipelined_buffers", "loads", "vec_loads", "stores", "vec_stores"),
    "gfx90a": ("vgpr", "spill_bytes", "shared", "occupancy", "loads", "vec_loads", "stores", "vec_stores"),
}


def _attention_head(r: dict[str, Any]) -> str:
    cfg = f"({r['block_m']}, {r['block_n']}, {r['warps']}, {r['stages']})"
    return f"  {r['kernel']:<10} {r['mask']:<19} {cfg:<18}"


def _fused_head(r: dict[str, Any]) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in r["blocks"].items())
    return f"  {r['kernel']:<16} {blocks:<24} {'(' + str(r['warps']) + ', ' + str(r.get('stages', '-')) + ')':<7}"


def print_table(rows: list[dict[str, Any]], fused: bool = False) -> None:
    """One table per arch: a row per compiled kernel, its columns, and its flags (or the error)."""
    columns, head = (FUSED_COLUMNS, _fused_head) if fused else (COLUMNS, _attention_head)
    what = "fused: kernel, block sizes, (warps, stages)" if fused else "kernel, mask, (BLOCK_M, BLOCK_N, warps, stages)"
    for arch in dict.fromkeys(r["arch"] for r in rows):
        cols = columns[arch]
        print(f"\n{arch}{' ' if fused else ': '}{what}, " + ", ".join(cols))
        for r in (r for r in rows if r["arch"] == arch):
            if "error" in r:
                print(head(r), "ERROR", r["error"])
                continue
            vals = " ".join(f"{c}={r.get(c, '-')}" for c in cols)
            print(head(r), vals, ("  <- " + "; ".join(r["flags"])) if r["flags"] else "")


def main(argv: list[str] | None = None) -> int:
    import triton

    a = parse(argv)
    todo = jobs(a)
    print(f"kernel_report: Triton {triton.__version__}, {len(todo)} compiles on {a.jobs} process(es)", flush=True)
    start = time.perf_counter()
    if a.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
            rows = list(pool.map(compile_job, todo))
    else:
        rows = [compile_job(j) for j in todo]
    attention = [r for r in rows if r.get("group") != "fused"]
    if attention:
        print_table(attention)
    print_table([r for r in rows if r.get("group") == "fused"], fused=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("w") as f:
            f.writelines(json.dumps(r | {"triton": triton.__version__}) + "\n" for r in rows)
    bad = [r for r in rows if "error" in r or r["flags"]]
    print(f"\n{len(rows)} kernels compiled in {time.perf_counter() - start:.0f} s; {len(bad)} flagged or failed")
    return 1 if a.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
