"""`OnDiskIndex`: (OPQ+)IVF-PQ for collections whose vectors do not fit in RAM (issue 8), kind "ivf-pq-ondisk".

Searches memory-map the `.ivfdata` file of inverted lists, so RAM holds only the quantizers, the
id list's pages that are touched and the lists a query visits; the page cache decides the rest.
How it is built: cnclip.index.vectors.ondisk_build; its files: cnclip.index.vectors.ondisk_files.

Changes after the build do not touch the `.ivfdata` file (other processes may have it mapped):
added vectors are PQ-encoded into a small in-RAM delta index searched alongside, and removed
ids are filtered out of the on-disk lists during the scan (faiss IDSelector), so results never
need over-fetching. `needs_rebuild` says when the delta has grown too large.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cnclip import atomic, faults
from cnclip.errors import CNClipError, IndexNotFoundError
from cnclip.index.spool import default_spool_dir
from cnclip.index.vectors.faiss_io import INDEX_FILE, META_FILE
from cnclip.index.vectors.inputs import MISSING, as_ids, as_vectors
from cnclip.index.vectors.kinds import EXACT_THRESHOLD, ONDISK_KIND
from cnclip.index.vectors.ondisk_build import (
    SHARD_ROWS,
    Source,
    as_source,
    checked_ids,
    choose_nprobe,
    write_index_files,
)
from cnclip.index.vectors.ondisk_files import (
    BUILD_DIR,
    add_list_arrays,
    header_with_lists_in_ram,
    link_or_copy,
    list_arrays,
    open_lists,
    read_changes,
    remove_files,
    write_changes,
)
from cnclip.index.vectors.ondisk_train import Plan
from cnclip.index.vectors.store import Reranker, Selection, VectorStore
from cnclip.index.vectors.threads import omp_threads, search_threads
from cnclip.index.vectors.tuning import TARGET_RECALL

__all__ = ["FILTER_SCAN_ROWS", "KIND", "RERANK_FACTOR", "OnDiskIndex"]

log = logging.getLogger(__name__)

KIND = ONDISK_KIND
_FORMAT = 1

# A reranker (exact vectors by id, e.g. from the catalog) rescores this many candidates per
# result: at 10^6 benchmark vectors 99.7 % of the true top-10 were among the PQ top-100.
RERANK_FACTOR = 10
# The delta index may grow to this fraction of the built size before a rebuild is advised.
_DELTA_FRACTION = 0.25
# The index holds no raw vectors: a filter selecting at most this many ids scans their exact
# vectors (from the reranker) instead; a larger one over-fetches PQ candidates.
FILTER_SCAN_ROWS = 20_000


class OnDiskIndex(VectorStore):
    """(OPQ+)IVF-PQ with memory-mapped inverted lists; ids int64, scores are inner products.

    Scores are PQ approximations of the cosine unless a `reranker` is set, in which case the
    top `rerank_factor * k` candidates are rescored with the exact vectors it returns.
    """

    kind = KIND

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
        return int(faiss.extract_index_ivf(self._base).nlist)

    @property
    def ntotal(self) -> int:
        """Vectors searchable now: built, minus removed, plus added."""
        return int(self._base.ntotal) - int(self._removed.size) + int(self._delta_ids.size)

    @property
    def pending_changes(self) -> int:
        """Rows added or removed since the build (what `needs_rebuild` weighs)."""
        return int(self._removed.size + self._delta_ids.size)

    def __repr__(self) -> str:
        return f"OnDiskIndex({str(self.folder)!r}, dim={self.dim}, ntotal={self.ntotal}, nlist={self.nlist})"

    @property
    def memory_mapped(self) -> bool:
        """Always: the inverted lists are mapped from the `.ivfdata` file."""
        return True

    @property
    def files(self) -> dict[str, str | None]:
        """The names of the files it reads in `folder`: header, lists, ids, changes (None if none)."""
        return dict(self._doc["files"])

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
        source = as_source(chunks)
        if total <= 0:
            raise CNClipError("there are no vectors to index" if total == 0 else f"total must be >= 0, got {total}")
        if rerank_factor < 1:
            raise CNClipError(f"rerank_factor must be >= 1, got {rerank_factor}")
        options = dict(nlist=nlist, m=m, nbits=nbits, opq=opq, hnsw=hnsw, train_size=train_size)
        options.update(dim=dim, shard_rows=shard_rows, seed=seed)
        Plan.resolve(total, **options)  # bad options fail before anything is read or written
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
        shutil.rmtree(folder / BUILD_DIR, ignore_errors=True)
        if owned:
            result._cleanup = weakref.finalize(result, shutil.rmtree, str(folder), True)
        return result

    @classmethod
    def _build_into(
        cls, folder: Path, source: Source, total: int, options: dict, target: float, rerank_factor: int
    ) -> OnDiskIndex:
        """Both passes and the merge; returns the index, its nprobe chosen, not yet saved."""
        built = write_index_files(folder, source, total, options, target, rerank_factor)
        result = cls._open(folder, {"kind": KIND, "params": built.params, "files": {**built.files, "changes": None}})
        t = time.perf_counter()
        fetch = min(10 * result.rerank_factor, result.ntotal)
        nprobe, at_10, measured = choose_nprobe(
            result._candidates, built.queries, built.truth, target, nlist=result.nlist, fetch=fetch
        )
        result.nprobe, result.recall_at_10 = nprobe, at_10
        result.params.update(measured)
        built.timings["recall_s"] = time.perf_counter() - t
        result.params.update({k: round(v, 3) for k, v in built.timings.items()})
        return result

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
            base, base_ids = open_lists(folder, files)
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
                link_or_copy(self.folder / name, folder / name)
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
        (folder / INDEX_FILE).unlink(missing_ok=True)  # an in-memory kind's, which this index replaces

    def _save_changes(self, folder: Path, stem: str) -> str | None:
        if not self.pending_changes:
            return None
        ivf = faiss.extract_index_ivf(self._base)
        sizes, ids, codes = list_arrays(self._delta, ivf.nlist, ivf.code_size)
        return write_changes(folder, stem, self._removed, sizes, ids, codes)

    def _load_changes(self, path: Path) -> None:
        removed, sizes, ids, codes = read_changes(path)
        self._removed = np.sort(removed.astype(np.int64))
        self._not_removed = None
        if ids.size:
            add_list_arrays(self._delta_index(), sizes, ids, codes)
        self._delta_ids = np.sort(ids.astype(np.int64))

    # -- searching -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (q, k'), ids int64 (q, k')) best first, k' = min(k, ntotal)."""
        queries = as_vectors(queries, self.dim, "queries")
        if k < 0:
            raise CNClipError(f"k must be >= 0, got {k}")
        nprobe = self.nprobe if nprobe is None else nprobe
        if not 1 <= nprobe <= self.nlist:
            raise CNClipError(f"nprobe must be between 1 and nlist={self.nlist}, got {nprobe}")
        q = queries.shape[0]
        kk = min(k, self.ntotal)
        if kk == 0 or q == 0:
            return np.empty((q, kk), dtype=np.float32), np.empty((q, kk), dtype=np.int64)
        fetch = min(kk * self.rerank_factor, self.ntotal) if self.reranker is not None else kk
        with omp_threads(search_threads(q)):
            scores, ids = self._candidates(queries, fetch, nprobe)
            # The visited cells can hold fewer than `fetch` vectors: widen those queries' search.
            probe = nprobe
            while probe < self.nlist and (short := np.flatnonzero((ids == MISSING).any(axis=1))).size:
                probe = min(self.nlist, probe * 4)
                scores[short], ids[short] = self._candidates(queries[short], fetch, probe)
        if self.reranker is not None:
            return self._rerank(queries, ids, kk)
        return scores[:, :kk], ids[:, :kk]

    def search_within(self, queries: np.ndarray, k: int, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the ids of `selection` only, like `search`; rows are padded with id -1 where
        fewer than k selected vectors were found.

        The lists hold no raw vectors, so faiss cannot skip unselected ids and still rank by exact
        scores: up to FILTER_SCAN_ROWS selected ids are scored exactly from the reranker's vectors
        (so the result is exact); more, or any without a reranker, ask `search` for more and more
        candidates until k selected ones come back (or every vector did)."""
        queries = as_vectors(queries, self.dim, "queries")
        q, kk, allowed = queries.shape[0], min(k, self.ntotal, len(selection)), selection.ids
        if kk <= 0 or q == 0:
            return np.empty((q, 0), dtype=np.float32), np.empty((q, 0), dtype=np.int64)
        if self.reranker is not None and allowed.size <= FILTER_SCAN_ROWS:
            vectors = np.asarray(self.reranker(allowed), dtype=np.float32)
            scores = np.stack([vectors @ query for query in queries])
            order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
            return np.take_along_axis(scores, order, axis=1), allowed[order]
        total = max(self.ntotal, 1)
        fetch = min(total, k * 2 * -(-total // allowed.size))  # as many selected as k, twice over
        while True:
            scores, ids = self.search(queries, fetch)
            keep = np.isin(ids, allowed)
            if keep.sum(axis=1).min() >= kk or fetch >= total:
                break
            fetch = min(total, fetch * 4)
        width = min(kk, int(keep.sum(axis=1).max()))
        found_scores = np.full((q, width), -np.inf, dtype=np.float32)
        found = np.full((q, width), MISSING, dtype=np.int64)
        for row in range(q):
            cols = np.flatnonzero(keep[row])[:width]
            found_scores[row, : cols.size], found[row, : cols.size] = scores[row, cols], ids[row, cols]
        return found_scores, found

    def set_reranker(self, reranker: Reranker | None) -> None:
        """Rescore the top `rerank_factor * k` PQ candidates with the exact vectors `reranker`
        returns (e.g. `Catalog.vectors_for_ids`), and scan small filtered selections with them."""
        self.reranker = reranker

    def _candidates(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ top-k over the on-disk lists (removed ids skipped) and the in-RAM delta, merged."""
        if self._removed.size and self._not_removed is None:
            self._not_removed = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._removed))
        scores, ids = self._base.search(queries, k, params=self._search_params(self._base, nprobe, self._not_removed))
        if self._delta is not None and self._delta.ntotal:
            s2, i2 = self._delta.search(queries, k, params=self._search_params(self._delta, nprobe, None))
            scores, ids = np.concatenate([scores, s2], axis=1), np.concatenate([ids, i2], axis=1)
            scores[ids == MISSING] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
        return scores, ids

    def _search_params(self, index: faiss.Index, nprobe: int, sel: faiss.IDSelector | None) -> faiss.SearchParameters:
        # faiss's SearchParameters keep references to what is assigned to them.
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if sel is not None:
            params.sel = sel
        if isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexHNSW):
            params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
        if isinstance(index, faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=params)
        return params

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = ids != MISSING
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
        found[~np.isfinite(scores)] = MISSING
        return scores, found

    # -- updating --------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids` to the in-RAM delta; an id already indexed is replaced."""
        vectors = as_vectors(vectors, self.dim)
        ids = checked_ids(ids, vectors.shape[0])
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
        ids = np.unique(as_ids(ids))
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

    def needs_rebuild(self, *, ntotal: int | None = None, exact_threshold: int = EXACT_THRESHOLD) -> bool:
        """True once adds and removals pass a quarter of the built size, or the size left it far
        (`ntotal`: the size after pending changes). `exact_threshold` does not apply to this kind."""
        built = int(self.params.get("built_ntotal") or self._base.ntotal or 1)
        n = self.ntotal if ntotal is None else ntotal
        return self.pending_changes > _DELTA_FRACTION * built or not built / 2 <= n <= (1 + _DELTA_FRACTION) * built

    def _delta_index(self) -> faiss.Index:
        if self._delta is None:
            self._delta = header_with_lists_in_ram(self.folder / self._doc["files"]["header"])
        return self._delta

    def info(self) -> dict[str, Any]:
        """Summary for `cnclip info`, as for every kind; its params hold the nprobe in use."""
        return {**super().info(), "params": {**self.params, "nprobe": self.nprobe}}
