"""Preprocessing (``megatron_dual/data/preprocess.py``, ``tools/preprocess_data.py``): end to end on a .jsonl with
every defect at a known line, workers byte-identical, every input format and compression round-trips, bad input is
skipped or stops with its location, partitions/merge/inspect tools, the fast ltg encoder equals the library's
encode."""

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dual.data.encoders import HFEncoder, LtgFastEncoder, load_encoder
from megatron_dual.data.indexed import IndexedDataset, merge_datasets
from megatron_dual.data.preprocess import expand_inputs, preprocess
from megatron_dual.data.tokenizer import LTG_TOKENIZER_PATH, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import inspect_dataset  # noqa: E402
import merge_datasets as merge_tool  # noqa: E402
import preprocess_data  # noqa: E402

sys.path.pop(0)

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Line one\nline two  \n\n  indented line three",
    "Ünïcödé: café, naïve, 東京, e\u0301, emoji \U0001f600, tabs\tand\u00a0nbsp",
    "Numbers 1234.56 and $x, 3rd; ٣٤ ² — dashes – quotes “like” this",
    "a literal <s> and <mask> and </s> stay text",
    "x" * 3000 + " long word",
]


@pytest.fixture(scope="module")
def ltg():
    return load_tokenizer("ltg")


def _zstd():
    # a dependency of the package, but absent where the checkout runs from PYTHONPATH on a bare image (make image-check)
    return pytest.importorskip("zstandard")


def _compress(raw: bytes, comp: str) -> bytes:
    if comp == "gz":
        return gzip.compress(raw)
    if comp == "zst":
        return _zstd().ZstdCompressor().compress(raw)
    return raw


def _check(prefix: str, texts: list[str], ltg) -> None:
    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts)
    for i, t in enumerate(texts):
        assert ds[i].tolist() == ltg.encode(t, add_bos=True)


@pytest.mark.parametrize("comp", ["", "gz", "zst"])
@pytest.mark.parametrize("fmt", ["jsonl", "txt-file", "txt-blank", "parquet"])
def test_round_trip_every_format_and_compression(tmp_path, ltg, fmt, comp):
    ext = "." + comp if comp else ""
    if fmt == "jsonl":
        raw = "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(DOCS)).encode()
        (tmp_path / f"a.jsonl{ext}").write_bytes(_compress(raw, comp))
        inputs, texts, mode = [str(tmp_path / f"a.jsonl{ext}")], DOCS, "file"
    elif fmt == "txt-file":
        for i, d in enumerate(DOCS):
            (tmp_path / f"d{i}.txt{ext}").write_bytes(_compress(d.encode(), comp))
        inputs, texts, mode = [str(tmp_path / f"d{i}.txt{ext}") for i in range(len(DOCS))], DOCS, "file"
    elif fmt == "txt-blank":
        blocks = ["first block\nstill first", "second block", "third\nblock\nhere"]
        (tmp_path / f"b.txt{ext}").write_bytes(_compress(("\n\n\n".join(blocks) + "\n").encode(), comp))
        inputs, mode = [str(tmp_path / f"b.txt{ext}")], "blank-line"
        texts = ["first block\nstill first\n", "second block\n", "third\nblock\nhere\n"]
    else:
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), buf, row_group_size=2)
        (tmp_path / f"p.parquet{ext}").write_bytes(_compress(buf.getvalue(), comp))
        inputs, texts, mode = [str(tmp_path / f"p.parquet{ext}")], DOCS, "file"
    s = preprocess(inputs, str(tmp_path / "o"), "ltg", txt_mode=mode, log_interval=0)
    assert s["skipped"] == [] and s["documents"] == len(texts)
    _check(str(tmp_path / "o_text_document"), texts, ltg)


def test_directories_globs_and_workers_identical(tmp_path, ltg):
    d = tmp_path / "corpus" / "sub"
    d.mkdir(parents=True)
    for k in range(3):
        raw = "".join(json.dumps({"text": f"{DOCS[i % len(DOCS)]} shard {k} doc {i}"}) + "\n" for i in range(400))
        (d / f"part{k}.jsonl.zst").write_bytes(_compress(raw.encode(), "zst"))
    (d / "notes.md").write_text("ignored: not an input type")
    files = expand_inputs([str(tmp_path / "corpus")])
    assert [Path(f).name for f in files] == ["part0.jsonl.zst", "part1.jsonl.zst", "part2.jsonl.zst"]
    assert expand_inputs([str(d / "part*.jsonl.zst")]) == files
    one = preprocess([str(tmp_path / "corpus")], str(tmp_path / "w1"), "ltg", log_interval=0, append_eod=True)
    two = preprocess([str(d / "*.zst")], str(tmp_path / "w2"), "ltg", log_interval=0, append_eod=True, workers=2)
    assert one["documents"] == two["documents"] == 1200
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1_text_document{ext}").read_bytes() == (tmp_path / f"w2_text_document{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "w1_text_document"))
    assert ds[5].tolist() == ltg.encode(f"{DOCS[5]} shard 0 doc 5") + [2]


def test_bos_eos_options_and_smallest_dtype(tmp_path, ltg):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    plain = ltg.encode(DOCS[0], add_bos=False)
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "n"), "ltg", add_bos=False, log_interval=0)
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert ds[0].tolist() == plain and ds.dtype is np.uint16
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "e"), "ltg", append_eod=True, log_interval=0)
    assert IndexedDataset(str(tmp_path / "e_text_document"))[0].tolist() == [1] + plain + [2]


def test_sentencepiece_and_generic_hf_tokenizers(tmp_path):
    import sentencepiece as spm
    import tokenizers

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(DOCS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=120, model_type="bpe", minloglevel=2
    )
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:4]))
    s = preprocess(
        [str(tmp_path / "a.jsonl")], str(tmp_path / "sp"), str(tmp_path / "sp.model"), append_eod=True, log_interval=0
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ds = IndexedDataset(str(tmp_path / "sp_text_document"))
    assert s["encoder"] == "sentencepiece" and ds.dtype is np.uint16
    for i, d in enumerate(DOCS[:4]):
        assert ds[i].tolist() == [sp.bos_id()] + sp.encode(d) + [sp.eos_id()]

    # a plain HF tokenizer.json without the ltg layout: no fast path, no BOS -> an error naming --no-bos
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "the": 1, "fox": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "wl.json"))
    with pytest.raises(ValueError, match="no BOS.*--no-bos"):
        preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "wl"), str(tmp_path / "wl.json"), log_interval=0)
    s = preprocess(
        [str(tmp_path / "a.jsonl")], str(tmp_path / "wl"), str(tmp_path / "wl.json"), add_bos=False, log_interval=0
    )
    assert s["encoder"] == "hf" and s["dtype"] == "uint16"
    assert IndexedDataset(str(tmp_path / "wl_text_document"))[1].tolist() == tok.encode(DOCS[1]).ids


def test_fast_ltg_encoder_equals_library_encode():
    fast, ref = load_encoder("ltg"), HFEncoder(LTG_TOKENIZER_PATH, "ltg")
    assert isinstance(fast, LtgFastEncoder)
    weird = [
        "a\x1cb\x1fc\x85d\xa0e\u3000f\u200bg\u2028h\u2029i\tj\r\nk\r\rl\v m\f n",
        "  lead  trail  \n\n  x \n",
        "",
        " ",
        "\n",
        "ǅemal ǈ Ⅻ ⅻ ᾈ",
        "tab\t\tx  \t y\u00ad-z",
        "a\u0300\u0300b " * 3,
        "\ud7ff\ue000\uffff",
        "ΑΒΓ αβγ ΣΑΣ ß ẞ",
        "don't  stop!!!  ...\n\n\n--\r\n",
        "12345678901234567890",
    ] + DOCS
    assert [list(x) for x in fast.encode_many(weird)] == [list(x) for x in ref.encode_many(weird)]
    # the piece cache serves repeats identically
    assert [list(x) for x in fast.encode_many(weird)] == [list(x) for x in ref.encode_many(weird)]


# ---------------------------------------------------------------------------------------------------- bad input
def _bad_corpus(tmp_path: Path) -> tuple[list[str], list[tuple[str, int, str]]]:
    good = [json.dumps({"text": t}) for t in DOCS[:3]]
    j = tmp_path / "a.jsonl"
    j.write_bytes(
        "\n".join(
            [good[0], '{"text": "unterminated', json.dumps({"other": "x"}), json.dumps({"text": " "}), good[1]]
        ).encode()
        + b"\n"
        + b'{"text": "caf\xe9"}\n'
        + good[2].encode()
        + b"\n"
    )
    raw = "".join(json.dumps({"text": f"doc {i} {DOCS[0]}"}) + "\n" for i in range(3000)).encode()
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(raw)[:4000])  # truncated mid-stream
    zs = tmp_path / "c.jsonl.zst"
    zs.write_bytes(_zstd().ZstdCompressor().compress(raw)[:3000])
    empty = tmp_path / "d.txt"
    empty.write_text("  \n")
    expected = [
        (str(j), 2, "invalid JSON"),
        (str(j), 3, "missing key 'text'"),
        (str(j), 4, "empty text in key 'text'"),
        (str(j), 6, "not valid UTF-8"),
        (str(gz), None, "truncated .gz stream"),
        (str(zs), None, "truncated .zst stream"),
        (str(empty), 1, "empty file"),
    ]
    return [str(j), str(gz), str(zs), str(empty)], expected


def test_bad_input_skipped_and_counted_with_location(tmp_path, capsys):
    inputs, expected = _bad_corpus(tmp_path)
    s = preprocess(inputs, str(tmp_path / "o"), "ltg", log_interval=0)
    got = [(f, line, r.split(" (")[0]) for f, line, r in s["skipped"]]
    assert [(f, r) for f, _, r in got] == [(f, r) for f, _, r in expected]
    assert [g[1] for g, e in zip(got, expected, strict=True) if e[1] is not None] == [2, 3, 4, 6, 1]
    trunc_line = got[4][1]
    assert trunc_line > 1  # the lines before the truncation point were kept
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == s["documents"] == 3 + (trunc_line - 1) + (got[5][1] - 1)
    assert s["skipped_total"] == 7 and s["skipped_by_reason"]["truncated .gz stream"] == 1
    rc = preprocess_data.main(["--input", *inputs, "--output-prefix", str(tmp_path / "t"), "--log-interval", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped: 7" in out and f"invalid JSON: 1 (first at {inputs[0]}:2)" in out
    assert f"truncated .gz stream: 1 (first at {inputs[1]}:{trunc_line})" in out


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_strict_stops_at_first_bad_with_location(tmp_path, which):
    inputs, expected = _bad_corpus(tmp_path)
    f, line, reason = expected[0] if which == 0 else [e for e in expected if e[0] == inputs[which]][0]
    loc = f"{f}:{line}" if line is not None else f"{f}:\\d+"
    with pytest.raises(ValueError, match=f"{loc}: {reason}"):
        preprocess([inputs[which]], str(tmp_path / "s"), "ltg", strict=True, log_interval=0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("s_")]  # no .idx, no .bin, no temporaries


def test_interrupted_run_leaves_no_idx(tmp_path, monkeypatch):
    import megatron_dual.data.preprocess as pp

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)))
    calls = {"n": 0}
    real = pp._encode_batch

    def boom(items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(items)

    monkeypatch.setattr(pp, "_encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), "ltg", log_interval=0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o_")]


def test_progress_shows_rate_and_eta(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    buf = io.StringIO()
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), "ltg", log_interval=20, log_stream=buf)
    last = buf.getvalue().strip().splitlines()[-1]
    assert "processed 50 documents" in last and "MB/s" in last and "tok/s" in last and "100.0% ETA 0:00" in last


# ------------------------------------------------------------------------------------ partitions, merge, inspect
def test_partitions_merge_and_inspect(tmp_path, ltg, capsys):
    texts = [f"{DOCS[i % 4]} number {i}" for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    s = preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "p"), "ltg", partitions=3, log_interval=0)
    shards = s["per_key"]["text"]["prefixes"]
    assert [Path(p).name for p in shards] == [f"p_text_document_{k:03d}" for k in range(3)]
    for k, prefix in enumerate(shards):
        _check(prefix, texts[k::3], ltg)
    rc = merge_tool.main(["--input", str(tmp_path / "p_text_document_*"), "--output-prefix", str(tmp_path / "m")])
    assert rc == 0
    merged = IndexedDataset(str(tmp_path / "m"))
    order = [t for k in range(3) for t in texts[k::3]]
    _check(str(tmp_path / "m"), order, ltg)
    assert merged.num_tokens == s["tokens"]
    # merging the whole-corpus output with itself equals writing it twice
    (tmp_path / "b.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes())
    preprocess([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "twice"), "ltg", log_interval=0)
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "once"), "ltg", log_interval=0)
    merge_datasets([str(tmp_path / "once_text_document")] * 2, str(tmp_path / "mm"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mm{ext}").read_bytes() == (tmp_path / f"twice_text_document{ext}").read_bytes()

    rc = inspect_dataset.main([str(tmp_path / "m"), "--tokenizer", "ltg", "--doc", "1", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "magic b'MMIDIDX\\x00\\x00' version 1 dtype code 8 (uint16)" in out
    assert "sequences 10  documents 10" in out and f"tokens {s['tokens']:,}" in out
    assert f"<s> {order[1]}" in out and "'<s>': 10 (" in out  # <s> opens every document
    (tmp_path / "m.idx").write_bytes((tmp_path / "m.idx").read_bytes()[:-8])
    assert inspect_dataset.main([str(tmp_path / "m")]) == 2
    assert "m.idx" in capsys.readouterr().err


def test_train_tokenizer_streams_compressed_inputs(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    raw = "".join(json.dumps({"text": d}) + "\n" for d in DOCS * 30) + "not json\n"
    (tmp_path / "c.jsonl.zst").write_bytes(_compress(raw.encode(), "zst"))
    assert (
        train_tokenizer.main(
            [
                "--input",
                str(tmp_path),
                "--vocab-size",
                "400",
                "--output",
                str(tmp_path / "tok"),
                "--max-documents",
                "100",
            ]
        )
        == 0
    )
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 400 and [tok.id_to_token(i) for i in range(5)] == [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "<mask>",
    ]
    assert isinstance(load_encoder(str(tmp_path / "tok")), LtgFastEncoder)  # trained tokenizers get the fast path


# ---------------------------------------------------------------------------------------- end to end, tool
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.\nThe shells she sells are surely seashells.",
    "Colourless green ideas sleep furiously.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "In the beginning was the Word, and a literal <s> and <mask> stay text.",
    "Ünïcödé wörks töö: café, naïve, 東京.",
]


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


def test_end_to_end_jsonl(tmp_path, data_jsonl, ltg):
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
        assert ids == ltg.encode(text, add_bos=True)
        assert ids[0] == ltg.bos_id and ids.count(ltg.bos_id) == 1
        assert ltg.decode(ids) == text


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


def test_txt_inputs_and_multiple_keys(tmp_path, ltg):
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "empty.txt"
    a.write_text(TEXTS[1] + "\n")
    b.write_text(TEXTS[6])
    empty.write_text("\n\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond \xff line\n")
    s = preprocess([str(a), str(empty), str(b), str(bad)], str(tmp_path / "t"), "ltg", log_interval=0)
    ds = IndexedDataset(str(tmp_path / "t_text_document"))
    assert len(ds) == 2 and ltg.decode(ds[0]) == TEXTS[1] + "\n" and ltg.decode(ds[1]) == TEXTS[6]
    assert [(Path(f).name, line, r.split(" (")[0]) for f, line, r in s["skipped"]] == [
        ("empty.txt", 1, "empty file"),
        ("bad.txt", 2, "not valid UTF-8"),
    ]

    j = tmp_path / "two.jsonl"
    j.write_text(json.dumps({"title": "A title", "text": TEXTS[0]}) + "\n" + json.dumps({"text": TEXTS[2]}) + "\n")
    s = preprocess([str(j)], str(tmp_path / "k"), "ltg", json_keys=["text", "title"], log_interval=0)
    assert s["per_key"]["text"]["documents"] == 2 and s["per_key"]["title"]["documents"] == 1
    assert s["skipped"] == [(str(j), 2, "missing key 'title'")]
    assert ltg.decode(IndexedDataset(str(tmp_path / "k_title_document"))[0]) == "A title"
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
    rc = preprocess_data.main(
        [
            "--input",
            data_jsonl,
            "--output-prefix",
            str(tmp_path / "c"),
            "--tokenizer-model",
            "ltg",
            "--json-keys",
            "text",
            "--log-interval",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "documents: 7" in out and "tokens/doc" in out and "skipped: 6" in out
    assert f"invalid JSON: 1 (first at {data_jsonl}:4)" in out
    assert os.path.exists(tmp_path / "c_text_document.idx")
    rc = preprocess_data.main(["--input", data_jsonl, "--output-prefix", str(tmp_path / "d"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data_jsonl}:4: invalid JSON" in err


def test_tool_script_missing_input_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ issue 15 item 9: no silent 0-document datasets,
# special-token strings inside text, stale temporaries
def _run_tool(capsys, args: list[str]) -> tuple[int, str]:
    rc = preprocess_data.main([*args, "--log-interval", "0"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_input_is_an_error_and_writes_nothing(tmp_path, capsys, content):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(content)
    rc, err = _run_tool(capsys, ["--input", str(src), "--output-prefix", str(tmp_path / "out" / "e")])
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "no documents" in lines[0], err
    assert not list((tmp_path / "out").glob("*"))  # no dataset, no temporaries


def test_output_prefix_under_a_file_is_one_line(tmp_path, capsys):
    src = tmp_path / "c.txt"
    src.write_text("one document\n")
    (tmp_path / "afile").write_text("not a directory\n")
    rc, err = _run_tool(capsys, ["--input", str(src), "--output-prefix", str(tmp_path / "afile" / "x")])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preprocess_data: error: "), err
    assert str(tmp_path / "afile") in lines[0] and "nothing written" in lines[0], err


def test_a_full_disk_with_several_outputs_replaces_none_of_them(tmp_path, capsys, monkeypatch):
    """All outputs are made durable under temporary names before any is renamed: a failure writing the second
    output's index left the one finalized before it in place of its old one, under 'nothing written'."""
    import errno

    from megatron_dual.data.indexed import IndexedDatasetWriter

    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "one document", "title": "a title"}\n')
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "out" / "c"), "--json-keys", "text", "title"]
    assert _run_tool(capsys, args)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    src.write_text('{"text": "another one", "title": "another title"}\n')
    index_bytes = IndexedDatasetWriter._index_bytes

    def full_on_text(self):
        if self.prefix.endswith("text_document"):  # finalized last before: the title was in place
            raise OSError(errno.ENOSPC, "No space left on device", self.prefix + ".idx.tmp-1")
        return index_bytes(self)

    monkeypatch.setattr(IndexedDatasetWriter, "_index_bytes", full_on_text)
    rc, err = _run_tool(capsys, args)
    assert rc == 2 and err.strip() == (
        f"preprocess_data: error: cannot write {tmp_path / 'out' / 'c'}: No space left on device; nothing written"
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # no temporaries either


def test_misspelt_json_key_names_keys_seen_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    out = tmp_path / "out"
    rc, err = _run_tool(capsys, ["--input", str(src), "--output-prefix", str(out / "c"), "--json-keys", "txt"])
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "'txt'" in lines[0] and "'text', 'id'" in lines[0], err  # asked for, and seen
    # one good key and one misspelt: still an error, and neither dataset is written
    rc, err = _run_tool(
        capsys, ["--input", str(src), "--output-prefix", str(out / "c"), "--json-keys", "text", "titel"]
    )
    assert rc != 0 and "'titel'" in err and "'text', 'id'" in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob("*"))  # no dataset, no temporaries
    with pytest.raises(ValueError, match="keys seen in the input: 'text', 'id'"):
        preprocess([str(src)], str(out / "c"), "ltg", json_keys=["txt"], log_interval=0)


SPECIAL_TEXTS = [
    "a literal <s> and <mask> and </s> stay text",
    "regex (?P<s>\\w+) and (?P<pad>x)<pad>",
    "<s></s><s><special_10><special_1>",
    "  <s>  \n\n<unk>é <s",
]


def _library_ids(text: str, mode: str) -> list[int]:
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(LTG_TOKENIZER_PATH)
    tok.encode_special_tokens = mode == "text"  # the library's default (False) maps special strings to ids
    return tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("mode", ["text", "special"])
def test_special_tokens_in_text_both_encoders_match_the_library(mode):
    fast = load_encoder("ltg", special_tokens=mode)
    slow = load_encoder("ltg", fast=False, special_tokens=mode)
    assert isinstance(fast, LtgFastEncoder) and not isinstance(slow, LtgFastEncoder)
    for t in SPECIAL_TEXTS + DOCS:
        want = _library_ids(t, mode)
        assert list(fast.encode_many([t])[0]) == want, t
        assert list(slow.encode_many([t])[0]) == want, t
    special_ids = {0, 1, 2, 3, 4}
    got = set(fast.encode_many([SPECIAL_TEXTS[0]])[0])
    assert (got & special_ids == set()) if mode == "text" else ({1, 2, 4} <= got)


@pytest.mark.parametrize("mode", ["text", "special"])
def test_special_tokens_in_text_preprocess_option(tmp_path, capsys, mode):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in SPECIAL_TEXTS))
    bins = []
    for workers, fast in ((1, True), (2, True), (1, False)):
        prefix = tmp_path / f"s{workers}{fast}"
        args = [
            "--input",
            str(src),
            "--output-prefix",
            str(prefix),
            "--special-tokens-in-text",
            mode,
            "--workers",
            str(workers),
        ] + ([] if fast else ["--slow-tokenizer"])
        rc, _ = _run_tool(capsys, args)
        assert rc == 0
        ds = IndexedDataset(str(prefix) + "_text_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [[1] + _library_ids(t, mode) for t in SPECIAL_TEXTS]
        bins.append(Path(str(prefix) + "_text_document.bin").read_bytes())
    assert bins[0] == bins[1] == bins[2]
    with pytest.raises(ValueError, match="special_tokens"):
        preprocess([str(src)], str(tmp_path / "x"), "ltg", special_tokens="ids", log_interval=0)


def test_special_tokens_text_default_for_any_hf_tokenizer(tmp_path):
    import tokenizers

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<unk>": 0, "a": 2, "<": 3, "s": 4, ">": 5}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated")
    tok.add_special_tokens(["<s>"])
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    s_id = tok.token_to_id("<s>")
    assert load_encoder(path).encode_many(["a<s>a"])[0] == [2, 3, 4, 5, 2]  # text is text
    assert load_encoder(path, special_tokens="special").encode_many(["a<s>a"])[0] == [2, s_id, 2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, capsys, data_jsonl):
    prefix = tmp_path / "r"
    base = str(prefix) + "_text_document"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [Path(f"{base}.bin.tmp-{dead}"), Path(f"{base}.idx.tmp-{dead}")]
        kept = [Path(f"{base}.bin.tmp-{live.pid}"), Path(f"{tmp_path / 'other_text_document'}.bin.tmp-{dead}")]
        for p in stale + kept:
            p.write_bytes(b"x" * 100)
        rc, _ = _run_tool(capsys, ["--input", data_jsonl, "--output-prefix", str(prefix)])
        assert rc == 0
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)  # a live writer's and another prefix's temporaries stay
        assert Path(base + ".idx").exists()
    finally:
        live.kill()
        live.wait()
