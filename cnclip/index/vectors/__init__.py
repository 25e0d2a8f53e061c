"""Vector indexes: every kind behind one interface, `VectorStore`, made and opened by `VectorIndex`.

Kinds: "exact" (inner-product search over every vector, below EXACT_THRESHOLD), "ivf-flat" (above
it; IVF-SQ8 on request) and "ivf-pq-ondisk" (OPQ+IVF-PQ memory-mapped from disk, from
ONDISK_THRESHOLD up, for collections whose vectors do not fit in RAM). Vectors are L2-normalised
float32 and scored by inner product (= cosine similarity); the catalog stays the record, and an
index can always be rebuilt from it.

    store.py          VectorStore (the interface every kind implements) and Selection (filters)
    factory.py        VectorIndex: build, build_streaming, empty, load, resolve_kind
    kinds.py          the kind names, the sizes "auto" switches at, which kind a build makes
    memory.py         InMemoryIndex: exact, IVF-Flat and IVF-SQ8 in RAM (or mapped until changed)
    memory_build.py   their builds: exact, or IVF trained, with nprobe tuned to a recall target
    ondisk.py         OnDiskIndex: (OPQ+)IVF-PQ with inverted lists memory-mapped from disk
    ondisk_train.py   the on-disk build's plan, its uniform sample and quantizer training
    ondisk_build.py   the on-disk build's passes, shards and nprobe choice
    ondisk_files.py   the on-disk index's files: names, merged lists, header, changes
    faiss_io.py       the shared file names (META_FILE, INDEX_FILE) and write_faiss
    inputs.py         input checks (ids, vectors) shared by every kind
    threads.py        OpenMP threads per faiss call
    tuning.py         k-means settings, the recall target and its measurement
"""

from __future__ import annotations

from cnclip.index.vectors.factory import VectorIndex
from cnclip.index.vectors.faiss_io import INDEX_FILE, META_FILE
from cnclip.index.vectors.kinds import (
    ANN_KIND,
    EXACT_THRESHOLD,
    KINDS,
    ONDISK_KIND,
    ONDISK_THRESHOLD,
    resolve_kind,
)
from cnclip.index.vectors.memory import InMemoryIndex, filtered_nprobe
from cnclip.index.vectors.ondisk import FILTER_SCAN_ROWS, OnDiskIndex
from cnclip.index.vectors.store import Reranker, Selection, VectorStore
from cnclip.index.vectors.tuning import TARGET_RECALL

__all__ = [
    "ANN_KIND",
    "EXACT_THRESHOLD",
    "FILTER_SCAN_ROWS",
    "INDEX_FILE",
    "KINDS",
    "META_FILE",
    "ONDISK_KIND",
    "ONDISK_THRESHOLD",
    "TARGET_RECALL",
    "InMemoryIndex",
    "OnDiskIndex",
    "Reranker",
    "Selection",
    "VectorIndex",
    "VectorStore",
    "filtered_nprobe",
    "resolve_kind",
]
