"""The SQLite catalog: schema, model binding, mark-and-sweep scans, vectors, texts, concurrency."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cnclip.errors import CNClipError, IndexNotFoundError, ModelMismatchError
from cnclip.index.catalog import CATALOG_FILE, SCHEMA_VERSION, Catalog, FileRecord, ModelIdentity, NewFile

DIM = 8


def identity(digest: str = "ab" * 32, name: str | None = "ViT-B-16", dim: int = DIM, **kw) -> ModelIdentity:
    fields = dict(name=name, source=name or "/models/x.pt", digest=digest, dim=dim, image_size=224)
    fields.update(kw)
    fields.setdefault("preprocessing", "squash-bicubic-clip-meanstd")
    return ModelIdentity(**fields)


def vec(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def new(path: str, seed: int, size: int = 100, mtime_ns: int = 1) -> NewFile:
    """A freshly embedded file whose content hash and vector both derive from `seed`."""
    return NewFile(path=path, size=size, mtime_ns=mtime_ns, hash=f"h{seed}", vector=vec(seed))


@pytest.fixture
def cat(tmp_path):
    with Catalog.open(tmp_path / "idx", create=True) as c:
        c.bind_model(identity())
        yield c


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "a" / "photos")


def all_vectors(c: Catalog) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(c.file_vectors())
    if not chunks:
        return np.zeros(0, np.int64), np.zeros((0, DIM), np.float32)
    return np.concatenate([i for i, _ in chunks]), np.concatenate([v for _, v in chunks])


def paths_of(c: Catalog) -> set[str]:
    return {r.path for r in c.files_by_ids(all_vectors(c)[0]).values()}


# --------------------------------------------------------------------------- open / schema


def test_open_missing_index_raises(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no cnclip index at .*cnclip index DIR --index"):
        Catalog.open(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # a failed open must not leave a folder behind


def test_create_makes_folder_and_records_schema(tmp_path):
    folder = tmp_path / "deep" / "er" / "idx"
    with Catalog.open(folder, create=True) as c:
        assert c.folder == folder and c.path == folder / CATALOG_FILE
        assert c.schema_version == SCHEMA_VERSION == 6
        assert c.identity is None and c.count() == 0 and c.generation() == 0
        assert c._db.execute("PRAGMA page_size").fetchone()[0] == 32768
    conn = sqlite3.connect(folder / CATALOG_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with Catalog.open(folder) as c:  # reopen without create
        assert c.schema_version == SCHEMA_VERSION
        assert c._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_future_schema_is_refused(tmp_path):
    Catalog.open(tmp_path, create=True).close()
    conn = sqlite3.connect(tmp_path / CATALOG_FILE)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(CNClipError, match=rf"schema version {SCHEMA_VERSION + 1} .*upgrade cnclip") as e:
        Catalog.open(tmp_path)
    assert "\n" not in str(e.value)


def test_non_database_is_refused(tmp_path):
    (tmp_path / CATALOG_FILE).write_bytes(b"this is not sqlite, just some text that is long enough " * 20)
    with pytest.raises(CNClipError, match=r"catalog\.sqlite3 is not a usable cnclip catalog.*rebuild") as e:
        Catalog.open(tmp_path)
    assert not isinstance(e.value, IndexNotFoundError)


def test_foreign_sqlite_database_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / CATALOG_FILE)
    conn.execute("CREATE TABLE photos (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CNClipError, match="not a cnclip catalog"):
        Catalog.open(tmp_path)


def test_appended_migration_upgrades_atomically(tmp_path, monkeypatch):
    import cnclip.index.catalog as store

    base = store.SCHEMA_VERSION
    with Catalog.open(tmp_path, create=True) as c:
        c.bind_model(identity())

    def broken(conn):
        conn.execute("ALTER TABLE files ADD COLUMN rating INTEGER")
        raise RuntimeError("killed mid-migration")

    monkeypatch.setattr(store, "_MIGRATIONS", [*store._MIGRATIONS, broken])
    monkeypatch.setattr(store, "SCHEMA_VERSION", base + 1)
    with pytest.raises(RuntimeError, match="killed"):
        Catalog.open(tmp_path)
    conn = sqlite3.connect(tmp_path / CATALOG_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == base  # nothing half-applied
    assert "rating" not in [r[1] for r in conn.execute("PRAGMA table_info(files)")]
    conn.close()

    def add_rating(conn):
        conn.execute("ALTER TABLE files ADD COLUMN rating INTEGER")

    monkeypatch.setattr(store, "_MIGRATIONS", [*store._MIGRATIONS[:base], add_rating])
    with Catalog.open(tmp_path) as c:
        assert c.schema_version == base + 1 and c.identity == identity()  # data kept
        assert "rating" in [r[1] for r in c._db.execute("PRAGMA table_info(files)")]


def test_a_version_1_catalog_is_upgraded_with_its_files_and_vectors(tmp_path, monkeypatch, root):
    import cnclip.index.catalog as store

    monkeypatch.setattr(store, "_MIGRATIONS", store._MIGRATIONS[:1])
    monkeypatch.setattr(store, "SCHEMA_VERSION", 1)
    with Catalog.open(tmp_path, create=True) as c:
        c.bind_model(identity())
        c._db.execute("INSERT INTO vectors (hash, vector) VALUES ('h1', ?)", (vec(1).astype("<f4").tobytes(),))
        c._db.execute(
            "INSERT INTO files (path, size, mtime_ns, hash, vector_id, seen_scan) VALUES (?, 100, 1, 'h1', 1, 1)",
            (f"{root}/a.jpg",),
        )
    monkeypatch.undo()
    with Catalog.open(tmp_path) as c:
        assert c.schema_version == SCHEMA_VERSION and c.count() == 1
        np.testing.assert_array_equal(c.vector_for_path(f"{root}/a.jpg"), vec(1))
        assert c.offline_files() == [] and c.unused_vectors() == 0
        assert c.precision_counts() == {"unrecorded": 1}  # computed before precisions were kept
        # words came with schema 6: the photo waits to be read, its vector is not touched
        assert c.words_progress() == {"photos": 1, "read": 0, "with_words": 0, "failed": 0}
        assert c.photos_to_read() == [(1, [f"{root}/a.jpg"])] and not c.has_words()


def test_every_catalog_has_its_own_identity_for_life(tmp_path):
    with Catalog.open(tmp_path / "a", create=True) as a, Catalog.open(tmp_path / "b", create=True) as b:
        first = a.catalog_id()
        assert len(first) == 32 and first != b.catalog_id()
        with pytest.raises(ValueError, match="reserved"):
            a.set_meta("catalog_id", "forged")
    with Catalog.open(tmp_path / "a") as a:
        assert a.catalog_id() == first


def test_the_journal_mark_names_the_entry_at_a_position(cat, root):
    assert cat.journal_mark(0) == "0" and cat.journal_mark(1) is None
    scan = cat.begin_scan()
    cat.put_files(scan, [NewFile(f"{root}/a.jpg", 1, 1, "ha", vector=vec(1))])
    seq = cat.change_seq()
    [file_id] = cat.file_ids()
    assert cat.journal_mark(seq) == f"{seq}:{file_id}:1" and cat.journal_mark(seq + 1) is None


def test_closed_catalog_raises_clearly(tmp_path):
    c = Catalog.open(tmp_path, create=True)
    c.close()
    c.close()  # idempotent
    with pytest.raises(CNClipError, match="closed"):
        c.count()


# --------------------------------------------------------------------------- model identity


def test_identity_json_roundtrip_and_same_model():
    a = identity(name=None)
    assert ModelIdentity.from_json(a.to_json()) == a
    b = identity(name="converted", source="/elsewhere/model.safetensors")
    assert a.same_model(b)  # renamed / converted copies are the same model
    assert not a.same_model(identity(digest="cd" * 32))
    assert not a.same_model(identity(image_size=336))
    with pytest.raises(CNClipError, match="model record"):
        ModelIdentity.from_json('{"name": "x"}')


def test_bind_model_first_same_different(tmp_path):
    with Catalog.open(tmp_path, create=True) as c:
        first = identity()
        c.bind_model(first)
        assert c.identity == first
        moved = identity(source="/new/place/vit.safetensors")
        c.bind_model(moved)  # same model, new source: accepted and recorded
        assert c.identity == moved
        other = identity(digest="cd" * 32, name=None)
        with pytest.raises(ModelMismatchError) as e:
            c.bind_model(other)
        msg = str(e.value)
        assert "\n" not in msg
        assert "ViT-B-16" in msg and "ab" * 6 in msg and "cd" * 6 in msg
        assert "--index" in msg and "index's model" in msg
        assert c.identity == moved  # unchanged by the refused bind


def test_vectors_need_a_bound_model_and_the_right_dim(tmp_path, root):
    with Catalog.open(tmp_path, create=True) as c:
        s = c.begin_scan()
        with pytest.raises(CNClipError, match="bind_model"):
            c.put_files(s, [new(f"{root}/a.jpg", 1)])
        c.bind_model(identity())
        bad = NewFile(f"{root}/a.jpg", 1, 1, "h1", vector=np.zeros(DIM + 1, np.float32))
        with pytest.raises(ModelMismatchError, match=r"a\.jpg has shape \(9,\).*\(8,\)"):
            c.put_files(s, [new(f"{root}/ok.jpg", 2), bad])
        assert c.lookup(f"{root}/ok.jpg") is None  # the whole batch rolled back
        with pytest.raises(ModelMismatchError):
            c.add_texts(["x"], np.zeros((1, DIM + 1), np.float32))


# --------------------------------------------------------------------------- scans


def test_full_scan_cycle(cat, root, tmp_path):
    other = str(tmp_path / "elsewhere")
    a, b, c_, d = (f"{root}/{n}.jpg" for n in "abcd")
    s1 = cat.begin_scan()
    cat.put_files(s1, [new(a, 1), new(b, 2), new(c_, 3), new(f"{other}/x.jpg", 4)])
    assert cat.finish_scan(s1, root) == []
    assert cat.count() == 4
    rec = cat.lookup(a)
    assert isinstance(rec, FileRecord) and (rec.path, rec.size, rec.mtime_ns, rec.hash) == (a, 100, 1, "h1")
    old_b_id = cat.file_id_for_path(b)

    # Scan 2: a unchanged, b changed, c deleted, d new; the other folder is not scanned.
    s2 = cat.begin_scan()
    assert s2 > s1
    cat.touch(s2, [a])
    cat.put_files(s2, [new(b, 22, size=200, mtime_ns=2), new(d, 5)])
    assert cat.finish_scan(s2, root) == [c_]

    assert cat.lookup(c_) is None
    assert cat.lookup(f"{other}/x.jpg") is not None  # outside root: untouched
    assert cat.lookup(b).size == 200 and cat.lookup(b).hash == "h22"
    assert cat.file_id_for_path(b) != old_b_id  # a new vector means a new file id
    np.testing.assert_array_equal(cat.vector_for_path(b), vec(22))
    np.testing.assert_array_equal(cat.vector_for_path(a), vec(1))
    assert cat.vector_for_path(c_) is None
    assert paths_of(cat) == {a, b, d, f"{other}/x.jpg"}
    # Vectors of b's old content and of c are unused now, kept for reuse until collected.
    assert cat.unused_vectors() == 2 and cat.vector_id_for_hash("h2") is not None
    assert cat._db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 6
    assert cat.collect_garbage(older_than_s=3600) == 0  # too young
    assert cat.collect_garbage() == 2
    assert cat.vector_id_for_hash("h2") is None and cat.vector_id_for_hash("h3") is None
    assert cat._db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 4


def test_reput_with_same_vector_keeps_id(cat, root):
    p = f"{root}/a.jpg"
    s = cat.begin_scan()
    cat.put_files(s, [new(p, 1)])
    fid, gen = cat.file_id_for_path(p), cat.generation()
    s2 = cat.begin_scan()
    cat.put_files(s2, [NewFile(p, 100, 99, "h1", vector_id=cat.vector_id_for_hash("h1"))])  # only mtime changed
    assert cat.file_id_for_path(p) == fid and cat.lookup(p).mtime_ns == 99
    assert cat.generation() == gen  # no (id, vector) pair changed
    assert cat.finish_scan(s2, root) == []


def test_root_prefix_edge_cases(cat, tmp_path):
    base = str(tmp_path / "a")
    photos, photos2 = f"{base}/photos", f"{base}/photos2"
    inside = [f"{photos}/x.jpg", f"{photos}/sub/deep/y.jpg"]
    outside = [f"{photos2}/z.jpg", f"{base}/photos.jpg", f"{base}/photos-old/w.jpg", f"{base}/top.jpg"]
    s1 = cat.begin_scan()
    cat.put_files(s1, [new(p, i) for i, p in enumerate(inside + outside)])
    s2 = cat.begin_scan()
    assert sorted(cat.finish_scan(s2, photos)) == sorted(inside)
    assert paths_of(cat) == set(outside)
    # A trailing separator names the same folder.
    s3 = cat.begin_scan()
    assert cat.finish_scan(s3, photos2 + os.sep) == [f"{photos2}/z.jpg"]
    with pytest.raises(ValueError, match="absolute"):
        cat.finish_scan(s3, "")


def test_whether_and_how_many_files_are_under_a_folder(cat, tmp_path):
    base = str(tmp_path / "a")
    cat.put_files(cat.begin_scan(), [new(p, i) for i, p in enumerate([f"{base}/p/x.jpg", f"{base}/p/s/y.jpg"])])
    cat.put_files(cat.begin_scan(), [new(f"{base}/p2/z.jpg", 9)])
    assert cat.files_under(f"{base}/p") == 2 and cat.has_files_under(f"{base}/p")
    assert cat.files_under(f"{base}/p/s/") == 1 and cat.has_files_under(f"{base}/p/s/")
    assert cat.files_under(f"{base}/q") == 0 and not cat.has_files_under(f"{base}/q")
    assert not cat.has_files_under(f"{base}/p/x.jpg")  # a file is not a folder


def test_like_wildcards_in_paths(cat, tmp_path):
    # With LIKE, "100%" would match "100x..." and "a_b" would match "aXb".
    pct, und = str(tmp_path / "100%"), str(tmp_path / "a_b")
    files = [f"{pct}/1.jpg", str(tmp_path / "100x" / "2.jpg"), f"{und}/3.jpg", str(tmp_path / "aXb" / "4.jpg")]
    s1 = cat.begin_scan()
    cat.put_files(s1, [new(p, i) for i, p in enumerate(files)])
    s2 = cat.begin_scan()
    assert cat.finish_scan(s2, pct) == [files[0]]
    assert cat.finish_scan(s2, und) == [files[2]]
    assert paths_of(cat) == {files[1], files[3]}


def test_rename_reuses_vector_and_orphans_are_kept_until_collected(cat, root):
    old, renamed, gone = f"{root}/old.jpg", f"{root}/moved/new.jpg", f"{root}/gone.jpg"
    s1 = cat.begin_scan()
    cat.put_files(s1, [new(old, 1), new(gone, 2)])
    cat.finish_scan(s1, root)
    vid = cat.vector_id_for_hash("h1")
    assert vid is not None and cat.vector_id_for_hash("nope") is None

    s2 = cat.begin_scan()  # old.jpg moved, gone.jpg deleted
    cat.put_files(s2, [NewFile(renamed, 100, 1, "h1", vector_id=vid)])
    assert cat.finish_scan(s2, root) == [gone, old]  # in path order
    assert cat.lookup(old) is None and cat.lookup(gone) is None
    assert cat.vector_id_for_hash("h1") == vid  # survived: renamed.jpg uses it
    # the vector of a deleted file stays, unused, so that restoring the file costs no embedding
    kept = cat.vector_id_for_hash("h2")
    assert kept is not None and cat.unused_vectors() == 1
    np.testing.assert_array_equal(cat.vector_for_path(renamed), vec(1))
    s3 = cat.begin_scan()  # gone.jpg restored from the trash
    gen = cat.generation()
    cat.touch(s3, [renamed])
    cat.put_files(s3, [NewFile(gone, 100, 2, "h2", vector_id=kept)])
    assert cat.unused_vectors() == 0 and cat.generation() > gen
    np.testing.assert_array_equal(cat.vector_for_path(gone), vec(2))
    cat.finish_scan(s3, root)
    assert cat.collect_garbage() == 0  # nothing unused now


def test_duplicates_share_one_vector(cat, root):
    s = cat.begin_scan()
    cat.put_files(s, [new(f"{root}/a.jpg", 1), new(f"{root}/copy-of-a.jpg", 1)])
    assert cat.count() == 2
    assert cat._db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 1
    s2 = cat.begin_scan()
    cat.touch(s2, [f"{root}/copy-of-a.jpg"])
    cat.finish_scan(s2, root)
    assert cat.vector_id_for_hash("h1") is not None  # still used by the copy


def test_reuse_of_swept_or_foreign_vector_is_refused(cat, root):
    s = cat.begin_scan()
    cat.put_files(s, [new(f"{root}/a.jpg", 1)])
    with pytest.raises(CNClipError, match="no longer in the index"):
        cat.put_files(s, [NewFile(f"{root}/b.jpg", 1, 1, "h9", vector_id=12345)])
    with pytest.raises(ValueError, match="belongs to content h1"):
        cat.put_files(s, [NewFile(f"{root}/b.jpg", 1, 1, "h9", vector_id=cat.vector_id_for_hash("h1"))])
    with pytest.raises(ValueError, match="both"):
        cat.put_files(s, [NewFile(f"{root}/b.jpg", 1, 1, "h1", vector=vec(1), vector_id=1)])


def test_unembeddable_file_is_recorded_but_not_searchable(cat, root):
    s = cat.begin_scan()
    cat.put_files(s, [new(f"{root}/ok.jpg", 1), NewFile(f"{root}/broken.jpg", 5, 1, "hb")])
    assert cat.lookup(f"{root}/broken.jpg") is not None  # so the next scan can skip it
    assert cat.count() == 1 and len(all_vectors(cat)[0]) == 1
    assert cat.vector_for_path(f"{root}/broken.jpg") is None


def test_interrupted_scan_deletes_nothing(tmp_path, root):
    folder = tmp_path / "idx"
    with Catalog.open(folder, create=True) as c:
        c.bind_model(identity())
        s1 = c.begin_scan()
        c.put_files(s1, [new(f"{root}/{i}.jpg", i) for i in range(5)])
        c.finish_scan(s1, root)
    # "Crash": a new scan sees only one old file, adds two new ones, and never finishes.
    c = Catalog.open(folder)
    s2 = c.begin_scan()
    c.touch(s2, [f"{root}/0.jpg"])
    c.put_files(s2, [new(f"{root}/new{i}.jpg", 10 + i) for i in range(2)])
    c.close()
    with Catalog.open(folder) as c:
        assert c.count() == 7  # nothing swept; the committed batch is there
        assert c.lookup(f"{root}/new1.jpg") is not None
        s3 = c.begin_scan()
        assert s3 > s2  # scan ids survive reopen
        c.touch(s3, [f"{root}/{i}.jpg" for i in range(5)] + [f"{root}/new0.jpg"])
        assert c.finish_scan(s3, root) == [f"{root}/new1.jpg"]


def test_concurrent_newer_scan_is_not_undone_by_older(cat, root):
    p = f"{root}/a.jpg"
    s0 = cat.begin_scan()
    cat.put_files(s0, [new(p, 1)])
    older, newer = cat.begin_scan(), cat.begin_scan()
    cat.touch(newer, [p])
    cat.touch(older, [p])  # a slower scan touching later must not move it back
    assert cat.finish_scan(newer, root) == []
    assert cat.finish_scan(older, root) == []


def test_generation(cat, root):
    g = [cat.generation()]
    s1 = cat.begin_scan()
    assert cat.generation() == g[-1]  # starting a scan changes nothing
    cat.put_files(s1, [new(f"{root}/a.jpg", 1), new(f"{root}/b.jpg", 2)])
    cat.finish_scan(s1, root)
    g.append(cat.generation())
    assert g[-1] > g[-2]

    s2 = cat.begin_scan()  # touch-only scan: nothing changed
    cat.touch(s2, [f"{root}/a.jpg", f"{root}/b.jpg"])
    cat.finish_scan(s2, root)
    cat.set_meta("faiss", "built")
    assert cat.generation() == g[-1]

    s3 = cat.begin_scan()  # deletion
    cat.touch(s3, [f"{root}/a.jpg"])
    cat.finish_scan(s3, root)
    g.append(cat.generation())
    assert g[-1] > g[-2]

    cat.add_texts(["猫"], vec(7)[None])
    g.append(cat.generation())
    assert g[-1] > g[-2]
    cat.add_texts(["猫"], vec(7)[None])  # duplicate: nothing new
    assert cat.generation() == g[-1]


# --------------------------------------------------------------------------- reading


def test_file_vectors_streams_in_chunks(cat, root):
    s = cat.begin_scan()
    rows = [new(f"{root}/{i:02d}.jpg", i) for i in range(10)]
    cat.put_files(s, rows[:4])
    cat.put_files(s, rows[4:])
    chunks = list(cat.file_vectors(batch=3))
    assert [len(i) for i, _ in chunks] == [3, 3, 3, 1]
    for ids, vecs in chunks:
        assert ids.dtype == np.int64 and vecs.dtype == np.float32 and vecs.shape == (len(ids), DIM)
        assert vecs.flags.writeable and vecs.flags.c_contiguous
    ids = np.concatenate([i for i, _ in chunks])
    vecs = np.concatenate([v for _, v in chunks])
    assert list(ids) == sorted(ids)
    recs = cat.files_by_ids(ids)
    for fid, v in zip(ids, vecs, strict=True):
        seed = int(recs[int(fid)].path[-6:-4])
        np.testing.assert_array_equal(v, vec(seed))
    assert cat.files_by_ids([int(ids[0]), 999999]).keys() == {int(ids[0])}
    assert cat.count() == 10


def test_file_vectors_empty_and_unbound(tmp_path):
    with Catalog.open(tmp_path, create=True) as c:
        assert list(c.file_vectors()) == []
        c.bind_model(identity())
        assert list(c.file_vectors()) == []


def test_corrupt_vector_length_is_reported(cat, root):
    s = cat.begin_scan()
    cat.put_files(s, [new(f"{root}/a.jpg", 1)])
    cat._db.execute("UPDATE vectors SET vector = zeroblob(12)")
    with pytest.raises(CNClipError, match="3 floats but the index's model makes 8"):
        list(cat.file_vectors())


# --------------------------------------------------------------------------- texts


def test_texts_add_dedupe_known_read(cat):
    texts = ["海边的日落", "一只猫", "雪山"]
    vecs = np.stack([vec(i) for i in range(3)])
    assert cat.known_texts(texts) == set()
    assert cat.add_texts(texts, vecs) == 3
    assert cat.add_texts(["一只猫", "小狗", "小狗"], np.stack([vec(1), vec(9), vec(9)])) == 1
    assert cat.known_texts(["一只猫", "不存在", "小狗"]) == {"一只猫", "小狗"}
    assert cat.known_texts(["一只猫"], collection="tags") == set()
    assert cat.add_texts(["一只猫"], vec(1)[None], collection="tags") == 1
    assert cat.text_count() == 5

    ids, tv = cat.text_vectors("default")
    assert ids.dtype == np.int64 and tv.shape == (4, DIM) and tv.dtype == np.float32
    by_id = cat.texts_by_ids(ids)
    assert [by_id[int(i)] for i in ids] == texts + ["小狗"]
    np.testing.assert_array_equal(tv[1], vec(1))
    assert len(cat.text_vectors()[0]) == 5
    ids_t, _ = cat.text_vectors("tags")
    assert cat.texts_by_ids(ids_t) == {int(ids_t[0]): "一只猫"}
    empty_ids, empty = cat.text_vectors("nothing")
    assert empty_ids.shape == (0,) and empty.shape == (0, DIM)
    with pytest.raises(ValueError, match="one vector row per text"):
        cat.add_texts(["a", "b"], vecs[:1])


def test_meta(cat):
    assert cat.get_meta("faiss.build") is None
    cat.set_meta("faiss.build", '{"generation": 3}')
    cat.set_meta("faiss.build", '{"generation": 4}')
    assert cat.get_meta("faiss.build") == '{"generation": 4}'
    with pytest.raises(ValueError, match="reserved"):
        cat.set_meta("generation", "0")


def test_scanned_folders_are_recorded_with_their_time(cat, root):
    assert cat.roots() == {}
    before = time.time()
    cat.record_root(root)
    cat.record_root("/other/photos")
    first = cat.roots()[root]
    cat.record_root(root)  # a later scan of the same folder moves its time on
    roots = cat.roots()
    assert set(roots) == {root, "/other/photos"} and before - 1 <= first <= roots[root] <= time.time() + 1
    cat.set_meta("roots-cache", "x")  # a key that merely starts alike is not a folder
    assert set(cat.roots()) == {root, "/other/photos"}
    with pytest.raises(ValueError, match="reserved"):
        cat.set_meta("root:/etc", "0")


def test_many_ids_in_lookups(cat, root):
    # More ids than one IN (...) list takes.
    s = cat.begin_scan()
    cat.put_files(s, [new(f"{root}/{i}.jpg", i) for i in range(1200)])
    ids, _ = all_vectors(cat)
    assert len(cat.files_by_ids(list(ids))) == 1200
    texts = [f"t{i}" for i in range(1200)]
    cat.add_texts(texts, np.zeros((1200, DIM), np.float32))
    assert cat.known_texts(texts + ["x"]) == set(texts)
    assert len(cat.texts_by_ids(list(cat.text_vectors()[0]))) == 1200


# --------------------------------------------------------------------------- concurrency


def test_reader_sees_committed_data_while_writer_holds_transaction(tmp_path, root):
    folder = tmp_path / "idx"
    writer = Catalog.open(folder, create=True)
    writer.bind_model(identity())
    s = writer.begin_scan()
    writer.put_files(s, [new(f"{root}/committed.jpg", 1)])

    reader = Catalog.open(folder)
    # A blocked read would wait the full busy timeout; make any blocking fail fast instead.
    reader._db.execute("PRAGMA busy_timeout=200")
    with writer._write() as conn:  # an open write transaction, as during a big put_files batch
        conn.execute(
            "INSERT INTO files (path, size, mtime_ns, hash, vector_id, seen_scan) VALUES (?, 1, 1, 'h1', 1, ?)",
            (f"{root}/uncommitted.jpg", s),
        )
        assert reader.count() == 1
        assert reader.lookup(f"{root}/uncommitted.jpg") is None
        ids, vecs = all_vectors(reader)
        np.testing.assert_array_equal(vecs, vec(1)[None])
        # A third process reads too (plain sqlite3, so it does not pay for importing torch).
        code = (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0.2);"
            "print(c.execute('select count(*) from files').fetchone()[0])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(folder / CATALOG_FILE)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
        # Opening a new Catalog (pragmas, schema check) must not block either.
        Catalog.open(folder).close()
    assert reader.count() == 2  # committed now
    reader.close()
    writer.close()


def test_catalog_is_per_thread(cat):
    errors = []

    def use():
        try:
            cat.count()
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=use)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], sqlite3.ProgrammingError)


def test_writer_commits_while_reader_streams(tmp_path, root):
    # The search-during-index case: a reader mid-way through file_vectors holds a snapshot; in WAL
    # mode the writer still commits, and the reader finishes on its consistent snapshot.
    folder = tmp_path / "idx"
    with Catalog.open(folder, create=True) as writer, Catalog.open(folder) as reader:
        writer.bind_model(identity())
        s = writer.begin_scan()
        writer.put_files(s, [new(f"{root}/{i}.jpg", i) for i in range(4)])
        writer._db.execute("PRAGMA busy_timeout=200")  # blocking would fail fast, not hang
        stream = reader.file_vectors(batch=1)
        first_ids, _ = next(stream)
        writer.put_files(s, [new(f"{root}/{i}.jpg", i) for i in range(4, 8)])
        assert writer.finish_scan(writer.begin_scan(), root)  # deletes everything, also committed
        rest = [ids for ids, _ in stream]
        assert len(first_ids) + sum(len(i) for i in rest) == 4  # the snapshot from before the writes
        assert reader.count() == 0  # a new read sees the commits


def test_second_writer_waits_then_fails_clearly(tmp_path, root):
    folder = tmp_path / "idx"
    with Catalog.open(folder, create=True) as first, Catalog.open(folder) as second:
        first.bind_model(identity())
        second._db.execute("PRAGMA busy_timeout=100")
        with first._write():
            with pytest.raises(CNClipError, match="is busy.*wait for it") as e:
                second.put_files(second.begin_scan(), [new(f"{root}/a.jpg", 1)])
            assert not isinstance(e.value, sqlite3.Error)
        s = second.begin_scan()  # the lock is gone: works again
        second.put_files(s, [new(f"{root}/a.jpg", 1)])
        assert first.count() == 1


def test_file_ids_and_vectors_after_id(tmp_path):
    cat = Catalog.open(tmp_path / "idx", create=True)
    cat.bind_model(ModelIdentity(name="t", source="t", digest="d", dim=4, image_size=8, preprocessing="p"))
    scan = cat.begin_scan()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 4)).astype(np.float32)
    cat.put_files(scan, [NewFile(f"/r/{i}.png", 1, 1, f"h{i}", vector=vecs[i]) for i in range(5)])
    ids = cat.file_ids()
    assert ids.dtype == np.int64 and len(ids) == 5 and list(ids) == sorted(ids)
    later = list(cat.file_vectors(after_id=int(ids[2])))
    assert [int(i) for chunk, _ in later for i in chunk] == [int(ids[3]), int(ids[4])]
    np.testing.assert_array_equal(np.concatenate([v for _, v in later]), vecs[3:])
    cat.close()


def test_vectors_for_ids_returns_stored_vectors_in_order_and_nan_for_unknown(cat):
    scan = cat.begin_scan()
    cat.put_files(scan, [new(f"/p/{i}.jpg", seed=i) for i in range(3)])
    ids, vectors = all_vectors(cat)
    got = cat.vectors_for_ids([ids[2], 999_999, ids[0], ids[2]])
    np.testing.assert_array_equal(got[[0, 2, 3]], vectors[[2, 0, 2]])
    assert np.isnan(got[1]).all()
