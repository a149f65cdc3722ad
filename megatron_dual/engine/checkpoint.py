"""Atomic, resumable checkpoints for one process.

Layout under a checkpoint root (default ``<output_dir>/checkpoints``)::

    step_00000300/
        model.safetensors   fp32 weights, loadable without this package (transformers-style readers)
        optim.pt            {"optimizers": {name: state_dict}, "schedulers": {name: state_dict}}
        rng.pt              torch CPU (+ CUDA) generator states, numpy and python ``random`` states
        meta.json           step, trainer state (data position), config, tensor shapes; written last
    latest                  the name of the newest complete checkpoint

A checkpoint is written into ``.tmp_step_...`` and renamed into place only once ``meta.json`` is on disk, so a
directory named ``step_*`` with a ``meta.json`` is always complete; a killed save leaves at most a ``.tmp_*``
directory, removed by the next save. Every file loads with ``torch.load(weights_only=True)`` or safetensors: no pickle
of arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "FORMAT",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "list_checkpoints",
    "find_latest_checkpoint",
    "resolve_resume",
    "read_meta",
    "load_model_weights",
    "load_checkpoint",
    "save_tp_checkpoint",
    "load_state_checked",
]

FORMAT = "megatron-dual-checkpoint/1"
META = "meta.json"
WEIGHTS = "model.safetensors"
OPTIM = "optim.pt"
RNG = "rng.pt"
LATEST = "latest"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or cannot be resumed from; the message names the path."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds another model (different tensor names or shapes); the message names the tensor."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---------------------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Every RNG stream the training loop may touch, as tensors and plain values (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
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


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep_last: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep_last`` (0 keeps all).

    ``trainer_state`` and ``extra`` must be JSON-serialisable (they go into ``meta.json``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "step": str(step)})
        torch.save({"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}, tmp / OPTIM)
        torch.save(capture_rng_state(), tmp / RNG)
        meta = {
            "format": FORMAT,
            "step": int(step),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "trainer_state": dict(trainer_state),
            "config": dict(config),
            "tensors": {k: list(v.shape) for k, v in state.items()},
            "extra": dict(extra or {}),
        }
        _commit(tmp, final, meta, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _commit(tmp: Path, final: Path, meta: Mapping[str, Any], keep_last: int) -> None:
    """Write ``meta.json`` last, rename ``tmp`` to ``final``, point ``latest`` at it, prune to ``keep_last``."""
    _write_atomic_text(tmp / META, json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the divergence guard after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = final.parent
    _fsync_dir(root)
    _write_atomic_text(root / LATEST, final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------- find
def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if _step_of(p) >= 0 and _is_complete(p)]
    return sorted(found, key=_step_of)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if named.name and _is_complete(named):
            candidates = list_checkpoints(root)
            # a newer complete checkpoint than the marker can exist if we were killed between rename and marker
            if candidates and _step_of(candidates[-1]) > _step_of(named):
                return candidates[-1]
            return named
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """``none``/empty -> None; ``auto`` -> the latest complete checkpoint under ``root`` or None; a path -> that
    checkpoint (or the latest one inside it), CheckpointError when there is none."""
    resume = (resume or "none").strip()
    if resume.lower() == "none":
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
        raise CheckpointError(f"--resume {resume}: {path} holds no complete checkpoint (a step_* directory with "
                              f"{META})")
    raise CheckpointError(f"--resume {resume}: {path} does not exist")


# --------------------------------------------------------------------------------------------------------------- load
def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt: {e}") from e
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{meta_path} is not a megatron-dual checkpoint (no 'step' field)")
    return meta


def _config_diff(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str:
    if not saved or not current:
        return ""
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return ("; config differs: " + ", ".join(diffs)) if diffs else ""


def load_model_weights(path: str | Path, model: torch.nn.Module, strict: bool = True,
                       model_config: Mapping[str, Any] | None = None) -> None:
    """Load ``model.safetensors`` of checkpoint ``path`` into ``model`` in place (keeping its device and dtype).

    CheckpointMismatchError names the first tensor whose name or shape differs, with both shapes, and the model
    config fields that differ when ``model_config`` is given.
    """
    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated: {e}") from e
    saved_cfg = None
    if (path / META).is_file():
        saved_cfg = (read_meta(path).get("config") or {}).get("model")
    load_state_checked(model, state, weights, strict, _config_diff(saved_cfg, model_config))


def load_state_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Any, strict: bool = True,
                       hint: str = "") -> None:
    """Copy ``state`` into ``model``; CheckpointMismatchError naming ``source`` and the first tensor whose name or
    shape differs."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if strict:
                raise CheckpointMismatchError(f"{source} is from another model: it has no tensor {name!r} "
                                              f"(model shape {tuple(tensor.shape)}){hint}")
            continue
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{source} is from another model: tensor {name!r} has shape {tuple(state[name].shape)} in the "
                f"checkpoint but {tuple(tensor.shape)} in the model{hint}")
    unexpected = sorted(set(state) - set(own))
    if unexpected and strict:
        raise CheckpointMismatchError(f"{source} is from another model: it has tensor {unexpected[0]!r} "
                                      f"(shape {tuple(state[unexpected[0]].shape)}) that the model lacks{hint}")
    with torch.no_grad():
        for name, tensor in own.items():
            if name in state:
                tensor.copy_(state[name])


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state in place; return ``{"step", "trainer_state", "config", "rng",
    "extra", "path"}`` (the caller restores RNG streams once everything else is set up).

    With ``parallel`` (a ParallelState) of TP size n, the model and optimizer hold TP rank r's shards; a checkpoint
    written with another TP size (or in single-file form) is resharded on the fly."""
    path = Path(path)
    meta = read_meta(path)
    from megatron_dual.parallel import resharding as rs

    try:
        src_tp = rs.checkpoint_tp(path)
    except (rs.ReshardError, json.JSONDecodeError) as e:
        raise CheckpointError(str(e)) from e
    tp, tp_rank = (parallel.tp_size, parallel.tp_rank) if parallel is not None else (1, 0)
    hint = _config_diff((meta.get("config") or {}).get("model"), model_config)
    blob: Any = None
    if src_tp == 1 and tp == 1:
        load_model_weights(path, model, strict=True, model_config=model_config)
        optim_file = path / OPTIM
    else:
        _check_model_config(path, meta, model_config, hint)
        try:
            load_state_checked(model, rs.load_model_shard(path, tp_rank, tp), path / rs.model_file(tp_rank, src_tp),
                        True, hint)
            optim_file = path / rs.optim_file(tp_rank, src_tp)
            if (optimizers or schedulers) and src_tp != tp:
                full, full_optim, _ = rs.read_checkpoint(path, with_optim=True)
                if full_optim is None:
                    raise CheckpointError(f"{path} holds no optimizer state to reshard")
                names = rs.optimizer_param_names(meta["config"])
                shapes = {k: tuple(v.shape) for k, v in full.items()}
                blob = (rs.shard_optimizer_state(full_optim, names, shapes, tp_rank, tp,
                                                 _model_cfg(meta["config"])) if tp > 1 else full_optim)
        except rs.ReshardError as e:
            raise CheckpointError(str(e)) from e
    if (optimizers or schedulers) and blob is None:
        try:
            blob = torch.load(optim_file, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise CheckpointError(f"{optim_file} does not exist: cannot restore optimizer state") from e
        except Exception as e:  # torch raises several types for truncated zip archives
            raise CheckpointError(f"{optim_file} is corrupt or truncated: {e}") from e
    if optimizers or schedulers:
        for kind, live in (("optimizers", optimizers or {}), ("schedulers", schedulers or {})):
            saved = blob.get(kind, {})
            missing = sorted(set(live) - set(saved))
            if missing:
                raise CheckpointError(f"{optim_file} has no state for {kind[:-1]} {missing[0]!r} "
                                      f"(it holds {sorted(saved)})")
            for name, obj in live.items():
                try:
                    obj.load_state_dict(saved[name])
                except (ValueError, KeyError, RuntimeError) as e:
                    raise CheckpointMismatchError(f"{optim_file}: state of {kind[:-1]} {name!r} does not fit: {e}"
                                                  ) from e
    rng_file = path / RNG
    try:
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except Exception as e:
        raise CheckpointError(f"{rng_file} is corrupt or truncated: {e}") from e
    return {"step": int(meta["step"]), "trainer_state": meta.get("trainer_state", {}), "config": meta.get("config"),
            "rng": rng, "extra": meta.get("extra", {}), "path": path}


def _model_cfg(config: Mapping[str, Any]) -> Any:
    from megatron_dual.config import config_from_dict

    return config_from_dict(json.loads(json.dumps(dict(config)))).model


def _check_model_config(path: Path, meta: Mapping[str, Any], model_config: Mapping[str, Any] | None,
                        hint: str) -> None:
    """Before resharding: the checkpoint's model must be the configured one (resharding another shape would fail
    obscurely inside the slicing)."""
    saved = (meta.get("config") or {}).get("model")
    if model_config and saved:
        for key in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                    "vocab_size"):
            if saved.get(key) != model_config.get(key):
                raise CheckpointMismatchError(f"{path} is from another model{hint}")


def save_tp_checkpoint(root: str | Path, step: int, model: torch.nn.Module,
                       optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                       trainer_state: Mapping[str, Any], config: Mapping[str, Any], parallel: Any,
                       keep_last: int = 0, extra: Mapping[str, Any] | None = None) -> Path:
    """Collective over all ranks: the TP group of DP rank 0 writes its shards (``model_tp{r}of{n}.safetensors``,
    ``optim_tp{r}of{n}.pt``), rank 0 the replicated RNG state, ``layout.json`` and ``meta.json`` last, then renames
    the directory into place (the format of :mod:`megatron_dual.parallel.resharding`)."""
    import torch.distributed as dist

    from megatron_dual.model.transformer import DualTransformer
    from megatron_dual.parallel import resharding as rs

    root = Path(root)
    tp, tp_rank = parallel.tp_size, parallel.tp_rank
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if parallel.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    failed = torch.zeros(1)
    try:
        if parallel.dp_rank == 0:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / rs.model_file(tp_rank, tp)),
                      metadata={"format": FORMAT, "step": str(step), "tp": f"{tp_rank}/{tp}"})
            torch.save({"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                        "schedulers": {k: s.state_dict() for k, s in schedulers.items()}},
                       tmp / rs.optim_file(tp_rank, tp))
    except Exception:
        failed += 1
        raise
    finally:
        dist.all_reduce(failed)  # every rank learns whether a shard failed to write
    if failed.item():
        raise CheckpointError(f"a tensor-parallel rank failed to write its shard of {final}")
    if parallel.rank == 0:
        try:
            cfg = _model_cfg(config)
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in DualTransformer(cfg).state_dict().items()}
            torch.save(capture_rng_state(), tmp / RNG)
            _write_atomic_text(tmp / rs.LAYOUT, json.dumps(rs.layout_manifest(shapes, cfg, tp), indent=1))
            meta = {"format": FORMAT, "step": int(step), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "torch": torch.__version__, "trainer_state": dict(trainer_state), "config": dict(config),
                    "tensors": {k: list(v) for k, v in shapes.items()}, "tensor_parallel": {"tp": tp},
                    "extra": dict(extra or {})}
            _commit(tmp, final, meta, keep_last)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()
    return final
