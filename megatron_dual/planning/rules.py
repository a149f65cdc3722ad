"""The paper's rules of thumb for alpha, and how a device x slot layout realises them.

Rule text (Samuel & Charpentier, ICLR 2026; quoted from the model card and paper summary in ``shared/seeds/``):

* Remark 1 (Regular data settings): "Train with alpha ~ 63/64 to gain strong bidirectional performance without
  losing autoregressive quality." Applies up to 16 repetitions ("Regular data (<=16 reps)").
* Remark 2 (Data-constrained settings): "Choose alpha that exposes the autoregressive objective to roughly 16
  repetitions of the training data." Applies beyond 32 repetitions ("Data-constrained (>32 reps)"); the paper adds
  that "exceeding 32 AR repetitions causes overfitting while fewer than 8 leads to underfitting".

The AR objective gets a share alpha of the token budget, so it sees each unique token alpha x R times: Remark 2 is
``alpha = 16 / R``. **Between 16 and 32 repetitions** the paper gives no rule; we use
``alpha = min(63/64, 16 / R)`` there, i.e. Remark 2's curve continued down to where it meets Remark 1. The two
meet at R = 16 / (63/64) = 16.25 (at R = 16 exactly, 63/64 already gives the AR objective 15.75 ~ 16 repetitions),
so the rule is one continuous function of R that reproduces Remark 1 on R <= 16 and Remark 2 on R > 32 exactly.
The band ``8 <= alpha x R <= 32`` is reported as the tolerance the paper's text implies; the paper's own pick at
32x (alpha = 3/4, 24 effective AR repetitions) lies inside it, while the rule's centre at 32x is 1/2.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from fractions import Fraction

from megatron_dual.config import ALPHA_MAX_DENOMINATOR, ConfigError
from megatron_dual.objectives import AR, ObjectiveSchedule
from megatron_dual.parallel.state import check_alpha, realisable_alphas

__all__ = [
    "REGULAR_ALPHA",
    "TARGET_AR_REPETITIONS",
    "AR_REPETITION_BAND",
    "REMARK_1",
    "REMARK_2",
    "PAPER_PICKS",
    "Recommendation",
    "LayoutPlan",
    "repetitions_from_tokens",
    "recommend_alpha",
    "realise_alpha",
    "config_lines",
    "launch_command",
]

REGULAR_ALPHA = Fraction(63, 64)
TARGET_AR_REPETITIONS = 16
AR_REPETITION_BAND = (8, 32)
REGULAR_MAX_R = 16
CONSTRAINED_MIN_R = 32
REMARK_1 = (
    "Remark 1 (Regular data settings): Train with alpha ~ 63/64 to gain strong bidirectional performance "
    "without losing autoregressive quality."
)
REMARK_2 = (
    "Remark 2 (Data-constrained settings): Choose alpha that exposes the autoregressive objective to roughly "
    "16 repetitions of the training data."
)
BAND_TEXT = "exceeding 32 AR repetitions causes overfitting while fewer than 8 leads to underfitting"
# The published recommendations per regime (model card, "Recommended Configurations"), shown for comparison only.
PAPER_PICKS: dict[int, Fraction] = {1: Fraction(63, 64), 32: Fraction(3, 4), 128: Fraction(1, 8)}


@dataclass(frozen=True)
class Recommendation:
    repetitions: float
    alpha: float
    regime: str  # regular | transition | data-constrained
    rule: str  # which rule text produced alpha
    effective_ar_repetitions: float  # alpha x R
    band: tuple[float, float]  # alpha range with 8 <= alpha x R <= 32, clipped to [0, 1]
    paper_pick: Fraction | None = None  # the paper's published alpha at this R, if it published one

    @property
    def alpha_fraction(self) -> Fraction:
        return Fraction(self.alpha).limit_denominator(ALPHA_MAX_DENOMINATOR)


def repetitions_from_tokens(unique_tokens: float, budget_tokens: float) -> float:
    """R = budget / unique tokens (the paper's n-reps); errors name the offending value."""
    if not unique_tokens > 0:
        raise ValueError(f"--unique-tokens = {unique_tokens}: must be positive")
    if not budget_tokens > 0:
        raise ValueError(f"--budget-tokens = {budget_tokens}: must be positive")
    r = budget_tokens / unique_tokens
    if r < 1:
        raise ValueError(
            f"--budget-tokens = {budget_tokens:,.0f} is less than --unique-tokens = {unique_tokens:,.0f}: "
            f"R = {r:.3g} < 1 (the budget does not even cover the data once; R >= 1 is required)"
        )
    return r


def recommend_alpha(repetitions: float) -> Recommendation:
    """alpha by the paper's rules: 63/64 for R <= 16, 16/R for R > 32, min(63/64, 16/R) in between."""
    r = float(repetitions)
    if not (r >= 1 and math.isfinite(r)):
        raise ValueError(f"repetitions = {repetitions}: must be a finite number >= 1")
    if r <= REGULAR_MAX_R:
        alpha, regime, rule = float(REGULAR_ALPHA), "regular", REMARK_1
    elif r <= CONSTRAINED_MIN_R:
        alpha = min(float(REGULAR_ALPHA), TARGET_AR_REPETITIONS / r)
        regime = "transition"
        rule = (
            f"16 < R <= 32 (no rule in the paper): alpha = min(63/64, 16/R), Remark 2's curve continued until it "
            f"meets Remark 1 at R = 16.25. {REMARK_2}"
        )
    else:
        alpha, regime, rule = TARGET_AR_REPETITIONS / r, "data-constrained", REMARK_2
    lo, hi = AR_REPETITION_BAND
    band = (min(1.0, lo / r), min(1.0, hi / r))
    pick = PAPER_PICKS.get(int(r)) if float(r).is_integer() else None
    return Recommendation(r, alpha, regime, rule, alpha * r, band, pick)


# ------------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class LayoutPlan:
    devices: int  # data-parallel ranks
    slots: int  # micro-batch slots per rank (train.grad_accum)
    target: float
    ar_slots: int  # of devices x slots global slots, per step
    alpha: Fraction
    neighbours: tuple[Fraction, ...] = field(default_factory=tuple)  # realisable alphas either side of the target
    ranks_all_ar: int = 0  # at step 0 (the assignment rotates every step)
    ranks_all_md: int = 0
    ranks_mixed: int = 0

    @property
    def total(self) -> int:
        return self.devices * self.slots

    @property
    def md_slots(self) -> int:
        return self.total - self.ar_slots

    @property
    def exact(self) -> bool:
        return abs(float(self.alpha) - self.target) < 1e-12


def _check_layout(devices: int, slots: int) -> None:
    if int(devices) != devices or devices < 1:
        raise ConfigError(f"--devices = {devices}: must be a whole number >= 1 (data-parallel ranks)")
    if int(slots) != slots or slots < 1:
        raise ConfigError(f"--slots = {slots}: must be a whole number >= 1 (micro-batch slots per rank)")


def realise_alpha(target: float, devices: int, slots: int, *, exact: bool = False) -> LayoutPlan:
    """The realisable alpha k/(devices x slots) nearest ``target`` (ties go to the larger alpha, the AR side);
    with ``exact`` a ConfigError listing the realisable alphas when ``target`` is not one of them."""
    _check_layout(devices, slots)
    if not 0 <= target <= 1:
        raise ConfigError(f"alpha = {target}: must be in [0, 1]")
    n = devices * slots
    if exact:
        try:
            check_alpha(target, devices, slots)
        except ConfigError as e:
            values = realisable_alphas(devices, slots)
            listing = (
                ", ".join(str(v) for v in values)
                if len(values) <= 33
                else (", ".join(str(v) for v in values[:8]) + ", ..., " + ", ".join(str(v) for v in values[-8:]))
            )
            raise ConfigError(f"{e}; realisable with {devices} x {slots}: {listing}") from None
    k = math.floor(target * n + 0.5)
    k = min(n, max(0, k))
    lower = Fraction(math.floor(target * n), n)
    upper = Fraction(math.ceil(target * n), n)
    schedule = ObjectiveSchedule(k / n, devices, slots)
    per_rank = [schedule.slots(rank, 0) for rank in range(devices)]
    all_ar = sum(all(o == AR for o in objs) for objs in per_rank)
    all_md = sum(all(o != AR for o in objs) for objs in per_rank)
    return LayoutPlan(
        devices,
        slots,
        float(target),
        schedule.n_ar,
        schedule.alpha,
        tuple(sorted({lower, upper})),
        all_ar,
        all_md,
        devices - all_ar - all_md,
    )


def slots_for_exact(target: Fraction, devices: int) -> int:
    """Smallest slots per rank that realises ``target`` exactly with ``devices`` ranks."""
    return target.denominator // math.gcd(target.denominator, devices)


def config_lines(
    plan: LayoutPlan,
    preset: str | None = None,
    repetitions: float | None = None,
    data_fields: tuple[str, str] | None = None,
    budget_tokens: float | None = None,
    gpus_per_node: int = 8,
    alpha_schedule: str | None = None,
    steps: int | None = None,
) -> list[str]:
    """Lines to paste: YAML-style ``section.field=value`` overrides and the launch command. With ``alpha_schedule``
    the schedule (and ``train.steps``) replaces the constant alpha."""
    if int(gpus_per_node) != gpus_per_node or gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node = {gpus_per_node}: must be a whole number >= 1")
    if alpha_schedule:
        lines = [f"objective.alpha_schedule={alpha_schedule}", f"train.steps={steps}"]
    else:
        lines = [f"objective.alpha={plan.ar_slots}/{plan.total}"]
    lines.append(f"train.grad_accum={plan.slots}")
    if repetitions is not None and data_fields is not None and float(repetitions).is_integer():
        rep_field, tok_field = data_fields
        lines.append(f"data.{rep_field}={int(repetitions)}")
        if budget_tokens is not None:
            lines.append(f"data.{tok_field}={int(budget_tokens)}")
    sets = " ".join(f"--set {shlex.quote(line)}" for line in lines)
    lines.append(f"{launch_command(plan.devices, int(gpus_per_node))}{f' --preset {preset}' if preset else ''} {sets}")
    return lines


def launch_command(devices: int, gpus_per_node: int) -> str:
    """The launcher for ``devices`` ranks on nodes of ``gpus_per_node`` GPUs: torchrun starts the same number of
    processes on every node, so ranks that do not fill whole nodes are spread over the fewest nodes that divide
    them evenly (12 on 8-GPU nodes: 2 nodes x 6)."""
    if devices == 1:
        return "megatron-dual train"
    if devices <= gpus_per_node:
        return f"torchrun --nproc_per_node={devices} -m megatron_dual.train"
    nodes = next(n for n in range(-(-devices // gpus_per_node), devices + 1) if devices % n == 0)
    return (
        f"torchrun --nnodes={nodes} --nproc_per_node={devices // nodes} "
        f"--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 -m megatron_dual.train"
    )
