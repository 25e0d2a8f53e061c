"""The contact sheet as one image: a JPEG/PNG grid of thumbnails (`write_grid`), each captioned with
its rank, score and file name, under the query."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageDraw

from cnclip.app.fonts import Font, draw_text, fit_end, fit_middle, line_height, sheet_font, text_width
from cnclip.app.gallery.items import GalleryItem, by_rank, check_thumb, display, publish, thumbnail
from cnclip.errors import CNClipError

MAX_COLUMNS = 6
# JPEG stores each side in 16 bits; refuse early with a useful message instead of a codec error.
_JPEG_MAX_SIDE = 65_500

# Sheet palette: light and neutral so the photos carry the colour.
_BG = (247, 247, 245)
_LETTERBOX = (228, 228, 225)
_PLACEHOLDER = (158, 158, 158)
_PLACEHOLDER_TEXT = (250, 250, 250)
_TEXT = (34, 34, 34)
_MUTED = (112, 112, 112)
_ACCENT = (196, 82, 28)


@dataclass(frozen=True)
class _Layout:
    thumb: int
    gap: int
    margin: int
    caption_font: Font
    title_font: Font
    caption_line: int
    title_line: int

    @property
    def caption_h(self) -> int:
        return self.gap // 2 + 2 * self.caption_line + 2

    @property
    def cell_h(self) -> int:
        return self.thumb + self.caption_h


def _layout(thumb: int) -> _Layout:
    caption_font = sheet_font(max(10, round(thumb * 0.058)))
    title_font = sheet_font(max(14, round(thumb * 0.1)))
    gap = max(6, thumb // 16)
    return _Layout(
        thumb=thumb,
        gap=gap,
        margin=max(8, round(gap * 1.25)),
        caption_font=caption_font,
        title_font=title_font,
        caption_line=line_height(caption_font),
        title_line=line_height(title_font),
    )


def _draw_header(draw: ImageDraw.ImageDraw, lay: _Layout, width: int, title: str | None, n: int) -> int:
    """Title (left) and hit count (right) on one line; returns the y where the grid starts."""
    y = lay.margin
    if title is None:
        return y
    usable = width - 2 * lay.margin
    text = display(title)
    count = f"{n} result{'s' if n != 1 else ''}"
    count_w = text_width(lay.caption_font, count)
    # The query matters more than the count: show the count only where the whole title fits too.
    show_count = n > 0 and text_width(lay.title_font, text) + lay.gap + count_w <= usable
    if text:
        draw_text(draw, (lay.margin, y), fit_end(lay.title_font, text, usable), lay.title_font, _TEXT)
    if show_count:
        # Bottom-align the small count with the big title so they read as one line.
        count_y = y + lay.title_line - lay.caption_line
        draw_text(draw, (width - lay.margin - count_w, count_y), count, lay.caption_font, _MUTED)
    return y + lay.title_line + lay.gap


def _draw_placeholder(draw: ImageDraw.ImageDraw, lay: _Layout, x: int, y: int, label: str) -> None:
    t = lay.thumb
    draw.rectangle((x, y, x + t - 1, y + t - 1), fill=_PLACEHOLDER)
    # A thin inset frame reads as "an image should be here" even at small sizes.
    inset = max(3, t // 20)
    draw.rectangle((x + inset, y + inset, x + t - 1 - inset, y + t - 1 - inset), outline=_PLACEHOLDER_TEXT, width=1)
    font = lay.title_font if text_width(lay.title_font, label) < t - 2 * inset else lay.caption_font
    w = text_width(font, label)
    draw_text(draw, (x + (t - w) / 2, y + (t - line_height(font)) / 2), label, font, _PLACEHOLDER_TEXT)


def _draw_caption(draw: ImageDraw.ImageDraw, lay: _Layout, x: int, y: int, item: GalleryItem) -> None:
    font = lay.caption_font
    y += lay.gap // 2
    rank = f"#{item.rank}"
    draw_text(draw, (x, y), rank, font, _ACCENT)
    score = f"{item.score:.3f}"
    score_x = x + text_width(font, rank + "  ")
    draw_text(draw, (score_x, y), score, font, _MUTED)
    if item.words:  # found by its words: they follow the score, in the accent colour
        words_x = score_x + text_width(font, score + "  ")
        words = fit_end(font, f"「{display(item.words_line())}」", lay.thumb - (words_x - x))
        draw_text(draw, (words_x, y), words, font, _ACCENT)
    name = display(os.path.basename(item.path) or item.path)
    draw_text(draw, (x, y + lay.caption_line + 2), fit_middle(font, name, lay.thumb), font, _TEXT)


def write_grid(
    items: Sequence[GalleryItem],
    out: str | Path,
    *,
    title: str | None = None,
    thumb: int = 256,
    columns: int | None = None,
) -> Path:
    """Write a contact sheet of `items` (JPEG, or PNG if `out` ends in .png); return its path.

    Each tile is the thumbnail letterboxed in a `thumb`-pixel square, captioned "#rank  score"
    and the file name; `title` (the query) heads the sheet. Unreadable hits get a placeholder.
    Raises CNClipError if `out` cannot be written.
    """
    check_thumb(thumb)
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    hits = by_rank(items)
    n = len(hits)
    out_path = Path(out)
    fmt = "PNG" if out_path.suffix.lower() == ".png" else "JPEG"

    lay = _layout(thumb)
    if n:
        cols = min(columns if columns is not None else min(MAX_COLUMNS, math.ceil(math.sqrt(n))), n)
        rows = math.ceil(n / cols)
        width = 2 * lay.margin + cols * thumb + (cols - 1) * lay.gap
        body_h = rows * lay.cell_h + (rows - 1) * lay.gap
    else:
        cols = rows = 0
        width = 2 * lay.margin + 2 * thumb + lay.gap
        body_h = max(lay.title_line * 2, thumb // 2)
    header_h = lay.title_line + lay.gap if title is not None else 0
    height = 2 * lay.margin + header_h + body_h
    if fmt == "JPEG" and max(width, height) > _JPEG_MAX_SIDE:
        raise CNClipError(
            f"{out_path}: a {width}x{height} sheet is too large for JPEG; show fewer results, "
            "use a smaller thumbnail size, or write HTML instead"
        )

    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    top = _draw_header(draw, lay, width, title, n)

    if not n:
        box = (lay.margin, top, width - lay.margin - 1, top + body_h - 1)
        draw.rounded_rectangle(box, radius=lay.gap, fill=_LETTERBOX)
        label = "no results"
        w = text_width(lay.title_font, label)
        cy = top + (body_h - lay.title_line) / 2
        draw_text(draw, (lay.margin + (width - 2 * lay.margin - w) / 2, cy), label, lay.title_font, _MUTED)

    for i, item in enumerate(hits):
        r, c = divmod(i, cols)
        x = lay.margin + c * (thumb + lay.gap)
        y = top + r * (lay.cell_h + lay.gap)
        img, problem = thumbnail(item.path, thumb)
        if img is None:
            _draw_placeholder(draw, lay, x, y, problem)
        else:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=_LETTERBOX)
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        _draw_caption(draw, lay, x, y + thumb, item)

    def save(fh: BinaryIO) -> None:
        if fmt == "PNG":
            sheet.save(fh, "PNG", optimize=True)
        else:
            # 4:4:4 chroma keeps coloured caption text crisp; quality 90 is visually lossless here.
            sheet.save(fh, "JPEG", quality=90, subsampling=0, optimize=True)

    return publish(out_path, save)
