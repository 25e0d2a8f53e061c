"""Training an on-disk index: the plan (every choice a build makes), pass 1's uniform sample, the quantizers.

The first pass over the input draws a uniform sample that trains the OPQ rotation, the coarse
quantizer and the product quantizer. Why a pass of its own: a catalog streams rows in insertion
(folder) order, so its first chunks are a biased sample (all of one trip's photos); drawing the
sample over the whole stream costs one sequential read, which at 10^8 rows is far cheaper than
training on the wrong distribution. The trained index is saved under a key of the plan and the
sample, so an interrupted build, run again, reuses it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from cnclip.errors import CNClipError
from cnclip.index.vectors.faiss_io import write_faiss
from cnclip.index.vectors.ondisk_files import digest
from cnclip.index.vectors.tuning import KMEANS_ITER, QUERY_NOISE, RECALL_QUERIES

__all__ = ["Plan", "draw_sample", "encode", "min_rows", "noisy_queries", "trained_index"]

log = logging.getLogger(__name__)

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
# Rows per faiss call when encoding.
_ENCODE_ROWS = 65_536


def min_rows(nbits: int = 8) -> int:
    """Fewest vectors an on-disk index can be built from (the PQ codebooks' training needs)."""
    return _MIN_PQ_POINTS_PER_CODE * (1 << nbits) + RECALL_QUERIES


# -- build plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
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
    ) -> Plan:
        """The plan for `n` vectors of `dim` dimensions; a CNClipError for options that cannot work."""
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
        nqueries = min(RECALL_QUERIES, n // 10)
        rows = n - nqueries  # the recall queries are held out of the training sample
        if nlist is None:
            # ~4 sqrt(n) rounded up to a power of two: 4,096 at 10^6, 65,536 at 10^8.
            nlist = 1 << max(0, math.ceil(math.log2(4 * math.sqrt(n))))
        nlist = max(1, min(nlist, rows // _TRAIN_PER_LIST))
        want = max(nlist * _TRAIN_PER_LIST, _PQ_TRAIN) if train_size is None else train_size
        ntrain = min(rows, want)
        if ntrain < min_rows(nbits) - RECALL_QUERIES:
            raise CNClipError(f"train_size={ntrain:,} is too small; PQ training needs {min_rows(nbits):,} vectors")
        hnsw = nlist >= _HNSW_NLIST if hnsw is None else hnsw
        return cls(dim, nlist, m, nbits, opq, hnsw, ntrain, nqueries, shard_rows, seed)


# -- pass 1: a uniform sample -------------------------------------------------------------------


def draw_sample(chunks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, size: int, total: int, seed: int):
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


def noisy_queries(vectors: np.ndarray, seed: int) -> np.ndarray:
    """Recall queries: `vectors` (indexed ones) plus a little noise, so a query is near a stored
    point but not on it (cosine ~0.96 to where it came from), as in the in-memory build."""
    rng = np.random.default_rng([seed, 1])
    out = vectors + rng.standard_normal(vectors.shape, dtype=np.float32) * np.float32(
        QUERY_NOISE / math.sqrt(vectors.shape[1])
    )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32)


# -- training -----------------------------------------------------------------------------------


def _train(plan: Plan, sample: np.ndarray) -> faiss.Index:
    """An empty, trained (OPQ+)IVF-PQ index over `plan.dim`-d vectors, inner-product metric."""
    dim = plan.dim
    metric = faiss.METRIC_INNER_PRODUCT
    coarse = faiss.IndexHNSWFlat(dim, _HNSW_M, metric) if plan.hnsw else faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(coarse, dim, plan.nlist, plan.m, plan.nbits, metric)
    ivf.cp.niter = KMEANS_ITER
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


def _rotate(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """`x` in the space the IVF part works in (after the OPQ rotation, if any)."""
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_VectorTransform(index.chain.at(0)).apply(x)
    return x


def encode(index: faiss.Index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell int64 (n,), PQ code uint8 (n, code_size)) of each row of `x`."""
    ivf = faiss.extract_index_ivf(index)
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


def trained_index(plan: Plan, sample: np.ndarray, work: Path) -> tuple[faiss.Index, str, bool]:
    """The trained, empty index for `plan` and its key; read back from `work` if trained before."""
    choices = {k: v for k, v in asdict(plan).items() if k != "shard_rows"}  # shards are cut after training
    key = digest(json.dumps(choices, sort_keys=True), sample)
    path = work / f"train-{key}.faiss"
    if path.exists():
        log.info("reusing trained quantizers %s", path.name)
        return faiss.read_index(str(path)), key, False
    log.info("training on %d vectors: nlist=%d PQ%dx%d opq=%s", len(sample), plan.nlist, plan.m, plan.nbits, plan.opq)
    index = _train(plan, sample)
    write_faiss(index, path)
    return index, key, True
