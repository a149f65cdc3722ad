import json

import numpy as np
import pytest

from megatron_dual.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_dual.data.packing import PackedDataset
from megatron_dual.data.sampler import ResumableSampler, dataset_fingerprint, epoch_permutation, split_documents


def data_corpus(tmp_path, n: int = 30, seed: int = 0, name: str = "data_text_document") -> tuple[str, list]:
    """Documents starting with <s> = 1; body tokens are unique stream positions + 16, so a slice is identifiable."""
    rng = np.random.default_rng(seed)
    docs, pos = [], 0
    for _ in range(n):
        length = int(rng.integers(1, 25))
        docs.append(np.concatenate([[1], 16 + pos + np.arange(length)]))
        pos += length
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d in docs:
            w.add_document(d)
    return prefix, docs


def _check_samples(packed: PackedDataset, stream: np.ndarray, starts: set[int], seq_len: int) -> None:
    assert len(packed) == (len(stream) - 1) // seq_len
    for i in range(len(packed)):
        s = packed[i]
        assert s["tokens"].dtype == np.int64 and s["doc_ids"].dtype == np.int64
        assert s["tokens"].shape == s["doc_ids"].shape == (seq_len + 1,)
        lo = i * seq_len
        np.testing.assert_array_equal(s["tokens"], stream[lo : lo + seq_len + 1])
        # doc_ids: 0 at the first position, +1 exactly where a document (an <s>) starts
        want = np.cumsum([0] + [1 if lo + k in starts else 0 for k in range(1, seq_len + 1)])
        np.testing.assert_array_equal(s["doc_ids"], want)
        assert np.array_equal(np.flatnonzero(np.diff(s["doc_ids"])) + 1, np.flatnonzero(s["tokens"][1:] == 1) + 1)
        if i + 1 < len(packed):  # overlap by exactly one token
            assert packed[i + 1]["tokens"][0] == s["tokens"][-1]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_all_documents(tmp_path, seq_len):
    prefix, docs = data_corpus(tmp_path)
    ds = IndexedDataset(prefix)
    packed = PackedDataset(ds, seq_len)
    stream = np.concatenate(docs)
    starts = set(np.cumsum([0] + [len(d) for d in docs])[:-1].tolist())
    assert packed.num_tokens == len(stream) == ds.num_tokens
    _check_samples(packed, stream, starts, seq_len)
    assert np.array_equal(packed[-1]["tokens"], packed[len(packed) - 1]["tokens"])
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_packing_document_subset_and_order(tmp_path):
    prefix, docs = data_corpus(tmp_path)
    ds = IndexedDataset(prefix)
    order = np.array([5, 2, 17, 0, 29, 11, 3, 8])
    packed = PackedDataset(ds, 9, order)
    chosen = [docs[k] for k in order]
    stream = np.concatenate(chosen)
    starts = set(np.cumsum([0] + [len(d) for d in chosen])[:-1].tolist())
    assert packed.num_tokens == len(stream)
    _check_samples(packed, stream, starts, 9)


def test_packing_skips_empty_documents_in_doc_ids(tmp_path):
    prefix = str(tmp_path / "data_e")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in ([1, 20, 21], [], [1, 30], [], [], [1, 40, 41, 42]):
            w.add_document(d)
    packed = PackedDataset(IndexedDataset(prefix), 8)
    s = packed[0]
    assert s["tokens"].tolist() == [1, 20, 21, 1, 30, 1, 40, 41, 42]
    assert s["doc_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_packing_too_little_data(tmp_path):
    prefix = str(tmp_path / "data_small")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([1, 5, 6])
    packed = PackedDataset(IndexedDataset(prefix), 8)
    assert len(packed) == 0 and packed.num_tokens == 3
    assert len(PackedDataset(IndexedDataset(prefix), 2)) == 1
    with pytest.raises(IndexError, match="document 7"):
        PackedDataset(IndexedDataset(prefix), 2, np.array([0, 7]))


# ------------------------------------------------------------------------------------------------ sampler


def test_split_documents_deterministic_and_disjoint():
    train, valid = split_documents(100, 0.1, seed=3)
    assert len(valid) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(valid.tolist()) and set(train.tolist()) | set(valid.tolist()) == set(
        range(100)
    )
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)
    t2, v2 = split_documents(100, 0.1, seed=3)
    assert np.array_equal(train, t2) and np.array_equal(valid, v2)
    assert not np.array_equal(valid, split_documents(100, 0.1, seed=4)[1])
    assert len(split_documents(5, 0.01, seed=0)[1]) == 1  # at least one when fraction > 0
    t, v = split_documents(5, 0.0, seed=0)
    assert len(v) == 0 and t.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no training documents"):
        split_documents(1, 0.5, seed=0)
    with pytest.raises(ValueError, match="valid_fraction"):
        split_documents(10, 1.0, seed=0)


def test_epoch_permutation_is_pure():
    a = epoch_permutation(50, seed=7, epoch=2)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_permutation(50, seed=7, epoch=2))
    assert not np.array_equal(a, epoch_permutation(50, seed=7, epoch=3))
    assert not np.array_equal(a, epoch_permutation(50, seed=8, epoch=2))


def test_next_indices_across_epochs():
    s = ResumableSampler(10, seed=1, fingerprint="f")
    first = s.next_indices(7)
    assert s.epoch == 0 and first == epoch_permutation(10, 1, 0)[:7].tolist()
    cross = s.next_indices(6)
    assert cross == epoch_permutation(10, 1, 0)[7:].tolist() + epoch_permutation(10, 1, 1)[:3].tolist()
    assert s.epoch == 1 and s.consumed_samples == 13
    big = s.next_indices(25)  # spans several epochs in one call
    expect = np.concatenate([epoch_permutation(10, 1, e) for e in range(5)])[13:38].tolist()
    assert big == expect and s.index_at(13) == expect[0]
    ordered = ResumableSampler(4, seed=1, fingerprint="f", shuffle=False)
    assert ordered.next_indices(6) == [0, 1, 2, 3, 0, 1]


def test_resume_gives_identical_continuation():
    run = ResumableSampler(17, seed=5, fingerprint="abc")
    straight = [run.next_indices(4) for _ in range(12)]
    first = ResumableSampler(17, seed=5, fingerprint="abc")
    part = [first.next_indices(4) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON
    assert state == {
        "seed": 5,
        "consumed_samples": 20,
        "fingerprint": "abc",
        "num_samples": 17,
        "shuffle": True,
        "packing": "concat",
    }
    resumed = ResumableSampler(17, seed=5, fingerprint="abc")
    resumed.load_state_dict(state)
    assert part + [resumed.next_indices(4) for _ in range(7)] == straight


def test_fingerprint_mismatch_is_named(tmp_path):
    prefix, _ = data_corpus(tmp_path)
    other, _ = data_corpus(tmp_path, seed=1, name="data_other")
    ds, ds2 = IndexedDataset(prefix), IndexedDataset(other)
    docs = np.arange(len(ds))
    fp = dataset_fingerprint(ds, 16, docs)
    assert fp == dataset_fingerprint(IndexedDataset(prefix), 16, docs) and len(fp) == 64
    assert fp != dataset_fingerprint(ds, 32, docs)
    assert fp != dataset_fingerprint(ds, 16, docs[:-1])
    assert fp != dataset_fingerprint(ds2, 16, np.arange(len(ds2)))
    saved = ResumableSampler(10, seed=0, fingerprint=fp)
    saved.next_indices(3)
    other_fp = dataset_fingerprint(ds2, 16, np.arange(len(ds2)))
    with pytest.raises(ValueError, match=f"different dataset.*{fp}.*{other_fp}"):
        ResumableSampler(10, seed=0, fingerprint=other_fp).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="num_samples 10 in the checkpoint vs 11 now"):
        ResumableSampler(11, seed=0, fingerprint=fp).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="seed 0 in the checkpoint vs 9 now"):
        ResumableSampler(10, seed=9, fingerprint=fp).load_state_dict(saved.state_dict())


def test_fingerprint_sees_token_changes(tmp_path):
    """Same lengths, different tokens at the start of a document: the sampled token reads catch it."""
    a, b = str(tmp_path / "data_a"), str(tmp_path / "data_b")
    for prefix, tok in ((a, 20), (b, 21)):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, tok, 30])
            w.add_document([1, 40])
    docs = np.arange(2)
    assert dataset_fingerprint(IndexedDataset(a), 4, docs) != dataset_fingerprint(IndexedDataset(b), 4, docs)
