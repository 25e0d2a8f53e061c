"""Near-duplicate photos (`cnclip dupes`): precision and recall of the pairs found, and the time to group.

Quality. Originals are Flickr8k-CN validation photos (read from ../shared, never copied into the
project); each gets four near-copies made here: resized to half its size, re-encoded at JPEG
quality 60, a 5 % crop (2.5 % off each edge) and a 3 degree rotation (straightened: its corners
cropped off). The other validation photos are the unrelated ones; they show the same kinds of
scenes (dogs, children, water, streets), so many are look-alikes rather than random pictures. All
go into a real index (`cnclip.Index.add_folder`) embedded by `--model`. A pair is a true copy
when both files come from the same original. Reported per threshold: precision and recall of the
pairs at or above it, of the pairs put in one group (union-find also links through a third
photo), and the recall of each kind of copy (original <-> copy pairs); and, whatever the
threshold, how well the cosine orders all pairs (average precision, best F1).

The model: the official weights cannot be downloaded here, so the default is the small shape
(ViT 96 px, 4 layers, width 256) trained from scratch on Flickr8k-CN by train_flickr8k_cn.py
(`/tmp/f8k/small/run/best`), when it exists; otherwise a random tiny model, whose precision and
recall mean nothing. `--baseline` adds the same shape's random initial weights (`/tmp/f8k/small/init`).

Speed. `group_vectors` (exact range search in blocks, then union-find) over `--n` synthetic
clustered 512-d unit vectors (scripts/bench/ann.py's mixture), 2 % of them with 1-3 planted
near-copies (cosine ~0.97-0.99), at `--speed-threshold`.

    nice .venv/bin/python scripts/bench/dupes.py --baseline      # both parts, ~10 minutes on 2 busy cores
    nice .venv/bin/python scripts/bench/dupes.py --skip-quality    # the speed part only, ~2 minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import Mixture, machine  # noqa: E402

import cnclip  # noqa: E402
from cnclip.errors import CNClipError  # noqa: E402
from cnclip.index.dupes import group_vectors, similar_pairs  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-cn"
TRAINED = Path("/tmp/f8k/small/run/best")
INITIAL = Path("/tmp/f8k/small/init")
KINDS = ("resized", "q60", "crop5", "rot3")
THRESHOLDS = (0.90, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)


# -- the photo set ------------------------------------------------------------------------------


def _copy(image: Image.Image, kind: str) -> tuple[Image.Image, int]:
    """A near-copy of `image` and the JPEG quality to save it at."""
    w, h = image.size
    if kind == "resized":
        return image.resize((w // 2, h // 2), Image.Resampling.BICUBIC), 90
    if kind == "q60":
        return image, 60
    if kind == "crop5":
        return image.crop((round(w * 0.025), round(h * 0.025), round(w * 0.975), round(h * 0.975))), 90
    if kind == "rot3":
        turned = image.rotate(3, Image.Resampling.BICUBIC)
        return turned.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95))), 90
    raise ValueError(kind)


def make_photos(folder: Path, originals: int, others: int) -> dict[str, tuple[str, str]]:
    """Write the set into `folder`; returns file path -> (family, kind); unrelated photos are their own family."""
    names = sorted({json.loads(line)["image"] for line in (DATA / "val.jsonl").read_text("utf-8").splitlines()})
    if len(names) < originals + others:
        raise SystemExit(f"{DATA / 'val.jsonl'} names {len(names)} photos; ask for fewer")
    truth: dict[str, tuple[str, str]] = {}
    for i, name in enumerate(names[: originals + others]):
        with Image.open(DATA / name) as opened:
            image = opened.convert("RGB")
        stem = Path(name).stem
        path = folder / f"{stem}.jpg"
        path.write_bytes((DATA / name).read_bytes())  # the original file itself, as it came
        truth[str(path)] = (stem, "original")
        if i >= originals:
            continue
        for kind in KINDS:
            copy, quality = _copy(image, kind)
            path = folder / f"{stem}-{kind}.jpg"
            copy.save(path, quality=quality)
            truth[str(path)] = (stem, kind)
    return truth


def embed_set(folder: Path, index_dir: Path, model: str) -> tuple[list[str], np.ndarray, float]:
    """Index `folder` with `model`; (paths, vectors in the same order, images per second)."""
    started = time.perf_counter()
    with cnclip.Index.open(index_dir, model=model, create=True) as index:
        index.add_folder(folder)
        ids, vectors = zip(*index.catalog.file_vectors(), strict=True)
        ids, vectors = np.concatenate(ids), np.concatenate(vectors)
        records = index.catalog.files_by_ids(ids.tolist())
    rate = len(ids) / (time.perf_counter() - started)
    return [records[i].path for i in ids.tolist()], vectors, rate


# -- scoring ------------------------------------------------------------------------------------


def evaluate(paths: list[str], vectors: np.ndarray, truth: dict[str, tuple[str, str]]) -> list[dict]:
    family = np.array([truth[p][0] for p in paths])
    kind = np.array([truth[p][1] for p in paths])
    sizes = Counter(family.tolist())
    true_pairs = sum(c * (c - 1) // 2 for c in sizes.values())
    per_kind_total = Counter(kind[kind != "original"].tolist())
    rows = []
    for t in THRESHOLDS:
        found = list(similar_pairs(vectors, t))
        i = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
        j = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
        hit = family[i] == family[j]
        with_original = hit & ((kind[i] == "original") | (kind[j] == "original"))
        copy_kind = np.where(kind[i] == "original", kind[j], kind[i])[with_original]
        try:
            groups, _ = group_vectors(np.arange(len(paths)), vectors, t)
        except CNClipError:  # past the pair cap: `cnclip dupes` refuses such a threshold
            groups = None
        grouped = sum(len(g) * (len(g) - 1) // 2 for g in groups or ())
        grouped_true = sum(c * (c - 1) // 2 for g in groups or () for c in Counter(family[g].tolist()).values())
        rows.append(
            {
                "threshold": t,
                "pairs": int(i.size),
                "precision": float(hit.mean()) if i.size else float("nan"),
                "recall": float(hit.sum()) / true_pairs,
                "group_precision": grouped_true / grouped if grouped else float("nan"),
                "group_recall": grouped_true / true_pairs if groups is not None else float("nan"),
                "groups": len(groups) if groups is not None else "refused: over the pair cap",
                "largest": max((len(g) for g in groups), default=0) if groups is not None else "",
                **{f"recall_{k}": Counter(copy_kind.tolist())[k] / per_kind_total[k] for k in KINDS},
            }
        )
    return rows


def ranking(paths: list[str], vectors: np.ndarray, truth: dict[str, tuple[str, str]]) -> str:
    """How well the cosine orders all pairs, whatever the threshold: average precision, and the best F1."""
    family = np.array([truth[p][0] for p in paths])
    i, j = np.triu_indices(len(paths), 1)
    sims = np.einsum("ij,ij->i", vectors[i], vectors[j]) if len(i) < 5_000_000 else None
    if sims is None:
        return "pair ranking: skipped (too many pairs to rank them all)"
    order = np.argsort(-sims, kind="stable")
    hits = (family[i] == family[j])[order]
    found = np.cumsum(hits)
    precision = found / np.arange(1, len(hits) + 1)
    recall = found / hits.sum()
    ap = float(precision[hits].mean())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return (
        f"Pair ranking over all {len(hits):,} pairs: average precision {ap:.3f}; best F1 {f1[best]:.3f} at threshold "
        f"{sims[order][best]:.4f} (precision {precision[best]:.3f}, recall {recall[best]:.3f})."
    )


def quality_table(name: str, rows: list[dict], files: int, rate: float, ranked: str) -> str:
    out = [
        f"#### {name}: {files} files, embedded and indexed at {rate:.1f} images/s",
        "",
        ranked,
        "",
        "| threshold | pairs found | precision | recall | grouped: precision | recall | groups | largest | "
        + " | ".join(f"recall {k}" for k in KINDS)
        + " |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(KINDS),
    ]
    for r in rows:
        cells = [
            f"{r['threshold']:g}",
            f"{r['pairs']:,}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['group_precision']:.3f}",
            f"{r['group_recall']:.3f}",
            str(r["groups"]),
            str(r["largest"]),
            *(f"{r[f'recall_{k}']:.3f}" for k in KINDS),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _best_eval(metrics: Path) -> str:
    """Which evaluation the run's best/ checkpoint comes from, as the run logged it."""
    if not metrics.is_file():
        return ""
    evals = [row for row in map(json.loads, metrics.read_text().splitlines()) if row.get("kind") == "eval"]
    if not evals:
        return ""
    best = max(evals, key=lambda row: row["MR"])
    return (
        f", best evaluation at step {best['step']} (epoch {best['epoch']}): Flickr8k-CN val mean recall "
        f"{100 * best['MR']:.1f} %, text->image R@1 {100 * best['t2i']['R@1']:.1f} %"
    )


def _same_weights(a: Path, b: Path) -> bool:
    weights = "model.safetensors"
    return (b / weights).is_file() and (a / weights).read_bytes() == (b / weights).read_bytes()


def run_quality(args: argparse.Namespace) -> list[str]:
    models: list[tuple[str, str]] = []
    if args.model:
        models.append((f"model {args.model}", args.model))
    elif TRAINED.exists():
        name = "small shape trained from scratch on Flickr8k-CN (/tmp/f8k/small/run/best)"
        if _same_weights(TRAINED, INITIAL):
            name += ", STILL ITS RANDOM INITIAL WEIGHTS (no better model saved yet): the figures mean nothing"
        else:
            name += _best_eval(TRAINED.parent / "metrics.jsonl")
        models.append((name, str(TRAINED)))
    else:
        models.append(("tiny-vit with RANDOM weights: precision and recall mean nothing", "tiny-vit"))
    if args.baseline and INITIAL.exists():
        models.append(("the same small shape, random initial weights (/tmp/f8k/small/init)", str(INITIAL)))
    sections = []
    with tempfile.TemporaryDirectory(prefix="cnclip-dupes-bench-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        truth = make_photos(folder, args.originals, args.others)
        print(f"wrote {len(truth)} photos to {folder}", file=sys.stderr)
        for n, (name, source) in enumerate(models):
            model = source if source != "tiny-vit" else cnclip.create_model("tiny-vit")
            paths, vectors, rate = embed_set(folder, Path(tmp) / f"idx{n}", model)
            rows = evaluate(paths, vectors, truth)
            sections.append(quality_table(name, rows, len(paths), rate, ranking(paths, vectors, truth)))
            print(sections[-1], file=sys.stderr)
    return sections


# -- speed --------------------------------------------------------------------------------------


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """n unit vectors: clustered photos, 2 % of them with 1-3 near-copies (cosine ~0.97-0.99)."""
    rng = np.random.default_rng(seed)
    originals = max(1, int(n * 0.02))
    copies = rng.integers(1, 4, originals)
    while copies.sum() > n // 10:  # keep the copies a small part of a tiny set
        copies = np.maximum(copies - 1, 0)
    base = Mixture(dim, 5000, 64, 0.5, 0.05, seed).sample(n - int(copies.sum()), stream=0)
    source = np.repeat(np.arange(originals), copies)
    noise = rng.standard_normal((source.size, dim)).astype(np.float32)
    noise *= rng.uniform(0.1, 0.25, (source.size, 1)).astype(np.float32) / np.linalg.norm(noise, axis=1, keepdims=True)
    near = base[source] + noise
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    out = np.concatenate([base, near])
    return out[rng.permutation(len(out))]


def run_speed(args: argparse.Namespace) -> str:
    vectors = synthetic(args.n, args.dim, args.seed)
    rss_before = _rss_kib()
    peak_kib = [rss_before]
    stop = threading.Event()

    def sample() -> None:  # ru_maxrss would also count the data generation before
        while not stop.wait(0.02):
            peak_kib[0] = max(peak_kib[0], _rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    cpu = time.process_time()
    groups, pairs = group_vectors(np.arange(len(vectors)), vectors, args.speed_threshold)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    stop.set()
    sampler.join()
    peak = (peak_kib[0] - rss_before) / 2**10
    return (
        "| vectors | dim | threshold | wall time | CPU time | pairs | groups | largest "
        "| peak memory beyond the vectors | load average before |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {len(vectors):,} | {args.dim} | {args.speed_threshold} | {seconds:.1f} s | {cpu:.1f} s | {pairs:,} | "
        f"{len(groups):,} | {max((len(g) for g in groups), default=0)} | {peak:.0f} MiB | {load:.1f} |"
    )


def _rss_kib() -> int:
    """The process's resident memory now, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("the speed part reads /proc/self/status: Linux only")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="model for the quality part (default: the Flickr8k-CN small model, see above)")
    ap.add_argument("--baseline", action="store_true", help="also the small shape's random initial weights")
    ap.add_argument("--originals", type=int, default=200, help="photos that get four near-copies each")
    ap.add_argument("--others", type=int, default=800, help="unrelated photos")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--n", type=int, default=100_000, help="vectors for the speed part")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--speed-threshold", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"### `dupes.py` — {dt.date.today().isoformat()}\n\nMachine: {machine()}\n")
    if not args.skip_quality:
        if not DATA.is_dir():
            raise SystemExit(f"{DATA} not found: the quality part needs the Flickr8k-CN photos")
        print("\n\n".join(run_quality(args)) + "\n")
    if not args.skip_speed:
        print(run_speed(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
