"""`VectorStore`: what every kind of vector index answers, so that no caller needs to know the kind.

The kinds (cnclip.index.vectors.memory: exact, IVF-Flat, IVF-SQ8 in RAM; cnclip.index.vectors.ondisk:
OPQ+IVF-PQ memory-mapped from disk) search, change and save the same way; `VectorIndex` in
cnclip.index.vectors.factory builds or loads the right one. Ids are int64 catalog ids, vectors
L2-normalised float32 and scores inner products (= cosine similarities).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from cnclip.index.vectors.inputs import as_ids
from cnclip.index.vectors.kinds import EXACT_THRESHOLD

# Exact vectors by id: ids (n,) int64 -> float32 (n, dim) in the same order, NaN rows for ids it
# does not know (e.g. `Catalog.vectors_for_ids`).
Reranker = Callable[[np.ndarray], np.ndarray]


class Selection:
    """The ids a filtered search may return (`VectorStore.search_within`). Its faiss form (a hash
    set behind a Bloom filter: ~60 ms to build for 8*10^5 ids) is built once, on first use, and
    serves every search given the same selection."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = as_ids(ids)
        self._selector: faiss.IDSelector | None = None

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def selector(self) -> faiss.IDSelector:
        # Not IDSelectorBitmap: it reads past its end for ids above the bitmap's size.
        if self._selector is None:
            self._selector = faiss.IDSelectorBatch(self.ids)
        return self._selector


class VectorStore(ABC):
    """Inner-product search over L2-normalised float32 vectors keyed by int64 catalog ids.

    Every kind carries `kind` (one of cnclip.index.vectors.KINDS), `meta` (the caller's, saved
    with the index), `params` (what the build chose), `recall_at_10` (measured at build; None
    for exact search) and `build_seconds`.
    """

    kind: str
    meta: dict[str, Any]
    params: dict[str, Any]
    recall_at_10: float | None
    build_seconds: float | None

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector dimension."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of vectors a search can return now."""

    @property
    @abstractmethod
    def memory_mapped(self) -> bool:
        """Whether the vectors are paged in from the index file rather than held in memory."""

    def __len__(self) -> int:
        return self.ntotal

    # -- searching -------------------------------------------------------------------------------

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (q, k'), ids int64 (q, k')) best first, k' = min(k, ntotal)."""

    @abstractmethod
    def search_within(self, queries: np.ndarray, k: int, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the ids of `selection` only (a filtered search), like `search`; rows are
        padded with id -1 where fewer than k selected vectors were found."""

    @abstractmethod
    def set_reranker(self, reranker: Reranker | None) -> None:
        """Where to read exact vectors by id. A kind that stores only approximate codes rescores
        its candidates with them (and scans small filtered selections directly); the kinds that
        hold the exact vectors themselves ignore it."""

    # -- updating --------------------------------------------------------------------------------

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (n, dim) under `ids` (n,); an id already in the index is replaced, not duplicated."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Remove the vectors with these ids (ids not in the index are ignored)."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """The ids the index holds, ascending int64 (what `Index.refresh` diffs against the catalog)."""

    @abstractmethod
    def needs_rebuild(self, *, ntotal: int | None = None, exact_threshold: int = EXACT_THRESHOLD) -> bool:
        """Whether adds and removes have left this index far from what a fresh build would make.
        `ntotal` asks the same for the size the index would have after pending changes."""

    # -- persistence -----------------------------------------------------------------------------

    @abstractmethod
    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the index into `folder`, its meta file (META_FILE) last and atomically, and delete
        the files another kind saved there: a crash leaves the old index or the new, never a mix."""

    def info(self) -> dict[str, Any]:
        """Summary for `cnclip info`: kind, ntotal, dim, recall_at_10, params, build_seconds, memory_mapped."""
        return {
            "kind": self.kind,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "recall_at_10": self.recall_at_10,
            "params": dict(self.params),
            "build_seconds": self.build_seconds,
            "memory_mapped": self.memory_mapped,
        }
