"""Benchmark filtered search (`--after`, `--in`, `--camera`, ...) at photo-library scale.

Builds a catalog of `--n` files with clustered synthetic vectors (see ann.py), spread over 20
folders, ten years of dates and three cameras, opens it as `cnclip search` and `cnclip serve`
do (the vector index kind "auto" picks for that size), and prints a Markdown table: for each
filter, how many files it selects, which strategy answers it (a direct scan of the selected
rows' vectors, the vector index over-fetched, or faiss skipping unselected ids), the first
query's latency (which reads the selection from the catalog) and then p50/p95 over the other
queries with the same filter (the selection cached), the unfiltered search first as
reference. Each row is checked against brute force over the selected rows (recall@10).

    nice .venv/bin/python scripts/bench/filters.py --n 1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
from ann import Mixture  # this folder's data generator (clustered vectors, uneven clusters)

from cnclip.index.catalog import Catalog, ModelIdentity, NewFile
from cnclip.index.index import Index
from cnclip.index.metadata import PhotoInfo
from cnclip.index.vectors import FILTER_SCAN_ROWS, ONDISK_KIND

FOLDERS = 20
CAMERAS = ("Apple iPhone 13", "HUAWEI P40", "SONY ILCE-7M3")
FILTERS = {  # name -> Index.filter options
    "none": {},
    "one folder, one month": {"folders": ["/photos/f3"], "after": "2020-03", "before": "2020-04"},
    "one folder": {"folders": ["/photos/f7"]},
    "one year": {"after": "2019", "before": "2020"},
    "a camera (1/3)": {"camera": "huawei"},
    "after 2016 (~80 %)": {"after": "2016"},
    "large files (~0.5 %)": {"min_size": "3.8M"},
}


def build(folder: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The catalog under `folder`; returns (ids, vectors, facts) for the brute-force check."""
    mix = Mixture(dim=dim, clusters=max(16, n // 2000), subspace=32, cluster_std=0.35, noise=0.15, seed=1)
    vectors = mix.sample(n, stream=0)
    rng = np.random.default_rng(2)
    days = rng.integers(0, 3650, n)  # 2015-2024
    sizes = rng.integers(1_000_000, 4_000_000, n)
    cameras = rng.integers(0, len(CAMERAS), n)
    ids = np.empty(n, np.int64)
    with Catalog.open(folder, create=True) as catalog:
        catalog.bind_model(
            ModelIdentity(name=None, source="synthetic", digest="ab" * 32, dim=dim, image_size=224, preprocessing="x")
        )
        scan = catalog.begin_scan()
        for start in range(0, n, 50_000):
            stop = min(n, start + 50_000)
            rows = [
                NewFile(f"/photos/f{i % FOLDERS}/p{i}.jpg", int(sizes[i]), 1, f"h{i}", vector=vectors[i])
                for i in range(start, stop)
            ]
            catalog.put_files(scan, rows)
            infos = []
            for i in range(start, stop):
                ids[i] = catalog.file_id_for_path(rows[i - start].path)
                taken = np.datetime64("2015-01-01") + np.timedelta64(int(days[i]), "D")
                infos.append((int(ids[i]), PhotoInfo(f"{taken}T12:00:00", "exif", CAMERAS[cameras[i]], 4000, 3000)))
            catalog.set_info(infos)
    dates = np.datetime64("2015-01-01") + days.astype("timedelta64[D]")
    return ids, vectors, {"days": dates, "sizes": sizes, "cameras": cameras}


def mask_for(where, n: int, facts: dict) -> np.ndarray:
    mask = np.ones(n, bool)
    if where.folders:
        folder = int(where.folders[0].rsplit("f", 1)[1])
        mask &= np.arange(n) % FOLDERS == folder
    if where.after:
        mask &= facts["days"] >= np.datetime64(where.after[:10])
    if where.before:
        mask &= facts["days"] < np.datetime64(where.before[:10])
    if where.camera:
        mask &= np.array([where.camera.lower() in c.lower() for c in CAMERAS])[facts["cameras"]]
    if where.min_size is not None:
        mask &= facts["sizes"] >= where.min_size
    return mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cnclip-filters-") as tmp:
        started = time.perf_counter()
        ids, vectors, facts = build(os.path.join(tmp, "idx"), args.n, args.dim)
        print(f"catalog of {args.n:,} files built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        index = Index.open(os.path.join(tmp, "idx"))
        started = time.perf_counter()
        index.refresh()
        print(f"vector index ({index.vector_kind}) ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rng = np.random.default_rng(3)
        queries = vectors[rng.integers(0, args.n, args.queries)] + 0.05 * rng.standard_normal((args.queries, args.dim))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)

        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.n:,} x {args.dim}-d")
        print("\n| filter | files selected | strategy | first query ms | then p50 ms | p95 ms | recall@10 |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for name, options in FILTERS.items():
            where = index.filter(**options)
            mask = mask_for(where, args.n, facts)
            selected = int(mask.sum())
            if where.empty:
                strategy = "none"
            elif index.refresh().kind != ONDISK_KIND:
                strategy = "faiss selector"
            else:
                strategy = "scan" if selected <= FILTER_SCAN_ROWS else "over-fetch"
            times, recalls = [], []
            for q in queries:
                t0 = time.perf_counter()
                hits = index._image_hits(q[None, :], 10, where)
                times.append((time.perf_counter() - t0) * 1000)
                truth = ids[mask][np.argsort(-(vectors[mask] @ q), kind="stable")[:10]]
                recalls.append(len(set(truth.tolist()) & {h.id for h in hits}) / max(1, min(10, selected)))
            p50, p95 = np.percentile(times[1:], [50, 95])
            print(f"| {name} | {selected:,} | {strategy} | {times[0]:.1f} | {p50:.1f} | {p95:.1f} ", end="")
            print(f"| {np.mean(recalls):.3f} |")
        index.close()


if __name__ == "__main__":
    main()
