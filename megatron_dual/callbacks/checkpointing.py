"""Periodic checkpoints, the final one, and the one of a run stopped by a signal."""

from __future__ import annotations

from typing import Any

from megatron_dual.callbacks.base import Callback

__all__ = ["Checkpointer"]


class Checkpointer(Callback):
    """Saves every ``checkpoint.interval`` steps (after the step's metrics are logged), at the last step and when
    the run was asked to stop (:meth:`Trainer.request_stop`), never twice for one step; the summary gets the path."""

    priority = -10

    def end_step(self, step: int) -> None:
        interval = self.trainer.cfg.checkpoint.interval
        if interval and step % interval == 0:
            self.trainer.save()

    def post_train(self, summary: dict[str, Any]) -> None:
        tr = self.trainer
        if (tr.step == tr.cfg.train.steps or tr.stop_reason) and tr.saved_step != tr.step:
            tr.save()
        if tr.last_checkpoint is not None:
            summary["checkpoint"] = str(tr.last_checkpoint)
