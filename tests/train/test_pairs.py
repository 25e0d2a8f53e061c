"""Tests for cnclip.train.pairs (reading pair files and folders) and cnclip.train.lines, both torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cnclip.errors import CNClipError
from cnclip.train.lines import read_lines
from cnclip.train.pairs import DataReport, Pair, read_pairs


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path, format=fmt)
    return path


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


def test_report_defaults() -> None:
    report = DataReport(source="x")
    assert (report.kept, report.dropped, report.summary()) == (0, 0, "kept 0 pairs of 0 images")


# 5. plain line files, and reading without torch ----------------------------------------------------


def test_read_lines_keeps_non_empty_stripped_lines(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\ufeff  猫 \r\n\n\u3000狗\u3000\ncats\t猫\n   \n", encoding="utf-8")
    assert read_lines(labels) == ["猫", "狗", "cats\t猫"]
    with pytest.raises(CNClipError, match="no such file"):
        read_lines(tmp_path / "nope.txt")
    (tmp_path / "gbk.txt").write_bytes("一只猫和狗".encode("gbk"))
    with pytest.raises(CNClipError, match="not UTF-8 text"):
        read_lines(tmp_path / "gbk.txt")


@pytest.mark.parametrize(
    "statement",
    [
        "from cnclip.train.lines import read_lines",
        "from cnclip.train.data import read_lines",  # the old path, kept for one release
        "from cnclip.train.pairs import read_pairs",
    ],
)
def test_reading_files_never_imports_torch(tmp_path: Path, statement: str) -> None:
    # `cnclip tag` and `cnclip index --texts` read a text file first: torch (~2 s) must not load for it.
    _image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("一只猫\n", encoding="utf-8")
    call = "read_lines(folder / 'a.txt')" if "read_lines" in statement else "read_pairs(folder)"
    code = f"import sys\nfrom pathlib import Path\n{statement}\nfolder = Path(sys.argv[1])\n{call}\n"
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"{statement} imported torch"


def test_the_old_data_module_hands_out_the_same_objects() -> None:
    from cnclip.train import batches, data, official_formats, pairs

    assert data.read_pairs is pairs.read_pairs and data.read_lines is read_lines
    assert data.read_official is official_formats.read_official
    assert data.unique_image_batches is batches.unique_image_batches and data.PairDataset is batches.PairDataset
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        data.nothing  # noqa: B018
