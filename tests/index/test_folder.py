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


def test_python_api_end_to_end(tiny_vit, folder, tmp_path):
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        summary = index.add_folder(folder, workers=1)
        assert summary.added == 6 and summary.embedded == 6
        hits = index.search_text("海边的日落", k=4)
        assert len(hits) == 4 and all(isinstance(h, cnclip.Hit) for h in hits)
        # scores are cosines of the query against the stored vectors
        query = tiny_vit.embed_texts(["海边的日落"])[0]
        best = tiny_vit.embed_images([hits[0].path])[0]
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
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit) as index:
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


def test_zero_shot_probabilities(tiny_vit):
    hits = cnclip.zero_shot(tiny_vit, random_images(1)[0], ["猫", "狗", "海滩"])
    assert sorted(h.text for h in hits) == ["海滩", "狗", "猫"]
    assert sum(h.score for h in hits) == pytest.approx(1.0, abs=1e-6)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert np.isfinite([h.score for h in hits]).all()


def test_refresh_updates_the_saved_vector_index_in_place(tiny_vit, folder, tmp_path, monkeypatch):
    builds = record_builds(monkeypatch, VectorIndex, "build_streaming")
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
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
        query = tiny_vit.embed_texts(["一只猫"])
        rebuilt = VectorIndex.build(*_catalog_arrays(index.catalog), kind="exact")
        for got, want in zip(synced.search(query, 8), rebuilt.search(query, 8), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # a fresh process sees the saved, synced index as current: no build
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit) as index:
        assert index.refresh().ntotal == 8 and builds == [6]


def _catalog_arrays(catalog):
    chunks = list(catalog.file_vectors())
    return np.concatenate([i for i, _ in chunks]), np.concatenate([v for _, v in chunks])


def test_repeated_queries_reuse_their_embedding(tiny_vit, folder, tmp_path, monkeypatch):
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(folder, workers=1)
        first = index.search_text(" 海边的日落 ", k=3)
        calls = []
        real = tiny_vit.embed_texts
        monkeypatch.setattr(tiny_vit, "embed_texts", lambda texts: calls.append(texts) or real(texts))
        assert index.search_text("海边的日落", k=3) == first and calls == []  # same query after trimming
        index.search_text("一只猫", k=3)
        assert calls == [["一只猫"]]
