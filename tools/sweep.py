#!/usr/bin/env python
"""Sweeps over (repetitions R x alpha): generate configs (SLURM array job or local runs), run them locally, and
collect their held-out losses into results.csv for tools/plan_alpha.py.

    python tools/sweep.py generate --out sweeps/470m --preset dual-470m --data data/web_text_document \\
        --repetitions 1 4 16 64 --alphas 1 63/64 3/4 1/4 0 --budget-tokens 2e9 --devices 8 --max-parallel 4
    sbatch sweeps/470m/sweep.sbatch                 # or: python tools/sweep.py run --sweep sweeps/470m
    python tools/sweep.py collect --sweep sweeps/470m --out results.csv
    python tools/plan_alpha.py --repetitions 32 --devices 8 --slots 32 --results results.csv

R is realised by the trainer's data.repetitions / data.budget_tokens when R is a whole number, otherwise by a
written subset of the data (see megatron_dual/planning/sweep.py). Score = -val_ar_loss unless --metric says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.config import ConfigError  # noqa: E402
from megatron_dual.planning.sweep import collect_results, generate_sweep, run_local  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write configs/, manifest.json, sweep.sbatch, run_local.sh")
    g.add_argument("--out", required=True, help="sweep directory")
    g.add_argument("--preset", required=True, help="tiny, dual-470m, dual-1b, ...")
    g.add_argument("--data", required=True, help="data prefix (.bin/.idx) to draw the unique subsets from")
    g.add_argument("--repetitions", nargs="+", type=float, required=True, help="R values, e.g. 1 4 16 64")
    g.add_argument("--alphas", nargs="+", required=True, help="alpha values, fractions allowed: 1 3/4 1/4 0")
    budget = g.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-tokens", type=float, help="training tokens per run (rounded down to whole steps)")
    budget.add_argument("--steps", type=int, help="optimizer steps per run")
    g.add_argument("--devices", type=int, default=1, help="data-parallel ranks per run (default 1)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every task (repeatable), e.g. --set train.grad_accum=64",
    )
    g.add_argument("--decay-fraction", type=float, default=0.25, help="WSD decay share of the steps (default 0.25)")
    g.add_argument("--job-name", default="dual-sweep")
    g.add_argument("--max-parallel", type=int, default=0, help="SLURM array throttle (%%N); 0: none")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="LINE",
        help="extra #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)",
    )
    r = sub.add_parser("run", help="run the tasks here, one after another (finished runs are skipped)")
    r.add_argument("--sweep", required=True)
    r.add_argument("--tasks", help="comma-separated task ids (default: all)")
    r.add_argument("--threads", type=int, default=0, help="train.threads for each run")
    r.add_argument("--nice", type=int, default=10, help="nice level of the training processes (default 10)")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    c = sub.add_parser("collect", help="write results.csv from every run's summary.json")
    c.add_argument("--sweep", required=True)
    c.add_argument("--out", default="results.csv")
    c.add_argument("--metric", default="val_ar_loss", help="summary.json key to score by (default val_ar_loss)")
    c.add_argument("--higher-is-better", action="store_true", help="score = metric (default: score = -metric)")
    c.add_argument("--strict", action="store_true", help="fail when any run is missing or unfinished")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "generate":
            tasks = generate_sweep(
                args.out,
                preset=args.preset,
                data_path=args.data,
                repetitions=args.repetitions,
                alphas=args.alphas,
                budget_tokens=None if args.budget_tokens is None else int(args.budget_tokens),
                steps=args.steps,
                devices=args.devices,
                overrides=args.overrides,
                decay_fraction=args.decay_fraction,
                job_name=args.job_name,
                max_parallel=args.max_parallel,
                slurm_extra=args.sbatch,
            )
            for t in tasks:
                print(
                    f"task {t.task:3d}: R = {t.repetitions:>6g}  alpha = {t.alpha:>7}  steps {t.steps}  "
                    f"unique tokens {t.unique_tokens:,} ({t.realised_by})  {t.config}"
                )
            print(
                f"{len(tasks)} tasks; SLURM: sbatch {os.path.join(args.out, 'sweep.sbatch')}; "
                f"here: python tools/sweep.py run --sweep {args.out}"
            )
        elif args.cmd == "run":
            ids = [int(x) for x in args.tasks.split(",")] if args.tasks else None
            records = run_local(args.sweep, ids, threads=args.threads, nice=args.nice, dry_run=args.dry_run)
            for rec in records:
                print(f"task {rec['task']:3d}: {rec['status']}  {rec['log']}")
            if any(rec["status"] == "failed" for rec in records):
                return 1
        else:
            rows, missing = collect_results(
                args.sweep, args.out, metric=args.metric, lower_is_better=not args.higher_is_better, strict=args.strict
            )
            for m in missing:
                print(f"missing: {m}", file=sys.stderr)
            print(f"{len(rows)} rows -> {args.out}")
    except (ValueError, ConfigError, FileNotFoundError, IndexError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
