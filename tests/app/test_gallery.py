"""Contact sheets: grid image layout, placeholders, atomic writes, a font that will not load; the HTML gallery."""

from __future__ import annotations

import base64
import io
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip.app import fonts
from cnclip.app.gallery import GalleryItem, write_grid, write_html
from cnclip.errors import CNClipError

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 40), (30, 40, 210), (230, 210, 20)


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (120, 120)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def items_for(paths: list[str]) -> list[GalleryItem]:
    return [GalleryItem(p, 0.5 - 0.01 * i, i + 1) for i, p in enumerate(paths)]


def colour_mask(img: Image.Image, colour: tuple[int, int, int], tol: int = 24) -> np.ndarray:
    arr = np.asarray(img.convert("RGB")).astype(int)
    return np.abs(arr - np.array(colour)).max(axis=2) <= tol


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    assert len(xs), "colour not found on the sheet"
    return float(xs.mean()), float(ys.mean())


# ---------------------------------------------------------------------------------------------
# grid


def test_grid_is_jpeg_with_tiles_in_rank_order(tmp_path: Path) -> None:
    colours = [RED, GREEN, BLUE, YELLOW]
    paths = [solid(tmp_path / f"{i}.png", c) for i, c in enumerate(colours)]
    items = items_for(paths)
    out = write_grid(list(reversed(items)), tmp_path / "sheet.jpg", title="sunset", thumb=64, columns=2)

    assert out == tmp_path / "sheet.jpg"
    with Image.open(out) as img:
        assert img.format == "JPEG"
        img.load()
        sheet = img.copy()
    w, h = sheet.size
    assert 2 * 64 <= w <= 2 * 64 * 1.5
    assert 2 * 64 <= h <= 2 * 64 * 2.2

    (rx, ry), (gx, gy), (bx, by), (yx, yy) = (centroid(colour_mask(sheet, c)) for c in colours)
    # rank 1 top-left, 2 top-right, 3 bottom-left, 4 bottom-right, despite the reversed input
    assert rx < w / 2 < gx and bx < w / 2 < yx
    assert abs(ry - gy) < 2 and abs(by - yy) < 2 and by > ry + 64
    # a square input fills its square tile: about thumb x thumb pixels of its colour
    assert 0.85 * 64 * 64 <= colour_mask(sheet, RED).sum() <= 1.15 * 64 * 64


def test_grid_letterboxes_and_keeps_aspect(tmp_path: Path) -> None:
    p = solid(tmp_path / "wide.png", RED, size=(400, 100))
    out = write_grid(items_for([p]), tmp_path / "s.png", thumb=64)
    with Image.open(out) as sheet:
        mask = colour_mask(sheet, RED, tol=2)
    ys, xs = np.nonzero(mask)
    assert xs.max() - xs.min() + 1 == 64
    assert xs.max() - xs.min() > 3 * (ys.max() - ys.min())


@pytest.mark.parametrize(("n", "cols"), [(1, 1), (2, 2), (5, 3), (9, 3), (10, 4), (50, 6)])
def test_grid_default_columns(tmp_path: Path, n: int, cols: int) -> None:
    p = solid(tmp_path / "a.png", BLUE, size=(32, 32))
    out = write_grid(items_for([p] * n), tmp_path / "s.jpg", thumb=32)
    rows = math.ceil(n / cols)
    with Image.open(out) as sheet:
        w, h = sheet.size
    assert cols * 32 <= w <= cols * 32 * 1.5 + 20
    assert rows * 32 <= h <= rows * 32 * 2.5 + 20


def test_grid_columns_argument(tmp_path: Path) -> None:
    p = solid(tmp_path / "a.png", BLUE, size=(32, 32))
    with Image.open(write_grid(items_for([p] * 6), tmp_path / "one.jpg", thumb=32, columns=1)) as one:
        with Image.open(write_grid(items_for([p] * 6), tmp_path / "six.jpg", thumb=32, columns=6)) as six:
            assert one.height > 4 * six.height and six.width > 4 * one.width
    with pytest.raises(ValueError, match="columns"):
        write_grid(items_for([p]), tmp_path / "x.jpg", columns=0)
    with pytest.raises(ValueError, match="thumb"):
        write_grid(items_for([p]), tmp_path / "x.jpg", thumb=2)


def test_grid_missing_and_corrupt_files_get_placeholders(tmp_path: Path) -> None:
    good = solid(tmp_path / "good.png", GREEN)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    items = items_for([str(tmp_path / "gone.jpg"), good, str(corrupt)])
    out = write_grid(items, tmp_path / "s.png", thumb=64, columns=3)
    with Image.open(out) as img:
        sheet = np.asarray(img.convert("RGB")).astype(int)
    w = sheet.shape[1]
    gx, gy = centroid(colour_mask(Image.fromarray(sheet.astype(np.uint8)), GREEN))
    assert w / 3 < gx < 2 * w / 3
    # the other two tiles, at the same height, are a neutral grey placeholder, not white/blank
    for x in (gx - w / 3, gx + w / 3):
        r, g, b = sheet[int(gy) + 20, int(x) - 20]
        assert max(r, g, b) - min(r, g, b) < 8 and 100 < r < 200


def test_grid_zero_items(tmp_path: Path) -> None:
    out = write_grid([], tmp_path / "empty.jpg", title="海边的日落", thumb=64)
    with Image.open(out) as img:
        assert img.format == "JPEG"
        assert img.width < 400 and img.height < 300
    without_title = write_grid([], tmp_path / "empty2.jpg")
    assert without_title.is_file()


def test_grid_title_adds_a_header(tmp_path: Path) -> None:
    p = solid(tmp_path / "a.png", RED)
    with Image.open(write_grid(items_for([p]), tmp_path / "t.png", title="海边的日落", thumb=64)) as titled:
        with Image.open(write_grid(items_for([p]), tmp_path / "u.png", thumb=64)) as plain:
            assert titled.height > plain.height
            # the header strip holds drawn text (dark pixels), whatever font this machine has
            strip = np.asarray(titled.convert("L"))[: titled.height - plain.height]
            assert (strip < 120).sum() > 20


@pytest.mark.parametrize("name", ["s.png", "s.PNG"])
def test_grid_png_by_suffix(tmp_path: Path, name: str) -> None:
    p = solid(tmp_path / "a.png", RED)
    with Image.open(write_grid(items_for([p]), tmp_path / name, thumb=32)) as img:
        assert img.format == "PNG"


def test_grid_into_a_missing_folder_creates_nothing_overwrites_and_leaves_no_temp_files(tmp_path: Path) -> None:
    p = solid(tmp_path / "a.png", RED)
    out = tmp_path / "deep" / "er" / "s.jpg"
    with pytest.raises(CNClipError, match="does not exist; create it first") as exc:
        write_grid(items_for([p]), out, thumb=32)  # a typo must not leave a tree of folders behind
    assert "\n" not in str(exc.value) and not (tmp_path / "deep").exists()
    out.parent.mkdir(parents=True)
    write_grid(items_for([p]), out, thumb=32)
    first = out.read_bytes()
    write_grid(items_for([p, p]), out, thumb=32)
    assert out.read_bytes() != first
    assert os.listdir(out.parent) == ["s.jpg"]


def test_grid_unwritable_output_raises(tmp_path: Path) -> None:
    p = solid(tmp_path / "a.png", RED)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    bad = blocker / "sub" / "s.jpg"
    with pytest.raises(CNClipError, match="afile") as exc:
        write_grid(items_for([p]), bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CNClipError, match="folder"):
        write_grid(items_for([p]), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "afile"]


def test_grid_long_chinese_names(tmp_path: Path) -> None:
    name = "海边的日落_三亚湾_家庭旅行" * 4 + ".jpg"
    p = solid(tmp_path / "照片" / name, BLUE)
    (tmp_path / "结果").mkdir()
    out = write_grid(items_for([p, p]), tmp_path / "结果" / "海边.jpg", title="海边的日落" * 20, thumb=64)
    with Image.open(out) as img:
        sheet = img.copy()
    assert sheet.width <= 2 * 64 * 1.5
    assert colour_mask(sheet, BLUE).sum() > 64 * 64


def test_grid_with_a_font_that_cannot_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.ttf"
    junk.write_bytes(b"not a font")
    monkeypatch.setenv("CNCLIP_FONT", str(junk))
    p = solid(tmp_path / "a.png", RED)
    assert write_grid(items_for([p]), tmp_path / "s.jpg", title="海边的日落", thumb=32).is_file()
    assert fonts.font_choice().path != str(junk)


# ---------------------------------------------------------------------------------------------
# html


class Collector(HTMLParser):
    """Tags with attributes, plus text per enclosing tag id chain, for structural assertions."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in {"img", "meta", "br", "link"}:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.text.setdefault(self.stack[-1], []).append(data)

    def cards(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "figure" and "card" in (a.get("class") or "").split()]

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def parse(path: Path) -> tuple[str, Collector]:
    page = path.read_bytes().decode("utf-8")
    parser = Collector()
    parser.feed(page)
    parser.close()
    return page, parser


def test_html_cards_in_rank_order_with_scores(tmp_path: Path) -> None:
    paths = [solid(tmp_path / f"{i}.png", c) for i, c in enumerate([RED, GREEN, BLUE])]
    items = [GalleryItem(paths[0], 0.41234, 1), GalleryItem(paths[1], 0.5, 2), GalleryItem(paths[2], -0.0126, 3)]
    out = write_html(list(reversed(items)), tmp_path / "g.html", title="海边的日落", thumb=48)
    page, doc = parse(out)
    assert [c["id"] for c in doc.cards()] == ["r1", "r2", "r3"]
    assert doc.text["span"] == ["3 results", "#1", "0.412", "#2", "0.500", "#3", "-0.013"]
    assert "prefers-color-scheme" in page
    # self-contained: no external resources of any kind
    assert not doc.all("script") and not doc.all("link")
    assert "http://" not in page and "https://" not in page


def test_html_embedded_thumbnails_are_jpegs(tmp_path: Path) -> None:
    paths = [solid(tmp_path / "a.png", RED, size=(300, 150)), solid(tmp_path / "b.png", BLUE)]
    page, doc = parse(write_html(items_for(paths), tmp_path / "g.html", thumb=64))
    srcs = [a["src"] for a in doc.all("img")]
    assert len(srcs) == 2
    for src in srcs:
        assert src is not None and src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "JPEG"
            img.load()
            assert max(img.size) == 64
    links = [a["href"] for a in doc.all("a")]
    assert Path(paths[0]).as_uri() in links and Path(paths[1]).as_uri() in links


def test_html_without_embedding_points_at_files(tmp_path: Path) -> None:
    p = solid(tmp_path / "海边 #1.png", RED)
    page, doc = parse(write_html(items_for([p]), tmp_path / "g.html", embed=False))
    (img,) = doc.all("img")
    assert img["src"] == Path(p).as_uri() and img["src"].startswith("file://")
    assert "base64" not in page


@pytest.mark.parametrize("embed", [True, False])
def test_html_missing_files_get_placeholder_cards(tmp_path: Path, embed: bool) -> None:
    good = solid(tmp_path / "good.png", RED)
    items = items_for([good, str(tmp_path / "gone.jpg")])
    _, doc = parse(write_html(items, tmp_path / "g.html", embed=embed))
    cards = doc.cards()
    assert len(cards) == 2 and "missing" not in (cards[0]["class"] or "")
    assert "missing" in (cards[1]["class"] or "")
    assert len(doc.all("img")) == 1


def test_html_corrupt_file_placeholder_when_embedding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    _, doc = parse(write_html(items_for([str(bad)]), tmp_path / "g.html"))
    assert "missing" in (doc.cards()[0]["class"] or "") and not doc.all("img")


def test_html_escapes_hostile_names(tmp_path: Path) -> None:
    name = "<script>alert(1)&x=\"'海.png"
    p = solid(tmp_path / name, RED)
    title = "</title><script>alert(2)</script> & 日落"
    page, doc = parse(write_html(items_for([p]), tmp_path / "g.html", title=title))
    assert "<script" not in page.lower()
    assert not doc.all("script")
    assert name in doc.text["a"]
    assert doc.text["h1"] == [title] and doc.text["title"] == [title]
    (img,) = doc.all("img")
    assert img["alt"] == name


def test_html_chinese_title_and_utf8(tmp_path: Path) -> None:
    out = write_html([], tmp_path / "结果.html", title="海边的日落")
    raw = out.read_bytes()
    page, doc = parse(out)
    assert "海边的日落".encode() in raw
    assert '<meta charset="utf-8">' in page
    assert doc.all("html")[0]["lang"] == "zh"
    assert doc.text["title"] == ["海边的日落"] and doc.text["h1"] == ["海边的日落"]
    assert not doc.cards() and "no results" in page


def test_html_unwritable_output_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(CNClipError, match="afile"):
        write_html([], blocker / "g.html")


def test_a_hit_found_by_its_words_has_them_in_its_caption(tmp_path: Path) -> None:
    path = solid(tmp_path / "r.png", RED)
    words = ({"text": "增值税发票", "spans": [[3, 5]]},)
    plain = write_grid([GalleryItem(path, 0.5, 1)], tmp_path / "plain.png", thumb=128)
    marked = write_grid([GalleryItem(path, 0.5, 1, words=words)], tmp_path / "words.png", thumb=128)
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (plain, marked))
    rows = np.flatnonzero(np.abs(a - b).max(axis=(1, 2)) > 40)
    red_rows = np.flatnonzero(colour_mask(Image.open(plain), RED).any(axis=1))
    assert rows.size and rows.min() > red_rows.max()  # the words are drawn in the caption, under the photo
    # in the accent colour, right of the score on the first caption line
    assert (
        colour_mask(Image.open(marked), (196, 82, 28), tol=60).sum()
        > colour_mask(Image.open(plain), (196, 82, 28), tol=60).sum()
    )

    page = write_html([GalleryItem(path, 0.5, 1, words=words)], tmp_path / "p.html").read_text("utf-8")
    assert '<div class="words">增值税<mark>发票</mark></div>' in page
