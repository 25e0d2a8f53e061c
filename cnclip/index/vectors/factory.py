"""`VectorIndex`: builds and loads vector indexes, each time of the kind that fits (exact, IVF, on disk).

Every method returns a `VectorStore` (cnclip.index.vectors.store), so callers search, change and
save an index without knowing its kind. The SQLite catalog is the source of truth and an index
a cache derived from it, so `load` answers None (never raises) when the files are absent, stale
or damaged: the caller rebuilds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cnclip.errors import CNClipError
from cnclip.index.spool import spool_root
from cnclip.index.vectors.faiss_io import INDEX_FILE, META_FILE
from cnclip.index.vectors.inputs import as_ids, as_vectors
from cnclip.index.vectors.kinds import EXACT_THRESHOLD, KINDS, ONDISK_KIND, choose_kind, resolve_kind
from cnclip.index.vectors.memory import InMemoryIndex
from cnclip.index.vectors.memory_build import CHUNK, build_exact_streaming, build_from, build_spooled
from cnclip.index.vectors.ondisk import OnDiskIndex
from cnclip.index.vectors.ondisk_train import min_rows
from cnclip.index.vectors.store import VectorStore
from cnclip.index.vectors.tuning import TARGET_RECALL

__all__ = ["VectorIndex"]

log = logging.getLogger(__name__)


class VectorIndex:
    """Makes vector indexes: `build`, `build_streaming`, `empty` and `load` return the `VectorStore`
    of the kind asked for (or that "auto" picks by size), and `resolve_kind` says which one."""

    @classmethod
    def empty(cls, dim: int) -> VectorStore:
        """An exact index with no vectors yet."""
        return InMemoryIndex.empty(dim)

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
    ) -> VectorStore:
        """Index `vectors` (n, dim) under `ids` (n,): exact below `exact_threshold`, else ANN.

        `kind` is "auto", "exact" or an ANN kind ("ivf-flat", "ivf-sq8", "ivf-pq-ondisk"). An
        ANN build measures recall@10 against exact search and raises nprobe until it reaches
        `target_recall`. `nlist` (IVF cells) defaults to ~sqrt(n) (~4 sqrt(n) on disk); more
        cells search faster but train slower. An on-disk index is written into `folder`
        (default: a temporary folder, linked or copied into the folder given to `save`).
        """
        vectors = as_vectors(vectors)
        ids = as_ids(ids, vectors.shape[0])
        kind = choose_kind(kind, ids.shape[0], exact_threshold)
        if kind == ONDISK_KIND:
            rows = ids.shape[0]
            slices = [(ids[s : s + CHUNK], vectors[s : s + CHUNK]) for s in range(0, rows, CHUNK)]
            return cls._build_ondisk(
                slices, rows, vectors.shape[1], seed=seed, target_recall=target_recall, nlist=nlist, folder=folder
            )
        return build_from(ids, vectors, kind=kind, seed=seed, target_recall=target_recall, nlist=nlist)

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
    ) -> VectorStore:
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
        kind = choose_kind(kind, total, exact_threshold)
        if kind == ONDISK_KIND:
            return cls._build_ondisk(
                chunks, total, dim, seed=seed, target_recall=target_recall, nlist=nlist, folder=folder
            )
        if callable(chunks):
            chunks = chunks()
        if kind == "exact":
            return build_exact_streaming(chunks, total, dim)
        return build_spooled(
            chunks,
            total,
            dim,
            kind=kind,
            seed=seed,
            target_recall=target_recall,
            nlist=nlist,
            spool_dir=spool_root(folder) if spool_dir is None else spool_dir,
        )

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
    ) -> VectorStore:
        if total < min_rows():
            # Too few vectors to train PQ codebooks; exact search is the right answer anyway.
            log.debug("%d vectors: building an exact index instead of %s", total, ONDISK_KIND)
            return cls.build_streaming(chunks() if callable(chunks) else chunks, total, dim, kind="exact")
        return OnDiskIndex.build(
            chunks, folder, total=total, dim=dim, nlist=nlist, seed=seed, target_recall=target_recall
        )

    @staticmethod
    def resolve_kind(kind: str, n: int, exact_threshold: int = EXACT_THRESHOLD) -> str:
        """The kind `build` makes for `kind` ("auto" or one of KINDS) and `n` vectors."""
        return resolve_kind(kind, n, exact_threshold)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], mmap: bool = True) -> VectorStore | None:
        """The index saved in `folder`, of whatever kind, or None if it is absent or unusable
        (logged as a warning).

        With `mmap` the vectors of an in-memory kind stay in the file and are paged in as searches
        touch them, so a one-shot search does not read the whole file; `add`/`remove` then copy
        it into memory. The on-disk kind's lists are always memory-mapped.
        """
        folder = Path(folder)
        if not (folder / INDEX_FILE).exists() and not (folder / META_FILE).exists():
            return None
        try:
            doc = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            kind = doc.get("kind") if isinstance(doc, dict) else None
            if kind not in KINDS:
                raise ValueError(f"{META_FILE} names no known kind ({kind!r})")
            if kind == ONDISK_KIND:
                return OnDiskIndex.load(folder)
            return InMemoryIndex.load(folder, mmap=mmap)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, MemoryError, CNClipError) as exc:
            log.warning("ignoring the vector index in %s (it will be rebuilt): %s", folder, exc)
            return None
