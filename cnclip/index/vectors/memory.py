"""`InMemoryIndex`: the vector index kinds held in RAM: exact inner-product search, IVF-Flat and IVF-SQ8.

The SQLite catalog is the source of truth; this index is a cache derived from it and can be
rebuilt at any time (cnclip.index.vectors.memory_build builds it). Its vectors are L2-normalised
float32 scored by inner product (= cosine similarity); the exact and IVF-Flat kinds store them
raw, so their scores are exact cosines and IVF's only approximation is which cells are visited.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cnclip import atomic, faults
from cnclip.errors import CNClipError
from cnclip.index.vectors.faiss_io import INDEX_FILE, META_FILE, write_faiss
from cnclip.index.vectors.inputs import as_ids, as_vectors
from cnclip.index.vectors.kinds import EXACT_THRESHOLD, IN_MEMORY_KINDS
from cnclip.index.vectors.ondisk_files import remove_files
from cnclip.index.vectors.store import Reranker, Selection, VectorStore
from cnclip.index.vectors.threads import omp_threads, search_threads

__all__ = ["InMemoryIndex", "filtered_nprobe"]

log = logging.getLogger(__name__)

_FORMAT = 1


def filtered_nprobe(nprobe: int, share: float, nlist: int) -> int:
    """The IVF cells a filtered search visits when `share` (0..1) of the vectors are selected:
    `nprobe` / `share`, up to all `nlist`, so it meets about as many selected vectors as an
    unfiltered search meets vectors, and keeps its recall."""
    return min(nlist, math.ceil(nprobe / max(share, 1e-9)))


class InMemoryIndex(VectorStore):
    """A faiss IndexIDMap(IndexFlatIP) (kind "exact") or IndexIVF ("ivf-flat", "ivf-sq8") in RAM,
    or memory-mapped from its file until it is first changed."""

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
        """Wrap a ready faiss index; use `VectorIndex.build`, `build_streaming` or `load` instead."""
        if kind not in IN_MEMORY_KINDS:
            raise CNClipError(f"unknown in-memory index kind {kind!r}; choose one of {', '.join(IN_MEMORY_KINDS)}")
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

    @classmethod
    def empty(cls, dim: int) -> InMemoryIndex:
        """An exact index with no vectors yet."""
        if dim <= 0:
            raise CNClipError(f"vector dimension must be positive, got {dim}")
        return cls(faiss.IndexIDMap(faiss.IndexFlatIP(dim)), "exact", params={})

    # -- properties ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    @property
    def memory_mapped(self) -> bool:
        """Whether the vectors are still mapped from the file `load` read (until the first change)."""
        return self._mapped_from is not None

    def __repr__(self) -> str:
        return f"InMemoryIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal})"

    # -- searching -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (q, k'), ids int64 (q, k')) best first, k' = min(k, ntotal)."""
        queries = as_vectors(queries, self.dim, "queries")
        if k < 0:
            raise CNClipError(f"k must be >= 0, got {k}")
        q = queries.shape[0]
        kk = min(k, self.ntotal)
        if kk == 0 or q == 0:
            return np.empty((q, kk), dtype=np.float32), np.empty((q, kk), dtype=np.int64)
        with omp_threads(search_threads(q)):
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
        keeps its recall; a short row is searched again over every cell."""
        queries = as_vectors(queries, self.dim, "queries")
        q, kk = queries.shape[0], min(k, self.ntotal, len(selection))
        if kk <= 0 or q == 0:
            return np.empty((q, 0), dtype=np.float32), np.empty((q, 0), dtype=np.int64)
        index, selector = self._index, selection.selector
        with omp_threads(search_threads(q)):
            if not isinstance(index, faiss.IndexIVF):
                return index.search(queries, kk, params=faiss.SearchParameters(sel=selector))
            nprobe = filtered_nprobe(index.nprobe, len(selection) / max(1, self.ntotal), index.nlist)
            scores, ids = index.search(queries, kk, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))
            short = np.flatnonzero((ids < 0).any(axis=1))
            if short.size and nprobe < index.nlist:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nlist)
                scores[short], ids[short] = index.search(queries[short], kk, params=params)
        return scores, ids

    def set_reranker(self, reranker: Reranker | None) -> None:
        """Ignored: these kinds hold the exact vectors themselves."""

    def _search_all_cells(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._index
        if not isinstance(index, faiss.IndexIVF):
            return index.search(queries, k)
        # Per-call parameters rather than setting index.nprobe: concurrent searches stay unaffected.
        return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=index.nlist))

    # -- updating --------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids`; an id already in the index is replaced, not duplicated.

        An exact index stays exact however large it grows, and an IVF index keeps the cells it
        was trained with; see `needs_rebuild`.
        """
        vectors = as_vectors(vectors, self.dim)
        ids = as_ids(ids, vectors.shape[0])
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

        Every kind deletes in place (IVF lists and the flat store support removal), so there are
        no tombstones and searches need no over-fetch. Each call scans the whole index, so
        batch deletions.
        """
        ids = as_ids(ids)
        if ids.size == 0 or self.ntotal == 0:
            return
        self._own()
        removed = self._index.remove_ids(faiss.IDSelectorBatch(ids))
        log.debug("removed %d of %d requested ids", removed, ids.size)

    def ids(self) -> np.ndarray:
        """The ids the index holds, ascending int64 (what `Index.refresh` diffs against the catalog)."""
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

    def needs_rebuild(self, *, ntotal: int | None = None, exact_threshold: int = EXACT_THRESHOLD) -> bool:
        """Whether incremental adds/removes have left this index far from what a build would make.

        True for an exact index that grew to twice the threshold, or an IVF index that shrank
        below half of it or grew to 4x its build size (its lists, and query time, grew 4x).
        `ntotal` asks the same question for a size the index would have after pending changes.
        """
        n = self.ntotal if ntotal is None else ntotal
        if self.kind == "exact":
            return n >= 2 * exact_threshold
        built = int(self.params.get("built_ntotal") or n or 1)
        return n < exact_threshold // 2 or n > 4 * built

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

    # -- persistence -----------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write INDEX_FILE and META_FILE into `folder`, each via a temp file and an atomic rename.

        META_FILE records the index file's size and mtime, so a crash between the two renames
        (or any other mismatch) makes `load` treat the pair as stale instead of mixing them.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
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
    def load(cls, folder: str | os.PathLike[str], mmap: bool = True) -> InMemoryIndex:
        """The index `save` wrote into `folder`; a CNClipError when it is absent, stale or damaged.

        With `mmap` the vectors stay in the file and are paged in as searches touch them, so a
        one-shot search does not read the whole file; `add`/`remove` then copy it into memory.
        """
        folder = Path(folder)
        index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"unsupported format {doc.get('format') if isinstance(doc, dict) else doc!r}")
            kind = doc["kind"]
            if kind not in IN_MEMORY_KINDS:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(IN_MEMORY_KINDS)}")
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
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CNClipError(f"the vector index in {folder} is unusable: {exc}") from exc
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
