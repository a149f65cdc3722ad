import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_dual.data.indexed import IndexedDataset
from megatron_dual.data.preprocess import preprocess
from megatron_dual.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.\nThe shells she sells are surely seashells.",
    "Colourless green ideas sleep furiously.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "In the beginning was the Word, and a literal <s> and <mask> stay text.",
    "Ünïcödé wörks töö: café, naïve, 東京.",
]


@pytest.fixture(scope="module")
def data_ltg():
    return load_tokenizer("ltg")


@pytest.fixture
def data_jsonl(tmp_path):
    """A .jsonl with good documents and, at known lines, one of each defect."""
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[:3])]
    lines += ['{"text": "unterminated', json.dumps({"body": "no text key"}), json.dumps({"text": ""})]
    lines += [json.dumps({"text": t}) for t in TEXTS[3:]]
    raw = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9 latin-1"}\n' + b"\n" + b"[1, 2]\n"
    raw += json.dumps({"text": 42}).encode() + b"\n"
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(raw)
    return str(path)


EXPECTED_SKIPS = [
    (4, "invalid JSON"),
    (5, "missing key 'text'"),
    (6, "empty text in key 'text'"),
    (11, "not valid UTF-8"),
    (13, "not a JSON object"),  # line 12 is blank: ignored silently
    (14, "key 'text' is not a string"),
]


def test_end_to_end_jsonl(tmp_path, data_jsonl, data_ltg):
    summary = preprocess([data_jsonl], str(tmp_path / "out" / "corpus"), "ltg", log_interval=0)
    prefix = str(tmp_path / "out" / "corpus_text_document")
    assert summary["per_key"]["text"]["prefix"] == prefix
    assert summary["documents"] == len(TEXTS) and summary["dtype"] == "uint16"
    assert [(line, reason.split(" (")[0]) for _, line, reason in summary["skipped"]] == EXPECTED_SKIPS
    assert all(f == data_jsonl for f, _, _ in summary["skipped"])
    ds = IndexedDataset(prefix)
    assert len(ds) == len(TEXTS) and ds.dtype is np.uint16
    assert summary["tokens"] == ds.num_tokens
    for i, text in enumerate(TEXTS):
        ids = ds[i].tolist()
        assert ids == data_ltg.encode(text, add_bos=True)
        assert ids[0] == data_ltg.bos_id and ids.count(data_ltg.bos_id) == 1
        assert data_ltg.decode(ids) == text


def test_strict_names_file_and_line(tmp_path, data_jsonl):
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4: invalid JSON"):
        preprocess([data_jsonl], str(tmp_path / "s"), "ltg", strict=True, log_interval=0)
    assert not any(p.endswith(".idx") for p in os.listdir(tmp_path))


def test_strict_with_workers_names_file_and_line(tmp_path, data_jsonl):
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4: invalid JSON"):
        preprocess([data_jsonl], str(tmp_path / "s"), "ltg", strict=True, workers=2, log_interval=0)
    assert not any(p.endswith((".idx", ".bin")) for p in os.listdir(tmp_path))


def test_workers_output_byte_identical(tmp_path, data_jsonl):
    # many lines so that several batches are in flight across the two workers
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(1500):
            f.write(json.dumps({"text": f"{TEXTS[i % len(TEXTS)]} Number {i}."}) + "\n")
    inputs = [data_jsonl, str(big)]
    one = preprocess(inputs, str(tmp_path / "w1"), "ltg", append_eod=True, log_interval=0)
    two = preprocess(inputs, str(tmp_path / "w2"), "ltg", append_eod=True, workers=2, log_interval=0)
    assert one["skipped"] == two["skipped"] and one["tokens"] == two["tokens"] and one["documents"] == 1500 + 7
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        b = (tmp_path / f"w2_text_document{ext}").read_bytes()
        assert a == b
    ds = IndexedDataset(str(tmp_path / "w2_text_document"))
    assert ds[0][-1] == 2 and ds[0][0] == 1  # --append-eod adds </s>


def test_txt_inputs_and_multiple_keys(tmp_path, data_ltg):
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "empty.txt"
    a.write_text(TEXTS[1] + "\n")
    b.write_text(TEXTS[6])
    empty.write_text("\n\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond \xff line\n")
    s = preprocess([str(a), str(empty), str(b), str(bad)], str(tmp_path / "t"), "ltg", log_interval=0)
    ds = IndexedDataset(str(tmp_path / "t_text_document"))
    assert len(ds) == 2 and data_ltg.decode(ds[0]) == TEXTS[1] + "\n" and data_ltg.decode(ds[1]) == TEXTS[6]
    assert [(Path(f).name, line, r.split(" (")[0]) for f, line, r in s["skipped"]] == [
        ("empty.txt", 1, "empty file"), ("bad.txt", 2, "not valid UTF-8")]

    j = tmp_path / "two.jsonl"
    j.write_text(json.dumps({"title": "A title", "text": TEXTS[0]}) + "\n" + json.dumps({"text": TEXTS[2]}) + "\n")
    s = preprocess([str(j)], str(tmp_path / "k"), "ltg", json_keys=["text", "title"], log_interval=0)
    assert s["per_key"]["text"]["documents"] == 2 and s["per_key"]["title"]["documents"] == 1
    assert s["skipped"] == [(str(j), 2, "missing key 'title'")]
    assert data_ltg.decode(IndexedDataset(str(tmp_path / "k_title_document"))[0]) == "A title"
    with pytest.raises(ValueError, match="single key"):
        preprocess([str(a)], str(tmp_path / "x"), "ltg", json_keys=["text", "title"])


def test_errors_for_missing_inputs(tmp_path, data_jsonl):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), "ltg")
    with pytest.raises(FileNotFoundError, match="no-tok"):
        preprocess([data_jsonl], str(tmp_path / "o"), str(tmp_path / "no-tok"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported input"):
        preprocess([str(tmp_path / "x.csv")], str(tmp_path / "o"), "ltg")


def test_progress_line(tmp_path, data_jsonl):
    buf = io.StringIO()
    preprocess([data_jsonl], str(tmp_path / "p"), "ltg", log_interval=2, log_stream=buf)
    assert "processed 7 documents" in buf.getvalue()


def test_tool_main_and_summary(tmp_path, data_jsonl, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    rc = preprocess_data.main(["--input", data_jsonl, "--output-prefix", str(tmp_path / "c"), "--tokenizer-model",
                               "ltg", "--json-keys", "text", "--log-interval", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "documents: 7" in out and "tokens/doc" in out and "skipped: 6" in out
    assert f"invalid JSON: 1 (first at {data_jsonl}:4)" in out
    assert os.path.exists(tmp_path / "c_text_document.idx")
    rc = preprocess_data.main(["--input", data_jsonl, "--output-prefix", str(tmp_path / "d"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data_jsonl}:4: invalid JSON" in err


def test_tool_script_missing_input_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
                        str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
