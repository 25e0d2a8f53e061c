"""Builds of the in-memory kinds: exact search below a threshold, IVF-Flat (or IVF-SQ8) trained and tuned above it.

Why IVF-Flat (see scripts/bench/README.md for the measurements on the 2-core build machine):
at 1M clustered 512-d vectors it reached recall@10 0.99 against exact search in ~3 ms per
query (0.96 in 11 ms on a much harder distribution, after the build raised nprobe itself) and
built in ~22 s. HNSW searched faster but built in ~120 s, needed efSearch=128 for 0.965 and
cannot delete; IVF-PQ with exact re-ranking built in ~80 s (PQ training) and needed a 16x
re-rank. Next to 30-40 ms of text encoding, search time is not the bottleneck; build time
is. IVF-Flat also deletes ids natively (no tombstones) and stores the raw vectors, so its
scores are exact cosines and the only approximation is which cells are visited. It costs 4
bytes per dimension (2 GB at 1M x 512), like exact search; `kind="ivf-sq8"` stores one byte
per dimension (recall 0.97 at 1M) for machines short of RAM.

Each ANN build measures its own recall@10 against exact search on 200 of the indexed vectors
(with a little noise added, so a query is near but not on a stored point) and, unless the
estimate minus two standard errors reaches the target (0.95), doubles nprobe and measures
again, up to four times. The recall, the nprobe it was measured with and the search time it
costs are recorded and saved with the index.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable

import faiss
import numpy as np

from cnclip.errors import CNClipError
from cnclip.index.spool import spooling
from cnclip.index.vectors.inputs import as_ids, as_vectors
from cnclip.index.vectors.memory import InMemoryIndex
from cnclip.index.vectors.threads import omp_threads
from cnclip.index.vectors.tuning import KMEANS_ITER, MIN_NPROBE, MIN_TRAIN_PER_LIST, QUERY_NOISE, RECALL_QUERIES, recall

__all__ = ["CHUNK", "build_exact_streaming", "build_from", "build_spooled", "nlist_for"]

log = logging.getLogger(__name__)

# k-means training: faiss wants >= 39 points per centroid and caps at 256; 64 keeps training
# to a few seconds at 1M. 10 iterations instead of faiss's 25: on the hard 1M benchmark set
# recall at equal nprobe differed by < 0.01 while the build took 22 s instead of 33 s.
_TRAIN_PER_LIST = 64
# The first nprobe tried is nlist/_PROBE_DIVISOR (at least MIN_NPROBE): 32 of 1,024 cells
# at 1M gave recall 0.99 in ~3 ms on the benchmark set; half of that would still pass there,
# but the margin is kept because real text queries sit further from the image vectors than
# the build-time sample does, and the cost (~1 ms) is small next to text encoding.
_PROBE_DIVISOR = 32
_MAX_RAISES = 4
# Rows per faiss call (and per slice of a caller's array) while adding.
CHUNK = 65_536
_EXACT_ADD_ROWS = 262_144


def _rows(source: np.ndarray, start: int, stop: int) -> np.ndarray:
    # Copies a slice out of a memmap (the streaming spool) into RAM; a no-op for arrays.
    return np.ascontiguousarray(source[start:stop], dtype=np.float32)


def _exact_topk(queries: np.ndarray, source: np.ndarray, k: int) -> np.ndarray:
    """Row numbers (q, k) of the exact top-k of `source` for each query (as sets, unordered)."""
    # A plain matmul + argpartition per chunk: 3x faster than faiss.knn for 200 queries over
    # 1M x 512 on the 2-core machine (2.6 s vs 8.3 s), and only the set of rows is needed.
    n = source.shape[0]
    k = min(k, n)
    best_s = np.empty((queries.shape[0], 0), dtype=np.float32)
    best_i = np.empty((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, n, CHUNK * 2):
        scores = queries @ _rows(source, start, start + CHUNK * 2).T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    return best_i


def nlist_for(n: int) -> int:
    """The IVF cells a build of `n` vectors makes when not told: ~sqrt(n), a power of two."""
    # ~sqrt(n) cells, rounded up to a power of two (1,024 at 1M): the cheapest build that met
    # the targets in the benchmark. 2,048 cells halved search time on the hard set (0.955 in
    # 6 ms) for ~1.7x the train+add time; callers can pass `nlist` to make that trade.
    nlist = 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n)))))
    return max(1, min(nlist, n // MIN_TRAIN_PER_LIST))


def _empty_exact(dim: int) -> faiss.Index:
    if dim <= 0:
        raise CNClipError(f"vector dimension must be positive, got {dim}")
    return faiss.IndexIDMap(faiss.IndexFlatIP(dim))


def build_exact_streaming(chunks: Iterable[tuple[np.ndarray, np.ndarray]], total: int, dim: int) -> InMemoryIndex:
    """An exact index filled chunk by chunk from (ids, vectors) chunks holding at most `total` rows."""
    start = time.perf_counter()
    flat = _empty_exact(dim)
    seen: list[np.ndarray] = []
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    n = pending_rows = 0
    for chunk_ids, chunk_vectors in chunks:
        chunk_vectors = as_vectors(chunk_vectors, dim)
        chunk_ids = as_ids(chunk_ids, chunk_vectors.shape[0])
        n += chunk_ids.shape[0]
        if n > total:
            raise CNClipError(f"build_streaming got more than total={total} rows; pass the true count")
        seen.append(chunk_ids)
        pending.append((chunk_ids, chunk_vectors))
        pending_rows += chunk_ids.shape[0]
        # Small catalog chunks are batched: every add re-copies the whole flat store.
        if pending_rows >= _EXACT_ADD_ROWS:
            _add_batch(flat, pending)
            pending, pending_rows = [], 0
    _add_batch(flat, pending)
    all_ids = np.concatenate(seen) if seen else np.empty(0, dtype=np.int64)
    if np.unique(all_ids).shape[0] != all_ids.shape[0]:
        raise CNClipError("ids must be unique; each catalog file id may appear once")
    return InMemoryIndex(flat, "exact", params={}, build_seconds=time.perf_counter() - start)


def _add_batch(index: faiss.Index, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    if parts:
        index.add_with_ids(np.concatenate([v for _, v in parts]), np.concatenate([i for i, _ in parts]))


def build_spooled(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    total: int,
    dim: int,
    *,
    kind: str,
    seed: int,
    target_recall: float,
    nlist: int | None,
    spool_dir: str | os.PathLike[str],
) -> InMemoryIndex:
    """`build_from` over chunks spooled to a temporary file under `spool_dir` and read back from it.

    An ANN index must be trained on a uniform sample before anything is added, and a catalog
    streams rows in insertion (folder) order, so the first chunks would be a biased sample;
    spooling them keeps only the index itself in RAM. The result equals `build_from` on the
    same rows with the same seed.
    """
    start = time.perf_counter()
    with spooling(spool_dir) as tmp:
        spool = np.lib.format.open_memmap(
            os.path.join(tmp, "vectors.npy"), mode="w+", dtype=np.float32, shape=(max(total, 1), dim)
        )
        all_ids = np.empty(total, dtype=np.int64)
        n = 0
        for chunk_ids, chunk_vectors in chunks:
            chunk_vectors = as_vectors(chunk_vectors, dim)
            chunk_ids = as_ids(chunk_ids, chunk_vectors.shape[0])
            m = chunk_vectors.shape[0]
            if n + m > total:
                raise CNClipError(f"build_streaming got more than total={total} rows; pass the true count")
            spool[n : n + m] = chunk_vectors
            all_ids[n : n + m] = chunk_ids
            n += m
        if n < total:
            log.debug("build_streaming: expected %d rows, got %d", total, n)
        spool.flush()
        result = build_from(all_ids[:n], spool[:n], kind=kind, seed=seed, target_recall=target_recall, nlist=nlist)
        del spool  # release the mapping before the folder is deleted
    result.build_seconds = time.perf_counter() - start
    return result


def build_from(
    ids: np.ndarray, source: np.ndarray, *, kind: str, seed: int, target_recall: float, nlist: int | None
) -> InMemoryIndex:
    """An index of `kind` (one of IN_MEMORY_KINDS) over `source` (n, dim) under `ids` (n,).

    Exact when asked, or when there are too few vectors to train two IVF cells; an IVF kind
    measures its recall@10 and raises nprobe until it reaches `target_recall`. `source` is an
    in-memory array or the streaming spool's memmap; it is only ever read in row slices, so
    the spool never has to fit in RAM.
    """
    n, dim = source.shape
    if dim <= 0:
        raise CNClipError(f"vector dimension must be positive, got {dim}")
    if np.unique(ids).shape[0] != n:
        raise CNClipError("ids must be unique; each catalog file id may appear once")
    start = time.perf_counter()
    if kind == "exact" or n < 2 * MIN_TRAIN_PER_LIST:
        if kind != "exact":
            # Too few vectors to train two IVF cells; exact search is the right answer anyway.
            log.debug("%d vectors: building an exact index instead of %s", n, kind)
        flat = _empty_exact(dim)
        # One call: faiss grows the flat store to the exact new size on every add, so 16
        # chunks of 1M rows cost 8 s of copying against 1 s for a single add.
        flat.add_with_ids(_rows(source, 0, n), ids)
        return InMemoryIndex(flat, "exact", params={}, build_seconds=time.perf_counter() - start)

    rng = np.random.default_rng(seed)
    if nlist is not None and nlist < 1:
        raise CNClipError(f"nlist must be >= 1, got {nlist}")
    # Capped so that every cell gets enough training points.
    nlist = nlist_for(n) if nlist is None else max(1, min(nlist, n // MIN_TRAIN_PER_LIST))
    ntrain = min(n, nlist * _TRAIN_PER_LIST)
    train_rows = np.sort(rng.choice(n, ntrain, replace=False))
    train = np.ascontiguousarray(source[train_rows], dtype=np.float32)
    codec = "Flat" if kind == "ivf-flat" else "SQ8"
    ivf = faiss.index_factory(dim, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = KMEANS_ITER
    ivf.cp.seed = seed
    log.info("training %s: %d vectors, nlist=%d, %d training points", kind, n, nlist, ntrain)
    ivf.train(train)
    del train
    for s in range(0, n, CHUNK):
        ivf.add_with_ids(_rows(source, s, s + CHUNK), ids[s : s + CHUNK])
    train_seconds = time.perf_counter() - start

    # Recall sample: stored vectors plus a little noise, scored against exact search over
    # the same source. Exact top-10 is fixed, so each nprobe raise only re-runs the ANN side.
    nq = min(RECALL_QUERIES, n)
    qrows = np.sort(rng.choice(n, nq, replace=False))
    queries = np.ascontiguousarray(source[qrows], dtype=np.float32)
    queries += rng.standard_normal(queries.shape, dtype=np.float32) * np.float32(QUERY_NOISE / math.sqrt(dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = ids[_exact_topk(queries, source, 10)]
    nprobe, measured, low = _tune_nprobe(ivf, queries, truth, kind, target_recall)
    # Recorded so that `info` shows what the chosen nprobe costs on this machine.
    with omp_threads(1):
        times = []
        for q in queries[:20]:
            t = time.perf_counter()
            ivf.search(q[None, :], 10)
            times.append(time.perf_counter() - t)
    params = {
        "nlist": nlist,
        "nprobe": nprobe,
        "ntrain": ntrain,
        "kmeans_iter": KMEANS_ITER,
        "built_ntotal": n,
        "recall_queries": nq,
        "recall_at_10_low": round(low, 4),
        "search_ms_p50": round(float(np.median(times)) * 1e3, 3),
        "target_recall": target_recall,
        "train_add_seconds": round(train_seconds, 3),
        "seed": seed,
    }
    return InMemoryIndex(ivf, kind, recall_at_10=measured, params=params, build_seconds=time.perf_counter() - start)


def _tune_nprobe(
    ivf: faiss.IndexIVF, queries: np.ndarray, truth: np.ndarray, kind: str, target: float
) -> tuple[int, float, float]:
    """Set `ivf.nprobe` to the first that reaches `target` recall@10 (doubling up to _MAX_RAISES
    times); returns it with the recall measured there and that estimate minus two standard errors."""
    # The decision uses the estimate minus two standard errors: with 200 queries the
    # estimate itself wobbles by ~0.01, and at 100k the benchmark's first nprobe measured
    # 0.960 on the sample but 0.956 on held-out queries (0.948 for ivf-sq8).
    nlist = ivf.nlist
    nprobe = min(nlist, max(MIN_NPROBE, nlist // _PROBE_DIVISOR))
    measured = low = 0.0
    for attempt in range(_MAX_RAISES + 1):
        ivf.nprobe = nprobe
        _, found = ivf.search(queries, truth.shape[1])
        measured, low = recall(found, truth)
        log.debug("recall@10=%.4f (>= %.4f) at nprobe=%d", measured, low, nprobe)
        if low >= target or nprobe >= nlist or attempt == _MAX_RAISES:
            break
        nprobe = min(nlist, nprobe * 2)
    if low < target:
        log.warning(
            "%s index reached recall@10 %.3f (>= %.3f), short of %.2f, at nprobe=%d; searches may miss matches",
            kind,
            measured,
            low,
            target,
            nprobe,
        )
    else:
        log.info("%s index: recall@10=%.3f (>= %.3f) at nprobe=%d", kind, measured, low, nprobe)
    return nprobe, measured, low
