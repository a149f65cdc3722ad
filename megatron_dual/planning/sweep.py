"""Sweeps over (repetitions R, alpha): configs for SLURM array jobs or local runs, and collection into results.csv.

A sweep directory holds::

    manifest.json          what every task is (R, alpha, output dir, unique tokens, steps, how R was realised)
    configs/task_NNN.yaml  one complete, validated config per task (``megatron-dual train --config`` runs it)
    sweep.sbatch           a SLURM array job over the tasks
    run_local.sh           the same tasks one after another on this machine
    data/                  repetition subsets (only while the trainer has no repetition fields, see below)
    runs/task_NNN/         each run's output_dir (metrics.jsonl, summary.json, checkpoints)

**How R is realised.** The paper's R: a budget of T training tokens drawn from a unique subset of T/R tokens,
repeated R times. For a whole-number R the sweep sets the trainer's ``data.repetitions`` and ``data.budget_tokens``
(:data:`REPETITION_FIELD_SETS`) and the trainer's data loader does the rest. For a fractional R (or a trainer without
those fields, or ``force_subset``) the sweep writes, per R, a Megatron ``.bin/.idx`` holding exactly
``n = steps x sequences_per_step / R`` packed training samples (documents taken in a seeded random order from the
source's training split, the last one truncated) plus the source's held-out documents, laid out so the trainer's own
``split_documents(N, valid_fraction, seed)`` recovers exactly those held-out documents: every R is evaluated on the
same held-out text. The sampler then visits the n samples ``steps x sequences_per_step / n = R`` times (epochs).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from megatron_dual.config import (
    ALPHA_MAX_DENOMINATOR,
    Config,
    ConfigError,
    DataConfig,
    ScheduleConfig,
    dump_yaml,
    load_config,
    parse_overrides,
)
from megatron_dual.data.indexed import IndexedDataset, IndexedDatasetWriter, index_file_path
from megatron_dual.data.packing import stream_lengths
from megatron_dual.data.sampler import split_documents
from megatron_dual.parallel.state import check_alpha

__all__ = [
    "REPETITION_FIELD_SETS",
    "SweepTask",
    "SubsetInfo",
    "parse_fraction",
    "repetition_fields",
    "write_repetition_subset",
    "generate_sweep",
    "run_local",
    "collect_results",
]

# The trainer's repetition fields (DataConfig.repetitions: integer R; DataConfig.budget_tokens: T). Checked against
# DataConfig at run time, so configs stay valid against an older trainer without them (the subset path is used then).
REPETITION_FIELD_SETS: tuple[tuple[str, str], ...] = (("repetitions", "budget_tokens"),)


def parse_fraction(text: str | float | Fraction, what: str = "alpha") -> Fraction:
    """``"3/4"``, ``"0.75"``, ``0.75`` -> Fraction(3, 4) (floats: denominators up to ALPHA_MAX_DENOMINATOR)."""
    try:
        if isinstance(text, Fraction):
            return text
        if isinstance(text, float):
            return Fraction(text).limit_denominator(ALPHA_MAX_DENOMINATOR)
        return Fraction(str(text).strip()).limit_denominator(ALPHA_MAX_DENOMINATOR)
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{what} = {text!r} is not a number or fraction like 3/4") from e


def repetition_fields() -> tuple[str, str] | None:
    """The (repetitions, tokens) field pair of ``DataConfig`` when the trainer supports R natively, else None."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    for pair in REPETITION_FIELD_SETS:
        if set(pair) <= names:
            return pair
    return None


# ------------------------------------------------------------------------------------------------ subsets


@dataclass(frozen=True)
class SubsetInfo:
    prefix: str
    valid_fraction: float  # the data.valid_fraction that makes the trainer's split recover the held-out documents
    train_samples: int
    unique_tokens: int
    train_documents: int
    valid_documents: int
    valid_tokens: int


def _take_training_tokens(
    src: IndexedDataset,
    source: str,
    train_docs: np.ndarray,
    train_samples: int,
    seq_len: int,
    seed: int,
    layout: str = "concat",
) -> tuple[np.ndarray, int, int]:
    """The first documents of a seeded permutation of ``train_docs`` that hold the ``train_samples`` samples'
    positions in the packing ``layout`` -> (those documents, how many, the tokens kept of the last one)."""
    # concat: len = (tokens - 1) // seq_len; reference: len = (sum of each document's tokens - 1) // seq_len
    need = train_samples * seq_len + (1 if layout == "concat" else 0)
    order = np.random.default_rng([seed, 0xDA7A]).permutation(train_docs)
    lengths = stream_lengths(src.sequence_lengths[order].astype(np.int64), layout)
    cum = np.cumsum(lengths)
    if cum.size == 0 or cum[-1] < need:
        have = int(cum[-1]) if cum.size else 0
        unit = "training tokens" if layout == "concat" else "training input positions (reference packing)"
        raise ValueError(
            f"{source} has {have:,} {unit}; {train_samples} samples of {seq_len} need {need:,}"
            f" (lower the repetition count's unique tokens: raise R or lower the budget)"
        )
    n_sel = int(np.searchsorted(cum, need)) + 1
    last_len = need - (int(cum[n_sel - 2]) if n_sel > 1 else 0)
    # reference packing: the last document's kept positions plus its final token, which is a target only
    return order[:n_sel], n_sel, last_len + (0 if layout == "concat" else 1)


def _subset_layout(n_sel: int, valid_docs: np.ndarray, seed: int) -> tuple[list[tuple[str, int]], float]:
    """Where each document of the subset goes -> (per position ("valid", source document) or ("train", k-th chosen
    document), the valid_fraction whose ``split_documents`` puts the held-out documents back in validation)."""
    n_valid = int(valid_docs.size)
    total = n_sel + n_valid
    vf = n_valid / total
    sub_train, sub_valid = split_documents(total, vf, seed)
    if sub_valid.size != n_valid:  # guards the round() in split_documents
        raise RuntimeError(f"subset split put {sub_valid.size} documents in validation, expected {n_valid}")
    slot: list[tuple[str, int]] = [("", 0)] * total
    for pos, doc in zip(sub_valid.tolist(), valid_docs.tolist(), strict=True):
        slot[pos] = ("valid", doc)
    for k, pos in enumerate(sub_train.tolist()):
        slot[pos] = ("train", k)
    return slot, vf


def write_repetition_subset(
    source: str,
    prefix: str,
    train_samples: int,
    seq_len: int,
    *,
    valid_fraction: float,
    seed: int,
    layout: str = "concat",
) -> SubsetInfo:
    """Write ``prefix``.bin/.idx: exactly ``train_samples`` packed training samples in the packing ``layout``
    (``concat``: ``seq_len + 1`` tokens each; ``reference``: ``seq_len`` input positions, a document's final token
    a target only) from the first documents of a seeded permutation of the source's training split, the last one
    truncated, and all of the source's held-out documents, placed where the trainer's ``split_documents`` will look
    for them."""
    if train_samples < 1:
        raise ValueError(f"train_samples = {train_samples}: must be >= 1")
    if not Path(index_file_path(source)).exists():
        raise FileNotFoundError(f"{index_file_path(source)} does not exist (data prefix {source!r})")
    src = IndexedDataset(source)
    train_docs, valid_docs = split_documents(len(src), valid_fraction, seed)
    if valid_docs.size == 0:
        raise ValueError("valid_fraction = 0 leaves no held-out documents: the sweep compares held-out loss")
    chosen, n_sel, last_len = _take_training_tokens(src, source, train_docs, train_samples, seq_len, seed, layout)
    slot, vf = _subset_layout(n_sel, valid_docs, seed)
    valid_tokens = 0
    with IndexedDatasetWriter(prefix, src.dtype) as w:
        for kind, ref in slot:
            if kind == "valid":
                toks = src.get(ref)
                valid_tokens += toks.size
            else:
                toks = src.get(int(chosen[ref]))
                if ref == n_sel - 1:
                    toks = toks[:last_len]
            w.add_document(toks)
    unique = train_samples * seq_len + (1 if layout == "concat" else 0)  # tokens (concat) or input positions
    return SubsetInfo(prefix, vf, train_samples, unique, n_sel, int(valid_docs.size), valid_tokens)


# ------------------------------------------------------------------------------------------------ generation


@dataclass
class SweepTask:
    task: int
    repetitions: float
    alpha: str  # "k/N"
    output_dir: str
    config: str
    steps: int
    unique_tokens: int
    budget_tokens: int
    realised_by: str  # "data-fields" | "subset"
    data_path: str
    model_params: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tokens_per_step(cfg: Config, devices: int) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len * devices


def _param_count(cfg: Config) -> int:
    import torch

    from megatron_dual.model.transformer import DualTransformer, param_counts

    with torch.device("meta"):
        return int(param_counts(DualTransformer(cfg.model))["total"])


def _plain(value: Any) -> Any:
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    return value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _plain(value)
    return tree


def _check_grid(alpha_fracs: list[Fraction], devices: int, decay_fraction: float) -> None:
    for a in alpha_fracs:
        if not 0 <= a <= 1:
            raise ValueError(f"alpha = {a} is outside [0, 1]")
    if devices < 1:
        raise ValueError(f"devices = {devices}: must be >= 1")
    if not 0 <= decay_fraction <= 1:
        raise ValueError(f"decay_fraction = {decay_fraction}: must be in [0, 1]")


def _budget_steps(steps: int | None, budget_tokens: int | None, per_step: int) -> int:
    """``steps``, or ``budget_tokens`` rounded down to whole steps of ``per_step`` tokens; at least one."""
    if steps is None:
        if budget_tokens is None:
            raise ValueError("give the budget: steps or budget_tokens")
        steps = budget_tokens // per_step
    if steps < 1:
        raise ValueError(f"the budget is {budget_tokens} tokens, less than one step of {per_step:,} tokens")
    return steps


@dataclass
class _Sweep:
    """What every task of one sweep shares."""

    out: Path
    preset: str
    data_path: str
    base: Config
    overrides: Sequence[str]
    devices: int
    slots: int
    steps: int
    seqs_per_step: int
    budget: int
    decay_fraction: float
    native: tuple[str, str] | None
    n_params: int


def _subset_fields(sw: _Sweep, r: float, subsets: dict[float, SubsetInfo]) -> tuple[dict[str, Any], int]:
    """R realised by a subset dataset (written once per R into ``subsets``) -> (config fields, unique tokens)."""
    samples = sw.steps * sw.seqs_per_step / r
    if abs(samples - round(samples)) > 1e-9:
        raise ValueError(
            f"R = {r:g}: {sw.steps} steps x {sw.seqs_per_step} sequences / R = {samples:g} is not a "
            f"whole number of unique samples; choose steps as a multiple of "
            f"{Fraction(r).limit_denominator(ALPHA_MAX_DENOMINATOR).numerator}"
        )
    if r not in subsets:
        tag = f"{r:g}".replace(".", "p")
        subsets[r] = write_repetition_subset(
            sw.data_path,
            str(sw.out / "data" / f"reps{tag}_text_document"),
            int(round(samples)),
            sw.base.data.seq_len,
            valid_fraction=sw.base.data.valid_fraction,
            seed=sw.base.data.seed,
            layout=sw.base.data.layout(sw.base.objective.recipe),
        )
    info = subsets[r]
    data_fields: dict[str, Any] = {
        "data.path": os.path.abspath(info.prefix),
        "data.valid_fraction": info.valid_fraction,
    }
    return data_fields, info.unique_tokens


def _native_fields(sw: _Sweep, r: float) -> tuple[dict[str, Any], int]:
    """R realised by the trainer's own repetition fields -> (config fields, unique tokens)."""
    assert sw.native is not None
    rep_field, tok_field = sw.native
    unique = int(sw.budget // r)  # the trainer rounds its subset up to whole samples (+2 for blend rounding)
    data_fields = {
        "data.path": os.path.abspath(sw.data_path),
        f"data.{rep_field}": int(r),
        f"data.{tok_field}": sw.budget,
    }
    return data_fields, unique


def _decay_steps(decay_fraction: float, steps: int) -> int:
    """The tasks' absolute WSD decay; a fraction of 1 is the whole run (a decay_steps of 1 would mean one step)."""
    return steps if decay_fraction == 1 else ScheduleConfig(decay_steps=decay_fraction).decay_steps_for(steps)


def _write_task(sw: _Sweep, task: int, r: float, a: Fraction, data_fields: dict[str, Any], unique: int) -> SweepTask:
    """Write and validate ``configs/task_NNN.yaml`` for the grid point (R, alpha)."""
    k = check_alpha(float(a), sw.devices, sw.slots)
    total = sw.devices * sw.slots
    name = f"task_{task:03d}"
    run_dir = sw.out / "runs" / name
    flat = {
        "output_dir": os.path.abspath(run_dir),
        "objective.alpha": Fraction(k, total),
        "train.steps": sw.steps,
        "schedule.decay_steps": _decay_steps(sw.decay_fraction, sw.steps)
        if sw.base.schedule.name == "wsd"
        else sw.base.schedule.decay_steps,
        **data_fields,
    }
    tree = _nest(flat)
    cfg_path = sw.out / "configs" / f"{name}.yaml"
    header = f"# sweep task {task}: R = {r:g}, alpha = {k}/{total}; generated by tools/sweep.py\npreset: {sw.preset}\n"
    merged = _merge(parse_overrides(list(sw.overrides)), tree)
    cfg_path.write_text(header + dump_yaml(merged))
    load_config(cfg_path)  # validates (single-process view; alpha was checked against devices x slots)
    return SweepTask(
        task,
        r,
        str(Fraction(k, total)),
        flat["output_dir"],
        str(cfg_path.resolve()),
        sw.steps,
        unique,
        sw.budget,
        "subset" if "data.valid_fraction" in data_fields else "data-fields",
        str(data_fields["data.path"]),
        sw.n_params,
    )


def _write_tasks(
    sw: _Sweep, reps: list[float], alpha_fracs: list[Fraction]
) -> tuple[list[SweepTask], dict[float, SubsetInfo]]:
    """One config per (R, alpha); the data fields per R: the trainer's own R, or a written subset for fractional R."""
    (sw.out / "configs").mkdir(parents=True, exist_ok=True)
    tasks: list[SweepTask] = []
    subsets: dict[float, SubsetInfo] = {}
    for r in reps:
        if sw.native is None or not float(r).is_integer():  # the trainer's data.repetitions is an integer
            data_fields, unique = _subset_fields(sw, r, subsets)
        else:
            data_fields, unique = _native_fields(sw, r)
        for a in alpha_fracs:
            tasks.append(_write_task(sw, len(tasks), r, a, data_fields, unique))
    return tasks, subsets


def _write_manifest(sw: _Sweep, per_step: int, tasks: list[SweepTask], subsets: dict[float, SubsetInfo]) -> None:
    manifest = {
        "preset": sw.preset,
        "source_data": os.path.abspath(sw.data_path),
        "devices": sw.devices,
        "steps": sw.steps,
        "tokens_per_step": per_step,
        "budget_tokens": sw.budget,
        "overrides": list(sw.overrides),
        "tasks": [t.to_dict() for t in tasks],
        "subsets": {f"{r:g}": dataclasses.asdict(s) for r, s in subsets.items()},
    }
    (sw.out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def generate_sweep(
    out_dir: str | Path,
    *,
    preset: str,
    data_path: str,
    repetitions: Sequence[float],
    alphas: Sequence[str | float | Fraction],
    budget_tokens: int | None = None,
    steps: int | None = None,
    devices: int = 1,
    overrides: Sequence[str] = (),
    decay_fraction: float = 0.25,
    job_name: str = "dual-sweep",
    max_parallel: int = 0,
    slurm_extra: Sequence[str] = (),
    force_subset: bool = False,
) -> list[SweepTask]:
    """Write configs, manifest, sbatch and local script for the grid ``repetitions x alphas`` (see module doc).

    The budget (the same for every task) is ``steps`` optimizer steps, or ``budget_tokens`` rounded down to whole
    steps; each R gets ``budget / R`` unique tokens. Every config is validated, including alpha against
    ``devices x train.grad_accum`` slots.
    """
    out = Path(out_dir)
    reps = [float(r) for r in repetitions]
    bad = [r for r in reps if not r >= 1]
    if bad:
        raise ValueError(f"repetitions must be >= 1, got {bad[0]}")
    alpha_fracs = [parse_fraction(a) for a in alphas]
    _check_grid(alpha_fracs, devices, decay_fraction)
    # the preset's own alpha is irrelevant (every task sets one) and may not fit the overridden slot count
    base = load_config(preset=preset, overrides=[f"data.path={data_path}", *overrides, "objective.alpha=1"])
    per_step = _tokens_per_step(base, devices)
    steps = _budget_steps(steps, budget_tokens, per_step)
    slots = base.train.grad_accum
    for a in alpha_fracs:
        check_alpha(float(a), devices, slots)
    native = None if force_subset else repetition_fields()
    sw = _Sweep(
        out,
        preset,
        data_path,
        base,
        overrides,
        devices,
        slots,
        steps,
        per_step // base.data.seq_len,
        steps * per_step,
        decay_fraction,
        native,
        _param_count(base),
    )

    tasks, subsets = _write_tasks(sw, reps, alpha_fracs)
    _write_manifest(sw, per_step, tasks, subsets)
    _write_scripts(out, tasks, devices=devices, job_name=job_name, max_parallel=max_parallel, slurm_extra=slurm_extra)
    return tasks


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    outd = dict(a)
    for k, v in b.items():
        outd[k] = _merge(outd[k], v) if isinstance(v, dict) and isinstance(outd.get(k), dict) else v
    return outd


def _write_scripts(
    out: Path, tasks: list[SweepTask], *, devices: int, job_name: str, max_parallel: int, slurm_extra: Sequence[str]
) -> None:
    n = len(tasks)
    throttle = f"%{max_parallel}" if max_parallel else ""
    launch = (
        "python -m megatron_dual.train"
        if devices == 1
        else f"torchrun --nnodes=1 --nproc_per_node={devices} -m megatron_dual.train"
    )
    extra = "".join(f"#SBATCH {line}\n" for line in slurm_extra)
    sbatch = (
        "#!/bin/bash\n"
        f"#SBATCH --job-name={job_name}\n"
        f"#SBATCH --array=0-{n - 1}{throttle}\n"
        "#SBATCH --nodes=1\n"
        f"#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --gpus-per-node={devices}\n"
        f"#SBATCH --output={out.resolve()}/logs/%A_%a.out\n"
        f"{extra}"
        "# One task per (R, alpha) grid point; re-submitting resumes unfinished runs from their checkpoints.\n"
        "set -euo pipefail\n"
        f"mkdir -p {shlex.quote(str(out.resolve() / 'logs'))}\n"
        f'CONFIG=$(printf "{out.resolve()}/configs/task_%03d.yaml" "$SLURM_ARRAY_TASK_ID")\n'
        f'srun {launch} --config "$CONFIG" --quiet\n'
    )
    (out / "sweep.sbatch").write_text(sbatch)
    lines = [
        "#!/bin/bash",
        "# The sweep's tasks one after another on this machine (resumes finished/unfinished runs).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
    ]
    for t in tasks:
        lines.append(
            f"nice -n 10 {launch} --config {shlex.quote(t.config)} --quiet "
            f"> {shlex.quote(str(out.resolve() / 'logs' / f'task_{t.task:03d}.log'))} 2>&1"
        )
    (out / "logs").mkdir(exist_ok=True)
    script = out / "run_local.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    (out / "sweep.sbatch").chmod(0o755)


# ------------------------------------------------------------------------------------------------ running


def load_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: generate the sweep first (tools/sweep.py generate)")
    return json.loads(path.read_text())


def _finished(task: dict[str, Any]) -> bool:
    summary = Path(task["output_dir"]) / "summary.json"
    if not summary.is_file():
        return False
    try:
        return int(json.loads(summary.read_text()).get("steps", -1)) >= int(task["steps"])
    except (ValueError, json.JSONDecodeError):
        return False


def run_local(
    sweep_dir: str | Path,
    tasks: Sequence[int] | None = None,
    *,
    threads: int = 0,
    nice: int = 10,
    dry_run: bool = False,
    in_process: bool = False,
) -> list[dict[str, Any]]:
    """Run the sweep's tasks (all, or ``tasks``) one after another in subprocesses (or, with ``in_process``, in this
    process: no interpreter start-up per task; ``nice`` is then ignored); finished runs are skipped, unfinished ones
    resume. Returns one record per task: task, status (done | skipped | failed), returncode, log."""
    manifest = load_manifest(sweep_dir)
    logs = Path(sweep_dir) / "logs"
    logs.mkdir(exist_ok=True)
    chosen = manifest["tasks"] if tasks is None else [manifest["tasks"][i] for i in tasks]
    records = []
    for t in chosen:
        log = logs / f"task_{t['task']:03d}.log"
        if _finished(t):
            records.append({"task": t["task"], "status": "skipped", "returncode": 0, "log": str(log)})
            continue
        cmd = [sys.executable, "-m", "megatron_dual.train", "--config", t["config"], "--quiet"]
        if threads:
            cmd += ["--set", f"train.threads={threads}"]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        if dry_run:
            records.append({"task": t["task"], "status": "dry-run", "returncode": 0, "log": shlex.join(cmd)})
            continue
        if in_process:
            records.append(_run_in_process(t, log, threads))
            continue
        with log.open("w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
        records.append(
            {"task": t["task"], "status": "done" if rc == 0 else "failed", "returncode": rc, "log": str(log)}
        )
    return records


def _run_in_process(task: dict[str, Any], log: Path, threads: int) -> dict[str, Any]:
    import contextlib
    import traceback

    from megatron_dual.trainer import Trainer

    with log.open("w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            cfg = load_config(task["config"], [f"train.threads={threads}"] if threads else [])
            Trainer(cfg, quiet=True).fit()
            rc = 0
        except Exception:  # one failed grid point must not stop the sweep; the log has the traceback
            traceback.print_exc()
            rc = 1
    return {"task": task["task"], "status": "done" if rc == 0 else "failed", "returncode": rc, "log": str(log)}


# ------------------------------------------------------------------------------------------------ collecting

RESULT_COLUMNS = (
    "repetitions",
    "alpha",
    "score",
    "val_ar_loss",
    "val_md_loss",
    "model_size",
    "steps",
    "unique_tokens",
    "task",
)


def collect_results(
    sweep_dir: str | Path,
    out_csv: str | Path,
    *,
    metric: str = "val_ar_loss",
    lower_is_better: bool = True,
    strict: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Read every task's ``summary.json`` and write results.csv (columns :data:`RESULT_COLUMNS`); score is
    ``metric`` negated when ``lower_is_better`` (the planner maximises score). Returns (rows, missing tasks)."""
    manifest = load_manifest(sweep_dir)
    rows, missing = [], []
    for t in manifest["tasks"]:
        summary_path = Path(t["output_dir"]) / "summary.json"
        if not summary_path.is_file():
            missing.append(f"task {t['task']} (R={t['repetitions']:g}, alpha={t['alpha']}): no {summary_path}")
            continue
        s = json.loads(summary_path.read_text())
        if metric not in s:
            missing.append(f"task {t['task']}: {summary_path} has no {metric!r} (has {sorted(s)})")
            continue
        if int(s.get("steps", 0)) < int(t["steps"]):
            missing.append(f"task {t['task']}: unfinished ({s.get('steps')} of {t['steps']} steps)")
            continue
        value = float(s[metric])
        if not math.isfinite(value):
            missing.append(f"task {t['task']}: {metric} = {value}")
            continue
        rows.append(
            {
                "repetitions": t["repetitions"],
                "alpha": float(Fraction(t["alpha"])),
                "score": -value if lower_is_better else value,
                "val_ar_loss": s.get("val_ar_loss", ""),
                "val_md_loss": s.get("val_md_loss", ""),
                "model_size": t["model_params"],
                "steps": s["steps"],
                "unique_tokens": t["unique_tokens"],
                "task": t["task"],
            }
        )
    if strict and missing:
        raise ConfigError("missing results:\n  " + "\n  ".join(missing))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return rows, missing
