import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dual.data.tokenizer import (
    LTG_TOKENIZER_PATH,
    N_SPECIAL,
    SPECIAL_TOKENS,
    Tokenizer,
    iter_training_texts,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold.",
    "The early bird catches the worm.",
    "Actions speak louder than words.",
    "Knowledge is power, and power corrupts.",
    "Where there is a will, there is a way.",
    "Fortune favours the bold and the brave.",
    "Time and tide wait for no man.",
    "Every cloud has a silver lining.",
    "The pen is mightier than the sword.",
]


@pytest.fixture(scope="module")
def ltg():
    return load_tokenizer("ltg")


@pytest.fixture(scope="module")
def trained():
    return train_bpe_tokenizer((s for _ in range(20) for s in SENTENCES), vocab_size=400, min_frequency=2)


def test_ltg_specials_and_size(ltg):
    assert ltg.vocab_size == 51200 and len(SPECIAL_TOKENS) == N_SPECIAL == ltg.n_special == 16
    assert [ltg.id_to_token(i) for i in range(16)] == SPECIAL_TOKENS
    assert (ltg.unk_id, ltg.bos_id, ltg.eos_id, ltg.pad_id, ltg.mask_id) == (0, 1, 2, 3, 4)
    assert ltg.token_to_id("<mask>") == 4 and ltg.token_to_id("<special_10>") == 15
    assert ltg.token_to_id("no-such-token-xyz") is None and ltg.id_to_token(10**6) is None
    assert ltg.path == LTG_TOKENIZER_PATH


@pytest.mark.parametrize("name", ["ltg", "trained"])
def test_encode_bos_and_round_trip(name, request):
    tok = request.getfixturevalue(name)
    for text in SENTENCES[:4] + ["Hello world\nNew line  here.", "x", "  leading spaces"]:
        ids = tok.encode(text)
        plain = tok.encode(text, add_bos=False)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[1:] == plain
        assert tok.bos_id not in plain
        assert tok.decode(ids) == text
        assert tok.decode(plain) == text
    assert tok.encode_batch(SENTENCES[:3]) == [tok.encode(s) for s in SENTENCES[:3]]
    assert tok.encode_batch(SENTENCES[:3], add_bos=False) == [tok.encode(s, add_bos=False) for s in SENTENCES[:3]]


def test_literal_special_strings_are_text(ltg):
    ids = ltg.encode("a <s> b <mask> c")
    assert ids.count(ltg.bos_id) == 1 and ltg.mask_id not in ids
    assert ltg.decode(ids) == "a <s> b <mask> c"


def test_decode_special_handling_and_array_input(ltg):
    import numpy as np

    ids = ltg.encode("Hi there") + [ltg.eos_id]
    assert ltg.decode(ids) == "Hi there"
    assert ltg.decode(np.array(ids, dtype=np.uint16)) == "Hi there"
    assert "<s>" in ltg.decode(ids, skip_special=False) and "</s>" in ltg.decode(ids, skip_special=False)


def test_trained_tokenizer_layout_matches_ltg(trained, ltg, tmp_path):
    assert [trained.id_to_token(i) for i in range(16)] == SPECIAL_TOKENS
    assert 300 < trained.vocab_size <= 400
    ours, theirs = json.loads(trained.backend.to_str()), json.loads(ltg.backend.to_str())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[part] == theirs[part], part
    assert ours["model"]["type"] == "BPE"
    path = save_tokenizer(trained, tmp_path / "tok")
    assert path == str(tmp_path / "tok" / "tokenizer.json")
    for spec in (tmp_path / "tok", path):
        again = load_tokenizer(str(spec))
        assert again.vocab_size == trained.vocab_size
        assert again.encode(SENTENCES[5]) == trained.encode(SENTENCES[5])


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="272"):
        train_bpe_tokenizer(SENTENCES, vocab_size=200)


def test_missing_tokenizer_names_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(str(missing))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="emptydir/tokenizer.json"):
        load_tokenizer(str(tmp_path / "emptydir"))


def test_wrong_specials_named(tmp_path, ltg):
    data = json.loads(ltg.backend.to_str())
    for t in data["added_tokens"]:
        if t["id"] == 3:
            t["content"] = "[PAD]"
    vocab = data["model"]["vocab"]
    vocab["[PAD]"] = vocab.pop("<pad>")
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"id 3 is '\[PAD\]'.*'<pad>'"):
        load_tokenizer(str(bad))
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        load_tokenizer(str(tmp_path / "garbage.json"))


def test_iter_training_texts(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_bytes(b'{"body": "one"}\n{bad\n{"body": 3}\n\xff\n{"body": "two"}\n')
    t = tmp_path / "b.txt"
    t.write_text("line one\nline two\n")
    assert list(iter_training_texts([str(j), str(t)], json_key="body")) == ["one", "two", "line one\nline two\n"]
    with pytest.raises(FileNotFoundError, match="zz.txt"):
        list(iter_training_texts([str(tmp_path / "zz.txt")]))


def test_train_tokenizer_tool(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for _ in range(10) for s in SENTENCES))
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "350", "--output", str(tmp_path / "o")]) == 0
    tok = load_tokenizer(str(tmp_path / "o"))
    assert isinstance(tok, Tokenizer) and tok.encode(SENTENCES[0])[0] == 1
    assert (
        train_tokenizer.main(
            ["--input", str(tmp_path / "missing.txt"), "--vocab-size", "350", "--output", str(tmp_path / "o2")]
        )
        == 2
    )


@pytest.mark.parametrize("content", ["", json.dumps({"txt": "a misspelt key"}) + "\n", "not json\n"])
def test_train_tokenizer_without_texts_is_an_error_and_keeps_the_old_tokenizer(tmp_path, capsys, content):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    (tmp_path / "o").mkdir()
    old = tmp_path / "o" / "tokenizer.json"
    old.write_text("the tokenizer of an earlier run")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(content)
    rc = train_tokenizer.main(["--input", str(corpus), "--vocab-size", "350", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no texts to train on" in err[0] and "nothing written" in err[0], err
    assert old.read_text() == "the tokenizer of an earlier run"


@pytest.mark.parametrize("flag", ["--max-documents", "--max-bytes"])
def test_train_tokenizer_refuses_a_negative_limit(tmp_path, capsys, flag):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["--input", str(corpus), "--vocab-size", "350", "--output", str(tmp_path), flag, "-1"])
    assert e.value.code == 2 and f"{flag}: -1 is negative" in capsys.readouterr().err
    assert not (tmp_path / "tokenizer.json").exists()


def test_train_tokenizer_script_runs_without_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_tokenizer.py"),
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--vocab-size",
            "300",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
