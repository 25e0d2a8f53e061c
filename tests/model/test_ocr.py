"""The word reader with the real PP-OCR models from the rapidocr wheel, on generated pictures."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import NO_OPENVINO, X86, needs_openvino, word_photo
from PIL import Image

from cnclip.errors import CNClipError, ImageError, ReaderError
from cnclip.model import ocr
from cnclip.model.ocr import (
    ENGINES,
    RAPIDOCR_VERSION,
    READER,
    Line,
    WordReader,
    default_engine,
    model_files,
)


@pytest.fixture(scope="module", params=ENGINES)
def reader(request):
    """Each test reads with both engines, whichever one this CPU would pick."""
    if request.param == "openvino" and not X86:
        pytest.skip(NO_OPENVINO)
    return WordReader(engine=request.param)


def test_the_pinned_reader_is_the_one_installed():
    # the adapter is written and tested against one release: a silent upgrade must show up here
    assert importlib.metadata.version("rapidocr") == RAPIDOCR_VERSION
    assert RAPIDOCR_VERSION in READER


def test_reads_chinese_lines_exactly_with_boxes(tmp_path, reader):
    path = word_photo(tmp_path / "note.png", ["请凭取件码领取包裹", "增值税普通发票 2024"])
    lines = reader.read_file(path)
    assert [line.text for line in lines] == ["请凭取件码领取包裹", "增值税普通发票 2024"]
    assert all(0.9 < line.score <= 1.0 for line in lines)
    # drawn at x=53, y=80 and y=160, 40 px high: the boxes are where the words are
    (x0, y0), _, (x2, y2), _ = lines[0].box
    assert abs(x0 - 53) < 15 and abs(y0 - 80) < 15 and y2 - y0 < 70 and x2 > 380


def test_traditional_text_is_read_as_written(tmp_path, reader):
    lines = reader.read_file(word_photo(tmp_path / "t.png", ["會議紀要"]))
    assert [line.text for line in lines] == ["會議紀要"]


def test_a_picture_without_words_reads_as_none(tmp_path, reader):
    path = tmp_path / "blank.jpg"
    Image.new("RGB", (800, 600), (90, 140, 200)).save(path)
    assert reader.read_file(path) == []


def test_large_pictures_are_read_smaller_and_boxes_map_back(tmp_path):
    reader = WordReader(max_side=1000)
    small = word_photo(tmp_path / "small.png", ["取件码"], size=(640, 480), font_size=40)
    big = tmp_path / "big.png"
    Image.open(small).resize((1920, 1440), Image.Resampling.BICUBIC).save(big)  # 3x, so words at 120 px
    lines = reader.read_file(big)
    assert [line.text for line in lines] == ["取件码"]
    (x0, y0), _, (x2, y2), _ = lines[0].box
    # in the big picture's pixels, though read at 1000 px: 3x the small picture's box
    assert abs(x0 - 3 * 53) < 40 and abs(y0 - 3 * 80) < 40 and 90 < y2 - y0 < 220


def test_a_file_that_is_no_image_is_one_clear_error(tmp_path, reader):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        reader.read_file(bad)


def test_a_reader_failure_is_an_image_error_not_a_crash(tmp_path, monkeypatch):
    reader = WordReader()

    def explode(image, **stages):
        raise RuntimeError("onnxruntime: bad input shape")

    monkeypatch.setattr(reader, "_load", lambda side=None: explode)
    with pytest.raises(ImageError, match="word reader failed.*bad input shape"):
        reader.read(Image.new("RGB", (64, 64)))


def test_lines_round_trip_through_json():
    line = Line("发票", 0.98765, ((1, 2), (30, 2), (30, 20), (1, 20)))
    assert Line.from_dict(line.to_dict()) == Line("发票", 0.9877, line.box)


@pytest.mark.parametrize("engine", ENGINES)
def test_reads_with_no_network_at_all(tmp_path, engine):
    """The models come with the install: a process whose every connection fails still reads (the
    OpenVINO engine too, which RapidOCR would otherwise point at converted models to download)."""
    if engine == "openvino" and not X86:
        pytest.skip(NO_OPENVINO)
    path = word_photo(tmp_path / "n.png", ["取件码"])
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('no network in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from cnclip.model.ocr import WordReader\n"
        f"print([l.text for l in WordReader().read_file({str(path)!r})])\n"
    )
    env = {**os.environ, "CNCLIP_OCR_ENGINE": engine}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['取件码']"
    assert out.stderr == ""  # and says nothing while loading its models


def test_a_lone_latin_letter_is_dropped_a_lone_chinese_character_kept(tmp_path, reader):
    assert reader.read_file(word_photo(tmp_path / "a.png", ["a"], font_size=64)) == []
    assert [line.text for line in reader.read_file(word_photo(tmp_path / "fu.png", ["福"], font_size=64))] == ["福"]


def test_boxes_are_in_the_files_pixels_when_a_jpeg_decodes_smaller(tmp_path, reader):
    small = word_photo(tmp_path / "small.png", ["取件码"], size=(640, 480), font_size=40)
    big = tmp_path / "big.jpg"
    Image.open(small).resize((3200, 2400), Image.Resampling.BICUBIC).save(big, quality=92)  # decodes at 1/2
    [line] = reader.read_file(big)
    (x0, y0), _, (x2, y2), _ = line.box
    assert line.text == "取件码" and abs(x0 - 5 * 53) < 60 and abs(y0 - 5 * 80) < 60 and 150 < y2 - y0 < 360


def test_boxes_follow_the_exif_rotation(tmp_path, reader):
    small = word_photo(tmp_path / "small.png", ["取件码"], size=(640, 480), font_size=40)
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the file holds the picture turned back
    Image.open(small).rotate(90, expand=True).resize((1440, 1920)).save(turned, quality=92, exif=exif)
    [line] = reader.read_file(turned)
    assert line.text == "取件码"
    assert all(0 <= x <= 1920 and 0 <= y <= 1440 for x, y in line.box)  # in the upright 1920x1440 picture


def _without_openvino(monkeypatch) -> None:
    """As if OpenVINO were not installed (an ARM machine, or a trimmed install)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))


def test_the_engine_follows_the_cpu_unless_named(monkeypatch):
    monkeypatch.delenv("CNCLIP_OCR_ENGINE", raising=False)
    monkeypatch.setenv("CNCLIP_CPU_BF16", "0")
    assert default_engine() == "onnxruntime"  # AVX2 alone: OpenVINO's fp32 is not worth a second engine
    if X86:  # where it is installed, a CPU with fast bf16 reads in OpenVINO, which computes in bf16 there
        monkeypatch.setenv("CNCLIP_CPU_BF16", "1")
        assert default_engine() == "openvino"
        _without_openvino(monkeypatch)
        assert default_engine() == "onnxruntime"  # not installed: ONNX Runtime, no error
        monkeypatch.undo()
    monkeypatch.setenv("CNCLIP_CPU_BF16", "1")
    monkeypatch.setenv("CNCLIP_OCR_ENGINE", "onnxruntime")
    assert default_engine() == "onnxruntime"
    assert WordReader().engine == "onnxruntime"


def test_an_unknown_engine_is_one_clear_error(monkeypatch):
    with pytest.raises(CNClipError, match="'tensorrt' is not a reader engine; use one of: onnxruntime, openvino"):
        WordReader(engine="tensorrt")
    monkeypatch.setenv("CNCLIP_OCR_ENGINE", "paddle")
    with pytest.raises(CNClipError, match=r"\$CNCLIP_OCR_ENGINE='paddle' is not a reader engine"):
        WordReader()


def test_openvino_without_openvino_installed_says_how_to_get_it(monkeypatch):
    _without_openvino(monkeypatch)
    with pytest.raises(CNClipError, match="pip install openvino"):
        WordReader(engine="openvino")


def test_the_wheel_carries_every_model_the_openvino_engine_is_given():
    files = model_files()
    assert set(files) == {"Det", "Rec", "Cls"}
    assert all(f.is_file() and f.stat().st_size > 100_000 for f in files.values()), files


@needs_openvino
def test_both_engines_read_the_same_lines_in_the_same_places(tmp_path):
    path = word_photo(tmp_path / "both.png", ["请凭取件码领取包裹", "增值税普通发票 2024", "會議紀要"])
    ort, ov = (WordReader(engine=e).read_file(path) for e in ("onnxruntime", "openvino"))
    assert (
        [line.text for line in ort]
        == [line.text for line in ov]
        == [
            "请凭取件码领取包裹",
            "增值税普通发票 2024",
            "會議紀要",
        ]
    )
    for a, b in zip(ort, ov, strict=True):  # bf16 where the CPU has it: a few pixels, a little score
        assert abs(a.score - b.score) < 0.05
        assert max(abs(pa - pb) for p, q in zip(a.box, b.box, strict=True) for pa, pb in zip(p, q, strict=True)) <= 6


@needs_openvino
def test_openvino_picked_for_the_cpu_falls_back_when_it_cannot_load(tmp_path, monkeypatch, caplog):
    path = word_photo(tmp_path / "k.png", ["取件码"])
    monkeypatch.setenv("CNCLIP_CPU_BF16", "1")  # this CPU would read in OpenVINO
    monkeypatch.delenv("CNCLIP_OCR_ENGINE", raising=False)
    monkeypatch.setattr(ocr, "model_files", lambda: dict.fromkeys(("Det", "Rec", "Cls"), tmp_path / "gone.onnx"))
    reader = WordReader()
    assert reader.engine == "openvino"
    with caplog.at_level("WARNING", logger="cnclip.model.ocr"):
        assert [line.text for line in reader.read_file(path)] == ["取件码"]
    assert reader.engine == "onnxruntime" and "reading in ONNX Runtime" in caplog.text
    # asked for by name, it is not swapped behind the user's back: one line that says what to do
    with pytest.raises(ReaderError, match="could not load its models in openvino.*CNCLIP_OCR_ENGINE=onnxruntime"):
        WordReader(engine="openvino").read_file(path)
