"""Benchmark the on-disk OPQ+IVF-PQ index (cnclip.index.vectors.ondisk) on clustered synthetic CLIP-like vectors.

Draws N vectors with ann.py's generator chunk by chunk into a raw float32 file (the full array is
never in RAM), builds the index from that file in a fresh process (two streaming passes, shard
files, one merged `.ivfdata`), then opens it in another fresh process and measures what a search
costs: RSS after loading, single-query latency (1 thread) and batched q/s over an nprobe sweep,
with and without exact re-ranking, with the lists in the page cache and with them evicted from it,
and recall@10 against exact search computed in this run over the same file.

    OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python scripts/bench/ondisk.py --n 1000000

The Markdown report goes to stdout, progress to stderr. `--keep DIR` keeps the data and the index.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import Mixture, log, machine, recall_at  # noqa: E402  (same folder: the shared data generator)

from cnclip.index.vectors import OnDiskIndex  # noqa: E402

ID_BASE, ID_STEP = 1_000_003, 7  # ids are not 0..n-1, like catalog ids


# -- data -------------------------------------------------------------------------------------


def row_ids(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.int64) * ID_STEP + ID_BASE


def generate(args, data: Path) -> float:
    """Write n vectors to `data` (raw float32, row-major) chunk by chunk; seconds taken."""
    mix = Mixture(args.dim, args.clusters, args.subspace, args.cluster_std, args.noise, args.seed)
    t = time.perf_counter()
    with open(data, "wb") as f:
        for i, start in enumerate(range(0, args.n, args.chunk)):
            mix.sample(min(args.chunk, args.n - start), stream=2 + i).tofile(f)
    np.save(data.with_name("queries.npy"), mix.sample(args.queries, stream=1))
    return time.perf_counter() - t


def read_chunks(data: Path, n: int, dim: int, chunk: int):
    """(ids, vectors) chunks read with plain reads: no mapping, so only the chunk is in RSS."""
    with open(data, "rb") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            vectors = np.fromfile(f, dtype=np.float32, count=m * dim).reshape(m, dim)
            yield row_ids(start, start + m), vectors


def exact_top10(data: Path, queries: np.ndarray, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-10 (scores, ids) of the queries over the whole file, with faiss.knn per chunk."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.empty((len(queries), 0), dtype=np.int64)
    for ids, vectors in read_chunks(data, n, queries.shape[1], chunk):
        s, i = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, ids[i]], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_s, best_i


# -- memory -----------------------------------------------------------------------------------


def memory(*files: Path) -> dict[str, float]:
    """This process's VmRSS, VmHWM (peak), RssAnon and RssFile in MiB, and each file's mapped Rss."""
    out = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    names = {str(Path(p).resolve()): Path(p).name for p in files}
    for name in names.values():
        out[name] = 0.0
    current = None
    with contextlib.suppress(OSError), open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                current = names.get(fields[-1]) if len(fields) >= 6 else None
            elif current and fields[0] == "Rss:":
                out[current] += int(fields[1]) / 1024
    return out


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (no root needed; pages mapped somewhere stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- the two measured processes -----------------------------------------------------------------


def build_phase(args: dict) -> dict:
    """Runs in a fresh process: build the index from the data file; timings, peak RSS, sizes."""
    faiss.omp_set_num_threads(args["threads"])
    data, folder = Path(args["data"]), Path(args["index"])
    before = memory()
    t = time.perf_counter()
    index = OnDiskIndex.build(
        lambda: read_chunks(data, args["n"], args["dim"], args["chunk"]),
        folder,
        total=args["n"],
        dim=args["dim"],
        nlist=args["nlist"],
        m=args["m"],
        nbits=args["nbits"],
        opq=args["opq"],
        shard_rows=args["shard_rows"],
        seed=args["seed"],
    )
    seconds = time.perf_counter() - t
    files = index.files
    return {
        "seconds": seconds,
        "params": index.params,
        "recall_at_10": index.recall_at_10,
        "memory_before": before,
        "memory": memory(),
        "header_bytes": (folder / files["header"]).stat().st_size,
        "lists_bytes": (folder / files["lists"]).stat().st_size,
        "ids_bytes": (folder / files["ids"]).stat().st_size,
        "lists_file": files["lists"],
        "ids_file": files["ids"],
    }


def time_single(index: OnDiskIndex, queries: np.ndarray, nprobe: int, count: int) -> tuple[float, float]:
    """(p50 ms, p95 ms) of one query per call, after 5 warm-up queries."""
    for q in queries[:5]:
        index.search(q[None, :], 10, nprobe=nprobe)
    times = []
    for q in queries[5 : 5 + count]:
        t = time.perf_counter()
        index.search(q[None, :], 10, nprobe=nprobe)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def time_cold(folder: Path, queries: np.ndarray, nprobe: int, evicted: list[Path], reranker=None):
    """(p50 ms, p95 ms) with `evicted` dropped from the page cache before every query.

    The index (and the reranker's mapping, from `reranker()`) is closed first, since pages this
    process maps are not dropped, and reopened after the eviction; only the search is timed.
    """
    times = []
    for q in queries:
        index = None
        evict(*evicted)
        index = OnDiskIndex.load(folder)
        index.reranker = reranker() if reranker else None
        t = time.perf_counter()
        index.search(q[None, :], 10, nprobe=nprobe)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def search_phase(args: dict) -> dict:
    """Runs in a fresh process: open the index, then time and score searches over an nprobe sweep."""
    faiss.omp_set_num_threads(args["threads"])
    folder, data = Path(args["index"]), Path(args["data"])
    queries = np.load(data.with_name("queries.npy"))
    truth = np.load(data.with_name("truth.npy"))
    out: dict = {"memory_before": memory()}
    t = time.perf_counter()
    index = OnDiskIndex.load(folder)
    out["load_s"] = time.perf_counter() - t
    files = index.files
    lists, ids_file = folder / files["lists"], folder / files["ids"]
    watched = (lists, ids_file, data)
    out["memory_loaded"] = memory(*watched)

    def exact_vectors():  # a lookup of exact vectors by id, as the catalog would answer it
        raw = np.memmap(data, dtype=np.float32, mode="r", shape=(args["n"], args["dim"]))
        return lambda ids: np.asarray(raw[(ids - ID_BASE) // ID_STEP])

    rows = []
    for rerank in (False, True):
        index.reranker = exact_vectors() if rerank else None
        for nprobe in args["nprobe_sweep"]:
            p50, p95 = time_single(index, queries, nprobe, args["latency_queries"])
            t = time.perf_counter()
            _, found = index.search(queries, 10, nprobe=nprobe)  # a batch: all `--threads` threads
            qps = len(queries) / (time.perf_counter() - t)
            rows.append({"nprobe": nprobe, "rerank": rerank, "p50": p50, "p95": p95, "qps": qps})
            rows[-1]["recall"] = recall_at(found, truth)
            log(f"nprobe={nprobe} rerank={rerank}: p50 {p50:.2f} ms, recall {rows[-1]['recall']:.3f}")
        out["memory_reranked" if rerank else "memory_pq"] = memory(*watched)
    chosen = index.nprobe
    del index
    cold_queries = queries[5 : 5 + args["cold_queries"]]
    out["cold"] = time_cold(folder, cold_queries, chosen, [lists])
    out["cold_reranked"] = time_cold(folder, cold_queries, chosen, [lists, data], exact_vectors)
    out.update(rows=rows, chosen=chosen)
    return out


def in_fresh_process(fn, args: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


# -- report -----------------------------------------------------------------------------------


def report(args, gen_s: float, ref_s: float, ref_scores: np.ndarray, built: dict, searched: dict) -> None:
    p = built["params"]
    mib = 2**20
    n = args.n
    print(f"### n={n:,} dim={args.dim} — on-disk OPQ+IVF-PQ — {dt.date.today().isoformat()}\n")
    print(
        f"Machine: {machine()}. faiss threads for builds/batches: {args.threads}; single queries run on 1 "
        f"thread. OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}.\n"
    )
    print(
        f"Data: ann.py's generator ({args.clusters} Gaussian clusters, std {args.cluster_std}, {args.subspace}-d "
        f"subspace, noise {args.noise}, seed {args.seed}), written chunk by chunk ({args.chunk:,} rows) to a raw "
        f"float32 file in {gen_s:.0f} s; {args.queries} held-out queries. Median top-1 / top-10 cosine: "
        f"{np.median(ref_scores[:, 0]):.3f} / {np.median(ref_scores[:, 9]):.3f}. Exact reference (faiss.knn over "
        f"the file, chunk by chunk) took {ref_s:.1f} s.\n"
    )
    opq = f"OPQ{p['m']}," if p["opq"] else ""
    quantizer = "_HNSW32" if p["hnsw"] else ""
    print(f"**Build** ({opq}IVF{p['nlist']}{quantizer},PQ{p['m']}x{p['nbits']}, inner product):\n")
    print("| step | seconds |")
    print("|---|---:|")
    for label, key in (
        ("pass 1: uniform sample", "sample_s"),
        (f"train (OPQ, k-means, PQ) on {p['ntrain']:,} vectors", "train_s"),
        (f"pass 2: encode into {p['shards']} shards of {p['shard_rows']:,}", "fill_s"),
        ("merge into one .ivfdata", "merge_s"),
        (f"choose nprobe ({p['recall_queries']} queries)", "recall_s"),
    ):
        print(f"| {label} | {p[key]:.1f} |")
    print(f"| **total** | **{built['seconds']:.1f}** |\n")
    b0, b1 = built["memory_before"], built["memory"]
    per_vector = (built["lists_bytes"] + built["ids_bytes"]) / n
    print(
        f"Files: header {built['header_bytes'] / mib:.1f} MiB (quantizers, list offsets), lists "
        f"{built['lists_bytes'] / mib:.1f} MiB ({built['lists_bytes'] / n:.1f} B/vector: {p['code_size']} B code + "
        f"8 B id), sorted ids {built['ids_bytes'] / mib:.1f} MiB; {per_vector:.1f} B/vector in all, against "
        f"{4 * args.dim} B of float32. Build process peak RSS (VmHWM) {b1['VmHWM']:.0f} MiB, of which "
        f"{b0['VmRSS']:.0f} MiB was the interpreter with numpy, faiss and torch (which `import cnclip` loads).\n"
    )
    print(f"**Search** (a fresh process; `OnDiskIndex.load` took {searched['load_s'] * 1e3:.0f} ms). Memory, MiB:\n")
    lists, ids_file, data = built["lists_file"], built["ids_file"], "vectors.f32"
    print("| when | RSS | anonymous | .ivfdata mapped | ids mapped | raw vectors mapped |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, key in (
        ("before loading", "memory_before"),
        ("after loading", "memory_loaded"),
        ("after the sweep without re-ranking", "memory_pq"),
        ("after the sweep with re-ranking", "memory_reranked"),
    ):
        m = searched[key]
        print(
            f"| {label} | {m['VmRSS']:.0f} | {m['RssAnon']:.0f} | {m.get(lists, 0):.0f} | {m.get(ids_file, 0):.0f} | "
            f"{m.get(data, 0):.0f} |"
        )
    print(
        "\nMapped pages are the page cache seen through the mapping: the kernel drops them under memory "
        "pressure, and a second process searching the same files shares them.\n"
    )
    print(
        f"Re-ranking fetches {p['rerank_factor']}x k candidates' exact vectors by id from the raw file "
        f"(memory-mapped; standing in for the catalog) and rescores them. nprobe {searched['chosen']} was chosen "
        f"at build (recall@10 at build: {built['recall_at_10']:.3f} without, "
        f"{p['recall_at_10_reranked']:.3f} with re-ranking).\n"
    )
    print("| nprobe | re-rank | p50 ms | p95 ms | batch q/s | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in searched["rows"]:
        mark = " (chosen at build)" if r["nprobe"] == searched["chosen"] else ""
        print(
            f"| {r['nprobe']}{mark} | {'yes' if r['rerank'] else 'no'} | {r['p50']:.2f} | {r['p95']:.2f} | "
            f"{r['qps']:,.0f} | {r['recall']:.3f} |"
        )
    (c50, c95), (r50, r95) = searched["cold"], searched["cold_reranked"]
    print(
        f"\nFrom disk ({args.cold_queries} queries at nprobe {searched['chosen']}, the index closed, its files "
        f"dropped from the page cache with `posix_fadvise(DONTNEED)` and the index reopened before each one; "
        f"this VM's virtual disk): .ivfdata evicted p50 {c50:.2f} ms, p95 {c95:.2f} ms; .ivfdata and the raw "
        f"vectors evicted, with re-ranking, p50 {r50:.2f} ms, p95 {r95:.2f} ms.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="base vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=100_000, help="rows generated and fed per chunk")
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batched q/s")
    ap.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--cold-queries", type=int, default=50, help="queries timed with the lists evicted")
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default: the library's, ~4 sqrt(n))")
    ap.add_argument("--m", type=int, default=None, help="PQ sub-quantizers (bytes per code; default dim/8)")
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--no-opq", dest="opq", action="store_false")
    ap.add_argument("--shard-rows", type=int, default=250_000, help="rows per shard (library default 1,000,000)")
    ap.add_argument("--nprobe-sweep", default="8,16,32,64,128")
    ap.add_argument("--clusters", type=int, default=5000)
    ap.add_argument("--subspace", type=int, default=64)
    ap.add_argument("--cluster-std", type=float, default=0.5)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--keep", default=None, help="folder for the data and the index (kept); default: a temp folder")
    args = ap.parse_args(argv)
    args.nprobe_sweep = [int(x) for x in args.nprobe_sweep.split(",") if x]
    faiss.omp_set_num_threads(args.threads)

    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            spool = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cnclip-ondisk-bench-", dir=spool)))
        data = work / "vectors.f32"
        gen_s = generate(args, data)
        log(f"generated {args.n:,}x{args.dim} in {gen_s:.0f} s into {data}")
        queries = np.load(work / "queries.npy")
        t = time.perf_counter()
        ref_scores, truth = exact_top10(data, queries, args.n, args.chunk)
        ref_s = time.perf_counter() - t
        np.save(work / "truth.npy", truth)
        log(f"exact top-10 in {ref_s:.1f} s")

        common = {k: getattr(args, k) for k in ("n", "dim", "chunk", "threads", "seed")}
        common.update(data=str(data), index=str(work / "index"))
        build_args = {**common, **{k: getattr(args, k) for k in ("nlist", "m", "nbits", "opq", "shard_rows")}}
        built = in_fresh_process(build_phase, build_args)
        log(f"built in {built['seconds']:.0f} s: {json.dumps(built['params'])}")
        search_args = {**common, **{k: getattr(args, k) for k in ("nprobe_sweep", "latency_queries", "cold_queries")}}
        searched = in_fresh_process(search_phase, search_args)
        report(args, gen_s, ref_s, ref_scores, built, searched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
