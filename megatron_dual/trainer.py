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
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_dual import run_dir
from megatron_dual.callbacks import Callback, default_callbacks
from megatron_dual.callbacks.monitoring import metrics_path
from megatron_dual.config import Config, dump_yaml
from megatron_dual.data.dataloader import StepBatches, TrainDataLoader, build_data
from megatron_dual.engine import build_engine
from megatron_dual.engine import checkpoint as ckpt
from megatron_dual.engine.base import Engine
from megatron_dual.model.flops import objective_batch_flops, peak_flops
from megatron_dual.model.loss import LossSums, labelled_loss
from megatron_dual.model.transformer import DualTransformer
from megatron_dual.objectives import OBJECTIVES, ObjectiveBatch, ObjectiveBatcher, effective_alpha, step_coefficients
from megatron_dual.parallel import watchdog
from megatron_dual.parallel.launch import setup_parallel
from megatron_dual.parallel.state import ParallelState
from megatron_dual.resume import SCHEDULE_FIELDS, matches, resume_changes, saved_dp_size

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
    def __init__(
        self,
        cfg: Config,
        *,
        quiet: bool = False,
        callbacks: Iterable[Callback] = (),
        engine: EngineFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out / "checkpoints"
        self.par, self.device = setup_parallel(cfg)
        self.is_main = self.par.rank == 0
        self._check_outputs()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = build_data(cfg, self.par.dp_size, extending=self._resuming())
        torch.manual_seed(cfg.train.seed)
        model = DualTransformer(cfg.model).to(self.device)
        self.engine = (engine or build_engine)(model, self.par, cfg, self.device)
        self.model = self.engine.model
        self.schedule = self.par.schedule
        # executed FLOPs per step, for MFU, only where a peak is known (computed on the host, in the loader)
        cost = (lambda b: objective_batch_flops(cfg.model, b)["total"]) if peak_flops(self.device) else None
        self.loader = TrainDataLoader(
            self.data.train,
            self.data.fingerprint,
            self.schedule,
            ObjectiveBatcher(cfg.objective, cfg.train.seed),
            seed=cfg.data.seed,
            micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.par.dp_rank,
            device=self.device,
            cost=cost,
        )
        self.batches: StepBatches | None = None  # the step being run (callbacks read its FLOPs)
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: Path | None = None
        self.resume_changes: list[tuple[str, Any, Any]] = []  # settings changed since the checkpoint resumed from
        self.last_checkpoint: Path | None = None  # the checkpoint of step ``saved_step``, written or resumed from
        self.saved_step: int | None = None
        self.stop_reason: str | None = None  # set by request_stop(); the loop ends after the current step
        self._restarted = False
        # tokens of one optimizer step over the whole job (all data-parallel ranks)
        self.tokens_per_step = self.loader.samples_per_step * cfg.data.seq_len
        self.callbacks = sorted([*default_callbacks(cfg, self.is_main, quiet), *callbacks], key=lambda c: -c.priority)
        for cb in self.callbacks:
            cb.trainer = self

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The loop's own state (JSON): step, tokens, the data loader's position and every callback's state."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "sampler": self.loader.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        saved = state.get("callbacks") or {"Validation": {"last_eval": state.get("last_eval", {})}}
        for cb in self.callbacks:
            cb.load_state_dict(saved.get(cb.name, {}))

    def save(self) -> Path:
        """A checkpoint of the current step (collective over all ranks)."""
        path = self.engine.save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.state_dict(),
            self.cfg.to_dict(),
            self.par,
            keep_last=self.cfg.checkpoint.keep_last,
            extra={"layout": self.par.describe()},
        )
        self.saved_step, self.last_checkpoint = self.step, path
        return path

    def maybe_resume(self) -> Path | None:
        """Restore model, engine, loop and RNG state from ``checkpoint.resume``; the checkpoint used, or None. With
        ``auto``, a newest checkpoint whose files are damaged is skipped for the previous complete one (said in one
        line); all ranks agree on the checkpoint they resume from."""
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        if path is None:
            return None
        auto = self.cfg.checkpoint.resume.strip().lower() == "auto"
        older = [p for p in ckpt.list_checkpoints(path.parent) if p.name < path.name][::-1] if auto else []
        for candidate, fallback in zip([path, *older], [*older, None], strict=True):
            error = self._agree(candidate, self._try_load(candidate))
            if error is None:
                self.resumed_from = self.last_checkpoint = candidate
                self.saved_step = self.step
                for key, old, new in self.resume_changes:
                    self.say(f"resume: {key} {old} -> {new} applied")
                return candidate
            if fallback is None:
                raise error
            self.say(f"warning: {error}; resuming from the previous complete checkpoint {fallback} instead")
        return None

    def _try_load(self, path: Path) -> ckpt.CheckpointCorruptError | None:
        try:
            self._load(path)
        except ckpt.CheckpointCorruptError as e:
            return e
        return None

    def _agree(self, path: Path, error: ckpt.CheckpointCorruptError | None) -> ckpt.CheckpointCorruptError | None:
        """With several ranks: a checkpoint unusable on any rank is unusable on all (they must resume together)."""
        if self.par.world_size > 1:
            watchdog.phase(f"resume agreement on {path.name}")
            flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and error is None:
                error = ckpt.CheckpointCorruptError(f"{path} is unusable on another rank")
        return error

    def _resuming(self) -> bool:
        """Whether ``checkpoint.resume`` names a checkpoint (errors about it are left to :meth:`maybe_resume`)."""
        return self._resume_path() is not None

    def _resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names, or None (also when it names none: :meth:`maybe_resume`
        reports that)."""
        try:
            return ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        except ckpt.CheckpointError:
            return None

    def _load(self, path: Path) -> None:
        meta = ckpt.read_meta(path)
        changes = resume_changes(
            meta.get("config"),
            self.cfg.to_dict(),
            where=path,
            dp=self.par.dp_size,
            dp_saved=saved_dp_size(meta.get("extra"), self.par.dp_size),
        )
        self.engine.load_checkpoint(path, self.par, model_config=self.cfg.to_dict()["model"])
        self._apply_changes(path, changes)
        try:
            self.load_state_dict(meta["trainer_state"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {e}") from e
        rng = ckpt.read_rng_state(path)
        if rng is None:
            raise ckpt.CheckpointCorruptError(
                f"{path} has no rng.pt: resuming would not be exact; restore the file "
                f"or start afresh with --resume restart"
            )
        ckpt.restore_rng_state(rng)

    def _apply_changes(self, path: Path, changes: list[tuple[str, Any, Any]]) -> None:
        """Make the settings changed since checkpoint ``path`` take effect on the restored state; one line each."""
        scheduled = [k for k, _, _ in changes if matches(k, SCHEDULE_FIELDS)]
        if scheduled and not self.engine.apply_schedule(self.cfg):
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: engine {self.cfg.engine.name} cannot apply a "
                f"changed {scheduled[0]} to restored optimizer state; set it back"
            )
        self.resume_changes = changes

    # ------------------------------------------------------------------------------------------------ steps
    def forward_loss(self, batch: ObjectiveBatch) -> LossSums:
        """The model and the loss of one objective batch (call inside ``engine.autocast()``)."""
        hidden = self.model(batch.input_ids, batch.mask)
        return labelled_loss(
            self.model.head,
            hidden,
            batch.labels,
            batch.weights,
            self.cfg.objective.z_loss,
            tp_group=self.par.tp_group,
            n_labelled=batch.n_labelled,
        )

    def train_step(self, step_batches: StepBatches) -> dict[str, float]:
        """One optimizer step over this rank's slots of the global batch; the step's metrics."""
        watchdog.phase("token counts all-reduce")
        counts = torch.tensor(step_batches.local_tokens(), dtype=torch.float64, device=self.device)
        counts = [int(c) for c in self.par.all_reduce_dp(counts).tolist()]  # each objective's tokens in the job
        slots = self.schedule.counts(step_batches.step)  # this step's allocation (alpha schedules change it)
        coef = step_coefficients(slots, dict(zip(OBJECTIVES, counts, strict=True)), self.cfg.objective.recipe)
        self.engine.zero_grad()
        totals = StepTotals(self.device)
        watchdog.phase("forward/backward (tensor-parallel collectives, gradient bucket all-reduces)")
        with self.engine.step_region():  # one region per step: weight casts are not redone per micro-batch
            for i, b in enumerate(step_batches.batches):
                with self.engine.autocast():
                    sums = self.forward_loss(b)
                loss = sums.weighted * coef[b.objective]
                self.engine.backward(loss, last=i == len(step_batches.batches) - 1)
                totals.add(b.objective, sums, loss)
        watchdog.phase("gradient all-reduce")
        self.engine.reduce_gradients()
        watchdog.phase("loss sums all-reduce")
        local, summed, step_loss = totals.reduce(self.par)
        self._check_loss(local, step_loss, step_batches.start)
        watchdog.phase("gradient-norm all-reduce")
        grad_norm = self.engine.clip_grad_norm(self.cfg.optimizer.grad_clip).item()
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}", step_batches.start)
        lr = self.engine.lr
        watchdog.phase("optimizer step (distributed Muon broadcasts)")
        self.engine.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        metrics = self._metrics(summed, counts, step_loss, lr, grad_norm)
        alpha = self.schedule.alpha_at(step_batches.step)  # the realised alpha (AR share of the slots) of this step
        metrics["alpha"] = float(alpha)
        if self.cfg.objective.recipe != "paper":
            metrics["alpha_effective"] = float(effective_alpha(alpha, self.cfg.objective.recipe))
        return metrics

    def _metrics(
        self, summed: list[list[float]], counts: list[int], loss: float, lr: float, grad_norm: float
    ) -> dict[str, float]:
        metrics: dict[str, float] = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen}
        for (nll, z, correct, labelled, _), obj, n in zip(summed, OBJECTIVES, counts, strict=True):
            if obj not in self.schedule.objectives:
                continue
            if n:
                metrics[f"{obj}_loss"] = nll / n
                metrics[f"{obj}_z"] = z / n
                metrics[f"{obj}_acc"] = correct / max(1.0, labelled)
            metrics[f"{obj}_tokens"] = n
            metrics[f"{obj}_labelled"] = int(labelled)
        return metrics

    def _check_loss(self, local: list[list[float]], step_loss: float, start: int) -> None:
        if math.isfinite(step_loss):
            return
        bad = [
            f"{obj.upper()} loss is {row[4]}"
            for obj, row in zip(OBJECTIVES, local, strict=True)
            if not math.isfinite(row[4])
        ]
        self._diverged(bad[0] if bad else "a loss on another data-parallel rank is not finite", start)

    def _diverged(self, what: str, start: int) -> None:
        """Nothing of the failed step was applied yet: the parameters are those after step ``self.step`` and the
        loader goes back to ``start``, so the state saved is exactly the one before the failed step. A checkpoint
        of this step that this run wrote or resumed from is pointed to, never replaced; non-finite parameters leave
        the newest checkpoint as the last good state."""
        self.loader.rewind(start)
        if self.saved_step == self.step and self.last_checkpoint is not None:
            path: Path | None = self.last_checkpoint
        elif all(torch.isfinite(p).all() for p in self.model.parameters()):
            path = self.save()
        else:
            path = ckpt.find_latest_checkpoint(self.ckpt_dir)
        fix = "lower optimizer.lr or raise schedule.warmup_steps"
        if path is None:
            raise TrainingDivergedError(
                f"training diverged at step {self.step + 1}: {what}. No good state was saved (no checkpoint exists "
                f"and the parameters are not finite); {fix} and start afresh with --resume restart"
            )
        raise TrainingDivergedError(
            f"training diverged at step {self.step + 1}: {what}. The last good state is saved in {path}; {fix} and "
            f"resume from it with --resume {path}"
        )

    # ------------------------------------------------------------------------------------------------ loop
    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (and save a checkpoint); safe from a signal handler."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def _stop_agreed(self) -> bool:
        """Whether to stop now; with several ranks the request of any rank (one tiny all-reduce per step)."""
        requested = self.stop_reason is not None
        if self.par.world_size == 1:
            return requested
        watchdog.phase("stop-request all-reduce")
        flag = torch.tensor([float(requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = bool(flag.item())
        if agreed and self.stop_reason is None:
            self.stop_reason = "a stop request on another rank"
        return agreed

    def say(self, line: str) -> None:
        """A one-line notice on rank 0 (also when quiet: it says something the user must know)."""
        if self.is_main:
            print(line, file=sys.stderr, flush=True)

    def _check_outputs(self) -> None:
        """Before any work: the places this rank writes to are writable, and a fresh start never lands on a run."""
        c = self.cfg.checkpoint
        if self.par.dp_rank == 0:
            run_dir.check_writable(
                self.out,
                self.ckpt_dir,
                metrics_path(self) if self.is_main else None,
                "checkpoint.dir" if c.dir else "output_dir",
            )
        mode = c.resume.strip().lower()
        if mode == "none":
            run_dir.refuse_fresh_start(self.out, ckpt.list_checkpoints(self.ckpt_dir))
        elif mode not in ("auto", "restart") and (path := self._resume_path()) is not None:
            step = int(ckpt.read_meta(path)["step"])
            later = [p for p in ckpt.list_checkpoints(self.ckpt_dir) if ckpt.step_of(p) > step]
            run_dir.refuse_foreign_resume(self.out, self.ckpt_dir, path, step, later)

    def _restart(self) -> None:
        """``checkpoint.resume=restart``: the old run's artefacts go to ``<output_dir>/previous/<time>/``."""
        if self.is_main:
            moved = run_dir.move_run_aside(self.out, self.ckpt_dir, metrics_path(self))
            if moved is not None:
                self.say(f"restart: the previous run was moved to {moved}")
        if self.par.world_size > 1:
            watchdog.phase("restart barrier")
            dist.barrier()
        self._restarted = True

    def _start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.checkpoint.resume.strip().lower() == "restart" and not self._restarted:
            self._restart()
        if self.maybe_resume() is None and self.cfg.checkpoint.init_from:
            self._init_weights(self.cfg.checkpoint.init_from)
        if self.is_main:  # after a successful resume: a refused one leaves the run's config.yaml as it was
            (self.out / "config.yaml").write_text(dump_yaml(self.cfg.to_dict()))
        self._call("pre_train")

    def _init_weights(self, where: str) -> None:
        """Fine-tuning / continued pre-training: the model's weights (any TP size) from ``checkpoint.init_from``."""
        path = ckpt.resolve_resume(where, Path(where), what="checkpoint.init_from =")
        if path is None:
            raise ckpt.CheckpointError(f"checkpoint.init_from = {where!r} names no checkpoint (give a path)")
        ckpt.load_model_state(path, self.model, self.par, model_config=self.cfg.to_dict()["model"])
        self.say(f"initialised the model from {path} (optimizer, schedule and data start anew)")

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``max_steps`` more steps, for tests that simulate an interruption); the
        run's summary."""
        try:
            self._start()
            end = self.cfg.train.steps if max_steps is None else min(self.cfg.train.steps, self.step + max_steps)
            t_start, start_step = time.perf_counter(), self.step
            while self.step < end and not self._stop_agreed():
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
        summary = {
            "steps": self.step,
            "steps_this_run": steps_run,
            "wall_s": wall,
            "tokens_per_s": tokens_run / wall if wall > 0 else 0.0,
            "tokens_seen": self.tokens_seen,
            "alpha": str(self.schedule.alpha),
        }
        if self.stop_reason is not None:
            summary["stopped"] = self.stop_reason
        return summary
