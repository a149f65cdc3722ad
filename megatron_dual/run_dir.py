"""The run directory: checked before any work, never mixed between runs.

* :func:`check_writable`: the output directory, the checkpoint directory and the metrics file are writable (a
  read-only mount, a full device such as ``/dev/full``), checked at start-up so a run does not train for an hour and
  then fail at its first checkpoint.
* :func:`refuse_fresh_start`: ``checkpoint.resume=none`` in a directory that holds a run (complete checkpoints) is
  refused with the two ways on: ``--resume auto`` continues it, ``--resume restart`` starts afresh.
* :func:`refuse_foreign_resume`: ``checkpoint.resume=<a checkpoint from elsewhere>`` into a directory that holds a
  run with later checkpoints is refused: it would overwrite them and the run's metrics.
* :func:`move_run_aside`: ``checkpoint.resume=restart`` moves the old run's artefacts to
  ``<output_dir>/previous/<time>/`` first, so a new run's metrics never mix with an old run's checkpoints.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from megatron_dual.config import ConfigError

__all__ = ["RUN_ARTEFACTS", "check_writable", "refuse_fresh_start", "refuse_foreign_resume", "move_run_aside"]

# what a run writes into its output directory (besides checkpoints, which may live elsewhere)
RUN_ARTEFACTS = ("metrics.jsonl", "summary.json", "loss.png", "config.yaml", "tb", "wandb")


def _unwritable(path: Path, field: str, e: OSError) -> ConfigError:
    reason = {
        errno.EROFS: "is on a read-only filesystem",
        errno.ENOSPC: "is on a full device",
        errno.EACCES: "is not writable (permission denied)",
        errno.EPERM: "is not writable (not permitted)",
    }
    what = reason.get(e.errno or 0, f"cannot be written ({e.strerror or e})")
    return ConfigError(
        f"{field} = {str(path)!r} {what}: point {field} at a writable place (checked before any "
        f"work, nothing was written)"
    )


def _check_dir(path: Path, field: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test_")
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise _unwritable(path, field, e) from e


def _check_file(path: Path, field: str) -> None:
    """An existing regular file is opened for appending (nothing written); a device or pipe gets one newline, which
    is where ``/dev/full`` fails."""
    try:
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            with open(path, "a") as f:
                f.write("\n")
                f.flush()
        elif path.exists():
            with open(path, "a"):
                pass
    except OSError as e:
        raise _unwritable(path, field, e) from e


def check_writable(output_dir: Path, ckpt_dir: Path, metrics_file: Path | None, checkpoint_field: str) -> None:
    """ConfigError naming the field when a place this rank writes to is not writable."""
    _check_dir(output_dir, "output_dir")
    _check_dir(ckpt_dir, checkpoint_field)
    if metrics_file is not None:
        if metrics_file.parent != output_dir:
            _check_dir(metrics_file.parent, "logging.metrics_file")
        _check_file(metrics_file, "logging.metrics_file")


def refuse_fresh_start(output_dir: Path, checkpoints: list[Path]) -> None:
    """``resume=none`` where a run lives: a ConfigError saying how to continue it or start afresh."""
    if checkpoints:
        raise ConfigError(
            f"checkpoint.resume = none but {output_dir} holds a run (checkpoints up to {checkpoints[-1].name}): "
            f"continue it with --resume auto, or start afresh with --resume restart (moves the old run to "
            f"{output_dir / 'previous'}/<time>/), or choose another output_dir"
        )


def refuse_foreign_resume(
    output_dir: Path, ckpt_dir: Path, resume_from: Path, resume_step: int, later: list[Path]
) -> None:
    """An explicit ``checkpoint.resume`` from outside this run's checkpoints, at a step before some of them (``later``:
    the run's complete checkpoints after ``resume_step``): a ConfigError, since resuming would overwrite them and
    rewrite the run's metrics from that step. Rolling back to one of the run's own checkpoints, and another form of
    the run's latest state (a converted copy, as the engines' messages advise), are allowed."""
    if not later or ckpt_dir.resolve() in resume_from.resolve().parents:
        return
    raise ConfigError(
        f"checkpoint.resume = {resume_from} (step {resume_step}) is not one of this run's checkpoints, but "
        f"{output_dir} holds a run with later ones (up to {later[-1].name}), which resuming would overwrite with its "
        f"metrics: continue the run with --resume auto, resume into another output_dir, or start from its weights "
        f"alone with checkpoint.init_from"
    )


def move_run_aside(output_dir: Path, ckpt_dir: Path, metrics_file: Path | None) -> Path | None:
    """Move the old run's checkpoints and artefacts to ``<output_dir>/previous/<time>/``; that directory, or None
    when there was nothing to move."""
    found = [output_dir / name for name in RUN_ARTEFACTS if (output_dir / name).exists()]
    if metrics_file is not None and metrics_file.is_file() and metrics_file not in found:
        found.append(metrics_file)
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        found.append(ckpt_dir)
    if not found:
        return None
    dest = output_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "_")
    dest.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), str(dest / path.name))
    return dest
