"""The font contact sheets draw text in, and text measured and fitted in it.

Queries are usually Chinese, so a CJK-capable system font is hunted for (`$CNCLIP_FONT` first:
known paths, then the font folders, then fontconfig); without one, whatever font there is.
The bitmap fallback only draws Latin-1: text for it has other characters replaced.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from PIL import ImageDraw, ImageFont

__all__ = [
    "Font",
    "FontChoice",
    "draw_text",
    "find_cjk_font",
    "fit_end",
    "fit_middle",
    "font_choice",
    "has_glyphs",
    "line_height",
    "sheet_font",
    "text_width",
]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class FontChoice(NamedTuple):
    """The font file (and face) the sheets draw with, and whether it draws Chinese."""

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


def has_glyphs(font: Font, text: str) -> bool:
    """Whether `font` draws every character of `text` with a real glyph rather than tofu."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return all(ord(c) < 256 for c in text)  # the bitmap font is Latin-1 only
    notdef = _mask_key(font, _NOTDEF_PROBE)
    return all(_mask_key(font, ch) != notdef for ch in text if not ch.isspace())


def _is_cjk_face(font: ImageFont.FreeTypeFont) -> bool:
    return has_glyphs(font, _CJK_PROBE)


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
def _font_choice(env_font: str | None) -> FontChoice:
    """Resolve the font once per $CNCLIP_FONT value (the argument), since lookups walk folders."""
    if env_font:
        # An explicit choice is honoured even if it lacks CJK glyphs; if it cannot be loaded
        # the search carries on, because a sheet in a fallback font beats no sheet.
        picked = _pick_face(env_font) if os.path.isfile(env_font) else None
        if picked is not None:
            return FontChoice(env_font, picked[0], picked[1])
    seen: set[str] = set()
    for path in _candidate_cjk_paths():
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        picked = _pick_face(path)
        if picked is not None and picked[1]:
            return FontChoice(path, picked[0], True)
    for path in _KNOWN_PLAIN_FONTS:
        if os.path.isfile(path) and _pick_face(path) is not None:
            return FontChoice(path, 0, False)
    return FontChoice(None, 0, False)


def font_choice() -> FontChoice:
    """The font for the current `$CNCLIP_FONT` (or none set), looked up once per value."""
    return _font_choice(os.environ.get("CNCLIP_FONT") or None)


def find_cjk_font() -> Path | None:
    """The CJK-capable font the grid will use ($CNCLIP_FONT first), or None if there is none.

    Lets a caller warn that Chinese text will render as boxes and suggest setting CNCLIP_FONT.
    """
    choice = font_choice()
    return Path(choice.path) if choice.cjk and choice.path else None


@functools.lru_cache(maxsize=32)
def _load_font(choice: FontChoice, size: int) -> Font:
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


def sheet_font(size: int) -> Font:
    """The chosen font at `size` pixels (Pillow's built-in one when it will not load)."""
    return _load_font(font_choice(), size)


# --------------------------------------------------------------------------------------------
# Text in a font


def _drawable(text: str, font: Font) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    # The bitmap fallback font can only encode Latin-1; anything else would raise.
    return "".join(c if ord(c) < 256 else "?" for c in text)


def _ellipsis(font: Font) -> str:
    return "…" if has_glyphs(font, "…") else "..."


def text_width(font: Font, text: str) -> float:
    """Pixels `text` takes drawn in `font`."""
    return font.getlength(_drawable(text, font)) if text else 0.0


def line_height(font: Font) -> int:
    """Pixels one line of `font` takes, ascent to descent."""
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return font.getbbox("Ag#0")[3]


def fit_end(font: Font, text: str, max_w: float) -> str:
    """`text` cut at the end with an ellipsis so it fits `max_w` pixels."""
    if text_width(font, text) <= max_w:
        return text
    ell = _ellipsis(font)
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits together with the ellipsis
        mid = (lo + hi + 1) // 2
        if text_width(font, text[:mid].rstrip() + ell) <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ell if lo else ell


def fit_middle(font: Font, text: str, max_w: float) -> str:
    """`text` with its middle replaced by an ellipsis so it fits: file names keep their
    distinguishing start and their extension (IMG_20230…_0042.jpg)."""
    if text_width(font, text) <= max_w:
        return text
    ell = _ellipsis(font)
    lo, hi = 0, len(text) - 1
    best = ell
    while lo <= hi:  # most characters kept, split ~60/40 between head and tail
        keep = (lo + hi) // 2
        head = math.ceil(keep * 0.6)
        candidate = text[:head] + ell + (text[len(text) - (keep - head) :] if keep - head else "")
        if text_width(font, candidate) <= max_w:
            best, lo = candidate, keep + 1
        else:
            hi = keep - 1
    return best


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Font, fill: tuple) -> None:
    """Draw `text` at `xy` (its top left), in any font: the bitmap one gets "?" for what it cannot draw."""
    draw.text(xy, _drawable(text, font), font=font, fill=fill)
