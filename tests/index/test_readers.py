"""Readers and the writer of one index: readers follow commits in memory (cost of the change, not
of the index), never rewrite the vector file, and keep searching while the writer rebuilds it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import record_builds

from cnclip.index.catalog import Catalog, ModelIdentity, NewFile
from cnclip.index.folder import Index
from cnclip.index.vectors import INDEX_FILE, VectorIndex

DIM = 32


def _vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _put(catalog: Catalog, names: list[str], seed: int) -> None:
    scan = catalog.begin_scan()
    vectors = _vectors(len(names), seed)
    rows = [NewFile(f"/photos/{n}.jpg", 1, 1, f"h-{n}", vector=v) for n, v in zip(names, vectors, strict=True)]
    catalog.put_files(scan, rows)


@pytest.fixture
def catalog(tmp_path):
    with Catalog.open(tmp_path / "idx", create=True) as catalog:
        catalog.bind_model(ModelIdentity("t", "t", "d" * 64, DIM, 224, "squash"))
        yield catalog


def test_a_reader_follows_commits_in_memory_without_reading_or_writing_the_file(catalog, monkeypatch):
    _put(catalog, [f"a{i}" for i in range(300)], seed=1)
    writer = Index(catalog)
    with writer.lock.hold():
        writer.refresh()
    saved = (catalog.folder / INDEX_FILE).stat().st_mtime_ns
    with Catalog.open(catalog.folder) as other:
        reader = Index(other)
        assert reader.refresh().ntotal == 300
        reads = []  # a reader must neither load the file again nor diff every id
        load, file_ids = VectorIndex.load.__func__, other.file_ids
        monkeypatch.setattr(
            VectorIndex, "load", classmethod(lambda cls, *a, **k: reads.append("load") or load(cls, *a, **k))
        )
        monkeypatch.setattr(other, "file_ids", lambda: reads.append("file_ids") or file_ids())
        _put(catalog, ["b1", "b2"], seed=2)
        scan = catalog.begin_scan()
        catalog.touch(scan, [f"/photos/a{i}.jpg" for i in range(1, 300)] + ["/photos/b1.jpg", "/photos/b2.jpg"])
        catalog.finish_scan(scan, "/photos")  # a0 gone
        index = reader.refresh()
        assert reads == []  # synced from the catalog's change journal
        assert index.ntotal == 301
        np.testing.assert_array_equal(index.ids(), file_ids())
        assert (catalog.folder / INDEX_FILE).stat().st_mtime_ns == saved  # and nothing written


def test_readers_keep_searching_while_the_writer_rebuilds(catalog, monkeypatch):
    from cnclip.index import folder

    monkeypatch.setattr(folder, "_SYNC_MIN_REBUILD", 0)  # past half of the index changed: rebuild, not sync
    builds = record_builds(monkeypatch, VectorIndex, "build_streaming")
    _put(catalog, [f"a{i}" for i in range(2000)], seed=3)
    problems, searches, stop = [], [0], threading.Event()

    def reader():
        with Catalog.open(catalog.folder) as own:
            index = Index(own, serving=True)
            query = _vectors(1, seed=9)
            while not stop.is_set():
                try:
                    scores, ids = index.refresh().search(query, 10)
                    assert np.all(np.diff(scores[0][ids[0] >= 0]) <= 1e-6)
                    searches[0] += 1
                except Exception as e:  # noqa: BLE001 - any failure of a reader is the finding
                    problems.append(repr(e))
                    return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    writer = Index(catalog, vector_kind="ivf-flat")
    try:
        for round_ in range(6):
            with writer.lock.hold():
                scan = catalog.begin_scan()  # 3 of 4 files go: past half, so the writer rebuilds
                catalog.touch(scan, [f"/photos/a{i}.jpg" for i in range(0, 2000, 4)])
                catalog.finish_scan(scan, "/photos/")
                _put(catalog, [f"r{round_}-{i}" for i in range(1500)], seed=10 + round_)
                (catalog.folder / INDEX_FILE).unlink(missing_ok=True)
                assert writer.refresh().ntotal == catalog.count()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert problems == [] and searches[0] > 0 and len(builds) >= 6
    assert VectorIndex.load(catalog.folder).meta["generation"] == catalog.generation()


def test_a_save_that_fails_leaves_search_working_from_memory(catalog, monkeypatch, caplog):
    from cnclip.errors import CNClipError

    _put(catalog, [f"a{i}" for i in range(50)], seed=4)

    def read_only(self, folder):
        raise CNClipError(f"cannot write the vector index {folder}: Read-only file system; check permissions")

    monkeypatch.setattr(VectorIndex, "save", read_only)
    writer = Index(catalog)
    with writer.lock.hold():
        index = writer.refresh()  # would save, cannot: says so once and keeps going
    assert index.ntotal == 50 and "could not save the vector index" in caplog.text
    assert len(index.search(_vectors(1, seed=5), 5)[1][0]) == 5
    assert not (catalog.folder / INDEX_FILE).exists()


def test_a_serving_reader_rebuilds_in_the_background_while_the_old_index_answers(catalog, monkeypatch):
    import time

    from cnclip.index import folder

    monkeypatch.setattr(folder, "_SYNC_MIN_REBUILD", 0)  # past half of the index changed: rebuild, not sync
    _put(catalog, [f"a{i}" for i in range(400)], seed=6)
    reader = Index(catalog, serving=True)
    assert reader.refresh().ntotal == 400
    old_ids = catalog.file_ids().tolist()
    real = VectorIndex.build_streaming.__func__

    def slow(cls, *args, **kwargs):
        time.sleep(1.5)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "build_streaming", classmethod(slow))
    scan = catalog.begin_scan()  # 300 of 400 gone and 300 new: past half, a rebuild
    catalog.touch(scan, [f"/photos/a{i}.jpg" for i in range(100)])
    catalog.finish_scan(scan, "/photos/")
    _put(catalog, [f"b{i}" for i in range(300)], seed=7)
    started = time.monotonic()
    stale = reader.refresh()
    assert time.monotonic() - started < 1.0  # no wait: the old index answers, as it was
    assert sorted(stale.ids().tolist()) == old_ids
    deadline = time.monotonic() + 60
    while (fresh := reader.refresh()) is stale and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fresh.ntotal == 400 and sorted(fresh.ids().tolist()) == catalog.file_ids().tolist()
    assert not (catalog.folder / INDEX_FILE).exists()  # a serving reader never writes the vector file


def test_a_serving_reader_holds_the_vectors_in_memory_a_one_shot_reader_maps_them(catalog):
    # mapped, the first change a server follows would copy the whole file while a request waits
    _put(catalog, [f"a{i}" for i in range(50)], seed=8)
    writer = Index(catalog)
    with writer.lock.hold():
        writer.refresh()
    assert Index(catalog).refresh().info()["memory_mapped"] is True
    assert Index(catalog, serving=True).refresh().info()["memory_mapped"] is False
