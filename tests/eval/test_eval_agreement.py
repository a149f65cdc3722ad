"""The generated agreement task (Agreement*): counts per construction and number condition, pinned content, pairs
that differ only in the agreeing verb, both orders of number, determinism, and its Examples."""

import collections
import hashlib
import os
import random
import subprocess
import sys

from megatron_dual.eval import agreement as A
from megatron_dual.eval import tasks as T
from megatron_dual.eval.harness import subsample

# change these only on purpose: a changed generator or vocabulary changes every score of the task
N_PAIRS = 3600
SHA256 = "95d797e699b06397c30a9f42b08d43d9ea4fd7fce58e1bfeb69cb14ecb3b5ab0"


def digest(pairs) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.category}\t{p.subject}\t{p.attractor}\t{p.good}\t{p.bad}\n".encode())
    return h.hexdigest()


def test_count_and_hash_are_pinned():
    pairs = A.agreement_pairs()
    assert len(pairs) == N_PAIRS and len({p.good for p in pairs}) == N_PAIRS
    assert digest(pairs) == SHA256


def test_counts_per_construction_and_number_condition():
    pairs = A.agreement_pairs()
    assert collections.Counter(p.category for p in pairs) == {c: 600 for c in A.CATEGORIES}
    assert set(A.CATEGORIES) == {"simple", "across_pp", "across_object_rc", "across_subject_rc",
                                 "sentential_complement", "coordinated_verbs"}  # fmt: skip
    cells = collections.Counter((p.category, p.subject, p.attractor) for p in pairs)
    for c in ("simple", "coordinated_verbs"):
        assert cells[(c, "sg", None)] == cells[(c, "pl", None)] == 300
    for c in ("across_pp", "across_object_rc", "across_subject_rc", "sentential_complement"):
        for s in ("sg", "pl"):
            for a in ("sg", "pl"):  # both mismatches (sg subject / pl attractor and the reverse) and both matches
                assert cells[(c, s, a)] == 150, (c, s, a)

    # shuffled within each construction: the demo's evenly spaced sample (--limit 100) is balanced, not aliased
    sample = subsample(list(pairs), 100)
    assert collections.Counter(p.category for p in sample)["simple"] >= 16
    assert 45 <= collections.Counter(p.subject for p in sample)["sg"] <= 55
    assert 20 <= sum(p.attractor is not None and p.attractor != p.subject for p in sample) <= 45


def test_pairs_differ_only_in_the_agreeing_verb():
    verbs = {f: (sg, pl) for sg, pl in A.INTRANSITIVE + A.TRANSITIVE for f in (sg, pl)}
    nouns = {f: i for i, (sg, pl) in enumerate(A.NOUNS) for f in (sg, pl)}
    for p in A.agreement_pairs():
        good, bad = p.good[:-1].split(" "), p.bad[:-1].split(" ")
        assert p.good.endswith(".") and p.bad.endswith(".") and len(good) == len(bad), p
        diff = [i for i, (g, b) in enumerate(zip(good, bad, strict=True)) if g != b]
        assert len(diff) == 1, p
        g, b = good[diff[0]], bad[diff[0]]
        assert verbs[g] == verbs[b] and g != b, p
        sg, pl = verbs[g]
        assert g == (sg if p.subject == "sg" else pl), p  # the good sentence's verb agrees with the subject
        if p.category == "coordinated_verbs":
            assert good[diff[0] - 1] == "and", p
        # the subject is the noun before the tested verb's phrase in every template: the first noun, or the
        # second one after the matrix verb of a sentential complement
        subject = [w for w in good if w in nouns][1 if p.category == "sentential_complement" else 0]
        assert (subject == A.NOUNS[nouns[subject]][0]) == (p.subject == "sg"), p


def test_generation_is_deterministic_across_processes():
    # the module loaded on its own (no torch import), under another string-hash seed
    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('agr', sys.argv[1]); m = u.module_from_spec(s);"
        " sys.modules['agr'] = m;"
        " s.loader.exec_module(m); print(m.agreement_pairs()[1234].good)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-c", code, A.__file__], capture_output=True, text=True, check=True, env=env)
    assert run.stdout.strip() == A.agreement_pairs()[1234].good
    random.seed(0)  # the generator's own seeded RNG does not depend on the global one
    A.agreement_pairs.cache_clear()
    assert digest(A.agreement_pairs()) == SHA256


def test_examples_are_minimal_pairs_scored_whole():
    examples = T.agreement_examples()
    assert len(examples) == N_PAIRS
    for p, ex in zip(A.agreement_pairs(), examples, strict=True):
        assert ex.whole and len(ex.choices) == 2 and ex.context.startswith("The ") and ex.context.endswith(" ")
        assert ex.context + ex.choices[ex.label] == p.good and ex.context + ex.choices[1 - ex.label] == p.bad
        assert list(ex.choices) == sorted(ex.choices)
    labels = collections.Counter(ex.label for ex in examples)
    assert labels[0] == labels[1] == N_PAIRS // 2  # the good sentence is not always the first choice
    assert A.minimal_pair("The cats run.", "The cats runs.") == ("The cats ", ("run.", "runs."), 0)
    task = T.TASKS["agreement"]
    assert (task.title, task.metric, task.missing) == ("Agreement*", "acc_raw", None)
