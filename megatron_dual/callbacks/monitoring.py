"""Callbacks that watch the run: throughput and MFU, the progress display, metrics sinks, the summary and plots."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_dual.callbacks.base import Callback
from megatron_dual.logging import JSONLSink, Progress, TensorBoardSink, WandbSink, plot_metrics
from megatron_dual.model.flops import matmul_ceiling, mfu, peak_flops
from megatron_dual.model.transformer import DualTransformer, param_counts

__all__ = [
    "SpeedMonitor",
    "ProgressDisplay",
    "MetricsFile",
    "WandbLogger",
    "TensorBoardLogger",
    "SummaryFile",
    "LossPlot",
]


class SpeedMonitor(Callback):
    """``tokens_per_s`` and ``step_time`` (data loading included) of every step; on a GPU of known peak also ``mfu``:
    the FLOPs this rank's slots executed (attention as each mask runs it, MD bidirectional, the head at labelled
    positions only; ``model/flops.py``), shared over the TP group, per second, against the device's dense bf16
    peak, and ``mfu_ceiling`` against the matmul ceiling measured once at start."""

    priority = 100

    def pre_train(self) -> None:
        tr = self.trainer
        self.peak = peak_flops(tr.device)
        self.ceiling = matmul_ceiling(tr.device) if self.peak else None
        self._t0 = time.perf_counter()

    def pre_step(self, step: int) -> None:
        self._t0 = time.perf_counter()

    def post_step(self, step: int, metrics: dict[str, Any]) -> None:
        tr = self.trainer
        dt = time.perf_counter() - self._t0
        metrics["tokens_per_s"] = tr.tokens_per_step / dt
        metrics["step_time"] = dt
        if self.peak and tr.batches is not None:
            flops = tr.batches.flops / tr.par.tp_size
            metrics["mfu"] = mfu(flops, dt, self.peak)
            metrics["mfu_ceiling"] = mfu(flops, dt, self.ceiling)


def metrics_path(trainer: Any) -> Path:
    cfg = trainer.cfg
    return Path(cfg.logging.metrics_file) if cfg.logging.metrics_file else trainer.out / "metrics.jsonl"


class MetricsFile(Callback):
    """Every step's metrics as a line of ``metrics.jsonl`` (kept consistent across resumes, see JSONLSink)."""

    priority = 60

    def pre_train(self) -> None:
        tr = self.trainer
        self.sink = JSONLSink(metrics_path(tr), resume_step=tr.step if tr.resumed_from else 0)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.sink.log(step, metrics)

    def close(self) -> None:
        if hasattr(self, "sink"):
            self.sink.close()


class WandbLogger(Callback):
    priority = 55

    def pre_train(self) -> None:
        tr = self.trainer
        lg = tr.cfg.logging
        self.sink = WandbSink(lg.wandb_project, lg.wandb_mode, tr.out, tr.cfg.to_dict())

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.sink.log(step, metrics)

    def close(self) -> None:
        if hasattr(self, "sink"):
            self.sink.close()


class TensorBoardLogger(Callback):
    priority = 55

    def pre_train(self) -> None:
        tr = self.trainer
        self.sink = TensorBoardSink(tr.out / "tb", resume_step=tr.step if tr.resumed_from else 0)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.sink.log(step, metrics)

    def close(self) -> None:
        if hasattr(self, "sink"):
            self.sink.close()


def model_param_counts(model_cfg: Any) -> dict[str, int]:
    """Parameter counts of the whole model, from a meta-device copy built from its config: this rank's copy holds
    only its TP shards (and, under ZeRO-3, empty placeholders), so counting it would show a fraction of the model."""
    with torch.device("meta"):
        return param_counts(DualTransformer(model_cfg))


class ProgressDisplay(Callback):
    """A tqdm bar on a terminal, plain lines every ``logging.log_interval`` steps otherwise; validation lines."""

    priority = 50

    def __init__(self, disable: bool = False) -> None:
        super().__init__()
        self.disable = disable

    def pre_train(self) -> None:
        tr = self.trainer
        self.progress = Progress(
            tr.cfg.train.steps, start_step=tr.step, print_every=tr.cfg.logging.log_interval, disable=self.disable
        )
        counts = model_param_counts(tr.cfg.model)
        self.progress.write(
            f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
            f"{tr.device.type}, {tr.engine.precision}; {tr.par.describe()}; "
            f"{len(tr.data.train):,} training sequences of {tr.cfg.data.seq_len} tokens"
            + (f"; resumed from {tr.resumed_from} at step {tr.step}" if tr.resumed_from else "")
        )

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        val = {k: v for k, v in metrics.items() if k.startswith("val_") and k.endswith("loss")}
        if val:
            self.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        self.progress.update(step, metrics)

    def close(self) -> None:
        if hasattr(self, "progress"):
            self.progress.close()


class SummaryFile(Callback):
    """``summary.json``: steps, wall time, throughput, alpha and the last validation losses."""

    priority = -50

    def post_train(self, summary: dict[str, Any]) -> None:
        (self.trainer.out / "summary.json").write_text(json.dumps(summary, indent=2))


class LossPlot(Callback):
    """``loss.png``: training and validation losses of both objectives, drawn when the run reaches its last step.
    Without matplotlib (a bare GPU image) the run still ends well: one line says the plot was not drawn."""

    priority = -60

    def post_train(self, summary: dict[str, Any]) -> None:
        tr = self.trainer
        if tr.step == tr.cfg.train.steps:
            title = f"{tr.cfg.preset or 'custom'}  alpha={tr.schedule.alpha}"
            try:
                plot_metrics(metrics_path(tr), tr.out / "loss.png", title=title)
            except ModuleNotFoundError as e:
                tr.say(f"loss.png not drawn: {e}; the losses are in {metrics_path(tr)} (logging.plot=false skips it)")
