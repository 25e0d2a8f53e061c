"""The files of an on-disk index: content-addressed names, the merged inverted lists, the header, changes.

Layout of a folder (every name but META_FILE is content-addressed):

    vectors.json                 meta (kind, nlist, m, nbits, nprobe, recall, ...); written last
    ondisk-KEY.faiss             trained index + list offsets (faiss OnDiskInvertedLists header)
    ondisk-KEY.ivfdata           the inverted lists: per list, m-byte codes then int64 ids
    ondisk-KEY.ids.npy           every id in the lists, sorted (for `ids`, add/remove)
    ondisk-KEY.changes-D.npz     adds (PQ codes) and removals since the build, if any
    .ondisk-build/               training and shard files of an unfinished build (reused)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cnclip import atomic
from cnclip.index.vectors.faiss_io import write_faiss

__all__ = [
    "BUILD_DIR",
    "add_list_arrays",
    "header_with_lists_in_ram",
    "list_arrays",
    "open_lists",
    "PREFIX",
    "Shard",
    "digest",
    "link_or_copy",
    "read_changes",
    "remove_files",
    "write_arrays",
    "write_changes",
    "write_files",
]

PREFIX = "ondisk-"
BUILD_DIR = ".ondisk-build"

# The size of one write when the shards' lists are merged.
_MERGE_BYTES = 64 << 20


def digest(*parts: bytes | np.ndarray | str) -> str:
    """A short digest of `parts` (strings, bytes, arrays' contents): the key in a file's name."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif isinstance(part, np.ndarray):
            part = memoryview(np.ascontiguousarray(part)).cast("B")
        h.update(part)
    return h.hexdigest()


@dataclass
class Shard:
    """One encoded shard on disk: per-cell sizes, and ids and codes sorted by cell."""

    path: Path

    def sizes(self) -> np.ndarray:
        return np.load(self.path / "sizes.npy")

    def ids(self) -> np.ndarray:
        return np.load(self.path / "ids.npy", mmap_mode="r")

    def codes(self) -> np.ndarray:
        return np.load(self.path / "codes.npy", mmap_mode="r")


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as .npy files into `folder`, published as a whole."""
    with atomic.replacing_folder(folder) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)


def _merge(shards: list[Shard], nlist: int, code_size: int, out: Path) -> np.ndarray:
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
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, lists_name)
    sizes64 = np.ascontiguousarray(sizes, dtype=np.uint64)
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes64))
    lists.totsize = lists_bytes
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.ntotal = index.ntotal = int(sizes.sum())
    write_faiss(index, path)


def write_files(folder: Path, key: str, index: faiss.Index, shards: list[Shard], ids: np.ndarray) -> dict[str, str]:
    """Merge the shards into the lists file, then write the sorted ids and the header.

    The names are derived from `key` (the trained index and the shards' contents), so files a
    finished build already wrote for the same rows are reused as they are.
    """
    stem = f"{PREFIX}{key}"
    names = {"header": f"{stem}.faiss", "lists": f"{stem}.ivfdata", "ids": f"{stem}.ids.npy"}
    if not all((folder / name).exists() for name in names.values()):
        ivf = faiss.extract_index_ivf(index)
        lists = folder / names["lists"]
        sizes = _merge(shards, ivf.nlist, ivf.code_size, lists)
        with atomic.replacing(folder / names["ids"], ".npy") as tmp:
            np.save(tmp, ids)
        _write_header(index, sizes, names["lists"], lists.stat().st_size, folder / names["header"])
    return names


def link_or_copy(src: Path, dst: Path) -> None:
    """Publish `src` as `dst` too: a hard link, or a copy on another file system."""
    if dst.exists():  # names are content digests: an existing file is the same file
        return
    with atomic.replacing(dst) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another file system
            shutil.copyfile(src, tmp)


def remove_files(folder: str | os.PathLike[str], keep: Iterable[str] = ()) -> None:
    """Delete the on-disk index files in `folder` other than `keep`.

    An unfinished build's folder stays: running that build again resumes from it.
    """
    keep = set(keep)
    for path in Path(folder).glob(f"{PREFIX}*"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def write_changes(
    folder: Path, stem: str, removed: np.ndarray, sizes: np.ndarray, ids: np.ndarray, codes: np.ndarray
) -> str:
    """Save the changes since a build (removed ids; added ids and PQ codes, by cell) as a file
    named for `stem` and its content in `folder`; returns its name."""
    name = f"{stem}.changes-{digest(removed, sizes, ids, codes)}.npz"
    if not (folder / name).exists():
        with atomic.replacing(folder / name, ".npz") as tmp:
            np.savez(tmp, removed=removed, sizes=sizes, ids=ids, codes=codes)
    return name


def read_changes(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(removed ids, added rows per cell, added ids, their codes) as `write_changes` saved them."""
    with np.load(path) as z:
        return z["removed"], z["sizes"], z["ids"], z["codes"]


def open_lists(folder: Path, files: dict[str, Any]) -> tuple[faiss.Index, np.ndarray]:
    """The index in `files["header"]` over its lists file memory-mapped read-only, and its sorted
    ids (memory-mapped); a ValueError (or OSError, RuntimeError) when the files do not fit."""
    header = folder / files["header"]
    lists_path = folder / files["lists"]
    base = faiss.read_index(str(header), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    ivf = faiss.extract_index_ivf(base)
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
    return base, base_ids


def header_with_lists_in_ram(header: Path) -> faiss.Index:
    """A second copy of the (small) header: the same quantizers over empty lists in RAM."""
    index = faiss.read_index(str(header), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.ntotal = index.ntotal = 0
    return index


def list_arrays(index: faiss.Index | None, nlist: int, code_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lists of an in-RAM IVF index (None: empty ones) as rows per list (nlist,), then every
    id (n,) and code (n, code_size), list after list."""
    sizes = np.zeros(nlist, dtype=np.int64)
    ids: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    if index is not None:
        lists = faiss.extract_index_ivf(index).invlists
        for j in range(nlist):
            size = lists.list_size(j)
            if size:
                sizes[j] = size
                ids.append(faiss.rev_swig_ptr(lists.get_ids(j), size).copy())
                codes.append(faiss.rev_swig_ptr(lists.get_codes(j), size * code_size).copy())
    flat_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    flat_codes = np.concatenate(codes) if codes else np.empty(0, dtype=np.uint8)
    return sizes, flat_ids, flat_codes.reshape(-1, code_size)


def add_list_arrays(index: faiss.Index, sizes: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> None:
    """Put what `list_arrays` returned into the empty in-RAM lists of `index`."""
    lists = faiss.extract_index_ivf(index).invlists
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for j in np.flatnonzero(sizes):
        a, b = int(starts[j]), int(starts[j + 1])
        part_ids = np.ascontiguousarray(ids[a:b], dtype=np.int64)
        part_codes = np.ascontiguousarray(codes[a:b])
        lists.add_entries(int(j), b - a, faiss.swig_ptr(part_ids), faiss.swig_ptr(part_codes))
    faiss.extract_index_ivf(index).ntotal = index.ntotal = int(ids.size)
