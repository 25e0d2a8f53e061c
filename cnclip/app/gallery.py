"""Contact sheets of search hits: a JPEG/PNG grid (`write_grid`) and a self-contained HTML page.

People would rather look than read paths, so `cnclip search --grid/--html` hands its hits here.
Queries are usually Chinese, so the grid renderer hunts for a CJK-capable system font
(`$CNCLIP_FONT` first); without one the sheet is still written, with whatever font there is.
A hit whose file has gone missing or will not decode becomes a placeholder; it never stops
the sheet from being written. Outputs are published atomically (cnclip.atomic).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from PIL import Image, ImageDraw, ImageFont

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.transform import load_image

__all__ = ["GalleryItem", "find_cjk_font", "write_grid", "write_groups_html", "write_html"]

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

MAX_COLUMNS = 6
_MIN_THUMB = 16
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
class GalleryItem:
    """One search hit to show: the image file, its cosine similarity and its 1-based rank."""

    path: str
    score: float
    rank: int
    label: str = ""  # shown after the rank on HTML cards, e.g. "最佳 · 4032×3024" for the best copy of a group


# --------------------------------------------------------------------------------------------
# Fonts


class _FontChoice(NamedTuple):
    path: str | None  # None: Pillow's built-in font
    index: int  # face inside a .ttc/.otc collection
    cjk: bool


_FONT_EXTS = (".ttf", ".otf", ".ttc", ".otc")
# Characters a font must have to count as CJK-capable: common, simplified-only (边, 说) and
# one traditional-era form, so a Latin font with a handful of stray Han glyphs does not pass.
_CJK_PROBE = "中文边说日"
# A private-use code point no real font maps: it renders as the font's .notdef ("tofu") glyph.
_NOTDEF_PROBE = "\U0010fffd"

# Lower-cased file-name fragments of CJK fonts, most preferred first (Simplified Chinese
# designs before Pan-CJK collections before fallback fonts with rougher hinting).
_CJK_NAME_HINTS = (
    "notosanscjksc",
    "notosanssc",
    "sourcehansanssc",
    "sourcehansanscn",
    "notosanscjk",
    "sourcehansans",
    "pingfang",
    "msyh",
    "microsoftyahei",
    "hiraginosansgb",
    "stheiti",
    "wqymicrohei",
    "wqyzenhei",
    "wqy",
    "wenquanyi",
    "simhei",
    "deng",
    "notoserifcjk",
    "sourcehanserif",
    "droidsansfallback",
    "simsun",
    "songti",
    "uming",
    "ukai",
    "arialunicode",
)
_WEIGHT_WORDS = ("black", "heavy", "bold", "thin", "extralight", "light", "demilight", "medium", "semibold")

# Well-known locations, checked before any directory walk because they are cheap stat() calls.
_KNOWN_CJK_FONTS = (
    # Debian/Ubuntu (fonts-noto-cjk, fonts-wqy-*, fonts-droid-fallback, fonts-arphic-*)
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    # Fedora / Arch / openSUSE
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-sans-cjk-vf-fonts/NotoSansCJK-VF.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/adobe-source-han-sans/SourceHanSansSC-Regular.otf",
    "/usr/share/fonts/adobe-source-han-sans/SourceHanSans-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/google-droid-sans-fonts/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    # macOS
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "/System/Library/Fonts/Supplemental/Songti.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
)
_KNOWN_WINDOWS_CJK_FONTS = ("msyh.ttc", "msyh.ttf", "simhei.ttf", "Deng.ttf", "simsun.ttc")
# Used only when no CJK font exists: wider Unicode coverage and nicer than Pillow's built-in.
_KNOWN_PLAIN_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
)


def _font_dirs() -> list[Path]:
    home = Path.home()
    dirs = [
        Path("/usr/share/fonts"),
        Path("/usr/local/share/fonts"),
        home / ".local/share/fonts",
        home / ".fonts",
        Path("/System/Library/Fonts"),
        Path("/Library/Fonts"),
        home / "Library/Fonts",
    ]
    windir = os.environ.get("WINDIR") or os.environ.get("SystemRoot")
    if windir:
        dirs.append(Path(windir) / "Fonts")
    local = os.environ.get("LOCALAPPDATA")
    if local:
        dirs.append(Path(local) / "Microsoft/Windows/Fonts")
    return dirs


def _hint_rank(path: str) -> tuple[int, int] | None:
    """Sort key for a font file name, or None when it does not look like a CJK font."""
    name = Path(path).name.lower()
    if not name.endswith(_FONT_EXTS):
        return None
    flat = "".join(c for c in name if c.isalnum())
    for i, hint in enumerate(_CJK_NAME_HINTS):
        if hint in flat:
            # Prefer the Regular cut: Bold/Thin are poor for small captions.
            weight = 0 if "regular" in flat else 1 + sum(w in flat for w in _WEIGHT_WORDS)
            return i, weight
    return None


def _walk_font_dirs() -> Iterator[str]:
    found: list[tuple[tuple[int, int], str]] = []
    for root_dir in _font_dirs():
        if not root_dir.is_dir():
            continue
        for dirpath, _dirnames, filenames in os.walk(root_dir):
            for fn in filenames:
                rank = _hint_rank(fn)
                if rank is not None:
                    found.append((rank, os.path.join(dirpath, fn)))
    yield from (p for _, p in sorted(found))


def _fontconfig_cjk_fonts() -> list[str]:
    """Ask fontconfig (Linux, some macOS setups) for fonts it says cover Chinese."""
    exe = shutil.which("fc-list")
    if exe is None:
        return []
    try:
        res = subprocess.run([exe, ":lang=zh", "file"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    paths = [line.split(":", 1)[0].strip() for line in res.stdout.splitlines() if line.strip()]
    return sorted(set(paths), key=lambda p: (_hint_rank(p) or (len(_CJK_NAME_HINTS), 9), p))


def _candidate_cjk_paths() -> Iterator[str]:
    yield from _KNOWN_CJK_FONTS
    windir = os.environ.get("WINDIR") or os.environ.get("SystemRoot")
    if windir or sys.platform == "win32":
        for name in _KNOWN_WINDOWS_CJK_FONTS:
            yield os.path.join(windir or r"C:\Windows", "Fonts", name)
    yield from _walk_font_dirs()
    yield from _fontconfig_cjk_fonts()


def _mask_key(font: ImageFont.FreeTypeFont, text: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(text)
    return mask.size, bytes(mask)


def _has_glyphs(font: _Font, text: str) -> bool:
    """Whether `font` draws every character of `text` with a real glyph rather than tofu."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return all(ord(c) < 256 for c in text)  # the bitmap font is Latin-1 only
    notdef = _mask_key(font, _NOTDEF_PROBE)
    return all(_mask_key(font, ch) != notdef for ch in text if not ch.isspace())


def _is_cjk_face(font: ImageFont.FreeTypeFont) -> bool:
    return _has_glyphs(font, _CJK_PROBE)


def _pick_face(path: str) -> tuple[int, bool] | None:
    """Best face of a font file: (index, cjk-capable), or None if it will not load.

    Collections such as NotoSansCJK.ttc hold JP/KR/SC/TC faces; the SC face draws the
    simplified-Chinese glyph shapes users expect, so it wins over index 0.
    """
    best: tuple[int, bool] | None = None
    for index in range(16 if path.lower().endswith((".ttc", ".otc")) else 1):
        try:
            font = ImageFont.truetype(path, 24, index=index)
        except (OSError, ValueError):
            break  # past the last face (or not a font at all)
        cjk = _is_cjk_face(font)
        family = (font.getname()[0] or "").upper()
        simplified = any(tag in family for tag in (" SC", " CN", " GB", "YAHEI", "SIMPLIFIED"))
        if cjk and simplified:
            return index, True
        if best is None or (cjk and not best[1]):
            best = (index, cjk)
    return best


@functools.lru_cache(maxsize=8)
def _font_choice(env_font: str | None) -> _FontChoice:
    """Resolve the font once per $CNCLIP_FONT value (the argument), since lookups walk folders."""
    if env_font:
        # An explicit choice is honoured even if it lacks CJK glyphs; if it cannot be loaded
        # the search carries on, because a sheet in a fallback font beats no sheet.
        picked = _pick_face(env_font) if os.path.isfile(env_font) else None
        if picked is not None:
            return _FontChoice(env_font, picked[0], picked[1])
    seen: set[str] = set()
    for path in _candidate_cjk_paths():
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        picked = _pick_face(path)
        if picked is not None and picked[1]:
            return _FontChoice(path, picked[0], True)
    for path in _KNOWN_PLAIN_FONTS:
        if os.path.isfile(path) and _pick_face(path) is not None:
            return _FontChoice(path, 0, False)
    return _FontChoice(None, 0, False)


def _current_font_choice() -> _FontChoice:
    return _font_choice(os.environ.get("CNCLIP_FONT") or None)


def find_cjk_font() -> Path | None:
    """The CJK-capable font the grid will use ($CNCLIP_FONT first), or None if there is none.

    Lets a caller warn that Chinese text will render as boxes and suggest setting CNCLIP_FONT.
    """
    choice = _current_font_choice()
    return Path(choice.path) if choice.cjk and choice.path else None


@functools.lru_cache(maxsize=32)
def _load_font(choice: _FontChoice, size: int) -> _Font:
    if choice.path is not None:
        try:
            return ImageFont.truetype(choice.path, size, index=choice.index)
        except (OSError, ValueError):
            pass  # vanished since the lookup: fall through to the built-in font
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        # Pillow < 10.1 has no size argument, and without FreeType only the tiny bitmap font exists.
        return ImageFont.load_default()


def _font(size: int) -> _Font:
    return _load_font(_current_font_choice(), size)


# --------------------------------------------------------------------------------------------
# Text helpers


def _display(text: str) -> str:
    """Make undecodable file-name bytes (surrogate escapes) printable and UTF-8 encodable."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _drawable(text: str, font: _Font) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    # The bitmap fallback font can only encode Latin-1; anything else would raise.
    return "".join(c if ord(c) < 256 else "?" for c in text)


def _ellipsis(font: _Font) -> str:
    return "…" if _has_glyphs(font, "…") else "..."


def _width(font: _Font, text: str) -> float:
    return font.getlength(_drawable(text, font)) if text else 0.0


def _line_height(font: _Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return font.getbbox("Ag#0")[3]


def _fit_end(font: _Font, text: str, max_w: float) -> str:
    """`text` cut at the end with an ellipsis so it fits `max_w` pixels."""
    if _width(font, text) <= max_w:
        return text
    ell = _ellipsis(font)
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits together with the ellipsis
        mid = (lo + hi + 1) // 2
        if _width(font, text[:mid].rstrip() + ell) <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ell if lo else ell


def _fit_middle(font: _Font, text: str, max_w: float) -> str:
    """`text` with its middle replaced by an ellipsis so it fits: file names keep their
    distinguishing start and their extension (IMG_20230…_0042.jpg)."""
    if _width(font, text) <= max_w:
        return text
    ell = _ellipsis(font)
    lo, hi = 0, len(text) - 1
    best = ell
    while lo <= hi:  # most characters kept, split ~60/40 between head and tail
        keep = (lo + hi) // 2
        head = math.ceil(keep * 0.6)
        candidate = text[:head] + ell + (text[len(text) - (keep - head) :] if keep - head else "")
        if _width(font, candidate) <= max_w:
            best, lo = candidate, keep + 1
        else:
            hi = keep - 1
    return best


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: _Font, fill: tuple) -> None:
    draw.text(xy, _drawable(text, font), font=font, fill=fill)


# --------------------------------------------------------------------------------------------
# Thumbnails


def _thumbnail(path: str, thumb: int) -> tuple[Image.Image | None, str]:
    """(thumbnail, "") or (None, short reason) for a hit whose file cannot be shown."""
    if not os.path.lexists(path):
        return None, "missing"
    try:
        img = load_image(path, draft_size=thumb)
        img.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    except (CNClipError, OSError):
        # Deleted between the check and the read, corrupt, truncated or over the pixel cap:
        # one bad hit must not cost the user the whole sheet.
        return None, "missing" if not os.path.exists(path) else "unreadable"
    return img, ""


def _sorted(items: Sequence[GalleryItem]) -> list[GalleryItem]:
    return sorted(items, key=lambda it: it.rank)


def _check_thumb(thumb: int) -> None:
    if thumb < _MIN_THUMB:
        raise ValueError(f"thumb must be at least {_MIN_THUMB} pixels, got {thumb}")


# --------------------------------------------------------------------------------------------
# Atomic output


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _write_atomically(out: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Create parent folders, then publish what `write` writes as `out` (cnclip.atomic)."""
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise CNClipError(f"{out}: is a folder; give a file name for the output, e.g. {out / 'results.jpg'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CNClipError(
            f"{out}: cannot create folder {out.parent} ({_reason(exc)}); choose a writable output path"
        ) from exc
    try:
        with atomic.replacing(out) as tmp, open(tmp, "wb") as fh:
            write(fh)
    except OSError as exc:
        raise CNClipError(f"{out}: cannot write there ({_reason(exc)}); choose a writable output path") from exc
    return out


# --------------------------------------------------------------------------------------------
# Grid


@dataclass(frozen=True)
class _Layout:
    thumb: int
    gap: int
    margin: int
    caption_font: _Font
    title_font: _Font
    caption_line: int
    title_line: int

    @property
    def caption_h(self) -> int:
        return self.gap // 2 + 2 * self.caption_line + 2

    @property
    def cell_h(self) -> int:
        return self.thumb + self.caption_h


def _layout(thumb: int) -> _Layout:
    caption_font = _font(max(10, round(thumb * 0.058)))
    title_font = _font(max(14, round(thumb * 0.1)))
    gap = max(6, thumb // 16)
    return _Layout(
        thumb=thumb,
        gap=gap,
        margin=max(8, round(gap * 1.25)),
        caption_font=caption_font,
        title_font=title_font,
        caption_line=_line_height(caption_font),
        title_line=_line_height(title_font),
    )


def _draw_header(draw: ImageDraw.ImageDraw, lay: _Layout, width: int, title: str | None, n: int) -> int:
    """Title (left) and hit count (right) on one line; returns the y where the grid starts."""
    y = lay.margin
    if title is None:
        return y
    usable = width - 2 * lay.margin
    text = _display(title)
    count = f"{n} result{'s' if n != 1 else ''}"
    count_w = _width(lay.caption_font, count)
    # The query matters more than the count: show the count only where the whole title fits too.
    show_count = n > 0 and _width(lay.title_font, text) + lay.gap + count_w <= usable
    if text:
        _text(draw, (lay.margin, y), _fit_end(lay.title_font, text, usable), lay.title_font, _TEXT)
    if show_count:
        # Bottom-align the small count with the big title so they read as one line.
        count_y = y + lay.title_line - lay.caption_line
        _text(draw, (width - lay.margin - count_w, count_y), count, lay.caption_font, _MUTED)
    return y + lay.title_line + lay.gap


def _draw_placeholder(draw: ImageDraw.ImageDraw, lay: _Layout, x: int, y: int, label: str) -> None:
    t = lay.thumb
    draw.rectangle((x, y, x + t - 1, y + t - 1), fill=_PLACEHOLDER)
    # A thin inset frame reads as "an image should be here" even at small sizes.
    inset = max(3, t // 20)
    draw.rectangle((x + inset, y + inset, x + t - 1 - inset, y + t - 1 - inset), outline=_PLACEHOLDER_TEXT, width=1)
    font = lay.title_font if _width(lay.title_font, label) < t - 2 * inset else lay.caption_font
    w = _width(font, label)
    _text(draw, (x + (t - w) / 2, y + (t - _line_height(font)) / 2), label, font, _PLACEHOLDER_TEXT)


def _draw_caption(draw: ImageDraw.ImageDraw, lay: _Layout, x: int, y: int, item: GalleryItem) -> None:
    font = lay.caption_font
    y += lay.gap // 2
    rank = f"#{item.rank}"
    _text(draw, (x, y), rank, font, _ACCENT)
    _text(draw, (x + _width(font, rank + "  "), y), f"{item.score:.3f}", font, _MUTED)
    name = _display(os.path.basename(item.path) or item.path)
    _text(draw, (x, y + lay.caption_line + 2), _fit_middle(font, name, lay.thumb), font, _TEXT)


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
    _check_thumb(thumb)
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    hits = _sorted(items)
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
        w = _width(lay.title_font, label)
        cy = top + (body_h - lay.title_line) / 2
        _text(draw, (lay.margin + (width - 2 * lay.margin - w) / 2, cy), label, lay.title_font, _MUTED)

    for i, item in enumerate(hits):
        r, c = divmod(i, cols)
        x = lay.margin + c * (thumb + lay.gap)
        y = top + r * (lay.cell_h + lay.gap)
        img, problem = _thumbnail(item.path, thumb)
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

    return _write_atomically(out_path, save)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { color-scheme: light dark; --bg: #f7f7f5; --card: #ffffff; --box: #e4e4e1; --text: #222;
  --muted: #6f6f6f; --accent: #c4521c; --ph: #9e9e9e; --shadow: 0 1px 3px rgba(0,0,0,.12); }
@media (prefers-color-scheme: dark) {
  :root { --bg: #17181a; --card: #232428; --box: #2e3034; --text: #e8e8e8; --muted: #9a9a9a;
    --accent: #ff8a4c; --ph: #55585e; --shadow: 0 1px 3px rgba(0,0,0,.5); }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--text);
  font: 14px/1.4 system-ui, -apple-system, "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei",
    "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 20px; }
h1 { margin: 0; font-size: 1.6em; font-weight: 600; overflow-wrap: anywhere; }
.count { color: var(--muted); }
.grid { display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fill, minmax(min(100%, var(--thumb)), 1fr)); }
.card { margin: 0; background: var(--card); border-radius: 8px; overflow: hidden; box-shadow: var(--shadow); }
.thumb { display: flex; align-items: center; justify-content: center; aspect-ratio: 1 / 1;
  background: var(--box); }
.thumb img { max-width: 100%; max-height: 100%; object-fit: contain; display: block; }
.placeholder { background: var(--ph); color: #fafafa; font-size: 1.2em; letter-spacing: .05em; }
figcaption { padding: 8px 10px 10px; }
.meta { display: flex; justify-content: space-between; gap: 8px; font-variant-numeric: tabular-nums; }
.rank { color: var(--accent); font-weight: 600; }
.score { color: var(--muted); }
.name { display: block; color: var(--text); text-decoration: none; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
a.name:hover { text-decoration: underline; }
.empty { color: var(--muted); font-size: 1.2em; padding: 48px 0; text-align: center; }
.label { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
section h2 { margin: 28px 0 12px; font-size: 1.15em; font-weight: 600; }
""".strip()


def _file_uri(path: str) -> str:
    return Path(os.path.abspath(path)).as_uri()


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(item: GalleryItem, thumb: int, embed: bool, anchor: str | None = None) -> str:
    esc = functools.partial(html.escape, quote=True)
    full = _display(os.path.abspath(item.path))
    name = _display(os.path.basename(item.path) or item.path)
    uri = _file_uri(item.path)
    if embed:
        img, problem = _thumbnail(item.path, thumb)
        src = _data_uri(img) if img is not None else ""
        size = f' width="{img.width}" height="{img.height}"' if img is not None else ""
    else:
        # Without embedding nothing is decoded (that is the point), so only absence is caught.
        problem = "" if os.path.isfile(item.path) else "missing"
        src, size = uri, ""
    if problem:
        visual = f'<div class="thumb placeholder" title="{esc(full)}">{esc(problem)}</div>'
        cls = "card missing"
    else:
        visual = (
            f'<a class="thumb" href="{esc(uri)}" title="{esc(full)}">'
            f'<img src="{esc(src)}" alt="{esc(name)}"{size} loading="lazy" decoding="async"></a>'
        )
        cls = "card"
    return (
        f'<figure class="{cls}" id="{esc(anchor or f"r{int(item.rank)}")}">{visual}<figcaption>'
        f'<div class="meta"><span class="rank">#{int(item.rank)}</span>'
        + (f'<span class="label">{esc(item.label)}</span>' if item.label else "")
        + f'<span class="score">{item.score:.3f}</span></div>'
        f'<a class="name" href="{esc(uri)}" title="{esc(full)}">{esc(name)}</a>'
        "</figcaption></figure>"
    )


def write_html(
    items: Sequence[GalleryItem],
    out: str | Path,
    *,
    title: str | None = None,
    thumb: int = 256,
    embed: bool = True,
) -> Path:
    """Write a self-contained HTML gallery of `items`; return its path.

    Cards show the thumbnail, rank, score and file name, linking to the original (file://).
    `embed=True` inlines thumbnails as JPEG data URIs so the page can be moved or shared;
    `embed=False` points <img> at the original files. Raises CNClipError if `out` cannot be written.
    """
    _check_thumb(thumb)
    hits = _sorted(items)
    heading = _display(title) if title else "cnclip search results"
    n = len(hits)
    count = "no results" if n == 0 else f"{n} result{'s' if n != 1 else ''}"
    body = "\n".join(_card(it, thumb, embed) for it in hits) if hits else '<p class="empty">no results</p>'
    return _write_page(out, heading, count, f'<main class="grid">\n{body}\n</main>', thumb)


def _write_page(out: str | Path, heading: str, count: str, main: str, thumb: int) -> Path:
    """Publish one self-contained page: `heading` and `count` on top, then the `main` HTML."""
    esc = functools.partial(html.escape, quote=True)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="zh">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        '<meta name="generator" content="cnclip">\n'
        f"<title>{esc(heading)}</title>\n"
        f"<style>\n{_CSS}\n</style>\n</head>\n"
        f'<body style="--thumb: {int(thumb)}px">\n'
        f'<header><h1>{esc(heading)}</h1><span class="count">{esc(count)}</span></header>\n'
        f"{main}\n</body>\n</html>\n"
    )
    data = page.encode("utf-8")

    def save(fh: BinaryIO) -> None:
        fh.write(data)

    return _write_atomically(Path(out), save)


def write_groups_html(
    groups: Sequence[tuple[str, Sequence[GalleryItem]]],
    out: str | Path,
    *,
    title: str,
    count: str = "",
    thumb: int = 192,
    embed: bool = True,
) -> Path:
    """Write a self-contained HTML page of several galleries, one section per (heading, items)
    pair (e.g. the groups of `cnclip dupes`), with cards as in `write_html`; return its path."""
    _check_thumb(thumb)
    esc = functools.partial(html.escape, quote=True)
    sections = [
        f'<section id="g{g}"><h2>{esc(_display(heading))}</h2><div class="grid">\n'
        + "\n".join(_card(it, thumb, embed, anchor=f"g{g}-{it.rank}") for it in _sorted(items))
        + "\n</div></section>"
        for g, (heading, items) in enumerate(groups, 1)
    ]
    main = "<main>\n" + ("\n".join(sections) if sections else '<p class="empty">none</p>') + "\n</main>"
    return _write_page(out, _display(title), count, main, thumb)
