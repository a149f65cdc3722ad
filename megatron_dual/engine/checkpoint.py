"""Atomic, resumable checkpoints for one process.

Layout under a checkpoint root (default ``<output_dir>/checkpoints``)::

    step_00000300/
        model.safetensors   fp32 weights, loadable without this package (transformers-style readers)
        optim.pt            {"optimizers": {name: state_dict}, "schedulers": {name: state_dict}}
        rng.pt              torch CPU (+ CUDA) generator states, numpy and python ``random`` states
        meta.json           step, trainer state (data position), config, tensor shapes; written last
    latest                  the name of the newest complete checkpoint

A checkpoint is written into ``.tmp_step_...``, every file fsynced, and renamed into place only once ``meta.json`` is
on disk, so a directory named ``step_*`` with a ``meta.json`` is always complete; a killed save leaves at most a
``.tmp_*`` directory, removed by the next save. Nothing complete is ever deleted in place: a directory that is
replaced or pruned is first renamed aside (``.trash_*``, removed by the next save), so a half-deleted directory never
carries a ``step_*`` name. Every file loads with ``torch.load(weights_only=True)`` or safetensors: no pickle
of arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_dual.config import resolve_model_dict
from megatron_dual.parallel import watchdog

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointCorruptError",
    "FORMAT",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "list_checkpoints",
    "find_latest_checkpoint",
    "resolve_resume",
    "step_of",
    "staged_dir",
    "check_not_source",
    "read_meta",
    "load_model_weights",
    "load_checkpoint",
    "load_model_state",
    "read_engine_state",
    "restore_optimizers",
    "read_rng_state",
    "load_state_checked",
    "remove_checkpoint",
    "clean_stale",
]

FORMAT = "megatron-dual-checkpoint/1"
META = "meta.json"
WEIGHTS = "model.safetensors"
OPTIM = "optim.pt"
RNG = "rng.pt"
LATEST = "latest"
PREFIX = "step_"
_UNPICKLER = "WeightsUnpickler error:"  # where torch.load(weights_only=True) says why it refused a file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or cannot be resumed from; the message names the path."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds another model (different tensor names or shapes); the message names the tensor."""


class CheckpointCorruptError(CheckpointError):
    """A file of a checkpoint is missing, truncated or unreadable (a damaged copy, not another model or dataset):
    ``resume=auto`` falls back to the previous complete checkpoint."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---------------------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Every RNG stream the training loop may touch, as tensors and plain values (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------------------------- save
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, e: BaseException) -> CheckpointError:
    """A one-line error for a failed write of checkpoint file ``path`` (disk full, read-only, I/O error)."""
    cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
    hint = (
        "free space on that filesystem (or point checkpoint.dir elsewhere)"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC
        else "check free space and permissions of checkpoint.dir"
    )
    return CheckpointError(
        f"cannot write checkpoint file {path}: {cause}; {hint} and rerun: earlier checkpoints are "
        f"intact and the run resumes from the last complete one"
    )


def _writing(path: Path, write: Any) -> None:
    """``write(path)`` then fsync the file; failures as one-line CheckpointErrors naming the file."""
    try:
        write(path)
        _fsync_file(path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        raise _write_error(path, e) from e


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_not_source(src: str | Path, dst: str | Path, error: Callable[[str], Exception]) -> None:
    """``error(...)`` where writing ``dst`` would replace the source: ``dst`` is ``src`` or a folder holding it."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s or d in s.parents:
        raise error(f"destination {dst} is or holds the source {src}; choose another destination")


@contextlib.contextmanager
def staged_dir(path: Path, error: Callable[[str], Exception]) -> Iterator[Path]:
    """A fresh temporary sibling of directory ``path`` to write into (for conversions: export, import, resharding).
    When the block ends cleanly it replaces ``path``, whose old copy is removed only then; when it raises, the sibling
    is removed and ``path`` stays as it was. A sibling that cannot be created (a parent that is a file, a read-only
    file system) raises ``error("cannot write PATH: why")``, naming what was asked for rather than the sibling."""
    tmp = path.parent / f".tmp_{path.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise error(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    engine_state: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    parallel: Any = None,
    keep_last: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep_last`` (0 keeps all).

    The parts: the model's ``state_dict`` (``model.safetensors``, or one shard per TP rank, see
    :mod:`megatron_dual.parallel.resharding`), ``engine_state`` (``{"optimizers", "schedulers"}``, ``optim.pt`` or
    one per TP rank), the RNG streams, and ``meta.json`` (``trainer_state`` and ``extra`` must be JSON-serialisable),
    written last. With ``parallel`` (a ParallelState of several ranks) this is collective: data-parallel replicas
    hold identical state, so the TP group of DP rank 0 writes the shards, rank 0 the rest, and every rank returns
    once the checkpoint is in place.
    """
    root = Path(root)
    world = parallel.world_size if parallel is not None else 1
    rank, dp_rank = (parallel.rank, parallel.dp_rank) if parallel is not None else (0, 0)
    tp, tp_rank = (parallel.tp_size, parallel.tp_rank) if parallel is not None else (1, 0)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    watchdog.phase(f"checkpoint barrier (saving {final.name})")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
        tmp.mkdir()
    _collective(world, lambda: None)
    try:
        shapes = _collective(
            world,
            lambda: _write_shard(tmp, step, model, engine_state, tp_rank, tp) if dp_rank == 0 else None,
            f"a tensor-parallel rank failed to write its shard of {final}",
        )
    except BaseException:
        if rank == 0:  # a failed write (a full disk) leaves nothing behind; earlier checkpoints are untouched
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        _finish(tmp, final, step, shapes, trainer_state, config, tp, keep_last, extra)
    _collective(world, lambda: None)
    return final


def _finish(
    tmp: Path,
    final: Path,
    step: int,
    shapes: dict[str, list[int]] | None,
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    tp: int,
    keep_last: int,
    extra: Mapping[str, Any] | None,
) -> None:
    """Rank 0, once every shard is written: RNG streams, the TP layout, ``meta.json`` last, then the rename."""
    try:
        meta = {
            "format": FORMAT,
            "step": int(step),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "trainer_state": dict(trainer_state),
            "config": dict(config),
            "tensors": _full_shapes(shapes, config, tp),
            "extra": dict(extra or {}),
        }
        rng = capture_rng_state()
        _writing(tmp / RNG, lambda p: torch.save(rng, p))
        if tp > 1:
            from megatron_dual.parallel import resharding as rs

            meta["tensor_parallel"] = {"tp": tp}
            layout = rs.layout_manifest(meta["tensors"], _model_cfg(config), tp)
            _writing(tmp / rs.LAYOUT, lambda p: _write_atomic_text(p, json.dumps(layout, indent=1)))
        _commit(tmp, final, meta, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _collective(world: int, fn: Any, failure: str = "") -> Any:
    """Run ``fn`` on this rank; with several ranks, every rank learns whether any failed (then all raise)."""
    if world == 1:
        return fn()
    import torch.distributed as dist

    failed = torch.zeros(1)
    try:
        out = fn()
    except Exception:
        failed += 1
        raise
    finally:
        dist.all_reduce(failed)
    if failed.item():
        raise CheckpointError(failure or "a rank failed while saving a checkpoint")
    return out


def _write_shard(
    tmp: Path, step: int, model: torch.nn.Module, engine_state: Mapping[str, Any], tp_rank: int, tp: int
) -> dict[str, list[int]]:
    from megatron_dual.parallel import resharding as rs

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "step": str(step)} | ({"tp": f"{tp_rank}/{tp}"} if tp > 1 else {})
    _writing(tmp / rs.model_file(tp_rank, tp), lambda p: save_file(state, str(p), metadata=metadata))
    _writing(tmp / rs.optim_file(tp_rank, tp), lambda p: torch.save(dict(engine_state), p))
    return {k: list(v.shape) for k, v in state.items()}


def _full_shapes(local: dict[str, list[int]] | None, config: Mapping[str, Any], tp: int) -> dict[str, list[int]]:
    """Tensor shapes of the whole (unsharded) model: this rank's own shapes when it is not sharded."""
    if tp == 1 and local is not None:
        return local
    from megatron_dual.model.transformer import DualTransformer

    with torch.device("meta"):
        return {k: list(v.shape) for k, v in DualTransformer(_model_cfg(config)).state_dict().items()}


def _commit(tmp: Path, final: Path, meta: Mapping[str, Any], keep_last: int) -> None:
    """Fsync every file, write ``meta.json`` last, rename ``tmp`` to ``final`` (an existing ``final`` is renamed aside
    first and deleted only once the new one is in place), point ``latest`` at it, prune to ``keep_last``."""
    for f in sorted(tmp.iterdir()):  # the shards were fsynced by their writers; this covers shared filesystems too
        if f.is_file():
            _writing(f, lambda p: None)
    _writing(tmp / META, lambda p: _write_atomic_text(p, json.dumps(meta, indent=1)))
    _fsync_dir(tmp)
    root = final.parent
    aside = _rename_aside(final) if final.exists() else None
    os.replace(tmp, final)
    _fsync_dir(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _write_atomic_text(root / LATEST, final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                remove_checkpoint(old)


def _rename_aside(path: Path) -> Path:
    aside = path.with_name(f".trash_{path.name}_{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    _fsync_dir(path.parent)
    return aside


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted ``step_*``: rename aside, then delete."""
    shutil.rmtree(_rename_aside(Path(path)), ignore_errors=True)


def clean_stale(root: str | Path) -> list[Path]:
    """Remove what killed saves leave under ``root`` (``.tmp_*`` directories, ``.trash_*`` directories being
    deleted, ``.latest.tmp*`` files); the paths removed."""
    root = Path(root)
    stale = [*root.glob(".tmp_*"), *root.glob(".trash_*"), *root.glob(f".{LATEST}.tmp*")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------------------------------------------- find
def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def step_of(path: Path) -> int:
    """The step a ``step_NNNNNNNN`` directory's name gives; -1 for another name."""
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if step_of(p) >= 0 and _is_complete(p)]
    return sorted(found, key=step_of)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if named.name and _is_complete(named):
            candidates = list_checkpoints(root)
            # a newer complete checkpoint than the marker can exist if we were killed between rename and marker
            if candidates and step_of(candidates[-1]) > step_of(named):
                return candidates[-1]
            return named
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: str | Path, what: str = "--resume") -> Path | None:
    """``none``/``restart``/empty -> None; ``auto`` -> the latest complete checkpoint under ``root`` or None; a path
    -> that checkpoint (or the latest one inside it), CheckpointError when there is none."""
    resume = (resume or "none").strip()
    if resume.lower() in ("none", "restart"):
        return None
    if resume.lower() == "auto":
        return find_latest_checkpoint(root)
    path = Path(resume).expanduser()
    if _is_complete(path):
        return path
    if path.is_dir():
        for where in (path, path / "checkpoints"):
            latest = find_latest_checkpoint(where)
            if latest is not None:
                return latest
        raise CheckpointError(f"{what} {resume}: {path} holds no complete checkpoint (a step_* directory with {META})")
    if path.exists():
        raise CheckpointError(
            f"{what} {resume}: {path} is a file, not a checkpoint (a step_* directory with {META}, or a run "
            f"or checkpoints directory holding one)"
        )
    raise CheckpointError(f"{what} {resume}: {path} does not exist")


# --------------------------------------------------------------------------------------------------------------- load
def _corrupt(path: Path, e: BaseException) -> CheckpointCorruptError:
    """``<path> is corrupt or truncated: <reason>``, one line: torch.load's unpickling errors run over several
    lines of weights_only advice around the actual reason (``WeightsUnpickler error: ...``)."""
    text = str(e)
    if _UNPICKLER in text:
        text = text.split(_UNPICKLER, 1)[1].split("Check the documentation", 1)[0]
    reason = " ".join(text.split()) or type(e).__name__
    return CheckpointCorruptError(f"{path} is corrupt or truncated: {reason}")


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{meta_path} is corrupt: {e}") from e
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{meta_path} is not a megatron-dual checkpoint (no 'step' field)")
    return meta


def _config_diff(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str:
    if not saved or not current:
        return ""
    saved, current = resolve_model_dict(saved), resolve_model_dict(current)  # null head fields of older checkpoints
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    return ("; config differs: " + ", ".join(diffs)) if diffs else ""


def load_model_weights(
    path: str | Path, model: torch.nn.Module, strict: bool = True, model_config: Mapping[str, Any] | None = None
) -> None:
    """Load ``model.safetensors`` of checkpoint ``path`` into ``model`` in place (keeping its device and dtype).

    CheckpointMismatchError names the first tensor whose name or shape differs, with both shapes, and the model
    config fields that differ when ``model_config`` is given.
    """
    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointCorruptError(f"{weights} does not exist")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(weights, e) from e
    saved_cfg = None
    if (path / META).is_file():
        saved_cfg = (read_meta(path).get("config") or {}).get("model")
    load_state_checked(model, state, weights, strict, _config_diff(saved_cfg, model_config))


def load_state_checked(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Any, strict: bool = True, hint: str = ""
) -> None:
    """Copy ``state`` into ``model``; CheckpointMismatchError naming ``source`` and the first tensor whose name or
    shape differs."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if strict:
                raise CheckpointMismatchError(
                    f"{source} is from another model: it has no tensor {name!r} "
                    f"(model shape {tuple(tensor.shape)}){hint}"
                )
            continue
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{source} is from another model: tensor {name!r} has shape {tuple(state[name].shape)} in the "
                f"checkpoint but {tuple(tensor.shape)} in the model{hint}"
            )
    unexpected = sorted(set(state) - set(own))
    if unexpected and strict:
        raise CheckpointMismatchError(
            f"{source} is from another model: it has tensor {unexpected[0]!r} "
            f"(shape {tuple(state[unexpected[0]].shape)}) that the model lacks{hint}"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            if name in state:
                tensor.copy_(state[name])


def load_model_state(
    path: str | Path, model: torch.nn.Module, parallel: Any = None, model_config: Mapping[str, Any] | None = None
) -> None:
    """Load the weights of checkpoint ``path`` into ``model`` in place. With ``parallel`` (a ParallelState) of TP size
    n the model holds TP rank r's shards; a checkpoint of another TP size (or single-file) is resharded on the fly."""
    path = Path(path)
    meta = read_meta(path)
    from megatron_dual.parallel import resharding as rs

    src_tp = _checkpoint_tp(path)
    tp, tp_rank = (parallel.tp_size, parallel.tp_rank) if parallel is not None else (1, 0)
    if src_tp == 1 and tp == 1:
        load_model_weights(path, model, strict=True, model_config=model_config)
        return
    hint = _config_diff((meta.get("config") or {}).get("model"), model_config)
    _check_model_config(path, meta, model_config, hint)
    try:
        shard = rs.load_model_shard(path, tp_rank, tp)
    except rs.ReshardError as e:
        raise CheckpointError(str(e)) from e
    load_state_checked(model, shard, path / rs.model_file(tp_rank, src_tp), True, hint)


def _checkpoint_tp(path: Path) -> int:
    from megatron_dual.parallel import resharding as rs

    try:
        return rs.checkpoint_tp(path)
    except (rs.ReshardError, json.JSONDecodeError) as e:
        raise CheckpointError(str(e)) from e


def read_engine_state(path: str | Path, parallel: Any = None) -> tuple[dict[str, Any], Path]:
    """``({"optimizers", "schedulers"}, file)`` of this rank (resharded when the checkpoint's TP size differs)."""
    path = Path(path)
    from megatron_dual.parallel import resharding as rs

    src_tp = _checkpoint_tp(path)
    tp, tp_rank = (parallel.tp_size, parallel.tp_rank) if parallel is not None else (1, 0)
    optim_file = path / rs.optim_file(tp_rank, src_tp)
    if src_tp != tp:
        meta = read_meta(path)
        try:
            full, full_optim, _ = rs.read_checkpoint(path, with_optim=True)
            if full_optim is None:
                raise CheckpointError(f"{path} holds no optimizer state to reshard")
            if tp == 1:
                return full_optim, optim_file
            names = rs.optimizer_param_names(meta["config"])
            shapes = {k: tuple(v.shape) for k, v in full.items()}
            return rs.shard_optimizer_state(
                full_optim, names, shapes, tp_rank, tp, _model_cfg(meta["config"])
            ), optim_file
        except rs.ReshardError as e:
            raise CheckpointError(str(e)) from e
    try:
        return torch.load(optim_file, map_location="cpu", weights_only=True), optim_file
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"{optim_file} does not exist: cannot restore optimizer state") from e
    except Exception as e:  # torch raises several types for truncated zip archives
        raise _corrupt(optim_file, e) from e


def restore_optimizers(
    state: Mapping[str, Any],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    source: Any = "checkpoint",
) -> None:
    """Load ``state`` (``{"optimizers": {name: ...}, "schedulers": {name: ...}}``) into the live objects; errors name
    ``source`` and the optimizer or scheduler that is missing or does not fit."""
    for kind, live in (("optimizers", optimizers), ("schedulers", schedulers)):
        saved = state.get(kind, {})
        missing = sorted(set(live) - set(saved))
        if missing:
            raise CheckpointError(f"{source} has no state for {kind[:-1]} {missing[0]!r} (it holds {sorted(saved)})")
        for name, obj in live.items():
            try:
                obj.load_state_dict(saved[name])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointMismatchError(f"{source}: state of {kind[:-1]} {name!r} does not fit: {e}") from e


def read_rng_state(path: str | Path) -> dict[str, Any] | None:
    """The RNG streams saved with checkpoint ``path`` (None when it has no ``rng.pt``)."""
    rng_file = Path(path) / RNG
    if not rng_file.is_file():
        return None
    try:
        return torch.load(rng_file, weights_only=True)
    except Exception as e:
        raise _corrupt(rng_file, e) from e


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state in place; return ``{"step", "trainer_state", "config", "rng",
    "extra", "path"}`` (the caller restores RNG streams once everything else is set up). The composition of
    :func:`load_model_state`, :func:`read_engine_state` + :func:`restore_optimizers` and :func:`read_rng_state`."""
    path = Path(path)
    meta = read_meta(path)
    load_model_state(path, model, parallel, model_config)
    if optimizers or schedulers:
        state, source = read_engine_state(path, parallel)
        restore_optimizers(state, optimizers or {}, schedulers or {}, source)
    return {
        "step": int(meta["step"]),
        "trainer_state": meta.get("trainer_state", {}),
        "config": meta.get("config"),
        "rng": read_rng_state(path),
        "extra": meta.get("extra", {}),
        "path": path,
    }


def _model_cfg(config: Mapping[str, Any]) -> Any:
    from megatron_dual.config import config_from_dict

    return config_from_dict(json.loads(json.dumps(dict(config)))).model


def _check_model_config(path: Path, meta: Mapping[str, Any], model_config: Mapping[str, Any] | None, hint: str) -> None:
    """Before resharding: the checkpoint's model must be the configured one (resharding another shape would fail
    obscurely inside the slicing)."""
    saved = (meta.get("config") or {}).get("model")
    if model_config and saved:
        saved, model_config = resolve_model_dict(saved), resolve_model_dict(model_config)
        for key in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size"):
            if saved.get(key) != model_config.get(key):
                raise CheckpointMismatchError(f"{path} is from another model{hint}")
