"""A PNG of a run's curves (training loss; validation recall), drawn with Pillow.

Pillow is already a dependency; matplotlib would be a large one for two line charts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw

_W, _H, _PAD = 560, 300, 48
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: dict[str, Sequence[tuple[float, float]]]) -> None:
    x0, y0, x1, y1 = _PAD, top + 28, _W - 16, top + _H - 30
    draw.text((x0, top + 8), title, fill=(0, 0, 0))
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    points = [pt for values in series.values() for pt in values]
    if not points:
        draw.text((x0 + 10, y0 + 10), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if math.isclose(ymax, ymin):
        ymin, ymax = ymin - 0.5, ymax + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    for frac in (0.0, 0.5, 1.0):
        y = ymin + frac * (ymax - ymin)
        _, py = at(xmin, y)
        draw.line((x0, py, x1, py), fill=(230, 230, 230))
        draw.text((4, py - 6), f"{y:.3g}", fill=(90, 90, 90))
    draw.text((x0, y1 + 6), f"step {xmin:.0f}", fill=(90, 90, 90))
    draw.text((x1 - 70, y1 + 6), f"step {xmax:.0f}", fill=(90, 90, 90))
    for i, (name, values) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [at(x, y) for x, y in values]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for px, py in pts if len(pts) < 40 else pts[-1:]:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        draw.text((x0 + 8 + 110 * i, y0 + 4), name, fill=color)


def plot_run(events: Sequence[dict], path: str | os.PathLike) -> None:
    """Write `path` (PNG): training loss by step, and validation recall by step when there is any."""
    train = [(e["step"], e["loss"]) for e in events if e.get("kind") == "train"]
    evals = [e for e in events if e.get("kind") == "eval"]
    recall = {
        "text->image R@1": [(e["step"], e["t2i"]["R@1"]) for e in evals],
        "image->text R@1": [(e["step"], e["i2t"]["R@1"]) for e in evals],
        "mean recall": [(e["step"], e["MR"]) for e in evals],
    }
    panels = [("training loss", {"loss": train})]
    if evals:
        panels.append(("validation recall", recall))
    img = Image.new("RGB", (_W, _H * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, series) in enumerate(panels):
        _panel(draw, i * _H, title, series)
    img.save(path, format="PNG")
