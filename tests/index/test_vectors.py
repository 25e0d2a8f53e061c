"""VectorIndex: exact and IVF search, incremental updates and the on-disk cache format."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from vector_sets import DIM, brute_force, catalog_ids, clustered, recall

from cnclip.errors import CNClipError, ModelMismatchError
from cnclip.index.vectors import ANN_KIND, INDEX_FILE, META_FILE, Selection, VectorIndex, filtered_nprobe


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 20_000
    return catalog_ids(n), clustered(n), clustered(100, stream=1)


@pytest.fixture(scope="module")
def ann(data) -> VectorIndex:
    ids, vectors, _ = data
    return VectorIndex.build(ids, vectors, exact_threshold=1_000)


# -- exact ------------------------------------------------------------------------------------


def test_exact_matches_brute_force(data):
    ids, vectors, queries = data
    ids, vectors = ids[:3000], vectors[:3000]
    index = VectorIndex.build(ids, vectors)
    assert index.kind == "exact" and index.recall_at_10 is None
    assert (index.dim, index.ntotal) == (DIM, 3000)
    scores, found = index.search(queries, 10)
    want_scores, want_ids = brute_force(ids, vectors, queries, 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # One query at a time (the single-threaded path) gives the same answer.
    s1, i1 = index.search(queries[0], 10)
    np.testing.assert_array_equal(i1[0], want_ids[0])


def test_arbitrary_ids_round_trip():
    ids = np.array([2**62, -5, 0, 123456789012345], dtype=np.int64)
    vectors = np.eye(4, DIM, dtype=np.float32)
    index = VectorIndex.build(ids, vectors)
    _, found = index.search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], ids)


def test_k_larger_than_ntotal_is_trimmed(data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:7], vectors[:7])
    scores, found = index.search(queries[:3], 50)
    assert scores.shape == found.shape == (3, 7)
    assert (found >= -(2**40)).all() and set(found[0]) == set(ids[:7])
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_empty_index():
    index = VectorIndex.build(np.empty(0, np.int64), np.empty((0, DIM), np.float32))
    scores, found = index.search(np.ones((2, DIM), np.float32), 10)
    assert scores.shape == found.shape == (2, 0)
    assert VectorIndex.empty(DIM).search(np.ones((1, DIM), np.float32), 5)[1].shape == (1, 0)
    # Too few vectors to train IVF cells: an exact index, whatever kind was asked for.
    tiny = VectorIndex.build(np.arange(20), clustered(20), kind="ivf-flat")
    assert tiny.kind == "exact" and tiny.ntotal == 20


def test_bad_input_raises_cnclip_errors(data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:100], vectors[:100])
    with pytest.raises(ModelMismatchError):
        index.search(np.ones((1, DIM + 1), np.float32), 5)
    with pytest.raises(CNClipError):
        VectorIndex.build(ids[:10], vectors[:9])
    with pytest.raises(CNClipError):
        VectorIndex.build(np.zeros(3, np.int64), vectors[:3])  # duplicate ids
    with pytest.raises(CNClipError):
        VectorIndex.build(ids[:3], np.full((3, DIM), np.nan, np.float32))
    with pytest.raises(CNClipError):
        VectorIndex.build(ids[:3], vectors[:3], kind="annoy")


# -- ANN --------------------------------------------------------------------------------------


def test_ann_build_reaches_recall_and_records_it(data, ann):
    ids, vectors, queries = data
    assert ann.kind == ANN_KIND
    assert ann.recall_at_10 is not None and ann.recall_at_10 >= 0.95
    assert ann.params["nprobe"] >= 1 and ann.params["nlist"] > 1
    _, found = ann.search(queries, 10)
    _, truth = brute_force(ids, vectors, queries, 10)
    assert recall(found, truth) >= 0.9  # held-out queries, not the build-time sample
    assert ann.info()["recall_at_10"] == ann.recall_at_10


def test_ann_raises_nprobe_until_target(data):
    ids, vectors, _ = data
    # An unreachable target makes the build widen nprobe as far as it may, then record it.
    index = VectorIndex.build(ids[:5000], vectors[:5000], kind="ivf-flat", target_recall=1.01)
    assert index.params["nprobe"] > 8 and index.recall_at_10 is not None


def test_ann_rows_are_never_padded(data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:2000], vectors[:2000], kind="ivf-flat")
    # k far above what nprobe cells hold: rows are refilled from all cells, never -1.
    scores, found = index.search(queries[:5], 1500)
    assert found.shape == (5, 1500) and (found != -1).all()
    assert all(len(set(row)) == 1500 for row in found.tolist())


@pytest.mark.parametrize(
    ("share", "cells"), [(1.0, 8), (0.5, 16), (0.3, 27), (0.25, 32), (0.01, 256), (1e-6, 256), (0.0, 256)]
)
def test_a_filter_visits_nprobe_over_the_share_it_selects(share, cells):
    """As many selected vectors in the visited cells as an unfiltered search meets, up to all cells."""
    assert filtered_nprobe(8, share, 256) == cells


def test_filtered_ivf_search_keeps_the_recall_of_unfiltered_search(data):
    """With a fifth selected, the cells an unfiltered search visits mostly hold enough selected
    vectors to fill a top 10, so few rows come back short and are searched again over every
    cell: visiting 5x as many cells is what keeps the recall."""
    _, vectors, queries = data
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64) * 1009  # positive, like catalog ids: -1 pads a row
    index = VectorIndex.build(ids, vectors, kind="ivf-flat")
    _, truth = brute_force(ids, vectors, queries, 10)
    unfiltered = recall(index.search(queries, 10)[1], truth)
    chosen = np.random.default_rng(4).random(len(ids)) < 0.2
    _, truth = brute_force(ids[chosen], vectors[chosen], queries, 10)
    _, found = index.search_within(queries, 10, Selection(ids[chosen]))
    assert np.isin(found, ids[chosen]).all()
    assert recall(found, truth) >= unfiltered - 0.005, (recall(found, truth), unfiltered)


def test_ivf_sq8_kind(data):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:5000], vectors[:5000], kind="ivf-sq8")
    assert index.kind == "ivf-sq8" and index.recall_at_10 >= 0.9


def test_build_streaming_equals_build(data, ann, tmp_path):
    ids, vectors, queries = data
    chunks = ((ids[s : s + 3000], vectors[s : s + 3000]) for s in range(0, len(ids), 3000))
    streamed = VectorIndex.build_streaming(chunks, len(ids), DIM, exact_threshold=1_000, spool_dir=tmp_path)
    assert streamed.kind == ann.kind and streamed.params["nprobe"] == ann.params["nprobe"]
    assert streamed.recall_at_10 == ann.recall_at_10
    s1, i1 = ann.search(queries, 10)
    s2, i2 = streamed.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)
    assert list(tmp_path.iterdir()) == []  # spool removed

    exact_chunks = ((ids[s : min(s + 700, 2000)], vectors[s : min(s + 700, 2000)]) for s in range(0, 2000, 700))
    exact = VectorIndex.build_streaming(exact_chunks, 2000, DIM)
    built = VectorIndex.build(ids[:2000], vectors[:2000])
    np.testing.assert_array_equal(exact.search(queries, 5)[1], built.search(queries, 5)[1])

    with pytest.raises(CNClipError):
        VectorIndex.build_streaming(iter([(ids[:10], vectors[:10])]), 5, DIM, kind="ivf-flat", spool_dir=tmp_path)
    with pytest.raises(CNClipError):
        VectorIndex.build_streaming(iter([(ids[:10], vectors[:10])]), 5, DIM)


@pytest.mark.parametrize("kind", ["exact", "ivf-flat"])
def test_add_then_search_finds_new_ids(data, kind):
    ids, vectors, _ = data
    index = VectorIndex.build(ids[:5000], vectors[:5000], kind=kind)
    new_ids, new_vectors = ids[5000:5100], vectors[5000:5100]
    index.add(new_ids, new_vectors)
    assert index.ntotal == 5100
    _, found = index.search(new_vectors, 1)
    np.testing.assert_array_equal(found[:, 0], new_ids)
    # Re-adding an id replaces its vector instead of duplicating it.
    index.add(new_ids[:1], vectors[:1])
    assert index.ntotal == 5100
    _, found = index.search(new_vectors[:1], 10)
    assert new_ids[0] not in found[0][:1]


@pytest.mark.parametrize("kind", ["exact", "ivf-flat"])
def test_remove_then_search_never_returns_removed(data, kind):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:5000], vectors[:5000], kind=kind)
    _, before = index.search(queries, 20)
    gone = np.unique(before[:, :5])
    index.remove(np.concatenate([gone, [12345]]))  # an unknown id is ignored
    assert index.ntotal == 5000 - gone.size
    _, after = index.search(np.concatenate([queries, vectors[:200]]), 50)
    assert not np.isin(after, gone).any()


# -- persistence ------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(data, ann, tmp_path, mmap):
    _, _, queries = data
    ann.meta["generation"] = 7
    ann.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_FILE, META_FILE]  # no tmp files
    saved = json.loads((tmp_path / META_FILE).read_text())
    assert saved["kind"] == ann.kind and saved["meta"] == {"generation": 7}
    assert saved["recall_at_10"] == ann.recall_at_10 and saved["params"]["nprobe"] == ann.params["nprobe"]

    loaded = VectorIndex.load(tmp_path, mmap=mmap)
    assert loaded is not None
    assert (loaded.kind, loaded.dim, loaded.ntotal) == (ann.kind, ann.dim, ann.ntotal)
    assert loaded.meta == {"generation": 7} and loaded.recall_at_10 == ann.recall_at_10
    assert loaded.params == ann.params
    for a, b in zip(ann.search(queries, 10), loaded.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mmapped_index_can_be_modified_and_resaved(data, tmp_path):
    ids, vectors, queries = data
    for kind in ("exact", "ivf-flat"):
        folder = tmp_path / kind
        VectorIndex.build(ids[:3000], vectors[:3000], kind=kind).save(folder)
        loaded = VectorIndex.load(folder)
        assert loaded is not None and loaded.info()["memory_mapped"]
        loaded.remove(ids[:10])
        loaded.add(ids[3000:3010], vectors[3000:3010])
        assert loaded.ntotal == 3000 and not loaded.info()["memory_mapped"]
        loaded.save(folder)  # over the file it was mapped from
        again = VectorIndex.load(folder)
        assert again is not None and again.ntotal == 3000
        np.testing.assert_array_equal(again.search(queries, 5)[1], loaded.search(queries, 5)[1])
        # A mapped index whose file was replaced meanwhile still copies its own contents.
        VectorIndex.build(ids[:100], vectors[:100], kind=kind).save(folder)
        again.remove(ids[10:20])
        loaded.remove(ids[10:20])
        assert again.ntotal == 2990
        np.testing.assert_array_equal(again.search(queries, 5)[1], loaded.search(queries, 5)[1])


def test_interrupted_save_keeps_the_old_files_and_no_tmp(data, tmp_path, monkeypatch):
    ids, vectors, queries = data
    index = VectorIndex.build(ids[:500], vectors[:500])
    index.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    from cnclip.index.vectors import faiss_io as module

    def crash(*args, **kwargs):
        # what faiss raises on a full disk: a RuntimeError carrying a C++ backtrace
        raise RuntimeError("Error: 'ret == (size_t)(1)' failed: write error\nC++ backtrace ...")

    monkeypatch.setattr(module.faiss, "write_index", crash)
    index.add(ids[500:510], vectors[500:510])
    with pytest.raises(CNClipError, match="cannot write the vector index .*write error; check free disk") as e:
        index.save(tmp_path)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    loaded = VectorIndex.load(tmp_path)
    assert loaded is not None and loaded.ntotal == 500


def test_load_missing_returns_none(tmp_path):
    assert VectorIndex.load(tmp_path) is None
    assert VectorIndex.load(tmp_path / "nope") is None


def test_load_corrupt_returns_none_with_warning(data, tmp_path, caplog):
    ids, vectors, _ = data
    index = VectorIndex.build(ids[:500], vectors[:500])
    caplog.set_level(logging.WARNING, logger="cnclip.index.vectors")

    index.save(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(b"not a faiss index")
    assert VectorIndex.load(tmp_path) is None
    assert "rebuilt" in caplog.text

    # Same size and mtime as the saved file but garbage content: faiss itself must reject it.
    index.save(tmp_path)
    path = tmp_path / INDEX_FILE
    st = path.stat()
    path.write_bytes(b"\x07" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert VectorIndex.load(tmp_path) is None

    index.save(tmp_path)
    (tmp_path / META_FILE).write_text("{ truncated")
    assert VectorIndex.load(tmp_path) is None

    index.save(tmp_path)
    (tmp_path / META_FILE).unlink()
    assert VectorIndex.load(tmp_path) is None


def test_save_rejects_unserialisable_meta_without_writing(data, tmp_path):
    ids, vectors, _ = data
    index = VectorIndex.build(ids[:10], vectors[:10])
    index.meta["bad"] = object()
    with pytest.raises(CNClipError):
        index.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_needs_rebuild(data):
    ids, vectors, _ = data
    index = VectorIndex.build(ids[:100], vectors[:100])
    assert not index.needs_rebuild(exact_threshold=1000)
    index.add(ids[100:2000], vectors[100:2000])
    assert index.needs_rebuild(exact_threshold=1000)
    assert not index.needs_rebuild(exact_threshold=1000, ntotal=100)


def test_ids_of_both_kinds_after_updates(data, tmp_path):
    ids, vectors, _ = data
    for index in (VectorIndex.build(ids[:500], vectors[:500]), VectorIndex.build(ids, vectors, exact_threshold=1_000)):
        n = index.ntotal
        np.testing.assert_array_equal(index.ids(), np.sort(ids[:n]))
        index.remove(ids[:10])
        index.add(np.array([7, 8]), vectors[:2])
        np.testing.assert_array_equal(index.ids(), np.sort(np.concatenate([ids[10:n], [7, 8]])))
        index.save(tmp_path / index.kind)  # a memory-mapped index answers the same
        np.testing.assert_array_equal(VectorIndex.load(tmp_path / index.kind).ids(), index.ids())
