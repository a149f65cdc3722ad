"""Periodic checkpoints, and the final one."""

from __future__ import annotations

from typing import Any

from megatron_dual.callbacks.base import Callback

__all__ = ["Checkpointer"]


class Checkpointer(Callback):
    """Saves every ``checkpoint.interval`` steps (after the step's metrics are logged) and at the last step."""

    priority = -10

    def end_step(self, step: int) -> None:
        interval = self.trainer.cfg.checkpoint.interval
        if interval and step % interval == 0:
            self.trainer.save()

    def post_train(self, summary: dict[str, Any]) -> None:
        tr = self.trainer
        interval = tr.cfg.checkpoint.interval
        if tr.step == tr.cfg.train.steps and (not interval or tr.step % interval):
            tr.save()
