"""A captioned toy world for training tests: coloured shapes, counted and placed, with Chinese captions.

108 distinct scenes (6 colours x 3 shapes x 3 counts x 2 sides); every draw jitters sizes and
positions, so two images of one scene differ in pixels but share a caption's meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "红色": (220, 40, 40),
    "绿色": (40, 180, 60),
    "蓝色": (50, 90, 230),
    "黄色": (235, 215, 40),
    "紫色": (160, 60, 210),
    "白色": (245, 245, 245),
}
SHAPES = ("圆形", "正方形", "三角形")
COUNTS = ("一个", "两个", "三个")
SIDES = ("左边", "右边")
TEMPLATES = ("{n}{c}的{s}在{p}", "{p}有{n}{c}的{s}", "画面{p}是{n}{c}{s}")

SCENES = [(c, s, n, p) for c in COLOURS for s in SHAPES for n in range(3) for p in range(2)]


def draw_scene(scene: tuple, rng: np.random.Generator, size: int = 64) -> Image.Image:
    colour, shape, n, side = scene
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 50, 3)))
    draw = ImageDraw.Draw(img)
    half = size // 2
    r = size * 0.09 * rng.uniform(0.85, 1.15)
    # objects sit in a column in their half, spread vertically, jittered
    for i in range(n + 1):
        cx = (side * half) + half / 2 + rng.uniform(-half * 0.15, half * 0.15)
        cy = size * (i + 1) / (n + 2) + rng.uniform(-size * 0.04, size * 0.04)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "圆形":
            draw.ellipse(box, fill=fill)
        elif shape == "正方形":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.75), (cx + r, cy + r * 0.75)], fill=fill)
    return img


def caption(scene: tuple, template: int = 0) -> str:
    colour, shape, n, side = scene
    return TEMPLATES[template].format(n=COUNTS[n], c=colour, s=shape, p=SIDES[side])


def write_dataset(folder: Path, n_images: int, *, seed: int, unique_scenes: bool = False, size: int = 64) -> Path:
    """Images plus pairs.jsonl (two captions per image, different templates); returns the JSONL path.

    `unique_scenes` draws every scene once (in order, cycling) so a held-out set has exactly one
    right answer per caption.
    """
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        scene = SCENES[i % len(SCENES)] if unique_scenes else SCENES[int(rng.integers(len(SCENES)))]
        name = f"images/{i:05d}.png"
        draw_scene(scene, rng, size).save(folder / name)
        first = int(rng.integers(len(TEMPLATES)))
        for t in (first, (first + 1) % len(TEMPLATES)):
            lines.append(json.dumps({"image": name, "text": caption(scene, t)}, ensure_ascii=False))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
