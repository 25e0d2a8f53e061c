"""Input checks every vector index kind applies: ids and vectors as the arrays faiss takes, or one-line errors."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnclip.errors import CNClipError, ModelMismatchError

# faiss marks an empty result slot with this id.
MISSING = -1


def as_ids(ids: Any, n: int | None = None) -> np.ndarray:
    """`ids` as a contiguous int64 vector; with `n`, checked to hold one id per vector."""
    arr = np.ascontiguousarray(np.asarray(ids), dtype=np.int64).reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise CNClipError(f"got {arr.shape[0]} ids for {n} vectors; pass one id per vector")
    return arr


def as_vectors(vectors: Any, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """`vectors` as a contiguous float32 (n, dim) array of finite values; one row may be given as (dim,)."""
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
