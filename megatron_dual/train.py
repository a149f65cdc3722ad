"""Entry point of training: ``python -m megatron_dual.train`` and ``megatron-dual train`` (the same function).

The loop itself is :class:`megatron_dual.trainer.Trainer`; this module only turns arguments into a config, runs it
and turns ordinary failures (bad config, unusable checkpoint, divergence, missing file, full or read-only disk, a
stalled or dead peer rank, a second Ctrl-C) into one-line errors. A run stopped by SIGTERM, SIGUSR1 or a first
Ctrl-C saves a checkpoint and exits 0 with one line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

import torch.distributed as dist

from megatron_dual.config import Config, ConfigError, add_config_args, load_config
from megatron_dual.engine.checkpoint import CheckpointError
from megatron_dual.parallel import watchdog
from megatron_dual.parallel.state import dist_env
from megatron_dual.trainer import Trainer, TrainingDivergedError

__all__ = ["train", "run", "add_train_args", "config_from_args", "main"]


def train(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` to its end (resuming per ``checkpoint.resume``); the run's summary."""
    return Trainer(cfg, quiet=quiet).fit()


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--resume",
        help="auto | none | restart (move the old run aside, start afresh) | a checkpoint path "
        "(shortcut for --set checkpoint.resume=...)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(args.config, overrides, preset=args.preset)


ORDINARY = (
    ConfigError,
    CheckpointError,
    TrainingDivergedError,
    FileNotFoundError,
    ValueError,
    watchdog.StalledRankError,
)
RESUMES = "the run resumes from its last complete checkpoint"


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (
            f"{where}no space left on device: free space (or point output_dir, checkpoint.dir or "
            f"logging.metrics_file elsewhere) and rerun; {RESUMES}"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}not writable ({e.strerror}): point output_dir or the file's field at a writable place"
    return f"{where}{e.strerror or e}; rerun once it is fixed: {RESUMES}"


def _one_line(e: BaseException, timeout_s: float | None) -> str | None:
    """The one-line message of an ordinary failure; None for a bug (which keeps its traceback)."""
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted by a second Ctrl-C: the current step was not saved; rerun the same command: {RESUMES}"
    if isinstance(e, ORDINARY):
        return str(e)
    if isinstance(e, ModuleNotFoundError):  # the checkout on an image without one of its packages
        return f"{e} (pip install -e . installs what megatron-dual needs)"
    if isinstance(e, OSError):
        return _os_error(e)
    rank, _, world = dist_env()
    stalled = watchdog.as_stalled(e, rank, world, timeout_s)
    return None if stalled is None else str(stalled)


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; 0 on success or after a requested stop (one line), 2 with a one-line ``error:``
    on an ordinary failure, 130 after a second Ctrl-C."""
    cfg = None
    try:
        cfg = config_from_args(args)
        summary = train(cfg, quiet=args.quiet)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except (Exception, KeyboardInterrupt) as e:
        line = _one_line(e, cfg.parallel.timeout if cfg is not None else None)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 2
    if dist_env()[0] == 0:
        if summary.get("stopped"):
            print(
                f"stopped by {summary['stopped']} after step {summary['steps']}: checkpoint "
                f"{summary.get('checkpoint')}; rerun the same command to continue"
            )
        else:
            print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-dual train", description="train a dual-objective language model")
    add_train_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
