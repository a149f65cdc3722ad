"""Normalisations, the normalised score, standard errors, and a fixture task scored by hand in each mode."""

import math

import pytest

from megatron_dual.eval.harness import encode_pair, evaluate, example_requests
from megatron_dual.eval.metrics import average, mean_stderr, normalised, predict, task_result
from megatron_dual.eval.scoring import Score
from megatron_dual.eval.tasks import Example, TaskSpec


def test_normalised_score():
    assert normalised(0.25, 0.25) == 0.0
    assert normalised(1.0, 0.25) == 100.0
    assert normalised(0.625, 0.25) == pytest.approx(50.0)
    assert normalised(0.4, 0.5) == pytest.approx(-20.0)  # below chance is negative
    with pytest.raises(ValueError, match="chance"):
        normalised(0.5, 1.0)


def test_the_three_normalisations_pick_different_choices():
    ex = Example("ctx", (" aaaaaaaaaa", " b"), 0)
    scores = [Score(-6.0, 3, False), Score(-3.0, 1, False)]
    assert predict(ex, scores, "acc_raw") == 1  # -3 > -6
    assert predict(ex, scores, "acc_token") == 0  # -2 > -3
    assert predict(ex, scores, "acc_char") == 0  # -6/11 > -3/2
    ex2 = Example("ctx", (" aaa", " b"), 0)
    assert predict(ex2, [Score(-6.0, 2, False), Score(-5.0, 2, False)], "acc_char") == 0  # -6/4 > -5/2
    whole = Example("the long sentence ", ("x", "yyyyyy"), 0, whole=True)
    # per character of the whole sentence: -19/19 = -1.0 vs -26/24 < -1.0
    assert predict(whole, [Score(-19.0, 3, False), Score(-26.0, 3, False)], "acc_char") == 0
    assert predict(ex, [Score(-1.0, 1, False), Score(-1.0, 1, False)], "acc_raw") == 0  # ties: first
    with pytest.raises(ValueError, match="unknown normalisation"):
        predict(ex, scores, "acc_pmi")


def test_mean_stderr_and_average():
    mean, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and se == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3 / 4))
    assert mean_stderr([1.0]) == (1.0, 0.0)
    ex = [Example("c", (" a", " b"), 0), Example("c", (" a", " b", " c", " d"), 1)]
    four = [Score(-1.0, 1, True), Score(-2.0, 1, False), Score(-3.0, 1, False), Score(-4.0, 1, False)]
    sc = [four[:2], four]  # right on the first (label 0), wrong on the second (label 1)
    r = task_result("t", "T", "causal", "acc_raw", ex, sc)
    assert r.chance == pytest.approx((0.5 + 0.25) / 2) and r.acc["acc_raw"] == 0.5
    assert r.score == pytest.approx((0.5 - 0.375) / 0.625 * 100)
    assert r.score_stderr == pytest.approx(r.acc_stderr["acc_raw"] * 100 / 0.625)
    r2 = task_result("u", "U", "causal", "acc_raw", ex[:1] * 2, [sc[0], sc[0]])
    avg, avg_se = average([r, r2])
    assert avg == pytest.approx((r.score + 100.0) / 2) and avg_se == pytest.approx(r.score_stderr / 2)


FIXTURE = [
    Example("the cat sat on", (" the mat", " a log", " blue"), 0),
    Example("Question: where is Paris Answer:", (" France", " the dog is red"), 0),
    Example("the dog ran on", (" a mat", " the log"), 1),
    Example("the cat ", ("is big", "is small"), 0, whole=True),
]


@pytest.mark.parametrize("mode", ["causal", "prefix", "mntp"])
def test_fixture_task_scores_by_hand(model, tok, reference, mode):
    task = TaskSpec("fixture", "FIX", "acc_char", lambda: list(FIXTURE), "test")
    (result,) = evaluate(model, tok, [task], [mode], progress=False, batch_tokens=32)
    hits = {"acc_raw": [], "acc_token": [], "acc_char": []}
    for ex in FIXTURE:
        reqs = example_requests(tok, ex)
        lps = [reference.score(c, k, mode) for c, k in reqs]
        chars = [len((ex.context if ex.whole else "") + ch) for ch in ex.choices]
        per = {
            "acc_raw": lps,
            "acc_token": [lp / len(k) for lp, (_, k) in zip(lps, reqs, strict=True)],
            "acc_char": [lp / n for lp, n in zip(lps, chars, strict=True)],
        }
        for norm, vals in per.items():
            hits[norm].append(float(vals.index(max(vals)) == ex.label))
    for norm, h in hits.items():
        assert result.acc[norm] == pytest.approx(sum(h) / len(h)), norm
    chance = (1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 4
    assert result.chance == pytest.approx(chance) and result.n == 4
    assert result.score == pytest.approx((result.acc["acc_char"] - chance) / (1 - chance) * 100)


def test_pair_encoding_moves_the_trailing_space_into_the_continuation():
    from megatron_dual.data.tokenizer import load_tokenizer

    ltg = load_tokenizer("ltg")
    ctx, cont = encode_pair(ltg, "The athlete ", "admires")
    assert ctx == ltg.encode("The athlete") and ctx + cont == ltg.encode("The athlete admires")
    assert [ltg.id_to_token(i) for i in cont] == ["Ġadm", "ires"]
    (whole_a, whole_b) = example_requests(ltg, Example("The athlete ", ("admires", "admire"), 0, whole=True))
    assert whole_a == ([ltg.bos_id], ltg.encode("The athlete admires")[1:])
    assert whole_b[0] == [ltg.bos_id]
