"""`GET /api/dupes` of `cnclip serve`: near-duplicate groups with file ids, over a real index."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import random_images
from fastapi.testclient import TestClient

import cnclip
from cnclip.app.serve import create_app
from cnclip.index.dupes import find_duplicates

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(index folder, photo folder): 6 photos and byte-identical copies of two of them."""
    import torch

    base = tmp_path_factory.mktemp("serve-dupes")
    photos = base / "photos"
    photos.mkdir()
    for i, image in enumerate(random_images(6, seed=41, size=(120, 90))):
        image.save(photos / f"p{i}.jpg", quality=90)
    shutil.copyfile(photos / "p1.jpg", photos / "p1-copy.jpg")
    shutil.copyfile(photos / "p1.jpg", photos / "p1-copy2.jpg")
    shutil.copyfile(photos / "p4.jpg", photos / "p4-copy.jpg")
    torch.manual_seed(6)
    model = cnclip.create_model("tiny-vit").save_pretrained(base / "model")
    with cnclip.Index.open(base / "idx", model=str(model), create=True) as index:
        index.add_folder(photos)
    return base / "idx", photos


@pytest.fixture(scope="module")
def client(built) -> Iterator[TestClient]:
    with TestClient(create_app(built[0]), base_url=LOCAL) as c:
        yield c


def _paths(groups: list[dict]) -> list[list[str]]:
    return [[m["path"] for m in g["members"]] for g in groups]


def test_dupes_lists_copies_with_ids_and_thumbnails(client, built):
    idx, photos = built
    r = client.get("/api/dupes", params={"threshold": 1.0})
    assert r.status_code == 200, r.text
    data = r.json()
    assert (data["files"], data["threshold"], data["notes"]) == (9, 1.0, [])
    groups = [set(p) for p in _paths(data["groups"])]
    assert {str(photos / n) for n in ("p1.jpg", "p1-copy.jpg", "p1-copy2.jpg")} == groups[0]  # largest first
    assert {str(photos / n) for n in ("p4.jpg", "p4-copy.jpg")} in groups
    for member in data["groups"][0]["members"]:
        assert member["score"] == 1.0 and (member["width"], member["height"]) == (120, 90)
        assert member["thumb"] == f"/api/thumb/{member['id']}" and member["name"] in member["path"]
        thumb = client.get(member["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_dupes_equals_the_library_at_any_threshold_and_limit(client, built):
    idx, _ = built
    with cnclip.Index.open(idx) as index:
        expected = find_duplicates(index, 0.9)
    data = client.get("/api/dupes", params={"threshold": 0.9}).json()
    assert _paths(data["groups"]) == [[m.path for m in g.members] for g in expected.groups]
    assert [m["id"] for g in data["groups"] for m in g["members"]] == [m.id for g in expected.groups for m in g.members]
    assert (data["total"], data["pairs"]) == (expected.total_groups, expected.pairs)
    first = client.get("/api/dupes", params={"threshold": 1.0, "limit": 1}).json()
    assert (first["count"], first["total"]) == (1, 2) and first["notes"] == ["showing the first 1 of 2 groups"]


def test_dupes_follows_the_index(client, built):
    idx, photos = built
    assert len(client.get("/api/dupes", params={"threshold": 1.0}).json()["groups"]) == 2
    shutil.copyfile(photos / "p2.jpg", photos / "p2-copy.jpg")
    try:
        with cnclip.Index.open(idx) as index:
            index.add_folder(photos)
        groups = [set(p) for p in _paths(client.get("/api/dupes", params={"threshold": 1.0}).json()["groups"])]
        assert {str(photos / "p2.jpg"), str(photos / "p2-copy.jpg")} in groups and len(groups) == 3
    finally:
        (photos / "p2-copy.jpg").unlink()
        with cnclip.Index.open(idx) as index:
            index.add_folder(photos)


@pytest.mark.parametrize(
    "params", [{"threshold": 0}, {"threshold": 1.5}, {"threshold": "much"}, {"limit": 0}, {"limit": 5000}]
)
def test_bad_dupes_parameters_are_one_line_errors(client, params):
    r = client.get("/api/dupes", params=params)
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
