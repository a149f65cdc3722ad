"""``megatron-dual eval``: tasks x modes -> normalised scores, a table like the model card's, a JSON record.

Tokenisation of a (context, continuation) pair follows lm-evaluation-harness: whitespace at the end of the context
moves to the front of the continuation, ``context + continuation`` is encoded once (with ``<s>``), and the first
len(encode(context)) tokens are the context, the rest the continuation (so a leading space stays inside the
continuation's first token, as in running text). A minimal pair is scored as a whole sentence: context ``<s>``,
continuation the sentence's tokens; in prefix mode that leaves nothing to attend bidirectionally, so prefix equals
causal there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_dual.eval.metrics import TaskResult, average, task_result
from megatron_dual.eval.scoring import MNTP_MASKS, MODES, Score, Scorer, default_batch_tokens
from megatron_dual.eval.tasks import PAPER_TASKS, STAND_INS, TASKS, EvalError, Example, TaskSpec, resolve_tasks

__all__ = [
    "encode_pair",
    "example_requests",
    "resolve_modes",
    "subsample",
    "evaluate",
    "format_table",
    "add_eval_args",
    "run_cli",
]

Request = tuple[list[int], list[int]]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Request:
    """(context ids with <s>, continuation ids), split as lm-evaluation-harness splits them."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer.encode(context + continuation, add_bos=True)
    n_ctx = len(tokenizer.encode(context, add_bos=True))
    ctx, cont = whole[:n_ctx], whole[n_ctx:]
    if not cont:
        raise EvalError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def example_requests(tokenizer: Any, example: Example) -> list[Request]:
    """One request per choice (a whole sentence for a minimal pair)."""
    if not example.whole:
        return [encode_pair(tokenizer, example.context, c) for c in example.choices]
    out = []
    for c in example.choices:
        ids = tokenizer.encode(example.context + c, add_bos=True)
        if len(ids) < 2:
            raise EvalError(f"sentence {example.context + c!r} encodes to no tokens")
        out.append((ids[:1], ids[1:]))
    return out


def resolve_modes(spec: str) -> list[str]:
    """``all`` or a comma-separated subset of causal, prefix, mntp."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(MODES)
        elif name in MODES:
            out.append(name)
        else:
            raise EvalError(f"unknown mode {name!r}; known: {', '.join(MODES)}, all")
    if not out:
        raise EvalError(f"--mode {spec!r} names no mode; known: {', '.join(MODES)}, all")
    return list(dict.fromkeys(out))


def subsample(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """At most ``limit`` examples, evenly spaced over the task (MMLU keeps its subjects, BLiMP* its subtasks,
    Agreement* its constructions)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise EvalError(f"--limit {limit} must be >= 1")
    return [examples[i * len(examples) // limit] for i in range(limit)]


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="ex",
        disable=not enabled,
        leave=False,
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]",
    )


def _score_task(
    scorer: Scorer,
    task: TaskSpec,
    examples: list[Example],
    requests: list[list[Request]],
    mode: str,
    show_progress: bool,
) -> TaskResult:
    flat = [r for reqs in requests for r in reqs]
    ratio = len(examples) / len(flat)  # the bar counts examples; the scorer reports requests (choices)
    bar = _progress_bar(len(examples), f"{task.name} [{mode}]", show_progress)

    t0 = time.perf_counter()
    scores = scorer.score(flat, mode, progress=lambda n: bar.update(n * ratio))
    seconds = time.perf_counter() - t0
    bar.close()
    grouped: list[list[Score]] = []
    i = 0
    for reqs in requests:
        grouped.append(scores[i : i + len(reqs)])
        i += len(reqs)
    return task_result(task.name, task.title, mode, task.metric, examples, grouped, seconds)


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[TaskSpec],
    modes: Sequence[str],
    limit: int | None = None,
    batch_tokens: int | None = None,
    mntp_mask: str = "rest",
    progress: bool = True,
) -> list[TaskResult]:
    """Every task in every mode; one :class:`TaskResult` per (task, mode), tasks in the given order."""
    if "mntp" in modes and getattr(tokenizer, "mask_id", None) is None:
        raise EvalError("mode mntp needs a tokenizer with a <mask> token")
    scorer = Scorer(model, getattr(tokenizer, "mask_id", 0) or 0, batch_tokens=batch_tokens, mntp_mask=mntp_mask)
    results = []
    for task in tasks:
        examples = subsample(task.load(), limit)
        requests = [example_requests(tokenizer, ex) for ex in examples]
        for mode in modes:
            r = _score_task(scorer, task, examples, requests, mode, progress)
            results.append(r)
            if progress:
                print(
                    f"{task.name:>14} [{mode:>6}] score {r.score:6.1f} +- {r.score_stderr:4.1f}  "
                    f"acc {r.acc[r.metric]:.3f} ({r.metric}, n={r.n})  {r.n / max(r.seconds, 1e-9):8.1f} ex/s",
                    file=sys.stderr,
                )
    return results


def format_table(results: Sequence[TaskResult]) -> str:
    """Markdown table, modes x tasks (+ Avg), normalised scores with standard errors, like the model card's."""
    tasks: dict[str, str] = {}
    modes: list[str] = []
    cell: dict[tuple[str, str], TaskResult] = {}
    for r in results:
        tasks.setdefault(r.task, r.title)
        if r.mode not in modes:
            modes.append(r.mode)
        cell[(r.task, r.mode)] = r
    head = ["Mode", *tasks.values(), "Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode in modes:
        row = [cell[(t, mode)] for t in tasks if (t, mode) in cell]
        avg, avg_se = average(row)
        cells = [
            f"{cell[(t, mode)].score:.1f} ±{cell[(t, mode)].score_stderr:.1f}" if (t, mode) in cell else "-"
            for t in tasks
        ]
        lines.append("| " + " | ".join([mode, *cells, f"{avg:.1f} ±{avg_se:.1f}"]) + " |")
    counts = ", ".join(f"{title} {next(r.n for r in results if r.task == t)}" for t, title in tasks.items())
    lines.append("")
    lines.append(
        f"Normalised score = (acc - chance) / (1 - chance) x 100 (0 = random), ± one standard error. "
        f"Examples: {counts}."
    )
    if "blimp_sva" in tasks:
        lines.append("BLiMP* = stand-in: BIG-bench subject-verb agreement minimal pairs (BLiMP is not installable).")
    if "agreement" in tasks:
        lines.append("Agreement* = stand-in, not BLiMP: subject-verb agreement minimal pairs generated here.")
    return "\n".join(lines)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's arguments (``--checkpoint``, ``--tokenizer``, ``--device`` come from the CLI)."""
    p.add_argument(
        "--tasks", default="all", help=f"all, or comma-separated names ({', '.join(TASKS)}) and/or path.jsonl files"
    )
    p.add_argument("--mode", default="all", help=f"{'|'.join(MODES)}|all, or a comma-separated list")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task (evenly spaced)")
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="padded tokens per forward pass (default 2048 on CPU, 16384 on an accelerator)",
    )
    p.add_argument(
        "--mntp-mask",
        default="rest",
        choices=MNTP_MASKS,
        help="mntp: mask the rest of the continuation (chain rule, default) or a single token (PLL)",
    )
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-task lines on stderr")


def check_output(path: str) -> Path:
    """``--output``'s path, its folder created; EvalError naming it where it cannot be written (checked before the
    evaluation runs, so no results are computed for nothing)."""
    out = Path(path)
    if out.is_dir():
        raise EvalError(f"--output {path} is a directory; give a file name, e.g. {out / 'results.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--output {path}: cannot create its folder {out.parent}: {e.strerror or e}") from None
    if out.exists():  # an existing file (or /dev/stdout) is written in place: its folder need not be writable
        if not os.access(out, os.W_OK):
            raise EvalError(f"--output {path} is not writable")
    elif not os.access(out.parent, os.W_OK):
        raise EvalError(f"--output {path}: its folder {out.parent} is not writable")
    return out


def run_cli(args: argparse.Namespace) -> int:
    """The ``megatron-dual eval`` command: validate, load, evaluate, print the table, write JSON."""
    from megatron_dual.inference.loading import load_model

    tasks = resolve_tasks(args.tasks)
    modes = resolve_modes(args.mode)
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit} must be >= 1")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise EvalError(f"--batch-tokens {args.batch_tokens} must be >= 1")
    output = check_output(args.output) if args.output else None
    model, cfg, tok = load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    t0 = time.perf_counter()
    results = evaluate(
        model,
        tok,
        tasks,
        modes,
        limit=args.limit,
        batch_tokens=args.batch_tokens,
        mntp_mask=args.mntp_mask,
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - t0
    print(format_table(results))
    if output is not None:
        record = results_record(results, args, cfg.to_dict(), wall)
        try:
            output.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as e:
            raise EvalError(f"--output {args.output} cannot be written: {e.strerror or e}") from None
        print(f"results written to {args.output}")
    return 0


def results_record(
    results: Sequence[TaskResult], args: argparse.Namespace, model_config: dict, wall: float
) -> dict[str, Any]:
    """The JSON written by ``--output``: the run's config, the checkpoint, per task and mode counts, accuracies
    (all normalisations) with standard errors, normalised scores, and the per-mode averages; ``stand_ins`` maps a
    model card task (``paper_tasks``) to the task that took its slot in the run (:data:`tasks.STAND_INS`)."""
    from megatron_dual.inference.loading import find_checkpoint

    by_task: dict[str, dict[str, Any]] = {}
    for r in results:
        by_task.setdefault(r.task, {})[r.mode] = r.to_dict()
    modes = list(dict.fromkeys(r.mode for r in results))
    avgs = {}
    for m in modes:
        score, se = average([r for r in results if r.mode == m])
        avgs[m] = {"score": score, "score_stderr": se, "tasks": [r.task for r in results if r.mode == m]}
    return {
        "checkpoint": str(find_checkpoint(args.checkpoint).resolve()),
        "config": {
            "tasks": list(by_task),
            "modes": modes,
            "limit": args.limit,
            "batch_tokens": args.batch_tokens or default_batch_tokens(args.device),
            "mntp_mask": args.mntp_mask,
            "device": args.device,
            "tokenizer": args.tokenizer,
            "paper_tasks": list(PAPER_TASKS),
            # a model card column filled by its stand-in in this run (--tasks all without BLiMP*'s data)
            "stand_ins": {t: s for t, s in STAND_INS.items() if t not in by_task and s in by_task},
        },
        "model_config": model_config,
        "results": by_task,
        "average": avgs,
        "wall_seconds": wall,
    }
