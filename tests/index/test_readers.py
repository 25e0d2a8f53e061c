"""Readers and the writer of one index: readers follow commits in memory (cost of the change, not
of the index), never rewrite the vector file, and keep searching while the writer rebuilds it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import eventually, record_builds

from cnclip.index.catalog import Catalog, ModelIdentity, NewFile
from cnclip.index.index import Index
from cnclip.index.vectors import INDEX_FILE, InMemoryIndex, VectorIndex

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


def _searchable(catalog: Catalog) -> dict[int, np.ndarray]:
    """File id -> vector of every file the catalog can find now."""
    return {i: v for ids, vectors in catalog.file_vectors() for i, v in zip(ids.tolist(), vectors, strict=True)}


def test_readers_keep_searching_while_the_writer_rebuilds(catalog, monkeypatch):
    """What a reader answers is right for a state of the catalog no older than the generation its
    vector index was made for: every id was searchable then or later (never removed by then),
    scored with its own vector. Once the writer stops, each reader answers what a brute-force
    search of the catalog does within a few seconds."""
    import time

    from cnclip.index import index as folder

    monkeypatch.setattr(folder, "_SYNC_MIN_REBUILD", 0)  # past half of the index changed: rebuild, not sync
    builds = record_builds(monkeypatch, VectorIndex, "build_streaming")
    _put(catalog, [f"a{i}" for i in range(2000)], seed=3)
    query = _vectors(1, seed=9)
    live = _searchable(catalog)
    score_of = {i: float(v @ query[0]) for i, v in live.items()}  # of every id ever searchable (never reused)
    removed_at: dict[int, int] = {}  # file id -> the catalog generation that removed it
    answers, problems, caught_up, stop, final = [], [], [], threading.Event(), {}

    def reader():
        with Catalog.open(catalog.folder) as own:
            index = Index(own, serving=True)
            try:
                while not stop.is_set():
                    vectors = index.refresh()
                    scores, ids = vectors.search(query, 10)
                    answers.append((int(vectors.meta["generation"]), ids[0].tolist(), scores[0]))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    scores, ids = index.refresh().search(query, len(final) + 1)
                    if sorted(ids[0].tolist()) == sorted(final) and np.allclose(
                        scores[0], [final[i] for i in ids[0].tolist()], atol=1e-5
                    ):
                        caught_up.append(np.all(np.diff(scores[0]) <= 1e-6))  # and in brute force's order
                        return
                    time.sleep(0.05)
                problems.append("a reader never caught up with the catalog")
            except Exception as e:  # noqa: BLE001 - any failure of a reader is the finding
                problems.append(repr(e))

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
                still = _searchable(catalog)
                removed_at.update(dict.fromkeys(live.keys() - still.keys(), catalog.generation()))
                _put(catalog, [f"r{round_}-{i}" for i in range(1500)], seed=10 + round_)
                live = _searchable(catalog)
                score_of.update({i: float(v @ query[0]) for i, v in live.items()})
                (catalog.folder / INDEX_FILE).unlink(missing_ok=True)
                assert writer.refresh().ntotal == catalog.count()
        final.update({i: score_of[i] for i in live})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert problems == [] and caught_up == [True, True] and len(builds) >= 6
    assert len(answers) > 0 and len({g for g, _, _ in answers}) > 1  # readers searched through the rebuilds
    for generation, ids, scores in answers:
        assert len(ids) == 10 and np.all(np.diff(scores) <= 1e-6)
        for i, score in zip(ids, scores, strict=True):
            assert i in score_of, f"id {i} was never in the catalog"
            assert removed_at.get(i, generation + 1) > generation, f"id {i} removed at or before {generation}"
            assert abs(score - score_of[i]) <= 1e-5
    assert VectorIndex.load(catalog.folder).meta["generation"] == catalog.generation()


def test_a_save_that_fails_leaves_search_working_from_memory(catalog, monkeypatch, caplog):
    from cnclip.errors import CNClipError

    _put(catalog, [f"a{i}" for i in range(50)], seed=4)

    def read_only(self, folder):
        raise CNClipError(f"cannot write the vector index {folder}: Read-only file system; check permissions")

    monkeypatch.setattr(InMemoryIndex, "save", read_only)
    writer = Index(catalog)
    with writer.lock.hold():
        index = writer.refresh()  # would save, cannot: says so once and keeps going
    assert index.ntotal == 50 and "could not save the vector index" in caplog.text
    assert len(index.search(_vectors(1, seed=5), 5)[1][0]) == 5
    assert not (catalog.folder / INDEX_FILE).exists()


def test_a_serving_reader_rebuilds_in_the_background_while_the_old_index_answers(catalog, monkeypatch):
    import time

    from cnclip.index import index as folder

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


def test_a_background_rebuild_that_keeps_failing_backs_off_instead_of_looping(catalog, monkeypatch, caplog):
    import time

    from cnclip.index import index as folder

    monkeypatch.setattr(folder, "_SYNC_MIN_REBUILD", 0)  # past half of the index changed: rebuild, not sync
    _put(catalog, [f"a{i}" for i in range(400)], seed=11)
    reader = Index(catalog, serving=True)
    held = reader.refresh()
    real_build, tries = VectorIndex.build_streaming.__func__, []

    def full_disk(cls, *args, **kwargs):
        tries.append(time.monotonic())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VectorIndex, "build_streaming", classmethod(full_disk))
    later, real_clock = [0.0], time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_clock() + later[0])  # the back-off's clock, moved by hand
    _put(catalog, [f"b{i}" for i in range(500)], seed=12)  # past half: a rebuild in the background

    def failed(times: int) -> bool:  # refreshes (each would start a rebuild) until the failure is taken in
        assert reader.refresh() is held  # the old index keeps answering
        return caplog.text.count("rebuilding the vector index") >= times and len(tries) == times

    eventually(lambda: failed(1), "the first rebuild fails", timeout=30)
    for _ in range(30):
        assert reader.refresh() is held
        time.sleep(0.01)  # time for a rebuild thread, if one were started, to try
    assert len(tries) == 1  # within the back-off no rebuild starts again
    status = reader.rebuild_status()
    assert status["failures"] == 1 and "No space left on device" in status["last_error"]
    assert 0 < status["retry_in_s"] <= 5 and status["running"] is False

    later[0] += 5.1  # the back-off is over: one more try, then twice as long a wait
    eventually(lambda: failed(2), "the second rebuild fails", timeout=30)
    for _ in range(30):
        reader.refresh()
        time.sleep(0.01)
    assert len(tries) == 2 and 5 < reader.rebuild_status()["retry_in_s"] <= 10

    monkeypatch.setattr(VectorIndex, "build_streaming", classmethod(real_build))  # space freed
    later[0] += 10.1
    fresh = eventually(lambda: (i := reader.refresh()) is not held and i, "the rebuild succeeds", timeout=30)
    assert fresh.ntotal == catalog.count()
    assert reader.rebuild_status() == {"running": False, "failures": 0, "last_error": None, "retry_in_s": 0.0}
