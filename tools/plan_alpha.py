#!/usr/bin/env python
"""Choose alpha before a big job: the paper's rules, the alpha your layout realises exactly, the config to paste,
and (with --results) a GP surface fitted to your own sweep.

    python tools/plan_alpha.py --unique-tokens 1e9 --budget-tokens 32e9 --devices 256 --slots 1
    python tools/plan_alpha.py --repetitions 128 --devices 64 --slots 4 --preset dual-470m
    python tools/plan_alpha.py --repetitions 16 --devices 8 --slots 4 --results results.csv --plot-dir plan/

The rule (megatron_dual/planning/rules.py has the quoted rule text): alpha = 63/64 for R <= 16 (Remark 1),
alpha = 16/R for R > 32 (Remark 2: the AR objective sees ~16 repetitions), min(63/64, 16/R) in between.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.config import ALPHA_MAX_DENOMINATOR, ConfigError, ObjectiveConfig  # noqa: E402
from megatron_dual.objectives import describe_objective, effective_alpha, schedule_from_config  # noqa: E402
from megatron_dual.planning.gp import ResultsError, planner_report  # noqa: E402
from megatron_dual.planning.rules import (  # noqa: E402
    BAND_TEXT,
    config_lines,
    realise_alpha,
    recommend_alpha,
    repetitions_from_tokens,
    slots_for_exact,
)
from megatron_dual.planning.sweep import parse_fraction, repetition_fields  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unique-tokens", type=float, help="unique training tokens available (e.g. 1e9)")
    p.add_argument("--budget-tokens", type=float, help="tokens the run will train on (e.g. 32e9)")
    p.add_argument("--repetitions", type=float, help="R directly (instead of budget / unique tokens)")
    p.add_argument("--devices", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--slots", type=int, default=1, help="micro-batch slots per rank, train.grad_accum (default 1)")
    p.add_argument("--alpha", help="plan this alpha instead of the rule's (e.g. 3/4)")
    p.add_argument("--exact", action="store_true", help="fail unless the layout realises the alpha exactly")
    p.add_argument("--preset", help="preset for the printed command (tiny, dual-470m, ...)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the printed launch command (default 8)")
    p.add_argument("--results", help="results.csv (repetitions, alpha, score[, model_size]) to fit the GP surface")
    p.add_argument("--model-size", type=float, help="with several model sizes in --results: which one")
    p.add_argument("--plot-dir", default=".", help="where alpha_surface.png and best_alpha.png go (default .)")
    p.add_argument("--samples", type=int, default=4000, help="posterior draws per R (default 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipe",
        default="paper",
        choices=["paper", "reference"],
        help="objective.recipe: print the effective alpha it optimises (reference: AR tokens x 2.0)",
    )
    p.add_argument("--alpha-schedule", help="objective.alpha_schedule to realise on the layout, e.g. '0:1, 6144:63/64'")
    p.add_argument("--steps", type=int, default=8192, help="train.steps for --alpha-schedule (default 8192)")
    p.add_argument("--json", action="store_true", help="machine-readable output (rule and layout only)")
    return p


def resolve_repetitions(args: argparse.Namespace) -> tuple[float, str]:
    if args.repetitions is not None:
        if args.unique_tokens is not None and args.budget_tokens is not None:
            implied = repetitions_from_tokens(args.unique_tokens, args.budget_tokens)
            if abs(implied - args.repetitions) > 1e-6 * implied:
                raise ValueError(
                    f"--repetitions {args.repetitions:g} contradicts --budget-tokens / --unique-tokens "
                    f"= {implied:.4g}: give one or the other"
                )
        if not args.repetitions >= 1:
            raise ValueError(f"--repetitions = {args.repetitions:g}: must be >= 1")
        return args.repetitions, f"R = {args.repetitions:g} (given)"
    if args.unique_tokens is None or args.budget_tokens is None:
        raise ValueError("give --repetitions, or both --unique-tokens and --budget-tokens")
    r = repetitions_from_tokens(args.unique_tokens, args.budget_tokens)
    return r, f"R = {args.budget_tokens:,.0f} budget / {args.unique_tokens:,.0f} unique tokens = {r:.4g}"


def print_objective(args: argparse.Namespace, plan) -> None:
    """The recipe's nominal vs effective alpha; with --alpha-schedule the realised schedule on the layout."""
    cfg = ObjectiveConfig(alpha=float(plan.alpha), recipe=args.recipe, alpha_schedule=args.alpha_schedule or "")
    schedule = schedule_from_config(cfg, args.devices, args.slots, args.steps if args.alpha_schedule else 1)
    for i, line in enumerate(describe_objective(cfg, schedule)):
        print(f"{'objective: ' if i == 0 else '  '}{line.strip()}")
    if args.recipe == "reference" and not args.alpha_schedule:
        print(
            f"  (the reference recipe weighs AR tokens 2.0 and normalises both objectives by all positions: a share "
            f"r of MD slots optimises an effective alpha of 2(1 - r)/(2 - r) = "
            f"{effective_alpha(plan.alpha, 'reference')})"
        )


def json_report(args: argparse.Namespace, r: float, rec, target: float, plan, lines: list[str]) -> str:
    """The rule and the layout as JSON (``--json``)."""
    return json.dumps(
        {
            "repetitions": r,
            "regime": rec.regime,
            "rule_alpha": rec.alpha,
            "effective_ar_repetitions": rec.effective_ar_repetitions,
            "band": rec.band,
            "paper_pick": str(rec.paper_pick) if rec.paper_pick else None,
            "target": target,
            "realised_alpha": str(plan.alpha),
            "ar_slots": plan.ar_slots,
            "md_slots": plan.md_slots,
            "total_slots": plan.total,
            "exact": plan.exact,
            "recipe": args.recipe,
            "effective_alpha": str(effective_alpha(plan.alpha, args.recipe)),
            "config": lines,
        },
        indent=2,
    )


def print_rule(args: argparse.Namespace, r: float, how: str, rec) -> None:
    """R, the regime, the paper's rule and its alpha, the tolerance band and the paper's own pick."""
    print(how)
    print(f"regime: {rec.regime}")
    print(f"rule: {rec.rule}")
    print(
        f"  -> alpha = {rec.alpha:.6g} (~{rec.alpha_fraction}); the AR objective sees alpha x R = "
        f"{rec.effective_ar_repetitions:.3g} repetitions"
    )
    if rec.regime != "regular":
        print(
            f'  tolerance band 8 <= alpha x R <= 32 (paper: "{BAND_TEXT}"): alpha in '
            f"[{rec.band[0]:.4g}, {rec.band[1]:.4g}]"
        )
    if rec.paper_pick is not None:
        print(
            f"  the paper's published pick at {r:g}x: alpha = {rec.paper_pick} "
            f"({float(rec.paper_pick) * r:.3g} effective AR repetitions)"
        )
    if args.alpha:
        print(f"planning alpha = {args.alpha} as asked (rule: {rec.alpha:.6g})")


def print_layout(args: argparse.Namespace, plan, target: float, rule_alpha: float) -> None:
    """The alpha the layout realises, its neighbours when inexact, and how the slots split per step."""
    print(
        f"layout: {args.devices} device(s) x {args.slots} slot(s) = {plan.total} objective slots; alpha must "
        f"be k/{plan.total}"
    )
    status = "exactly" if plan.exact else f"nearest; |error| = {abs(float(plan.alpha) - target):.4g}"
    reduced = f" = {plan.alpha}" if plan.alpha.denominator != plan.total else ""
    print(f"  realised alpha = {plan.ar_slots}/{plan.total}{reduced} = {float(plan.alpha):.6g} ({status})")
    if not plan.exact:
        exact = Fraction(target).limit_denominator(ALPHA_MAX_DENOMINATOR)
        need = slots_for_exact(exact, args.devices)
        print(
            f"  realisable neighbours: {', '.join(f'{a} = {float(a):.4g}' for a in plan.neighbours)}; "
            f"{exact} exactly needs slots per rank a multiple of {need}"
        )
    print(
        f"  per step: {plan.ar_slots} slot(s) run AR, {plan.md_slots} run MD; at step 0: {plan.ranks_all_ar} "
        f"rank(s) all-AR, {plan.ranks_all_md} all-MD, {plan.ranks_mixed} mixed (the assignment rotates every "
        f"step, so every rank sees both objectives)"
    )
    if plan.md_slots == 0 and rule_alpha < 1:
        print(f"  warning: this layout runs no MD at all; the smallest MD share it offers is 1/{plan.total}")


def print_results(args: argparse.Namespace, r: float) -> None:
    """``--results``: the GP surface fitted to the user's sweep and its best alpha at their R."""
    report, best, _ = planner_report(
        args.results,
        args.plot_dir,
        extra_repetitions=[r],
        samples=args.samples,
        seed=args.seed,
        model_size=args.model_size,
    )
    print(report)
    mine = next(b for b in best if abs(b.repetitions - r) < 1e-9)
    near = realise_alpha(mine.map_alpha, args.devices, args.slots)
    print(
        f"your R = {r:g}: most probable best alpha {mine.map_alpha:.3f} (80% interval "
        f"[{mine.interval[0]:.3f}, {mine.interval[1]:.3f}]), expected gain over alpha=1 "
        f"{mine.expected_gain:+.4g}; nearest realisable {near.alpha} "
        f"(objective.alpha={near.ar_slots}/{near.total})"
    )


def run(args: argparse.Namespace) -> None:
    """Everything the tool prints, from the parsed arguments."""
    r, how = resolve_repetitions(args)
    rec = recommend_alpha(r)
    target = float(parse_fraction(args.alpha)) if args.alpha else rec.alpha
    layout = realise_alpha(target, args.devices, args.slots, exact=args.exact)
    lines = config_lines(
        layout,
        args.preset,
        r,
        repetition_fields(),
        args.budget_tokens,
        gpus_per_node=args.gpus_per_node,
        alpha_schedule=args.alpha_schedule,
        steps=args.steps,
    )
    if args.json:
        print(json_report(args, r, rec, target, layout, lines))
        return
    print_rule(args, r, how, rec)
    print_layout(args, layout, target, rec.alpha)
    print_objective(args, layout)
    print("config lines:")
    for line in lines:
        print(f"  {line}")
    if args.results:
        print_results(args, r)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, ConfigError, ResultsError) as e:
        print(f"plan_alpha: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # --results needs scikit-learn and matplotlib
        print(f"plan_alpha: error: {e} (pip install -e . installs what megatron-dual needs)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
