"""Run a function in N local processes joined by a gloo process group (tests and CPU experiments).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` fresh interpreters (``spawn``: no inherited
thread pools or CUDA state), initialises ``torch.distributed`` in each over a ``FileStore`` in a temporary
directory (no port to race for), sets the torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) so code that reads them works unchanged, calls
``fn(rank, world_size, *args)`` and returns the per-rank results as a list in rank order. ``fn`` and ``args`` must
be picklable (a module-level function). Results travel through ``torch.save`` (tensors welcome).

A failing rank's exception is re-raised in the caller as :class:`DistributedTestError` naming the rank, with the
worker's traceback (when several ranks fail, the earliest failure: peers of a crashed rank fail in collectives
after it); other ranks blocked in a collective are terminated. ``timeout`` bounds the whole run.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistributedTestError", "free_port"]


class DistributedTestError(RuntimeError):
    """A worker of :func:`run_distributed` failed; the message names the rank and holds its traceback."""


def free_port() -> int:
    """A TCP port free on localhost right now (for code that insists on MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, fn: Callable[..., Any], args: tuple, tmp: str, port: int, threads: int, backend: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if threads > 0:
        torch.set_num_threads(threads)
    out_path = os.path.join(tmp, f"result_{rank}.pt")
    try:
        store = dist.FileStore(os.path.join(tmp, "store"), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        result = fn(rank, world_size, *args)
    except BaseException as e:  # report every failure, including KeyboardInterrupt/SystemExit in the worker
        # the time of failure, taken before the group is torn down: peers then fail in collectives, later
        report = {
            "ok": False,
            "time": time.time(),
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        torch.save(report, out_path)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(1) from None
    dist.destroy_process_group()
    torch.save({"ok": True, "result": result}, out_path)


def _wait(procs: list, fn: Callable[..., Any], world_size: int, timeout: float) -> int | None:
    """Wait for every worker, stopping at the first that exits non-zero (returned; None when none did); workers
    still alive afterwards (blocked in a collective with a dead peer) are terminated."""
    deadline = time.monotonic() + timeout
    failed: int | None = None
    try:
        while any(p.is_alive() for p in procs):
            for r, p in enumerate(procs):
                if not p.is_alive() and p.exitcode not in (0, None) and failed is None:
                    failed = r
            if failed is not None:
                break
            if time.monotonic() > deadline:
                raise DistributedTestError(
                    f"run_distributed({getattr(fn, '__name__', fn)}, world_size="
                    f"{world_size}) did not finish within {timeout:.0f} s"
                )
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=0.5 if failed is None else 0.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return failed


def _collect(procs: list, tmp: str, failed: int | None) -> tuple[list[Any], list[tuple[float, int, str, str]]]:
    """Per-rank results (None where a rank left none) and the failure reports as (time, rank, error, traceback)."""
    results: list[Any] = []
    errors = []
    for r, p in enumerate(procs):
        path = os.path.join(tmp, f"result_{r}.pt")
        if not os.path.exists(path):
            if p.exitcode != 0 and r == failed:  # died without reporting (killed, segfault)
                errors.append((0.0, r, f"exited with code {p.exitcode} without a result", ""))
            results.append(None)
            continue
        blob = torch.load(path, weights_only=False)
        if not blob["ok"]:
            errors.append((blob["time"], r, blob["error"], blob["traceback"]))
        results.append(blob.get("result"))
    return results, errors


def _raise_failures(procs: list, world_size: int, errors: list[tuple[float, int, str, str]]) -> None:
    if errors:  # the first failure is the cause; the others fail in collectives after it
        errors.sort()
        _, r, msg, tb = errors[0]
        others = f" (ranks failing: {sorted(e[1] for e in errors)})" if len(errors) > 1 else ""
        raise DistributedTestError(
            f"rank {r} of {world_size} failed: {msg}{others}\n--- traceback of rank {r} ---\n{tb}"
        )
    missing = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if missing:
        raise DistributedTestError(
            f"ranks {missing} of {world_size} exited with codes "
            f"{[procs[r].exitcode for r in missing]} and no error report"
        )


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, threads: int = 1, backend: str = "gloo"
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process of a ``world_size`` group.

    ``threads``: torch intra-op threads per worker (1 keeps N workers from oversubscribing shared cores; 0 leaves
    torch's default).
    """
    if world_size < 1:
        raise ValueError(f"world_size = {world_size}: must be >= 1")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="md_dist_") as tmp:
        port = free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, fn, args, tmp, port, threads, backend), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        failed = _wait(procs, fn, world_size, timeout)
        results, errors = _collect(procs, tmp, failed)
        _raise_failures(procs, world_size, errors)
        return results
