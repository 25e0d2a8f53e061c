"""The facts filters read from a photo's header: date taken, camera, pixel size; the file's time otherwise."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest
from PIL import Image

from cnclip.index.metadata import camera_name, exif_date, file_time, read_info


def _photo(path, fmt="JPEG", date=None, make=None, model=None, datetime=None, size=(60, 40)):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if date:
        exif.get_ifd(0x8769)[0x9003] = date
    if datetime:
        exif[0x0132] = datetime
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    image.save(path, fmt, exif=exif)
    return path


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2024:07:21 18:03:11", "2024-07-21T18:03:11"),
        ("2024-07-21 18:03:11", "2024-07-21T18:03:11"),
        ("2024:07:21 18:03:11\x00", "2024-07-21T18:03:11"),
        ("0000:00:00 00:00:00", None),  # a camera whose clock was never set
        ("    :  :     :  :  ", None),
        (None, None),
        (b"2024:07:21 18:03:11", None),
    ],
)
def test_exif_dates(text, iso):
    assert exif_date(text) == iso


def test_camera_names():
    assert camera_name("Apple", "iPhone 13") == "Apple iPhone 13"
    assert camera_name("Canon", "Canon EOS R5") == "Canon EOS R5"
    assert camera_name("NIKON CORPORATION", "NIKON Z 6") == "NIKON Z 6"
    assert camera_name("HUAWEI\x00", "") == "HUAWEI"
    assert camera_name(None, None) is None


def test_jpeg_with_exif(tmp_path):
    path = _photo(tmp_path / "a.jpg", date="2023:05:01 08:30:00", make="Apple", model="iPhone 13")
    info = read_info(path, os.stat(path).st_mtime_ns)
    assert (info.taken, info.taken_from, info.camera) == ("2023-05-01T08:30:00", "exif", "Apple iPhone 13")
    assert (info.width, info.height, info.kind) == (60, 40, "photo")


def test_ifd0_datetime_when_there_is_no_original(tmp_path):
    path = _photo(tmp_path / "a.jpg", datetime="2022:01:02 03:04:05")
    assert read_info(path, 0).taken == "2022-01-02T03:04:05"


def test_heic_with_exif(tmp_path):
    import pillow_heif

    pillow_heif.register_heif_opener()
    path = _photo(tmp_path / "a.heic", fmt="HEIF", date="2021:12:24 20:00:00", make="Apple", model="iPhone 15 Pro")
    info = read_info(path, 0)
    assert (info.taken, info.camera, info.width) == ("2021-12-24T20:00:00", "Apple iPhone 15 Pro", 60)


def test_no_exif_or_not_an_image_falls_back_to_the_file_time(tmp_path):
    plain = tmp_path / "a.png"
    Image.new("RGB", (10, 8)).save(plain)
    mtime = int(dt.datetime(2019, 3, 4, 5, 6, 7).timestamp() * 1e9)
    assert read_info(plain, mtime).taken == "2019-03-04T05:06:07" == file_time(mtime)
    assert read_info(plain, mtime).taken_from == "file" and read_info(plain, mtime).width == 10
    broken = tmp_path / "b.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    info = read_info(broken, mtime)
    assert (info.taken, info.taken_from, info.width) == ("2019-03-04T05:06:07", "file", None)
    assert read_info(tmp_path / "gone.jpg", mtime).taken_from == "file"
