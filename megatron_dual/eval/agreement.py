"""Agreement*: subject-verb agreement minimal pairs generated here from templates (a stand-in, not BLiMP).

A deterministic generator in the style of Marvin & Linzen (2018, "Targeted Syntactic Evaluation of Language
Models") and BLiMP's agreement paradigms, over a small hand-written vocabulary of animate nouns, present-tense
verbs, prepositions and adjectives. Each pair is a grammatical sentence and the same sentence with the agreeing
verb in the other number; a model is right when it gives the grammatical one the higher whole-sentence
log-likelihood (scored like ``blimp_sva``). Six constructions:

==========================  ====================================================  =========================
category                    template (the verb that agrees in capitals)            numbers varied
==========================  ====================================================  =========================
simple                      The (adj) author LAUGHS. / LIKES the guards.            subject
across_pp                   The author next to the guards LAUGHS.                  subject x attractor
across_object_rc            The author that the guards like LAUGHS.                subject x attractor
across_subject_rc           The author that likes the guards LAUGHS.               subject x attractor
sentential_complement       The pilots said the author LAUGHS.                     subject x matrix subject
coordinated_verbs           The author laughs and SMILES.                          subject
==========================  ====================================================  =========================

600 pairs per construction, split evenly over its number conditions (singular and plural subjects, singular and
plural attractors: both mismatches and both matches), 3,600 in all. Each construction's pairs are shuffled (seeded),
so an evenly spaced ``--limit`` sample draws every number condition in about equal shares (a fixed interleave
would alias with the sampling stride: 100 of 3,600 is every 36th, a multiple of 2 and 4). Seeded
(``random.Random`` with a string seed, stable across runs and Python versions); ``tests/eval/test_eval_agreement.py``
pins the count and a hash of the pairs.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "NOUNS",
    "INTRANSITIVE",
    "TRANSITIVE",
    "PREPOSITIONS",
    "ADJECTIVES",
    "SAYING",
    "CATEGORIES",
    "AgreementPair",
    "agreement_pairs",
    "minimal_pair",
]

SEED = "megatron-dual agreement v1"
PER_CATEGORY = 600

# (singular, plural): animate nouns, so every noun can be the subject or object of every verb
NOUNS = (
    ("author", "authors"), ("pilot", "pilots"), ("surgeon", "surgeons"), ("farmer", "farmers"),
    ("manager", "managers"), ("customer", "customers"), ("officer", "officers"), ("teacher", "teachers"),
    ("senator", "senators"), ("dancer", "dancers"), ("lawyer", "lawyers"), ("student", "students"),
    ("guard", "guards"), ("child", "children"), ("woman", "women"), ("nurse", "nurses"),
)  # fmt: skip
# (third person singular, plural) present tense
INTRANSITIVE = (
    ("laughs", "laugh"), ("smiles", "smile"), ("swims", "swim"), ("sleeps", "sleep"), ("waits", "wait"),
    ("arrives", "arrive"), ("complains", "complain"), ("sings", "sing"), ("leaves", "leave"), ("works", "work"),
)  # fmt: skip
TRANSITIVE = (
    ("likes", "like"), ("admires", "admire"), ("hates", "hate"), ("knows", "know"), ("meets", "meet"),
    ("helps", "help"), ("watches", "watch"), ("thanks", "thank"), ("follows", "follow"), ("trusts", "trust"),
)  # fmt: skip
PREPOSITIONS = ("next to", "behind", "near", "beside", "in front of", "across from")
ADJECTIVES = ("young", "old", "tall", "quiet", "famous", "busy", "angry", "friendly")
SAYING = ("said", "thought", "knew", "claimed", "noticed")  # past tense: the matrix verb does not agree

SG, PL = 0, 1
_NUMBER = ("sg", "pl")
Words = list[str]


@dataclass(frozen=True)
class AgreementPair:
    category: str
    subject: str  # number of the subject whose verb is tested: "sg" | "pl"
    attractor: str | None  # number of the intervening (or matrix) noun; None where there is none
    good: str
    bad: str


def _the(rng: random.Random, noun: int, num: int, adj_p: float = 0.0) -> Words:
    words = ["the"]
    if adj_p and rng.random() < adj_p:
        words.append(rng.choice(ADJECTIVES))
    return [*words, NOUNS[noun][num]]


def _predicate(rng: random.Random, num: int, avoid: set[int]) -> tuple[Words, Words]:
    """The agreeing verb (intransitive, or transitive with an object noun not in ``avoid``): (good, bad) words."""
    if rng.random() < 0.5:
        verb, rest = rng.choice(INTRANSITIVE), []
    else:
        verb = rng.choice(TRANSITIVE)
        rest = _the(rng, rng.choice([n for n in range(len(NOUNS)) if n not in avoid]), rng.randrange(2))
    return [verb[num], *rest], [verb[1 - num], *rest]


def _two_nouns(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(len(NOUNS)), 2)
    return a, b


# each builder: (rng, subject number, attractor number) -> (words before the tested verb, good tail, bad tail)
Built = tuple[Words, Words, Words]


def _simple(rng: random.Random, s: int, a: int) -> Built:
    noun = rng.randrange(len(NOUNS))
    return (_the(rng, noun, s, 0.5), *_predicate(rng, s, {noun}))


def _across_pp(rng: random.Random, s: int, a: int) -> Built:
    noun, attractor = _two_nouns(rng)
    head = [*_the(rng, noun, s), *rng.choice(PREPOSITIONS).split(), *_the(rng, attractor, a)]
    return (head, *_predicate(rng, s, {noun, attractor}))


def _across_object_rc(rng: random.Random, s: int, a: int) -> Built:
    noun, attractor = _two_nouns(rng)
    head = [*_the(rng, noun, s), "that", *_the(rng, attractor, a), rng.choice(TRANSITIVE)[a]]
    return (head, *_predicate(rng, s, {noun, attractor}))


def _across_subject_rc(rng: random.Random, s: int, a: int) -> Built:
    noun, attractor = _two_nouns(rng)
    head = [*_the(rng, noun, s), "that", rng.choice(TRANSITIVE)[s], *_the(rng, attractor, a)]
    return (head, *_predicate(rng, s, {noun, attractor}))


def _sentential_complement(rng: random.Random, s: int, a: int) -> Built:
    noun, matrix = _two_nouns(rng)
    head = [*_the(rng, matrix, a, 0.3), rng.choice(SAYING), *_the(rng, noun, s)]
    return (head, *_predicate(rng, s, {noun, matrix}))


def _coordinated_verbs(rng: random.Random, s: int, a: int) -> Built:
    noun = rng.randrange(len(NOUNS))
    first, _ = _predicate(rng, s, {noun})
    second = rng.choice([v for v in INTRANSITIVE if v[s] != first[0]])
    return [*_the(rng, noun, s, 0.5), *first, "and"], [second[s]], [second[1 - s]]


_BUILDERS: dict[str, tuple[Callable[[random.Random, int, int], Built], bool]] = {
    "simple": (_simple, False),
    "across_pp": (_across_pp, True),
    "across_object_rc": (_across_object_rc, True),
    "across_subject_rc": (_across_subject_rc, True),
    "sentential_complement": (_sentential_complement, True),
    "coordinated_verbs": (_coordinated_verbs, False),
}
CATEGORIES = tuple(_BUILDERS)


def _sentence(words: Words) -> str:
    return " ".join([words[0].capitalize(), *words[1:]]) + "."


def _condition(category: str, rng: random.Random, s: int, a: int | None, count: int) -> list[AgreementPair]:
    build, _ = _BUILDERS[category]
    out: dict[str, AgreementPair] = {}
    for _ in range(count * 50):
        head, good, bad = build(rng, s, SG if a is None else a)
        pair = AgreementPair(
            category, _NUMBER[s], None if a is None else _NUMBER[a], _sentence(head + good), _sentence(head + bad)
        )
        out.setdefault(pair.good, pair)
        if len(out) == count:
            return list(out.values())
    raise RuntimeError(f"agreement: only {len(out)} distinct {category} sentences for {count} wanted")


@functools.cache
def agreement_pairs() -> tuple[AgreementPair, ...]:
    """All pairs, construction by construction, each construction's conditions shuffled together."""
    out: list[AgreementPair] = []
    for category, (_, has_attractor) in _BUILDERS.items():
        rng = random.Random(f"{SEED}/{category}")
        conditions = [(s, a) for s in (SG, PL) for a in ((SG, PL) if has_attractor else (None,))]
        per = PER_CATEGORY // len(conditions)
        lists = [_condition(category, rng, s, a, per) for s, a in conditions]
        block = [p for group in lists for p in group]
        rng.shuffle(block)
        out.extend(block)
    return tuple(out)


def minimal_pair(good: str, bad: str) -> tuple[str, tuple[str, str], int]:
    """(shared words before the first difference, with its trailing space; the two sentence endings in
    alphabetical order, as blimp_sva orders its verbs; the index of the good ending)."""
    g, b = good.split(" "), bad.split(" ")
    i = next(k for k, (x, y) in enumerate(zip(g, b, strict=False)) if x != y)
    context = " ".join(g[:i]) + " " if i else ""
    good_end, bad_end = " ".join(g[i:]), " ".join(b[i:])
    choices = (good_end, bad_end) if good_end < bad_end else (bad_end, good_end)
    return context, choices, choices.index(good_end)
