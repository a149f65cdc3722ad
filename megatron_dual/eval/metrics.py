"""Accuracy under the three usual likelihood normalisations, standard errors, and the paper's normalised score.

For one example with choice log-likelihoods ll_i, the prediction is argmax_i of

* ``acc_raw``: ll_i (the summed log-probability; for minimal pairs, of the whole sentence),
* ``acc_token``: ll_i / (number of tokens of choice i),
* ``acc_char``: ll_i / (number of characters of choice i) (lm-eval's ``acc_norm``; for minimal pairs the
  characters of the whole sentence),

ties going to the first choice (as ``numpy.argmax``). Normalised score = (acc - chance) / (1 - chance) x 100, with
chance the mean over examples of 1 / (number of choices): 0 is random guessing, 100 is perfect (the model card's
scale). Standard errors are those of a mean of 0/1 outcomes, sqrt(sample variance / n), scaled the same way; the
average over tasks has standard error sqrt(sum of squared task errors) / (number of tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_dual.eval.scoring import Score
from megatron_dual.eval.tasks import Example

__all__ = ["NORMS", "predict", "mean_stderr", "normalised", "TaskResult", "task_result", "average"]

NORMS = ("acc_raw", "acc_token", "acc_char")


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predict(example: Example, scores: Sequence[Score], norm: str) -> int:
    """The chosen index for ``example`` given one :class:`Score` per choice."""
    if len(scores) != len(example.choices):
        raise ValueError(f"{len(scores)} scores for {len(example.choices)} choices")
    if norm == "acc_raw":
        values = [s.logprob for s in scores]
    elif norm == "acc_token":
        values = [s.logprob / max(1, s.n_tokens) for s in scores]
    elif norm == "acc_char":
        lead = example.context if example.whole else ""
        values = [s.logprob / max(1, len(lead + c)) for s, c in zip(scores, example.choices, strict=True)]
    else:
        raise ValueError(f"unknown normalisation {norm!r}; known: {', '.join(NORMS)}")
    return _argmax(values)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample variance, n - 1); the error is 0 for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def normalised(acc: float, chance: float) -> float:
    """(acc - chance) / (1 - chance) x 100."""
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"chance = {chance} must be in [0, 1)")
    return (acc - chance) / (1.0 - chance) * 100.0


@dataclass
class TaskResult:
    task: str
    title: str
    mode: str
    metric: str
    n: int
    chance: float
    acc: dict[str, float]
    acc_stderr: dict[str, float]
    score: float  # normalised score of the headline metric
    score_stderr: float
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def task_result(
    task: str,
    title: str,
    mode: str,
    metric: str,
    examples: Sequence[Example],
    scores: Sequence[Sequence[Score]],
    seconds: float = 0.0,
) -> TaskResult:
    """Accuracies (all normalisations), their errors, and the normalised headline score of one task in one mode."""
    if len(examples) != len(scores) or not examples:
        raise ValueError(f"{len(scores)} score lists for {len(examples)} examples")
    chance = sum(1.0 / len(ex.choices) for ex in examples) / len(examples)
    acc, err = {}, {}
    for norm in NORMS:
        hits = [float(predict(ex, sc, norm) == ex.label) for ex, sc in zip(examples, scores, strict=True)]
        acc[norm], err[norm] = mean_stderr(hits)
    scale = 100.0 / (1.0 - chance)
    return TaskResult(
        task,
        title,
        mode,
        metric,
        len(examples),
        chance,
        acc,
        err,
        normalised(acc[metric], chance),
        err[metric] * scale,
        seconds,
    )


def average(results: Sequence[TaskResult]) -> tuple[float, float]:
    """Mean normalised score over tasks and its standard error."""
    if not results:
        raise ValueError("average of no tasks")
    k = len(results)
    return sum(r.score for r in results) / k, math.sqrt(sum(r.score_stderr**2 for r in results)) / k
