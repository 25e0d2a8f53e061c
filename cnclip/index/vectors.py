"""The vector index: exact inner-product search for small libraries, IVF-Flat above a threshold.

The SQLite catalog is the source of truth; this index is a cache derived from it and can be
rebuilt at any time, so `load` answers None (never raises) when the files are absent, stale or
damaged. Vectors are L2-normalised float32 and scored by inner product (= cosine similarity).

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

`kind="ivf-pq-ondisk"` (cnclip.index.ondisk; `kind="auto"` from ONDISK_THRESHOLD vectors up) keeps
OPQ+IVF-PQ codes in a memory-mapped file, for collections whose vectors do not fit in RAM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from cnclip import atomic, faults
from cnclip.errors import CNClipError
from cnclip.index.spool import spool_root, spooling
from cnclip.index.vector_common import (
    _KMEANS_ITER,
    _MIN_NPROBE,
    _QUERY_NOISE,
    _RECALL_QUERIES,
    _SINGLE_THREAD_MAX_QUERIES,
    META_FILE,
    TARGET_RECALL,
    _as_ids,
    _as_vectors,
    _omp_threads,
    _recall,
    write_faiss,
)

if TYPE_CHECKING:
    from cnclip.index.ondisk import OnDiskIndex

__all__ = [
    "ANN_KIND",
    "EXACT_THRESHOLD",
    "INDEX_FILE",
    "KINDS",
    "META_FILE",
    "ONDISK_KIND",
    "ONDISK_THRESHOLD",
    "TARGET_RECALL",
    "Selection",
    "VectorIndex",
    "filtered_nprobe",
]

log = logging.getLogger(__name__)

# Below this many vectors `kind="auto"` builds an exact IndexFlatIP. Measured on the 2-core
# build machine (scripts/bench): one exact 512-d query costs ~0.08 ms per 1,000 vectors on
# one thread (8.4 ms at 100k, 17 ms at 200k, 82 ms at 1M). At 100k exact search stays well
# inside the ~15 ms left for search in the 60 ms budget (text encoding takes 30-40 ms), with
# room for a 1024-d model (twice the cost) or a busy machine, and it is perfect, needs no
# training and is built in well under a second. Above it IVF-Flat answers in under 1 ms.
EXACT_THRESHOLD: int = 100_000

# The ANN kind `kind="auto"` picks above the threshold, and all kinds `build` accepts.
ANN_KIND: str = "ivf-flat"
ONDISK_KIND: str = "ivf-pq-ondisk"
KINDS: tuple[str, ...] = ("exact", "ivf-flat", "ivf-sq8", ONDISK_KIND)
# From this many vectors `kind="auto"` builds the on-disk IVF-PQ index: IVF-Flat would hold
# 4*dim bytes a vector in RAM (20 GB at 10M x 512-d, most of the 24 GB build machine), the
# on-disk index ~m+8 bytes a vector on disk and only the quantizers in RAM.
ONDISK_THRESHOLD: int = 10_000_000

INDEX_FILE = "vectors.faiss"
_FORMAT = 1

# k-means training: faiss wants >= 39 points per centroid and caps at 256; 64 keeps training
# to a few seconds at 1M. 10 iterations instead of faiss's 25: on the hard 1M benchmark set
# recall at equal nprobe differed by < 0.01 while the build took 22 s instead of 33 s.
_TRAIN_PER_LIST = 64
_MIN_TRAIN_PER_LIST = 39
# The first nprobe tried is nlist/_PROBE_DIVISOR (at least _MIN_NPROBE): 32 of 1,024 cells
# at 1M gave recall 0.99 in ~3 ms on the benchmark set; half of that would still pass there,
# but the margin is kept because real text queries sit further from the image vectors than
# the build-time sample does, and the cost (~1 ms) is small next to text encoding.
_PROBE_DIVISOR = 32
_MAX_RAISES = 4
_CHUNK = 65_536
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
    for start in range(0, n, _CHUNK * 2):
        scores = queries @ _rows(source, start, start + _CHUNK * 2).T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    return best_i


def _nlist_for(n: int) -> int:
    # ~sqrt(n) cells, rounded up to a power of two (1,024 at 1M): the cheapest build that met
    # the targets in the benchmark. 2,048 cells halved search time on the hard set (0.955 in
    # 6 ms) for ~1.7x the train+add time; callers can pass `nlist` to make that trade.
    nlist = 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n)))))
    return max(1, min(nlist, n // _MIN_TRAIN_PER_LIST))


def filtered_nprobe(nprobe: int, share: float, nlist: int) -> int:
    """The IVF cells a filtered search visits when `share` (0..1) of the vectors are selected:
    `nprobe` / `share`, up to all `nlist`, so it meets about as many selected vectors as an
    unfiltered search meets vectors, and keeps its recall."""
    return min(nlist, math.ceil(nprobe / max(share, 1e-9)))


class Selection:
    """The ids a filtered search may return (`VectorIndex.search_within`). Its faiss form (a hash
    set behind a Bloom filter: ~60 ms to build for 8*10^5 ids) is built once, on first use, and
    serves every search given the same selection."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = _as_ids(ids)
        self._selector: faiss.IDSelector | None = None

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def selector(self) -> faiss.IDSelector:
        # Not IDSelectorBitmap: it reads past its end for ids above the bitmap's size.
        if self._selector is None:
            self._selector = faiss.IDSelectorBatch(self.ids)
        return self._selector


class VectorIndex:
    """Inner-product search over L2-normalised float32 vectors keyed by int64 catalog ids."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        *,
        recall_at_10: float | None = None,
        params: dict[str, Any] | None = None,
        build_seconds: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Wrap a ready faiss index; use `build`, `build_streaming` or `load` instead."""
        if kind not in KINDS:
            raise CNClipError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        self._index = index
        self.kind = kind
        self.recall_at_10 = recall_at_10
        self.params: dict[str, Any] = dict(params or {})
        self.build_seconds = build_seconds
        self.meta: dict[str, Any] = dict(meta or {})
        # Set by `load(mmap=True)`: the file's arrays are read-only views, which faiss aborts
        # the process on if asked to grow or shrink them, so mutations copy them in first.
        self._mapped_from: Path | None = None
        self._mapped_stat: tuple[int, int, int] | None = None
        # Set for kind ONDISK_KIND: the cnclip.index.ondisk.OnDiskIndex that does the work.
        self._ondisk: OnDiskIndex | None = None

    @classmethod
    def _of_ondisk(cls, ondisk: OnDiskIndex) -> VectorIndex:
        result = cls(
            ondisk._base,
            ONDISK_KIND,
            recall_at_10=ondisk.recall_at_10,
            params=ondisk.params,
            build_seconds=ondisk.build_seconds,
            meta=ondisk.meta,
        )
        result._ondisk = ondisk
        return result

    @property
    def ondisk(self) -> OnDiskIndex | None:
        """The on-disk index behind kind ONDISK_KIND (e.g. to set its `reranker`), else None."""
        return self._ondisk

    # -- properties --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return self._ondisk.ntotal if self._ondisk is not None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal})"

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        """An exact index with no vectors yet."""
        if dim <= 0:
            raise CNClipError(f"vector dimension must be positive, got {dim}")
        return cls(faiss.IndexIDMap(faiss.IndexFlatIP(dim)), "exact", params={})

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        kind: str = "auto",
        exact_threshold: int = EXACT_THRESHOLD,
        seed: int = 0,
        target_recall: float = TARGET_RECALL,
        nlist: int | None = None,
        folder: str | os.PathLike[str] | None = None,
    ) -> VectorIndex:
        """Index `vectors` (n, dim) under `ids` (n,): exact below `exact_threshold`, else ANN.

        `kind` is "auto", "exact" or an ANN kind ("ivf-flat", "ivf-sq8", "ivf-pq-ondisk"). An
        ANN build measures recall@10 against exact search and raises nprobe until it reaches
        `target_recall`. `nlist` (IVF cells) defaults to ~sqrt(n) (~4 sqrt(n) on disk); more
        cells search faster but train slower. An on-disk index is written into `folder`
        (default: a temporary folder, linked or copied into the folder given to `save`).
        """
        vectors = _as_vectors(vectors)
        ids = _as_ids(ids, vectors.shape[0])
        if cls._resolve_kind(kind, ids.shape[0], exact_threshold) == ONDISK_KIND:
            rows = ids.shape[0]
            slices = [(ids[s : s + _CHUNK], vectors[s : s + _CHUNK]) for s in range(0, rows, _CHUNK)]
            return cls._build_ondisk(
                slices, rows, vectors.shape[1], seed=seed, target_recall=target_recall, nlist=nlist, folder=folder
            )
        return cls._build_from(
            ids,
            vectors,
            kind=kind,
            exact_threshold=exact_threshold,
            seed=seed,
            target_recall=target_recall,
            nlist=nlist,
        )

    @classmethod
    def build_streaming(
        cls,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
        total: int,
        dim: int,
        *,
        kind: str = "auto",
        exact_threshold: int = EXACT_THRESHOLD,
        seed: int = 0,
        target_recall: float = TARGET_RECALL,
        nlist: int | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        folder: str | os.PathLike[str] | None = None,
    ) -> VectorIndex:
        """Like `build`, from an iterator of (ids, vectors) chunks holding `total` rows in all.

        `chunks` may also be a function returning such an iterator (e.g. `catalog.file_vectors`);
        kind "ivf-pq-ondisk" needs one (or a list), since it reads the rows twice: once for a
        uniform training sample, once to encode them into `folder` (see `build`).

        An exact index is filled chunk by chunk. An ANN index must be trained on a uniform
        sample before anything is added, and a catalog streams rows in insertion (folder)
        order, so the first chunks would be a biased sample; instead the chunks are spooled
        to a temporary file under `spool_dir` and read back from it, so only the index itself
        occupies RAM. The default is `folder`'s `tmp` folder, else $TMPDIR if set, else /var/tmp
        (where /tmp may be a RAM disk, as on Fedora and Arch), else the system temp folder; a
        spool that a killed build left there is removed by the next build (cnclip.index.spool).
        The result equals `build` on the same rows with the same seed.
        """
        if total < 0:
            raise CNClipError(f"total must be >= 0, got {total}")
        kind = cls._resolve_kind(kind, total, exact_threshold)
        if kind == ONDISK_KIND:
            return cls._build_ondisk(
                chunks, total, dim, seed=seed, target_recall=target_recall, nlist=nlist, folder=folder
            )
        if callable(chunks):
            chunks = chunks()
        start = time.perf_counter()
        if kind == "exact":
            index = cls.empty(dim)
            seen: list[np.ndarray] = []
            pending: list[tuple[np.ndarray, np.ndarray]] = []
            n = pending_rows = 0
            for chunk_ids, chunk_vectors in chunks:
                chunk_vectors = _as_vectors(chunk_vectors, dim)
                chunk_ids = _as_ids(chunk_ids, chunk_vectors.shape[0])
                n += chunk_ids.shape[0]
                if n > total:
                    raise CNClipError(f"build_streaming got more than total={total} rows; pass the true count")
                seen.append(chunk_ids)
                pending.append((chunk_ids, chunk_vectors))
                pending_rows += chunk_ids.shape[0]
                # Small catalog chunks are batched: every add re-copies the whole flat store.
                if pending_rows >= _EXACT_ADD_ROWS:
                    index._add_batch(pending)
                    pending, pending_rows = [], 0
            index._add_batch(pending)
            all_ids = np.concatenate(seen) if seen else np.empty(0, dtype=np.int64)
            if np.unique(all_ids).shape[0] != all_ids.shape[0]:
                raise CNClipError("ids must be unique; each catalog file id may appear once")
            index.build_seconds = time.perf_counter() - start
            return index

        with spooling(spool_root(folder) if spool_dir is None else spool_dir) as tmp:
            spool = np.lib.format.open_memmap(
                os.path.join(tmp, "vectors.npy"), mode="w+", dtype=np.float32, shape=(max(total, 1), dim)
            )
            all_ids = np.empty(total, dtype=np.int64)
            n = 0
            for chunk_ids, chunk_vectors in chunks:
                chunk_vectors = _as_vectors(chunk_vectors, dim)
                chunk_ids = _as_ids(chunk_ids, chunk_vectors.shape[0])
                m = chunk_vectors.shape[0]
                if n + m > total:
                    raise CNClipError(f"build_streaming got more than total={total} rows; pass the true count")
                spool[n : n + m] = chunk_vectors
                all_ids[n : n + m] = chunk_ids
                n += m
            if n < total:
                log.debug("build_streaming: expected %d rows, got %d", total, n)
            spool.flush()
            result = cls._build_from(
                all_ids[:n],
                spool[:n],
                kind=kind,
                exact_threshold=exact_threshold,
                seed=seed,
                target_recall=target_recall,
                nlist=nlist,
            )
            del spool  # release the mapping before the folder is deleted
        result.build_seconds = time.perf_counter() - start
        return result

    @classmethod
    def _build_ondisk(
        cls,
        chunks: Any,
        total: int,
        dim: int,
        *,
        seed: int,
        target_recall: float,
        nlist: int | None,
        folder: str | os.PathLike[str] | None,
    ) -> VectorIndex:
        from cnclip.index.ondisk import OnDiskIndex, min_rows

        if total < min_rows():
            # Too few vectors to train PQ codebooks; exact search is the right answer anyway.
            log.debug("%d vectors: building an exact index instead of %s", total, ONDISK_KIND)
            return cls.build_streaming(chunks() if callable(chunks) else chunks, total, dim, kind="exact")
        ondisk = OnDiskIndex.build(
            chunks, folder, total=total, dim=dim, nlist=nlist, seed=seed, target_recall=target_recall
        )
        return cls._of_ondisk(ondisk)

    @staticmethod
    def resolve_kind(kind: str, n: int, exact_threshold: int = EXACT_THRESHOLD) -> str:
        """The kind `build` makes for `kind` ("auto" or one of KINDS) and `n` vectors."""
        kind = VectorIndex._resolve_kind(kind, n, exact_threshold)
        if kind == ONDISK_KIND:
            from cnclip.index.ondisk import min_rows

            return "exact" if n < min_rows() else kind
        return "exact" if n < 2 * _MIN_TRAIN_PER_LIST else kind

    @staticmethod
    def _resolve_kind(kind: str, n: int, exact_threshold: int) -> str:
        if kind == "auto":
            return "exact" if n < exact_threshold else ONDISK_KIND if n >= ONDISK_THRESHOLD else ANN_KIND
        if kind not in KINDS:
            raise CNClipError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
        return kind

    @classmethod
    def _build_from(
        cls,
        ids: np.ndarray,
        source: np.ndarray,
        *,
        kind: str,
        exact_threshold: int,
        seed: int,
        target_recall: float,
        nlist: int | None,
    ) -> VectorIndex:
        # `source` is an in-memory array or the streaming spool's memmap; it is only ever
        # read in row slices so that the spool never has to fit in RAM.
        n, dim = source.shape
        if dim <= 0:
            raise CNClipError(f"vector dimension must be positive, got {dim}")
        if np.unique(ids).shape[0] != n:
            raise CNClipError("ids must be unique; each catalog file id may appear once")
        kind = cls._resolve_kind(kind, n, exact_threshold)
        start = time.perf_counter()
        if kind == "exact" or n < 2 * _MIN_TRAIN_PER_LIST:
            if kind != "exact":
                # Too few vectors to train two IVF cells; exact search is the right answer anyway.
                log.debug("%d vectors: building an exact index instead of %s", n, kind)
            index = cls.empty(dim)
            # One call: faiss grows the flat store to the exact new size on every add, so 16
            # chunks of 1M rows cost 8 s of copying against 1 s for a single add.
            index._index.add_with_ids(_rows(source, 0, n), ids)
            index.build_seconds = time.perf_counter() - start
            return index

        rng = np.random.default_rng(seed)
        if nlist is not None and nlist < 1:
            raise CNClipError(f"nlist must be >= 1, got {nlist}")
        # Capped so that every cell gets enough training points.
        nlist = _nlist_for(n) if nlist is None else max(1, min(nlist, n // _MIN_TRAIN_PER_LIST))
        ntrain = min(n, nlist * _TRAIN_PER_LIST)
        train_rows = np.sort(rng.choice(n, ntrain, replace=False))
        train = np.ascontiguousarray(source[train_rows], dtype=np.float32)
        codec = "Flat" if kind == "ivf-flat" else "SQ8"
        ivf = faiss.index_factory(dim, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = _KMEANS_ITER
        ivf.cp.seed = seed
        log.info("training %s: %d vectors, nlist=%d, %d training points", kind, n, nlist, ntrain)
        ivf.train(train)
        del train
        for s in range(0, n, _CHUNK):
            ivf.add_with_ids(_rows(source, s, s + _CHUNK), ids[s : s + _CHUNK])
        train_seconds = time.perf_counter() - start

        # Recall sample: stored vectors plus a little noise, scored against exact search over
        # the same source. Exact top-10 is fixed, so each nprobe raise only re-runs the ANN side.
        nq = min(_RECALL_QUERIES, n)
        qrows = np.sort(rng.choice(n, nq, replace=False))
        queries = np.ascontiguousarray(source[qrows], dtype=np.float32)
        queries += rng.standard_normal(queries.shape, dtype=np.float32) * np.float32(_QUERY_NOISE / math.sqrt(dim))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        truth = ids[_exact_topk(queries, source, 10)]

        # The decision uses the estimate minus two standard errors: with 200 queries the
        # estimate itself wobbles by ~0.01, and at 100k the benchmark's first nprobe measured
        # 0.960 on the sample but 0.956 on held-out queries (0.948 for ivf-sq8).
        nprobe = min(nlist, max(_MIN_NPROBE, nlist // _PROBE_DIVISOR))
        recall = low = 0.0
        for attempt in range(_MAX_RAISES + 1):
            ivf.nprobe = nprobe
            _, found = ivf.search(queries, truth.shape[1])
            recall, low = _recall(found, truth)
            log.debug("recall@10=%.4f (>= %.4f) at nprobe=%d", recall, low, nprobe)
            if low >= target_recall or nprobe >= nlist or attempt == _MAX_RAISES:
                break
            nprobe = min(nlist, nprobe * 2)
        if low < target_recall:
            log.warning(
                "%s index reached recall@10 %.3f (>= %.3f), short of %.2f, at nprobe=%d; searches may miss matches",
                kind,
                recall,
                low,
                target_recall,
                nprobe,
            )
        else:
            log.info("%s index: recall@10=%.3f (>= %.3f) at nprobe=%d", kind, recall, low, nprobe)
        # Recorded so that `info` shows what the chosen nprobe costs on this machine.
        with _omp_threads(1):
            times = []
            for q in queries[:20]:
                t = time.perf_counter()
                ivf.search(q[None, :], 10)
                times.append(time.perf_counter() - t)
        params = {
            "nlist": nlist,
            "nprobe": nprobe,
            "ntrain": ntrain,
            "kmeans_iter": _KMEANS_ITER,
            "built_ntotal": n,
            "recall_queries": nq,
            "recall_at_10_low": round(low, 4),
            "search_ms_p50": round(float(np.median(times)) * 1e3, 3),
            "target_recall": target_recall,
            "train_add_seconds": round(train_seconds, 3),
            "seed": seed,
        }
        return cls(ivf, kind, recall_at_10=recall, params=params, build_seconds=time.perf_counter() - start)

    # -- searching ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (q, k'), ids int64 (q, k')) best first, k' = min(k, ntotal)."""
        queries = _as_vectors(queries, self.dim, "queries")
        if k < 0:
            raise CNClipError(f"k must be >= 0, got {k}")
        q = queries.shape[0]
        kk = min(k, self.ntotal)
        if kk == 0 or q == 0:
            return np.empty((q, kk), dtype=np.float32), np.empty((q, kk), dtype=np.int64)
        if self._ondisk is not None:
            return self._ondisk.search(queries, kk)
        threads = 1 if q <= _SINGLE_THREAD_MAX_QUERIES else faiss.omp_get_max_threads()
        with _omp_threads(threads):
            scores, ids = self._index.search(queries, kk)
            # The visited IVF cells can hold fewer than k vectors (faiss pads with -1); those
            # rows are searched again over every cell, which always fills them.
            short = np.flatnonzero((ids < 0).any(axis=1))
            if short.size:
                s2, i2 = self._search_all_cells(queries[short], kk)
                scores[short], ids[short] = s2, i2
        return scores, ids

    def search_within(self, queries: np.ndarray, k: int, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the ids of `selection` only (a filtered search), like `search`; rows are
        padded with id -1 where fewer than k selected vectors exist.

        faiss skips the other ids while it scans, so no vector is read from the catalog and nothing
        is fetched twice. Exact for the exact kind. An IVF kind visits nprobe / (share selected)
        cells, up to all of them, so a filter finds as many candidates as an unfiltered search and
        keeps its recall; a short row is searched again over every cell. Not for the on-disk kind,
        whose caller filters candidates itself (`ondisk`)."""
        queries = _as_vectors(queries, self.dim, "queries")
        if self._ondisk is not None:
            raise CNClipError("search_within is not for the on-disk index; filter its candidates instead")
        q, kk = queries.shape[0], min(k, self.ntotal, len(selection))
        if kk <= 0 or q == 0:
            return np.empty((q, 0), dtype=np.float32), np.empty((q, 0), dtype=np.int64)
        index, selector = self._index, selection.selector
        threads = 1 if q <= _SINGLE_THREAD_MAX_QUERIES else faiss.omp_get_max_threads()
        with _omp_threads(threads):
            if not isinstance(index, faiss.IndexIVF):
                return index.search(queries, kk, params=faiss.SearchParameters(sel=selector))
            nprobe = filtered_nprobe(index.nprobe, len(selection) / max(1, self.ntotal), index.nlist)
            scores, ids = index.search(queries, kk, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))
            short = np.flatnonzero((ids < 0).any(axis=1))
            if short.size and nprobe < index.nlist:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nlist)
                scores[short], ids[short] = index.search(queries[short], kk, params=params)
        return scores, ids

    def _search_all_cells(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._index
        if not isinstance(index, faiss.IndexIVF):
            return index.search(queries, k)
        # Per-call parameters rather than setting index.nprobe: concurrent searches stay unaffected.
        return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=index.nlist))

    # -- updating ----------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids`; an id already in the index is replaced, not duplicated.

        An exact index stays exact however large it grows, and an IVF index keeps the cells it
        was trained with; see `needs_rebuild`.
        """
        if self._ondisk is not None:
            self._ondisk.add(ids, vectors)  # into its in-RAM delta; see cnclip.index.ondisk
            return
        vectors = _as_vectors(vectors, self.dim)
        ids = _as_ids(ids, vectors.shape[0])
        if ids.size == 0:
            return
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise CNClipError("ids must be unique; each catalog file id may appear once")
        self._own()
        if self.ntotal:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove the vectors with these ids (ids not in the index are ignored).

        Both kinds delete in place (IVF lists and the flat store support removal), so there are
        no tombstones and searches need no over-fetch. Each call scans the whole index, so
        batch deletions.
        """
        if self._ondisk is not None:
            self._ondisk.remove(ids)  # filtered out of its on-disk lists while searching
            return
        ids = _as_ids(ids)
        if ids.size == 0 or self.ntotal == 0:
            return
        self._own()
        removed = self._index.remove_ids(faiss.IDSelectorBatch(ids))
        log.debug("removed %d of %d requested ids", removed, ids.size)

    def ids(self) -> np.ndarray:
        """The ids the index holds, ascending int64 (what `Index.refresh` diffs against the catalog)."""
        if self._ondisk is not None:
            return self._ondisk.ids()
        index = self._index
        if isinstance(index, faiss.IndexIDMap):
            out = faiss.vector_to_array(index.id_map)
        else:
            lists = faiss.extract_index_ivf(index).invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(lists.nlist)
                if lists.list_size(i)
            ]
            out = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return np.sort(out.astype(np.int64, copy=False))

    def needs_rebuild(self, exact_threshold: int = EXACT_THRESHOLD, ntotal: int | None = None) -> bool:
        """Whether incremental adds/removes have left this index far from what `build` would make.

        True for an exact index that grew to twice the threshold, or an IVF index that shrank
        below half of it or grew to 4x its build size (its lists, and query time, grew 4x).
        `ntotal` asks the same question for a size the index would have after pending changes.
        """
        n = self.ntotal if ntotal is None else ntotal
        if self._ondisk is not None:
            return self._ondisk.needs_rebuild(n)
        if self.kind == "exact":
            return n >= 2 * exact_threshold
        built = int(self.params.get("built_ntotal") or n or 1)
        return n < exact_threshold // 2 or n > 4 * built

    def _add_batch(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if parts:
            self._index.add_with_ids(np.concatenate([v for _, v in parts]), np.concatenate([i for i, _ in parts]))

    def _own(self) -> None:
        # Called before any mutation: copy a memory-mapped index into owned memory.
        if self._mapped_from is None:
            return
        path, self._mapped_from = self._mapped_from, None
        log.debug("reading memory-mapped index %s into memory before modifying it", path)
        try:
            st = path.stat()
            unchanged = (st.st_ino, st.st_size, st.st_mtime_ns) == self._mapped_stat
        except OSError:
            unchanged = False
        if unchanged:
            # Re-reading the file it was mapped from needs no second copy in RAM ...
            index = faiss.read_index(str(path))
            if isinstance(index, faiss.IndexIVF):
                index.nprobe = self._index.nprobe
        else:
            # ... but once the file was replaced, only the mapped view itself is known to match.
            index = faiss.deserialize_index(faiss.serialize_index(self._index))
        self._index = index

    # -- persistence -------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write INDEX_FILE and META_FILE into `folder`, each via a temp file and an atomic rename.

        META_FILE records the index file's size and mtime, so a crash between the two renames
        (or any other mismatch) makes `load` treat the pair as stale instead of mixing them.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._ondisk is not None:
            ondisk = self._ondisk
            ondisk.meta, ondisk.recall_at_10, ondisk.build_seconds = self.meta, self.recall_at_10, self.build_seconds
            ondisk.save(folder)  # its own files, then META_FILE
            (folder / INDEX_FILE).unlink(missing_ok=True)  # another kind's, now stale
            return
        doc = self._meta_doc()
        try:
            json.dumps(doc)
        except (TypeError, ValueError) as exc:
            raise CNClipError(f"index meta is not JSON-serialisable: {exc}") from exc

        index_path = folder / INDEX_FILE
        write_faiss(self._index, index_path)
        faults.point("vectors.between_files")
        st = index_path.stat()
        doc["index_bytes"] = st.st_size
        doc["index_mtime_ns"] = st.st_mtime_ns
        atomic.write_json(folder / META_FILE, doc, sort_keys=True)
        from cnclip.index.ondisk import remove_files

        remove_files(folder)  # an on-disk index this one replaces

    def _meta_doc(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "metric": "inner_product",
            "recall_at_10": self.recall_at_10,
            "build_seconds": None if self.build_seconds is None else round(self.build_seconds, 3),
            "params": self.params,
            "meta": self.meta,
            "faiss_version": faiss.__version__,
        }

    @classmethod
    def load(cls, folder: str | os.PathLike[str], mmap: bool = True) -> VectorIndex | None:
        """The index saved in `folder`, or None if it is absent or unusable (logged as a warning).

        With `mmap` the vectors stay in the file and are paged in as searches touch them, so a
        one-shot search does not read the whole file; `add`/`remove` then copy it into memory.
        """
        folder = Path(folder)
        index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
        if not index_path.exists() and not meta_path.exists():
            return None
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"unsupported format {doc.get('format') if isinstance(doc, dict) else doc!r}")
            kind = doc["kind"]
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            if kind == ONDISK_KIND:
                from cnclip.index.ondisk import OnDiskIndex  # its lists are always memory-mapped

                return cls._of_ondisk(OnDiskIndex.load(folder))
            st = index_path.stat()
            if st.st_size != doc["index_bytes"] or st.st_mtime_ns != doc["index_mtime_ns"]:
                raise ValueError(f"{INDEX_FILE} does not match {META_FILE} (interrupted save?)")
            flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
            index = faiss.read_index(str(index_path), flags)
            expected = faiss.IndexIDMap if kind == "exact" else faiss.IndexIVF
            if not isinstance(index, expected):
                raise ValueError(f"{INDEX_FILE} holds a {type(index).__name__}, not a {kind} index")
            if index.d != doc["dim"] or index.ntotal != doc["ntotal"]:
                raise ValueError(f"{INDEX_FILE} has dim={index.d} ntotal={index.ntotal}, {META_FILE} disagrees")
            params = doc.get("params") or {}
            if isinstance(index, faiss.IndexIVF) and "nprobe" in params:
                index.nprobe = int(params["nprobe"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, MemoryError, CNClipError) as exc:
            log.warning("ignoring the vector index in %s (it will be rebuilt): %s", folder, exc)
            return None
        result = cls(
            index,
            kind,
            recall_at_10=doc.get("recall_at_10"),
            params=params,
            build_seconds=doc.get("build_seconds"),
            meta=doc.get("meta") or {},
        )
        if mmap:
            result._mapped_from = index_path
            result._mapped_stat = (st.st_ino, st.st_size, st.st_mtime_ns)
        return result

    def info(self) -> dict[str, Any]:
        """Summary for `cnclip info`: kind, ntotal, dim, recall_at_10, params, build_seconds."""
        return {
            "kind": self.kind,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "recall_at_10": self.recall_at_10,
            "params": dict(self.params),
            "build_seconds": self.build_seconds,
            "memory_mapped": self._mapped_from is not None or self._ondisk is not None,
        }
