"""What hangs on the training loop: see :mod:`megatron_dual.callbacks.base` for the hooks and their order."""

from __future__ import annotations

from megatron_dual.callbacks.base import Callback, load_callback
from megatron_dual.callbacks.checkpointing import Checkpointer
from megatron_dual.callbacks.evaluation import Validation, validation_losses
from megatron_dual.callbacks.monitoring import (
    LossPlot,
    MetricsFile,
    ProgressDisplay,
    SpeedMonitor,
    SummaryFile,
    TensorBoardLogger,
    WandbLogger,
)
from megatron_dual.callbacks.preemption import StopOnSignal

__all__ = [
    "Callback",
    "load_callback",
    "default_callbacks",
    "Checkpointer",
    "Validation",
    "validation_losses",
    "LossPlot",
    "MetricsFile",
    "ProgressDisplay",
    "SpeedMonitor",
    "SummaryFile",
    "TensorBoardLogger",
    "WandbLogger",
    "StopOnSignal",
]


def default_callbacks(cfg, is_main: bool, quiet: bool = False) -> list[Callback]:
    """The callbacks ``cfg`` asks for: signals, speed, validation, checkpoints and progress on every rank (they take
    part in collectives or stay silent off rank 0), files and sinks on rank 0 only, then ``train.callbacks``."""
    out: list[Callback] = [
        StopOnSignal(),
        SpeedMonitor(),
        Validation(),
        Checkpointer(),
        ProgressDisplay(disable=quiet or not is_main),
    ]
    if is_main:
        out += [MetricsFile(), SummaryFile()]
        if cfg.logging.wandb_project:
            out.append(WandbLogger())
        if cfg.logging.tensorboard:
            out.append(TensorBoardLogger())
        if cfg.logging.plot:
            out.append(LossPlot())
    return out + [load_callback(spec) for spec in cfg.train.callbacks]
