"""Typed configuration, presets, YAML loading, dotted overrides and validation.

A config is a tree of dataclasses. Every user-facing entry point builds one through :func:`load_config`, which
applies, in order: the preset, the YAML file (which may name a preset itself), and ``--set a.b=value`` overrides.
Validation errors name the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field is unknown, mistyped or out of range; the message names the field and value."""


# Floats given for alpha are read as the nearest fraction with a denominator up to this (e.g. 0.984375 -> 63/64).
ALPHA_MAX_DENOMINATOR = 1 << 16
PRECISIONS = ("auto", "bf16", "fp32")  # train.precision: auto is bf16 on GPU, fp32 on CPU
DIST_BACKENDS = ("auto", "nccl", "gloo")  # parallel.backend: auto is nccl on CUDA, gloo on CPU
PACKINGS = ("auto", "concat", "reference")  # data.packing (megatron_dual.data.packing.LAYOUTS, or auto: by recipe)


def _check(cond: bool, field_: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_} = {value!r} is not allowed: {allowed}")


@dataclass
class ModelConfig:
    n_layers: int = 24
    hidden_size: int = 1024
    n_heads: int = 16
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA); an int once validated
    head_dim: int | None = None  # None: hidden_size // n_heads; an int once validated
    intermediate_size: int = 3554
    vocab_size: int = 51200
    max_seq_len: int = 2048
    rope_theta: float = 160_000.0
    norm_eps: float = 1e-7
    attention_backend: str = "auto"  # auto | sdpa | triton | flash | flex (megatron_dual/model/attention.py)
    fused_ops: str = "auto"  # fused Triton norm/rotary/SwiGLU/linear+CE: auto (triton on CUDA) | none | triton
    pad_intermediate_to: int = 1  # MLP built this-aligned wide with zero units (64: 3554 -> 3584); 1: no padding

    def validate(self) -> None:
        """Check the fields and resolve null ``n_kv_heads`` / ``head_dim`` to ints. Idempotent, and a value that an
        earlier validation derived (and nobody changed since) is derived afresh, so that changing ``hidden_size``
        or ``n_heads`` of a validated config and validating again gives the matching head fields."""
        from megatron_dual.model.attention import BACKENDS
        from megatron_dual.model.fused import FUSED_OPS

        for name, value in self.__dict__.pop("_derived", {}).items():
            if getattr(self, name) == value:
                setattr(self, name, None)
        for name in ("n_layers", "hidden_size", "n_heads", "intermediate_size", "vocab_size", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "must be a positive integer")
        if self.head_dim is None:
            _check(
                self.hidden_size % self.n_heads == 0,
                "model.hidden_size",
                self.hidden_size,
                f"must be divisible by model.n_heads = {self.n_heads} (or set model.head_dim)",
            )
        else:
            _check(self.head_dim > 0, "model.head_dim", self.head_dim, "must be a positive integer")
        if self.n_kv_heads is not None:
            _check(
                self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                "model.n_kv_heads",
                self.n_kv_heads,
                f"must be a positive divisor of model.n_heads = {self.n_heads}",
            )
        self._resolve_heads()
        _check(self.head_dim % 2 == 0, "model.head_dim", self.head_dim, "must be even (rotary embeddings rotate pairs)")
        _check(
            math.isfinite(self.rope_theta) and self.rope_theta > 0,
            "model.rope_theta",
            self.rope_theta,
            "must be a positive finite number",
        )
        _check(0 < self.norm_eps < 1, "model.norm_eps", self.norm_eps, "must be in (0, 1)")
        _check(
            self.attention_backend in BACKENDS,
            "model.attention_backend",
            self.attention_backend,
            f"one of {', '.join(BACKENDS)}",
        )
        _check(
            self.fused_ops in FUSED_OPS,
            "model.fused_ops",
            self.fused_ops,
            f"one of {', '.join(FUSED_OPS)} (auto: triton on CUDA, none on CPU)",
        )
        _check(
            self.pad_intermediate_to >= 1,
            "model.pad_intermediate_to",
            self.pad_intermediate_to,
            "must be >= 1 (1: no padding; 64: the MLP runs 64-aligned wide with zero units)",
        )

    def _resolve_heads(self) -> None:
        derived = {}
        if self.n_kv_heads is None:
            self.n_kv_heads = derived["n_kv_heads"] = self.n_heads
        if self.head_dim is None:
            self.head_dim = derived["head_dim"] = self.hidden_size // self.n_heads
        self._derived = derived  # not a field: neither saved nor compared


def resolve_model_dict(model: Mapping[str, Any]) -> dict[str, Any]:
    """A saved ``config["model"]`` with null ``n_kv_heads`` / ``head_dim`` resolved as validation resolves them, so
    that a checkpoint written before they were resolved compares equal to today's (validated) config."""
    out = dict(model)
    n_heads, hidden = out.get("n_heads"), out.get("hidden_size")
    if not isinstance(n_heads, int) or not isinstance(hidden, int) or n_heads <= 0:
        return out
    m = ModelConfig(n_heads=n_heads, hidden_size=hidden, n_kv_heads=out.get("n_kv_heads"), head_dim=out.get("head_dim"))
    m._resolve_heads()
    out.update(n_kv_heads=m.n_kv_heads, head_dim=m.head_dim)
    return out


@dataclass
class ObjectiveConfig:
    # Weight of the autoregressive objective; MD gets 1 - alpha. Accepts "3/4"-style fractions in YAML/--set.
    alpha: float = 0.75
    t_min: float = 1e-3  # MD mask rate t ~ U(t_min, 1) keeps 1/t finite
    z_loss: float = 1e-4
    n_special: int = 16  # ids below this are never masked
    mask_token_id: int = 4
    # step: rotate the objective assignment over slots every step | epoch: fixed per slot for a data epoch (the
    # reference) | none. true / false (the former boolean) read as step / none.
    rotate: str | bool = "step"
    # paper: the paper's equations (README) | reference: the paper's training code (AR x 2.0, MD weight
    # 1/(smoothed realised mask fraction), both over B x T positions, see megatron_dual/objectives.py)
    recipe: str = "paper"
    # alpha over steps instead of a constant: "0:1, 6144:63/64" (piecewise constant) or "linear 1 -> 1/8"
    alpha_schedule: str = ""
    # more than two objectives, e.g. "ar=3/4 md=1/8 prefix=1/8" (replaces alpha); "" = alpha over AR and MD
    mix: str = ""
    prefix_range: tuple[float, float] = (0.0, 1.0)  # prefix-LM: prefix = floor(f * seq_len), f ~ U(range)
    epoch_steps: int = 0  # rotate = epoch: steps per epoch; 0 = train.steps / data.repetitions (as the reference)

    def validate(self, vocab_size: int) -> None:
        """The fields, the token ids against ``model.vocab_size``; alpha against the launch is checked by
        :meth:`Config.validate`."""
        from megatron_dual.objectives import PREFIX, RECIPES, ROTATIONS, parse_alpha_schedule, parse_mix

        _check(0.0 <= self.alpha <= 1.0, "objective.alpha", self.alpha, "must be in [0, 1] (1 = pure AR, 0 = pure MD)")
        _check(0.0 < self.t_min < 1.0, "objective.t_min", self.t_min, "must be in (0, 1)")
        _check(self.z_loss >= 0, "objective.z_loss", self.z_loss, "must be >= 0")
        _check(
            0 <= self.mask_token_id < vocab_size,
            "objective.mask_token_id",
            self.mask_token_id,
            f"must be a token id below model.vocab_size = {vocab_size}",
        )
        _check(0 < self.n_special < vocab_size, "objective.n_special", self.n_special, "must be in (0, vocab_size)")
        self.rotate = _rotation(self.rotate)
        _check(
            self.rotate in ROTATIONS,
            "objective.rotate",
            self.rotate,
            f"one of {', '.join(ROTATIONS)} (or true / false for step / none)",
        )
        _check(self.recipe in RECIPES, "objective.recipe", self.recipe, f"one of {', '.join(RECIPES)}")
        lo, hi = self.prefix_range
        _check(0 <= lo <= hi <= 1, "objective.prefix_range", list(self.prefix_range), "needs 0 <= low <= high <= 1")
        _check(self.epoch_steps >= 0, "objective.epoch_steps", self.epoch_steps, "must be >= 0 (0: steps / R)")
        mix = parse_mix(self.mix) if self.mix else {}
        if self.alpha_schedule:
            parse_alpha_schedule(self.alpha_schedule)
        _check(
            not (mix and self.alpha_schedule),
            "objective.alpha_schedule",
            self.alpha_schedule,
            "cannot be combined with objective.mix (a schedule is over alpha, AR vs MD)",
        )
        _check(
            self.recipe == "paper" or not mix.get(PREFIX),
            "objective.mix",
            self.mix,
            "prefix is not part of objective.recipe = reference (the reference trains AR and MD only)",
        )


# boolean spellings taken from strings: the config's YAML reads only true/false as booleans (YAML 1.2), so YAML 1.1's
# yes/no/on/off, which older configs may use, are mapped here
_TRUE = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _rotation(value: Any) -> str:
    """objective.rotate as step | epoch | none; the former booleans (and their YAML spellings) map to step / none."""
    if isinstance(value, bool):
        return "step" if value else "none"
    text = str(value).strip().lower()
    return ("step" if _TRUE.get(text) else "none") if text in _TRUE else text


@dataclass
class OptimizerConfig:
    name: str = "muon"  # muon (2-D trunk matrices; AdamW for the rest) | adamw (everything)
    lr: float = 0.007  # Muon lr (and AdamW lr when name == adamw)
    adamw_lr: float | None = None  # lr of the AdamW part under muon; None: same as lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.95  # Muon momentum
    ns_steps: int = 5
    muon_adjust_lr: str = "match_rms_adamw"  # Moonlight scaling, so one lr serves Muon and AdamW
    grad_clip: float = 1.0  # 0 disables clipping
    decay_all: bool = True  # the reference decays norms, biases and embeddings too; False exempts 1-D params
    adamw_impl: str = "torch"  # torch (PyTorch's AdamW) | apex (NVIDIA apex FusedAdam on CUDA; else torch + notice)
    # Muon also for the head's hidden projection (head.proj, a 2-D hidden matrix), as the reference optimizer does
    # (run_pretraining.py adds classifier.projection.weight to its Muon parameters)
    muon_head: bool = False

    def validate(self) -> None:
        from megatron_dual.optim.muon import LR_ADJUSTMENTS, OPTIMIZERS

        _check(self.name in OPTIMIZERS, "optimizer.name", self.name, f"one of {', '.join(OPTIMIZERS)}")
        _check(math.isfinite(self.lr) and self.lr > 0, "optimizer.lr", self.lr, "must be a positive finite number")
        _check(
            self.adamw_lr is None or (math.isfinite(self.adamw_lr) and self.adamw_lr > 0),
            "optimizer.adamw_lr",
            self.adamw_lr,
            "must be a positive finite number or null",
        )
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        _check(math.isfinite(self.eps) and self.eps >= 0, "optimizer.eps", self.eps, "must be a finite number >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optimizer.betas", list(self.betas), "each in [0, 1)")
        _check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        _check(self.ns_steps > 0, "optimizer.ns_steps", self.ns_steps, "must be positive")
        _check(
            self.muon_adjust_lr in LR_ADJUSTMENTS,
            "optimizer.muon_adjust_lr",
            self.muon_adjust_lr,
            f"one of {', '.join(LR_ADJUSTMENTS)}",
        )
        _check(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        _check(self.adamw_impl in ("torch", "apex"), "optimizer.adamw_impl", self.adamw_impl, "one of torch, apex")


_DECAY_FORMS = "0 (no decay), a fraction of train.steps in (0, 1) (0.25: the last quarter) or a whole number of steps"


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # wsd | cosine | constant (megatron_dual/optim/schedules.py)
    warmup_steps: int = 0
    # WSD: linear decay over the last decay_steps steps; in (0, 1) a fraction of train.steps (0.25 = 2048 of 8192)
    decay_steps: int | float = 0.25
    min_lr_ratio: float = 0.0

    def decay_steps_for(self, total_steps: int) -> int:
        """The decay length in steps of a run of ``total_steps``: a fraction in (0, 1) of them rounded to the nearest
        step, a whole number >= 1 as it is, 0 for no decay; a ConfigError for anything else."""
        d = self.decay_steps
        if 0 < d < 1:
            return int(round(d * total_steps))
        _check(d == 0 or (d >= 1 and float(d).is_integer()), "schedule.decay_steps", d, f"must be {_DECAY_FORMS}")
        return int(d)

    def validate(self, total_steps: int) -> None:
        """The fields, and warmup + decay against ``train.steps`` (``total_steps``)."""
        from megatron_dual.optim.schedules import SCHEDULES

        _check(self.name in SCHEDULES, "schedule.name", self.name, f"one of {', '.join(SCHEDULES)}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        decay = self.decay_steps_for(total_steps)
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        resolved = f" (here {decay} steps)" if decay != self.decay_steps else ""
        _check(
            self.name != "wsd" or decay + self.warmup_steps <= total_steps,
            "schedule.decay_steps",
            self.decay_steps,
            f"warmup_steps + decay_steps{resolved} must not exceed train.steps = {total_steps}",
        )


@dataclass
class DataConfig:
    path: str = ""  # prefix of a Megatron .bin/.idx pair, e.g. data/corpus_text_document
    tokenizer: str = "ltg"  # "ltg" (vendored) or a path to tokenizer.json / its directory
    seq_len: int = 2048
    valid_fraction: float = 0.01  # share of documents held out for validation
    seed: int = 1234
    # Megatron's --data-path habit also works: "0.7 a 0.3 b" blends by weight, "a b" by tokens, globs allowed
    # R: train on a unique subset of budget/R tokens seen exactly R times; 0: all documents. Per dataset of a blend:
    # "web=4 books=16" (names: a prefix, its file name, or that without _text_document; "*=R" for the rest)
    repetitions: int | str = 0
    budget_tokens: int = 0  # T, the tokens training consumes; 0: train.steps x tokens per step
    cache_dir: str = ""  # where large sample indexes are cached; "": <first prefix>_cache
    # how documents become samples: concat (documents concatenated, a document's final token is an input) |
    # reference (the paper's code: inputs doc[:-1], targets doc[1:]) | auto: reference under objective.recipe =
    # reference, concat otherwise
    packing: str = "auto"

    def validate(self, max_seq_len: int) -> None:
        """The fields, ``seq_len`` against ``model.max_seq_len``."""
        _check(self.seq_len > 0, "data.seq_len", self.seq_len, "must be positive")
        _check(
            self.seq_len <= max_seq_len,
            "data.seq_len",
            self.seq_len,
            f"must not exceed model.max_seq_len = {max_seq_len}",
        )
        _check(0 <= self.valid_fraction < 1, "data.valid_fraction", self.valid_fraction, "must be in [0, 1)")
        _check(self.packing in PACKINGS, "data.packing", self.packing, f"one of {', '.join(PACKINGS)}")
        if isinstance(self.repetitions, str):
            from megatron_dual.data.loader import DataPathError, parse_repetitions

            try:
                parse_repetitions(self.repetitions)
            except DataPathError as e:
                raise ConfigError(str(e)) from None
        else:
            _check(
                self.repetitions >= 0,
                "data.repetitions",
                self.repetitions,
                "must be >= 0 (R >= 1: a unique subset of budget/R tokens seen R times; 0: every document)",
            )
        _check(
            self.budget_tokens >= 0,
            "data.budget_tokens",
            self.budget_tokens,
            "must be >= 0 (0: train.steps x micro_batch_size x grad_accum x data-parallel ranks x seq_len)",
        )

    def layout(self, recipe: str) -> str:
        """The sample layout (megatron_dual.data.packing.LAYOUTS) of ``data.packing`` under ``objective.recipe``."""
        if self.packing == "auto":
            return "reference" if recipe == "reference" else "concat"
        return self.packing

    def epoch_repetitions(self) -> int:
        """R for the length of a data epoch (objective.rotate = epoch): the repetitions, the largest of a per-dataset
        spec, 0 when unset."""
        if isinstance(self.repetitions, str):
            from megatron_dual.data.loader import parse_repetitions

            return max(parse_repetitions(self.repetitions).values())
        return self.repetitions


@dataclass
class TrainConfig:
    steps: int = 8192
    micro_batch_size: int = 8  # sequences per micro-batch slot
    grad_accum: int = 4  # micro-batch slots per optimizer step (alpha is realised over slots x ranks)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_interval: int = 200
    eval_batches: int = 8
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # extra callbacks by import path ("package.module:Class"), instantiated without arguments (megatron_dual.callbacks)
    callbacks: list[str] = field(default_factory=list)
    # recompute activations in backward: none | full (every block) | selective (the MLP of every block)
    activation_checkpointing: str = "none"

    def validate(self) -> None:
        from megatron_dual.model.checkpointing import ACTIVATION_CHECKPOINTING

        _check(
            self.activation_checkpointing in ACTIVATION_CHECKPOINTING,
            "train.activation_checkpointing",
            self.activation_checkpointing,
            f"one of {', '.join(ACTIVATION_CHECKPOINTING)}",
        )
        _check(self.steps > 0, "train.steps", self.steps, "must be positive")
        _check(self.micro_batch_size > 0, "train.micro_batch_size", self.micro_batch_size, "must be positive")
        _check(self.grad_accum > 0, "train.grad_accum", self.grad_accum, "must be positive")
        _check(self.precision in PRECISIONS, "train.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _check(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "train.device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        _check(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, "must be >= 0 (0 disables)")
        _check(self.eval_batches > 0, "train.eval_batches", self.eval_batches, "must be positive")
        _check(self.threads >= 0, "train.threads", self.threads, "must be >= 0")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size; data-parallel size = world size / tp
    sequence_parallel: bool = False  # shard norms / residual activations along the sequence over the TP group
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    bucket_mb: float = 25.0  # gradient all-reduce bucket size
    distributed_muon: bool = True  # orthogonalise each matrix once on an owner rank, then broadcast
    timeout: float = 600.0  # seconds a rank waits in a collective (or for its peers to join) before it gives up

    def validate(self, model: ModelConfig, optimizer_name: str) -> None:
        """The fields, and ``tp`` against the (validated) model's shapes; the world size is checked at launch."""
        _check(self.tp >= 1, "parallel.tp", self.tp, "must be >= 1")
        _check(self.backend in DIST_BACKENDS, "parallel.backend", self.backend, f"one of {', '.join(DIST_BACKENDS)}")
        _check(self.bucket_mb > 0, "parallel.bucket_mb", self.bucket_mb, "must be positive")
        _check(
            math.isfinite(self.timeout) and self.timeout > 0,
            "parallel.timeout",
            self.timeout,
            "must be a positive number of seconds",
        )
        _check(
            self.tp == 1 or self.distributed_muon or optimizer_name != "muon",
            "parallel.distributed_muon",
            self.distributed_muon,
            "must be true with parallel.tp > 1 (Muon must orthogonalise whole matrices, not TP shards)",
        )
        if self.tp == 1:
            return
        m = model
        _check(
            m.n_heads % self.tp == 0 and m.n_kv_heads % self.tp == 0,
            "parallel.tp",
            self.tp,
            f"must divide model.n_heads = {m.n_heads} and the key/value heads = {m.n_kv_heads}",
        )
        _check(
            m.intermediate_size % self.tp == 0,
            "parallel.tp",
            self.tp,
            f"must divide model.intermediate_size = {m.intermediate_size}",
        )
        _check(m.vocab_size % self.tp == 0, "parallel.tp", self.tp, f"must divide model.vocab_size = {m.vocab_size}")


ENGINES = ("ddp", "deepspeed")  # engine.name: plain torch (megatron_dual/engine/ddp.py) | DeepSpeed ZeRO


@dataclass
class EngineConfig:
    name: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 1  # deepspeed only: 0 (DDP-like), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)
    deepspeed_config: str = ""  # a DeepSpeed JSON merged over the generated one (our fields checked against it)
    reduce_bucket_mb: float = 50.0  # ZeRO reduce(-scatter) bucket
    allgather_bucket_mb: float = 50.0  # ZeRO 1/2 all-gather bucket; ZeRO-3 prefetch bucket
    overlap_comm: bool = True  # overlap ZeRO's reductions with backward

    def validate(self) -> None:
        _check(self.name in ENGINES, "engine.name", self.name, f"one of {', '.join(ENGINES)}")
        _check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        _check(self.reduce_bucket_mb > 0, "engine.reduce_bucket_mb", self.reduce_bucket_mb, "must be positive")
        _check(self.allgather_bucket_mb > 0, "engine.allgather_bucket_mb", self.allgather_bucket_mb, "must be positive")
        if self.name == "deepspeed":
            import importlib.util

            _check(
                importlib.util.find_spec("deepspeed") is not None,
                "engine.name",
                self.name,
                "DeepSpeed is not installed (DS_BUILD_OPS=0 pip install -e '.[deepspeed]')",
            )
        if self.deepspeed_config:
            _check(
                self.name == "deepspeed",
                "engine.deepspeed_config",
                self.deepspeed_config,
                "needs engine.name = deepspeed",
            )
            _check(
                Path(self.deepspeed_config).is_file(), "engine.deepspeed_config", self.deepspeed_config, "no such file"
            )


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <output_dir>/checkpoints
    interval: int = 500
    keep_last: int = 3  # 0 keeps all
    # auto | none | restart (move the old run aside to <output_dir>/previous/<time>/, then start afresh) | a path
    resume: str = "auto"
    # a fresh run (nothing to resume) starts from these weights: a checkpoint of ours, or one imported with
    # tools/convert_checkpoint.py --from hf | --from ltg; optimizer, schedule and data start anew
    init_from: str = ""

    def validate(self) -> None:
        _check(self.interval >= 0, "checkpoint.interval", self.interval, "must be >= 0 (0: only at the end)")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "must be >= 0 (0 keeps all)")


@dataclass
class LoggingConfig:
    log_interval: int = 10  # plain progress line every N steps when not on a TTY
    metrics_file: str = ""  # default: <output_dir>/metrics.jsonl
    wandb_project: str = ""  # set to enable wandb
    wandb_mode: str = "offline"
    tensorboard: bool = False
    plot: bool = True  # write <output_dir>/loss.png at the end

    def validate(self) -> None:
        _check(self.log_interval >= 0, "logging.log_interval", self.log_interval, "must be >= 0")


@dataclass
class Config:
    output_dir: str = "runs/default"
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def validate(self, world_size: int | None = None) -> Config:
        """Every section's checks (resolving the model's null head fields), then, with ``world_size``, the checks
        that depend on the launch: TP size against the world and alpha against its objective slots."""
        self.model.validate()
        self.objective.validate(self.model.vocab_size)
        self.optimizer.validate()
        self.data.validate(self.model.max_seq_len)
        self.train.validate()
        self.schedule.validate(self.train.steps)
        self.parallel.validate(self.model, self.optimizer.name)
        self.engine.validate()
        _check(
            self.data.layout(self.objective.recipe) == "concat" or self.objective.recipe == "reference",
            "data.packing",
            self.data.packing,
            "reference packing needs objective.recipe = reference (the paper recipe's MD labels are defined on "
            "the concatenated stream)",
        )
        _check(
            self.engine.name == "ddp" or not self.parallel.sequence_parallel,
            "parallel.sequence_parallel",
            True,
            "not supported with engine.name = deepspeed (ZeRO would reduce the partial TP gradients of "
            "the sequence-parallel norms before they are summed over TP)",
        )
        self.checkpoint.validate()
        self.logging.validate()
        if world_size is not None:
            self._check_launch(world_size)
        return self

    def _check_launch(self, world: int) -> None:
        """The mix (alpha, objective.mix, every step of objective.alpha_schedule) must be realisable on the job's
        global slots: data-parallel ranks x micro-batch slots."""
        tp = self.parallel.tp
        if world % tp:
            raise ConfigError(f"parallel.tp = {tp} does not divide the world size {world} of this launch")
        dp = world // tp
        from megatron_dual.objectives import schedule_from_config

        schedule_from_config(
            self.objective,
            dp,
            self.train.grad_accum,
            self.train.steps,
            self.data.epoch_repetitions(),
            field_name="objective.alpha" + (f" (with {dp} data-parallel ranks)" if dp > 1 else ""),
        )


# ----------------------------------------------------------------------------------------------------------------
# Presets: nested dicts applied over the defaults.

PRESETS: dict[str, dict[str, Any]] = {
    # The CPU demo size: a few minutes on 2 cores learns visible structure on a small corpus.
    "tiny": {
        "model": {
            "n_layers": 4,
            "hidden_size": 128,
            "n_heads": 4,
            "intermediate_size": 344,
            "vocab_size": 4096,
            "max_seq_len": 128,
            "rope_theta": 10_000.0,
        },
        "data": {"seq_len": 128, "valid_fraction": 0.03},
        "train": {"steps": 300, "micro_batch_size": 8, "grad_accum": 4, "eval_interval": 50, "eval_batches": 8},
        "optimizer": {"lr": 0.01},
        "schedule": {"decay_steps": 0.25},  # 75 of 300 steps
        "checkpoint": {"interval": 100, "keep_last": 2},
    },
    # The reference model of the paper (ltg/dual-lm-470m), exactly.
    "dual-470m": {
        "model": {
            "n_layers": 24,
            "hidden_size": 1024,
            "n_heads": 16,
            "intermediate_size": 3554,
            "vocab_size": 51200,
            "max_seq_len": 2048,
            "rope_theta": 160_000.0,
            "norm_eps": 1e-7,
            "pad_intermediate_to": 64,  # executed 3584 wide (aligned for cuBLAS); the model and checkpoints: 3554
        },
        "objective": {"alpha": 63 / 64},
        "data": {"seq_len": 2048, "tokenizer": "ltg"},
        # the reference optimizer (run_pretraining.py + optimizers/kimi_muon.py): Muon on the trunk matrices and the
        # head's hidden projection, AdamW (betas 0.9/0.95, eps 1e-8) on embedding, vocabulary projection and 1-D
        # parameters, one lr, weight decay on every parameter, Moonlight scaling 0.2 sqrt(max(A, B)); clipping off
        # (the reference clips at max_gradient = 1e9, i.e. never)
        "optimizer": {
            "name": "muon",
            "lr": 0.007,
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "muon_adjust_lr": "match_rms_adamw",
            "decay_all": True,
            "muon_head": True,
            "grad_clip": 0.0,
        },
        "schedule": {"name": "wsd", "warmup_steps": 0, "decay_steps": 0.25},  # 2048 of 8192 steps
        # 4M-token global batch: 2048 sequences = micro_batch_size x grad_accum x data-parallel ranks.
        "train": {"steps": 8192, "micro_batch_size": 8, "grad_accum": 256},
    },
    # Larger presets keep the recipe (the default WSD decay over the last quarter) and scale the shape like Llama
    # (GQA with 8 KV heads).
    "dual-1b": {
        "model": {
            "n_layers": 16,
            "hidden_size": 2048,
            "n_heads": 32,
            "n_kv_heads": 8,
            "intermediate_size": 8192,
            "vocab_size": 51200,
            "max_seq_len": 2048,
            "rope_theta": 160_000.0,
        },
        "objective": {"alpha": 63 / 64},
        "train": {"steps": 8192, "micro_batch_size": 4, "grad_accum": 512},
    },
    "dual-3b": {
        "model": {
            "n_layers": 28,
            "hidden_size": 3072,
            "n_heads": 24,
            "n_kv_heads": 8,
            "intermediate_size": 8192,
            "vocab_size": 51200,
            "max_seq_len": 2048,
            "rope_theta": 160_000.0,
        },
        "objective": {"alpha": 63 / 64},
        "train": {"steps": 8192, "micro_batch_size": 2, "grad_accum": 1024},
    },
    "dual-7b": {
        "model": {
            "n_layers": 32,
            "hidden_size": 4096,
            "n_heads": 32,
            "n_kv_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 51200,
            "max_seq_len": 4096,
            "rope_theta": 500_000.0,
        },
        "objective": {"alpha": 63 / 64},
        "data": {"seq_len": 4096},
        "train": {"steps": 8192, "micro_batch_size": 1, "grad_accum": 1024},
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Conversion between dataclasses and plain dicts.


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _parse_fraction(value: str) -> float | None:
    try:
        return float(Fraction(value.strip()))
    except (ValueError, ZeroDivisionError):
        return None


def _coerce_union(path: str, value: Any, tp: Any) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(path, value, a)
        except ConfigError as e:
            errors.append(e)
    raise errors[0] if errors else ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")


def _coerce_list(path: str, value: Any, tp: Any) -> list[Any]:
    (item,) = typing.get_args(tp)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{path}: got {value!r}, expected a list")
    return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(items)]


def _coerce_tuple(path: str, value: Any, tp: Any) -> tuple[Any, ...]:
    args = typing.get_args(tp)
    if not isinstance(value, list | tuple) or len(value) != len(args):
        raise ConfigError(f"{path}: got {value!r}, expected a list of {len(args)} values")
    return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _coerce_bool(path: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE:
        return _TRUE[value.lower()]
    raise ConfigError(f"{path}: got {value!r}, expected true or false")


def _coerce_int(path: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{path}: got {value!r}, expected an integer")


def _coerce_float(path: str, value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    parsed = _parse_fraction(value) if isinstance(value, str) else None
    if parsed is None:
        raise ConfigError(f"{path}: got {value!r}, expected a number (fractions like 3/4 are accepted)")
    return parsed


def _coerce_str(path: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{path}: got {value!r}, expected a string")


_GENERIC = {list: _coerce_list, tuple: _coerce_tuple}
_SCALAR = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the field type ``tp`` or raise a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(path, value, tp)
    if origin in _GENERIC:
        return _GENERIC[origin](path, value, tp)
    if tp in _SCALAR:
        return _SCALAR[tp](path, value)
    return value


def _unknown_key(path: str, key: str, allowed: list[str]) -> ConfigError:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}'{hint} (allowed here: {', '.join(sorted(allowed))})")


def _apply(obj: Any, updates: dict[str, Any], path: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        if key not in names:
            raise _unknown_key(path, str(key), names)
        where = f"{path}.{key}" if path else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: got {value!r}, expected a mapping of {type(current).__name__} fields")
            _apply(current, value, where)
        else:
            setattr(obj, key, _coerce(where, value, hints[key]))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's surprises for plain scalars: ``5:1`` (the base-60 number 301),
    ``0123`` (octal 83), ``on``/``yes`` (booleans) and ``2026-12-07`` (a date) stay strings, as in YAML 1.2. Booleans
    are ``true``/``false``; integers are decimal without a leading zero (or ``0x``/``0o``), floats have a dot. Other
    forms stay text, which a number field still reads (``0123`` as 123, ``1e-3`` as 0.001: :func:`_coerce`) and a
    text field keeps as written."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0o[0-7_]+|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    return int(text, 0 if text[:2] in ("0o", "0x") else 10)


_YamlLoader.add_constructor(_INT, _yaml_int)


class _YamlDumper(yaml.SafeDumper):
    """Quotes a string that either rule set would read as something else (``1e3`` and ``09`` under YAML 1.2, ``yes``
    under 1.1), so that a written config reads back the same here and in any YAML 1.1 reader."""


_YamlDumper.yaml_implicit_resolvers = {
    first: yaml.SafeDumper.yaml_implicit_resolvers.get(first, []) + _YamlLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *_YamlLoader.yaml_implicit_resolvers}
}


def dump_yaml(data: Any) -> str:
    """``data`` as YAML that :func:`load_yaml` (and a YAML 1.1 reader) reads back unchanged, keys in order."""
    return yaml.dump(data, Dumper=_YamlDumper, sort_keys=False)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.n_layers=4", "objective.alpha=3/4"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    """One line for a YAML syntax error: ``config file F:LINE:COL is not valid YAML: problem``."""
    mark = getattr(e, "problem_mark", None)
    where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    return ConfigError(f"config file {where} is not valid YAML: {what}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = _yaml(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping, got {type(data).__name__}")
    return data


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, else argparse's one-line error naming the option and the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--preset`` and repeatable ``--set KEY=VALUE``: what :func:`load_config` takes, on the command
    lines that build a config (``train``, ``info``)."""
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", help=", ".join(PRESETS))
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set model.n_layers=4 (repeatable)",
    )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> Config:
    """Build and validate a config from an optional preset, YAML file and dotted overrides (applied in that order)."""
    file_tree = load_yaml(path) if path else {}
    override_tree = parse_overrides(overrides or [])
    name = preset or override_tree.get("preset") or file_tree.get("preset") or ""
    tree: dict[str, Any] = {}
    if name:
        if not isinstance(name, str):
            raise ConfigError(f"preset: got {name!r}, expected a preset name (one of {', '.join(PRESETS)})")
        if name not in PRESETS:
            close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown preset '{name}'{hint} (available: {', '.join(PRESETS)})")
        tree = copy.deepcopy(PRESETS[name])
        tree["preset"] = name
    tree = _merge(tree, file_tree)
    tree = _merge(tree, override_tree)
    if name:
        tree["preset"] = name
    cfg = Config()
    _apply(cfg, tree)
    return cfg.validate(launch_world_size())


def config_from_dict(tree: dict[str, Any], world_size: int | None = None) -> Config:
    """A config from a plain tree (e.g. a checkpoint's ``meta.json``). The checks that depend on the launch (TP
    size and alpha against the world size) run only when ``world_size`` is given: a checkpoint written by 8 ranks
    must still be readable by one process."""
    cfg = Config()
    _apply(cfg, tree)
    return cfg.validate(world_size)


# ----------------------------------------------------------------------------------------------------------------
# Alpha and the launch


def alpha_to_slots(alpha: float, slots: int, field_name: str = "objective.alpha") -> int:
    """Number of slots (out of ``slots``) that run the AR objective; error when alpha*slots is not an integer."""
    k = alpha * slots
    if abs(k - round(k)) > 1e-9 * max(1, slots):
        lo, hi = math.floor(k), math.ceil(k)
        near = ", ".join(f"{j}/{slots} = {j / slots:.6g}" for j in sorted({lo, hi}) if 0 <= j <= slots)
        frac = Fraction(alpha).limit_denominator(ALPHA_MAX_DENOMINATOR)
        raise ConfigError(
            f"{field_name} = {alpha!r} cannot be realised exactly with {slots} objective slots "
            f"(alpha must be k/{slots}); nearest realisable: {near}. "
            f"To realise {frac} exactly, use a multiple of {frac.denominator} slots (ranks x grad_accum)."
        )
    return int(round(k))


def launch_world_size() -> int:
    """Number of processes of this launch, from torchrun's or SLURM's environment (1 when neither is set)."""
    return launch_env()[2]


_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    """The environment variable ``name`` as an integer >= 0; None when unset or empty; ConfigError otherwise."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"environment variable {name} = {raw!r}: expected an integer >= 0 (set by torchrun or srun)")
    return int(raw)


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` or SLURM's
    ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``; (0, 0, 1) when neither is set. A malformed value, a rank
    outside the world or ``RANK`` without ``WORLD_SIZE`` is a ConfigError naming the variable (it would otherwise
    run as another rank, or wait ``parallel.timeout`` for a peer that cannot join)."""
    env = os.environ if env is None else env
    if _env_int(env, "WORLD_SIZE") is not None:
        names = _TORCHRUN_VARS
    elif _env_int(env, "SLURM_NTASKS") is not None:
        names = _SLURM_VARS
    else:
        if _env_int(env, "RANK"):
            raise ConfigError(
                f"environment variable RANK = {env['RANK']} but WORLD_SIZE is not set: launch with torchrun (or "
                f"export WORLD_SIZE, MASTER_ADDR and MASTER_PORT too), or unset RANK to run one process"
            )
        return 0, 0, 1
    rank, local, world = (_env_int(env, n) for n in names)
    assert world is not None
    if world < 1:
        raise ConfigError(f"environment variable {names[2]} = 0: a launch has at least one rank")
    if rank is None and world > 1:
        raise ConfigError(f"environment variable {names[2]} = {world} but {names[0]} is not set (each rank needs it)")
    if (rank or 0) >= world:
        raise ConfigError(
            f"environment variable {names[0]} = {rank} is outside {names[2]} = {world} (ranks are 0 to {world - 1})"
        )
    return rank or 0, local or 0, world
