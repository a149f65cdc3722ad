"""Joining a launch: the process group (torchrun or SLURM environment), the device, the job's ParallelState."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_dual.config import Config, ConfigError
from megatron_dual.objectives import schedule_from_config
from megatron_dual.parallel import watchdog
from megatron_dual.parallel.state import ParallelState, dist_env

__all__ = ["resolve_device", "init_distributed", "setup_parallel"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` -> this rank's GPU; ConfigError when CUDA is missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA device is available (use cpu or auto)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(cfg: Config) -> tuple[int, int, int]:
    """Join the job's process group when launched by torchrun or srun; (rank, local_rank, world_size)."""
    rank, local_rank, world = dist_env()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), local_rank, dist.get_world_size()
    if world == 1:
        return rank, local_rank, world
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"launched with {world} ranks but MASTER_ADDR is not set: use torchrun, or export "
            f"MASTER_ADDR/MASTER_PORT in the SLURM script (see examples/slurm/)"
        )
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    watchdog.phase(
        f"process group creation (waiting for all {world} ranks to join {os.environ['MASTER_ADDR']}:"
        f"{os.environ['MASTER_PORT']})"
    )
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=watchdog.timeout_delta(cfg.parallel.timeout))
    return rank, local_rank, world


def setup_parallel(cfg: Config) -> tuple[ParallelState, torch.device]:
    """Process group, this rank's device and the job's layout (TP x DP groups, objective schedule)."""
    rank, local_rank, world = init_distributed(cfg)
    device = resolve_device(cfg.train.device, local_rank)
    watchdog.phase("creation of the tensor- and data-parallel groups")
    schedule = schedule_from_config(
        cfg.objective,
        max(1, world // cfg.parallel.tp),
        cfg.train.grad_accum,
        cfg.train.steps,
        cfg.data.epoch_repetitions(),
    )
    par = ParallelState(
        world,
        rank,
        cfg.parallel.tp,
        cfg.objective.alpha,
        cfg.train.grad_accum,
        cfg.objective.rotate,
        timeout=cfg.parallel.timeout,
        schedule=schedule,
    )
    return par, device
