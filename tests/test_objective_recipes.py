"""objective.recipe = reference, alpha schedules, the prefix-LM objective and three-objective mixes (issue 16).

The reference formulas are computed by hand here (loops over positions) from the same random draws, so a change of
any one of them (the 2.0 AR weight, the smoothed MD weight, the always-labelled last position, the B x T
normaliser) fails a test; the gradient tests compare the trainer's accumulated gradient with a direct
``torch.autograd.grad`` of the formula.
"""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from toy import VOCAB, toy_model

from megatron_dual.config import ConfigError, load_config
from megatron_dual.data.dataloader import collate, collate_samples
from megatron_dual.data.indexed import IndexedDatasetWriter
from megatron_dual.data.loader import build_datasets
from megatron_dual.model.loss import IGNORE, labelled_loss
from megatron_dual.objectives import (
    AR,
    MD,
    PREFIX,
    ObjectiveSchedule,
    effective_alpha,
    make_objective_batch,
    masking_generator,
    parse_alpha_schedule,
    parse_mix,
    prefix_batch,
    reference_md_batch,
)
from megatron_dual.optim.muon import build_optimizers
from megatron_dual.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    prefix = str(root / "toy_text_document")
    rng = np.random.default_rng(3)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(100):
            w.add_document([1] + rng.integers(16, VOCAB, int(rng.integers(8, 40))).tolist())
    return prefix


def tiny(corpus, out, *extra):
    return load_config(
        overrides=[
            *toy_model(corpus, out),
            "train.micro_batch_size=2",
            "train.grad_accum=4",
            "train.steps=4",
            "schedule.decay_steps=1",
            "train.eval_interval=0",
            "checkpoint.interval=2",
            "logging.plot=false",
            "train.threads=1",
            *extra,
        ]
    )


# ------------------------------------------------------------------------------------------ reference recipe


def test_reference_md_batch_matches_the_formulas_by_hand():
    # row 0: two documents; row 1: mostly special tokens, so k can exceed the maskable count
    tokens = torch.tensor([[1, 20, 21, 22, 1, 30, 31, 32, 33], [1, 2, 3, 40, 2, 3, 2, 41, 42]])
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0] * 9])
    for seed in range(40):
        b = reference_md_batch(tokens, doc_ids, masking_generator(seed, 0, 0), mask_token_id=4, n_special=16)
        g = masking_generator(seed, 0, 0)  # the same draws, in the same order
        ratios = torch.rand((2, 8), generator=g, dtype=torch.float64)
        t, u = torch.rand(2, generator=g, dtype=torch.float64), torch.rand(2, generator=g, dtype=torch.float64)
        assert b.n_tokens == 2 * 8  # B x T positions
        for r in range(2):
            inputs = tokens[r, :-1].tolist()
            keyed = sorted((math.inf if inputs[i] < 16 else float(ratios[r, i]), i) for i in range(8))
            k = max(1, math.floor(8 * float(t[r]) + float(u[r])))
            masked = {i for i in range(8)} if keyed[k - 1][0] == math.inf else {i for _, i in keyed[:k]}
            weight = 1.0 / ((1 - 1e-4) * len(masked) / 8 + 1e-4)
            for i in range(8):
                assert b.input_ids[r, i] == (4 if i in masked else inputs[i])
                same_doc = doc_ids[r, i] == doc_ids[r, i + 1]
                labelled = ((i + 1) in masked or i == 7) and same_doc  # the last position always
                assert b.labels[r, i] == (tokens[r, i + 1] if labelled else IGNORE), (seed, r, i)
                assert b.weights[r, i].item() == pytest.approx(weight if labelled else 0.0, rel=1e-6)
    # row 1 holds 3 maskable inputs of 8: some seed draws k > 3, which masks the special tokens too
    masked_specials = [
        bool(
            (
                reference_md_batch(
                    tokens, doc_ids, masking_generator(s, 0, 0), mask_token_id=4, n_special=16
                ).input_ids[1]
                == 4
            ).all()
        )
        for s in range(40)
    ]
    assert any(masked_specials)


def test_reference_step_loss_and_gradient_by_hand(corpus, tmp_path):
    """alpha 1/2 on 4 slots under the reference recipe: loss = (2.0 * sum_AR l + sum_MD w l) / (S x B x T)."""
    cfg = tiny(corpus, tmp_path / "r", "objective.recipe=reference", "objective.alpha=1/2", "optimizer.grad_clip=0")
    tr = Trainer(cfg, quiet=True)
    indices = tr.loader.sampler.indices(0, 8)
    loss = 0.0
    for s, obj in enumerate(tr.schedule.slots(0, 0)):
        t, d, y = collate_samples(tr.data.train, indices[s * 2 : (s + 1) * 2])  # the reference packing: targets
        assert y is not None and t.shape == (2, 16)
        b = make_objective_batch(obj, t, d, cfg.objective, masking_generator(cfg.train.seed, 0, s), y)
        out = labelled_loss(tr.model.head, tr.model(b.input_ids, b.mask), b.labels, b.weights, cfg.objective.z_loss)
        loss = loss + (2.0 if obj == AR else 1.0) * out.weighted / (4 * 2 * 16)
    params = list(tr.model.parameters())
    ref = torch.autograd.grad(loss, params)
    grads = {}
    opt = tr.engine.optimizers["muon"]
    orig = opt.step
    opt.step = lambda *a, **k: (grads.update({id(p): p.grad.clone() for p in params}), orig(*a, **k))[1]
    metrics = tr.train_step(tr.loader.batches(0))
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert metrics["alpha"] == 0.5 and metrics["alpha_effective"] == pytest.approx(2 / 3)
    for p, g in zip(params, ref, strict=True):
        torch.testing.assert_close(grads[id(p)], g, atol=1e-6, rtol=1e-5)


def test_effective_alpha_of_the_reference():
    assert effective_alpha(Fraction(63, 64), "reference") == Fraction(126, 127)
    assert effective_alpha(Fraction(3, 4), "reference") == Fraction(6, 7)
    assert effective_alpha(Fraction(3, 4), "paper") == Fraction(3, 4)
    r = Fraction(1, 4)  # a share r of MD slots: 2 (1 - r) / (2 - r)
    assert effective_alpha(1 - r, "reference") == 2 * (1 - r) / (2 - r)


def test_epoch_rotation_is_the_references_formula():
    # reference: rank r in epoch e runs MD iff (e + r) % D < N (N/D = the MD share in lowest terms)
    s = ObjectiveSchedule(3 / 4, 8, 1, "epoch", total_steps=40, epoch_steps=10)
    for step in range(40):
        e = step // 10
        assert [s.objective(r, 0, step) for r in range(8)] == [MD if (e + r) % 4 < 1 else AR for r in range(8)]


def test_rotate_accepts_the_former_booleans_and_refuses_others(corpus, tmp_path):
    assert tiny(corpus, tmp_path, "objective.rotate=true").objective.rotate == "step"
    assert tiny(corpus, tmp_path, "objective.rotate=false").objective.rotate == "none"
    assert tiny(corpus, tmp_path, "objective.rotate=epoch").objective.rotate == "epoch"
    with pytest.raises(ConfigError, match="objective.rotate"):
        tiny(corpus, tmp_path, "objective.rotate=weekly")
    with pytest.raises(ConfigError, match="objective.recipe"):
        tiny(corpus, tmp_path, "objective.recipe=papers")
    with pytest.raises(ConfigError, match="prefix is not part of objective.recipe = reference"):
        tiny(corpus, tmp_path, "objective.recipe=reference", "objective.mix=ar=1/2 md=1/4 prefix=1/4")


# ------------------------------------------------------------------------------------------ alpha schedules


def test_schedule_parsing_and_one_line_errors():
    s = parse_alpha_schedule("0:1, 6144:63/64")
    assert s.at(0, 8192) == 1 and s.at(6143, 8192) == 1 and s.at(6144, 8192) == Fraction(63, 64)
    lin = parse_alpha_schedule("linear 1 -> 1/8")
    assert lin.at(0, 9) == 1 and lin.at(8, 9) == Fraction(1, 8)
    for bad, where in [
        ("0:1, 100:1/2, 50:1/4", "item 3"),
        ("5:1", "item 1"),
        ("0:1, x:1/2", "item 2"),
        ("0:3/2", "outside"),
        ("linear 1", "linear A -> B"),
    ]:
        with pytest.raises(ConfigError, match="objective.alpha_schedule") as e:
            parse_alpha_schedule(bad)
        assert where in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"alpha 3/10 from step 4\)"):
        ObjectiveSchedule(n_slots=4, alpha_schedule=parse_alpha_schedule("0:1, 4:3/10"), total_steps=8)


def test_linear_schedule_rounds_each_step_and_reports_the_error_once():
    s = ObjectiveSchedule(n_slots=8, alpha_schedule=parse_alpha_schedule("linear 1 -> 1/8"), total_steps=15)
    for step in range(15):
        nominal = 1 - Fraction(7, 8) * Fraction(step, 14)
        assert s.alpha_at(step) == Fraction(math.floor(nominal * 8 + Fraction(1, 2)), 8)
        assert sum(s.counts(step).values()) == 8
        assert [o for r in range(1) for o in s.slots(r, step)].count(AR) == s.counts(step)[AR]
    assert 0 < s.rounding_error <= 1 / 16
    assert "largest error" in s.schedule_note()


def test_schedule_steps_past_the_run_are_reported_not_refused():
    """An extended run reaches them, so they are accepted; the start-up line says this run does not (it said
    nothing, and alpha 1/2 from step 400 of a 300-step run was silently never used)."""
    s = ObjectiveSchedule(n_slots=4, alpha_schedule=parse_alpha_schedule("0:1, 200:3/4, 400:1/2"), total_steps=300)
    assert s.schedule_note() == "; not reached in this run (past train.steps = 300): alpha 1/2 from step 400"
    within = ObjectiveSchedule(n_slots=4, alpha_schedule=parse_alpha_schedule("0:1, 200:3/4"), total_steps=300)
    assert within.schedule_note() == ""


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_schedule_realised_per_step_exactly_normalised_and_resumes_bit_exact(corpus, tmp_path):
    extra = ("objective.alpha_schedule=0:1, 2:1/2, 3:1/4",)
    full = Trainer(tiny(corpus, tmp_path / "full", *extra), quiet=True)
    full.fit()
    rows = _records(tmp_path / "full" / "metrics.jsonl")
    assert [r["alpha"] for r in rows] == [1.0, 1.0, 0.5, 0.25]
    z = full.cfg.objective.z_loss
    for r in rows:  # the step loss is exactly the step's alpha mixture of the per-token losses
        a = r["alpha"]
        want = a * (r["ar_loss"] + z * r["ar_z"]) + ((1 - a) * (r["md_loss"] + z * r["md_z"]) if a < 1 else 0.0)
        assert r["loss"] == pytest.approx(want, rel=1e-6)
        assert ("md_loss" in r) == (a < 1)
    part = Trainer(tiny(corpus, tmp_path / "part", *extra), quiet=True)
    part.fit(max_steps=3)  # killed after step 3; the checkpoint is step 2, inside the schedule
    resumed = Trainer(tiny(corpus, tmp_path / "part", *extra), quiet=True)
    resumed.fit()
    assert resumed.resumed_from is not None and resumed.resumed_from.name.endswith("2")
    keep = ("loss", "ar_loss", "md_loss", "alpha", "grad_norm")
    assert [{k: r.get(k) for k in keep} for r in _records(tmp_path / "part" / "metrics.jsonl")] == [
        {k: r.get(k) for k in keep} for r in rows
    ]
    for (n1, p1), (_, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


# ------------------------------------------------------------------------------------------ prefix-LM and mixes


def test_prefix_batch_labels_only_the_continuation():
    tokens = torch.arange(16, 16 + 17).repeat(64, 1)
    doc_ids = torch.zeros_like(tokens)
    b = prefix_batch(tokens, doc_ids, masking_generator(0, 0, 0), (0.25, 0.75))
    plen = b.mask.prefix_len
    assert b.mask.kind == "prefix" and 4 <= int(plen.min()) and int(plen.max()) <= 12 and len(set(plen.tolist())) > 3
    for r in range(64):
        p = int(plen[r])
        want = [IGNORE] * max(0, p - 1) + tokens[r, max(1, p) :].tolist()
        assert b.labels[r].tolist() == want
    assert b.n_tokens == int((b.labels != IGNORE).sum())
    # the prediction at a labelled position never sees its target: the dense mask allows keys <= max(i, P - 1)
    dense = b.mask.dense(16, 16)[0, 0]
    p = int(plen[0])
    for i in range(p - 1, 16):
        assert not dense[i, i + 1 :].any()
    assert dense[0, p - 1] and (p < 2 or not dense[0, p])


def test_mix_parsing_and_errors():
    assert parse_mix("ar=3/4 md=1/8 prefix=1/8") == {AR: Fraction(3, 4), MD: Fraction(1, 8), PREFIX: Fraction(1, 8)}
    for bad, what in [("ar=3/4 md=1/8", "sum to 7/8"), ("ar=1/2 lm=1/2", "'lm=1/2'"), ("ar=1/2 ar=1/2", "twice")]:
        with pytest.raises(ConfigError, match="objective.mix") as e:
            parse_mix(bad)
        assert what in str(e.value)
    with pytest.raises(ConfigError, match=r"objective.mix \(md = 1/8\)"):
        ObjectiveSchedule(n_slots=4, mix=parse_mix("ar=3/4 md=1/8 prefix=1/8"))
    s = ObjectiveSchedule(n_ranks=2, n_slots=4, mix=parse_mix("ar=3/4 md=1/8 prefix=1/8"))
    for step in range(8):
        got = [o for r in range(2) for o in s.slots(r, step)]
        assert (got.count(AR), got.count(MD), got.count(PREFIX)) == (6, 1, 1)


def test_three_objectives_gradient_is_the_weighted_mixture(corpus, tmp_path):
    cfg = tiny(
        corpus,
        tmp_path / "m",
        "objective.mix=ar=1/2 md=1/4 prefix=1/4",
        "train.eval_interval=1",
        "train.eval_batches=1",
        "optimizer.grad_clip=0",
    )
    tr = Trainer(cfg, quiet=True)
    indices = tr.loader.sampler.indices(0, 8)
    sums, tokens = {AR: 0, MD: 0, PREFIX: 0}, {AR: 0, MD: 0, PREFIX: 0}
    for s, obj in enumerate(tr.schedule.slots(0, 0)):
        t, d = collate(tr.data.train, indices[s * 2 : (s + 1) * 2])
        b = make_objective_batch(obj, t, d, cfg.objective, masking_generator(cfg.train.seed, 0, s))
        out = labelled_loss(tr.model.head, tr.model(b.input_ids, b.mask), b.labels, b.weights, cfg.objective.z_loss)
        sums[obj] = sums[obj] + out.weighted
        tokens[obj] += b.n_tokens
    assert all(tokens.values())
    loss = sums[AR] / tokens[AR] / 2 + sums[MD] / tokens[MD] / 4 + sums[PREFIX] / tokens[PREFIX] / 4
    params = list(tr.model.parameters())
    ref = torch.autograd.grad(loss, params)
    grads = {}
    opt = tr.engine.optimizers["muon"]
    orig = opt.step
    opt.step = lambda *a, **k: (grads.update({id(p): p.grad.clone() for p in params}), orig(*a, **k))[1]
    tr.fit(max_steps=1)
    for p, g in zip(params, ref, strict=True):
        torch.testing.assert_close(grads[id(p)], g, atol=1e-6, rtol=1e-5)
    row = _records(tmp_path / "m" / "metrics.jsonl")[0]
    assert row["prefix_tokens"] == tokens[PREFIX] and row["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert {"val_ar_loss", "val_md_loss", "val_prefix_loss"} <= set(row)


# ------------------------------------------------------------------------------------------ optimizer, data


def test_reference_optimizer_puts_the_head_projection_on_muon(corpus, tmp_path):
    cfg = load_config(preset="dual-470m")
    o = cfg.optimizer
    assert (o.muon_head, o.grad_clip, tuple(o.betas), o.decay_all, o.muon_adjust_lr) == (
        True,
        0.0,
        (0.9, 0.95),
        True,
        "match_rms_adamw",
    )
    small = tiny(corpus, tmp_path, "optimizer.muon_head=true")
    tr = Trainer(small, quiet=True)
    opts = build_optimizers(tr.model, small.optimizer)
    muon = {id(p) for g in opts["muon"].param_groups for p in g["params"]}
    names = {n for n, p in tr.model.named_parameters() if id(p) in muon}
    assert "head.proj.weight" in names and not any(n.startswith(("embed", "head.out")) for n in names)
    default = build_optimizers(tr.model, tiny(corpus, tmp_path).optimizer)
    assert "head.proj.weight" not in {
        n
        for n, p in tr.model.named_parameters()
        if any(p is q for g in default["muon"].param_groups for q in g["params"])
    }


def test_per_dataset_repetitions(tmp_path):
    prefixes = []
    for name, n in (("web", 200), ("books", 200)):
        prefix = str(tmp_path / f"{name}_text_document")
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for i in range(n):
                w.add_document([1] + [16 + (i + j) % 40 for j in range(20)])
        prefixes.append(prefix)
    path = f"0.5 {prefixes[0]} 0.5 {prefixes[1]}"
    _, _, fp, plan = build_datasets(path, 16, 1, 0.0, 1600, "web=2 books=4")
    assert plan.passes == [2, 4] and plan.per_dataset == [2, 4]
    assert plan.unique_tokens[0] > plan.unique_tokens[1]  # the same share of the budget over twice the passes
    _, _, fp2, _ = build_datasets(path, 16, 1, 0.0, 1600, "*=4 web=2")
    assert fp2 == fp
    for spec, what in [("web=2", "no R for"), ("news=2 *=1", "'news' matches no dataset"), ("web=x", "name=R")]:
        with pytest.raises(ValueError, match="data.repetitions") as e:
            build_datasets(path, 16, 1, 0.0, 1600, spec)
        assert what in str(e.value)


def test_info_and_planner_print_nominal_and_effective_alpha(capsys):
    import importlib.util
    from pathlib import Path

    from megatron_dual.cli import main

    assert main(["info", "--preset", "dual-470m", "--set", "objective.recipe=reference", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["alpha_nominal"], info["alpha_effective"]) == ("63/64", "126/127")
    assert main(["info", "--preset", "tiny", "--set", "objective.alpha_schedule=0:1, 200:3/4"]) == 0
    out = capsys.readouterr().out
    assert "steps 0-199: nominal alpha 1" in out and "steps 200-299: nominal alpha 3/4" in out
    spec = importlib.util.spec_from_file_location("plan_alpha", Path(__file__).parents[1] / "tools" / "plan_alpha.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    assert plan.main(["--repetitions", "1", "--devices", "64", "--slots", "4", "--recipe", "reference"]) == 0
    assert "effective alpha 126/127" in capsys.readouterr().out
