"""Tests for cnclip.model.transform: reference parity, mode handling, file loading and its failures."""

from __future__ import annotations

import gc
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from cnclip.errors import ImageError
from cnclip.model import transform
from cnclip.model.transform import (
    IMAGE_EXTENSIONS,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageTransform,
    load_image,
    preprocess,
    to_rgb,
)

WHITE = (255, 255, 255)
RED = (255, 0, 0)


def _rgb_noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _assert_one_line_naming(exc: pytest.ExceptionInfo[ImageError], path: Path) -> str:
    msg = str(exc.value)
    assert path.name in msg
    assert "\n" not in msg
    return msg


# 1. parity with the official preprocessing ------------------------------------------------


@pytest.mark.parametrize("image_size", [224, 336])
@pytest.mark.parametrize("wh", [(640, 480), (300, 1000), (224, 224), (50, 70)])
def test_preprocess_matches_cn_clip(wh: tuple[int, int], image_size: int) -> None:
    from cn_clip.clip import image_transform

    img = _rgb_noise(*wh, seed=wh[0] * 7 + wh[1])
    ours = preprocess(img, image_size)
    ref = image_transform(image_size)(img)
    assert ours.dtype == torch.float32
    assert ours.shape == (3, image_size, image_size)
    assert ours.is_contiguous()
    assert (ours - ref).abs().max().item() <= 1e-6


def test_constants_match_reference() -> None:
    from cn_clip.clip import image_transform

    normalize = image_transform(224).transforms[-1]
    assert tuple(normalize.mean) == OPENAI_MEAN
    assert tuple(normalize.std) == OPENAI_STD


# 2. mode zoo ------------------------------------------------------------------------------


def _rgba_half_transparent() -> Image.Image:
    # left half: fully transparent *black* (what a naive convert would show); right half: opaque red
    arr = np.zeros((20, 40, 4), dtype=np.uint8)
    arr[:, 20:] = (255, 0, 0, 255)
    return Image.fromarray(arr, "RGBA")


def _la_half_transparent() -> Image.Image:
    arr = np.zeros((20, 40, 2), dtype=np.uint8)
    arr[:, 20:] = (100, 255)
    return Image.fromarray(arr, "LA")


def _p_with_transparency() -> Image.Image:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), index 1 red
    img.paste(1, (20, 0, 40, 20))
    img.info["transparency"] = 0
    return img


def _p_plain() -> Image.Image:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 255, 255, 0, 0])  # index 0 blue, index 1 red
    img.paste(1, (20, 0, 40, 20))
    return img


def _gradient16() -> Image.Image:
    arr = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    return Image.fromarray(arr)  # mode I;16


def _one_bit() -> Image.Image:
    img = Image.new("1", (40, 20), 0)
    img.paste(1, (20, 0, 40, 20))
    return img


def _float_gradient() -> Image.Image:
    return Image.fromarray(np.linspace(0.0, 1.0, 64 * 32, dtype=np.float32).reshape(32, 64), "F")


def _check_half_white_half_red(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((2, 10)) == WHITE
    assert _close(img.getpixel((37, 10)), RED)


def _check_la(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((2, 10)) == WHITE
    assert img.getpixel((37, 10)) == (100, 100, 100)


def _check_p_plain(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((2, 10)) == (0, 0, 255)
    assert img.getpixel((37, 10)) == RED


def _check_spans_full_range(img: Image.Image) -> None:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.min() <= 2 and arr.max() >= 253  # not clipped to all-white
    assert (arr[..., 0] == arr[..., 2]).all()  # still grey
    assert np.all(np.diff(arr[..., 0].ravel().astype(int)) >= 0)  # gradient order kept


def _check_l(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (77, 77, 77)


def _check_one_bit(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((2, 10)) == (0, 0, 0)
    assert img.getpixel((37, 10)) == WHITE


# (name, factory, file extension to save as, check)
MODE_ZOO = [
    ("RGBA", _rgba_half_transparent, ".png", _check_half_white_half_red),
    ("LA", _la_half_transparent, ".png", _check_la),
    ("P+transparency", _p_with_transparency, ".png", _check_half_white_half_red),
    ("P", _p_plain, ".png", _check_p_plain),
    ("I;16", _gradient16, ".png", _check_spans_full_range),
    ("L", lambda: Image.new("L", (20, 20), 77), ".png", _check_l),
    ("1", _one_bit, ".png", _check_one_bit),
    ("F", _float_gradient, ".tif", _check_spans_full_range),
]


@pytest.mark.parametrize(("factory", "check"), [(z[1], z[3]) for z in MODE_ZOO], ids=[z[0] for z in MODE_ZOO])
def test_to_rgb_modes(factory, check) -> None:
    check(to_rgb(factory()))


@pytest.mark.parametrize(
    ("factory", "ext", "check"), [(z[1], z[2], z[3]) for z in MODE_ZOO], ids=[z[0] for z in MODE_ZOO]
)
def test_load_image_modes(tmp_path: Path, factory, ext: str, check) -> None:
    path = tmp_path / f"img{ext}"
    factory().save(path)
    check(load_image(path))


def test_saved_modes_round_trip_as_intended(tmp_path: Path) -> None:
    # Guards the zoo itself: the files really are in the modes the tests claim to cover.
    for name, factory, ext, _ in MODE_ZOO:
        path = tmp_path / f"{name.replace(';', '_').replace('+', '_')}{ext}"
        factory().save(path)
        with Image.open(path) as img:
            expected = {"P+transparency": "P", "I;16": ("I;16", "I")}.get(name, name)
            assert img.mode in (expected if isinstance(expected, tuple) else (expected,)), name
            if name == "P+transparency":
                assert "transparency" in img.info


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    assert _close(to_rgb(cmyk).getpixel((5, 5)), RED)
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB"
    assert _close(img.getpixel((16, 16)), RED)


def test_32bit_int_and_big_endian_16bit() -> None:
    wide = Image.fromarray(np.linspace(0, 65535, 256).astype(np.int32).reshape(16, 16), "I")
    assert wide.mode == "I"
    _check_spans_full_range(to_rgb(wide))
    big = Image.new("I;16B", (8, 8), 65535)
    assert to_rgb(big).getpixel((0, 0)) == WHITE
    dark = Image.new("I;16", (8, 8), 4096)  # a 12-bit value in a 16-bit file: dark, not white
    assert to_rgb(dark).getpixel((0, 0)) == (16, 16, 16)


def test_float_outside_unit_range_is_stretched() -> None:
    arr = np.linspace(-5.0, 5.0, 100, dtype=np.float32).reshape(10, 10)
    arr[0, 1] = np.nan
    out = np.asarray(to_rgb(Image.fromarray(arr, "F")))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_semi_transparent_blends_with_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    r, g, b = to_rgb(img).getpixel((0, 0))
    assert r == 255 and 125 <= g <= 129 and g == b


def test_rgb_returned_unchanged() -> None:
    img = _rgb_noise(10, 10, seed=1)
    assert to_rgb(img) is img


# 3. EXIF orientation ----------------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, (0, 0, 255)), (8, (0, 0, 255), RED)])
def test_exif_orientation(tmp_path: Path, orientation: int, top, bottom) -> None:
    # Stored 80 wide x 40 tall: left half red, right half blue.
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    img.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)

    out = load_image(path)
    assert out.size == (40, 80)
    # 6 = rotate 90 clockwise to display, so the stored left edge becomes the top; 8 is the reverse.
    for x in (2, 37):
        assert _close(out.getpixel((x, 2)), top)
        assert _close(out.getpixel((x, 77)), bottom)


# 4. animated GIF --------------------------------------------------------------------------


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    assert out.getpixel((15, 10)) == RED


def test_animated_webp_first_frame(tmp_path: Path) -> None:
    if not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, (0, 0, 255))]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert load_image(path).getpixel((15, 10)) == RED


# 5. JPEG draft mode -----------------------------------------------------------------------


def test_draft_downscales_big_jpeg(tmp_path: Path) -> None:
    ys, xs = np.mgrid[0:3000, 0:4000]
    arr = np.stack([xs * 255 // 4000, ys * 255 // 3000, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr, "RGB").save(path, quality=85)

    small = load_image(path, draft_size=224)
    assert small.mode == "RGB"
    assert min(small.size) >= 224
    assert small.size[0] * small.size[1] <= 4000 * 3000 // 16  # at least a 1/4 scale per side
    full = load_image(path)
    assert full.size == (4000, 3000)

    # still preprocesses to a sensible tensor, close to the full decode
    full_t = preprocess(full, 224)
    draft_t = preprocess(small, 224)
    assert (full_t - draft_t).abs().mean().item() < 0.05


def test_draft_ignored_for_non_jpeg_and_small_jpeg(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    _rgb_noise(300, 200, seed=2).save(png)
    assert load_image(png, draft_size=64).size == (300, 200)
    jpg = tmp_path / "small.jpg"
    _rgb_noise(100, 80, seed=3).save(jpg)
    assert load_image(jpg, draft_size=224).size == (100, 80)


# 6. bad inputs ----------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "empty file" in _assert_one_line_naming(exc, path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    _rgb_noise(256, 256, seed=4).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "truncated or corrupt" in _assert_one_line_naming(exc, path)


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "not an image" in _assert_one_line_naming(exc, path)


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "d.jpg"
    path.mkdir()
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "directory" in _assert_one_line_naming(exc, path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "no such file" in _assert_one_line_naming(exc, path)


def test_permission_denied_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores mode bits, so make the module's open() fail the way it would for a normal user.
    path = tmp_path / "locked.png"
    _rgb_noise(8, 8, seed=5).save(path)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(file))

    monkeypatch.setattr(transform, "open", denied, raising=False)
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "permission denied" in _assert_one_line_naming(exc, path)


def test_over_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "hundred.png"
    _rgb_noise(100, 100, seed=6).save(path)
    with pytest.raises(ImageError) as exc:
        load_image(path, max_pixels=1000)
    msg = _assert_one_line_naming(exc, path)
    assert "10,000 pixels" in msg and "max_pixels" in msg
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A valid-looking PNG header for a huge canvas, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_pillow_bomb_warning_and_error_do_not_escape(tmp_path: Path) -> None:
    warned = tmp_path / "warn.png"  # 100 MP: above Pillow's warning level, under our default cap
    _png_claiming_size(warned, 10_000, 10_000)
    refused = tmp_path / "bomb.png"  # 200 MP: above Pillow's hard limit
    _png_claiming_size(refused, 20_000, 10_000)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as exc:
            load_image(warned)  # gets past both caps, then fails on the missing data
        assert "truncated or corrupt" in _assert_one_line_naming(exc, warned)
        with pytest.raises(ImageError) as exc:
            load_image(refused)
        assert "200,000,000 pixels" in _assert_one_line_naming(exc, refused)
        with pytest.raises(ImageError) as exc:
            load_image(warned, max_pixels=1_000_000)
        assert "max_pixels" in _assert_one_line_naming(exc, warned)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_no_resource_warning(tmp_path: Path) -> None:
    good = tmp_path / "ok.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, WHITE)]
    frames[0].save(good, save_all=True, append_images=frames[1:])
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(good)
        with pytest.raises(ImageError):
            load_image(bad)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# 7. ImageTransform ------------------------------------------------------------------------


def test_image_transform_batch() -> None:
    tf = ImageTransform(224)
    images = [_rgb_noise(640, 480, seed=7), Image.new("L", (50, 90), 30), _rgba_half_transparent()]
    out = tf.batch(images)
    assert out.shape == (3, 3, 224, 224)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], tf(images[0]))
    assert tf.batch([]).shape == (0, 3, 224, 224)
    assert "224" in repr(tf)


@pytest.mark.parametrize("bad", [0, -1, 22.4, True])
def test_image_transform_rejects_bad_size(bad) -> None:
    with pytest.raises(ValueError):
        ImageTransform(bad)


def test_image_extensions() -> None:
    base = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff"}
    assert base <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert (".webp" in IMAGE_EXTENSIONS) == features.check("webp")
    # phone formats are always walked: without their decoder a file is skipped with the install hint
    assert {".heic", ".heif", ".avif"} <= IMAGE_EXTENSIONS


# 9. phone formats: HEIC/HEIF through pillow-heif, AVIF, Live Photos ---------------------------


def _two_tone(width: int = 80, height: int = 40) -> Image.Image:
    """Left half red, right half blue: which edge ends up on top shows how a file was turned."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste(RED, (0, 0, width // 2, height))
    return img


def test_phone_formats_are_image_extensions() -> None:
    assert {".heic", ".heif", ".hif", ".avif"} <= IMAGE_EXTENSIONS
    assert transform.HEIF_EXTENSIONS <= IMAGE_EXTENSIONS
    # A Live Photo's video half: the still is the photo (see the note above IMAGE_EXTENSIONS).
    assert ".mov" not in IMAGE_EXTENSIONS and ".mp4" not in IMAGE_EXTENSIONS


@pytest.mark.parametrize("ext", [".heic", ".heif", ".hif", ".HEIC", ".avif"])
def test_phone_formats_decode(tmp_path: Path, ext: str) -> None:
    src = _rgb_noise(16, 12, seed=5).resize((128, 96), Image.Resampling.BICUBIC)  # smooth, like a photo
    path = tmp_path / f"photo{ext}"
    src.save(path, quality=90)  # pillow-heif's saver for the HEIF names, Pillow's own for AVIF
    with Image.open(path) as raw:
        assert raw.format == ("AVIF" if ext == ".avif" else "HEIF")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (128, 96)
    error = np.abs(np.asarray(out, np.int16) - np.asarray(src, np.int16)).mean()
    assert error < 12  # lossy, but the same picture


@pytest.mark.parametrize("ext", [".heic", ".avif"])
@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, (0, 0, 255)), (8, (0, 0, 255), RED)])
def test_phone_formats_orientation_applied_once(tmp_path: Path, ext: str, orientation: int, top, bottom) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{ext}"
    _two_tone().save(path, exif=exif.tobytes(), quality=95)
    if ext == ".heic":
        # Like an iPhone's: the rotation is in the container (irot) and the EXIF tag says it too,
        # so applying both would turn the picture twice.
        with Image.open(path) as raw:
            assert raw.size == (40, 80) and raw.info["original_orientation"] == orientation

    out = load_image(path)
    assert out.size == (40, 80)
    for x in (2, 37):
        assert _close(out.getpixel((x, 2)), top)
        assert _close(out.getpixel((x, 77)), bottom)


def test_heic_draft_decodes_the_embedded_thumbnail(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "IMG_0001.HEIC"
    _two_tone(640, 480).save(path, exif=exif.tobytes(), quality=90, thumbnails=[320])  # as iPhones store one

    assert load_image(path).size == (480, 640)
    small = load_image(path, draft_size=224)  # the 320x240 thumbnail covers 224 on both sides
    assert small.size == (240, 320)
    assert _close(small.getpixel((120, 5)), RED) and _close(small.getpixel((120, 314)), (0, 0, 255))
    assert load_image(path, draft_size=300).size == (480, 640)  # too small for 300: the full image


@pytest.mark.parametrize("ext", [".heic", ".avif"])
def test_corrupt_phone_photo(tmp_path: Path, ext: str) -> None:
    good = tmp_path / f"good{ext}"
    _rgb_noise(64, 48, seed=2).save(good, quality=90)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError) as exc:
        load_image(path)
    _assert_one_line_naming(exc, path)

    path = tmp_path / f"notes{ext}"
    path.write_text("not a photo")
    with pytest.raises(ImageError, match="not an image Pillow can read") as exc:
        load_image(path)
    _assert_one_line_naming(exc, path)


_WITHOUT_DECODERS = """
import sys
# An install without pillow-heif, on a Pillow built without AVIF.
sys.modules["pillow_heif"] = sys.modules["PIL._avif"] = sys.modules["PIL.AvifImagePlugin"] = None
from cnclip.errors import ImageError
from cnclip.model.transform import IMAGE_EXTENSIONS, load_image
assert {".heic", ".avif"} <= IMAGE_EXTENSIONS  # still walked, so the user hears about them
for path in sys.argv[1:]:
    try:
        load_image(path)
    except ImageError as exc:
        print(exc)
"""


def test_missing_decoders_say_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    paths = [tmp_path / "IMG_0001.HEIC", tmp_path / "IMG_0002.avif"]
    for path in paths:
        _rgb_noise(32, 24, seed=3).save(path, quality=90)
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DECODERS, *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    heic, avif = out.stdout.splitlines()
    assert heic == f"{paths[0]}: HEIC/HEIF photos need the pillow-heif package: pip install pillow-heif"
    assert avif == f"{paths[1]}: AVIF photos need Pillow 11.3 or newer: pip install -U pillow"
