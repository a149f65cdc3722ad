"""Zero-shot evaluation: multiple choice by log-likelihood in three modes (causal, prefix-LM, MNTP), minimal pairs,
the paper's nine tasks from offline data (BLiMP* optional), a generated agreement task, normalised scores, and an
lm-evaluation-harness adapter (:mod:`megatron_dual.eval.lm_eval_adapter`, imported on its own since it needs
``lm_eval``)."""

from megatron_dual.eval.harness import encode_pair, evaluate, example_requests, format_table, resolve_modes
from megatron_dual.eval.metrics import NORMS, TaskResult, average, normalised, predict, task_result
from megatron_dual.eval.scoring import MNTP_MASKS, MODES, Score, Scorer
from megatron_dual.eval.tasks import PAPER_TASKS, TASKS, EvalError, Example, TaskSpec, load_jsonl_task, resolve_tasks

__all__ = [
    "encode_pair",
    "evaluate",
    "example_requests",
    "format_table",
    "resolve_modes",
    "NORMS",
    "TaskResult",
    "average",
    "normalised",
    "predict",
    "task_result",
    "MNTP_MASKS",
    "MODES",
    "Score",
    "Scorer",
    "PAPER_TASKS",
    "TASKS",
    "EvalError",
    "Example",
    "TaskSpec",
    "load_jsonl_task",
    "resolve_tasks",
]
