"""The training loop: the one place that ties config, data, model, optimizers, checkpoints and logging together.

One optimizer step = ``train.grad_accum`` micro-batch slots of ``train.micro_batch_size`` packed sequences. Each slot
runs exactly one objective (see :class:`ObjectiveSchedule`); the step's loss is ``alpha * L_AR + (1 - alpha) * L_MD``
with each objective normalised by its own token count over the step, so the accumulated gradient is exactly that
mixture whatever the per-slot token counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron_dual.config import Config, ConfigError, load_config
from megatron_dual.data.indexed import IndexedDataset
from megatron_dual.data.loader import DataPathError, DataPlan, build_datasets, parse_data_path
from megatron_dual.data.packing import PackedDataset
from megatron_dual.data.sampler import ResumableSampler
from megatron_dual.engine import checkpoint as ckpt
from megatron_dual.engine.ddp import DDPEngine
from megatron_dual.logging import MetricsLogger, Progress, plot_metrics
from megatron_dual.model.loss import labelled_loss
from megatron_dual.model.transformer import DualTransformer, flops_per_token, param_counts
from megatron_dual.objectives import (
    AR,
    MD,
    ObjectiveBatch,
    ObjectiveSchedule,
    ar_batch,
    loss_coefficients,
    masking_generator,
    md_batch,
)
from megatron_dual.optim.muon import build_optimizers
from megatron_dual.optim.schedules import build_scheduler
from megatron_dual.parallel.cross_entropy import parallel_labelled_loss
from megatron_dual.parallel.state import ParallelState, dist_env
from megatron_dual.parallel.tensor_parallel import parallelize_model, sync_sequence_parallel_grads

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "MI250X": 191.5e12, "MI300X": 1307e12}
VALID_SEED_OFFSET = 1_000_003


class TrainingDivergedError(RuntimeError):
    """A loss or gradient became NaN/inf; the message says where and which checkpoint holds the last good state."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
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
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), local_rank, dist.get_world_size()
        return rank, local_rank, world
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(f"launched with {world} ranks but MASTER_ADDR is not set: use torchrun, or export "
                          f"MASTER_ADDR/MASTER_PORT in the SLURM script (see examples/slurm/)")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, local_rank, world


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


@dataclass
class DataBundle:
    train: Any  # RepeatedPackedDataset or BlendedDataset: ds[i] -> {"tokens", "doc_ids"}, order already shuffled
    valid: Any  # PackedDataset / BlendedDataset or None
    fingerprint: str
    tokenizer_vocab: int
    plan: DataPlan | None = None
    shuffle: bool = False  # whether the sampler should shuffle again (no: the datasets' order is the shuffle)


def build_data(cfg: Config, dp_size: int = 1) -> DataBundle:
    """Datasets for ``cfg.data`` (megatron_dual.data.loader): blending by ``data.path`` weights, the unique subset of
    ``budget/R`` tokens repeated exactly ``data.repetitions`` times, train/valid split by documents."""
    d = cfg.data
    if not d.path.strip():
        raise ConfigError("data.path is empty: set it to the prefix of a .bin/.idx pair "
                          "(e.g. --set data.path=data/corpus_text_document); see tools/preprocess_data.py")
    step_tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * dp_size * d.seq_len
    run_tokens = cfg.train.steps * step_tokens
    budget = d.budget_tokens or run_tokens
    if budget < run_tokens:
        raise ConfigError(f"data.budget_tokens = {d.budget_tokens} is less than the {run_tokens:,} tokens training "
                          f"consumes (train.steps {cfg.train.steps} x {step_tokens:,} tokens per step): raise it or "
                          f"set it to 0")
    try:
        entries = parse_data_path(d.path)
    except DataPathError as e:
        raise ConfigError(str(e)) from e
    first = entries[0][1]
    cache_dir = d.cache_dir or f"{first}_cache"
    try:
        train, valid, fingerprint, plan = build_datasets(d.path, d.seq_len, d.seed, d.valid_fraction, budget,
                                                         d.repetitions, cache_dir=cache_dir)
    except ValueError as e:
        raise ConfigError(f"data.path = {d.path!r}: {e}") from e
    if len(train) == 0:
        raise ConfigError(f"data.path = {d.path!r}: too few training tokens for one sample of data.seq_len + 1 = "
                          f"{d.seq_len + 1} tokens")
    if valid is not None and len(valid) == 0:
        valid = None
    for _, prefix in entries[:4]:
        indexed = IndexedDataset(prefix)
        max_id = int(max(indexed.get(i).max(initial=0) for i in range(min(len(indexed), 64))))
        if max_id >= cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} but {prefix} holds token id {max_id}: "
                              f"set model.vocab_size to the tokenizer's vocabulary size")
    return DataBundle(train, valid, fingerprint, cfg.model.vocab_size, plan)


def collate(dataset: PackedDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    doc_ids = torch.from_numpy(np.stack([s["doc_ids"] for s in samples]).astype(np.int64))
    return tokens, doc_ids


def make_objective_batch(objective: str, tokens: torch.Tensor, doc_ids: torch.Tensor, cfg: Config,
                         generator: torch.Generator) -> ObjectiveBatch:
    if objective == AR:
        return ar_batch(tokens, doc_ids)
    o = cfg.objective
    return md_batch(tokens, doc_ids, generator, mask_token_id=o.mask_token_id, n_special=o.n_special, t_min=o.t_min)


class Trainer:
    def __init__(self, cfg: Config, *, quiet: bool = False) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out / "checkpoints"
        rank, local_rank, world = init_distributed(cfg)
        self.device = resolve_device(cfg.train.device, local_rank)
        self.par = ParallelState(world, rank, cfg.parallel.tp, cfg.objective.alpha, cfg.train.grad_accum,
                                 cfg.objective.rotate)
        self.is_main = rank == 0
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.precision = "bf16" if use_bf16 else "fp32"

        self.data = build_data(cfg, self.par.dp_size)
        torch.manual_seed(cfg.train.seed)
        self.model = DualTransformer(cfg.model).to(self.device)
        if self.par.tp_size > 1:
            # Built whole with the same seed on every rank, then sharded: initialisation equals the single-process
            # model's for any TP size.
            parallelize_model(self.model, self.par.tp_group, cfg.parallel.sequence_parallel)
        self.engine = DDPEngine(self.model, self.par, cfg.parallel.bucket_mb)
        self.optimizers = build_optimizers(self.model, cfg.optimizer)
        if cfg.parallel.distributed_muon and "muon" in self.optimizers:
            self.optimizers["muon"].distribute(self.par)
        self.schedulers = {k: build_scheduler(o, cfg.train.steps, cfg.schedule) for k, o in self.optimizers.items()}
        self.schedule: ObjectiveSchedule = self.par.schedule
        self.sampler = ResumableSampler(len(self.data.train), cfg.data.seed, self.data.fingerprint,
                                        shuffle=self.data.shuffle)
        self.step = 0
        self.tokens_seen = 0
        # tokens of one optimizer step over the whole job (all data-parallel ranks)
        self.tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * self.par.dp_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)["train"]
        self.peak = peak_flops(self.device)
        self.last_eval: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                "last_eval": self.last_eval}

    def save(self) -> Path:
        # Data-parallel replicas hold identical state: rank 0 writes, the others wait until it is on disk.
        path = self.ckpt_dir / ckpt.step_dir_name(self.step)
        extra = {"layout": self.par.describe()}
        if self.par.tp_size > 1:
            return ckpt.save_tp_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizers, self.schedulers,
                                           self.trainer_state(), self.cfg.to_dict(), self.par,
                                           keep_last=self.cfg.checkpoint.keep_last, extra=extra)
        if self.is_main:
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizers, self.schedulers,
                                        self.trainer_state(), self.cfg.to_dict(),
                                        keep_last=self.cfg.checkpoint.keep_last, extra=extra)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.par.world_size > 1:
            dist.barrier()

    def maybe_resume(self) -> Path | None:
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        if path is None:
            return None
        meta = ckpt.load_checkpoint(path, self.model, self.optimizers, self.schedulers,
                                    model_config=self.cfg.to_dict()["model"], parallel=self.par)
        state = meta["trainer_state"]
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {e}") from e
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.last_eval = dict(state.get("last_eval", {}))
        if meta["rng"] is None:
            raise ckpt.CheckpointError(f"{path} has no rng.pt: resuming would not be exact; pass --resume none to "
                                       f"start afresh or restore the file")
        ckpt.restore_rng_state(meta["rng"])
        return path

    # ------------------------------------------------------------------------------------------------ steps
    def _forward_loss(self, batch: ObjectiveBatch):
        with self.autocast:
            hidden = self.model(batch.input_ids, batch.mask)
            if self.par.tp_size > 1:
                return parallel_labelled_loss(self.model.head, hidden, batch.labels, batch.weights,
                                              self.cfg.objective.z_loss, tp_group=self.par.tp_group)
            return labelled_loss(self.model.head, hidden, batch.labels, batch.weights, self.cfg.objective.z_loss)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch: ``dp x grad_accum`` slots of ``micro_batch_size`` sequences.

        Every rank draws the same global sample indices; global slot ``g = dp_rank * grad_accum + slot`` reads
        ``indices[g * mbs : (g + 1) * mbs]`` and seeds its MD masks by ``(seed, step, g)``, so the step is the same
        computation whatever the number of data-parallel ranks.
        """
        cfg = self.cfg
        par = self.par
        mbs, slots = cfg.train.micro_batch_size, cfg.train.grad_accum
        indices = self.sampler.next_indices(mbs * slots * par.dp_size)
        batches = []
        for s, obj in enumerate(par.objectives(self.step)):
            g = par.dp_rank * slots + s
            tokens, doc_ids = collate(self.data.train, indices[g * mbs : (g + 1) * mbs])
            gen = masking_generator(cfg.train.seed, 0, self.step, g)
            batches.append(make_objective_batch(obj, tokens, doc_ids, cfg, gen).to(self.device))
        # Each objective is normalised by its token count over the whole job (the sum over its objective group).
        counts_t = torch.tensor([sum(b.n_tokens for b in batches if b.objective == o) for o in (AR, MD)],
                                dtype=torch.float64, device=self.device)
        par.all_reduce_dp(counts_t)
        counts = {AR: int(counts_t[0].item()), MD: int(counts_t[1].item())}
        coef = loss_coefficients(float(self.schedule.alpha), counts[AR], counts[MD])

        self.engine.zero_grad()
        # per objective: nll, z, correct, labelled; then loss and a non-finite flag
        stats = torch.zeros(10, dtype=torch.float64, device=self.device)
        bad: str | None = None
        for i, b in enumerate(batches):
            sums = self._forward_loss(b)
            loss = sums.weighted * coef[b.objective]
            if not torch.isfinite(loss):
                bad = bad or f"{b.objective.upper()} loss is {loss.item()}"
            last = i == len(batches) - 1
            with nullcontext() if last else self.engine.no_sync():
                loss.backward()
            o = 0 if b.objective == AR else 4
            stats[o] += sums.nll.item()
            stats[o + 1] += sums.z.item()
            stats[o + 2] += sums.correct.item()
            stats[o + 3] += sums.count
            stats[8] += loss.item()
        self.engine.finish_grad_sync()
        if self.par.tp_size > 1 and cfg.parallel.sequence_parallel:
            sync_sequence_parallel_grads(self.model, self.par.tp_group)  # sums over TP and DP commute
        stats[9] = 1.0 if bad else 0.0
        par.all_reduce_dp(stats)
        if stats[9] > 0:
            self._diverged(bad or "a loss on another data-parallel rank is not finite")

        clip = cfg.optimizer.grad_clip
        grad_norm = self.engine.clip_grad_norm_(clip if clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm.item()}")
        lr = self.optimizers[next(iter(self.optimizers))].param_groups[0]["lr"]
        for opt in self.optimizers.values():
            opt.step()
        for sch in self.schedulers.values():
            sch.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        metrics: dict[str, float] = {"loss": stats[8].item(), "lr": lr, "grad_norm": grad_norm.item(),
                                     "tokens": self.tokens_seen}
        for k, obj in enumerate((AR, MD)):
            nll, z, correct, labelled = (stats[4 * k + j].item() for j in range(4))
            if counts[obj]:
                metrics[f"{obj}_loss"] = nll / counts[obj]
                metrics[f"{obj}_z"] = z / counts[obj]
                metrics[f"{obj}_acc"] = correct / max(1.0, labelled)
            metrics[f"{obj}_tokens"] = counts[obj]
            metrics[f"{obj}_labelled"] = int(labelled)
        return metrics

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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out AR and MD loss (per-token NLL, same normalisation as training) on fixed batches and masks.

        Validation batches are dealt round-robin to the data-parallel ranks and the sums reduced, so the result
        does not depend on the number of ranks."""
        if self.data.valid is None:
            return {}
        cfg = self.cfg
        self.model.eval()
        mbs = cfg.train.micro_batch_size
        n = min(len(self.data.valid), cfg.train.eval_batches * mbs)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # AR nll, AR tokens, MD nll, MD tokens
        for j, start in enumerate(range(0, n, mbs)):
            if j % self.par.dp_size != self.par.dp_rank:
                continue
            tokens, doc_ids = collate(self.data.valid, list(range(start, min(n, start + mbs))))
            for k, obj in enumerate((AR, MD)):
                gen = masking_generator(cfg.train.seed + VALID_SEED_OFFSET, 0, 0, start)
                b = make_objective_batch(obj, tokens, doc_ids, cfg, gen).to(self.device)
                out = self._forward_loss(b)
                sums[2 * k] += out.nll.item()
                sums[2 * k + 1] += b.n_tokens
        self.par.all_reduce_dp(sums)
        self.model.train()
        result = {f"val_{obj}_loss": sums[2 * k].item() / sums[2 * k + 1].item()
                  for k, obj in enumerate((AR, MD)) if sums[2 * k + 1] > 0}
        result.update({f"val_{obj}_ppl": math.exp(min(50.0, result[f"val_{obj}_loss"]))
                       for obj in (AR, MD) if f"val_{obj}_loss" in result})
        return result

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``max_steps`` more steps, for tests that simulate an interruption)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        resumed = self.maybe_resume()
        metrics_path = Path(cfg.logging.metrics_file) if cfg.logging.metrics_file else self.out / "metrics.jsonl"
        wandb = ({"project": cfg.logging.wandb_project, "mode": cfg.logging.wandb_mode, "dir": str(self.out)}
                 if cfg.logging.wandb_project else None)
        logger = MetricsLogger(metrics_path, resume_step=self.step if resumed else 0, wandb=wandb,
                               tensorboard_dir=(self.out / "tb") if cfg.logging.tensorboard else None,
                               config=cfg.to_dict()) if self.is_main else None
        end = cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        progress = Progress(cfg.train.steps, start_step=self.step, print_every=cfg.logging.log_interval,
                            disable=self.quiet or not self.is_main)
        self._describe(progress, resumed)
        t_start = time.perf_counter()
        start_step = self.step
        try:
            while self.step < end:
                t0 = time.perf_counter()
                m = self.train_step()
                dt = time.perf_counter() - t0
                m["tokens_per_s"] = self.tokens_per_step / dt
                m["step_time"] = dt
                if self.peak:
                    m["mfu"] = m["tokens_per_s"] * self.flops_per_token / (self.peak * self.par.world_size)
                at_eval = self.step % cfg.train.eval_interval == 0 if cfg.train.eval_interval else False
                if cfg.train.eval_interval and (at_eval or self.step == cfg.train.steps):
                    self.last_eval = self.evaluate()
                    m.update(self.last_eval)
                    if self.last_eval:
                        progress.write(f"step {self.step}: " + ", ".join(
                            f"{k} {v:.4f}" for k, v in self.last_eval.items() if k.endswith("loss")))
                if logger is not None:
                    logger.log(self.step, m)
                progress.update(self.step, m)
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
            if self.step == cfg.train.steps and (not cfg.checkpoint.interval or self.step % cfg.checkpoint.interval):
                self.save()
        finally:
            progress.close()
            if logger is not None:
                logger.close()
        wall = time.perf_counter() - t_start
        steps_run = self.step - start_step
        tokens_run = steps_run * self.tokens_per_step
        summary = {"steps": self.step, "steps_this_run": steps_run, "wall_s": wall,
                   "tokens_per_s": tokens_run / wall if wall > 0 else 0.0, "tokens_seen": self.tokens_seen,
                   "alpha": str(self.schedule.alpha), **self.last_eval}
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.is_main and cfg.logging.plot and self.step == cfg.train.steps:
            title = f"{cfg.preset or 'custom'}  alpha={self.schedule.alpha}"
            plot_metrics(metrics_path, self.out / "loss.png", title=title)
        return summary

    def _describe(self, progress: Progress, resumed: Path | None) -> None:
        cfg = self.cfg
        counts = param_counts(self.model)
        progress.write(
            f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
            f"{self.device.type}, {self.precision}; {self.par.describe()}; "
            f"{len(self.data.train):,} training sequences of {cfg.data.seq_len} tokens"
            + (f"; resumed from {resumed} at step {self.step}" if resumed else ""))


def train(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    return Trainer(cfg, quiet=quiet).fit()


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help="tiny, dual-470m, dual-1b, dual-3b, dual-7b")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--resume", help="auto | none | a checkpoint path (shortcut for --set checkpoint.resume=...)")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(args.config, overrides, preset=args.preset)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-dual train", description="train a dual-objective language model")
    add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = train(cfg, quiet=args.quiet)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except (ConfigError, ckpt.CheckpointError, TrainingDivergedError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist_env()[0] == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
