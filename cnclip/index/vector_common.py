"""What the in-RAM and the on-disk vector indexes share: input checks, thread control, recall measurement."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cnclip import atomic
from cnclip.errors import CNClipError, ModelMismatchError

META_FILE = "vectors.json"
# Recall@10 against exact search that an ANN build must measure before it settles on nprobe.
TARGET_RECALL: float = 0.95

# k-means iterations when training coarse quantizers (see vectors.py for the measurements)
_KMEANS_ITER = 10
# the smallest nprobe a build starts from
_MIN_NPROBE = 8
_RECALL_QUERIES = 200
# Norm of the isotropic noise added to sampled vectors to make recall queries: each query
# keeps cosine ~0.96 with the point it came from, so its neighbours are shuffled a little
# instead of the stored point being a trivial first hit.
_QUERY_NOISE = 0.3
# Batches of at most this many queries run on one thread: a single query is a memory-bound
# scan that the second core only slows down (exact 100k: 8.4 ms on 1 thread, 10.8 ms on 2).
_SINGLE_THREAD_MAX_QUERIES = 4


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    # OpenMP keeps the thread count per calling thread (libgomp allocates a thread-local
    # setting on the first omp_set_num_threads), so this cannot slow a faiss job running in
    # another Python thread.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_ids(ids: Any, n: int | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(ids), dtype=np.int64).reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise CNClipError(f"got {arr.shape[0]} ids for {n} vectors; pass one id per vector")
    return arr


def _as_vectors(vectors: Any, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise CNClipError(f"{what} must be a 2-d array (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ModelMismatchError(
            f"{what} have dimension {arr.shape[1]} but the index holds {dim}-d vectors; rebuild it for this model"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # A row sum is NaN/inf iff some element is (normalised vectors cannot overflow it), and is
    # far cheaper in memory than np.isfinite over the whole matrix.
    if arr.size and not np.isfinite(arr.sum(axis=1, dtype=np.float64)).all():
        raise CNClipError(f"{what} contain NaN or infinite values")
    return arr


def _recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean recall of `found` against `truth` rows, and that mean minus two standard errors."""
    if truth.size == 0:
        return 1.0, 1.0
    per_query = np.array([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)])
    mean = float(per_query.mean())
    return mean, mean - 2.0 * float(per_query.std()) / math.sqrt(len(per_query))


def write_faiss(index: faiss.Index, path: Path) -> None:
    """Publish a faiss index as `path` (cnclip.atomic); a failure is one CNClipError, never a traceback.

    faiss reports a full disk or a read-only folder as a RuntimeError with a C++ backtrace."""
    try:
        with atomic.replacing(path) as tmp:
            faiss.write_index(index, str(tmp))
    except (OSError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CNClipError(
            f"cannot write the vector index {path}: {first}; check free disk space and permissions"
        ) from e
