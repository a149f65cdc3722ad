"""The training loop: a thin loop over an :class:`~megatron_dual.engine.base.Engine`, a data loader and callbacks.

Data flow per optimizer step: the :class:`~megatron_dual.data.dataloader.TrainDataLoader` hands over this rank's
micro-batch slots as objective batches (each slot runs exactly one objective, see
:class:`~megatron_dual.objectives.ObjectiveSchedule`); the model runs each slot, :func:`labelled_loss` scores the
labelled positions, and the step's loss is ``alpha * L_AR + (1 - alpha) * L_MD`` with each objective normalised by
its own token count over the whole job, so the accumulated gradient is exactly that mixture whatever the per-slot
token counts; the engine synchronises, clips and steps. Everything else (progress, metrics, validation, checkpoints,
plots, the summary) hangs on the loop as callbacks (:mod:`megatron_dual.callbacks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_dual.callbacks import Callback, default_callbacks
from megatron_dual.config import Config
from megatron_dual.data.dataloader import StepBatches, TrainDataLoader, build_data
from megatron_dual.engine import checkpoint as ckpt
from megatron_dual.engine.base import Engine
from megatron_dual.engine.ddp import DDPEngine
from megatron_dual.model.flops import objective_batch_flops, peak_flops
from megatron_dual.model.loss import LossSums, labelled_loss
from megatron_dual.model.transformer import DualTransformer
from megatron_dual.objectives import OBJECTIVES, ObjectiveBatch, ObjectiveBatcher, loss_coefficients
from megatron_dual.parallel.launch import setup_parallel
from megatron_dual.parallel.state import ParallelState

__all__ = ["Trainer", "TrainingDivergedError", "StepTotals"]

EngineFactory = Callable[[torch.nn.Module, ParallelState, Config, torch.device], Engine]


class TrainingDivergedError(RuntimeError):
    """A loss or gradient became NaN/inf; the message says where and which checkpoint holds the last good state."""


class StepTotals:
    """Per-objective sums of one step, accumulated on the device and read once (one ``.tolist()``).

    Row ``k`` of ``sums`` is objective ``OBJECTIVES[k]``: weighted NLL, weighted z, correct predictions, labelled
    positions, and the objective's share of the step loss; ``loss`` is the step loss summed in slot order."""

    FIELDS = ("nll", "z", "correct", "labelled", "loss")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(OBJECTIVES), len(self.FIELDS), dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.labelled = [0] * len(OBJECTIVES)

    def add(self, objective: str, sums: LossSums, loss: torch.Tensor) -> None:
        k = OBJECTIVES.index(objective)
        row = self.sums[k]
        row[0] += sums.nll
        row[1] += sums.z
        row[2] += sums.correct
        row[4] += loss.detach()
        self.loss += loss.detach()
        self.labelled[k] += sums.count

    def reduce(self, par: ParallelState) -> tuple[list[list[float]], list[list[float]], float]:
        """(local rows, rows summed over data-parallel ranks, summed step loss), in one device-to-host read."""
        self.sums[:, 3] = torch.tensor(self.labelled, dtype=torch.float64)
        local = self.sums.clone()
        total = torch.cat([self.sums.reshape(-1), self.loss.reshape(1)])
        par.all_reduce_dp(total)
        values = torch.cat([local.reshape(-1), total]).tolist()
        n = len(OBJECTIVES) * len(self.FIELDS)
        rows = [values[i : i + len(self.FIELDS)] for i in range(0, n, len(self.FIELDS))]
        summed = [values[n + i : n + i + len(self.FIELDS)] for i in range(0, n, len(self.FIELDS))]
        return rows, summed, values[-1]


class Trainer:
    def __init__(self, cfg: Config, *, quiet: bool = False, callbacks: Iterable[Callback] = (),
                 engine: EngineFactory | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out / "checkpoints"
        self.par, self.device = setup_parallel(cfg)
        self.is_main = self.par.rank == 0
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = build_data(cfg, self.par.dp_size)
        torch.manual_seed(cfg.train.seed)
        model = DualTransformer(cfg.model).to(self.device)
        self.engine = (engine or DDPEngine)(model, self.par, cfg, self.device)
        self.model = self.engine.model
        self.schedule = self.par.schedule
        # executed FLOPs per step, for MFU, only where a peak is known (computed on the host, in the loader)
        cost = (lambda b: objective_batch_flops(cfg.model, b)["total"]) if peak_flops(self.device) else None
        self.loader = TrainDataLoader(self.data.train, self.data.fingerprint, self.schedule,
                                      ObjectiveBatcher(cfg.objective, cfg.train.seed), seed=cfg.data.seed,
                                      micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.par.dp_rank,
                                      device=self.device, cost=cost)
        self.batches: StepBatches | None = None  # the step being run (callbacks read its FLOPs)
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: Path | None = None
        # tokens of one optimizer step over the whole job (all data-parallel ranks)
        self.tokens_per_step = self.loader.samples_per_step * cfg.data.seq_len
        self.callbacks = sorted([*default_callbacks(cfg, self.is_main, quiet), *callbacks],
                                key=lambda c: -c.priority)
        for cb in self.callbacks:
            cb.trainer = self

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The loop's own state (JSON): step, tokens, the data loader's position and every callback's state."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.loader.state_dict(),
                "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        saved = state.get("callbacks") or {"Validation": {"last_eval": state.get("last_eval", {})}}
        for cb in self.callbacks:
            cb.load_state_dict(saved.get(cb.name, {}))

    def save(self) -> Path:
        """A checkpoint of the current step (collective over all ranks)."""
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.engine.state_dict(),
                                    self.state_dict(), self.cfg.to_dict(), parallel=self.par,
                                    keep_last=self.cfg.checkpoint.keep_last, extra={"layout": self.par.describe()})

    def maybe_resume(self) -> Path | None:
        """Restore model, engine, loop and RNG state from ``checkpoint.resume``; the checkpoint used, or None."""
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        ckpt.load_model_state(path, self.model, self.par, model_config=self.cfg.to_dict()["model"])
        state, source = ckpt.read_engine_state(path, self.par)
        self.engine.load_state_dict(state, str(source))
        try:
            self.load_state_dict(meta["trainer_state"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {e}") from e
        rng = ckpt.read_rng_state(path)
        if rng is None:
            raise ckpt.CheckpointError(f"{path} has no rng.pt: resuming would not be exact; pass --resume none to "
                                       f"start afresh or restore the file")
        ckpt.restore_rng_state(rng)
        self.resumed_from = path
        return path

    # ------------------------------------------------------------------------------------------------ steps
    def forward_loss(self, batch: ObjectiveBatch) -> LossSums:
        """The model and the loss of one objective batch (call inside ``engine.autocast()``)."""
        hidden = self.model(batch.input_ids, batch.mask)
        return labelled_loss(self.model.head, hidden, batch.labels, batch.weights, self.cfg.objective.z_loss,
                             tp_group=self.par.tp_group)

    def train_step(self, step_batches: StepBatches) -> dict[str, float]:
        """One optimizer step over this rank's slots of the global batch; the step's metrics."""
        counts = torch.tensor(step_batches.local_tokens(), dtype=torch.float64, device=self.device)
        counts = [int(c) for c in self.par.all_reduce_dp(counts).tolist()]  # each objective's tokens in the job
        coef = loss_coefficients(float(self.schedule.alpha), *counts)
        self.engine.zero_grad()
        totals = StepTotals(self.device)
        for i, b in enumerate(step_batches.batches):
            with self.engine.autocast():
                sums = self.forward_loss(b)
            loss = sums.weighted * coef[b.objective]
            self.engine.backward(loss, last=i == len(step_batches.batches) - 1)
            totals.add(b.objective, sums, loss)
        self.engine.reduce_gradients()
        local, summed, step_loss = totals.reduce(self.par)
        self._check_loss(local, step_loss)
        grad_norm = self.engine.clip_grad_norm(self.cfg.optimizer.grad_clip).item()
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        lr = self.engine.lr
        self.engine.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return self._metrics(summed, counts, step_loss, lr, grad_norm)

    def _metrics(self, summed: list[list[float]], counts: list[int], loss: float, lr: float,
                 grad_norm: float) -> dict[str, float]:
        metrics: dict[str, float] = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen}
        for (nll, z, correct, labelled, _), obj, n in zip(summed, OBJECTIVES, counts, strict=True):
            if n:
                metrics[f"{obj}_loss"] = nll / n
                metrics[f"{obj}_z"] = z / n
                metrics[f"{obj}_acc"] = correct / max(1.0, labelled)
            metrics[f"{obj}_tokens"] = n
            metrics[f"{obj}_labelled"] = int(labelled)
        return metrics

    def _check_loss(self, local: list[list[float]], step_loss: float) -> None:
        if math.isfinite(step_loss):
            return
        bad = [f"{obj.upper()} loss is {row[4]}" for obj, row in zip(OBJECTIVES, local, strict=True)
               if not math.isfinite(row[4])]
        self._diverged(bad[0] if bad else "a loss on another data-parallel rank is not finite")

    def _diverged(self, what: str) -> None:
        # Nothing of this step was applied yet: the parameters are those after step self.step, so save them
        # unless they are themselves non-finite, in which case the last saved checkpoint is the last good state.
        if all(torch.isfinite(p).all() for p in self.model.parameters()):
            path: Path | None = self.save()
        else:
            path = ckpt.find_latest_checkpoint(self.ckpt_dir)
        where = f"is saved in {path}" if path else "was never saved (no checkpoint exists)"
        raise TrainingDivergedError(
            f"training diverged at step {self.step + 1}: {what}. The last good state {where}; lower optimizer.lr "
            f"or raise schedule.warmup_steps and resume with --resume {path}")

    # ------------------------------------------------------------------------------------------------ loop
    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.maybe_resume()
        self._call("pre_train")

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``max_steps`` more steps, for tests that simulate an interruption); the
        run's summary."""
        try:
            self._start()
            end = self.cfg.train.steps if max_steps is None else min(self.cfg.train.steps, self.step + max_steps)
            t_start, start_step = time.perf_counter(), self.step
            while self.step < end:
                self._call("pre_step", self.step + 1)
                self.batches = self.loader.batches(self.step)
                metrics = self.train_step(self.batches)
                self._call("post_step", self.step, metrics)
                self._call("log_metrics", self.step, metrics)
                self._call("end_step", self.step)
            summary = self._summary(time.perf_counter() - t_start, self.step - start_step)
            self._call("post_train", summary)
        except BaseException as e:
            self._call("on_error", e)
            raise
        finally:
            self._call("close")
            self.loader.close()
        return summary

    def _summary(self, wall: float, steps_run: int) -> dict[str, Any]:
        tokens_run = steps_run * self.tokens_per_step
        return {"steps": self.step, "steps_this_run": steps_run, "wall_s": wall,
                "tokens_per_s": tokens_run / wall if wall > 0 else 0.0, "tokens_seen": self.tokens_seen,
                "alpha": str(self.schedule.alpha)}
