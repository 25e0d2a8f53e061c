"""Filters through the real CLI and the JSON API: date taken, folder, camera, size; an index made
before filters existed gets them from the next `cnclip index` without embedding anything again."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import run_cli
from fastapi.testclient import TestClient
from PIL import Image

import cnclip

PHOTOS = {
    "旅行/2024/beach.jpg": ("2024:07:01 10:00:00", "Apple", "iPhone 13"),
    "旅行/2024/sunset.jpg": ("2024:08:15 18:30:00", "SONY", "ILCE-7M3"),
    "旅行/2023/lake.jpg": ("2023:07:01 10:00:00", None, None),
    "家/cat.jpg": (None, None, None),
}


def _write(root, rel, date, make, model, seed):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40 + 8 * seed, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    if date:
        exif.get_ifd(0x8769)[0x9003] = date
    if make:
        exif[0x010F], exif[0x0110] = make, model
    Image.fromarray(pixels).save(path, exif=exif)
    os.utime(path, (1_600_000_000, 1_600_000_000))  # 2020-09-13: the file time of the photo without EXIF


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    base = tmp_path_factory.mktemp("filters")
    torch.manual_seed(2)
    model_dir = cnclip.create_model("tiny-vit").save_pretrained(base / "model")
    for seed, (rel, facts) in enumerate(PHOTOS.items()):
        _write(base / "photos", rel, *facts, seed)
    out = run_cli("index", base / "photos", "--index", base / "idx", "--model", model_dir, "-q")
    assert out.returncode == 0, out.stderr
    return base


def _found(base, *options) -> list[str]:
    out = run_cli("search", "海边", "--index", base / "idx", "-k", "10", "--json", *options)
    assert out.returncode == 0, out.stderr
    return sorted(os.path.relpath(h["path"], base / "photos") for h in json.loads(out.stdout))


def test_cli_filters(built):
    assert len(_found(built)) == 4
    assert _found(built, "--after", "2024-06", "--before", "2024-09") == ["旅行/2024/beach.jpg", "旅行/2024/sunset.jpg"]
    assert _found(built, "--after", "2024-08") == ["旅行/2024/sunset.jpg"]
    assert _found(built, "--before", "2021") == ["家/cat.jpg"]  # no EXIF: the file's time, 2020-09
    assert _found(built, "--in", "旅行/2024") == ["旅行/2024/beach.jpg", "旅行/2024/sunset.jpg"]
    assert _found(built, "--in", built / "photos" / "家", "--in", "旅行/2023") == ["家/cat.jpg", "旅行/2023/lake.jpg"]
    assert _found(built, "--camera", "iphone") == ["旅行/2024/beach.jpg"]
    sizes = sorted((built / "photos" / rel).stat().st_size for rel in PHOTOS)
    assert len(_found(built, "--min-size", str(sizes[2]))) == 2
    assert _found(built, "--kind", "video") == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--after", "去年夏天"), "cannot read the date '去年夏天'"),
        (("--in", "没有这个文件夹"), "no indexed photos under 没有这个文件夹"),
        (("--after", "2024-09", "--before", "2024-06"), "swap them"),
        (("--min-size", "huge"), "cannot read the size 'huge'"),
    ],
)
def test_bad_filters_are_one_line(built, options, message):
    out = run_cli("search", "海边", "--index", built / "idx", *options)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_an_index_from_before_filters_gets_them_without_embedding(built, tmp_path):
    import shutil
    import sqlite3

    # What migrating a schema-3 catalog leaves: every file without its filter facts
    shutil.copytree(built / "idx", tmp_path / "old")
    with sqlite3.connect(tmp_path / "old" / "catalog.sqlite3") as db:
        db.execute("UPDATE files SET taken = NULL, taken_from = NULL, camera = NULL, info_version = NULL")
    assert run_cli("search", "海边", "--index", tmp_path / "old", "--json", "--after", "2024").stdout.strip() == "[]"
    out = run_cli("index", built / "photos", "--index", tmp_path / "old", "--json", "-q")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["embedded"] == 0 and summary["unchanged"] == 4
    out = run_cli("search", "海边", "--index", tmp_path / "old", "--json", "--after", "2024")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 2


def test_api_filters(built):
    from cnclip.app.serve import create_app

    with TestClient(create_app(built / "idx"), base_url="http://127.0.0.1") as client:
        r = client.get("/api/search", params={"q": "海边", "after": "2024-06", "before": "2024-09"})
        assert r.status_code == 200, r.text
        assert sorted(h["name"] for h in r.json()["results"]) == ["beach.jpg", "sunset.jpg"]
        r = client.get("/api/search", params=[("q", "海边"), ("in", "家"), ("in", "旅行/2023")])
        assert sorted(h["name"] for h in r.json()["results"]) == ["cat.jpg", "lake.jpg"]
        r = client.get("/api/search", params={"q": "海边", "camera": "sony", "after": "", "in": ""})
        assert [h["name"] for h in r.json()["results"]] == ["sunset.jpg"]  # empty form fields filter nothing
        some_id = r.json()["results"][0]["id"]
        r = client.get("/api/similar", params={"id": some_id, "in": "旅行"})
        assert sorted(h["name"] for h in r.json()["results"]) == ["beach.jpg", "lake.jpg"]
        r = client.get("/api/search", params={"q": "海边", "after": "soon"})
        assert r.status_code == 400 and "cannot read the date 'soon'" in r.text


NO_USER = "~nosuchuser-cnclip"  # `~user` of a user this machine does not have


@pytest.mark.parametrize("options", [("--in", f"{NO_USER}/x"), ("--image", f"{NO_USER}/x.jpg")])
def test_a_path_of_an_unknown_user_is_one_line(built, options):
    import pwd

    with pytest.raises(KeyError):
        pwd.getpwnam(NO_USER[1:])
    out = run_cli("search", "海边", "--index", built / "idx", *options)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert f"cannot expand {NO_USER}: no such user; give the full path" in lines[0]


def test_a_path_of_an_unknown_user_is_a_4xx(built):
    from cnclip.app.serve import create_app

    with TestClient(create_app(built / "idx"), base_url="http://127.0.0.1") as client:
        r = client.get("/api/search", params={"q": "海边", "in": f"{NO_USER}/x"})
        assert r.status_code == 400 and f"cannot expand {NO_USER}" in r.json()["error"], r.text
        some_id = client.get("/api/search", params={"q": "海边"}).json()["results"][0]["id"]
        r = client.get("/api/similar", params={"id": some_id, "in": f"{NO_USER}/x"})
        assert r.status_code == 400 and f"cannot expand {NO_USER}" in r.json()["error"], r.text
