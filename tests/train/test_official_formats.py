"""Tests for cnclip.train.official_formats: the official TSV + JSONL and LMDB layouts, converted to pair files."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cnclip.errors import CNClipError
from cnclip.train.official_formats import read_official, read_official_lmdb
from cnclip.train.pairs import Pair, read_pairs


def _image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format=fmt)
    return buf.getvalue()


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


# 1. the official TSV + JSONL layout ----------------------------------------------------------------


def _official_tsv_and_texts(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    images = {"1001": _image_bytes("JPEG", (255, 0, 0)), "1002": _image_bytes("PNG", (0, 255, 0))}
    tsv = tmp_path / "train_imgs.tsv"
    lines = [
        f"1001\t{base64.urlsafe_b64encode(images['1001']).decode()}",  # as the official tools write it
        f"1002\t{base64.b64encode(images['1002']).decode().rstrip('=')}\r",  # plain base64, no padding, CRLF
    ]
    lines += [
        "1003\tthis is not base64!!",  # bad base64
        "1004",  # missing field: no tab
        f"../evil\t{base64.b64encode(images['1001']).decode()}",  # bad image id: would leave the folder
        f"1001\t{base64.b64encode(images['1002']).decode()}",  # duplicate image id: the first one stays
    ]
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = _jsonl(
        tmp_path / "train_texts.jsonl",
        [
            {"text_id": 1, "text": "红色的图", "image_ids": [1001]},
            {"text_id": 2, "text": "绿色或红色", "image_ids": [1002, 1001, 9999]},  # 9999: unknown image id
            "{broken",  # bad JSON
            {"text_id": 4, "text": "坏图", "image_ids": [1003]},  # unknown: its base64 was bad
        ],
    )
    return tsv, texts, images


def test_read_official_round_trip(tmp_path: Path) -> None:
    tsv, texts, images = _official_tsv_and_texts(tmp_path)
    out_dir = tmp_path / "converted"
    pairs_path, report = read_official(tsv, texts, out_dir)
    assert pairs_path == out_dir / "pairs.jsonl"
    assert report.problems == {
        "bad base64": 1,
        "missing field": 1,
        "bad image id": 1,
        "duplicate image id": 1,
        "unknown image id": 2,
        "bad JSON": 1,
    }
    assert (report.kept, report.images) == (3, 2)
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == ["1001.jpg", "1002.png"]
    assert (out_dir / "images" / "1001.jpg").read_bytes() == images["1001"]
    assert (out_dir / "images" / "1002.png").read_bytes() == images["1002"]
    assert not (tmp_path / "evil.jpg").exists()

    pairs, _ = read_pairs(pairs_path)
    img = out_dir / "images"
    assert pairs == [
        Pair(str(img / "1001.jpg"), "红色的图"),
        Pair(str(img / "1002.png"), "绿色或红色"),
        Pair(str(img / "1001.jpg"), "绿色或红色"),
    ]


def test_read_official_missing_input_and_no_pairs(tmp_path: Path) -> None:
    tsv, texts, _ = _official_tsv_and_texts(tmp_path)
    with pytest.raises(CNClipError, match="nope.tsv does not exist"):
        read_official(tmp_path / "nope.tsv", texts, tmp_path / "out")
    unrelated = _jsonl(tmp_path / "other_texts.jsonl", [{"text_id": 1, "text": "猫", "image_ids": [42]}])
    with pytest.raises(CNClipError, match="no usable image-caption pairs.*unknown image id"):
        read_official(tsv, unrelated, tmp_path / "out")
    assert not (tmp_path / "out" / "pairs.jsonl").exists()


# 2. the official LMDB layout -----------------------------------------------------------------------


def _lmdb():
    try:
        import lmdb
    except ImportError:
        pytest.fail("the lmdb package is not installed; it belongs in the dev extra (pip install lmdb)")
    return lmdb


def _write_official_lmdb(root: Path, images: dict[str, bytes], records: list[bytes]) -> None:
    """An LMDB split folder as cn_clip/preprocess/build_lmdb_dataset.py writes it."""
    lmdb = _lmdb()
    root.mkdir(parents=True)
    env = lmdb.open(str(root / "imgs"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for image_id, data in images.items():
            txn.put(image_id.encode("utf-8"), base64.urlsafe_b64encode(data))
        txn.put(b"num_images", str(len(images)).encode("utf-8"))
    env.close()
    env = lmdb.open(str(root / "pairs"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, record in enumerate(records):
            txn.put(str(i).encode("utf-8"), record)
        txn.put(b"num_samples", str(len(records)).encode("utf-8"))
    env.close()


def test_read_official_lmdb_round_trip(tmp_path: Path) -> None:
    images = {"7": _image_bytes("JPEG", (9, 9, 9)), "8": _image_bytes("PNG", (99, 9, 9))}
    records = [pickle.dumps(r) for r in [(7, 1, "黑色"), (8, 2, "红黑"), (7, 2, "红黑"), (5, 3, "无图")]]
    records += [b"garbage", pickle.dumps([7, 4, "列表"])]
    for i in range(12):  # past 10, so the numeric order differs from the LMDB's key order
        records.append(pickle.dumps((8, 10 + i, f"第{i}句"), protocol=2))
    _write_official_lmdb(tmp_path / "lmdb" / "train", images, records)

    out_dir = tmp_path / "out"
    pairs_path, report = read_official_lmdb(tmp_path / "lmdb" / "train", out_dir)
    assert report.problems == {"unknown image id": 1, "bad record": 2}
    assert (report.kept, report.images) == (15, 2)
    assert (out_dir / "images" / "7.jpg").read_bytes() == images["7"]
    assert (out_dir / "images" / "8.png").read_bytes() == images["8"]
    pairs, _ = read_pairs(pairs_path)
    assert [p.text for p in pairs] == ["黑色", "红黑", "红黑"] + [f"第{i}句" for i in range(12)]
    assert Counter(Path(p.image).name for p in pairs) == {"7.jpg": 2, "8.png": 13}


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_read_official_lmdb_refuses_pickled_code(tmp_path: Path) -> None:
    images = {"7": _image_bytes("JPEG", (9, 9, 9))}
    records = [pickle.dumps((7, 1, "正常")), pickle.dumps((7, 2, _CallsSystem()))]
    _write_official_lmdb(tmp_path / "lmdb", images, records)
    with pytest.raises(CNClipError, match=r"pairs:1: .*(posix|os|nt)\.system.*refuses this LMDB as unsafe"):
        read_official_lmdb(tmp_path / "lmdb", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_read_official_lmdb_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CNClipError, match="imgs does not exist"):
        read_official_lmdb(tmp_path, tmp_path / "out")
    monkeypatch.setitem(__import__("sys").modules, "lmdb", None)  # as if it were not installed
    with pytest.raises(CNClipError, match="pip install lmdb"):
        read_official_lmdb(tmp_path, tmp_path / "out")


def test_import_official_cli(tmp_path: Path) -> None:
    from conftest import run_cli

    tsv, texts, _ = _official_tsv_and_texts(tmp_path)
    out = run_cli("import-official", "--imgs", tsv, "--texts", texts, "--out", tmp_path / "conv")
    assert out.returncode == 0, out.stderr
    assert "kept 3 pairs" in out.stderr and "cnclip train --train" in out.stderr
    assert len(read_pairs(tmp_path / "conv" / "pairs.jsonl")[0]) == 3
    wrong = run_cli("import-official", "--imgs", tsv, "--out", tmp_path / "conv2")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
