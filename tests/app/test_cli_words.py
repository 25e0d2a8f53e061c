"""Words in photos through the real CLI: `cnclip index` reads them, `cnclip search` finds by them."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from conftest import mount_tmpfs, needs_openvino, random_images, run_cli, umount, word_photo
from PIL import Image

from cnclip.model.ocr import default_engine

OCR = {"CNCLIP_OCR": "1"}  # the suite's default is off (tests/conftest.py); these tests are about it


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    word_photo(root / "收据" / "fapiao.jpg", ["增值税普通发票", "金额 128.00"])
    word_photo(root / "截图" / "kuaidi.png", ["您的快递已到", "请凭取件码 8-3-2017 领取"], seed=1)
    word_photo(root / "截图" / "huiyi.png", ["會議紀要"], seed=2)
    (root / "风景").mkdir()
    for i, image in enumerate(random_images(3, seed=31, size=(320, 240))):
        image.save(root / "风景" / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def indexed(photos, model_dir, tmp_path_factory):
    idx = tmp_path_factory.mktemp("idx")
    out = run_cli("index", photos, "--index", idx, "--model", model_dir, "--json", "-q", env=OCR)
    assert out.returncode == 0, out.stderr
    return idx, json.loads(out.stdout), out.stderr


def _search(idx, *args):
    out = run_cli("search", *args, "--index", idx, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_index_reads_the_words_after_the_vectors(indexed):
    _, summary, stderr = indexed
    assert summary["added"] == 6 and summary["embedded"] == 6
    # the engine this CPU picks: ONNX Runtime under the suite's CNCLIP_CPU_BF16=0 (tests/conftest.py),
    # OpenVINO under `CNCLIP_CPU_BF16=1 pytest` (as an AMX machine would run it)
    assert summary["words"] == {
        "read": 6,
        "with_words": 3,
        "failed": [],
        "unreachable": [],
        "stopped": False,
        "engine": default_engine(),
    }
    assert "Traceback" not in stderr


def test_search_ranks_the_photos_with_the_words_first_and_shows_them(indexed, photos):
    idx, _, _ = indexed
    hits = _search(idx, "取件码", "-k", "6")
    assert hits[0]["path"] == str(photos / "截图" / "kuaidi.png")
    assert hits[0]["words"] == [{"text": "请凭取件码 8-3-2017 领取", "spans": [[2, 5]]}]
    assert len(hits) == 6 and all("words" not in h for h in hits[1:])

    out = run_cli("search", "发票", "--index", idx)  # the plain output names the line too
    assert out.returncode == 0 and out.stdout.splitlines()[0].endswith("fapiao.jpg\t「增值税普通发票」")


def test_words_only_no_words_and_traditional(indexed, photos):
    idx, _, _ = indexed
    assert [h["path"] for h in _search(idx, "会议纪要", "--words")] == [str(photos / "截图" / "huiyi.png")]
    assert _search(idx, "没有这些字", "--words") == []
    assert all("words" not in h for h in _search(idx, "取件码", "--no-words", "-k", "6"))
    refused = run_cli("search", "猫 + 狗", "--words", "--index", idx)
    assert refused.returncode != 0 and "one text query" in refused.stderr and "Traceback" not in refused.stderr


def test_the_contact_sheet_and_page_carry_the_words(indexed, tmp_path):
    idx, _, _ = indexed
    sheet, page = tmp_path / "hits.png", tmp_path / "hits.html"
    out = run_cli("search", "发票", "--index", idx, "-k", "2", "--grid", sheet, "--html", page)
    assert out.returncode == 0, out.stderr
    assert Image.open(sheet).size[0] > 0
    assert "增值税普通<mark>发票</mark>" in page.read_text("utf-8")


def test_info_says_how_far_reading_is(indexed):
    idx, _, _ = indexed
    out = run_cli("info", "--index", idx, "--json")
    assert json.loads(out.stdout)["words"] == {"photos": 6, "read": 6, "with_words": 3, "failed": 0}
    text = run_cli("info", "--index", idx).stdout
    assert "words    3 photos with words; 6 of 6 read" in text


def test_no_ocr_then_ocr_only_later_and_kill_9_in_between(tmp_path, model_dir):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    for i in range(20):
        word_photo(photos / f"{i:02d}.png", [f"第{i}号发票"], size=(320, 160), font_size=32, seed=i)
    out = run_cli("index", photos, "--index", idx, "--model", model_dir, "-q", "--no-ocr", env=OCR)
    assert out.returncode == 0, out.stderr
    assert run_cli("search", "发票", "--index", idx, "--words", "--json").stdout.strip() == "[]"
    info = json.loads(run_cli("info", "--index", idx, "--json").stdout)["words"]
    assert info == {"photos": 20, "read": 0, "with_words": 0, "failed": 0}
    unread = run_cli("words", photos / "00.png", "--index", idx)
    assert unread.returncode == 0 and unread.stdout == "" and "not read yet (cnclip index --ocr-only" in unread.stderr

    killed = run_cli("index", "--index", idx, "--ocr-only", "-q", env={"CNCLIP_FAULT": "words.after_batch"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the first batch survived the kill, and searches find it at once
    assert json.loads(run_cli("info", "--index", idx, "--json").stdout)["words"]["read"] == 16
    assert len(json.loads(run_cli("search", "发票", "--index", idx, "--words", "-k", "50", "--json").stdout)) == 16

    again = run_cli("index", photos, "--index", idx, "--ocr-only", "--json", "-q")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["words"]["read"] == 4  # only what was left
    hits = json.loads(run_cli("search", "第7号", "--index", idx, "--words", "--json").stdout)
    assert [h["path"] for h in hits] == [str(photos / "07.png")]


def test_a_file_the_reader_cannot_read_gets_one_line_and_stays_searchable(tmp_path, model_dir):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    word_photo(photos / "ok.png", ["取件码"])
    Image.new("RGB", (64, 48), (200, 10, 10)).save(photos / "soon-broken.png")
    assert run_cli("index", photos, "--index", idx, "--model", model_dir, "-q", "--no-ocr").returncode == 0
    (photos / "soon-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken after embedding")  # same path, now unreadable
    os.utime(photos / "soon-broken.png", ns=(1, 1))
    out = run_cli("index", "--index", idx, "--ocr-only", "-q", "--json")
    assert out.returncode == 0, out.stderr
    assert "could not read the words in" in out.stderr and "soon-broken.png" in out.stderr
    assert "Traceback" not in out.stderr
    words = json.loads(out.stdout)["words"]
    assert words["read"] == 2 and [f["path"] for f in words["failed"]] == [str(photos / "soon-broken.png")]
    paths = {h["path"] for h in json.loads(run_cli("search", "红色", "--index", idx, "-k", "5", "--json").stdout)}
    assert str(photos / "soon-broken.png") in paths  # its vector is still there
    info = run_cli("info", "--index", idx).stdout
    assert "1 could not be read (--ocr-only tries again)" in info
    again = json.loads(run_cli("index", "--index", idx, "--ocr-only", "--json", "-q").stdout)["words"]
    assert again["read"] == 1 and len(again["failed"]) == 1  # tried again, still broken: still one line
    assert json.loads(run_cli("info", "--index", idx, "--json").stdout)["words"]["failed"] == 1


def test_photos_on_a_drive_unplugged_before_their_words_are_read_get_them_when_it_is_back(tmp_path, model_dir):
    photos, idx, stash = tmp_path / "photos", tmp_path / "idx", tmp_path / "stash"
    word_photo(photos / "home.png", ["会议纪要"])
    word_photo(stash / "receipt.png", ["增值税普通发票"], seed=1)
    usb = photos / "usb"
    usb.mkdir()
    mount_tmpfs(usb)
    try:
        shutil.copy2(stash / "receipt.png", usb / "receipt.png")
        assert run_cli("index", photos, "--index", idx, "--model", model_dir, "-q", "--no-ocr").returncode == 0
        umount(usb)  # unplugged before the words were read
        out = run_cli("index", "--index", idx, "--ocr-only", "--json")
        assert out.returncode == 0, out.stderr
        words = json.loads(out.stdout)["words"]
        assert words["read"] == 1 and words["failed"] == []
        assert [u["path"] for u in words["unreachable"]] == [str(usb / "receipt.png")]
        assert f"could not get at {usb / 'receipt.png'} to read its words" in out.stderr
        assert "the next run tries again" in out.stderr

        mount_tmpfs(usb)  # plugged in again
        shutil.copy2(stash / "receipt.png", usb / "receipt.png")
        again = json.loads(run_cli("index", "--index", idx, "--ocr-only", "--json", "-q").stdout)["words"]
        assert again["read"] == 1 and again["with_words"] == 1 and again["unreachable"] == []
        [hit] = json.loads(run_cli("search", "发票", "--index", idx, "--words", "--json").stdout)
        assert hit["path"] == str(usb / "receipt.png")
    finally:
        while os.path.ismount(usb):
            umount(usb)


def test_a_reader_that_cannot_load_is_one_line_and_marks_no_photo(tmp_path, model_dir):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    word_photo(photos / "kuaidi.png", ["请凭取件码领取"])
    # an I/O error as the models load, in the engine named (one picked for the CPU would fall back)
    fault = {"CNCLIP_FAULT": "words.load_reader=EIO", "CNCLIP_OCR_ENGINE": "onnxruntime"}
    out = run_cli("index", photos, "--index", idx, "--model", model_dir, env=OCR | fault)
    assert out.returncode == 1
    [line] = [x for x in out.stderr.splitlines() if x.startswith("cnclip: error:")]
    assert "could not load its models" in line and "searchable by picture" in line and "Traceback" not in out.stderr
    info = json.loads(run_cli("info", "--index", idx, "--json").stdout)
    assert info["images"] == 1 and info["words"] == {"photos": 1, "read": 0, "with_words": 0, "failed": 0}
    again = run_cli("index", "--index", idx, "--ocr-only", "--json", "-q")
    assert again.returncode == 0 and json.loads(again.stdout)["words"]["with_words"] == 1


@needs_openvino
def test_a_cpu_with_fast_bf16_reads_in_openvino_and_says_so(tmp_path, model_dir):
    """As an AMX or AVX-512 BF16 machine would run it (CNCLIP_CPU_BF16=1 makes that choice here)."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    word_photo(photos / "kuaidi.png", ["请凭取件码领取"])
    Image.new("RGB", (320, 240), (90, 140, 200)).save(photos / "sky.jpg")
    assert run_cli("index", photos, "--index", idx, "--model", model_dir, "-q", "--no-ocr").returncode == 0
    out = run_cli("index", "--index", idx, "--ocr-only", env={"CNCLIP_CPU_BF16": "1"})
    assert out.returncode == 0, out.stderr
    assert "words: 2 photos read, 1 with words (openvino)" in out.stderr
    [hit] = json.loads(run_cli("search", "取件码", "--index", idx, "--words", "--json").stdout)
    assert hit["path"] == str(photos / "kuaidi.png") and hit["words"] == [{"text": "请凭取件码领取", "spans": [[2, 5]]}]


def test_cnclip_words_prints_the_lines_of_a_photo_to_copy(indexed, photos):
    idx, _, _ = indexed
    shot = photos / "截图" / "kuaidi.png"
    out = run_cli("words", shot, "--index", idx)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["您的快递已到", "请凭取件码 8-3-2017 领取"]  # as read, to copy
    both = run_cli("words", shot, photos / "风景" / "0.jpg", "--index", idx, "--json")
    [kuaidi, plain] = json.loads(both.stdout)
    assert kuaidi["path"] == str(shot) and kuaidi["read"] and [x["text"] for x in kuaidi["lines"]][0] == "您的快递已到"
    assert len(kuaidi["lines"][0]["box"]) == 4 and plain == {
        "path": str(photos / "风景" / "0.jpg"),
        "read": True,
        "lines": [],
        "error": None,
    }
    missing = run_cli("words", photos / "nowhere.png", "--index", idx)
    assert missing.returncode == 1 and "is not in this index" in missing.stderr and "Traceback" not in missing.stderr
