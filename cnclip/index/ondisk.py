"""On-disk (OPQ+)IVF-PQ: a vector index for collections whose vectors do not fit in RAM (issue 8).

The build reads a re-readable stream of (ids, vectors) chunks twice: the first pass draws a
uniform sample that trains the OPQ rotation, the coarse quantizer and the product quantizer;
the second encodes the rows shard by shard into files, which are then written out together as
one `.ivfdata` file of inverted lists. Searches memory-map that file, so RAM holds only the
quantizers, the id list's pages that are touched and the lists a query visits; the page cache
decides the rest. Layout of a folder (every name but META_FILE is content-addressed):

    vectors.json                 meta (kind, nlist, m, nbits, nprobe, recall, ...); written last
    ondisk-KEY.faiss             trained index + list offsets (faiss OnDiskInvertedLists header)
    ondisk-KEY.ivfdata           the inverted lists: per list, m-byte codes then int64 ids
    ondisk-KEY.ids.npy           every id in the lists, sorted (for `ids`, add/remove)
    ondisk-KEY.changes-D.npz     adds (PQ codes) and removals since the build, if any
    .ondisk-build/               training and shard files of an unfinished build (reused)

Why the first pass: a catalog streams rows in insertion (folder) order, so its first chunks are
a biased sample (all of one trip's photos); drawing the sample over the whole stream costs one
sequential read, which at 10^8 rows is far cheaper than training on the wrong distribution.
The files the passes produce are keyed by their content, so an interrupted build, run again,
reuses its trained quantizers and every finished shard. Nothing is loadable before META_FILE
is renamed into place at the very end.

Changes after the build do not touch the `.ivfdata` file (other processes may have it mapped):
added vectors are PQ-encoded into a small in-RAM delta index searched alongside, and removed
ids are filtered out of the on-disk lists during the scan (faiss IDSelector), so results never
need over-fetching. `needs_rebuild` says when the delta has grown too large.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cnclip import atomic, faults
from cnclip.errors import CNClipError, IndexNotFoundError
from cnclip.index.spool import default_spool_dir
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

__all__ = ["KIND", "RERANK_FACTOR", "SHARD_ROWS", "OnDiskIndex", "min_rows"]

log = logging.getLogger(__name__)

KIND = "ivf-pq-ondisk"
_FORMAT = 1
_PREFIX = "ondisk-"
_BUILD_DIR = ".ondisk-build"

# Rows encoded into one shard file. The shard's raw vectors are buffered before it is encoded
# (its key is a digest of them, so a rerun can skip it), which costs 4*dim bytes a row: 2 GB at
# 512-d. At 10^8 rows this makes 100 shards.
SHARD_ROWS = 1_000_000
# A reranker (exact vectors by id, e.g. from the catalog) rescores this many candidates per
# result: at 10^6 benchmark vectors 99.7 % of the true top-10 were among the PQ top-100.
RERANK_FACTOR = 10

# k-means needs >= 39 points per cell (faiss warns below); 40 keeps the sample small (5 GB of
# float32 at 65,536 cells x 512-d).
_TRAIN_PER_LIST = 40
# PQ and OPQ codebooks are trained on at most this many points (faiss's own cap: 256 per code).
_PQ_TRAIN = 65_536
_MIN_PQ_POINTS_PER_CODE = 39
# OPQ alternates PQ training and an SVD. On 100k benchmark vectors (PQ64, nlist 256, nprobe 32)
# recall@10 was 0.620 without OPQ, 0.756 after 8 rounds (13 s) and 0.779 after 16 rounds (26 s,
# on 16,384 points); faiss's defaults (50 rounds, 65,536 points) took minutes for a few points more.
_OPQ_TRAIN = 32_768
_OPQ_ITER = 16
_OPQ_FIRST_ITER = 10
# From this many cells on, the coarse quantizer is an HNSW graph over the centroids: on the build
# machine a flat scan of 65,536 512-d centroids took 9.5 ms per query, the graph 0.9 ms.
_HNSW_NLIST = 16_384
_HNSW_M = 32
# Rows per faiss call when encoding, and the size of one write when the lists are merged.
_ENCODE_ROWS = 65_536
_MERGE_BYTES = 64 << 20
# The delta index may grow to this fraction of the built size before a rebuild is advised.
_DELTA_FRACTION = 0.25
# faiss marks an empty result slot with id -1, so that id cannot be indexed.
_MISSING = -1

Chunks = Iterable[tuple[np.ndarray, np.ndarray]]
Source = Callable[[], Chunks] | Chunks
# Exact vectors for re-ranking: ids (n,) int64 -> float32 (n, dim) in the same order (NaN rows
# for ids it does not know, which are then dropped).
Reranker = Callable[[np.ndarray], np.ndarray]


def min_rows(nbits: int = 8) -> int:
    """Fewest vectors an on-disk index can be built from (the PQ codebooks' training needs)."""
    return _MIN_PQ_POINTS_PER_CODE * (1 << nbits) + _RECALL_QUERIES


# -- build plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Every choice a build makes; all but `shard_rows` are part of the trained quantizers' key."""

    dim: int
    nlist: int
    m: int
    nbits: int
    opq: bool
    hnsw: bool
    ntrain: int
    nqueries: int
    shard_rows: int
    seed: int

    @classmethod
    def resolve(
        cls,
        n: int,
        dim: int,
        *,
        nlist: int | None,
        m: int | None,
        nbits: int,
        opq: bool,
        hnsw: bool | None,
        train_size: int | None,
        shard_rows: int,
        seed: int,
    ) -> _Plan:
        if dim <= 0:
            raise CNClipError(f"vector dimension must be positive, got {dim}")
        if not 1 <= nbits <= 16:
            raise CNClipError(f"nbits must be between 1 and 16, got {nbits}")
        m = max(1, dim // 8) if m is None else m
        if m < 1 or dim % m:
            raise CNClipError(f"m={m} PQ sub-quantizers must divide the dimension {dim}; try {max(1, dim // 8)}")
        if nlist is not None and nlist < 1:
            raise CNClipError(f"nlist must be >= 1, got {nlist}")
        if shard_rows < 1:
            raise CNClipError(f"shard_rows must be >= 1, got {shard_rows}")
        if n < min_rows(nbits):
            raise CNClipError(
                f"an on-disk IVF-PQ index needs at least {min_rows(nbits):,} vectors to train its codebooks, "
                f"got {n:,}; use an exact index"
            )
        nqueries = min(_RECALL_QUERIES, n // 10)
        rows = n - nqueries  # the recall queries are held out of the training sample
        if nlist is None:
            # ~4 sqrt(n) rounded up to a power of two: 4,096 at 10^6, 65,536 at 10^8.
            nlist = 1 << max(0, math.ceil(math.log2(4 * math.sqrt(n))))
        nlist = max(1, min(nlist, rows // _TRAIN_PER_LIST))
        want = max(nlist * _TRAIN_PER_LIST, _PQ_TRAIN) if train_size is None else train_size
        ntrain = min(rows, want)
        if ntrain < min_rows(nbits) - _RECALL_QUERIES:
            raise CNClipError(f"train_size={ntrain:,} is too small; PQ training needs {min_rows(nbits):,} vectors")
        hnsw = nlist >= _HNSW_NLIST if hnsw is None else hnsw
        return cls(dim, nlist, m, nbits, opq, hnsw, ntrain, nqueries, shard_rows, seed)


# -- input --------------------------------------------------------------------------------------


def _as_source(chunks: Source) -> Callable[[], Chunks]:
    if callable(chunks):
        return chunks
    if iter(chunks) is chunks:
        raise CNClipError(
            "the on-disk build reads its input twice; pass a function returning a fresh iterator "
            "(e.g. catalog.file_vectors) or a list of (ids, vectors) chunks, not a one-shot iterator"
        )
    return lambda: iter(chunks)


def _validated(chunks: Chunks, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for chunk_ids, chunk_vectors in chunks:
        vectors = _as_vectors(chunk_vectors, dim)
        ids = _checked_ids(chunk_ids, vectors.shape[0])
        if ids.size:
            yield ids, vectors


def _checked_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = _as_ids(ids, n)
    if (ids == _MISSING).any():
        raise CNClipError(f"id {_MISSING} is reserved (faiss marks empty results with it); use another id")
    return ids


def _digest(*parts: bytes | np.ndarray | str) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif isinstance(part, np.ndarray):
            part = memoryview(np.ascontiguousarray(part)).cast("B")
        h.update(part)
    return h.hexdigest()


# -- pass 1: a uniform sample -------------------------------------------------------------------


def _sample(chunks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, size: int, total: int, seed: int):
    """(rows seen, up to `size` rows drawn uniformly without replacement, in key order).

    Every row gets a uniform random key from one seeded stream and the rows with the smallest
    keys form the sample, so it depends on the rows and their order, never on how they were cut
    into chunks. Rows below the current size-th smallest key wait in a small queue and replace
    worse rows in place, so RAM stays at ~1.25x the sample.
    """
    rng = np.random.default_rng(seed)
    rows = np.empty((size, dim), dtype=np.float32)
    keys = np.full(size, np.inf)  # an empty slot has key inf and loses to any row
    queue_keys: list[np.ndarray] = []
    queue_rows: list[np.ndarray] = []
    queued = 0
    threshold = np.inf
    n = 0
    for _, vectors in chunks:
        n += vectors.shape[0]
        if n > total:
            raise CNClipError(f"the source yielded more than total={total:,} rows; pass the true count")
        chunk_keys = rng.random(vectors.shape[0])
        keep = chunk_keys < threshold
        if keep.any():
            queue_keys.append(chunk_keys[keep])
            queue_rows.append(vectors[keep])
            queued += int(keep.sum())
        if queued >= max(1, size // 4):
            threshold = _admit(keys, rows, np.concatenate(queue_keys), np.concatenate(queue_rows))
            queue_keys, queue_rows, queued = [], [], 0
    if queued:
        _admit(keys, rows, np.concatenate(queue_keys), np.concatenate(queue_rows))
    order = np.argsort(keys, kind="stable")[: min(size, n)]
    return n, rows[order]


def _admit(keys: np.ndarray, rows: np.ndarray, new_keys: np.ndarray, new_rows: np.ndarray) -> float:
    """Keep the len(keys) smallest keys of both sets in `keys`/`rows`; returns the largest kept."""
    size = keys.shape[0]
    best = np.argpartition(np.concatenate([keys, new_keys]), size - 1)[:size]
    incoming = best[best >= size] - size
    freed = np.setdiff1d(np.arange(size), best[best < size], assume_unique=True)
    keys[freed] = new_keys[incoming]
    rows[freed] = new_rows[incoming]
    return float(keys.max())


def _noisy(vectors: np.ndarray, seed: int) -> np.ndarray:
    # As in VectorIndex: indexed vectors plus a little noise, so a query is near a stored point
    # but not on it (cosine ~0.96 to where it came from).
    rng = np.random.default_rng([seed, 1])
    out = vectors + rng.standard_normal(vectors.shape, dtype=np.float32) * np.float32(
        _QUERY_NOISE / math.sqrt(vectors.shape[1])
    )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32)


# -- training -----------------------------------------------------------------------------------


def _train(plan: _Plan, sample: np.ndarray) -> faiss.Index:
    """An empty, trained (OPQ+)IVF-PQ index over `plan.dim`-d vectors, inner-product metric."""
    dim = plan.dim
    metric = faiss.METRIC_INNER_PRODUCT
    coarse = faiss.IndexHNSWFlat(dim, _HNSW_M, metric) if plan.hnsw else faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(coarse, dim, plan.nlist, plan.m, plan.nbits, metric)
    ivf.cp.niter = _KMEANS_ITER
    ivf.cp.seed = plan.seed
    ivf.pq.cp.seed = plan.seed
    flat = None
    if plan.hnsw:
        # k-means assigns with a flat index; the graph is built once over the final centroids.
        flat = faiss.IndexFlatIP(dim)
        ivf.clustering_index = flat
    if plan.opq:
        opq = faiss.OPQMatrix(dim, plan.m)
        opq.niter, opq.niter_pq_0, opq.max_train_points = _OPQ_ITER, _OPQ_FIRST_ITER, _OPQ_TRAIN
        opq.train(sample[:_OPQ_TRAIN])
        ivf.train(opq.apply(sample))
        index = faiss.IndexPreTransform(opq, ivf)
    else:
        ivf.train(sample)
        index = ivf
    # A serialised copy owns all of its parts; the objects above are freed with this frame.
    trained = faiss.deserialize_index(faiss.serialize_index(index))
    del flat, coarse
    return trained


def _ivf(index: faiss.Index) -> faiss.IndexIVF:
    return faiss.extract_index_ivf(index)


def _rotate(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """`x` in the space the IVF part works in (after the OPQ rotation, if any)."""
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_VectorTransform(index.chain.at(0)).apply(x)
    return x


def _encode(index: faiss.Index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell int64 (n,), PQ code uint8 (n, code_size)) of each row of `x`."""
    ivf = _ivf(index)
    cells = np.empty(x.shape[0], dtype=np.int64)
    codes = np.empty((x.shape[0], ivf.code_size), dtype=np.uint8)
    for s in range(0, x.shape[0], _ENCODE_ROWS):
        xt = np.ascontiguousarray(_rotate(index, x[s : s + _ENCODE_ROWS]))
        _, assigned = ivf.quantizer.search(xt, 1)
        part = np.ascontiguousarray(assigned[:, 0])
        out = np.empty((xt.shape[0], ivf.code_size), dtype=np.uint8)
        ivf.encode_vectors(xt.shape[0], faiss.swig_ptr(xt), faiss.swig_ptr(part), faiss.swig_ptr(out), False)
        cells[s : s + xt.shape[0]] = part
        codes[s : s + xt.shape[0]] = out
    return cells, codes


# -- pass 2: shards -----------------------------------------------------------------------------


@dataclass
class _Shard:
    """One encoded shard on disk: per-cell sizes, and ids and codes sorted by cell."""

    path: Path

    def sizes(self) -> np.ndarray:
        return np.load(self.path / "sizes.npy")

    def ids(self) -> np.ndarray:
        return np.load(self.path / "ids.npy", mmap_mode="r")

    def codes(self) -> np.ndarray:
        return np.load(self.path / "codes.npy", mmap_mode="r")


def _sorted_by_cell(cells: np.ndarray, ids: np.ndarray, codes: np.ndarray, nlist: int):
    order = np.argsort(cells, kind="stable")
    return np.bincount(cells, minlength=nlist).astype(np.int64), ids[order], codes[order]


def _write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as .npy files into `folder`, published as a whole."""
    with atomic.replacing_folder(folder) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)


class _Filler:
    """Pass 2: cuts the stream into shards of exactly `shard_rows` rows and encodes each one.

    Exact cuts make a shard's content, and so its key, independent of the input's chunking.
    Alongside, it collects every id and the exact top-10 of the recall queries.
    """

    def __init__(self, index: faiss.Index, index_key: str, plan: _Plan, work: Path, total: int, queries: np.ndarray):
        self.index, self.index_key, self.plan, self.work = index, index_key, plan, work
        rows = min(plan.shard_rows, total)
        self.buf_ids = np.empty(rows, dtype=np.int64)
        self.buf_vectors = np.empty((rows, plan.dim), dtype=np.float32)
        self.fill = 0
        self.all_ids = np.empty(total, dtype=np.int64)
        self.n = 0
        self.total = total
        self.truth = _TopK(queries, 10)
        self.shards: list[_Shard] = []
        self.reused = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        m = ids.shape[0]
        if self.n + m > self.total:
            raise CNClipError(f"the source yielded more than total={self.total:,} rows; pass the true count")
        self.all_ids[self.n : self.n + m] = ids
        self.n += m
        self.truth.update(ids, vectors)
        start = 0
        while start < m:
            take = min(m - start, self.buf_ids.shape[0] - self.fill)
            self.buf_ids[self.fill : self.fill + take] = ids[start : start + take]
            self.buf_vectors[self.fill : self.fill + take] = vectors[start : start + take]
            self.fill += take
            start += take
            if self.fill == self.buf_ids.shape[0]:
                self.flush()

    def finish(self) -> np.ndarray:
        """Encode the last, partial shard; every id, sorted (checked unique)."""
        self.flush()
        if self.n == 0:
            raise CNClipError("there are no vectors to index (the second pass over the source was empty)")
        all_ids = np.sort(self.all_ids[: self.n])
        self.all_ids = self.buf_ids = self.buf_vectors = None
        if all_ids.size > 1 and (all_ids[1:] == all_ids[:-1]).any():
            raise CNClipError("ids must be unique; each catalog file id may appear once")
        return all_ids

    def flush(self) -> None:
        if self.fill == 0:
            return
        ids, vectors = self.buf_ids[: self.fill], self.buf_vectors[: self.fill]
        key = _digest(self.index_key, ids, vectors)
        path = self.work / f"shard-{key}"
        if path.is_dir():
            self.reused += 1
            log.info("shard %d: reusing %s (%d rows)", len(self.shards), path.name, self.fill)
        else:
            cells, codes = _encode(self.index, vectors)
            sizes, ids, codes = _sorted_by_cell(cells, ids, codes, self.plan.nlist)
            _write_arrays(path, {"sizes": sizes, "ids": ids, "codes": codes})
            log.info("shard %d: encoded %d rows into %s", len(self.shards), self.fill, path.name)
        self.shards.append(_Shard(path))
        self.fill = 0


class _TopK:
    """Running exact top-k (by inner product) of a few queries over a stream of chunks."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.empty((queries.shape[0], 0), dtype=np.float32)
        self.ids = np.empty((queries.shape[0], 0), dtype=np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.queries.shape[0] == 0:
            return
        if vectors.shape[0] > _ENCODE_ROWS:  # bound the (queries x rows) score matrix
            for s in range(0, vectors.shape[0], _ENCODE_ROWS):
                self.update(ids[s : s + _ENCODE_ROWS], vectors[s : s + _ENCODE_ROWS])
            return
        scores = self.queries @ vectors.T
        kk = min(self.k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        self.scores = np.concatenate([self.scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        self.ids = np.concatenate([self.ids, ids[top]], axis=1)
        if self.scores.shape[1] > self.k:
            keep = np.argpartition(-self.scores, self.k - 1, axis=1)[:, : self.k]
            self.scores = np.take_along_axis(self.scores, keep, axis=1)
            self.ids = np.take_along_axis(self.ids, keep, axis=1)


# -- merge --------------------------------------------------------------------------------------


def _merge(shards: list[_Shard], nlist: int, code_size: int, out: Path) -> np.ndarray:
    """Write the shards' lists as one OnDiskInvertedLists data file; returns the list sizes.

    The layout is faiss's (`OnDiskInvertedLists::set_all_lists_sizes`): list after list, each
    its codes then its int64 ids, with no spare capacity. Shards are read memory-mapped and the
    file is written sequentially in batches of whole lists, so RAM stays at ~2x _MERGE_BYTES.
    """
    sizes = np.stack([s.sizes() for s in shards]) if shards else np.zeros((0, nlist), dtype=np.int64)
    ids = [s.ids() for s in shards]
    codes = [s.codes() for s in shards]
    total = sizes.sum(axis=0)
    # starts[s, j]: first row of cell j in shard s; before[s, j]: rows of cell j in shards < s.
    starts = np.zeros((len(shards), nlist + 1), dtype=np.int64)
    np.cumsum(sizes, axis=1, out=starts[:, 1:])
    before = np.cumsum(sizes, axis=0) - sizes
    cum = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(total, out=cum[1:])
    entry = code_size + 8
    with atomic.replacing(out) as tmp, open(tmp, "wb") as f:
        j0 = 0
        while j0 < nlist:
            # As many whole lists as fit in the batch (at least one).
            j1 = max(j0 + 1, int(np.searchsorted(cum, cum[j0] + _MERGE_BYTES // entry, side="right")) - 1)
            j1 = min(j1, nlist)
            _write_lists(f, j0, j1, sizes, starts, before, cum, ids, codes, code_size)
            j0 = j1
    return total


def _write_lists(f, j0, j1, sizes, starts, before, cum, ids, codes, code_size) -> None:
    n = int(cum[j1] - cum[j0])
    batch_codes = np.empty((n, code_size), dtype=np.uint8)
    batch_ids = np.empty(n, dtype=np.int64)
    cells = np.arange(j0, j1)
    for s in range(sizes.shape[0]):
        a, b = int(starts[s, j0]), int(starts[s, j1])
        if a == b:
            continue
        cell = np.repeat(cells, sizes[s, j0:j1])
        rank = np.arange(b - a) - (starts[s, cell] - a)
        dest = cum[cell] - cum[j0] + before[s, cell] + rank
        batch_codes[dest] = codes[s][a:b]
        batch_ids[dest] = ids[s][a:b]
    for j in range(j0, j1):
        lo, hi = int(cum[j] - cum[j0]), int(cum[j + 1] - cum[j0])
        if hi > lo:
            f.write(batch_codes[lo:hi])
            f.write(batch_ids[lo:hi])


def _write_header(index: faiss.Index, sizes: np.ndarray, lists_name: str, lists_bytes: int, path: Path) -> None:
    """Write `index` (trained, empty) as the header of an on-disk index over `lists_name`."""
    ivf = _ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, lists_name)
    sizes64 = np.ascontiguousarray(sizes, dtype=np.uint64)
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes64))
    lists.totsize = lists_bytes
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.ntotal = index.ntotal = int(sizes.sum())
    write_faiss(index, path)


def _write_files(folder: Path, key: str, index: faiss.Index, shards: list[_Shard], ids: np.ndarray) -> dict[str, str]:
    """Merge the shards into the lists file, then write the sorted ids and the header.

    The names are derived from `key` (the trained index and the shards' contents), so files a
    finished build already wrote for the same rows are reused as they are.
    """
    stem = f"{_PREFIX}{key}"
    names = {"header": f"{stem}.faiss", "lists": f"{stem}.ivfdata", "ids": f"{stem}.ids.npy"}
    if not all((folder / name).exists() for name in names.values()):
        ivf = _ivf(index)
        lists = folder / names["lists"]
        sizes = _merge(shards, ivf.nlist, ivf.code_size, lists)
        with atomic.replacing(folder / names["ids"], ".npy") as tmp:
            np.save(tmp, ids)
        _write_header(index, sizes, names["lists"], lists.stat().st_size, folder / names["header"])
    return names


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():  # names are content digests: an existing file is the same file
        return
    with atomic.replacing(dst) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another file system
            shutil.copyfile(src, tmp)


# -- the index ----------------------------------------------------------------------------------


class OnDiskIndex:
    """(OPQ+)IVF-PQ with memory-mapped inverted lists; ids int64, scores are inner products.

    Scores are PQ approximations of the cosine unless a `reranker` is set, in which case the
    top `rerank_factor * k` candidates are rescored with the exact vectors it returns.
    """

    def __init__(self, folder: Path, doc: dict[str, Any], base: faiss.Index, base_ids: np.ndarray) -> None:
        """Use `build` or `load`."""
        self.folder = folder
        self._doc = doc
        self._base = base
        self._base_ids = base_ids  # sorted, memory-mapped
        self.params: dict[str, Any] = doc["params"]
        self.recall_at_10: float | None = doc.get("recall_at_10")
        self.build_seconds: float | None = doc.get("build_seconds")
        self.meta: dict[str, Any] = dict(doc.get("meta") or {})
        self.nprobe = int(self.params["nprobe"])
        self.reranker: Reranker | None = None
        self.rerank_factor = int(self.params.get("rerank_factor") or RERANK_FACTOR)
        self._removed = np.empty(0, dtype=np.int64)  # base ids filtered out of every search
        self._not_removed: faiss.IDSelector | None = None
        self._delta: faiss.Index | None = None  # added since the build, PQ-encoded in RAM
        self._delta_ids = np.empty(0, dtype=np.int64)
        self._cleanup: weakref.finalize | None = None

    # -- properties ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._base.d)

    @property
    def nlist(self) -> int:
        """Number of IVF cells."""
        return int(_ivf(self._base).nlist)

    @property
    def ntotal(self) -> int:
        """Vectors searchable now: built, minus removed, plus added."""
        return int(self._base.ntotal) - int(self._removed.size) + int(self._delta_ids.size)

    @property
    def pending_changes(self) -> int:
        """Rows added or removed since the build (what `needs_rebuild` weighs)."""
        return int(self._removed.size + self._delta_ids.size)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"OnDiskIndex({str(self.folder)!r}, dim={self.dim}, ntotal={self.ntotal}, nlist={self.nlist})"

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        chunks: Source,
        folder: str | os.PathLike[str] | None,
        *,
        total: int,
        dim: int,
        nlist: int | None = None,
        m: int | None = None,
        nbits: int = 8,
        opq: bool = True,
        hnsw: bool | None = None,
        train_size: int | None = None,
        shard_rows: int = SHARD_ROWS,
        seed: int = 0,
        target_recall: float = TARGET_RECALL,
        rerank_factor: int = RERANK_FACTOR,
    ) -> OnDiskIndex:
        """Build from (ids int64 (n,), vectors float32 (n, dim)) chunks holding at most `total` rows.

        `chunks` is read twice (sample, then fill), so it must be a function returning a fresh
        iterator (e.g. `catalog.file_vectors`) or a list. The index is written into `folder`
        (default: a temporary folder removed with the object; `save` copies it elsewhere) and is
        loadable only once complete. `nlist` (IVF cells) defaults to ~4 sqrt(n), `m` (PQ bytes
        per vector at nbits=8) to dim/8, `hnsw` (graph coarse quantizer) to nlist >= 16,384.
        nprobe is doubled from 8 until the top `rerank_factor`*10 PQ candidates hold
        `target_recall` of the exact top-10 on held-out samples, then once more; recall@10
        with and without re-ranking is measured and recorded.
        """
        start = time.perf_counter()
        source = _as_source(chunks)
        if total <= 0:
            raise CNClipError("there are no vectors to index" if total == 0 else f"total must be >= 0, got {total}")
        if rerank_factor < 1:
            raise CNClipError(f"rerank_factor must be >= 1, got {rerank_factor}")
        options = dict(nlist=nlist, m=m, nbits=nbits, opq=opq, hnsw=hnsw, train_size=train_size)
        options.update(dim=dim, shard_rows=shard_rows, seed=seed)
        _Plan.resolve(total, **options)  # bad options fail before anything is read or written
        owned = folder is None
        folder = Path(tempfile.mkdtemp(prefix="cnclip-ondisk-", dir=default_spool_dir()) if owned else folder)
        try:
            result = cls._build_into(folder, source, total, options, target_recall, rerank_factor)
        except BaseException:
            if owned:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        result.build_seconds = time.perf_counter() - start
        result.save(folder)
        shutil.rmtree(folder / _BUILD_DIR, ignore_errors=True)
        if owned:
            result._cleanup = weakref.finalize(result, shutil.rmtree, str(folder), True)
        return result

    @classmethod
    def _build_into(
        cls, folder: Path, source: Callable[[], Chunks], total: int, options: dict, target: float, rerank_factor: int
    ) -> OnDiskIndex:
        """Both passes and the merge; returns the index, its nprobe chosen, not yet saved."""
        work = folder / _BUILD_DIR
        work.mkdir(parents=True, exist_ok=True)
        for stale in [*work.glob(".*.tmp*"), *folder.glob(f".{_PREFIX}*.tmp*")]:  # from a killed build
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        dim, seed = options["dim"], options["seed"]
        timings: dict[str, float] = {}

        t = time.perf_counter()
        plan = _Plan.resolve(total, **options)
        n, sample = _sample(_validated(source(), dim), dim, plan.ntrain + plan.nqueries, total, seed)
        if n == 0:
            raise CNClipError("there are no vectors to index")
        if n < total:
            plan = _Plan.resolve(n, **options)
        queries = _noisy(sample[plan.ntrain : plan.ntrain + plan.nqueries], seed)
        sample = sample[: plan.ntrain]
        timings["sample_s"] = time.perf_counter() - t

        t = time.perf_counter()
        index, index_key, trained_now = _trained(plan, sample, work)
        del sample
        timings["train_s"] = time.perf_counter() - t

        t = time.perf_counter()
        filler = _Filler(index, index_key, plan, work, total, queries)
        for ids, vectors in _validated(source(), dim):
            filler.add(ids, vectors)
        all_ids = filler.finish()
        timings["fill_s"] = time.perf_counter() - t

        t = time.perf_counter()
        key = _digest(index_key, *[shard.path.name for shard in filler.shards])
        names = _write_files(folder, key, index, filler.shards, all_ids)
        timings["merge_s"] = time.perf_counter() - t

        params: dict[str, Any] = {
            **{k: v for k, v in asdict(plan).items() if k != "dim"},
            "code_size": int(_ivf(index).code_size),
            "built_ntotal": int(all_ids.size),
            "shards": len(filler.shards),
            "shards_reused": filler.reused,
            "trained_reused": not trained_now,
            "rerank_factor": rerank_factor,
            "target_recall": target,
            "nprobe": min(plan.nlist, _MIN_NPROBE),
            "key": key,
        }
        result = cls._open(folder, {"kind": KIND, "params": params, "files": {**names, "changes": None}})
        t = time.perf_counter()
        result._choose_nprobe(queries, filler.truth.ids, target)
        timings["recall_s"] = time.perf_counter() - t
        params.update({k: round(v, 3) for k, v in timings.items()})
        return result

    def _choose_nprobe(self, queries: np.ndarray, truth: np.ndarray, target: float) -> None:
        """Double nprobe until the PQ candidates hold `target` of the exact top-10, then once more.

        The candidates (the top `rerank_factor`*10) are what exact re-ranking sorts, so this is
        the recall@10 a reranked search gets; without re-ranking the PQ codes' own error caps
        recall (0.75 at PQ64 on the 10^6 benchmark) and more cells do not raise it. The extra
        doubling is margin: real text queries sit further from the image vectors than the noisy
        image vectors measured here. Each step costs one search of the queries (~0.1 s at 10^6).
        """
        params = self.params
        fetch = min(10 * self.rerank_factor, self.ntotal)
        nprobe = min(self.nlist, _MIN_NPROBE)
        while True:
            _, found = self._candidates(queries, fetch, nprobe)
            recall, low = _recall(found[:, :10], truth)
            reranked, reranked_low = _recall(found, truth)
            log.debug("nprobe=%d: recall@10 %.4f, re-ranked %.4f (>= %.4f)", nprobe, recall, reranked, reranked_low)
            if reranked_low >= target or nprobe >= self.nlist:
                break
            nprobe = min(self.nlist, nprobe * 2)
        if nprobe < self.nlist:
            nprobe = min(self.nlist, nprobe * 2)
            _, found = self._candidates(queries, fetch, nprobe)
            (recall, low), (reranked, reranked_low) = _recall(found[:, :10], truth), _recall(found, truth)
        if reranked_low < target:
            log.warning(
                "on-disk index: the top-%d PQ candidates hold only %.3f of the exact top-10 at nprobe=%d",
                fetch,
                reranked,
                nprobe,
            )
        log.info("on-disk index: nprobe=%d, recall@10 %.3f (%.3f with exact re-ranking)", nprobe, recall, reranked)
        self.nprobe = nprobe
        with _omp_threads(1):
            times = []
            for q in queries[:20]:
                t = time.perf_counter()
                self._candidates(q[None, :], 10, nprobe)
                times.append(time.perf_counter() - t)
        self.recall_at_10 = recall
        params.update(
            nprobe=nprobe,
            recall_queries=int(queries.shape[0]),
            recall_at_10_low=round(low, 4),
            recall_at_10_reranked=round(reranked, 4),
            recall_at_10_reranked_low=round(reranked_low, 4),
            search_ms_p50=round(float(np.median(times)) * 1e3, 3) if times else None,
        )

    # -- loading and saving ----------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> OnDiskIndex:
        """Open the index saved in `folder`, its lists memory-mapped read-only."""
        folder = Path(folder)
        try:
            doc = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexNotFoundError(f"{folder} holds no vector index ({META_FILE} is missing)") from None
        except (OSError, ValueError) as exc:
            raise CNClipError(f"cannot read {folder / META_FILE}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("format") != _FORMAT:
            raise CNClipError(f"{folder / META_FILE} does not describe an on-disk index (format {_FORMAT})")
        return cls._open(folder, doc)

    @classmethod
    def _open(cls, folder: Path, doc: dict[str, Any]) -> OnDiskIndex:
        try:
            files = doc["files"]
            header = folder / files["header"]
            lists_path = folder / files["lists"]
            base = faiss.read_index(str(header), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
            ivf = _ivf(base)
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            if not isinstance(lists, faiss.OnDiskInvertedLists):
                raise ValueError(f"{header.name} holds no on-disk inverted lists")
            size = lists_path.stat().st_size
            if size != lists.totsize:
                raise ValueError(f"{lists_path.name} has {size} bytes, the header expects {lists.totsize}")
            # The header names the data file as it was at build time; the folder may have moved.
            lists.filename = str(lists_path)
            lists.read_only = True
            lists.prefetch_nthread = 0  # a prefetch thread per list costs more than it saves in page cache
            lists.do_mmap()
            base_ids = np.load(folder / files["ids"], mmap_mode="r")
            if base_ids.shape != (base.ntotal,):
                raise ValueError(f"{files['ids']} holds {base_ids.shape[0]} ids for {base.ntotal} vectors")
            result = cls(folder, doc, base, base_ids)
            if files.get("changes"):
                result._load_changes(folder / files["changes"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CNClipError(f"the on-disk index in {folder} is unusable: {exc}") from exc
        return result

    def save(self, folder: str | os.PathLike[str] | None = None) -> None:
        """Write the meta (and pending adds/removals) into `folder` (default: where it lives).

        Into another folder the built files are hard-linked (or copied) first. META_FILE is
        replaced last and atomically, then files no longer referenced are deleted.
        """
        folder = Path(folder) if folder is not None else self.folder
        folder.mkdir(parents=True, exist_ok=True)
        files = dict(self._doc["files"])
        if folder.resolve() != self.folder.resolve():
            for name in (files["header"], files["lists"], files["ids"]):
                _link_or_copy(self.folder / name, folder / name)
        files["changes"] = self._save_changes(folder, files["header"].removesuffix(".faiss"))
        doc = {
            "format": _FORMAT,
            "kind": KIND,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "metric": "inner_product",
            "recall_at_10": self.recall_at_10,
            "build_seconds": None if self.build_seconds is None else round(self.build_seconds, 3),
            "params": {**self.params, "nprobe": self.nprobe},
            "meta": self.meta,
            "faiss_version": faiss.__version__,
            "files": files,
            "lists_bytes": (folder / files["lists"]).stat().st_size,
        }
        try:
            text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as exc:
            raise CNClipError(f"index meta is not JSON-serialisable: {exc}") from exc
        faults.point("ondisk.before_meta")
        atomic.write_text(folder / META_FILE, text)
        self._doc = doc
        self.folder = folder
        remove_files(folder, keep={v for v in files.values() if v})

    def _save_changes(self, folder: Path, stem: str) -> str | None:
        if not self.pending_changes:
            return None
        sizes, ids, codes = self._delta_arrays()
        digest = _digest(self._removed, sizes, ids, codes)
        name = f"{stem}.changes-{digest}.npz"
        if not (folder / name).exists():
            with atomic.replacing(folder / name, ".npz") as tmp:
                np.savez(tmp, removed=self._removed, sizes=sizes, ids=ids, codes=codes)
        return name

    def _delta_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        code_size = _ivf(self._base).code_size
        sizes = np.zeros(self.nlist, dtype=np.int64)
        ids: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        if self._delta is not None:
            lists = _ivf(self._delta).invlists
            for j in range(self.nlist):
                size = lists.list_size(j)
                if size:
                    sizes[j] = size
                    ids.append(faiss.rev_swig_ptr(lists.get_ids(j), size).copy())
                    codes.append(faiss.rev_swig_ptr(lists.get_codes(j), size * code_size).copy())
        flat_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        flat_codes = np.concatenate(codes) if codes else np.empty(0, dtype=np.uint8)
        return sizes, flat_ids, flat_codes.reshape(-1, code_size)

    def _load_changes(self, path: Path) -> None:
        with np.load(path) as z:
            removed, sizes, ids, codes = z["removed"], z["sizes"], z["ids"], z["codes"]
        self._removed = np.sort(removed.astype(np.int64))
        self._not_removed = None
        if ids.size:
            lists = _ivf(self._delta_index()).invlists
            starts = np.concatenate([[0], np.cumsum(sizes)])
            for j in np.flatnonzero(sizes):
                a, b = int(starts[j]), int(starts[j + 1])
                part_ids = np.ascontiguousarray(ids[a:b], dtype=np.int64)
                part_codes = np.ascontiguousarray(codes[a:b])
                lists.add_entries(int(j), b - a, faiss.swig_ptr(part_ids), faiss.swig_ptr(part_codes))
            delta = self._delta
            _ivf(delta).ntotal = delta.ntotal = int(ids.size)
        self._delta_ids = np.sort(ids.astype(np.int64))

    # -- searching -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (q, k'), ids int64 (q, k')) best first, k' = min(k, ntotal)."""
        queries = _as_vectors(queries, self.dim, "queries")
        if k < 1:
            raise CNClipError(f"k must be >= 1, got {k}")
        nprobe = self.nprobe if nprobe is None else nprobe
        if not 1 <= nprobe <= self.nlist:
            raise CNClipError(f"nprobe must be between 1 and nlist={self.nlist}, got {nprobe}")
        q = queries.shape[0]
        kk = min(k, self.ntotal)
        if kk == 0 or q == 0:
            return np.empty((q, kk), dtype=np.float32), np.empty((q, kk), dtype=np.int64)
        fetch = min(kk * self.rerank_factor, self.ntotal) if self.reranker is not None else kk
        with _omp_threads(1 if q <= _SINGLE_THREAD_MAX_QUERIES else faiss.omp_get_max_threads()):
            scores, ids = self._candidates(queries, fetch, nprobe)
            # The visited cells can hold fewer than `fetch` vectors: widen those queries' search.
            probe = nprobe
            while probe < self.nlist and (short := np.flatnonzero((ids == _MISSING).any(axis=1))).size:
                probe = min(self.nlist, probe * 4)
                scores[short], ids[short] = self._candidates(queries[short], fetch, probe)
        if self.reranker is not None:
            return self._rerank(queries, ids, kk)
        return scores[:, :kk], ids[:, :kk]

    def _candidates(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ top-k over the on-disk lists (removed ids skipped) and the in-RAM delta, merged."""
        if self._removed.size and self._not_removed is None:
            self._not_removed = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._removed))
        scores, ids = self._base.search(queries, k, params=self._search_params(self._base, nprobe, self._not_removed))
        if self._delta is not None and self._delta.ntotal:
            s2, i2 = self._delta.search(queries, k, params=self._search_params(self._delta, nprobe, None))
            scores, ids = np.concatenate([scores, s2], axis=1), np.concatenate([ids, i2], axis=1)
            scores[ids == _MISSING] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
        return scores, ids

    def _search_params(self, index: faiss.Index, nprobe: int, sel: faiss.IDSelector | None) -> faiss.SearchParameters:
        # faiss's SearchParameters keep references to what is assigned to them.
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if sel is not None:
            params.sel = sel
        if isinstance(faiss.downcast_index(_ivf(index).quantizer), faiss.IndexHNSW):
            params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
        if isinstance(index, faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=params)
        return params

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = ids != _MISSING
        unique, inverse = np.unique(ids[valid], return_inverse=True)
        vectors = np.asarray(self.reranker(unique), dtype=np.float32)
        if vectors.shape != (unique.size, self.dim):
            raise CNClipError(
                f"the reranker returned shape {vectors.shape} for {unique.size} ids, not ({unique.size}, {self.dim})"
            )
        exact = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows = np.nonzero(valid)[0]
        exact[valid] = np.einsum("ij,ij->i", queries[rows], vectors[inverse])
        exact[~np.isfinite(exact)] = -np.inf  # an id the reranker no longer knows
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores, found = np.take_along_axis(exact, order, axis=1), np.take_along_axis(ids, order, axis=1)
        found[~np.isfinite(scores)] = _MISSING
        return scores, found

    # -- updating --------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids` to the in-RAM delta; an id already indexed is replaced."""
        vectors = _as_vectors(vectors, self.dim)
        ids = _checked_ids(ids, vectors.shape[0])
        if ids.size == 0:
            return
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise CNClipError("ids must be unique; each catalog file id may appear once")
        self.remove(ids)
        delta = self._delta_index()
        delta.add_with_ids(vectors, ids)
        self._delta_ids = np.union1d(self._delta_ids, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove these ids (unknown ids are ignored): filtered from the lists, dropped from the delta."""
        ids = np.unique(_as_ids(ids))
        if ids.size == 0:
            return
        pos = np.searchsorted(self._base_ids, ids)
        pos[pos >= self._base_ids.shape[0]] = 0
        in_base = ids[self._base_ids[pos] == ids] if self._base_ids.shape[0] else ids[:0]
        new = np.setdiff1d(in_base, self._removed, assume_unique=True)
        if new.size:
            self._removed = np.union1d(self._removed, new)
            self._not_removed = None
        in_delta = np.intersect1d(ids, self._delta_ids, assume_unique=True)
        if in_delta.size:
            self._delta.remove_ids(faiss.IDSelectorBatch(in_delta))
            self._delta_ids = np.setdiff1d(self._delta_ids, in_delta, assume_unique=True)

    def ids(self) -> np.ndarray:
        """The ids the index holds, ascending int64."""
        base = np.setdiff1d(self._base_ids, self._removed, assume_unique=True)
        return np.union1d(base, self._delta_ids) if self._delta_ids.size else base

    def needs_rebuild(self, ntotal: int | None = None) -> bool:
        """True once adds and removals pass a quarter of the built size, or the size left it far."""
        built = int(self.params.get("built_ntotal") or self._base.ntotal or 1)
        n = self.ntotal if ntotal is None else ntotal
        return self.pending_changes > _DELTA_FRACTION * built or not built / 2 <= n <= (1 + _DELTA_FRACTION) * built

    def _delta_index(self) -> faiss.Index:
        if self._delta is None:
            # A second copy of the (small) header: same quantizers, lists in RAM.
            delta = faiss.read_index(
                str(self.folder / self._doc["files"]["header"]), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
            )
            ivf = _ivf(delta)
            lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            ivf.replace_invlists(lists, True)
            lists.this.disown()
            ivf.ntotal = delta.ntotal = 0
            self._delta = delta
        return self._delta

    def info(self) -> dict[str, Any]:
        """Summary: kind, ntotal, dim, recall, params, files and what is pending."""
        return {
            "kind": KIND,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "recall_at_10": self.recall_at_10,
            "params": {**self.params, "nprobe": self.nprobe},
            "build_seconds": self.build_seconds,
            "folder": str(self.folder),
            "pending_changes": self.pending_changes,
            "reranker": self.reranker is not None,
        }


def _trained(plan: _Plan, sample: np.ndarray, work: Path) -> tuple[faiss.Index, str, bool]:
    """The trained, empty index for `plan` and its key; read back from `work` if trained before."""
    choices = {k: v for k, v in asdict(plan).items() if k != "shard_rows"}  # shards are cut after training
    key = _digest(json.dumps(choices, sort_keys=True), sample)
    path = work / f"train-{key}.faiss"
    if path.exists():
        log.info("reusing trained quantizers %s", path.name)
        return faiss.read_index(str(path)), key, False
    log.info("training on %d vectors: nlist=%d PQ%dx%d opq=%s", len(sample), plan.nlist, plan.m, plan.nbits, plan.opq)
    index = _train(plan, sample)
    write_faiss(index, path)
    return index, key, True


def remove_files(folder: str | os.PathLike[str], keep: Iterable[str] = ()) -> None:
    """Delete the on-disk index files in `folder` other than `keep`.

    An unfinished build's folder stays: running that build again resumes from it.
    """
    keep = set(keep)
    for path in Path(folder).glob(f"{_PREFIX}*"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
