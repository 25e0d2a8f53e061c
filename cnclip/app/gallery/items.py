"""A hit on a contact sheet (`GalleryItem`) and what both sheets do with hits: thumbnails that
never fail a sheet, names that print, the order by rank, and publishing the sheet's file."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.transform import load_image

MIN_THUMB = 16


@dataclass(frozen=True)
class GalleryItem:
    """One search hit to show: the image file, its cosine similarity and its 1-based rank."""

    path: str
    score: float
    rank: int
    label: str = ""  # shown after the rank on HTML cards, e.g. "最佳 · 4032×3024" for the best copy of a group
    # the lines of words the hit was found by, each {"text", "spans": [[start, end], ...]} (Hit.words)
    words: tuple[dict, ...] = ()

    def words_line(self) -> str:
        """The matched words as one caption line."""
        return " / ".join(w["text"] for w in self.words)


def display(text: str) -> str:
    """Make undecodable file-name bytes (surrogate escapes) printable and UTF-8 encodable."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def thumbnail(path: str, thumb: int) -> tuple[Image.Image | None, str]:
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


def by_rank(items: Sequence[GalleryItem]) -> list[GalleryItem]:
    """The items in the order of their ranks, best first."""
    return sorted(items, key=lambda it: it.rank)


def check_thumb(thumb: int) -> None:
    """ValueError for a thumbnail side too small to show anything."""
    if thumb < MIN_THUMB:
        raise ValueError(f"thumb must be at least {MIN_THUMB} pixels, got {thumb}")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def publish(out: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Publish what `write` writes as `out` (cnclip.atomic), into a folder that exists: a typo in
    the path must not leave a tree of new folders behind, as `cp` and `tar` would not."""
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise CNClipError(f"{out}: is a folder; give a file name for the output, e.g. {out / 'results.jpg'}")
    if not out.parent.is_dir():
        raise CNClipError(f"{out}: folder {out.parent} does not exist; create it first or choose another path")
    try:
        with atomic.replacing(out) as tmp, open(tmp, "wb") as fh:
            write(fh)
    except OSError as exc:
        raise CNClipError(f"{out}: cannot write there ({_reason(exc)}); choose a writable output path") from exc
    return out
