"""The Python API of an index: open, add a folder, search every direction."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_images, record_builds

import cnclip
from cnclip.errors import IndexNotFoundError, ModelMismatchError, QueryError
from cnclip.index.vectors import VectorIndex


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, img in enumerate(random_images(6, seed=5)):
        img.save(root / ("sub" if i % 2 else "") / f"{i}.png")
    return root


def test_python_api_end_to_end(tiny_vit_encoder, folder, tmp_path):
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit_encoder, create=True) as index:
        summary = index.add_folder(folder, workers=1)
        assert summary.added == 6 and summary.embedded == 6
        hits = index.search_text("海边的日落", k=4)
        assert len(hits) == 4 and all(isinstance(h, cnclip.Hit) for h in hits)
        # scores are cosines of the query against the stored vectors
        query = tiny_vit_encoder.embed_texts(["海边的日落"])[0]
        best = tiny_vit_encoder.embed_images([hits[0].path])[0]
        assert hits[0].score == pytest.approx(float(query @ best), abs=1e-5)

        same = index.search_image(folder / "0.png", k=6)
        assert str(folder / "0.png") not in {h.path for h in same} and len(same) == 5
        pil = random_images(6, seed=5)[0]  # the same pixels as 0.png, given as a PIL image
        assert index.search_image(pil, k=1)[0].path == str(folder / "0.png")

        assert index.add_texts(["一只猫", "海边的日落", "一只猫"]) == 2
        assert index.add_texts(["一只猫"]) == 0
        texts = index.search_texts_by_image(folder / "0.png", k=5)
        assert sorted(t.text for t in texts) == ["一只猫", "海边的日落"]

    # reopened without a model: the index's own is loaded when needed (here: the in-memory one is
    # recorded by name only, so pass it again) and a different model is refused
    with pytest.raises(ModelMismatchError):
        cnclip.Index.open(tmp_path / "idx", model=cnclip.create_model("tiny-vit"))
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit_encoder) as index:
        assert len(index.search_text("猫", k=100)) == 6


def test_query_errors_and_missing_index(tiny_vit, folder, tmp_path):
    with pytest.raises(IndexNotFoundError):
        cnclip.Index.open(tmp_path / "nothing")
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(folder)
        for bad in ("", "   \n", "猫" * 10_000):
            with pytest.raises(QueryError):
                index.search_text(bad)
        with pytest.raises(QueryError):
            index.search_text("猫", k=0)


def test_zero_shot_probabilities(tiny_vit_encoder):
    hits = cnclip.zero_shot(tiny_vit_encoder, random_images(1)[0], ["猫", "狗", "海滩"])
    assert sorted(h.text for h in hits) == ["海滩", "狗", "猫"]
    assert sum(h.score for h in hits) == pytest.approx(1.0, abs=1e-6)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert np.isfinite([h.score for h in hits]).all()


def test_zero_shot_with_a_model_still_works_and_warns(tiny_vit, tiny_vit_encoder):
    image = random_images(1)[0]
    with pytest.warns(DeprecationWarning, match="takes an Encoder"):
        old = cnclip.zero_shot(tiny_vit, image, ["猫", "狗"])
    assert old == cnclip.zero_shot(tiny_vit_encoder, image, ["猫", "狗"])


def test_refresh_updates_the_saved_vector_index_in_place(tiny_vit_encoder, folder, tmp_path, monkeypatch):
    builds = record_builds(monkeypatch, VectorIndex, "build_streaming")
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit_encoder, create=True) as index:
        index.add_folder(folder, workers=1)
        assert builds == [6]  # first time: built from the catalog
        (folder / "0.png").unlink()
        for i, img in enumerate(random_images(3, seed=9)):
            img.save(folder / f"new{i}.png")
        index.add_folder(folder, workers=1)
        assert builds == [6]  # 3 added and 1 removed were applied to the saved index, not rebuilt
        synced = index.refresh()
        assert synced.ntotal == 8
        np.testing.assert_array_equal(synced.ids(), index.catalog.file_ids())
        query = tiny_vit_encoder.embed_texts(["一只猫"])
        rebuilt = VectorIndex.build(*_catalog_arrays(index.catalog), kind="exact")
        for got, want in zip(synced.search(query, 8), rebuilt.search(query, 8), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # a fresh process sees the saved, synced index as current: no build
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit_encoder) as index:
        assert index.refresh().ntotal == 8 and builds == [6]


def _catalog_arrays(catalog):
    chunks = list(catalog.file_vectors())
    return np.concatenate([i for i, _ in chunks]), np.concatenate([v for _, v in chunks])


def test_repeated_queries_reuse_their_embedding(tiny_vit_encoder, folder, tmp_path, monkeypatch):
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit_encoder, create=True) as index:
        index.add_folder(folder, workers=1)
        first = index.search_text(" 海边的日落 ", k=3)
        calls = []
        real = tiny_vit_encoder.embed_texts
        monkeypatch.setattr(tiny_vit_encoder, "embed_texts", lambda texts: calls.append(texts) or real(texts))
        assert index.search_text("海边的日落", k=3) == first and calls == []  # same query after trimming
        index.search_text("一只猫", k=3)
        assert calls == [["一只猫"]]


# -- an index knows its own parts ---------------------------------------------------------------------


def _b_photos(tmp_path):
    root = tmp_path / "other"
    root.mkdir()
    for i, img in enumerate(random_images(6, seed=6)):
        img.save(root / f"b{i}.png")
    return root


def _searches_only(index, names: set[str]) -> None:
    """Search results equal a brute-force search over the catalog's own vectors (paths and scores),
    and the saved vector index says it is current."""
    query = random_images(1, seed=99)[0]
    hits = index.search_image(query, k=20)
    ids, vectors = (np.concatenate(parts) for parts in zip(*index.catalog.file_vectors(), strict=True))
    paths = index.catalog.files_by_ids(ids)
    scores = vectors @ index.encoder.embed_images([query])[0]
    expected = [
        (paths[i].path.rsplit("/", 1)[-1], s) for i, s in sorted(zip(ids, scores, strict=True), key=lambda p: -p[1])
    ]
    assert {name for name, _ in expected} == names
    assert [h.path.rsplit("/", 1)[-1] for h in hits] == [name for name, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert index.refresh().ntotal == index.catalog.count()  # no vector of a file the catalog lacks
    assert index.stats()["vector_index"]["current"] is True


def test_a_vector_file_is_never_used_with_a_catalog_it_was_not_built_from(tiny_vit, folder, tmp_path):
    """Move only catalog.sqlite3 away (as our own error text once said) and index another folder:
    the same generation and journal position as the old vector file, but another catalog."""
    idx = tmp_path / "idx"
    with cnclip.Index.open(idx, model=tiny_vit, create=True) as index:
        index.add_folder(folder)
    (idx / "catalog.sqlite3").rename(tmp_path / "catalog-aside.sqlite3")
    other = _b_photos(tmp_path)
    with cnclip.Index.open(idx, model=tiny_vit, create=True) as index:
        index.add_folder(other)
    with cnclip.Index.open(idx, model=tiny_vit) as index:  # a fresh process: only the saved files
        _searches_only(index, {f"b{i}.png" for i in range(6)})


def test_a_catalog_restored_from_a_backup_does_not_trust_a_newer_vector_file(tiny_vit, folder, tmp_path):
    """The vector file is ahead of the restored catalog's journal: stale, not "nothing new"; and once
    the restored catalog has moved on past that position, its history differs: rebuilt, not synced."""
    idx = tmp_path / "idx"
    with cnclip.Index.open(idx, model=tiny_vit, create=True) as index:
        index.add_folder(folder)
    with cnclip.Index.open(idx, model=tiny_vit) as index:  # the backup: a consistent copy
        backup = tmp_path / "backup.sqlite3"
        index.catalog._db.execute(f"VACUUM INTO '{backup}'")
    other = _b_photos(tmp_path)
    with cnclip.Index.open(idx, model=tiny_vit) as index:
        index.add_folder(other)  # the vector file now holds 12 photos
    for name in ("catalog.sqlite3-wal", "catalog.sqlite3-shm"):
        (idx / name).unlink(missing_ok=True)
    backup.replace(idx / "catalog.sqlite3")  # restored: 6 photos, an older journal
    with cnclip.Index.open(idx, model=tiny_vit) as index:
        _searches_only(index, {f"{i}.png" for i in range(6)})


def test_a_restored_catalog_that_has_gone_its_own_way_does_not_sync_an_old_vector_file(
    tiny_vit_encoder, folder, tmp_path
):
    """Restored, then changed past the vector file's position without touching the vector file
    (photos deleted, others added): the journal entry at that position differs, so it is rebuilt,
    not synced (a sync would keep the deleted photos)."""
    from cnclip.index.catalog import Catalog
    from cnclip.index.scan import Indexer

    idx = tmp_path / "idx"
    with cnclip.Index.open(idx, model=tiny_vit_encoder, create=True) as index:
        index.add_folder(folder)
        backup = tmp_path / "backup.sqlite3"
        index.catalog._db.execute(f"VACUUM INTO '{backup}'")
        other = _b_photos(tmp_path)
        index.add_folder(other)  # the vector file: 12 photos, journal position 12
    for name in ("catalog.sqlite3-wal", "catalog.sqlite3-shm"):
        (idx / name).unlink(missing_ok=True)
    backup.replace(idx / "catalog.sqlite3")
    (folder / "0.png").unlink()
    (folder / "2.png").unlink()
    with Catalog.open(idx) as catalog:  # the catalog alone moves on: 2 removals, then 6 additions
        indexer = Indexer(tiny_vit_encoder, catalog)
        indexer.run(folder)
        indexer.run(other)
        assert catalog.change_seq() > 12
    with cnclip.Index.open(idx, model=tiny_vit_encoder) as index:
        _searches_only(index, {"1.png", "3.png", "4.png", "5.png"} | {f"b{i}.png" for i in range(6)})


def test_the_default_index_is_found_from_any_folder(tmp_path, monkeypatch):
    """$CNCLIP_INDEX, else ./index/default where the current folder has one, else the per-user index."""
    from cnclip.index.catalog import Catalog
    from cnclip.index.index import default_index_choice

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("CNCLIP_INDEX", raising=False)
    for cwd in (tmp_path, tmp_path / "elsewhere"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        assert default_index_choice() == (tmp_path / "data" / "cnclip" / "index" / "default", "the per-user default")
    Catalog.open(tmp_path / "elsewhere" / "index" / "default", create=True).close()
    path, why = default_index_choice()  # an index made here before (or the repository's layout) still wins
    assert path.resolve() == tmp_path / "elsewhere" / "index" / "default" and "current folder" in why
    monkeypatch.setenv("CNCLIP_INDEX", str(tmp_path / "mine"))
    assert default_index_choice() == (tmp_path / "mine", "$CNCLIP_INDEX")


def test_index_model_is_the_encoder_for_one_more_release(tiny_vit, tmp_path):
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        with pytest.warns(DeprecationWarning, match="Index.encoder"):
            old = index.model
        assert old is index.encoder
        np.testing.assert_array_equal(old.embed_texts(["猫"]), index.encoder.embed_texts(["猫"]))
