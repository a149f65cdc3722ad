"""Choosing alpha: the paper's rules, layout realisation, the GP surface, results.csv validation, sweeps."""

from __future__ import annotations

import csv
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from megatron_dual.config import ConfigError, load_config
from megatron_dual.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_dual.data.packing import PackedDataset
from megatron_dual.data.sampler import split_documents
from megatron_dual.planning.gp import ResultsError, best_alpha_posterior, fit_surface, load_results
from megatron_dual.planning.rules import (
    config_lines,
    launch_command,
    realise_alpha,
    recommend_alpha,
    repetitions_from_tokens,
)
from megatron_dual.planning.sweep import collect_results, generate_sweep, write_repetition_subset

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize("r", [1, 2, 8, 16])
def test_regular_regime_is_63_64(r):
    rec = recommend_alpha(r)
    assert rec.regime == "regular"
    assert rec.alpha == 63 / 64


def test_paper_settings_and_nearest_k_over_256():
    # 1x -> 63/64 = 252/256 exactly
    plan = realise_alpha(recommend_alpha(1).alpha, 256, 1)
    assert (plan.ar_slots, plan.md_slots, plan.alpha, plan.exact) == (252, 4, Fraction(63, 64), True)
    # 32x -> Remark 2: alpha x 32 = 16 -> 1/2 = 128/256 (the paper's own pick 3/4 lies in the 8..32 band)
    rec32 = recommend_alpha(32)
    assert rec32.alpha == 0.5 and rec32.effective_ar_repetitions == 16
    assert rec32.band[0] <= 0.75 <= rec32.band[1] and rec32.paper_pick == Fraction(3, 4)
    assert realise_alpha(rec32.alpha, 256, 1).ar_slots == 128
    # 128x -> 16/128 = 1/8 = 32/256, which is also the paper's published pick
    rec128 = recommend_alpha(128)
    assert rec128.regime == "data-constrained" and rec128.alpha == 1 / 8
    assert realise_alpha(rec128.alpha, 256, 1).ar_slots == 32
    assert rec128.paper_pick == Fraction(1, 8)
    # 100x: 16/100 = 0.16 is not k/256; nearest is 41/256 (0.16015625)
    plan = realise_alpha(recommend_alpha(100).alpha, 256, 1)
    assert plan.ar_slots == 41 and not plan.exact
    assert plan.neighbours == (Fraction(40, 256), Fraction(41, 256))


def test_transition_interpolation_is_continuous():
    # min(63/64, 16/R): equals 63/64 up to R = 16.25, then follows 16/R, reaching 1/2 at R = 32
    assert recommend_alpha(16.25).alpha == pytest.approx(63 / 64)
    assert recommend_alpha(24).alpha == pytest.approx(16 / 24)
    assert recommend_alpha(24).regime == "transition"
    grid = np.linspace(1, 300, 3000)
    alphas = np.array([recommend_alpha(r).alpha for r in grid])
    assert np.all(np.diff(alphas) <= 1e-12)  # non-increasing in R
    assert np.max(np.abs(np.diff(alphas))) < 0.01  # no jumps


def test_repetitions_inputs():
    assert repetitions_from_tokens(1e9, 32e9) == 32
    with pytest.raises(ValueError, match="R = 0.5 < 1"):
        repetitions_from_tokens(2e9, 1e9)
    with pytest.raises(ValueError, match="unique-tokens"):
        repetitions_from_tokens(0, 1e9)
    with pytest.raises(ValueError, match="repetitions = 0.5"):
        recommend_alpha(0.5)


def test_layout_realisability_and_impossible_requests():
    plan = realise_alpha(0.3, 2, 2)
    assert plan.alpha == Fraction(1, 4) and plan.total == 4 and not plan.exact
    assert plan.ar_slots + plan.md_slots == 4
    with pytest.raises(ConfigError) as e:
        realise_alpha(0.3, 2, 2, exact=True)
    msg = str(e.value)
    assert "realisable with 2 x 2: 0, 1/4, 1/2, 3/4, 1" in msg
    assert "multiple of 10" in msg
    with pytest.raises(ConfigError, match="--devices = 0"):
        realise_alpha(0.5, 0, 4)
    with pytest.raises(ConfigError, match="--slots = 0"):
        realise_alpha(0.5, 4, 0)
    # 3/4 on 4 devices x 1 slot: 3 ranks AR, 1 rank MD at step 0; on 1 device x 4 slots the one rank is mixed
    p = realise_alpha(0.75, 4, 1, exact=True)
    assert (p.ranks_all_ar, p.ranks_all_md, p.ranks_mixed) == (3, 1, 0)
    p = realise_alpha(0.75, 1, 4, exact=True)
    assert (p.ranks_all_ar, p.ranks_all_md, p.ranks_mixed) == (0, 0, 1)
    lines = config_lines(p, "tiny", 4, ("repetitions", "budget_tokens"), 1e6)
    assert lines[:4] == [
        "objective.alpha=3/4",
        "train.grad_accum=4",
        "data.repetitions=4",
        "data.budget_tokens=1000000",
    ]
    cfg = load_config(preset="tiny", overrides=lines[:2])  # the pasted lines are a valid config
    assert cfg.objective.alpha == 0.75


def test_plan_alpha_cli(capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import plan_alpha

    assert plan_alpha.main(["--unique-tokens", "2.5e8", "--budget-tokens", "32e9", "--devices", "256"]) == 0
    out = capsys.readouterr().out
    assert "R = 32,000,000,000 budget / 250,000,000 unique tokens = 128" in out
    assert "objective.alpha=32/256" in out and "32 slot(s) run AR, 224 run MD" in out
    assert plan_alpha.main(["--repetitions", "1", "--devices", "2", "--slots", "2", "--exact"]) == 2
    err = capsys.readouterr().err
    assert "realisable with 2 x 2: 0, 1/4, 1/2, 3/4, 1" in err
    assert len(err.strip().splitlines()) == 1, err  # one error line, as README shows it


def test_plan_alpha_schedule_lines_and_uneven_node_launches(capsys):
    """With --alpha-schedule the lines to paste carry the schedule and train.steps (they carried the constant alpha
    only), quoted for the shell; ranks that do not fill whole nodes are spread evenly (torchrun starts the same
    number of processes on every node: 12 ranks on 8-GPU nodes had been one node of 12)."""
    import shlex

    sys.path.insert(0, str(REPO / "tools"))
    import plan_alpha

    argv = ["--repetitions", "16", "--devices", "8", "--slots", "8", "--alpha-schedule", "0:1, 6144:63/64"]
    assert plan_alpha.main([*argv, "--steps", "8192"]) == 0
    lines = capsys.readouterr().out.split("config lines:\n", 1)[1].strip().splitlines()
    assert [x.strip() for x in lines[:3]] == [
        "objective.alpha_schedule=0:1, 6144:63/64",
        "train.steps=8192",
        "train.grad_accum=8",
    ]
    launch = shlex.split(lines[-1])
    sets = [launch[i + 1] for i, word in enumerate(launch) if word == "--set"]
    # the launch line's overrides are a valid config (here in one process: its 64 slots as 64 micro-batches)
    cfg = load_config(preset="tiny", overrides=[*sets, "train.grad_accum=64"])
    assert (cfg.objective.alpha_schedule, cfg.train.steps) == ("0:1, 6144:63/64", 8192)
    assert launch_command(12, 8).startswith("torchrun --nnodes=2 --nproc_per_node=6 ")
    assert launch_command(20, 8).startswith("torchrun --nnodes=4 --nproc_per_node=5 ")
    assert launch_command(256, 8).startswith("torchrun --nnodes=32 --nproc_per_node=8 ")
    assert launch_command(8, 8) == "torchrun --nproc_per_node=8 -m megatron_dual.train"


def test_plan_alpha_refuses_zero_gpus_per_node(capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import plan_alpha

    assert plan_alpha.main(["--repetitions", "4", "--devices", "16", "--gpus-per-node", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["plan_alpha: error: --gpus-per-node = 0: must be a whole number >= 1"]


def test_plan_alpha_results_without_sklearn_is_one_line(capsys, monkeypatch, tmp_path):
    """--results fits with scikit-learn and plots with matplotlib: where one is missing, one line says which."""
    sys.path.insert(0, str(REPO / "tools"))
    import plan_alpha

    def fit(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(plan_alpha, "planner_report", fit)
    assert plan_alpha.main(["--repetitions", "16", "--results", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "plan_alpha: error: No module named 'sklearn' (pip install -e . installs what megatron-dual needs)"


# ------------------------------------------------------------------------------------------------ GP


def synthetic_optimum(r: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - 0.1 * np.log2(r), 0.0, 1.0)


def synthetic_score(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    return 0.3 - 0.02 * np.log2(r) - 0.8 * (a - synthetic_optimum(r)) ** 2


def write_csv(path: Path, rows: list[dict], header: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def test_gp_recovers_synthetic_surface(tmp_path):
    pytest.importorskip("sklearn")  # absent on a bare GPU image (make image-check)
    rng = np.random.default_rng(0)
    reps = 2.0 ** np.arange(0, 9)
    alphas = np.linspace(0, 1, 11)
    rows = []
    for r in reps:
        for a in alphas:
            s = float(synthetic_score(np.array(r), np.array(a)) + rng.normal(0, 0.002))
            rows.append({"repetitions": r, "alpha": a, "score": s})
    res = load_results(write_csv(tmp_path / "results.csv", rows, ["repetitions", "alpha", "score"]))
    fit = fit_surface(res, restarts=2)
    assert fit.r2 > 0.99 and fit.r2_loo > 0.99
    assert all(ls > 0 for ls in fit.length_scales)
    # off-grid check against the true surface
    rr, aa = np.array([3.0, 12.0, 48.0]), np.array([0.33, 0.77, 0.5])
    assert np.max(np.abs(fit.predict(rr, aa) - synthetic_score(rr, aa))) < 0.02
    for r in (2.0, 16.0, 128.0):
        best = best_alpha_posterior(fit, r, samples=1000, seed=1)
        opt = float(synthetic_optimum(np.array(r)))
        assert abs(best.map_alpha - opt) <= 0.05, (r, best.map_alpha, opt)
        assert best.prob_within(opt - 0.1, opt + 0.1) > 0.8
        assert abs(best.probability.sum() - 1) < 1e-9
    # the gain over alpha = 1 grows with R (the optimum moves away from 1)
    gains = [best_alpha_posterior(fit, r, samples=500).expected_gain for r in (1.0, 16.0, 256.0)]
    assert gains[0] < gains[1] < gains[2]


def test_results_csv_errors(tmp_path):
    p = write_csv(tmp_path / "nocol.csv", [{"repetitions": 1, "alpha": 0.5}], ["repetitions", "alpha"])
    with pytest.raises(ResultsError, match=r"nocol\.csv:1: missing column 'score'"):
        load_results(p)
    rows = [{"repetitions": 1, "alpha": 0.5, "score": 1}, {"repetitions": 4, "alpha": 1.5, "score": 2}]
    p = write_csv(tmp_path / "alpha.csv", rows, ["repetitions", "alpha", "score"])
    with pytest.raises(ResultsError, match=r"alpha\.csv:3: alpha = 1\.5 is outside \[0, 1\]"):
        load_results(p)
    rows = [
        {"repetitions": 1, "alpha": "3/4", "score": 1},
        {"repetitions": 1, "alpha": 0, "score": 2},
        {"repetitions": 0.5, "alpha": 0, "score": 2},
    ]
    p = write_csv(tmp_path / "reps.csv", rows, ["repetitions", "alpha", "score"])
    with pytest.raises(ResultsError, match=r"reps\.csv:4: repetitions = 0\.5 is below 1"):
        load_results(p)
    with pytest.raises(ResultsError, match="is a directory, not a results CSV"):
        load_results(tmp_path)
    (tmp_path / "latin1.csv").write_bytes(b"repetitions,alpha,score\n1,1,-5 \xe9\n")
    with pytest.raises(ResultsError, match=r"latin1\.csv: not UTF-8 text \(byte 31"):
        load_results(tmp_path / "latin1.csv")
    rows = [{"repetitions": 1, "alpha": 0, "score": "n/a"}]
    p = write_csv(tmp_path / "nan.csv", rows, ["repetitions", "alpha", "score"])
    with pytest.raises(ResultsError, match=r"nan\.csv:2: column 'score' = 'n/a' is not a number"):
        load_results(p)
    rows = [
        {"repetitions": 1, "alpha": 0, "score": 1, "model_size": 1e6},
        {"repetitions": 1, "alpha": 1, "score": 1, "model_size": 4e6},
    ]
    p = write_csv(tmp_path / "sizes.csv", rows, ["repetitions", "alpha", "score", "model_size"])
    with pytest.raises(ResultsError, match="2 model sizes"):
        load_results(p)
    assert len(load_results(p, model_size=4e6)) == 1
    assert (
        load_results(
            write_csv(
                tmp_path / "frac.csv",
                [{"repetitions": 2, "alpha": "3/4", "score": 1}],
                ["repetitions", "alpha", "score"],
            )
        ).alpha[0]
        == 0.75
    )


# ------------------------------------------------------------------------------------------------ sweeps


def make_corpus(prefix: Path, n_docs: int = 120, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(n_docs):
            n = int(rng.integers(40, 200))
            w.add_document(np.concatenate([[1], rng.integers(16, 4096, size=n - 1)]).astype(np.uint16))
    return str(prefix)


def test_subset_realises_r_and_keeps_the_held_out_documents(tmp_path):
    src = make_corpus(tmp_path / "c_text_document")
    ds = IndexedDataset(src)
    _, src_valid = split_documents(len(ds), 0.05, 1234)
    info = write_repetition_subset(src, str(tmp_path / "sub_text_document"), 10, 128, valid_fraction=0.05, seed=1234)
    sub = IndexedDataset(info.prefix)
    tr, va = split_documents(len(sub), info.valid_fraction, 1234)
    assert len(PackedDataset(sub, 128, tr)) == 10 and info.unique_tokens == 10 * 128 + 1
    assert int(sub.sequence_lengths[tr].sum()) == info.unique_tokens
    # the trainer's own split finds exactly the source's held-out documents, in order
    assert [sub.get(int(i)).tolist() for i in va] == [ds.get(int(i)).tolist() for i in src_valid]


def test_subset_for_the_reference_packing_holds_exactly_its_samples(tmp_path):
    """Under the reference recipe's packing (a document's final token is a target only) the subset holds exactly
    ``train_samples`` samples of input positions: no pass spills into a partial extra sample."""
    src = make_corpus(tmp_path / "c_text_document")
    info = write_repetition_subset(
        src, str(tmp_path / "sub_text_document"), 10, 128, valid_fraction=0.05, seed=1234, layout="reference"
    )
    sub = IndexedDataset(info.prefix)
    tr, _ = split_documents(len(sub), info.valid_fraction, 1234)
    assert info.unique_tokens == 10 * 128
    assert int(np.maximum(sub.sequence_lengths[tr].astype(np.int64) - 1, 0).sum()) == 10 * 128
    assert len(PackedDataset(sub, 128, tr, layout="reference")) == 10
    # the concat subset of the same size, packed the reference way, would fall short of its 10th sample
    plain = write_repetition_subset(src, str(tmp_path / "plain_text_document"), 10, 128, valid_fraction=0.05, seed=1234)
    sub2 = IndexedDataset(plain.prefix)
    tr2, _ = split_documents(len(sub2), plain.valid_fraction, 1234)
    assert len(PackedDataset(sub2, 128, tr2, layout="reference")) < 10


@pytest.mark.parametrize("force_subset", [False, True])
def test_generate_and_collect(tmp_path, force_subset):
    src = make_corpus(tmp_path / "c_text_document", n_docs=300)
    out = tmp_path / "sweep"
    tasks = generate_sweep(
        out,
        preset="tiny",
        data_path=src,
        repetitions=[1, 4],
        alphas=["1", "3/4"],
        steps=4,
        overrides=["train.micro_batch_size=2", "train.eval_interval=2"],
        max_parallel=2,
        force_subset=force_subset,
    )
    assert [(t.repetitions, t.alpha) for t in tasks] == [(1, "1"), (1, "3/4"), (4, "1"), (4, "3/4")]
    assert {t.realised_by for t in tasks} == {"subset" if force_subset else "data-fields"}
    sbatch = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in sbatch and "task_%03d.yaml" in sbatch
    cfg = load_config(tasks[3].config)
    assert cfg.objective.alpha == 0.75 and cfg.train.steps == 4 and cfg.train.micro_batch_size == 2
    assert cfg.schedule.decay_steps == 1  # the preset's quarter of 4 steps, written as a count
    budget = 4 * 2 * 4 * 128
    assert tasks[0].budget_tokens == budget
    if force_subset:
        sub = IndexedDataset(cfg.data.path)
        tr, _ = split_documents(len(sub), cfg.data.valid_fraction, cfg.data.seed)
        assert len(PackedDataset(sub, 128, tr)) * 4 == 4 * 2 * 4  # samples x R = samples drawn
    else:
        assert (cfg.data.repetitions, cfg.data.budget_tokens) == (4, budget)
    # collect: fake two finished runs, one unfinished, one missing
    for t, loss, steps in ((tasks[0], 5.0, 4), (tasks[1], 4.5, 4), (tasks[2], 6.0, 2)):
        Path(t.output_dir).mkdir(parents=True)
        Path(t.output_dir, "summary.json").write_text(
            json.dumps({"steps": steps, "val_ar_loss": loss, "val_md_loss": loss + 1})
        )
    rows, missing = collect_results(out, tmp_path / "results.csv")
    assert [(r["alpha"], r["score"]) for r in rows] == [(1.0, -5.0), (0.75, -4.5)]
    assert len(missing) == 2 and "unfinished" in missing[0] and "no " in missing[1]
    res = load_results(tmp_path / "results.csv")
    assert res.score.tolist() == [-5.0, -4.5] and math.isclose(res.alpha[1], 0.75)
    with pytest.raises(ConfigError, match="missing results"):
        collect_results(out, tmp_path / "results2.csv", strict=True)


@pytest.mark.parametrize("fraction, decay", [(1.0, 8), (0.5, 4), (0.0, 0)])
def test_generate_writes_the_decay_fraction_as_steps(tmp_path, fraction, decay):
    src = make_corpus(tmp_path / "c_text_document")
    tasks = generate_sweep(
        tmp_path / "s", preset="tiny", data_path=src, repetitions=[1], alphas=["1"], steps=8, decay_fraction=fraction
    )
    assert load_config(tasks[0].config).schedule.decay_steps == decay  # 1.0 is the whole run, not one step


def test_generate_rejects_unrealisable_alpha(tmp_path):
    src = make_corpus(tmp_path / "c_text_document")
    with pytest.raises(ConfigError, match="cannot be realised exactly"):
        generate_sweep(tmp_path / "s", preset="tiny", data_path=src, repetitions=[1], alphas=["1/3"], steps=2)


def test_sweep_end_to_end_trains_collects_and_fits(tmp_path):
    """generate -> run (in process, 2 steps per run) -> collect -> the planner reads what the trainer wrote."""
    src = make_corpus(tmp_path / "c_text_document", n_docs=300)
    out = tmp_path / "sweep"
    generate_sweep(
        out,
        preset="tiny",
        data_path=src,
        repetitions=[1, 4],
        alphas=["1", "1/2"],
        steps=2,
        overrides=[
            "train.micro_batch_size=1",
            "train.grad_accum=2",
            "train.eval_interval=2",
            "train.eval_batches=1",
            "train.threads=1",
            "checkpoint.interval=0",
            "logging.plot=false",
            "model.n_layers=1",
        ],
    )
    from megatron_dual.planning.sweep import run_local

    records = run_local(out, in_process=True)
    assert [r["status"] for r in records] == ["done"] * 4, [Path(r["log"]).read_text()[-2000:] for r in records]
    assert [r["status"] for r in run_local(out, in_process=True)] == ["skipped"] * 4  # finished runs are skipped
    rows, missing = collect_results(out, tmp_path / "results.csv")
    assert not missing and len(rows) == 4
    assert all(math.isfinite(r["score"]) and r["score"] == -r["val_ar_loss"] for r in rows)
    res = load_results(tmp_path / "results.csv")
    assert sorted(set(res.repetitions.tolist())) == [1.0, 4.0] and sorted(set(res.alpha.tolist())) == [0.5, 1.0]


def test_data_wall_study_reports_each_task_when_it_ends(tmp_path, monkeypatch, capsys):
    """examples/data_wall/run_study.py prints 'task N: done (T s elapsed)' as each run ends, not all at the end."""
    import argparse

    import megatron_dual.planning.sweep as sweep_lib

    sys.path.insert(0, str(REPO / "examples" / "data_wall"))
    try:
        import run_study
    finally:
        sys.path.pop(0)
    tasks = [{"task": 0, "repetitions": 1.0, "alpha": "1", "steps": 2, "unique_tokens": 8, "realised_by": "x"}]
    tasks += [dict(tasks[0], task=1)]
    (tmp_path / "manifest.json").write_text(json.dumps({"tasks": tasks}))
    printed_before = []

    def fake_run_local(sweep_dir, ids=None, **kwargs):
        printed_before.append(capsys.readouterr().out.count(": done ("))
        chosen = [t["task"] for t in tasks] if ids is None else ids
        return [{"task": i, "status": "done", "returncode": 0, "log": ""} for i in chosen]

    monkeypatch.setattr(sweep_lib, "run_local", fake_run_local)
    run_study.run_sweep(
        argparse.Namespace(collect_only=False, threads=1, micro_batch_size=2, eval_interval=1, eval_batches=1, steps=2),
        tmp_path,
        tmp_path / "tok.json",
        "d",
        0.0,
    )
    assert printed_before == [0, 1]  # task 0's line was out before task 1 ran
    assert capsys.readouterr().out.count(": done (") == 1
