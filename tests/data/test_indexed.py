import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from megatron_dual.data.indexed import (
    CorruptIndexError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    data_file_path,
    index_file_path,
)


def data_documents(seed: int = 0, n: int = 40, high: int = 51200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[1], rng.integers(16, high, size=int(rng.integers(0, 50)))]) for _ in range(n)]
    docs[3] = np.array([1])  # a one-token document
    return docs


def data_write(prefix: str, docs, dtype) -> str:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return prefix


@pytest.fixture(scope="module")
def megatron_indexed():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (make setup installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns that apex / Transformer Engine are absent
        from megatron.core.datasets import indexed_dataset as mid
    return mid


def test_best_dtype():
    assert best_dtype(51200) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(200_000) is np.int32


@pytest.mark.parametrize("dtype,high", [(np.uint16, 51200), (np.int32, 200_000)])
def test_round_trip(tmp_path, dtype, high):
    docs = data_documents(1, high=high)
    prefix = data_write(str(tmp_path / "data_text_document"), docs, dtype)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.dtype is dtype
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert ds[i].dtype == dtype and np.array_equal(ds[i], d)
    assert np.array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    longest = int(np.argmax(ds.sequence_lengths))
    np.testing.assert_array_equal(ds.get(longest, 2, 5), docs[longest][2:7])
    np.testing.assert_array_equal(ds.get(longest, 3), docs[longest][3:])
    with pytest.raises(IndexError):
        ds[len(docs)]
    with pytest.raises(IndexError):
        ds.get(0, 0, len(docs[0]) + 1)
    np.testing.assert_array_equal(ds.read_stream(0, 10), np.concatenate(docs)[:10])
    again = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(again[5], docs[5])


def test_empty_dataset(tmp_path):
    prefix = data_write(str(tmp_path / "e"), [], np.uint16)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and list(ds.document_indices) == [0]


def test_a_directory_in_place_of_a_file_is_named_as_such(tmp_path):
    """It said "file not found", which is false when the path is there as a directory."""
    prefix = data_write(str(tmp_path / "d"), [np.arange(5)], np.uint16)
    os.remove(prefix + ".bin")
    os.mkdir(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"^indexed dataset file .*d\.bin is a directory, not a file$"):
        IndexedDataset(prefix)


def test_writer_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document([1, 70000])
    assert not os.path.exists(tmp_path / "x.idx") and not os.listdir(tmp_path)


def test_interrupted_writer_leaves_no_idx(tmp_path):
    prefix = str(tmp_path / "data_text_document")
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    # an interrupted rewrite keeps the previous complete dataset intact
    data_write(prefix, [[1, 5, 6]], np.uint16)
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 7])
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["data_text_document.bin", "data_text_document.idx"]
    assert IndexedDataset(prefix)[0].tolist() == [1, 5, 6]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 51200), (np.int32, 200_000)])
def test_megatron_reads_ours(tmp_path, megatron_indexed, dtype, high):
    docs = data_documents(2, high=high)
    prefix = data_write(str(tmp_path / "ours"), docs, dtype)
    m = megatron_indexed.IndexedDataset(prefix)
    assert len(m) == len(docs) and m.index.dtype is dtype
    np.testing.assert_array_equal(m.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(m[i], d)
    np.testing.assert_array_equal(m.get(0, 1, 3), docs[0][1:4])


@pytest.mark.parametrize("dtype,high", [(np.uint16, 51200), (np.int32, 200_000)])
def test_megatron_builder_files_are_byte_identical(tmp_path, megatron_indexed, dtype, high):
    docs = data_documents(3, high=high)
    theirs = str(tmp_path / "theirs")
    builder = megatron_indexed.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for d in docs:  # what Megatron's tools/preprocess_data.py does without sentence splitting (it passes a tensor
        builder.add_document(d.astype(np.int64), [len(d)])  # that add_document turns into this same array)
    builder.finalize(theirs + ".idx")
    ours = data_write(str(tmp_path / "ours"), docs, dtype)
    for path in (data_file_path, index_file_path):
        with open(path(theirs), "rb") as a, open(path(ours), "rb") as b:
            assert a.read() == b.read(), path.__name__
    ds = IndexedDataset(theirs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)


def test_reader_accepts_multi_sequence_documents(tmp_path, megatron_indexed):
    prefix = str(tmp_path / "sent")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(np.array([1, 2, 3, 4, 5]), [2, 3])  # one document of two sentences
    builder.add_document(np.array([1, 9]), [2])
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.document_indices.tolist() == [0, 2, 3]
    assert ds[1].tolist() == [3, 4, 5]


# --------------------------------------------------------------------------------------------- corruption


@pytest.fixture
def data_good(tmp_path):
    return data_write(str(tmp_path / "data_text_document"), data_documents(4, n=10), np.uint16)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


_N = 10  # sequences in data_good
_PTR_OFF = 34 + 4 * _N  # byte offset of sequence_pointers in the .idx


def _truncate_by(path: str, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - nbytes)


def _truncate_to(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _pointer_gap(idx: str) -> None:
    with open(idx, "rb") as f:
        f.seek(_PTR_OFF + 8 * 5)
        (p,) = struct.unpack("<q", f.read(8))
    _patch(idx, _PTR_OFF + 8 * 5, struct.pack("<q", p + 2))


_CORRUPTIONS = {  # case -> damage done to (idx path, bin path)
    "truncated": lambda idx, bin_: _truncate_by(idx, 8),
    "header_only": lambda idx, bin_: _truncate_to(idx, 20),
    "magic": lambda idx, bin_: _patch(idx, 0, b"XMIDIDX\x00\x00"),
    "version": lambda idx, bin_: _patch(idx, 9, struct.pack("<Q", 2)),
    "dtype": lambda idx, bin_: _patch(idx, 17, struct.pack("<B", 9)),
    "pointers": lambda idx, bin_: _patch(idx, _PTR_OFF + 8 * 5, struct.pack("<q", 0)),
    "pointer_gap": lambda idx, bin_: _pointer_gap(idx),
    "lengths": lambda idx, bin_: _patch(idx, 34 + 4 * 2, struct.pack("<i", -1)),
    "doc_index": lambda idx, bin_: _patch(idx, _PTR_OFF + 8 * _N + 8 * _N, struct.pack("<q", 99)),
    "bin_short": lambda idx, bin_: _truncate_by(bin_, 2),
    "bin_long": lambda idx, bin_: _append(bin_, b"\x00\x00"),
}


def _corrupt_case(prefix: str, case: str) -> None:
    if case not in _CORRUPTIONS:
        raise AssertionError(case)
    _CORRUPTIONS[case](index_file_path(prefix), data_file_path(prefix))


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("truncated", r"data_text_document\.idx: truncated: header says 10 sequences .* file holds \d+ bytes"),
        ("header_only", r"data_text_document\.idx: truncated: the header needs 34 bytes but the file holds 20"),
        ("magic", r"data_text_document\.idx: magic"),
        ("version", r"data_text_document\.idx: version: 2"),
        ("dtype", r"data_text_document\.idx: dtype code: 9"),
        ("pointers", r"data_text_document\.idx: sequence_pointers: not monotonic at sequence 5"),
        ("pointer_gap", r"data_text_document\.idx: sequence_pointers: sequence 5 starts at byte"),
        ("lengths", r"data_text_document\.idx: sequence_lengths: sequence 2 has negative length"),
        ("doc_index", r"data_text_document\.idx: document_indices: last entry is 99"),
        ("bin_short", r"data_text_document\.bin: truncated: the index says \d+ tokens"),
        ("bin_long", r"data_text_document\.bin: size: the index says"),
    ],
)
def test_corruption_named(data_good, case, pattern):
    _corrupt_case(data_good, case)
    with pytest.raises(CorruptIndexError, match=pattern) as info:
        IndexedDataset(data_good)
    assert isinstance(info.value, ValueError)


def test_missing_files_named(tmp_path, data_good):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))
    os.unlink(data_file_path(data_good))
    with pytest.raises(FileNotFoundError, match="data_text_document.bin"):
        IndexedDataset(data_good)
