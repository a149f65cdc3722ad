"""Resuming with changed settings: what may change is applied and said once, what may not is refused by name."""

import json

import pytest

from megatron_dual.engine.checkpoint import CheckpointError
from megatron_dual.resume import resume_changes
from megatron_dual.trainer import Trainer
from tests.test_train import corpus, tiny  # noqa: F401 (the module fixture)


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_lr_change_is_applied_and_said(corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "lr"
    Trainer(tiny(corpus, out, "schedule.decay_steps=0"), quiet=True).fit(max_steps=3)
    old = _metrics(out)[-1]["lr"]
    tr = Trainer(tiny(corpus, out, "schedule.decay_steps=0", "optimizer.lr=0.0035"), quiet=True)
    tr.fit()
    err = capsys.readouterr().err
    assert err.count("resume: optimizer.lr 0.007 -> 0.0035 applied") == 1
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert old == pytest.approx(0.007) and all(r["lr"] == pytest.approx(0.0035) for r in rows[3:])


def test_schedule_change_takes_effect_at_once(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "sch"
    Trainer(tiny(corpus, out), quiet=True).fit(max_steps=3)
    tr = Trainer(tiny(corpus, out, "schedule.name=constant"), quiet=True)
    tr.maybe_resume()
    assert tr.engine.lr == pytest.approx(0.007)  # wsd over 6 steps would decay from step 4 on


def test_steps_extension_with_pinned_budget_continues(corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ext"
    budget = 10 * 2 * 4 * 16  # tokens of 10 steps
    Trainer(tiny(corpus, out, f"data.budget_tokens={budget}"), quiet=True).fit()
    tr = Trainer(tiny(corpus, out, f"data.budget_tokens={budget}", "train.steps=10"), quiet=True)
    tr.fit()
    assert "resume: train.steps 6 -> 10 applied" in capsys.readouterr().err
    assert [r["step"] for r in _metrics(out)] == list(range(1, 11))
    assert tr.step == 10


def test_steps_extension_without_pinned_budget_says_how(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "how"
    Trainer(tiny(corpus, out), quiet=True).fit()
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny(corpus, out, "train.steps=10"), quiet=True).fit()
    old_budget = 6 * 2 * 4 * 16
    msg = str(e.value)
    assert "\n" not in msg and "train.steps is 6 in the checkpoint but 10 now" in msg
    assert f"--set data.budget_tokens={old_budget}" in msg
    # following the advice extends the run on its data
    tr = Trainer(tiny(corpus, out, "train.steps=10", f"data.budget_tokens={old_budget}"), quiet=True)
    tr.fit()
    assert tr.step == 10 and [r["step"] for r in _metrics(out)] == list(range(1, 11))


@pytest.mark.parametrize(
    "field,old,new",
    [
        ("train.seed", 42, 7),
        ("model.rope_theta", 160000.0, 10000.0),
        ("model.norm_eps", 1e-07, 1e-05),
        ("objective.z_loss", 0.0001, 0.0),
        ("train.micro_batch_size", 2, 1),
    ],
)
def test_fixed_fields_are_refused_by_name(corpus, tmp_path, field, old, new):  # noqa: F811
    out = tmp_path / "fixed"
    Trainer(tiny(corpus, out), quiet=True).fit(max_steps=3)
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny(corpus, out, f"{field}={new}"), quiet=True).fit()
    msg = str(e.value)
    assert "\n" not in msg and f"{field} is {old!r} in the checkpoint but {new!r} now" in msg


def test_resume_changes_is_pure():
    saved = {
        "optimizer": {"lr": 0.007},
        "train": {"steps": 6, "seed": 1, "grad_accum": 4, "micro_batch_size": 2},
        "data": {"budget_tokens": 0, "seq_len": 16},
        "logging": {"log_interval": 10},
    }
    current = json.loads(json.dumps(saved))
    assert resume_changes(saved, current) == []
    current["optimizer"]["lr"], current["logging"]["log_interval"] = 0.001, 1
    assert resume_changes(saved, current) == [("optimizer.lr", 0.007, 0.001), ("logging.log_interval", 10, 1)]
    current["train"]["grad_accum"] = 2  # with twice the data-parallel ranks: the same global batch
    assert ("train.grad_accum", 4, 2) in resume_changes(saved, current, dp_saved=1, dp=2)
    with pytest.raises(CheckpointError, match="train.grad_accum is 4 in the checkpoint but 2 now"):
        resume_changes(saved, current, dp_saved=1, dp=1)


def test_packing_is_compared_as_the_layout_it_resolves_to():
    """data.packing = auto names the layout by objective.recipe: a resume that spells the same layout out (or back
    to auto) continues on the same samples and is not refused; another layout is."""
    for recipe, layout, other in (("reference", "reference", "concat"), ("paper", "concat", "reference")):
        saved = {"objective": {"recipe": recipe}, "data": {"packing": "auto", "seq_len": 16}}
        current = json.loads(json.dumps(saved))
        current["data"]["packing"] = layout
        assert resume_changes(saved, current) == [] and resume_changes(current, saved) == []
        current["data"]["packing"] = other
        with pytest.raises(CheckpointError, match="data.packing"):
            resume_changes(saved, current)
    # a checkpoint older than the field is not compared here (the loader state names a changed layout)
    assert resume_changes({"data": {"seq_len": 16}}, {"data": {"seq_len": 16, "packing": "concat"}}) == []
