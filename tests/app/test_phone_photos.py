"""Phone photos end to end: HEIC and AVIF through the real `cnclip index` / `cnclip search`, turned
upright, corrupt or undecodable ones skipped in one line each, and a Live Photo indexed once."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import indexed_vectors, random_images, run_cli, write_video
from PIL import Image

import cnclip

# Enough of a QuickTime header to look like the video half of a Live Photo.
FAKE_MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  " + bytes(64)


@pytest.fixture(scope="module")
def model(model_dir):
    return cnclip.load_encoder(model_dir, device="cpu", backend="torch", precision="fp32")


def _photos(tmp_path, *names: str, seed: int, size=(96, 72)):
    """A folder of random pictures saved under `names` (pillow-heif writes the HEICs, Pillow the rest)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, img in zip(names, random_images(len(names), seed=seed, size=size), strict=True):
        img.save(folder / name, quality=90)
    return folder


def _index(folder, idx, model_dir, env=None):
    out = run_cli("index", folder, "--index", idx, "--model", model_dir, "--json", "-q", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def _names(paths) -> list[str]:
    return sorted(os.path.basename(p) for p in paths)


def test_heic_and_avif_are_indexed_and_found(tmp_path, model_dir, model):
    photos = _photos(tmp_path, "IMG_0001.HEIC", "web.avif", "old.jpg", seed=4, size=(160, 120))

    summary, _ = _index(photos, tmp_path / "idx", model_dir)
    assert (summary["added"], summary["embedded"], summary["skipped"]) == (3, 3, [])

    vectors = {os.path.basename(p): v for p, v in indexed_vectors(tmp_path / "idx").items()}
    for name in ("IMG_0001.HEIC", "web.avif"):
        # Lossy formats: the reference is what the file decodes to, not the picture that was saved.
        decoded = cnclip.load_image(photos / name)
        np.testing.assert_allclose(vectors[name], model.embed_images([decoded])[0], atol=1e-4)

    out = run_cli("search", "海边", "--index", tmp_path / "idx", "-k", "10", "--json")
    assert out.returncode == 0, out.stderr
    assert _names(h["path"] for h in json.loads(out.stdout)) == ["IMG_0001.HEIC", "old.jpg", "web.avif"]
    out = run_cli("search", "--image", photos / "IMG_0001.HEIC", "--index", tmp_path / "idx", "--json")
    assert out.returncode == 0, out.stderr  # a HEIC works as the query too


def test_rotated_heic_lands_upright(tmp_path, model_dir, model):
    photos = tmp_path / "photos"
    photos.mkdir()
    stored = Image.new("RGB", (160, 80), (0, 0, 255))  # as the sensor saw it: left red, right blue
    stored.paste((255, 0, 0), (0, 0, 80, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: red on top
    stored.save(photos / "IMG_0002.HEIC", exif=exif.tobytes(), quality=95)

    _index(photos, tmp_path / "idx", model_dir)
    (vector,) = indexed_vectors(tmp_path / "idx").values()
    turns = {
        "upright": stored.transpose(Image.Transpose.ROTATE_270),
        "not turned": stored,
        "turned twice": stored.transpose(Image.Transpose.ROTATE_180),
        "turned the wrong way": stored.transpose(Image.Transpose.ROTATE_90),
    }
    scores = dict(zip(turns, model.embed_images(list(turns.values())) @ vector, strict=True))
    assert max(scores, key=scores.get) == "upright", scores


def test_corrupt_heic_is_skipped_in_one_line(tmp_path, model_dir):
    photos = _photos(tmp_path, "good.heic", "cut.heic", seed=5)
    data = (photos / "cut.heic").read_bytes()
    (photos / "cut.heic").write_bytes(data[: len(data) // 2])
    (photos / "notes.heic").write_text("not a photo")

    summary, stderr = _index(photos, tmp_path / "idx", model_dir)
    assert summary["added"] == 1
    assert _names(s["path"] for s in summary["skipped"]) == ["cut.heic", "notes.heic"]
    for name in ("cut.heic", "notes.heic"):
        assert sum(name in line for line in stderr.splitlines()) == 1
    assert "Traceback" not in stderr


def test_without_pillow_heif_heic_is_skipped_with_the_fix(tmp_path, model_dir):
    photos = _photos(tmp_path, "IMG_0003.HEIC", "IMG_0004.JPG", seed=6)
    # An install made without pillow-heif: a stand-in package that fails to import comes first.
    stub = tmp_path / "no_heif" / "pillow_heif"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'pillow_heif'\")\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))}

    summary, stderr = _index(photos, tmp_path / "idx", model_dir, env=env)
    assert summary["added"] == 1
    (skipped,) = summary["skipped"]
    assert os.path.basename(skipped["path"]) == "IMG_0003.HEIC"
    assert skipped["reason"] == "HEIC/HEIF photos need the pillow-heif package: pip install pillow-heif"
    lines = [line for line in stderr.splitlines() if "IMG_0003.HEIC" in line]
    assert len(lines) == 1 and "pip install pillow-heif" in lines[0]
    assert "Traceback" not in stderr


def test_live_photo_pairs_index_the_still_once(tmp_path, model_dir):
    # A Live Photo as HEIC, and one shot with "Most Compatible" (JPEG), each with its video half.
    photos = _photos(tmp_path, "IMG_1234.HEIC", "IMG_1235.JPG", seed=8)
    (photos / "IMG_1234.MOV").write_bytes(FAKE_MOV)
    (photos / "IMG_1235.MOV").write_bytes(FAKE_MOV)
    write_video(photos / "IMG_1236.mov", [(200, 30, 30)], seconds_each=2)  # a video on its own: a video

    summary, stderr = _index(photos, tmp_path / "idx", model_dir)
    assert (summary["added"], summary["embedded"], summary["skipped"]) == (3, 3, [])
    assert "IMG_1234.MOV" not in stderr and "IMG_1235.MOV" not in stderr
    assert _names(indexed_vectors(tmp_path / "idx")) == ["IMG_1234.HEIC", "IMG_1235.JPG", "IMG_1236.mov#t=0.00"]

    again, _ = _index(photos, tmp_path / "idx", model_dir)
    assert (again["added"], again["unchanged"], again["removed"]) == (0, 3, 0)
    out = run_cli("search", "海边", "--index", tmp_path / "idx", "-k", "10", "--json")
    assert _names(h["path"] for h in json.loads(out.stdout)) == ["IMG_1234.HEIC", "IMG_1235.JPG", "IMG_1236.mov"]
