"""DeepSpeed ZeRO 0-3 as the second engine of the training loop (``engine.name: deepspeed``).

What it keeps from the DDP engine, exactly: the model (TP-sharded by :func:`parallelize_model` first; ZeRO shards
over the data-parallel group only, passed as DeepSpeed's ``mpu``), the objective slots of each rank, the
exact-mixture normalisation of the trainer (each objective divided by its token count over the job, gradients
**summed** over DP: DeepSpeed averages, so the loss is multiplied by the DP size first, exact for power-of-two DP
sizes), the optimizer groups (our Muon for 2-D trunk matrices with q/k/v and up/gate orthogonalised separately,
PyTorch's AdamW for the rest) and the schedules. ZeRO gets them as one client optimizer,
:class:`~megatron_dual.optim.gathered.GatheredOrthogonalOptimizer`, which runs our Muon on whole matrices gathered
from ZeRO's partitions; every parameter is tagged ``use_muon = False`` so none of DeepSpeed's own Muon paths runs
(see that module for why they cannot give our maths). Clipping (of the raw gradient, by the global norm over TP and
DP) is DeepSpeed's; the DeepSpeed config is generated from ours (:func:`deepspeed_config`) and may be overridden by
``engine.deepspeed_config`` (merged; our fields checked against it).

Checkpoints: DeepSpeed's own (``<step>/deepspeed/``: module and per-rank ZeRO partitions) plus our ``meta.json``
(data state, config, layout) and ``rng.pt``, written into a temporary directory and renamed as the plain form.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.config import Config, ConfigError, launch_env
from megatron_dual.engine import checkpoint as ckpt
from megatron_dual.engine.base import Engine
from megatron_dual.engine.ddp import global_grad_norm
from megatron_dual.model.checkpointing import apply_activation_checkpointing
from megatron_dual.optim.gathered import FlatLayout, GatheredOrthogonalOptimizer
from megatron_dual.optim.muon import build_optimizers
from megatron_dual.optim.schedules import build_scheduler, retarget_scheduler
from megatron_dual.parallel.state import ParallelState
from megatron_dual.parallel.tensor_parallel import parallelize_model

__all__ = [
    "DeepSpeedEngine",
    "DeepSpeedMPU",
    "deepspeed_config",
    "merge_deepspeed_config",
    "validation_error",
    "DS_TAG",
]

DS_TAG = "deepspeed"  # the sub-directory of a checkpoint that holds DeepSpeed's files
_MB = 2**20
# fields we generate and the user's JSON may only repeat: (path, description)
_CHECKED = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("train_batch_size", "train.micro_batch_size x train.grad_accum x data-parallel ranks"),
    ("gradient_clipping", "optimizer.grad_clip"),
    ("zero_optimization.stage", "engine.zero_stage"),
    ("bf16.enabled", "train.precision"),
)


class DeepSpeedMPU:
    """Our :class:`ParallelState` under the names DeepSpeed's ``mpu`` argument is asked for (Megatron's): ZeRO
    partitions over the data-parallel group, the gradient norm is reduced over the model-parallel (TP) group."""

    def __init__(self, par: ParallelState) -> None:
        self.par = par

    def _g(self, group: Any) -> Any:
        return group if group is not None else dist.group.WORLD  # a one-rank job: the world is either group

    def get_model_parallel_rank(self) -> int:
        return self.par.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.par.tp_size

    def get_model_parallel_group(self) -> Any:
        return self._g(self.par.tp_group)

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.par.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.par.dp_size

    def get_data_parallel_group(self) -> Any:
        return self._g(self.par.dp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.par.layout.dp_groups[self.par.tp_rank])


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _elements(mb: float) -> int:
    """DeepSpeed's bucket sizes count elements: ``mb`` MiB of fp32, a multiple of 64 (ZeRO's alignment)."""
    return max(64, int(mb * _MB / 4) // 64 * 64)


def deepspeed_config(cfg: Config, dp: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of our config (before the user's JSON): batch = micro-batch x slots x DP ranks."""
    e, t = cfg.engine, cfg.train
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.zero_stage > 0:
        zero |= {
            "reduce_bucket_size": _elements(e.reduce_bucket_mb),
            "overlap_comm": e.overlap_comm,
            "contiguous_gradients": True,
            "round_robin_gradients": False,
        }
    if e.zero_stage in (1, 2):
        zero |= {"allgather_bucket_size": _elements(e.allgather_bucket_mb), "reduce_scatter": True}
    if e.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": _elements(e.allgather_bucket_mb),
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def merge_deepspeed_config(ours: dict[str, Any], path: str, optimizer_name: str) -> dict[str, Any]:
    """``ours`` with the user's JSON at ``path`` merged over it; ConfigError (one line, naming the field) where the
    JSON contradicts our config or asks for what this engine cannot do exactly."""
    where = f"engine.deepspeed_config ({path})"
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it as JSON: {e}") from e
    _check_objects(user, ours, where)
    mb, gas = user.get("train_micro_batch_size_per_gpu"), user.get("gradient_accumulation_steps")
    dp = ours["train_batch_size"] // (ours["train_micro_batch_size_per_gpu"] * ours["gradient_accumulation_steps"])
    if "train_batch_size" in user and mb is not None and gas is not None and user["train_batch_size"] != mb * gas * dp:
        raise ConfigError(
            f"{where}: train_batch_size = {user['train_batch_size']} but train_micro_batch_size_per_gpu"
            f" x gradient_accumulation_steps x {dp} data-parallel ranks = {mb * gas * dp}"
        )
    for key, ours_name in _CHECKED:
        theirs = _get(user, key)
        if theirs is not None and theirs != _get(ours, key):
            raise ConfigError(
                f"{where}: {key} = {theirs!r} contradicts {ours_name} (= {_get(ours, key)!r}); set it "
                f"in our config instead"
            )
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(
                f"{where}: '{key}' is set, but the optimizers and schedules are ours (optimizer.*, "
                f"schedule.*): DeepSpeed's Muon is not our maths (update scale, fused q/k/v, clipping)"
            )
    _check_zero_options(_merge(ours, user), where, optimizer_name)
    return _merge(ours, user)


def _check_objects(user: Any, ours: Mapping[str, Any], where: str) -> None:
    """The JSON is an object, and so is each section of it that we generate (``bf16``, ``zero_optimization``, ...);
    no key is a near miss of one we generate (``zero_optimisation``), which DeepSpeed would silently ignore."""
    if not isinstance(user, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(user), "a number")
        raise ConfigError(f"{where}: the top level is {kind}, expected a JSON object ({{...}})")
    for key, value in user.items():
        close = difflib.get_close_matches(key, list(ours), n=1, cutoff=0.85) if key not in ours else []
        if close:  # DeepSpeed ignores keys it does not read: the misspelt section's settings would be lost unsaid
            raise ConfigError(
                f"{where}: unknown key {key!r}; did you mean {close[0]!r}? (DeepSpeed ignores keys it does not "
                "know, so its settings would be dropped without a word)"
            )
        if isinstance(ours.get(key), dict) and not isinstance(value, dict):
            raise ConfigError(
                f"{where}: {key} = {json.dumps(value)}, expected an object, e.g. {key}: {json.dumps(ours[key])}"
            )


_SECTIONS = {
    "DeepSpeedZeroConfig": "zero_optimization.",
    "DeepSpeedBF16Config": "bf16.",
    "DeepSpeedFP16Config": "fp16.",
}


def validation_error(e: Exception, path: str) -> ConfigError | None:
    """DeepSpeed's own check of its config (a pydantic ``ValidationError`` of several lines, e.g. a misspelt
    ``zero_optimization`` field) as one line naming the file and the field; None for any other error."""
    errors = getattr(e, "errors", None)
    if type(e).__name__ != "ValidationError" or not callable(errors) or not errors():
        return None
    first, n = errors()[0], len(errors())
    where = f"engine.deepspeed_config ({path})" if path else "the DeepSpeed config generated from ours"
    field = _SECTIONS.get(getattr(e, "title", ""), "") + ".".join(str(x) for x in first.get("loc", ()))
    what = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
    more = f" (and {n - 1} more)" if n > 1 else ""
    return ConfigError(f"{where}: {field} = {first.get('input')!r}: {what} (DeepSpeed's check){more}")


def _check_zero_options(merged: Mapping[str, Any], where: str, optimizer_name: str) -> None:
    stage = _get(merged, "zero_optimization.stage")
    if _get(merged, "zero_optimization.offload_param.device") not in (None, "none") and stage != 3:
        raise ConfigError(f"{where}: zero_optimization.offload_param needs ZeRO stage 3 (engine.zero_stage = {stage})")
    offload = _get(merged, "zero_optimization.offload_optimizer.device") not in (None, "none")
    if offload and stage == 0:
        raise ConfigError(f"{where}: zero_optimization.offload_optimizer needs engine.zero_stage >= 1")
    if offload and optimizer_name == "muon":
        raise ConfigError(
            f"{where}: zero_optimization.offload_optimizer with optimizer.name = muon: Muon cannot run "
            f"exactly on offloaded partitions here; use optimizer.name = adamw or drop the offload"
        )
    if _get(merged, "fp16.enabled"):
        raise ConfigError(
            f"{where}: fp16.enabled = true is not supported (loss scaling skips steps); use train.precision = bf16"
        )


def check_stage_precision(stage: int, bf16: bool, optimizer_name: str) -> None:
    """DeepSpeed's bf16 optimizer at stage 0 hands the client flat partitions that this engine has no layout for."""
    if stage == 0 and bf16 and optimizer_name == "muon":
        raise ConfigError(
            "engine.zero_stage = 0 with bf16 (train.precision) and optimizer.name = muon: DeepSpeed's "
            "bf16 optimizer partitions like ZeRO-1 without telling us where; use engine.zero_stage = 1 "
            "(same memory or less) or train.precision = fp32"
        )


def _import_deepspeed(device: torch.device) -> Any:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"engine.name = 'deepspeed' is not allowed: DeepSpeed cannot be imported ({e}); "
            f"install it with DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"
        ) from e
    if device.type == "cpu" and os.environ.get("MEGATRON_DUAL_DS_SHM", "0") != "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (~1.5 min on 2 cores,
        # once per machine); gloo's collectives serve us, so skip the build unless asked for.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs torch.distributed even for one rank; torchrun-style variables are honoured. Under srun
    (SLURM's variables only) the launch's rank, local rank and world size are exported torchrun-style: DeepSpeed's
    engine asserts ``LOCAL_RANK`` is set and reads ``RANK`` itself."""
    if dist.is_initialized():
        rank, local_rank, world = launch_env()
        for k, v in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world)):
            os.environ.setdefault(k, str(v))
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _ptr_offset(view: torch.Tensor, base: torch.Tensor) -> int:
    off = (view.data_ptr() - base.data_ptr()) // base.element_size()
    if not 0 <= off <= base.numel() - view.numel():
        raise RuntimeError(
            "DeepSpeed's ZeRO partitions are not laid out as this engine expects (a parameter is not "
            "a view of its flat group): this DeepSpeed version is unsupported"
        )
    return off


def zero_layouts(zo: Any, stage: int, dp: int) -> dict[int, FlatLayout]:
    """Where the parameters of each Muon group lie in ZeRO's flat partitions (id of the fp32 partition -> layout)."""
    out: dict[int, FlatLayout] = {}
    if stage == 0:
        return out
    groups = zo.optimizer.param_groups
    if stage in (1, 2):
        for i, params in enumerate(zo.round_robin_bit16_groups):
            if groups[i]["kind"] != "muon":
                continue
            flat, part = zo.bit16_groups_flat[i], int(zo.partition_size[i])
            offsets = [_ptr_offset(p.data, flat) for p in params]
            out[id(zo.single_partition_of_fp32_groups[i])] = FlatLayout.contiguous(list(params), offsets, part, dp)
    elif stage == 3:
        for sub, params in enumerate(zo.fp16_groups):
            if groups[zo.sub_group_to_group_id[sub]]["kind"] != "muon":
                continue
            flat = zo.fp16_partitioned_groups_flat[sub]
            offsets = [_ptr_offset(p.ds_tensor.data, flat) for p in params]
            sizes = [p.ds_tensor.ds_numel for p in params]
            fp32 = zo.fp32_partitioned_groups_flat[sub]
            out[id(fp32)] = FlatLayout.per_parameter(list(params), offsets, sizes, fp32.numel(), dp)
    return out


def check_resumable(path: Path, saved: Mapping[str, Any], stage: int, dp: int, tp: int) -> None:
    """One-line CheckpointError, before DeepSpeed's, when a DeepSpeed checkpoint cannot resume on this layout:
    another TP size, another ZeRO stage, or another DP size where ZeRO partitions the optimizer state."""
    if saved.get("tp", 1) != tp:
        raise ckpt.CheckpointError(
            f"{path}: a DeepSpeed checkpoint of parallel.tp = {saved.get('tp')} cannot resume "
            f"with parallel.tp = {tp}; convert it with tools/convert_checkpoint.py --tp {tp}"
        )
    if saved.get("zero_stage", 0) != stage or (stage > 0 and saved.get("dp") != dp):
        raise ckpt.CheckpointError(
            f"{path}: written with engine.zero_stage = {saved.get('zero_stage')} over {saved.get('dp')} "
            f"data-parallel ranks; this run has engine.zero_stage = {stage} over {dp}: ZeRO partitions the "
            f"optimizer state by DP rank, so convert it first (tools/convert_checkpoint.py {path} OUT --tp {tp}) "
            f"and resume from OUT (weights only)"
        )


class DeepSpeedEngine(Engine):
    """ZeRO ``engine.zero_stage`` over the DP group of ``parallel``; see the module docstring."""

    def __init__(self, model: torch.nn.Module, parallel: ParallelState, cfg: Config, device: torch.device) -> None:
        deepspeed = _import_deepspeed(device)
        if cfg.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel = true is not supported with engine.name = deepspeed")
        _ensure_process_group(device)
        if parallel.tp_size > 1:
            parallelize_model(model, parallel.tp_group, False)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        for name, p in model.named_parameters():  # explicit tags: DeepSpeed's name-based Muon never decides
            p.use_muon = False
            p.megatron_dual_group = (
                "muon" if cfg.optimizer.name == "muon" and model.is_trunk_matrix(name, p) else "adamw"
            )
            if getattr(p, "tensor_parallel_dim", None) is not None:
                p.tensor_model_parallel = True  # DeepSpeed's norm: TP shards counted on every TP rank
        self.parallel, self.stage = parallel, cfg.engine.zero_stage
        p = cfg.train.precision
        self.precision = "bf16" if p == "bf16" or (p == "auto" and device.type == "cuda") else "fp32"
        check_stage_precision(self.stage, self.precision == "bf16", cfg.optimizer.name)
        ds_cfg = deepspeed_config(cfg, parallel.dp_size, self.precision == "bf16")
        if cfg.engine.deepspeed_config:
            ds_cfg = merge_deepspeed_config(ds_cfg, cfg.engine.deepspeed_config, cfg.optimizer.name)
        self.ds_config = ds_cfg
        opts = build_optimizers(model, cfg.optimizer)
        self.optimizer = GatheredOrthogonalOptimizer(
            opts.get("muon"), opts["adamw"], parallel, gather_numel=_elements(cfg.engine.allgather_bucket_mb)
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.schedule)
        try:
            self.ds, _, _, _ = deepspeed.initialize(
                model=model,
                optimizer=self.optimizer,
                config=ds_cfg,
                mpu=DeepSpeedMPU(parallel),
                dist_init_required=False,
            )
        except ValueError as e:
            line = validation_error(e, cfg.engine.deepspeed_config)
            if line is None:
                raise
            raise line from None
        self.model = self.ds.module
        self.optimizer.layouts = zero_layouts(self.ds.optimizer, self.stage, parallel.dp_size)
        self._dp = parallel.dp_size

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # bf16: DeepSpeed holds bf16 parameters (fp32 master weights in ZeRO)

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss * self._dp, scale_wrt_gas=False)  # DeepSpeed averages over DP: make it our sum

    def reduce_gradients(self) -> None:
        """DeepSpeed completes the reduction in the boundary micro-batch's backward."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping; DeepSpeed clips to ``gradient_clipping`` in :meth:`step`."""
        zo = self.ds.optimizer
        if self.stage == 0:
            return global_grad_norm(list(self.model.parameters()), self.parallel)
        if self.stage == 3:
            from deepspeed.runtime.utils import get_global_norm

            return torch.as_tensor(get_global_norm(zo._get_norm_groups()), dtype=torch.float32)
        return torch.as_tensor(zo.scaled_global_norm(), dtype=torch.float32)

    def step(self) -> None:
        self.ds.step()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """The schedules (the optimizer state is in DeepSpeed's checkpoint, partitioned by rank)."""
        return {"optimizers": {}, "schedulers": {"all": self.scheduler.state_dict()}}

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        try:
            self.scheduler.load_state_dict(state["schedulers"]["all"])
        except (KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"{source}: no schedule state for the DeepSpeed engine ({e})") from e

    def apply_schedule(self, cfg: Config) -> bool:
        """As the DDP engine: the restored schedule retargeted at ``cfg``'s lrs and schedule over ``cfg.train.steps``.
        The groups are our client optimizer's, the very dicts every ZeRO stage steps with (ZeRO swaps only their
        ``params`` for its fp32 partitions); call after :meth:`load_checkpoint`, whose optimizer state (lrs included)
        it overrides. The next checkpoint keeps the new base lrs (scheduler) and lrs (optimizer state)."""
        bases = {"muon": cfg.optimizer.lr, "adamw": cfg.optimizer.adamw_lr or cfg.optimizer.lr}
        retarget_scheduler(
            self.scheduler, [bases[g["kind"]] for g in self.optimizer.param_groups], cfg.train.steps, cfg.schedule
        )
        return True

    # ------------------------------------------------------------------------------------------------ checkpoints
    def describe(self) -> dict[str, Any]:
        return {"name": "deepspeed", "zero_stage": self.stage, "dp": self.parallel.dp_size, "tp": self.parallel.tp_size}

    def save_checkpoint(
        self,
        root: Any,
        step: int,
        trainer_state: Mapping[str, Any],
        config: Mapping[str, Any],
        parallel: Any,
        keep_last: int = 0,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """DeepSpeed's checkpoint (every rank writes its partitions) into a temporary directory, then our
        ``rng.pt`` and ``meta.json`` (last) and the rename, as :func:`.checkpoint.save_checkpoint` does."""
        root = Path(root)
        final = root / ckpt.step_dir_name(step)
        tmp = root / f".tmp_{final.name}"
        if self.parallel.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        self.ds.save_checkpoint(
            str(tmp), tag=DS_TAG, client_state={"megatron_dual": self.state_dict()}, save_latest=False
        )
        dist.barrier()
        if self.parallel.rank == 0:
            try:
                meta = {
                    "format": ckpt.FORMAT,
                    "step": int(step),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "torch": torch.__version__,
                    "trainer_state": dict(trainer_state),
                    "config": dict(config),
                    "tensors": ckpt._full_shapes(None, config, self.parallel.tp_size),
                    "extra": dict(extra or {}),
                    "engine": self.describe(),
                }
                torch.save(ckpt.capture_rng_state(), tmp / ckpt.RNG)
                ckpt._commit(tmp, final, meta, keep_last)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        dist.barrier()
        return final

    def load_checkpoint(self, path: Path, parallel: Any, model_config: Mapping[str, Any] | None = None) -> None:
        """A checkpoint of this engine resumes exactly (same DP size where ZeRO partitions state); one of the
        plain forms (single-file or TP) loads its weights and starts the optimizers afresh, with a notice."""
        path = Path(path)
        meta = ckpt.read_meta(path)
        saved = meta.get("engine") or {}
        if not (path / DS_TAG).is_dir():
            self._load_plain_weights(path, model_config)
            return
        check_resumable(path, saved, self.stage, self.parallel.dp_size, self.parallel.tp_size)
        _, client = self.ds.load_checkpoint(
            str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if client is None:
            raise ckpt.CheckpointError(f"{path / DS_TAG} could not be loaded by DeepSpeed")
        self.load_state_dict(client["megatron_dual"], str(path / DS_TAG))

    def _load_plain_weights(self, path: Path, model_config: Mapping[str, Any] | None) -> None:
        if self.parallel.rank == 0:
            print(f"notice: {path} is not a DeepSpeed checkpoint: loading its weights; optimizer state starts afresh")
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                ckpt.load_model_state(path, self.model, self.parallel, model_config=model_config)
        else:
            ckpt.load_model_state(path, self.model, self.parallel, model_config=model_config)
        if self.stage > 0:
            self.ds.optimizer.refresh_fp32_params()


# ---------------------------------------------------------------------------------------------------- conversion
def _tp_shard_state(tag_dir: Path, tp_rank: int, stage: int) -> dict[str, torch.Tensor]:
    """The fp32 state dict of TP rank ``tp_rank`` from DeepSpeed's files (any ZeRO stage, any DP size)."""
    mp = f"mp_rank_{tp_rank:02d}"
    if stage == 0:
        blob = torch.load(tag_dir / f"{mp}_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / DS_TAG  # DeepSpeed's reader knows one model-parallel rank: show it this rank's files
        view.mkdir()
        for f in tag_dir.glob(f"*{mp}*"):
            (view / f.name.replace(mp, "mp_rank_00")).symlink_to(f.resolve())
        sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=DS_TAG)
    return {k: v.contiguous() for k, v in sd.items()}


def read_zero_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full fp32 state dict of the whole model, meta) of a checkpoint this engine wrote."""
    path = Path(path)
    meta = ckpt.read_meta(path)
    eng = meta.get("engine") or {}
    if not (path / DS_TAG).is_dir() or eng.get("name") != "deepspeed":
        raise ckpt.CheckpointError(f"{path} is not a DeepSpeed checkpoint of megatron-dual (no {DS_TAG}/ directory)")
    shards = [_tp_shard_state(path / DS_TAG, r, int(eng.get("zero_stage", 0))) for r in range(int(eng.get("tp", 1)))]
    if len(shards) == 1:
        return shards[0], meta
    from megatron_dual.parallel.layers import gather_state_dict

    return gather_state_dict(shards, ckpt._model_cfg(meta["config"])), meta
