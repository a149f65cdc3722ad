"""Held-out loss of each objective of the run (AR and MD; prefix-LM too with an objective.mix) during training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from megatron_dual.callbacks.base import Callback
from megatron_dual.data.dataloader import validation_batches, validation_off_note
from megatron_dual.objectives import OBJECTIVES, ObjectiveBatcher
from megatron_dual.parallel import watchdog

__all__ = ["VALID_SEED_OFFSET", "validation_losses", "Validation"]

VALID_SEED_OFFSET = 1_000_003  # validation masks draw from another stream than training masks


@torch.no_grad()
def validation_losses(trainer: Any) -> dict[str, float]:
    """Held-out AR and MD loss (per-token NLL, same normalisation as training) and perplexity on fixed batches and
    masks. Batches are dealt round-robin to the data-parallel ranks and the sums reduced, so the result does not
    depend on the number of ranks; {} without validation data."""
    tr = trainer
    if tr.data.valid is None:
        return {}
    cfg = tr.cfg
    watchdog.phase("validation (forward and loss all-reduce)")
    tr.model.eval()
    batcher = ObjectiveBatcher(cfg.objective, cfg.train.seed + VALID_SEED_OFFSET)
    sums = torch.zeros(2 * len(OBJECTIVES), dtype=torch.float64, device=tr.device)  # nll, tokens per objective
    for b in validation_batches(
        tr.data.valid,
        cfg.train.micro_batch_size,
        cfg.train.eval_batches,
        batcher,
        tr.par.dp_rank,
        tr.par.dp_size,
        tr.schedule.objectives,
    ):
        k = OBJECTIVES.index(b.objective)
        with tr.engine.autocast():
            out = tr.forward_loss(b.to(tr.device))
        sums[2 * k] += out.nll
        sums[2 * k + 1] += b.n_tokens
    tr.par.all_reduce_dp(sums)
    tr.model.train()
    values = sums.tolist()
    result = {
        f"val_{obj}_loss": values[2 * k] / values[2 * k + 1]
        for k, obj in enumerate(OBJECTIVES)
        if values[2 * k + 1] > 0
    }
    result.update(
        {
            f"val_{obj}_ppl": math.exp(min(50.0, result[f"val_{obj}_loss"]))
            for obj in OBJECTIVES
            if f"val_{obj}_loss" in result
        }
    )
    return result


class Validation(Callback):
    """Every ``train.eval_interval`` steps and at the last step: validation losses into the step's metrics; the
    last ones go into the summary (and into checkpoints, so a resumed run still reports them)."""

    priority = 90

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def pre_train(self) -> None:
        note = validation_off_note(self.trainer.cfg, self.trainer.data)
        if note is not None:
            self.trainer.say(note)

    def post_step(self, step: int, metrics: dict[str, Any]) -> None:
        t = self.trainer.cfg.train
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            self.last = validation_losses(self.trainer)
            metrics.update(self.last)

    def post_train(self, summary: dict[str, Any]) -> None:
        summary.update(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval": dict(self.last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last = dict(state.get("last_eval", {}))
