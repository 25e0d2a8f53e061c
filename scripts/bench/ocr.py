"""Words in photos, measured: reading speed next to embedding speed, recall of word queries, and
full-text latency at 10^5 and 10^6 files.

    nice .venv/bin/python scripts/bench/ocr.py --speed          # 12 MP photos with and without words, screenshots
    nice .venv/bin/python scripts/bench/ocr.py --recall         # Flickr8k-CN train photos with words drawn, screenshots
    nice .venv/bin/python scripts/bench/ocr.py --fts --n 1000000

Photos come from ../shared/data/flickr8k-cn (train split only; never committed) when it is there,
else from generated colour fields. Screenshots are Chinese pages rendered by the headless Chromium
the browser test uses. Fonts: every CJK font fontconfig lists (`fc-list :lang=zh`); the
development machine had WenQuanYi Zen Hei and AR PL UKai/UMing (apt-get install fonts-arphic-ukai
fonts-arphic-uming). Embedding uses the ViT-B-16 shape with random weights (speed depends on the
shape, not the values); the recall runs use a tiny random model, so their image-only column is
chance, and says so. Prints Markdown tables; names the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ann import machine  # noqa: E402

import cnclip  # noqa: E402
from cnclip.index.catalog import Catalog  # noqa: E402
from cnclip.index.words import WordQuery, tokens  # noqa: E402
from cnclip.model.ocr import DEFAULT_READ_SIDE, ENGINE_ENV, ENGINES, READER, WordReader, default_engine  # noqa: E402

FLICKR = HERE.parents[2] / "shared" / "data" / "flickr8k-cn"
SIZES = (16, 20, 24, 32, 48)
ANGLES = (0, 0, 0, 4, -7, 12)


# -- material -------------------------------------------------------------------------------------------


def captions() -> list[tuple[str, str]]:
    """(image path, caption) of the Flickr8k-CN train split, or generated stand-ins."""
    path = FLICKR / "train.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
        return [(str(FLICKR / r["image"]), r["text"]) for r in rows]
    rng = random.Random(0)
    chars = (
        "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
    )
    return [("", "".join(rng.choice(chars) for _ in range(rng.randint(8, 16)))) for _ in range(2000)]


def cjk_fonts() -> list[str]:
    """Font files fontconfig lists for Chinese (regular faces, bitmap faces left out)."""
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file", "style"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    files = sorted({line.split(":")[0] for line in out.splitlines() if "Sharp" not in line and line})
    if not files:
        from cnclip.app.fonts import find_cjk_font

        found = find_cjk_font()
        files = [str(found)] if found else []
    if not files:
        raise SystemExit("no CJK font: apt-get install fonts-wqy-zenhei")
    return files


def background(path: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    if path:
        return Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def draw_words(image: Image.Image, text: str, font_file: str, px: int, angle: int, style: str, rng) -> Image.Image:
    """`text` at `px` pixels, turned by `angle` degrees, on a plate, with a shadow, or plain on the photo."""
    font = ImageFont.truetype(font_file, px)
    box = font.getbbox(text)
    w, h = box[2] - box[0] + px, box[3] - box[1] + px
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    x = int(rng.integers(0, max(1, image.width - w)))
    y = int(rng.integers(0, max(1, image.height - h)))
    # ink a person could read there: dark on a light patch of the photo, light on a dark one
    light = np.asarray(image.crop((x, y, x + w, y + h)).convert("L")).mean() > 128
    if style == "plate":
        plates = (((250, 250, 245, 235), (20, 20, 20, 255)), ((30, 60, 140, 235), (255,) * 4))
        fill, ink = plates[int(rng.random() < 0.5)]
        d.rounded_rectangle((0, 0, w - 1, h - 1), radius=px // 4, fill=fill)
    else:
        ink = (15, 15, 15, 255) if light else (255, 255, 255, 255)
        if style == "shadow":
            shade = (255, 255, 255, 200) if light else (0, 0, 0, 200)
            d.text((px // 2 - box[0] + 2, px // 2 - box[1] + 2), text, font=font, fill=shade)
    d.text((px // 2 - box[0], px // 2 - box[1]), text, font=font, fill=ink)
    layer = layer.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    at = (min(x, max(0, image.width - layer.width)), min(y, max(0, image.height - layer.height)))
    image.paste(layer, at, layer)
    return image


def unique_phrases(rows: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (image, phrase): a 2-4 character word from a photo's own caption, no phrase inside another."""
    import jieba

    jieba.setLogLevel(60)
    seen_images, chosen = set(), []
    order = list(range(len(rows)))
    rng.shuffle(order)
    for i in order:
        image, text = rows[i]
        if image in seen_images:
            continue
        words = [w for w in jieba.lcut(text) if 2 <= len(w) <= 4 and all("\u4e00" <= c <= "\u9fff" for c in w)]
        words = [w for w in words if not any(w in p or p in w for _, p in chosen)]
        if words:
            chosen.append((image, rng.choice(words)))
            seen_images.add(image)
        if len(chosen) == n:
            break
    return chosen


SCREEN = """<!doctype html><html lang="zh-CN"><meta charset="utf-8"><style>
body {{ margin: 0; font: {size}px/1.5 "{font}", sans-serif; background: {bg}; color: #222; }}
header {{ background: #ededed; padding: 12px 16px; font-weight: 600; text-align: center; }}
.b {{ margin: 10px 14px; padding: 8px 12px; border-radius: 6px; max-width: 70%; background: #fff; }}
.me {{ margin-left: auto; background: #95ec69; }} .row {{ display: flex; }}
</style><header>{title}</header>{rows}</html>"""


def screenshot(html: str, out: Path, chromium: str, width: int = 390, height: int = 844, scale: int = 3) -> None:
    page = out.with_suffix(".html")
    page.write_text(html, "utf-8")
    subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--force-device-scale-factor={scale}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    page.unlink()


def chat_page(target: str, filler: list[str], font: str, size: int, rng: random.Random) -> str:
    lines = filler[:]
    lines.insert(rng.randrange(len(lines) + 1), target)
    rows = "".join(
        f'<div class="row"><div class="b{" me" if rng.random() < 0.4 else ""}">{line}</div></div>' for line in lines
    )
    return SCREEN.format(
        size=size, font=font, bg="#f5f5f5", title=rng.choice(["家人群", "快递通知", "项目组"]), rows=rows
    )


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium: apt-get install chromium")


# -- speed ----------------------------------------------------------------------------------------------


def per_photo(reader: WordReader, paths: list[Path]) -> tuple[float, float, int]:
    """(median s of the first read, median s of a second read, pictures with words), one file at a
    time. The first read is what a new library costs; the second shows what an engine that
    prepares kernels per input shape (OpenVINO) spends on shapes it has not seen."""
    first, again, with_words = [], [], 0
    for times in (first, again):
        with_words = 0
        for p in paths:
            t = time.perf_counter()
            with_words += bool(reader.read_file(p))
            times.append(time.perf_counter() - t)
    return float(np.median(first)), float(np.median(again)), with_words


def bench_speed(args, work: Path) -> None:
    rng = np.random.default_rng(1)
    rows = captions()
    fonts = cjk_fonts()
    library, plain, worded, shots = (work / name for name in ("library", "plain", "worded", "screens"))
    for folder in (library, plain, worded, shots):
        folder.mkdir(parents=True)

    def photo(i: int) -> Image.Image:
        return background(rows[i * 5][0], (4000, 3000), rng)  # one Flickr photo per five captions

    def sign(image: Image.Image, i: int) -> Image.Image:  # a sign or a label: two lines, 90-160 px high
        for j in range(2):
            text = rows[i * 5 + j + 1][1][:10]
            draw_words(image, text, fonts[i % len(fonts)], int(rng.integers(90, 160)), 0, "plate", rng)
        return image

    n = args.photos
    for i in range(n):
        photo(i).save(plain / f"{i}.jpg", quality=90)
        sign(photo(n + i), n + i).save(worded / f"{i}.jpg", quality=90)
        photo(2 * n + i).save(library / f"{i}.jpg", quality=90)
    warm_photo = work / "warm.jpg"
    sign(photo(3 * n), 3 * n).save(warm_photo, quality=90)
    chromium = chromium_path()
    r = random.Random(2)
    for i in range(args.screens + 1):
        filler = [rows[r.randrange(len(rows))][1] for _ in range(12)]
        out = work / "warm.png" if i == args.screens else shots / f"{i}.png"
        screenshot(chat_page("请凭取件码领取", filler, "WenQuanYi Zen Hei", 16, r), out, chromium)

    # Warm: the models load, and the detector meets both picture shapes below once; no picture
    # measured has been read yet.
    reader = WordReader(max_side=args.read_side)
    reader.read_file(warm_photo)
    reader.read_file(work / "warm.png")
    from cnclip.model.runtime import Runtime

    torch_model = cnclip.create_model("ViT-B-16")
    chosen = Runtime.resolve(precision=args.embed_precision)
    with cnclip.Index.open(work / "idx", model=torch_model, runtime=chosen, create=True) as index:
        index.add_folder(worded, workers=2)  # warm: the export and the sessions
        t = time.perf_counter()
        index.add_folder(library, workers=2)
        embed_s = (time.perf_counter() - t) / n
        engine = index.encoder.runtime.describe() if index.encoder.runtime else "PyTorch fp32"
        t = time.perf_counter()
        summary = index.read_words(library, reader=reader)
        read_s = (time.perf_counter() - t) / max(1, summary.read)
    table = [
        ("12 MP photo, no words (4000×3000 JPEG)", n, per_photo(reader, sorted(plain.iterdir()))),
        ("12 MP photo with two lines of words", n, per_photo(reader, sorted(worded.iterdir()))),
        ("phone screenshot, chat (1170×2532 PNG)", args.screens, per_photo(reader, sorted(shots.iterdir()))),
    ]
    print(
        f"\n### Reading speed ({dt.date.today()}, {machine()}; reader {READER} in {reader.engine}, "
        f"read at ≤{reader.max_side} px)\n"
    )
    print("| picture | first read, median s | read again, median s | found words in |")
    print("|---|---:|---:|---:|")
    for name, count, (first, again, found) in table:
        print(f"| {name} | {first:.3f} | {again:.3f} | {found}/{count} |")
    print(
        f"\nEmbedding {n} other 12 MP JPEGs without words end to end (`Index.add_folder`, ViT-B-16, runtime: "
        f"{engine}): {embed_s:.3f} s/photo ({1 / embed_s:.2f} photos/s). The reading stage over them, the first "
        f"time they are read (`Index.read_words`, decode included): {read_s:.3f} s/photo, "
        f"{read_s / embed_s:.2f}x the embedding time."
    )


# -- recall ---------------------------------------------------------------------------------------------


def bench_recall(args, work: Path) -> None:
    rows = captions()
    by_image: dict[str, list[str]] = {}
    for image, text in rows:
        by_image.setdefault(image, []).append(text)
    r = random.Random(3)
    rng = np.random.default_rng(3)
    fonts = cjk_fonts()
    targets = unique_phrases(rows, args.drawn + args.screens, r)
    photos = work / "set"
    (photos / "drawn").mkdir(parents=True)
    (photos / "screens").mkdir()
    cases = []  # (query, file, kind, size)
    for i, (image, phrase) in enumerate(targets[: args.drawn]):
        px, angle = SIZES[i % len(SIZES)], ANGLES[i % len(ANGLES)]
        style = ("plate", "shadow", "plain")[i % 3]
        picture = background(image, (800, 600), rng)
        draw_words(picture, phrase, fonts[i % len(fonts)], px, angle, style, rng)
        out = photos / "drawn" / f"{i:04d}.jpg"
        picture.save(out, quality=90)
        cases.append((phrase, out, f"drawn, {style}", px))
    chromium = chromium_path()
    families = ["WenQuanYi Zen Hei", "AR PL UKai CN", "AR PL UMing CN"]
    phrases = [p for _, p in targets]
    clean = [text for _, text in rows if not any(p in text for p in phrases)]  # filler holds no query's words
    for i, (_, phrase) in enumerate(targets[args.drawn :]):
        filler = [clean[r.randrange(len(clean))] for _ in range(10)]
        size = (13, 15, 17)[i % 3]
        out = photos / "screens" / f"{i:04d}.png"
        screenshot(chat_page(phrase, filler, families[i % len(families)], size, r), out, chromium)
        cases.append((phrase, out, "screenshot", size * 3))
    for i, (image, _) in enumerate(rows[::5][: args.distractors]):  # photos without words, as a library has
        background(image, (800, 600), rng).save(photos / "drawn" / f"plain{i:04d}.jpg", quality=90)

    import torch

    torch.manual_seed(0)
    with cnclip.Index.open(work / "idx", model=cnclip.create_model("tiny-vit"), create=True) as index:
        index.add_folder(photos, workers=2)
        t = time.perf_counter()
        summary = index.read_words()
        took = time.perf_counter() - t
        results = {mode: [] for mode in ("only", "auto", "off")}
        for query, path, kind, px in cases:
            for mode in results:
                hits = [h.path for h in index.search_text(query, k=5, words=mode)]
                rank = hits.index(str(path)) + 1 if str(path) in hits else None
                results[mode].append((kind, px, rank))
    print(f"\n### Recall of word queries ({dt.date.today()}, {machine()}; reader {READER} in {default_engine()})\n")
    print(
        f"{len(cases)} queries, each a 2-4 character word drawn on one picture; {summary.read} pictures read in "
        f"{took:.0f} s ({summary.with_words} with words). Fonts: {', '.join(Path(f).name for f in fonts)}.\n"
    )
    groups = [
        ("drawn, 16-20 px", lambda c: c[0].startswith("drawn") and c[1] < 24),
        ("drawn, ≥ 24 px", lambda c: c[0].startswith("drawn") and c[1] >= 24),
        ("screenshots (39-51 px)", lambda c: c[0] == "screenshot"),
    ]
    print("| set | queries | words only @1 | @5 | words + picture @1 | @5 | picture only @1 | @5 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, keep in groups:
        cells = []
        for mode in ("only", "auto", "off"):
            ranks = [rank for kind, px, rank in results[mode] if keep((kind, px))]
            cells += [sum(1 for x in ranks if x == 1) / len(ranks), sum(1 for x in ranks if x) / len(ranks)]
        n = sum(1 for kind, px, _ in results["only"] if keep((kind, px)))
        print(f"| {name} | {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    misses = [
        (q, p.name, kind, px) for (q, p, kind, px), (_, _, rank) in zip(cases, results["only"], strict=True) if not rank
    ]
    print(f"\nMissed by words ({len(misses)}): " + ", ".join(f"{q} ({k}, {px} px)" for q, _, k, px in misses[:30]))


# -- full-text latency ----------------------------------------------------------------------------------


def bench_fts(args, work: Path) -> None:
    rows = [text for _, text in captions()]
    r = random.Random(4)
    folder = work / "fts"
    catalog = Catalog.open(folder, create=True)
    conn = sqlite3.connect(catalog.path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    blob = np.zeros(4, np.float32).tobytes()
    t = time.perf_counter()
    batch = 50_000
    for start in range(0, args.n, batch):
        ids = range(start + 1, min(args.n, start + batch) + 1)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO vectors (id, hash, vector) VALUES (?, ?, ?)", ((i, f"h{i}", blob) for i in ids))
        conn.executemany(
            "INSERT INTO files (id, path, size, mtime_ns, hash, vector_id, seen_scan) VALUES (?, ?, 1, 1, ?, ?, 1)",
            ((i, f"/photos/{i // 1000}/{i}.jpg", f"h{i}", i) for i in ids),
        )
        texts = {i: "\n".join(r.choice(rows) for _ in range(r.randint(1, 3))) for i in ids if r.random() < args.share}
        conn.executemany(
            "INSERT INTO words (vector_id, reader, lines, error, read_at) VALUES (?, 'bench', ?, NULL, 0)",
            ((i, json.dumps([{"text": x, "score": 1, "box": []} for x in texts[i].splitlines()])) for i in texts),
        )
        conn.executemany(
            "INSERT INTO words_fts (rowid, tokens) VALUES (?, ?)", ((i, tokens(x)) for i, x in texts.items())
        )
        conn.execute("COMMIT")
    fill_s = time.perf_counter() - t
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size_mb = os.path.getsize(catalog.path) / 1e6
    fts_pages = (
        conn.execute("SELECT count(*) FROM dbstat WHERE name LIKE 'words_fts%'").fetchone()[0]
        if _has_dbstat(conn)
        else None
    )
    conn.close()

    queries = []
    for length, count in ((1, 10), (2, 40), (3, 20), (4, 15), (6, 10)):
        for _ in range(count):
            text = r.choice(rows).rstrip("。，")
            if len(text) >= length:
                s = r.randrange(len(text) - length + 1)
                queries.append(text[s : s + length])
    queries += ["取件码", "增值税发票", "会议纪要", "Wi-Fi 密码", "不存在的词语"]
    times, counts = [], []
    for q in queries:
        wanted = WordQuery.parse(q)
        if wanted is None:
            continue
        catalog.word_file_ids(wanted.fts)  # warm the pages this query reads
        t = time.perf_counter()
        found = catalog.word_file_ids(wanted.fts)
        times.append((time.perf_counter() - t) * 1000)
        counts.append(len(found))
    catalog.close()
    times_a, counts_a = np.array(times), np.array(counts)
    print(f"\n### Full-text query latency at {args.n:,} files ({dt.date.today()}, {machine()})\n")
    print(
        f"{args.share:.0%} of the files with words (1-3 Flickr8k-CN captions each, {len(times) - 5} queries of "
        f"1-6 characters from those texts plus 5 of our own); filled in {fill_s:.0f} s; catalog {size_mb:,.0f} MB"
        + (f" ({fts_pages * 32768 / 1e6:,.0f} MB of it the full-text index)" if fts_pages else "")
        + ". Latency of `Catalog.word_file_ids` (the words half of a search: the ids of every matching file), warm:\n"
    )
    print("| query length | queries | p50 ms | p99 ms | matches p50 | matches max |")
    print("|---|---:|---:|---:|---:|---:|")
    lengths = np.array([len(q.replace(" ", "")) for q in queries if WordQuery.parse(q) is not None])
    for name, keep in (
        ("1 character", lengths == 1),
        ("2 characters", lengths == 2),
        ("3+ characters", lengths >= 3),
        ("all", lengths > 0),
    ):
        t, c = times_a[keep], counts_a[keep]
        print(
            f"| {name} | {keep.sum()} | {np.percentile(t, 50):.1f} | {np.percentile(t, 99):.1f} | "
            f"{int(np.median(c)):,} | {int(c.max()):,} |"
        )


def _has_dbstat(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1 FROM dbstat LIMIT 1")
        return True
    except sqlite3.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", action="store_true", help="reading speed per picture, next to embedding")
    ap.add_argument("--recall", action="store_true", help="recall@1/@5 of word queries")
    ap.add_argument("--fts", action="store_true", help="full-text query latency")
    ap.add_argument("--photos", type=int, default=12, help="12 MP photos per kind for --speed")
    ap.add_argument("--screens", type=int, default=12, help="screenshots for --speed and --recall")
    ap.add_argument("--drawn", type=int, default=200, help="photos with drawn words for --recall")
    ap.add_argument("--distractors", type=int, default=200, help="photos without words for --recall")
    ap.add_argument("--embed-precision", help="the embedding to compare with (default: what auto picks here)")
    ap.add_argument("--engine", choices=ENGINES, help="the engine that runs the reader (default: what it picks here)")
    ap.add_argument("--read-side", type=int, default=DEFAULT_READ_SIDE, help="long side pictures are read at")
    ap.add_argument("--n", type=int, default=100_000, help="files for --fts")
    ap.add_argument("--keep", metavar="DIR", help="make the pictures and indexes here and keep them")
    ap.add_argument("--share", type=float, default=0.3, help="share of files with words for --fts")
    args = ap.parse_args(argv)
    if not (args.speed or args.recall or args.fts):
        ap.error("choose --speed, --recall and/or --fts")
    if args.engine:
        os.environ[ENGINE_ENV] = args.engine  # the reading stage's shared reader takes it too
    os.environ.setdefault("CNCLIP_CACHE", str(Path(tempfile.gettempdir()) / "cnclip-bench-cache"))
    with tempfile.TemporaryDirectory(prefix="cnclip-ocr-bench-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        if args.speed:
            bench_speed(args, work / "speed")
        if args.recall:
            bench_recall(args, work / "recall")
        if args.fts:
            bench_fts(args, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
