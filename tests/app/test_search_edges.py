"""Edges of filtered and combined search through the API and the CLI: sizes past any file, and
"more like this" from a video frame."""

from __future__ import annotations

import pytest
import torch
from conftest import write_photos, write_video
from fastapi.testclient import TestClient

import cnclip
from cnclip.app.serve import create_app


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("pending")
    torch.manual_seed(5)
    model = str(cnclip.create_model("tiny-vit").save_pretrained(base / "model"))
    write_photos(base / "photos", 4, seed=3)
    write_video(base / "photos" / "clip.mp4", [(200, 30, 30), (30, 200, 30), (30, 30, 200)], seconds_each=4)
    with cnclip.Index.open(base / "idx", model=model, create=True) as index:
        index.add_folder(base / "photos")
    return base


@pytest.mark.parametrize("size", ["9999999999999999999G", "99999999999999999999"])
def test_a_size_beyond_any_file_is_a_4xx_not_a_500(built, size):
    with TestClient(create_app(built / "idx"), base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        r = client.get("/api/search", params={"q": "猫", "min_size": size})
        assert r.status_code == 400 and "size" in r.json()["error"], r.text


def test_a_size_beyond_any_file_is_one_cli_line(built, capsys):
    from cnclip.app import cli

    for size in ("9999999999999999999G", "1" + "0" * 400):
        assert cli.main(["search", "猫", "--index", str(built / "idx"), "--max-size", size]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "size" in err[0], err


def test_like_a_video_leaves_that_video_out(built):
    with cnclip.Index.open(built / "idx") as index:
        frame = index.catalog.file_id_for_path(str(built / "photos" / "clip.mp4") + "#t=4.00")
    assert frame
    with TestClient(create_app(built / "idx"), base_url="http://127.0.0.1") as client:
        r = client.get("/api/search", params={"q": "红色", "like": frame, "k": 10})
        assert r.status_code == 200, r.text
        assert "clip.mp4" not in [h["name"] for h in r.json()["results"]]  # as /api/similar leaves it out
        similar = client.get("/api/similar", params={"id": frame, "k": 10}).json()
        assert "clip.mp4" not in [h["name"] for h in similar["results"]]
