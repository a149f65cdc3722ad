"""What the training loop needs from an engine, and nothing more.

An engine owns the prepared model (sharded for tensor parallelism, gradients wired for data parallelism), the
optimizers and their learning-rate schedules, and the mixed-precision context. Per optimizer step the loop calls::

    engine.zero_grad()
    with engine.step_region():            # once around all micro-batches (bf16: the weight casts live for the step)
        for each micro-batch:  with engine.autocast(): loss = ...;  engine.backward(loss, last=is_last)
    engine.reduce_gradients()                 # gradients now equal those of one process over the global batch
    norm = engine.clip_grad_norm(max_norm)    # global norm before clipping, identical on every rank
    engine.step()                             # optimizers, then schedules

and ``state_dict()`` / ``load_state_dict()`` for checkpoints. :class:`megatron_dual.engine.ddp.DDPEngine` is plain
torch (bucketed all-reduce, TP layers, distributed Muon); a DeepSpeed engine implements the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

__all__ = ["Engine"]


class Engine(ABC):
    model: torch.nn.Module
    precision: str  # "bf16" | "fp32", for display

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """The context forward passes (and their losses) run in."""

    def step_region(self) -> AbstractContextManager:
        """The context around all the micro-batches (forwards and backwards) of one optimizer step; nothing here."""
        return nullcontext()

    @abstractmethod
    def zero_grad(self) -> None:
        """Clear the gradients before the first micro-batch of a step."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Back-propagate one micro-batch; gradients are synchronised only on the ``last`` of the step."""

    @abstractmethod
    def reduce_gradients(self) -> None:
        """Wait for (and complete) the gradient synchronisation of the step."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale gradients to a global norm of at most ``max_norm`` (0: no clipping); the norm before clipping."""

    @abstractmethod
    def step(self) -> None:
        """Apply the optimizers, then advance the learning-rate schedules."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate the next :meth:`step` applies (of the first optimizer)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": {name: state}, "schedulers": {name: state}}`` of this rank."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` output; errors name ``source`` and the optimizer whose state does not fit."""

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
        """Write checkpoint ``step`` under ``root`` (collective); the plain form of :mod:`.checkpoint` by default."""
        from megatron_dual.engine import checkpoint as ckpt

        return ckpt.save_checkpoint(
            root,
            step,
            self.model,
            self.state_dict(),
            trainer_state,
            config,
            parallel=parallel,
            keep_last=keep_last,
            extra=extra,
        )

    def load_checkpoint(self, path: Path, parallel: Any, model_config: Mapping[str, Any] | None = None) -> None:
        """Restore the model and this engine's state from checkpoint ``path`` (the loop restores its own)."""
        from megatron_dual.engine import checkpoint as ckpt

        if (Path(path) / "deepspeed").is_dir():
            raise ckpt.CheckpointError(
                f"{path} is a DeepSpeed checkpoint: resume it with engine.name = deepspeed, or "
                f"convert it with tools/convert_checkpoint.py {path} OUT --tp N"
            )
        ckpt.load_model_state(path, self.model, parallel, model_config=model_config)
        state, source = ckpt.read_engine_state(path, parallel)
        self.load_state_dict(state, str(source))

    def apply_schedule(self, cfg: Any) -> bool:
        """After a resume: make ``cfg.optimizer`` lrs and ``cfg.schedule`` over ``cfg.train.steps`` take effect on the
        restored optimizer and schedule state (keeping the step count); False when this engine cannot."""
        return False

    def close(self) -> None:  # noqa: B027 (optional: most engines hold nothing to release)
        """Release hooks and buffers (the model stays usable)."""
