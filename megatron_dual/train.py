"""Entry point of training: ``python -m megatron_dual.train`` and ``megatron-dual train`` (the same function).

The loop itself is :class:`megatron_dual.trainer.Trainer`; this module only turns arguments into a config, runs it
and turns ordinary failures (bad config, unusable checkpoint, divergence, missing file) into one-line errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch.distributed as dist

from megatron_dual.config import PRESETS, Config, ConfigError, load_config
from megatron_dual.engine.checkpoint import CheckpointError
from megatron_dual.parallel.state import dist_env
from megatron_dual.trainer import Trainer, TrainingDivergedError

__all__ = ["train", "run", "add_train_args", "config_from_args", "main"]


def train(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` to its end (resuming per ``checkpoint.resume``); the run's summary."""
    return Trainer(cfg, quiet=quiet).fit()


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help=", ".join(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--resume", help="auto | none | a checkpoint path (shortcut for --set checkpoint.resume=...)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(args.config, overrides, preset=args.preset)


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; 0 on success, 2 with a one-line ``error:`` on an ordinary failure."""
    try:
        summary = train(config_from_args(args), quiet=args.quiet)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except (ConfigError, CheckpointError, TrainingDivergedError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist_env()[0] == 0:
        print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-dual train", description="train a dual-objective language model")
    add_train_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
