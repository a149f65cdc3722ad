"""Which settings may change when a run resumes from a checkpoint, and which may not.

:func:`resume_changes` compares the config saved in a checkpoint's ``meta.json`` with the current one, field by
field. A field in :data:`APPLIED` (learning rates, the schedule, the length of the run, intervals, logging) or
:data:`RUNTIME` (how the same maths is executed: device, kernels, parallel layout, buckets) may change: the change is
returned, applied by the trainer and said once. Every other field (the model, the data, the seeds, the objective, the
batch, the rest of the optimizer) may not: a :class:`~megatron_dual.engine.checkpoint.CheckpointError` names the
field and both values. ``train.grad_accum`` may change only with the data-parallel size, keeping the global batch,
and ``train.steps`` only where the token budget (hence the dataset) stays the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from megatron_dual.config import DataConfig, resolve_model_dict
from megatron_dual.engine.checkpoint import CheckpointError

__all__ = [
    "APPLIED",
    "RUNTIME",
    "IGNORED",
    "SCHEDULE_FIELDS",
    "matches",
    "resume_changes",
    "saved_dp_size",
    "run_budget",
]

# may change: applied from the current config after the checkpoint is loaded
APPLIED = (
    "optimizer.lr",
    "optimizer.adamw_lr",
    "optimizer.grad_clip",
    "schedule.*",
    "train.steps",
    "train.eval_interval",
    "train.eval_batches",
    "train.threads",
    "checkpoint.interval",
    "checkpoint.keep_last",
    "checkpoint.dir",
    "logging.*",
)
# may change: how the same run executes, not what it computes
RUNTIME = (
    "train.device",
    "train.precision",
    "train.callbacks",
    "train.activation_checkpointing",
    "model.attention_backend",
    "model.fused_ops",
    "model.pad_intermediate_to",
    "data.cache_dir",
    "data.tokenizer",
    "parallel.*",
    "engine.*",
    "optimizer.adamw_impl",
)
# not compared: where this invocation runs and how it was asked to resume; the model's shape, which the weight
# loader refuses naming the tensor and the differing fields (CheckpointMismatchError)
IGNORED = (
    "output_dir",
    "preset",
    "checkpoint.resume",
    "checkpoint.init_from",
    "model.n_layers",
    "model.hidden_size",
    "model.n_heads",
    "model.n_kv_heads",
    "model.head_dim",
    "model.intermediate_size",
    "model.vocab_size",
)
# fields whose change the engine must apply to its restored optimizer and schedule state
SCHEDULE_FIELDS = ("optimizer.lr", "optimizer.adamw_lr", "train.steps", "schedule.*")
# special rules below (global batch, token budget)
_SPECIAL = ("train.grad_accum", "data.budget_tokens", "train.steps")


def matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.field": value}`` with JSON-normalised values (tuples as lists), null head fields resolved,
    ``data.packing = auto`` as its layout under ``objective.recipe``."""
    tree = json.loads(json.dumps(dict(config), default=str))
    if isinstance(tree.get("model"), dict):
        tree["model"] = resolve_model_dict(tree["model"])
    out: dict[str, Any] = {}
    for section, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    if out.get("data.packing") == "auto":  # compared as the layout it names, so auto == its layout spelled out
        out["data.packing"] = DataConfig(packing="auto").layout(str(out.get("objective.recipe", "paper")))
    return out


def saved_dp_size(extra: Mapping[str, Any] | None, default: int) -> int:
    """The data-parallel size a checkpoint was written with (from its layout line), ``default`` when unknown."""
    found = re.search(r"\bdp (\d+)", str((extra or {}).get("layout", "")))
    return int(found.group(1)) if found else default


def run_budget(flat: Mapping[str, Any], dp: int) -> int:
    """The token budget the data was built for: ``data.budget_tokens`` or train.steps x tokens per step."""
    pinned = int(flat.get("data.budget_tokens") or 0)
    if pinned:
        return pinned
    return (
        int(flat["train.steps"])
        * int(flat["train.micro_batch_size"])
        * int(flat["train.grad_accum"])
        * dp
        * int(flat["data.seq_len"])
    )


def _refuse(where: Any, key: str, old: Any, new: Any, why: str = "") -> CheckpointError:
    if not why:
        what = (
            "the run would train on a different dataset or data order"
            if key.startswith("data.")
            else "it may not change on resume"
        )
        why = f"{what} (set it back, or start a new run with --resume restart)"
    return CheckpointError(f"cannot resume from {where}: {key} is {old!r} in the checkpoint but {new!r} now; {why}")


def _check_batch(where: Any, old: dict[str, Any], new: dict[str, Any], dp_old: int, dp_new: int) -> None:
    if "train.grad_accum" not in old or old["train.grad_accum"] == new.get("train.grad_accum"):
        return
    if old["train.grad_accum"] * dp_old != new["train.grad_accum"] * dp_new:
        raise _refuse(
            where,
            "train.grad_accum",
            old["train.grad_accum"],
            new["train.grad_accum"],
            f"the global batch must stay {old['train.grad_accum'] * dp_old} micro-batch slots "
            f"(grad_accum x data-parallel size, {dp_old} then, {dp_new} now)",
        )


def _check_budget(where: Any, old: dict[str, Any], new: dict[str, Any], dp_old: int, dp_new: int) -> None:
    """The dataset (its unique subset and order) is built for the token budget: it must not change."""
    if "train.steps" not in old or "data.budget_tokens" not in old:
        return
    before, now = run_budget(old, dp_old), run_budget(new, dp_new)
    if before == now:
        return
    if old["data.budget_tokens"] or new["data.budget_tokens"]:
        raise _refuse(
            where,
            "data.budget_tokens",
            old["data.budget_tokens"],
            new["data.budget_tokens"],
            f"the data was built for a budget of {before} tokens and would now be {now}",
        )
    raise _refuse(
        where,
        "train.steps",
        old["train.steps"],
        new["train.steps"],
        f"data.budget_tokens is unset, so the token budget follows train.steps ({before} tokens then, "
        f"{now} now) and the dataset with it; to extend this run on its data, resume with "
        f"--set data.budget_tokens={before}",
    )


def resume_changes(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    where: Any = "checkpoint",
    dp_saved: int = 1,
    dp: int = 1,
) -> list[tuple[str, Any, Any]]:
    """The ``(field, checkpoint value, current value)`` of every field that may change and did; a CheckpointError
    naming the first field that may not change and did (with both values). Fields absent from either side (a
    checkpoint older than the field) are not compared."""
    if not saved:
        return []
    old, new = _flat(saved), _flat(current)
    changed = [k for k in old if k in new and old[k] != new[k] and not matches(k, IGNORED)]
    for key in changed:
        if not matches(key, APPLIED + RUNTIME + _SPECIAL):
            raise _refuse(where, key, old[key], new[key])
    _check_batch(where, old, new, dp_saved, dp)
    _check_budget(where, old, new, dp_saved, dp)
    return [(k, old[k], new[k]) for k in changed]
