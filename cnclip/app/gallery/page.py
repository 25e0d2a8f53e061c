"""The contact sheet as a self-contained HTML page (`write_html`), or one page of several
galleries (`write_groups_html`): cards with the thumbnail, rank, score and a link to the file."""

from __future__ import annotations

import base64
import functools
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from cnclip.app.gallery.items import GalleryItem, by_rank, check_thumb, display, publish, thumbnail

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
.words { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.words mark { background: #ffe08a; color: inherit; }
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
    full = display(os.path.abspath(item.path))
    name = display(os.path.basename(item.path) or item.path)
    uri = _file_uri(item.path)
    if embed:
        img, problem = thumbnail(item.path, thumb)
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
        + (f'<div class="words">{_marked_words(item)}</div>' if item.words else "")
        + "</figcaption></figure>"
    )


def _marked_words(item: GalleryItem) -> str:
    """The matched lines of words, the matches in <mark>."""
    lines = []
    for line in item.words:
        text, out, at = line["text"], [], 0
        for start, end in line.get("spans", ()):
            out += [html.escape(text[at:start]), f"<mark>{html.escape(text[start:end])}</mark>"]
            at = end
        lines.append("".join(out) + html.escape(text[at:]))
    return " / ".join(lines)


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
    check_thumb(thumb)
    hits = by_rank(items)
    heading = display(title) if title else "cnclip search results"
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

    return publish(Path(out), save)


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
    check_thumb(thumb)
    esc = functools.partial(html.escape, quote=True)
    sections = [
        f'<section id="g{g}"><h2>{esc(display(heading))}</h2><div class="grid">\n'
        + "\n".join(_card(it, thumb, embed, anchor=f"g{g}-{it.rank}") for it in by_rank(items))
        + "\n</div></section>"
        for g, (heading, items) in enumerate(groups, 1)
    ]
    main = "<main>\n" + ("\n".join(sections) if sections else '<p class="empty">none</p>') + "\n</main>"
    return _write_page(out, display(title), count, main, thumb)
