"""Tests for cnclip.train.data: reading pair files and folders, image-unique batches, tensors, official layouts."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnclip.errors import CNClipError
from cnclip.model.tokenizer import Tokenizer, normalize_text
from cnclip.train.data import (
    DataReport,
    Pair,
    PairDataset,
    collate_pairs,
    read_official,
    read_official_lmdb,
    read_pairs,
    unique_image_batches,
)


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path, format=fmt)
    return path


def _image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format=fmt)
    return buf.getvalue()


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


# 1. JSONL ------------------------------------------------------------------------------------------


def test_jsonl_relative_absolute_chinese_alias_and_list(tmp_path: Path) -> None:
    cat = _image(tmp_path / "图片" / "猫.jpg")
    elsewhere = _image(tmp_path / "other" / "dog.png", fmt="PNG")
    data = _jsonl(
        tmp_path / "data" / "train.jsonl",
        [
            {"image": "../图片/猫.jpg", "text": "  一只猫  "},
            {"image": str(elsewhere), "caption": "一只狗"},
            {"image": "../图片/猫.jpg", "text": ["猫在睡觉", "橘猫"]},
        ],
    )
    pairs, report = read_pairs(data)
    assert pairs == [
        Pair(str(cat), "一只猫"),
        Pair(str(elsewhere), "一只狗"),
        Pair(str(cat), "猫在睡觉"),
        Pair(str(cat), "橘猫"),
    ]
    assert all(os.path.isabs(p.image) for p in pairs)
    assert (report.kept, report.images, report.dropped, report.problems) == (4, 2, 0, {})
    assert report.source == str(data)


def test_jsonl_with_bom_and_json_extension(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    path = tmp_path / "pairs.json"
    path.write_bytes("\ufeff".encode() + json.dumps({"image": "a.jpg", "text": "红色"}).encode() + b"\n\n")
    pairs, _ = read_pairs(path)
    assert pairs == [Pair(str(tmp_path / "a.jpg"), "红色")]


def test_jsonl_every_bad_record_is_counted(tmp_path: Path) -> None:
    _image(tmp_path / "ok.jpg")
    data = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "ok.jpg", "text": "好"},  # 1: kept
            "{not json",  # 2: bad JSON
            "[1, 2]",  # 3: bad JSON (not an object)
            {"text": "没有图片"},  # 4: missing field
            {"image": "ok.jpg"},  # 5: missing field
            {"image": "ok.jpg", "text": None},  # 6: missing field
            {"image": "  ", "text": "空路径"},  # 7: missing field
            {"image": 5, "text": "数字"},  # 8: bad field
            {"image": "ok.jpg", "text": ["好", 3]},  # 9: bad field
            {"image": "ok.jpg", "text": " \t "},  # 10: empty text
            {"image": "ok.jpg", "text": ["", "也好"]},  # 11: one empty text, one kept
            {"image": "ok.jpg", "text": []},  # 12: empty text
            {"image": "gone.jpg", "text": ["不在", "也不在"]},  # 13: image not found, twice
        ],
    )
    pairs, report = read_pairs(data)
    assert [p.text for p in pairs] == ["好", "也好"]
    assert report.problems == {
        "bad JSON": 2,
        "missing field": 4,
        "bad field": 2,
        "empty text": 3,
        "image not found": 2,
    }
    assert report.kept == 2 and report.dropped == 13
    assert len(report.examples) == 5
    assert report.examples[0] == f"{data}:2: bad JSON"
    assert report.examples[2].startswith(f"{data}:4: missing field")
    assert "2 pairs of 1 images" in report.summary() and "4 missing field" in report.summary()


# 2. CSV and TSV ------------------------------------------------------------------------------------


def test_csv_quoted_commas_newlines_and_bom(tmp_path: Path) -> None:
    a = _image(tmp_path / "imgs" / "a.jpg")
    b = _image(tmp_path / "imgs" / "b 1.jpg")
    csv_text = (
        'Image,id,Caption\nimgs/a.jpg,1,"红色的,方块"\n"imgs/b 1.jpg",2,"第一行\n第二行"\nimgs/a.jpg,3,"他说""你好"""\n'
    )
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text.encode("utf-8"))
    pairs, report = read_pairs(path)
    assert pairs == [Pair(str(a), "红色的,方块"), Pair(str(b), "第一行\n第二行"), Pair(str(a), '他说"你好"')]
    assert report.kept == 3


def test_csv_problems_name_the_starting_line(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    path = tmp_path / "p.csv"
    path.write_text('image,text\na.jpg,"两\n行"\n\nmissing.jpg,没有\na.jpg,\n,无图\na.jpg\n', encoding="utf-8")
    pairs, report = read_pairs(path)
    assert pairs == [Pair(str(tmp_path / "a.jpg"), "两\n行")]
    assert report.problems == {"image not found": 1, "empty text": 1, "missing field": 2}
    assert report.examples[0] == f"{path}:5: image not found (missing.jpg)"
    assert report.examples[1] == f"{path}:6: empty text"


def test_tsv(tmp_path: Path) -> None:
    a = _image(tmp_path / "a.jpg")
    path = tmp_path / "p.tsv"
    path.write_text("text\timage\n带,逗号的描述\ta.jpg\n", encoding="utf-8")
    pairs, _ = read_pairs(path)
    assert pairs == [Pair(str(a), "带,逗号的描述")]


def test_csv_without_needed_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("file,description\na.jpg,猫\n", encoding="utf-8")
    with pytest.raises(CNClipError, match=r"p\.csv.*'image' and 'text'.*'file', 'description'"):
        read_pairs(path)


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    path.write_bytes("image,text\na.jpg,中文描述\n".encode("gbk"))  # as Excel on a Chinese Windows saves it
    with pytest.raises(CNClipError, match="not UTF-8.*re-save it as UTF-8"):
        read_pairs(path)


# 3. folders with sidecar captions ------------------------------------------------------------------


def test_folder_with_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "相册"
    cat = _image(root / "猫.jpg")
    (root / "猫.txt").write_text("一只猫\n\n  橘猫 \n", encoding="utf-8")
    dog = _image(root / "sub" / "dog.png", fmt="PNG")
    (root / "sub" / "dog.txt").write_text("\ufeff一只狗", encoding="utf-8")
    _image(root / "sub" / "nocap.jpg")
    _image(root / "blank.jpg")
    (root / "blank.txt").write_text("\n  \n", encoding="utf-8")
    _image(root / ".hidden.jpg")
    (root / ".hidden.txt").write_text("隐藏", encoding="utf-8")
    _image(root / ".cache" / "x.jpg")
    (root / ".cache" / "x.txt").write_text("隐藏", encoding="utf-8")
    (root / "notes.md").write_text("not an image", encoding="utf-8")

    pairs, report = read_pairs(root)
    assert pairs == [Pair(str(cat), "一只猫"), Pair(str(cat), "橘猫"), Pair(str(dog), "一只狗")]
    assert report.problems == {"no caption file": 1, "empty text": 1}
    assert f"{root / 'sub' / 'nocap.jpg'}: no caption file" in report.examples
    assert (report.kept, report.images) == (3, 2)


# 4. errors -----------------------------------------------------------------------------------------


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(CNClipError, match="nope.jsonl does not exist"):
        read_pairs(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(CNClipError, match="unknown dataset type '.parquet'"):
        read_pairs(path)


def test_zero_usable_pairs_says_why(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "gone.jpg", "text": "猫"}, {"image": "gone.jpg", "text": ""}])
    with pytest.raises(CNClipError, match=r"no usable image-caption pairs.*1 image not found.*1 empty text") as exc:
        read_pairs(data)
    assert "\n" not in str(exc.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(CNClipError, match="holds no image-caption pairs"):
        read_pairs(path)


# 5. image-unique batches ---------------------------------------------------------------------------


def _captioned(images: int, captions: int) -> list[Pair]:
    return [Pair(f"/img/{i}.jpg", f"caption {c}") for i in range(images) for c in range(captions)]


def _assert_unique_images(pairs: list[Pair], batches: list[list[int]]) -> None:
    for batch in batches:
        assert len({pairs[i].image for i in batch}) == len(batch)


@pytest.mark.parametrize("batch_size", [2, 8, 32, 50])
def test_batches_never_repeat_an_image(batch_size: int) -> None:
    pairs = _captioned(200, 5)
    for seed in range(30):
        batches = unique_image_batches(pairs, batch_size, seed=seed, epoch=seed % 3)
        _assert_unique_images(pairs, batches)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        assert all(len(b) == batch_size for b in batches)  # drop_last: only full batches
        assert len(flat) > len(pairs) - batch_size


def test_batches_cover_every_pair_when_sizes_divide() -> None:
    pairs = _captioned(64, 5)  # 320 pairs
    for seed in range(50):
        for batch_size in (32, 40, 64):
            batches = unique_image_batches(pairs, batch_size, seed=seed, epoch=0)
            assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
            assert len(batches) == len(pairs) // batch_size
            _assert_unique_images(pairs, batches)


def test_batches_are_deterministic_and_change_per_epoch() -> None:
    pairs = _captioned(100, 3)
    first = unique_image_batches(pairs, 16, seed=7, epoch=0)
    assert first == unique_image_batches(pairs, 16, seed=7, epoch=0)
    assert first != unique_image_batches(pairs, 16, seed=7, epoch=1)
    assert first != unique_image_batches(pairs, 16, seed=8, epoch=0)


def test_batches_on_35000_pairs() -> None:
    pairs = _captioned(7000, 5)
    for batch_size in (256, 5000):
        batches = unique_image_batches(pairs, batch_size, seed=0, epoch=0)
        _assert_unique_images(pairs, batches)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == batch_size * (len(pairs) // batch_size)


def test_batches_with_one_image_captioned_more_often_than_batches() -> None:
    pairs = [Pair("/img/same.jpg", f"c{i}") for i in range(300)] + _captioned(100, 1)
    kept = unique_image_batches(pairs, 10, seed=1, epoch=0)
    _assert_unique_images(pairs, kept)
    assert all(len(b) == 10 for b in kept)
    everything = unique_image_batches(pairs, 10, seed=1, epoch=0, drop_last=False)
    _assert_unique_images(pairs, everything)
    assert sorted(i for b in everything for i in b) == list(range(len(pairs)))


def test_batches_edge_cases() -> None:
    assert unique_image_batches([], 4, seed=0, epoch=0) == []
    pairs = _captioned(3, 1)
    assert unique_image_batches(pairs, 4, seed=0, epoch=0) == []
    assert sorted(unique_image_batches(pairs, 4, seed=0, epoch=0, drop_last=False)[0]) == [0, 1, 2]
    with pytest.raises(ValueError, match="batch_size"):
        unique_image_batches(pairs, 0, seed=0, epoch=0)


# 6. tensors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_dataset_and_collate_drop_a_corrupt_image(tmp_path: Path, tokenizer: Tokenizer) -> None:
    good = _image(tmp_path / "good.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:100])
    other = _image(tmp_path / "other.png", (0, 0, 255), fmt="PNG")
    texts = ["一只很长很长很长的红色的猫在沙发上睡觉", "坏图", "蓝色"]
    pairs = [Pair(str(good), texts[0]), Pair(str(corrupt), texts[1]), Pair(str(other), texts[2])]
    dataset = PairDataset(pairs, 32, tokenizer)
    assert len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    assert items[1] is None

    pixels, ids, dropped = collate_pairs(items)
    assert dropped == 1
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    long_row = tokenizer.encode(normalize_text(texts[0]))
    short_row = tokenizer.encode(normalize_text(texts[2]))
    assert ids.dtype == torch.long and ids.shape == (2, len(long_row))
    assert ids[0].tolist() == long_row
    assert ids[1].tolist() == short_row + [tokenizer.pad_id] * (len(long_row) - len(short_row))


def test_collate_all_unreadable(tokenizer: Tokenizer) -> None:
    pixels, ids, dropped = collate_pairs([None, None])
    assert (pixels.shape[0], ids.shape, dropped) == (0, (0, 0), 2)
    dataset = PairDataset([], 24, tokenizer)
    pixels, ids, dropped = dataset.collate([None])
    assert (pixels.shape, ids.shape, dropped) == ((0, 3, 24, 24), (0, 0), 1)


def test_dataset_pickles_for_spawned_workers(tmp_path: Path, tokenizer: Tokenizer) -> None:
    pair = Pair(str(_image(tmp_path / "a.jpg")), "红色")
    dataset = PairDataset([pair], 16, tokenizer, draft=False)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.tokenizer.encode("红色") == tokenizer.encode("红色")
    assert torch.equal(copy[0][0], dataset[0][0])


def test_dataloader_with_unique_batches(tmp_path: Path, tokenizer: Tokenizer) -> None:
    paths = [str(_image(tmp_path / f"{i}.jpg", (i * 40, 0, 0))) for i in range(4)]
    pairs = [Pair(p, f"第{c}句") for p in paths for c in range(2)]
    batches = unique_image_batches(pairs, 4, seed=0, epoch=0)
    dataset = PairDataset(pairs, 16, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_pairs)
    shapes = [(x.shape, t.shape[0], d) for x, t, d in loader]
    assert shapes == [((4, 3, 16, 16), 4, 0)] * 2


# 7. the official TSV + JSONL layout ----------------------------------------------------------------


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


# 8. the official LMDB layout -----------------------------------------------------------------------


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


def test_report_defaults() -> None:
    report = DataReport(source="x")
    assert (report.kept, report.dropped, report.summary()) == (0, 0, "kept 0 pairs of 0 images")


def test_import_official_cli(tmp_path: Path) -> None:
    from conftest import run_cli

    tsv, texts, _ = _official_tsv_and_texts(tmp_path)
    out = run_cli("import-official", "--imgs", tsv, "--texts", texts, "--out", tmp_path / "conv")
    assert out.returncode == 0, out.stderr
    assert "kept 3 pairs" in out.stderr and "cnclip train --train" in out.stderr
    assert len(read_pairs(tmp_path / "conv" / "pairs.jsonl")[0]) == 3
    wrong = run_cli("import-official", "--imgs", tsv, "--out", tmp_path / "conv2")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
