"""Rank layout and process groups: tensor-parallel (TP) groups, data-parallel (DP) groups, objective groups.

Ranks are laid out TP-fastest (Megatron's order): ``rank = dp_rank * tp + tp_rank``, so the TP peers of a rank
are consecutive (on one node when tp <= GPUs per node). The objective a rank runs in a micro-batch slot is a
function of ``(dp_rank, slot, step)`` only (:class:`megatron_dual.objectives.ObjectiveSchedule` with
``n_ranks = dp``), hence identical for all TP peers.

Everything that decides *which* ranks belong together is a pure function (:func:`rank_layout`,
:func:`objective_ranks`), testable for any world size without processes. :class:`ParallelState` only adds the
torch process groups; there is no module-level state.

Objective groups: at step ``s`` and slot ``m`` the DP ranks running AR form the AR objective group and the rest the
MD group (:func:`objective_ranks`). With rotation the membership changes every step, so per-objective reductions
(global token counts, per-objective metrics) are done as one all-reduce of a per-objective vector over the DP
group: the AR entry of that sum is exactly the sum over the AR objective group. One collective per step instead of
two, and no communicator per rotation phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.config import ALPHA_MAX_DENOMINATOR, ConfigError, alpha_to_slots, launch_env
from megatron_dual.objectives import AR, MD, ObjectiveSchedule

__all__ = [
    "RankLayout",
    "rank_layout",
    "objective_ranks",
    "realisable_alphas",
    "check_alpha",
    "ParallelState",
    "group_size",
    "group_rank",
    "dist_env",
]


@dataclass(frozen=True)
class RankLayout:
    world_size: int
    tp: int
    dp: int
    tp_groups: tuple[tuple[int, ...], ...]  # tp_groups[d] = the TP peers of DP index d
    dp_groups: tuple[tuple[int, ...], ...]  # dp_groups[t] = the DP replicas of TP index t

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def rank_of(self, dp_rank: int, tp_rank: int) -> int:
        return dp_rank * self.tp + tp_rank


def rank_layout(world_size: int, tp: int = 1) -> RankLayout:
    """The TP and DP groups of ``world_size`` ranks with tensor-parallel size ``tp`` (pure)."""
    if world_size < 1:
        raise ConfigError(f"world size = {world_size}: must be >= 1")
    if tp < 1:
        raise ConfigError(f"parallel.tp = {tp}: must be >= 1")
    if world_size % tp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"parallel.tp = {tp} does not divide the world size {world_size}; "
            f"allowed tp for {world_size} ranks: {', '.join(map(str, divisors))}"
        )
    dp = world_size // tp
    tp_groups = tuple(tuple(range(d * tp, (d + 1) * tp)) for d in range(dp))
    dp_groups = tuple(tuple(range(t, world_size, tp)) for t in range(tp))
    return RankLayout(world_size, tp, dp, tp_groups, dp_groups)


def objective_ranks(
    layout: RankLayout, schedule: ObjectiveSchedule, step: int, slot: int = 0
) -> dict[str, tuple[int, ...]]:
    """Global ranks running each objective in ``slot`` at ``step`` (all TP peers of a DP rank together)."""
    out: dict[str, list[int]] = {AR: [], MD: []}
    for d in range(layout.dp):
        out[schedule.objective(d, slot, step)].extend(layout.tp_groups[d])
    return {k: tuple(v) for k, v in out.items()}


def realisable_alphas(dp: int, slots: int) -> list[Fraction]:
    n = dp * slots
    return sorted({Fraction(k, n) for k in range(n + 1)})


def check_alpha(alpha: float, dp: int, slots: int) -> int:
    """Number of global slots running AR; a ConfigError that lists the nearest realisable alphas and the layouts
    that would realise ``alpha`` exactly otherwise."""
    try:
        return alpha_to_slots(alpha, dp * slots)
    except ConfigError as e:
        frac = Fraction(alpha).limit_denominator(ALPHA_MAX_DENOMINATOR)
        need = frac.denominator
        slots_needed = need // math.gcd(need, dp)
        raise ConfigError(
            f"{e} Here: {dp} data-parallel ranks x {slots} micro-batch slots = {dp * slots} global "
            f"slots; {frac} needs dp x slots to be a multiple of {need}, e.g. train.grad_accum = "
            f"{slots_needed} (or a multiple) with {dp} DP ranks, or {need} DP ranks x 1 slot."
        ) from None


def group_size(group: Any) -> int:
    """Size of ``group``; None (or no torch.distributed) means a group of one."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's or SLURM's environment; (0, 0, 1) when neither is set."""
    return launch_env()


class ParallelState:
    """The layout of one job plus, when ``torch.distributed`` is initialised, the process groups of this rank.

    ``ParallelState(world_size=1)`` is the single-process state (all groups None). Collective creation is
    collective: every rank must construct its ParallelState with the same arguments.
    """

    def __init__(
        self,
        world_size: int = 1,
        rank: int = 0,
        tp: int = 1,
        alpha: float = 1.0,
        slots: int = 1,
        rotate: bool | str = True,
        create_groups: bool | None = None,
        timeout: float | None = None,
        *,
        schedule: ObjectiveSchedule | None = None,
    ) -> None:
        self.timeout = None if timeout is None else timedelta(seconds=timeout)  # of the groups created here
        self.layout = rank_layout(world_size, tp)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside the world of {world_size} ranks")
        self.rank = rank
        self.world_size = world_size
        self.tp_size = tp
        self.dp_size = self.layout.dp
        self.tp_rank = self.layout.tp_rank(rank)
        self.dp_rank = self.layout.dp_rank(rank)
        self.slots = slots
        if schedule is None:  # else one built from the objective section (objectives.schedule_from_config)
            check_alpha(alpha, self.dp_size, slots)
            schedule = ObjectiveSchedule(alpha, self.dp_size, slots, rotate)
        elif (schedule.n_ranks, schedule.n_slots) != (self.dp_size, slots):
            raise ConfigError(
                f"the objective schedule covers {schedule.n_ranks} ranks x {schedule.n_slots} slots, "
                f"the layout {self.dp_size} data-parallel ranks x {slots} slots"
            )
        self.schedule = schedule
        self.tp_group: Any = None
        self.dp_group: Any = None
        if create_groups is None:
            create_groups = world_size > 1 and dist.is_available() and dist.is_initialized()
        if create_groups:
            self._create_groups()

    def _create_groups(self) -> None:
        if dist.get_world_size() != self.world_size:
            raise ConfigError(
                f"ParallelState(world_size={self.world_size}) but torch.distributed has {dist.get_world_size()} ranks"
            )
        # new_group is collective over the world: every rank creates every group, in the same order.
        for ranks in self.layout.tp_groups:
            g = dist.new_group(list(ranks), timeout=self.timeout)
            if self.rank in ranks:
                self.tp_group = g
        for ranks in self.layout.dp_groups:
            g = dist.new_group(list(ranks), timeout=self.timeout)
            if self.rank in ranks:
                self.dp_group = g

    @property
    def alpha(self) -> Fraction:
        return self.schedule.alpha

    def objectives(self, step: int) -> list[str]:
        """The objective of each of this rank's micro-batch slots at ``step`` (same for all TP peers)."""
        return self.schedule.slots(self.dp_rank, step)

    def describe(self) -> str:
        s = self.schedule
        counts = s.counts(0)
        split = " + ".join(f"{counts.get(o, 0)} {o.upper()}" for o in s.objectives)
        rotation = {
            "step": ", rotating every step",
            "epoch": f", rotating every epoch of {s.epoch_steps} steps",
            "none": "",
        }[s.rotate]
        what = f"schedule {s.alpha_schedule.text!r}, at step 0 alpha" if s.alpha_schedule else "alpha"
        return (
            f"world {self.world_size} = tp {self.tp_size} x dp {self.dp_size}; {self.slots} micro-batch slots per "
            f"rank; {what} = {s.alpha} = {split} of {s.total} global slots{rotation}{s.schedule_note()}"
        )

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over the DP group (no-op for one replica)."""
        if self.dp_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor
