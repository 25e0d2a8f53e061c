"""Benchmark exact vs approximate vector search on clustered synthetic CLIP-like vectors.

Generates a seeded mixture of Gaussians in a low-dimensional subspace embedded in `--dim`
dimensions (uniform random vectors make every ANN index look broken: recall <= 0.34), builds
each requested kind, and prints a Markdown table of build time, memory, single-query latency
(one query per call, the way a user search runs), batched throughput and recall@10 against
exact search computed in the same run.

    nice .venv/bin/python scripts/bench/ann.py --n 100000
    nice .venv/bin/python scripts/bench/ann.py --n 1000000 --kinds exact,ivf-flat,ivf-sq8,ivf-pq-refine,hnsw

Kinds "exact", "ivf-flat" and "ivf-sq8" go through `cnclip.index.vectors.VectorIndex` (so the
ivf rows show the nprobe its build chose and the recall it measured for itself);
"ivf-pq-refine" and "hnsw" are built with faiss directly, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

from cnclip.index.vectors import VectorIndex
from cnclip.index.vectors.memory_build import nlist_for
from cnclip.index.vectors.threads import omp_threads as threads  # the library's own per-thread OpenMP setting

ALL_KINDS = ("exact", "ivf-flat", "ivf-sq8", "ivf-pq-refine", "hnsw")


# -- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    """A mixture of Gaussians in a `subspace`-d subspace of `dim`-d space, L2-normalised."""

    dim: int
    clusters: int
    subspace: int
    cluster_std: float
    noise: float
    seed: int

    def sample(self, n: int, stream: int, chunk: int = 100_000) -> np.ndarray:
        """n vectors; each `stream` is an independent draw from the same distribution."""
        rng = np.random.default_rng(self.seed)
        basis, _ = np.linalg.qr(rng.standard_normal((self.dim, self.subspace)))
        centers = rng.standard_normal((self.clusters, self.subspace))
        # Uneven cluster sizes, like a photo library (many beach photos, few of the boiler).
        weights = rng.lognormal(0.0, 1.0, self.clusters)
        weights /= weights.sum()
        r = np.random.default_rng([self.seed, stream])
        out = np.empty((n, self.dim), dtype=np.float32)
        for s in range(0, n, chunk):  # chunked so that float64 temporaries stay small
            m = min(chunk, n - s)
            c = r.choice(self.clusters, m, p=weights)
            x = (centers[c] + self.cluster_std * r.standard_normal((m, self.subspace))) @ basis.T
            x += self.noise * r.standard_normal((m, self.dim))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s : s + m] = x
        return out


# -- measuring --------------------------------------------------------------------------------


def index_mb(index: faiss.Index) -> float:
    """Serialized size of a faiss index, which is what it holds in RAM (within a few %)."""
    # Process RSS deltas were useless here: memory freed by the previous kind gets reused.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path) / 2**20


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist(), strict=True)]))


@dataclass
class Row:
    kind: str
    params: str
    build_s: float | None
    mem_mb: float | None
    p50_ms: float
    p95_ms: float
    qps: float
    recall: float
    build_recall: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def time_search(
    search: Callable[[np.ndarray, int], object], queries: np.ndarray, n_single: int, k: int = 10
) -> tuple[float, float, float]:
    """(p50 ms, p95 ms) of one query per call, and queries/s of one batched call."""
    for q in queries[:5]:  # warm caches and page in the touched parts of the index
        search(q[None, :], k)
    times = []
    for q in queries[:n_single]:
        t = time.perf_counter()
        search(q[None, :], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    search(queries, k)
    qps = len(queries) / (time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3), qps


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- kinds ------------------------------------------------------------------------------------


def bench_module_kind(kind: str, ids, base, queries, truth, args) -> list[Row]:
    """Build through VectorIndex (its own nprobe choice), then sweep nprobe on the same index."""
    gc.collect()
    t = time.perf_counter()
    index = VectorIndex.build(ids, base, kind=kind, seed=args.seed)
    build_s = time.perf_counter() - t
    mem_mb = index_mb(index._index)
    n_single = min(args.latency_queries, 50) if kind == "exact" and args.n > 200_000 else args.latency_queries
    p50, p95, qps = time_search(index.search, queries, n_single)
    _, found = index.search(queries, 10)
    rows = []
    if kind == "exact":
        rows.append(Row(kind, "IndexFlatIP", build_s, mem_mb, p50, p95, qps, recall_at(found, ids[truth])))
        return rows
    p = index.params
    chosen = p["nprobe"]
    params = f"nlist={p['nlist']} nprobe={chosen} (chosen at build)"
    rows.append(Row(kind, params, build_s, mem_mb, p50, p95, qps, recall_at(found, ids[truth]), index.recall_at_10))
    ivf = faiss.extract_index_ivf(index._index)  # the bench may reach in to sweep nprobe
    for nprobe in args.nprobe_sweep:
        if nprobe == chosen or nprobe > p["nlist"]:
            continue
        ivf.nprobe = nprobe
        p50, p95, qps = time_search(index.search, queries, args.latency_queries)
        _, found = index.search(queries, 10)
        rows.append(
            Row(kind, f"nlist={p['nlist']} nprobe={nprobe}", None, None, p50, p95, qps, recall_at(found, ids[truth]))
        )
    ivf.nprobe = chosen
    del index
    return rows


def faiss_search(index: faiss.Index, nthreads: int, params: faiss.SearchParameters | None = None):
    """index.search with VectorIndex's threading: one thread for a single query, else `nthreads`."""

    def search(q: np.ndarray, k: int):
        with threads(1 if len(q) <= 4 else nthreads):
            return index.search(q, k, params=params)

    return search


def bench_pq_refine(base, queries, truth, args) -> list[Row]:
    n, dim = base.shape
    nlist = nlist_for(n)
    m = args.pq_m
    gc.collect()
    t = time.perf_counter()
    ivfpq = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x8", faiss.METRIC_INNER_PRODUCT)
    ntrain = min(n, max(nlist * 64, 65_536))
    train_rows = np.sort(np.random.default_rng(args.seed).choice(n, ntrain, replace=False))
    faiss.extract_index_ivf(ivfpq).cp.niter = 10
    ivfpq.train(base[train_rows])
    index = faiss.IndexRefineFlat(ivfpq)
    for s in range(0, n, 65_536):
        index.add(base[s : s + 65_536])
    build_s = time.perf_counter() - t
    mem_mb = index_mb(index)
    out = []
    first = True
    for nprobe in args.nprobe_sweep:
        for k_factor in (4, 16):
            ps = faiss.IVFPQSearchParameters()
            ps.nprobe = nprobe
            rp = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=ps)
            search = faiss_search(index, args.threads, rp)
            p50, p95, qps = time_search(search, queries, args.latency_queries)
            _, found = search(queries, 10)
            label = f"IVF{nlist},PQ{m}x8 + refine; nprobe={nprobe} k_factor={k_factor}"
            out.append(
                Row(
                    "ivf-pq-refine",
                    label,
                    build_s if first else None,
                    mem_mb if first else None,
                    p50,
                    p95,
                    qps,
                    recall_at(found, truth),
                )
            )
            first = False
    del index, ivfpq
    return out


def bench_hnsw(base, queries, truth, args) -> list[Row]:
    n, dim = base.shape
    gc.collect()
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.hnsw_ef_construction
    for s in range(0, n, 100_000):
        index.add(base[s : s + 100_000])
        log(f"hnsw: added {min(n, s + 100_000)}/{n} after {time.perf_counter() - t:.0f} s")
    build_s = time.perf_counter() - t
    mem_mb = index_mb(index)
    out = []
    for i, ef in enumerate(args.ef_sweep):
        index.hnsw.efSearch = ef
        p50, p95, qps = time_search(faiss_search(index, args.threads), queries, args.latency_queries)
        _, found = index.search(queries, 10)
        label = f"M={args.hnsw_m} efC={args.hnsw_ef_construction} efSearch={ef}"
        out.append(
            Row(
                "hnsw",
                label,
                build_s if i == 0 else None,
                mem_mb if i == 0 else None,
                p50,
                p95,
                qps,
                recall_at(found, truth),
            )
        )
    del index
    return out


def exact_scaling(base, queries, sizes: list[int], n_single: int) -> list[tuple[int, float, float, float]]:
    """(n, p50 ms 1 thread, p50 ms 2 threads, p95 ms 1 thread) of exact search on prefixes."""
    out = []
    for n in sizes:
        if n > base.shape[0]:
            continue
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base[:n])
        res = []
        for th in (1, 2):
            with threads(th):
                for q in queries[:3]:
                    index.search(q[None, :], 10)
                times = []
                for q in queries[:n_single]:
                    t = time.perf_counter()
                    index.search(q[None, :], 10)
                    times.append(time.perf_counter() - t)
            res.append(times)
        out.append((n, np.median(res[0]) * 1e3, np.median(res[1]) * 1e3, np.percentile(res[0], 95) * 1e3))
        del index
    return out


# -- report -----------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    return f"{model}, {cores} cores{mem}; {platform.system()} {platform.release()}; faiss {faiss.__version__}"


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000, help="base vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batched q/s")
    ap.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--kinds", default="exact,ivf-flat,ivf-sq8", help=f"comma list of {','.join(ALL_KINDS)}")
    ap.add_argument("--clusters", type=int, default=5000)
    ap.add_argument("--subspace", type=int, default=64)
    ap.add_argument("--cluster-std", type=float, default=0.5, help="per-axis spread around a centre (centres ~N(0,1))")
    ap.add_argument("--noise", type=float, default=0.05, help="isotropic per-axis noise in the full space")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="faiss threads for builds/batches")
    ap.add_argument("--nprobe-sweep", default="8,16,32,64", help="extra nprobe values timed for ivf kinds")
    ap.add_argument("--ef-sweep", default="32,64,128", help="efSearch values timed for hnsw")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--hnsw-ef-construction", type=int, default=40)
    ap.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers for ivf-pq-refine")
    ap.add_argument(
        "--exact-sizes",
        default="25000,50000,100000,200000,400000,1000000",
        help="prefix sizes timed for exact single-query latency ('' to skip)",
    )
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        ap.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    args.nprobe_sweep = [int(x) for x in args.nprobe_sweep.split(",") if x]
    args.ef_sweep = [int(x) for x in args.ef_sweep.split(",") if x]
    faiss.omp_set_num_threads(args.threads)

    mix = Mixture(args.dim, args.clusters, args.subspace, args.cluster_std, args.noise, args.seed)
    t = time.perf_counter()
    base = mix.sample(args.n, stream=0)
    queries = mix.sample(args.queries, stream=1)
    ids = np.arange(args.n, dtype=np.int64) * 7 + 1_000_003  # not 0..n-1, like catalog ids
    log(f"generated {args.n}x{args.dim} base + {args.queries} queries in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ref_scores, truth = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    ref_s = time.perf_counter() - t
    log(f"exact reference top-10 in {ref_s:.1f} s")

    rows: list[Row] = []
    for kind in kinds:
        log(f"{kind}: building")
        if kind in ("exact", "ivf-flat", "ivf-sq8"):
            rows += bench_module_kind(kind, ids, base, queries, truth, args)
        elif kind == "ivf-pq-refine":
            rows += bench_pq_refine(base, queries, truth, args)
        else:
            rows += bench_hnsw(base, queries, truth, args)
        log(f"{kind}: done")
        for r in rows:
            if r.kind == kind:
                log(f"  {r.params}: build {fmt(r.build_s, '.1f')} s, p50 {r.p50_ms:.2f} ms, recall {r.recall:.3f}")
        gc.collect()

    sizes = [int(x) for x in args.exact_sizes.split(",") if x]
    scaling = exact_scaling(base, queries, sizes, 50) if sizes else []

    today = dt.date.today().isoformat()
    print(f"### n={args.n:,} dim={args.dim} — {today}\n")
    print(f"Machine: {machine()}. faiss threads for builds/batches: {args.threads}; single queries run on 1 thread.\n")
    print(
        f"Data: {args.clusters} Gaussian clusters (lognormal sizes, std {args.cluster_std}) in a {args.subspace}-d "
        f"subspace, isotropic noise {args.noise}, L2-normalised; {args.queries} held-out queries from the same "
        f"distribution; seed {args.seed}. Median top-1 / top-10 cosine: {np.median(ref_scores[:, 0]):.3f} / "
        f"{np.median(ref_scores[:, 9]):.3f}. Exact reference (batched faiss.knn) took {ref_s:.1f} s.\n"
    )
    print("| kind | params | build s | index MB | p50 ms | p95 ms | batch q/s | recall@10 | recall@10 at build |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.kind} | {r.params} | {fmt(r.build_s, '.1f')} | {fmt(r.mem_mb, '.0f')} | {r.p50_ms:.2f} | "
            f"{r.p95_ms:.2f} | {r.qps:,.0f} | {r.recall:.3f} | {fmt(r.build_recall, '.3f')} |"
        )
    if scaling:
        print("\nExact (IndexFlatIP) single-query latency by size:\n")
        print("| n | p50 ms, 1 thread | p95 ms, 1 thread | p50 ms, 2 threads |")
        print("|---:|---:|---:|---:|")
        for n, p1, p2, p95 in scaling:
            print(f"| {n:,} | {p1:.2f} | {p95:.2f} | {p2:.2f} |")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
