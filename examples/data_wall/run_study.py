"""The data-wall study on CPU: held-out AR loss of the `tiny` preset, R in {1, 4, 16, 64} x alpha in {1, 3/4, 1/4, 0}.

Every run gets the same token budget (``--steps`` x 4 slots x ``--micro-batch-size`` x 128 tokens); run R draws it
from a unique subset of budget / R tokens (paragraphs of the State of the Union addresses, seeded order; the trainer's
data.repetitions / data.budget_tokens), so R is the number of epochs. All runs are scored on the same held-out
paragraphs. The sweep machinery is tools/sweep.py's library
(megatron_dual.planning.sweep); the results feed the planner (megatron_dual.planning.gp).

    nice -n 10 python examples/data_wall/run_study.py --out data_wall_out            # the full study
    python examples/data_wall/run_study.py --out /tmp/dw_quick --quick                # a pipeline check (~1 min)

Writes, under --out: sweep/ (configs, runs), results.csv (final held-out losses, planner input), curves.csv (held-out
AR/MD loss per evaluation step per run), data_wall_curves.png, data_wall_final.png, and the planner's plots;
``--publish DIR`` copies the small artefacts (CSV, PNG, planner report) into DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "examples"))

REPS = (1, 4, 16, 64)
ALPHAS = ("1", "3/4", "1/4", "0")
MIN_DOC_CHARS = 400  # paragraphs shorter than this are merged with the next one


def build_paragraph_corpus(out: Path) -> Path:
    """One JSON line per paragraph group (>= MIN_DOC_CHARS characters) of every speech, speeches in date order."""
    from demo import sotu_speeches

    corpus = out / "sotu_paragraphs.jsonl"
    if corpus.exists():
        return corpus
    tmp = corpus.with_suffix(".tmp")
    with tmp.open("w") as f:
        for path in sotu_speeches():
            paras = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
            buf: list[str] = []
            for i, p in enumerate(paras):
                buf.append(p)
                if sum(len(b) for b in buf) >= MIN_DOC_CHARS or i == len(paras) - 1:
                    f.write(json.dumps({"text": "\n\n".join(buf), "id": f"{path.stem}/{i}"}) + "\n")
                    buf = []
    tmp.rename(corpus)
    return corpus


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def write_curves(manifest: dict, path: Path) -> list[dict]:
    rows = []
    for t in manifest["tasks"]:
        metrics = Path(t["output_dir"]) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        for m in read_jsonl(metrics):
            if "val_ar_loss" in m:
                rows.append(
                    {
                        "task": t["task"],
                        "repetitions": t["repetitions"],
                        "alpha": t["alpha"],
                        "step": m["step"],
                        "tokens": m.get("tokens", ""),
                        "val_ar_loss": m["val_ar_loss"],
                        "val_md_loss": m.get("val_md_loss", ""),
                        "train_ar_loss": m.get("ar_loss", ""),
                        "train_md_loss": m.get("md_loss", ""),
                    }
                )
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(
            fh,
            fieldnames=[
                "task",
                "repetitions",
                "alpha",
                "step",
                "tokens",
                "val_ar_loss",
                "val_md_loss",
                "train_ar_loss",
                "train_md_loss",
            ],
        )
        w.writeheader()
        w.writerows(rows)
    return rows


def plot_curves(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = sorted({float(r["repetitions"]) for r in rows})
    alphas = sorted({r["alpha"] for r in rows}, key=lambda a: -float(Fraction(a)))
    colours = dict(zip(alphas, plt.cm.viridis([i / max(1, len(alphas) - 1) for i in range(len(alphas))]), strict=True))
    fig, axes = plt.subplots(1, len(reps), figsize=(4.2 * len(reps), 3.8), squeeze=False)
    for ax, r in zip(axes[0], reps, strict=True):
        for a in alphas:
            pts = sorted(
                (int(x["step"]), float(x["val_ar_loss"]))
                for x in rows
                if float(x["repetitions"]) == r and x["alpha"] == a
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker=".", color=colours[a], label=f"alpha={Fraction(a)}"
                )
        ax.set_title(f"R = {r:g} ({r:g} epoch{'s' if r != 1 else ''} over budget/{r:g} unique tokens)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out AR loss (nats/token)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_final(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in rows}, key=lambda a: -float(Fraction(a)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for a in alphas:
        by_r: dict[float, list[tuple[int, float]]] = {}
        for x in rows:
            if x["alpha"] == a:
                by_r.setdefault(float(x["repetitions"]), []).append((int(x["step"]), float(x["val_ar_loss"])))
        rs = sorted(by_r)
        final = [max(by_r[r])[1] for r in rs]
        best = [min(v for _, v in by_r[r]) for r in rs]
        axes[0].plot(rs, final, marker="o", label=f"alpha={Fraction(a)}")
        axes[1].plot(rs, [f - b for f, b in zip(final, best, strict=True)], marker="o", label=f"alpha={Fraction(a)}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("repetitions R")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final held-out AR loss")
    axes[0].set_title("final held-out AR loss (same token budget)")
    axes[1].set_ylabel("final - best held-out AR loss")
    axes[1].set_title("overfitting: rise above the run's best")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data_wall_out")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    ap.add_argument(
        "--micro-batch-size",
        type=int,
        default=2,
        help="sequences per slot; 4 slots per step (alpha "
        "in quarters), so 2 -> 1,024 tokens per step (the preset's 8 -> 4,096; default 2)",
    )
    ap.add_argument("--eval-interval", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=12, help="held-out micro-batches per evaluation")
    ap.add_argument("--repetitions", nargs="+", type=float, default=list(REPS))
    ap.add_argument("--alphas", nargs="+", default=list(ALPHAS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a contended machine)")
    ap.add_argument("--quick", action="store_true", help="pipeline check: 2 steps per run, evaluation every step")
    ap.add_argument("--collect-only", action="store_true", help="no training: collect and plot what has finished")
    ap.add_argument("--publish", help="copy results.csv, curves.csv, PNGs and the planner report here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_interval, args.eval_batches = 2, 1, 2
    return args


def prepare_data(out: Path) -> tuple[int, Path, str]:
    """Corpus, tokenizer and ``.bin/.idx`` under ``out`` (each step skipped when its output exists) ->
    (exit code of a failing tool or 0, tokenizer.json, data prefix)."""
    import preprocess_data
    import train_tokenizer

    corpus = build_paragraph_corpus(out)
    print(f"corpus: {corpus} ({sum(1 for _ in corpus.open())} paragraph documents)", flush=True)
    tok = out / "tokenizer" / "tokenizer.json"
    prefix = out / "data" / "sotu_paragraphs"
    data_path = f"{prefix}_text_document"
    if not tok.exists():
        rc = train_tokenizer.main(["--input", str(corpus), "--vocab-size", "4096", "--output", str(tok.parent)])
        if rc:
            return rc, tok, data_path
    if not Path(data_path + ".idx").exists():
        (out / "data").mkdir(exist_ok=True)
        rc = preprocess_data.main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                str(prefix),
                "--tokenizer",
                str(tok),
                "--json-keys",
                "text",
                "--workers",
                "2",
                "--log-interval",
                "0",
            ]
        )
        if rc:
            return rc, tok, data_path
    return 0, tok, data_path


def run_sweep(args: argparse.Namespace, sweep: Path, tok: Path, data_path: str, t0: float) -> dict:
    """Generate the sweep (once), then train every unfinished task in process (unless --collect-only)."""
    from megatron_dual.planning.sweep import generate_sweep, load_manifest, run_local

    overrides = [
        f"data.tokenizer={tok.resolve()}",
        f"train.threads={args.threads}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.eval_interval={args.eval_interval}",
        f"train.eval_batches={args.eval_batches}",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
        "logging.plot=false",
    ]
    if not (sweep / "manifest.json").exists():
        tasks = generate_sweep(
            sweep,
            preset="tiny",
            data_path=data_path,
            repetitions=args.repetitions,
            alphas=args.alphas,
            steps=args.steps,
            overrides=overrides,
            job_name="data-wall",
        )
        print(f"generated {len(tasks)} tasks under {sweep}", flush=True)
    manifest = load_manifest(sweep)
    for t in manifest["tasks"]:
        print(
            f"  task {t['task']:2d}: R={t['repetitions']:>4g} alpha={t['alpha']:>5} steps={t['steps']} "
            f"unique tokens={t['unique_tokens']:,} ({t['realised_by']})",
            flush=True,
        )
    # in-process: no interpreter start-up per run; the whole study is started under nice, which it inherits. One
    # task per call, so that each line is printed (with its elapsed time) when that task ends, not after the last.
    for t in [] if args.collect_only else manifest["tasks"]:
        (rec,) = run_local(sweep, [t["task"]], in_process=True)
        print(f"  task {rec['task']:2d}: {rec['status']} ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
        if rec["status"] == "failed":
            print(f"    see {rec['log']}", flush=True)
    return manifest


def report(args: argparse.Namespace, out: Path, sweep: Path, manifest: dict) -> tuple[list[dict], list[str]]:
    """results.csv, curves.csv, the two plots and (with at least 4 runs) the planner report -> (rows, missing)."""
    from megatron_dual.planning.gp import run_planner_report
    from megatron_dual.planning.sweep import collect_results

    rows, missing = collect_results(sweep, out / "results.csv")
    for m in missing:
        print(f"  missing: {m}", flush=True)
    curves = write_curves(manifest, out / "curves.csv")
    label = (
        f"tiny preset, sotu paragraphs, {manifest['steps']} steps x {manifest['tokens_per_step']:,} tokens "
        f"per run"
        + (" [QUICK PIPELINE CHECK]" if args.quick else "")
        + (f" [PARTIAL: {len(rows)} of {len(manifest['tasks'])} runs]" if missing else "")
    )
    if curves:
        plot_curves(curves, out / "data_wall_curves.png", label)
        plot_final(curves, out / "data_wall_final.png", label)
    if len(rows) >= 4:
        text = run_planner_report(out / "results.csv", out, samples=2000, seed=0, title=label)
        (out / "planner_report.txt").write_text(text)
        print(text, flush=True)
    return rows, missing


def write_summary(
    args: argparse.Namespace, out: Path, rows: list[dict], missing: list[str], manifest: dict, t0: float
) -> None:
    """study_summary.json; --collect-only keeps the training run's wall time and command."""
    summary = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "runs": len(rows),
        "missing": missing,
        "steps": manifest["steps"],
        "tokens_per_step": manifest["tokens_per_step"],
        "quick": args.quick,
        "command": f"nice -n {os.nice(0)} " + shlex.join([sys.executable, *sys.argv]),
    }
    previous = out / "study_summary.json"
    if args.collect_only and previous.exists():  # keep the training run's wall time and command
        old = json.loads(previous.read_text())
        summary.update({k: old[k] for k in ("wall_s", "command") if k in old})
        summary["recollected_by"] = shlex.join([sys.executable, *sys.argv])
    previous.write_text(json.dumps(summary, indent=2))


def publish(out: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (
        "results.csv",
        "curves.csv",
        "data_wall_curves.png",
        "data_wall_final.png",
        "planner_report.txt",
        "alpha_surface.png",
        "best_alpha.png",
        "study_summary.json",
    ):
        if (out / name).exists():
            shutil.copy2(out / name, dst / name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rc, tok, data_path = prepare_data(out)
    if rc:
        return rc
    sweep = out / "sweep"
    manifest = run_sweep(args, sweep, tok, data_path, t0)
    rows, missing = report(args, out, sweep, manifest)
    write_summary(args, out, rows, missing, manifest, t0)
    if args.publish:
        publish(out, Path(args.publish))
    print(f"done in {time.perf_counter() - t0:.0f} s: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
