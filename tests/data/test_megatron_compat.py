"""Megatron-Core interop beyond the basics in test_indexed.py: its reader on our preprocess/merge/partition outputs,
and our merge against its builder's add_index, byte for byte."""

import json
import warnings

import numpy as np
import pytest

from megatron_dual.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_datasets
from megatron_dual.data.preprocess import preprocess
from megatron_dual.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def mid():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (make setup installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns that apex / Transformer Engine are absent
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_megatron_reads_preprocess_outputs(tmp_path, mid):
    texts = [f"Document {i}: " + "words and more words. " * (i % 5) for i in range(25)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "p"), "ltg", partitions=2, append_eod=True, log_interval=0)
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "w"), "ltg", append_eod=True, log_interval=0)
    tok = load_tokenizer("ltg")
    m = mid.IndexedDataset(str(tmp_path / "w_text_document"))
    assert len(m) == 25 and m.index.dtype is np.uint16
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(m[i], tok.encode(t) + [2])
    for k in range(2):
        shard = mid.IndexedDataset(str(tmp_path / f"p_text_document_{k:03d}"))
        for j, i in enumerate(range(k, 25, 2)):
            np.testing.assert_array_equal(shard[j], tok.encode(texts[i]) + [2])


@pytest.mark.parametrize("dtype,high", [(np.uint16, 51200), (np.int32, 300_000)])
def test_merge_is_byte_identical_to_megatron_add_index(tmp_path, mid, dtype, high):
    rng = np.random.default_rng(0)
    prefixes = []
    for p in range(3):
        prefix = str(tmp_path / f"in{p}")
        with IndexedDatasetWriter(prefix, dtype) as w:
            for _ in range(int(rng.integers(1, 30))):
                w.add_document(np.concatenate([[1], rng.integers(16, high, size=int(rng.integers(0, 40)))]))
        prefixes.append(prefix)
    theirs = str(tmp_path / "theirs")
    builder = mid.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(theirs + ".idx")
    ours = str(tmp_path / "ours")
    merge_datasets(prefixes, ours, chunk_sequences=7)  # small chunks: the streaming path crosses chunk edges
    for ext in (".bin", ".idx"):
        with open(theirs + ext, "rb") as a, open(ours + ext, "rb") as b:
            assert a.read() == b.read(), ext
    merged = IndexedDataset(ours)
    flat = [IndexedDataset(p)[i].tolist() for p in prefixes for i in range(len(IndexedDataset(p)))]
    assert [merged[i].tolist() for i in range(len(merged))] == flat


def test_merge_keeps_multi_sequence_documents_and_refuses_mixed_dtypes(tmp_path, mid):
    a = str(tmp_path / "sent")
    builder = mid.IndexedDatasetBuilder(a + ".bin", dtype=np.uint16)
    builder.add_document(np.array([1, 20, 21, 22]), [2, 2])  # one document of two sentences
    builder.add_document(np.array([1, 30]), [2])
    builder.finalize(a + ".idx")
    merge_datasets([a, a], str(tmp_path / "m"))
    m = IndexedDataset(str(tmp_path / "m"))
    assert m.document_indices.tolist() == [0, 2, 3, 5, 6] and len(m) == 6
    assert mid.IndexedDataset(str(tmp_path / "m")).document_indices.tolist() == [0, 2, 3, 5, 6]
    b = str(tmp_path / "wide")
    with IndexedDatasetWriter(b, np.int32) as w:
        w.add_document([1, 2, 3])
    with pytest.raises(ValueError, match="wide: dtype int32 differs from .*sent's uint16"):
        merge_datasets([a, b], str(tmp_path / "x"))
    assert not (tmp_path / "x.idx").exists()
