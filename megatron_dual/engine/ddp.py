"""Plain-torch data parallelism: bucketed gradient all-reduce overlapped with backward, global-norm clipping, and
:class:`DDPEngine`, the engine of the training loop built on it (TP layers, Muon + AdamW, schedules, autocast).

Gradients live in flat per-bucket buffers (``param.grad`` is a view into its bucket), so a bucket's all-reduce is
one collective over contiguous memory. Buckets hold parameters in reverse registration order, roughly the order in
which backward produces their gradients. During the *last* micro-batch of a step (outside :meth:`no_sync`) every
parameter's post-accumulate hook marks it ready; a bucket is launched asynchronously once all its parameters are
ready and every earlier bucket has been launched, so all ranks issue the same collectives in the same order even
when a parameter receives no gradient on some rank. :meth:`finish_grad_sync` launches what is left and waits.

Reduction is a **sum**, not a mean: the trainer normalises each objective's loss by its global token count, so the
summed gradient is already ``alpha * grad L_AR + (1 - alpha) * grad L_MD`` of the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.config import Config
from megatron_dual.engine.base import Engine
from megatron_dual.model.checkpointing import apply_activation_checkpointing
from megatron_dual.model.precision import enable_fp32_grad_accumulation, step_region
from megatron_dual.optim.muon import build_optimizers
from megatron_dual.optim.schedules import build_scheduler, retarget_scheduler
from megatron_dual.parallel.state import ParallelState
from megatron_dual.parallel.tensor_parallel import parallelize_model, sync_sequence_parallel_grads

__all__ = ["GradientBuckets", "DDPEngine", "global_grad_norm", "clip_grad_norm_"]


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], dtype: torch.dtype, device: torch.device) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        self.buffer = torch.zeros(numel, dtype=dtype, device=device)
        self.views: dict[int, torch.Tensor] = {}
        offset = 0
        for p in params:
            self.views[id(p)] = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.ready: set[int] = set()
        self.handle: dist.Work | None = None

    def reset(self) -> None:
        self.ready.clear()
        self.handle = None


class GradientBuckets:
    """Data-parallel gradient synchronisation for ``model`` over ``state.dp_group``.

    Usage per optimizer step: ``buckets.zero_grad()``; for every micro-batch but the last ``with buckets.no_sync():
    loss.backward()``; the last ``loss.backward()``; then ``buckets.finish_grad_sync()`` before clipping and the
    optimizer step. Use ``buckets.zero_grad()`` rather than the optimizers' (they would detach the bucket views).
    """

    def __init__(self, model: torch.nn.Module, state: ParallelState, bucket_mb: float = 25.0) -> None:
        self.model = model
        self.state = state
        self.group = state.dp_group
        self.world = state.dp_size
        self._sync = True
        params = [p for p in model.parameters() if p.requires_grad]
        cap = max(1, int(bucket_mb * 2**20))
        self.buckets: list[_Bucket] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            if current and (
                size + p.numel() * p.element_size() > cap
                or p.dtype != current[0].dtype
                or p.device != current[0].device
            ):
                self.buckets.append(_Bucket(current, current[0].dtype, current[0].device))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current, current[0].dtype, current[0].device))
        self._bucket_of: dict[int, int] = {}
        for i, b in enumerate(self.buckets):
            for p in b.params:
                self._bucket_of[id(p)] = i
                p.grad = b.views[id(p)]
        self._next = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params] if self.world > 1 else []

    # ---------------------------------------------------------------------------------------------------------- sync
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (micro-batches before the last of a step)."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self._sync:
            return
        b = self.buckets[self._bucket_of[id(p)]]
        if p.grad is None or p.grad.data_ptr() != b.views[id(p)].data_ptr():
            raise RuntimeError(
                "a parameter's .grad was replaced (optimizer.zero_grad(set_to_none=True)?): use "
                "DDPEngine.zero_grad() so gradients stay in the all-reduce buckets"
            )
        b.ready.add(id(p))
        self._launch_ready()

    def _launch(self, b: _Bucket) -> None:
        b.handle = dist.all_reduce(b.buffer, group=self.group, async_op=True)

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.ready) < len(b.params):
                return
            self._launch(b)
            self._next += 1

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet launched (parameters without gradient this step) and wait for all."""
        if self.world > 1:
            for b in self.buckets[self._next :]:
                self._launch(b)
            for b in self.buckets:
                if b.handle is not None:
                    b.handle.wait()
        for b in self.buckets:
            b.reset()
        self._next = 0

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()
            for p in b.params:
                if p.grad is None or p.grad.data_ptr() != b.views[id(p)].data_ptr():
                    p.grad = b.views[id(p)]
            b.reset()
        self._next = 0

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class DDPEngine(Engine):
    """The plain-torch engine: ``model`` (built whole with the job's seed) sharded over the TP group when
    ``parallel.tp > 1``, gradients in all-reduce buckets over the DP group, Muon (distributed over DP) + AdamW with
    their schedules, bf16 autocast on request."""

    def __init__(self, model: torch.nn.Module, parallel: ParallelState, cfg: Config, device: torch.device) -> None:
        if parallel.tp_size > 1:
            # Sharding a model initialised identically on every rank keeps initialisation equal to one process's.
            parallelize_model(model, parallel.tp_group, cfg.parallel.sequence_parallel)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        self.model = model
        self.parallel = parallel
        self.sequence_parallel = parallel.tp_size > 1 and cfg.parallel.sequence_parallel
        self.buckets = GradientBuckets(model, parallel, cfg.parallel.bucket_mb)
        self.optimizers = build_optimizers(model, cfg.optimizer)
        if cfg.parallel.distributed_muon and "muon" in self.optimizers:
            self.optimizers["muon"].distribute(parallel)
        self.schedulers = {k: build_scheduler(o, cfg.train.steps, cfg.schedule) for k, o in self.optimizers.items()}
        p = cfg.train.precision
        use_bf16 = p == "bf16" or (p == "auto" and device.type == "cuda")
        self.precision = "bf16" if use_bf16 else "fp32"
        self._device_type = device.type
        if use_bf16 and device.type == "cuda" and cfg.model.fused_ops != "none":
            # the trunk's weight gradients go straight into the fp32 buckets (param.grad), see model.precision
            enable_fp32_grad_accumulation(model)

    def autocast(self) -> AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self._device_type, dtype=torch.bfloat16)
        return nullcontext()

    def step_region(self) -> AbstractContextManager:
        """bf16: autocast's weight casts (and the fp32-accumulating linears') are kept across the micro-batches of
        the step instead of being redone per micro-batch (see ``model.precision.step_region``)."""
        return step_region(self._device_type, enabled=self.precision == "bf16")

    def zero_grad(self) -> None:
        self.buckets.zero_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        with nullcontext() if last else self.buckets.no_sync():
            loss.backward()

    def reduce_gradients(self) -> None:
        self.buckets.finish_grad_sync()
        if self.sequence_parallel:
            sync_sequence_parallel_grads(self.model, self.parallel.tp_group)  # sums over TP and DP commute

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(list(self.model.parameters()), max_norm, self.parallel)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
        for sch in self.schedulers.values():
            sch.step()

    @property
    def lr(self) -> float:
        return self.optimizers[next(iter(self.optimizers))].param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        from megatron_dual.engine.checkpoint import restore_optimizers

        restore_optimizers(state, self.optimizers, self.schedulers, source)

    def apply_schedule(self, cfg: Config) -> bool:
        bases = {"muon": cfg.optimizer.lr, "adamw": cfg.optimizer.adamw_lr or cfg.optimizer.lr}
        for name, sch in self.schedulers.items():
            groups = self.optimizers[name].param_groups
            retarget_scheduler(sch, [bases[name]] * len(groups), cfg.train.steps, cfg.schedule)
        return True

    def close(self) -> None:
        self.buckets.close()


def global_grad_norm(
    params: list[torch.nn.Parameter], state: ParallelState | None = None, foreach: bool | None = None
) -> torch.Tensor:
    """L2 norm of all gradients of the model as if it were one process.

    After the DP all-reduce, gradients are equal on all DP replicas, so only the TP group is reduced over:
    TP-sharded parameters (attribute ``tensor_parallel_dim``) contribute their shard on every TP rank, replicated
    parameters once (on TP rank 0). ``foreach``: per-tensor norms in multi-tensor launches (None: on CUDA).
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].grad.device
    foreach = device.type == "cuda" if foreach is None else foreach
    is_sharded = [getattr(p, "tensor_parallel_dim", None) is not None for p in grads]
    sharded = _sum_of_squares([p.grad for p, s in zip(grads, is_sharded, strict=True) if s], device, foreach)
    replicated = _sum_of_squares([p.grad for p, s in zip(grads, is_sharded, strict=True) if not s], device, foreach)
    tp = state.tp_size if state is not None else 1
    if tp > 1:
        total = sharded + (replicated if state.tp_rank == 0 else 0.0)
        dist.all_reduce(total, group=state.tp_group)
    else:
        total = sharded + replicated
    return total.sqrt()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device, foreach: bool) -> torch.Tensor:
    """Sum of the squared entries of ``grads`` in fp32: ``foreach`` norms (a few multi-tensor launches instead of
    three per parameter: the CUDA default) or the per-tensor loop (the CPU default: its rounding is pinned by
    ``make demo``'s clipped steps, and a sum of squared norms rounds differently)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    if grads and foreach:
        norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float32)
        return total + torch.stack(norms).square().sum()
    for g in grads:
        total += g.detach().float().square().sum()
    return total


def clip_grad_norm_(
    params: list[torch.nn.Parameter], max_norm: float, state: ParallelState | None = None
) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (no clipping when max_norm <= 0 or inf);
    returns the norm before clipping, identical on every rank."""
    norm = global_grad_norm(params, state)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad.detach() for p in params if p.grad is not None]
        for device in {g.device for g in grads}:  # one multi-tensor launch per device; on CPU the per-tensor mul_
            torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))
    return norm
