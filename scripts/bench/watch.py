"""`--watch` latency: from a photo written to its row committed, by the size of the folder it lands in.

A library of N files in one watched root plus a subfolder of 100, indexed once; then a `Watcher`
(as `cnclip index DIR --watch` runs it) and new photos written one at a time, each timed until
its catalog row is committed (a server's searches see it from then on). A photo added to the root
makes its batch rescan the whole root (walk, one catalog lookup per file, every file marked
seen); one added to the subfolder rescans only the subfolder. Times include the 1 s settle wait
of a batch. The library's files share one content (a tiny PNG), so building it embeds one image;
the new photos are distinct and each is embedded by a tiny random model: embedding is not what
is measured here (see embed.py for that).

    nice .venv/bin/python scripts/bench/watch.py --sizes 1000,10000,50000 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ann import machine  # noqa: E402
from PIL import Image  # noqa: E402

import cnclip  # noqa: E402
from cnclip.index.index import Index  # noqa: E402
from cnclip.index.watch import WatchBatch, Watcher  # noqa: E402

SUBFOLDER_FILES = 100


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _library(root: Path, n: int) -> None:
    same = _png(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:06d}.png").write_bytes(same)
    for i in range(SUBFOLDER_FILES):
        (root / "sub" / f"s{i:03d}.png").write_bytes(same)


def _time_one(watcher_batches: list[WatchBatch], reader: Index, path: Path, seed: int, timeout: float) -> tuple:
    """(seconds from the write to the committed row, files the batch found unchanged)."""
    before = len(watcher_batches)
    start = time.monotonic()
    path.write_bytes(_png(seed))
    while reader.catalog.lookup(str(path)) is None:
        if time.monotonic() - start > timeout:
            raise SystemExit(f"{path} not committed within {timeout} s")
        time.sleep(0.005)
    took = time.monotonic() - start
    while len(watcher_batches) == before:  # the report follows the commit
        time.sleep(0.005)
    return took, sum(b.summary.unchanged for b in watcher_batches[before:])


def _measure(n: int, repeats: int, model, poll: float | None) -> list[tuple[str, int, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="cnclip-watch-bench-") as tmp:
        root, idx = Path(tmp) / "photos", Path(tmp) / "idx"
        _library(root, n)
        t = time.monotonic()
        with Index.open(idx, model=model, create=True) as index:
            index.add_folder(root)
        print(f"  {n:,} files: library indexed in {time.monotonic() - t:.1f} s", file=sys.stderr)
        batches: list[WatchBatch] = []
        rows = []
        with Index.open(idx) as reader, Watcher(idx, [root], model=model, poll=poll, scan_first=False,
                                                on_batch=batches.append):  # fmt: skip
            for where, folder in (("the root", root), ("a subfolder of 100", root / "sub")):
                times, rescanned = [], 0
                for r in range(repeats):
                    took, rescanned = _time_one(batches, reader, folder / f"new{r}.png", 1000 + r, 120.0)
                    times.append(took)
                rows.append((where, rescanned, times))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,50000", help="files in the watched root, comma-separated")
    ap.add_argument("--repeats", type=int, default=5, help="photos timed per place")
    ap.add_argument("--poll", type=float, help="poll every this many seconds instead of OS events")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = cnclip.create_model("tiny-vit")
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: _measure(n, args.repeats, model, args.poll) for n in sizes}
    print(f"### `watch.py` — {dt.date.today().isoformat()}\n\nMachine: {machine()}.")
    how = f"polling every {args.poll} s" if args.poll else "OS events"
    print(f"Watching with {how}; {args.repeats} photos per row, one at a time.\n")
    print("| files in the root | photo added to | files rescanned | write → committed, median (min–max) |")
    print("|---:|---|---:|---|")
    for n, rows in results.items():
        for where, rescanned, times in rows:
            print(
                f"| {n:,} | {where} | {rescanned:,} | {statistics.median(times):.2f} s "
                f"({min(times):.2f}–{max(times):.2f}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
