"""Typed configuration, presets, YAML loading, dotted overrides and validation.

A config is a tree of dataclasses. Every user-facing entry point builds one through :func:`load_config`, which
applies, in order: the preset, the YAML file (which may name a preset itself), and ``--set a.b=value`` overrides.
Validation errors name the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field is unknown, mistyped or out of range; the message names the field and value."""


@dataclass
class ModelConfig:
    n_layers: int = 24
    hidden_size: int = 1024
    n_heads: int = 16
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // n_heads
    intermediate_size: int = 3554
    vocab_size: int = 51200
    max_seq_len: int = 2048
    rope_theta: float = 160_000.0
    norm_eps: float = 1e-7
    attention_backend: str = "auto"  # auto | sdpa | triton | flash | flex (megatron_dual/model/attention.py)
    fused_ops: str = "auto"  # fused Triton norm/rotary/SwiGLU/linear+CE: auto (triton on CUDA) | none | triton
    pad_intermediate_to: int = 1  # MLP built this-aligned wide with zero units (64: 3554 -> 3584); 1: no padding

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.n_heads


@dataclass
class ObjectiveConfig:
    # Weight of the autoregressive objective; MD gets 1 - alpha. Accepts "3/4"-style fractions in YAML/--set.
    alpha: float = 0.75
    t_min: float = 1e-3  # MD mask rate t ~ U(t_min, 1) keeps 1/t finite
    z_loss: float = 1e-4
    n_special: int = 16  # ids below this are never masked
    mask_token_id: int = 4
    rotate: bool = True  # rotate the objective assignment over slots every step


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


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 0
    decay_steps: int = 2048  # WSD: linear decay over the last decay_steps steps
    min_lr_ratio: float = 0.0


@dataclass
class DataConfig:
    path: str = ""  # prefix of a Megatron .bin/.idx pair, e.g. data/corpus_text_document
    tokenizer: str = "ltg"  # "ltg" (vendored) or a path to tokenizer.json / its directory
    seq_len: int = 2048
    valid_fraction: float = 0.01  # share of documents held out for validation
    seed: int = 1234
    # Megatron's --data-path habit also works: "0.7 a 0.3 b" blends by weight, "a b" by tokens, globs allowed
    repetitions: int = 0  # R: train on a unique subset of budget/R tokens seen exactly R times; 0: all documents
    budget_tokens: int = 0  # T, the tokens training consumes; 0: train.steps x tokens per step
    cache_dir: str = ""  # where large sample indexes are cached; "": <first prefix>_cache


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


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size; data-parallel size = world size / tp
    sequence_parallel: bool = False  # shard norms / residual activations along the sequence over the TP group
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    bucket_mb: float = 25.0  # gradient all-reduce bucket size
    distributed_muon: bool = True  # orthogonalise each matrix once on an owner rank, then broadcast


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <output_dir>/checkpoints
    interval: int = 500
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint


@dataclass
class LoggingConfig:
    log_interval: int = 10  # plain progress line every N steps when not on a TTY
    metrics_file: str = ""  # default: <output_dir>/metrics.jsonl
    wandb_project: str = ""  # set to enable wandb
    wandb_mode: str = "offline"
    tensorboard: bool = False
    plot: bool = True  # write <output_dir>/loss.png at the end


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def validate(self, world_size: int | None = None) -> Config:
        validate(self, world_size)
        return self


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
        "schedule": {"decay_steps": 75},
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
        "optimizer": {"name": "muon", "lr": 0.007, "weight_decay": 0.1},
        "schedule": {"name": "wsd", "warmup_steps": 0, "decay_steps": 2048},
        # 4M-token global batch: 2048 sequences = micro_batch_size x grad_accum x data-parallel ranks.
        "train": {"steps": 8192, "micro_batch_size": 8, "grad_accum": 256},
    },
    # Larger presets keep the recipe and scale the shape like Llama (GQA with 8 KV heads).
    "dual-1b": {
        "model": {"n_layers": 16, "hidden_size": 2048, "n_heads": 32, "n_kv_heads": 8, "intermediate_size": 8192,
                  "vocab_size": 51200, "max_seq_len": 2048, "rope_theta": 160_000.0},
        "objective": {"alpha": 63 / 64},
        "train": {"steps": 8192, "micro_batch_size": 4, "grad_accum": 512},
    },
    "dual-3b": {
        "model": {"n_layers": 28, "hidden_size": 3072, "n_heads": 24, "n_kv_heads": 8, "intermediate_size": 8192,
                  "vocab_size": 51200, "max_seq_len": 2048, "rope_theta": 160_000.0},
        "objective": {"alpha": 63 / 64},
        "train": {"steps": 8192, "micro_batch_size": 2, "grad_accum": 1024},
    },
    "dual-7b": {
        "model": {"n_layers": 32, "hidden_size": 4096, "n_heads": 32, "n_kv_heads": 8, "intermediate_size": 14336,
                  "vocab_size": 51200, "max_seq_len": 4096, "rope_theta": 500_000.0},
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


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the field type ``tp`` or raise a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
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
    if origin is list:
        (item,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(items)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: got {value!r}, expected a list of {len(args)} values")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            parsed = _parse_fraction(value)
            if parsed is not None:
                return parsed
        raise ConfigError(f"{path}: got {value!r}, expected a number (fractions like 3/4 are accepted)")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: got {value!r}, expected a string")
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
            value = yaml.safe_load(raw) if raw.strip() else ""
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


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping, got {type(data).__name__}")
    return data


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
# Validation


def _check(cond: bool, field_: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_} = {value!r} is not allowed: {allowed}")


def realisable_alphas(slots: int) -> list[Fraction]:
    return [Fraction(k, slots) for k in range(slots + 1)]


def alpha_to_slots(alpha: float, slots: int, field_name: str = "objective.alpha") -> int:
    """Number of slots (out of ``slots``) that run the AR objective; error when alpha*slots is not an integer."""
    k = alpha * slots
    if abs(k - round(k)) > 1e-9 * max(1, slots):
        lo, hi = math.floor(k), math.ceil(k)
        near = ", ".join(f"{j}/{slots} = {j / slots:.6g}" for j in sorted({lo, hi}) if 0 <= j <= slots)
        frac = Fraction(alpha).limit_denominator(1 << 16)
        raise ConfigError(
            f"{field_name} = {alpha!r} cannot be realised exactly with {slots} objective slots "
            f"(alpha must be k/{slots}); nearest realisable: {near}. "
            f"To realise {frac} exactly, use a multiple of {frac.denominator} slots (ranks x grad_accum)."
        )
    return int(round(k))


def launch_world_size() -> int:
    """Number of processes of this launch, from torchrun's or SLURM's environment (1 when neither is set)."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def validate(cfg: Config, world_size: int | None = None) -> None:
    m = cfg.model
    for name in ("n_layers", "hidden_size", "n_heads", "intermediate_size", "vocab_size", "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "must be a positive integer")
    if m.head_dim is None:
        _check(
            m.hidden_size % m.n_heads == 0,
            "model.hidden_size",
            m.hidden_size,
            f"must be divisible by model.n_heads = {m.n_heads} (or set model.head_dim)",
        )
    else:
        _check(m.head_dim > 0, "model.head_dim", m.head_dim, "must be a positive integer")
    _check(m.dim_head % 2 == 0, "model.head_dim", m.dim_head, "must be even (rotary embeddings rotate pairs)")
    if m.n_kv_heads is not None:
        _check(
            m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
            "model.n_kv_heads",
            m.n_kv_heads,
            f"must be a positive divisor of model.n_heads = {m.n_heads}",
        )
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive")
    _check(0 < m.norm_eps < 1, "model.norm_eps", m.norm_eps, "must be in (0, 1)")
    _check(m.attention_backend in ("auto", "sdpa", "triton", "flash", "flex"), "model.attention_backend",
           m.attention_backend, "one of auto, sdpa, triton, flash, flex")
    _check(m.fused_ops in ("auto", "none", "triton"), "model.fused_ops", m.fused_ops,
           "one of auto (triton on CUDA, none on CPU), none, triton")

    o = cfg.objective
    _check(0.0 <= o.alpha <= 1.0, "objective.alpha", o.alpha, "must be in [0, 1] (1 = pure AR, 0 = pure MD)")
    _check(0.0 < o.t_min < 1.0, "objective.t_min", o.t_min, "must be in (0, 1)")
    _check(o.z_loss >= 0, "objective.z_loss", o.z_loss, "must be >= 0")
    _check(0 <= o.mask_token_id < m.vocab_size, "objective.mask_token_id", o.mask_token_id,
           f"must be a token id below model.vocab_size = {m.vocab_size}")
    _check(0 < o.n_special < m.vocab_size, "objective.n_special", o.n_special, "must be in (0, vocab_size)")

    op = cfg.optimizer
    _check(op.name in ("muon", "adamw"), "optimizer.name", op.name, "one of muon, adamw")
    _check(op.lr > 0, "optimizer.lr", op.lr, "must be positive")
    _check(op.adamw_lr is None or op.adamw_lr > 0, "optimizer.adamw_lr", op.adamw_lr, "must be positive or null")
    _check(op.weight_decay >= 0, "optimizer.weight_decay", op.weight_decay, "must be >= 0")
    _check(all(0 <= b < 1 for b in op.betas), "optimizer.betas", list(op.betas), "each in [0, 1)")
    _check(0 <= op.momentum < 1, "optimizer.momentum", op.momentum, "must be in [0, 1)")
    _check(op.ns_steps > 0, "optimizer.ns_steps", op.ns_steps, "must be positive")
    _check(op.muon_adjust_lr in ("match_rms_adamw", "original"), "optimizer.muon_adjust_lr", op.muon_adjust_lr,
           "one of match_rms_adamw, original")
    _check(op.grad_clip >= 0, "optimizer.grad_clip", op.grad_clip, "must be >= 0 (0 disables)")

    s = cfg.schedule
    _check(s.name in ("wsd", "cosine", "constant"), "schedule.name", s.name, "one of wsd, cosine, constant")
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "must be >= 0")
    _check(s.decay_steps >= 0, "schedule.decay_steps", s.decay_steps, "must be >= 0")
    _check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")

    d = cfg.data
    _check(d.seq_len > 0, "data.seq_len", d.seq_len, "must be positive")
    _check(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
           f"must not exceed model.max_seq_len = {m.max_seq_len}")
    _check(0 <= d.valid_fraction < 1, "data.valid_fraction", d.valid_fraction, "must be in [0, 1)")
    _check(d.repetitions >= 0, "data.repetitions", d.repetitions,
           "must be >= 0 (R >= 1: a unique subset of budget/R tokens seen R times; 0: every document)")
    _check(d.budget_tokens >= 0, "data.budget_tokens", d.budget_tokens,
           "must be >= 0 (0: train.steps x micro_batch_size x grad_accum x data-parallel ranks x seq_len)")

    t = cfg.train
    _check(t.steps > 0, "train.steps", t.steps, "must be positive")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", t.micro_batch_size, "must be positive")
    _check(t.grad_accum > 0, "train.grad_accum", t.grad_accum, "must be positive")
    _check(t.precision in ("auto", "bf16", "fp32"), "train.precision", t.precision, "one of auto, bf16, fp32")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device", t.device,
           "auto, cpu, cuda or cuda:N")
    _check(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0 (0 disables)")
    _check(t.eval_batches > 0, "train.eval_batches", t.eval_batches, "must be positive")
    _check(t.threads >= 0, "train.threads", t.threads, "must be >= 0")
    _check(s.name != "wsd" or s.decay_steps + s.warmup_steps <= t.steps, "schedule.decay_steps", s.decay_steps,
           f"warmup_steps + decay_steps must not exceed train.steps = {t.steps}")

    par = cfg.parallel
    _check(par.tp >= 1, "parallel.tp", par.tp, "must be >= 1")
    _check(par.backend in ("auto", "nccl", "gloo"), "parallel.backend", par.backend, "one of auto, nccl, gloo")
    _check(par.bucket_mb > 0, "parallel.bucket_mb", par.bucket_mb, "must be positive")
    _check(par.tp == 1 or par.distributed_muon or cfg.optimizer.name != "muon", "parallel.distributed_muon",
           par.distributed_muon, "must be true with parallel.tp > 1 (Muon must orthogonalise whole matrices, "
           "not TP shards)")
    if par.tp > 1:
        _check(m.n_heads % par.tp == 0 and m.kv_heads % par.tp == 0, "parallel.tp", par.tp,
               f"must divide model.n_heads = {m.n_heads} and the key/value heads = {m.kv_heads}")
        _check(m.intermediate_size % par.tp == 0, "parallel.tp", par.tp,
               f"must divide model.intermediate_size = {m.intermediate_size}")
        _check(m.vocab_size % par.tp == 0, "parallel.tp", par.tp, f"must divide model.vocab_size = {m.vocab_size}")
    c = cfg.checkpoint
    _check(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0: only at the end)")

    # The mix must be realisable on the job's global slots: data-parallel ranks x micro-batch slots.
    if world_size is None:
        return
    world = world_size
    if world % par.tp:
        raise ConfigError(f"parallel.tp = {par.tp} does not divide the world size {world} of this launch")
    dp = world // par.tp
    alpha_to_slots(o.alpha, dp * t.grad_accum,
                   field_name="objective.alpha" + (f" (with {dp} data-parallel ranks)" if dp > 1 else ""))
