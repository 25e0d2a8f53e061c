"""Contact sheets of search hits: a JPEG/PNG grid (`write_grid`) and a self-contained HTML page.

People would rather look than read paths, so `cnclip search --grid/--html` hands its hits here.
The grid's captions are drawn in a CJK-capable font where there is one (cnclip.app.fonts).
A hit whose file has gone missing or will not decode becomes a placeholder; it never stops
the sheet from being written. Outputs are published atomically (cnclip.atomic).
"""

from __future__ import annotations

from cnclip.app.fonts import find_cjk_font
from cnclip.app.gallery.grid import write_grid
from cnclip.app.gallery.items import GalleryItem
from cnclip.app.gallery.page import write_groups_html, write_html

__all__ = ["GalleryItem", "find_cjk_font", "write_grid", "write_groups_html", "write_html"]
