"""Videos through the real CLI and the API: frames indexed, one result per video with the moment,
a screenshot finds the moment, renamed videos reuse their frames, bad videos are one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli, write_video
from fastapi.testclient import TestClient
from PIL import Image

import cnclip

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_video(photos / "旅行.mp4", [RED, GREEN, BLUE], seconds_each=4)
    for i, color in enumerate([(240, 240, 0), (0, 240, 240)]):
        pixels = np.full((64, 96, 3), color, np.uint8)
        pixels[::3, ::4] = 0
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    return photos


def _index(folder, idx, model_dir, *extra):
    out = run_cli("index", folder, "--index", idx, "--model", model_dir, "--json", "-q", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def _screenshot(tmp_path, color):
    pixels = np.full((64, 96, 3), color, np.uint8)
    pixels[::5, ::7] = 255 - np.array(color, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "shot.png")
    return tmp_path / "shot.png"


def test_a_screenshot_finds_the_moment_and_a_video_is_one_result(tmp_path, folder, model_dir):
    idx = tmp_path / "idx"
    summary, _ = _index(folder, idx, model_dir)
    assert (summary["added"], summary["embedded"], summary["video_frames"]) == (3, 3, 3)
    for color, moment in ((GREEN, 4.0), (BLUE, 8.0)):
        out = run_cli("search", "--image", _screenshot(tmp_path, color), "--index", idx, "--json", "-k", "3")
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)
        assert [h["path"] for h in hits].count(str(folder / "旅行.mp4")) == 1  # three frames, one result
        assert hits[0]["path"] == str(folder / "旅行.mp4") and hits[0]["t"] == moment
        assert "t" not in hits[1]  # photos have no time
    plain = run_cli("search", "--image", _screenshot(tmp_path, BLUE), "--index", idx, "-k", "1")
    assert plain.stdout.split("\t")[1].strip() == f"{folder / '旅行.mp4'}#t=8"
    out = run_cli("search", "视频", "--index", idx, "--json", "--kind", "video")
    assert [h["path"] for h in json.loads(out.stdout)] == [str(folder / "旅行.mp4")]
    info = json.loads(run_cli("info", "--index", idx, "--json").stdout)
    assert (info["images"], info["videos"]) == (2, 1)


def test_unchanged_renamed_and_deleted_videos(tmp_path, folder, model_dir):
    idx = tmp_path / "idx"
    _index(folder, idx, model_dir)
    again, _ = _index(folder, idx, model_dir)
    assert (again["unchanged"], again["embedded"], again["removed"]) == (3, 0, 0)
    os.rename(folder / "旅行.mp4", folder / "trip.mov")
    moved, _ = _index(folder, idx, model_dir)
    assert (moved["added"], moved["removed"], moved["embedded"], moved["reused"]) == (1, 1, 0, 1)
    out = run_cli("search", "--image", _screenshot(tmp_path, GREEN), "--index", idx, "--json", "-k", "1")
    assert json.loads(out.stdout)[0] == {**json.loads(out.stdout)[0], "path": str(folder / "trip.mov"), "t": 4.0}
    (folder / "trip.mov").unlink()
    gone, _ = _index(folder, idx, model_dir)
    assert gone["removed"] == 1
    out = run_cli("search", "视频", "--index", idx, "--json", "--kind", "video")
    assert json.loads(out.stdout) == []


def test_bad_videos_are_skipped_in_one_line_and_live_photos_index_the_still(tmp_path, folder, model_dir):
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    shutil.copyfile(folder / "p0.png", folder / "IMG_0001.png")
    write_video(folder / "IMG_0001.MOV", [RED], seconds_each=2)  # the moving half of a Live Photo
    summary, stderr = _index(folder, tmp_path / "idx", model_dir)
    assert [s["path"] for s in summary["skipped"]] == [str(folder / "broken.mp4")]
    assert "cannot read the video" in summary["skipped"][0]["reason"]
    assert summary["video_frames"] == 3  # 旅行.mp4 only


def test_api_results_carry_the_moment_thumbnails_and_the_video(tmp_path, folder, model_dir):
    from cnclip.app.serve import create_app

    idx = tmp_path / "idx"
    _index(folder, idx, model_dir)
    with TestClient(create_app(idx), base_url="http://127.0.0.1") as client:
        with open(_screenshot(tmp_path, BLUE), "rb") as f:
            r = client.post("/api/search/image", files={"file": ("shot.png", f, "image/png")}, data={"k": "3"})
        assert r.status_code == 200, r.text
        best = r.json()["results"][0]
        assert (best["name"], best["t"]) == ("旅行.mp4", 8.0)
        thumb = client.get(best["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        from io import BytesIO

        r_, g_, b_ = Image.open(BytesIO(thumb.content)).convert("RGB").resize((1, 1)).getpixel((0, 0))
        assert b_ > r_ and b_ > g_  # the frame at 8 s, not the first
        video = client.get(best["image"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        assert video.content == (folder / "旅行.mp4").read_bytes()
        photos = [h for h in r.json()["results"] if h["name"].endswith(".png")]
        assert photos and all(h["t"] is None for h in photos)


def test_a_symlinked_video_on_a_drive_not_mounted_keeps_its_frames(tmp_path, folder, model_dir):
    drive = tmp_path / "drive"
    drive.mkdir()
    os.replace(folder / "旅行.mp4", drive / "trip.mp4")
    os.symlink(drive / "trip.mp4", folder / "trip.mp4")
    with cnclip.Index.open(tmp_path / "idx", model=model_dir, create=True) as index:
        assert index.add_folder(folder).video_frames == 3
        os.rename(drive, tmp_path / "unmounted")
        away = index.add_folder(folder)
        assert [item["path"] for item in away.offline] == [str(folder / "trip.mp4")] and away.removed == 0
        assert index.catalog.frame_count() == (0, 0)  # out of searches while the drive is away
        os.rename(tmp_path / "unmounted", drive)
        back = index.add_folder(folder)
        assert (back.unchanged, back.embedded) == (3, 0)
        assert index.catalog.frame_count() == (1, 3)  # its frames are back, not lost
