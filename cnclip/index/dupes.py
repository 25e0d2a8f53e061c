"""Near-duplicate photos: groups of indexed files whose stored image vectors are almost the same.

Works from the vectors the catalog already holds (nothing is decoded or embedded again): an exact
range search (inner product of unit vectors, i.e. cosine; faiss `IndexFlatIP.range_search`) over
blocks of the collection, then union-find over the pairs at or above the threshold. It only
reads the index: nothing is deleted or moved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faiss
import numpy as np
from PIL import Image

import cnclip.model.transform  # noqa: F401 - registers the HEIF opener, so HEIC headers give their size
from cnclip.errors import CNClipError
from cnclip.index.catalog import Catalog, FileRecord
from cnclip.index.scan import from_catalog_path

if TYPE_CHECKING:
    from cnclip.index.index import Index

__all__ = [
    "DEFAULT_THRESHOLD",
    "MAX_MEMBERS",
    "DupeGroup",
    "DupeMember",
    "DupeReport",
    "check_threshold",
    "find_duplicates",
    "group_vectors",
    "similar_pairs",
]

DEFAULT_THRESHOLD = 0.95
# Files listed per group. A burst rarely has more; a bigger group means the threshold chains
# different photos together, and listing thousands of them helps nobody.
MAX_MEMBERS = 100
# Rows of the collection per range-search block: one call returns at most BLOCK x BLOCK pairs
# (~200 MB at 4,096 even if every pair matches), and a block of 4,096 512-d vectors is 8 MB.
BLOCK = 4096
# The work stops past this many pairs per file (with a floor): far more than copies make, and
# the sign of a threshold too low to mean "the same photo".
PAIRS_PER_FILE = 50
MIN_MAX_PAIRS = 1_000_000
# A file and its byte-identical copy share one stored vector, whose dot product with itself
# rounds to just below 1 in float32: pairs this close under the threshold count as over it.
TOLERANCE = 1e-5

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DupeMember:
    """One file of a group: its catalog id and path, its cosine similarity to the group's best
    copy (1.0 for the best copy itself), and what makes it a better or worse copy."""

    id: int
    path: str
    similarity: float
    bytes: int
    mtime_ns: int
    width: int | None = None  # from the image header; None when the file cannot be read now
    height: int | None = None

    @property
    def pixels(self) -> int | None:
        return None if self.width is None or self.height is None else self.width * self.height

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "similarity": round(self.similarity, 6),
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "mtime": self.mtime_ns / 1e9,
        }


@dataclass(frozen=True)
class DupeGroup:
    """Files that look like copies of one photo, the best copy first (most pixels, else most
    bytes, then the oldest). `size` counts every file of the group; when it is over the cap,
    `members` holds only the largest files (by bytes)."""

    members: tuple[DupeMember, ...]
    size: int
    score: float  # mean similarity of the other listed members to the best copy

    @property
    def best(self) -> DupeMember:
        return self.members[0]

    @property
    def capped(self) -> bool:
        return self.size > len(self.members)

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "score": round(self.score, 6),
            "capped": self.capped,
            "members": [m.to_dict() for m in self.members],
        }


@dataclass(frozen=True)
class DupeReport:
    """What `find_duplicates` found: the groups (largest first, then by score), how many files
    were compared, how many pairs passed the threshold, and one line per cap that was hit."""

    groups: list[DupeGroup]
    threshold: float
    files: int
    pairs: int
    total_groups: int  # before `limit`
    notes: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """Files of the listed groups that are not their group's best copy (capped groups count in full)."""
        return sum(g.size - 1 for g in self.groups)

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "files": self.files,
            "pairs": self.pairs,
            "total_groups": self.total_groups,
            "groups": [g.to_dict() for g in self.groups],
            "notes": list(self.notes),
        }


def check_threshold(threshold: float) -> float:
    """`threshold` as a float if it is in (0, 1]; CNClipError otherwise."""
    value = float(threshold)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise CNClipError(
            f"threshold {threshold} is outside (0, 1]; give a cosine similarity such as {DEFAULT_THRESHOLD}"
        )
    return value


# -- pairs ------------------------------------------------------------------------------------


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def similar_pairs(
    vectors: np.ndarray, threshold: float, *, block: int = BLOCK, progress: Progress | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (rows i, rows j, cosines), int64/int64/float32, of every pair of rows of `vectors`
    (float32 (n, d), unit rows) with i < j and a cosine at or above `threshold` (less TOLERANCE).

    Exact: the collection is cut into blocks of `block` rows; each block goes into its own
    `IndexFlatIP` and is range-searched with itself and every earlier block, so each pair is
    computed once and no call returns more than `block` x `block` pairs. `progress(done, n)`
    reports the share of the work done, scaled to rows.
    """
    threshold = check_threshold(threshold)
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = vectors.shape[0]
    spans = _blocks(n, block)
    total = sum(stop * (stop - start) for start, stop in spans) or 1
    done = 0
    # IP range search keeps what is strictly above the radius; the tolerance lets ties and copies in.
    radius = threshold - TOLERANCE
    for col_start, col_stop in spans:
        columns = faiss.IndexFlatIP(vectors.shape[1])
        columns.add(vectors[col_start:col_stop])
        for row_start, row_stop in _blocks(col_stop, block):
            lims, scores, labels = columns.range_search(vectors[row_start:row_stop], radius)
            rows = np.repeat(np.arange(row_start, row_stop, dtype=np.int64), np.diff(lims).astype(np.int64))
            cols = labels.astype(np.int64) + col_start
            upper = rows < cols  # the block with itself gives each pair twice, and i == i
            if not upper.all():
                rows, cols, scores = rows[upper], cols[upper], scores[upper]
            if rows.size:
                yield rows, cols, scores
        done += col_stop * (col_stop - col_start)
        if progress is not None:
            progress(round(n * done / total), n)


# -- union-find ---------------------------------------------------------------------------------


def _flatten(parent: np.ndarray) -> None:
    """Point every node straight at its root (roots are the smallest node of their component)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return
        parent[:] = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the components of each pair (a[k], b[k]); `parent` is flat before and after.

    Vectorised hooking: each root is hooked under the smallest root it shares a pair with. A
    parent is always smaller than its child, so no cycle can form; pairs whose roots still
    differ go round again.
    """
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        _flatten(parent)
        a, b = lo, hi


def group_vectors(
    ids: Sequence[int] | np.ndarray,
    vectors: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    max_pairs: int | None = None,
    block: int = BLOCK,
    progress: Progress | None = None,
) -> tuple[list[np.ndarray], int]:
    """Connected components of the pairs at or above `threshold`: (groups, number of pairs).

    Each group is an int64 array of 2+ of `ids` (one per row of `vectors`, float32 (n, d) unit
    rows), in ascending order; groups come in order of their smallest row. Raises CNClipError
    when more than `max_pairs` pairs pass (default: PAIRS_PER_FILE per file, at least
    MIN_MAX_PAIRS): a threshold that low links photos that are merely alike.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != ids.size:
        raise CNClipError(f"need one vector row per id: {ids.size} ids, vectors of shape {vectors.shape}")
    n = ids.size
    if max_pairs is None:
        max_pairs = max(MIN_MAX_PAIRS, PAIRS_PER_FILE * n)
    parent = np.arange(n, dtype=np.int64)
    pairs = 0
    for rows, cols, _ in similar_pairs(vectors, threshold, block=block, progress=progress):
        pairs += rows.size
        if pairs > max_pairs:
            raise CNClipError(
                f"more than {max_pairs:,} pairs of the {n:,} photos are at least {threshold:g} alike, far more "
                "than copies make; raise the threshold (0.9 to 0.98 finds near-copies)"
            )
        _union(parent, rows, cols)
    if n == 0:
        return [], 0
    _, inverse, counts = np.unique(parent, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # rows by component, ascending within each
    bounds = np.cumsum(counts)[:-1]
    groups = [ids[rows] for rows, c in zip(np.split(order, bounds), counts, strict=True) if c > 1]
    return groups, pairs


# -- from an index ------------------------------------------------------------------------------


def _image_size(path: str) -> tuple[int | None, int | None]:
    """(width, height) from the image header, or (None, None) when the file cannot be read now."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a huge photo is fine here: only its header is read
            with Image.open(from_catalog_path(path)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - Pillow reports a missing or bad file with many exception types
        return None, None


def _best_first(member: DupeMember) -> tuple:
    pixels = member.pixels
    return (pixels is None, -(pixels or 0), -member.bytes, member.mtime_ns, member.path)


def _group(
    group_ids: np.ndarray, records: dict[int, FileRecord], vector_of: Callable[[np.ndarray], np.ndarray], cap: int
) -> DupeGroup | None:
    """The group record of `group_ids`: the best copy first, similarities to it, at most `cap` members."""
    present = [records[i] for i in group_ids.tolist() if i in records]
    if len(present) < 2:
        return None
    if len(present) > cap:  # headers of the largest files only: a huge group must stay cheap
        present = sorted(present, key=lambda r: (-r.size, r.mtime_ns, r.path))[:cap]
    members = sorted(
        (DupeMember(r.id, from_catalog_path(r.path), 0.0, r.size, r.mtime_ns, *_image_size(r.path)) for r in present),
        key=_best_first,
    )
    vectors = vector_of(np.array([m.id for m in members], dtype=np.int64))
    similarity = (vectors @ vectors[0]).astype(float).clip(-1.0, 1.0)
    similarity[0] = 1.0
    members = [
        DupeMember(m.id, m.path, float(s), m.bytes, m.mtime_ns, m.width, m.height)
        for m, s in zip(members, similarity.tolist(), strict=True)
    ]
    # the best copy, then the others by how alike they are to it (the closest copies first)
    members[1:] = sorted(members[1:], key=lambda m: -m.similarity)
    return DupeGroup(tuple(members), size=len(group_ids), score=float(np.mean(similarity[1:])))


def _read_all(catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(catalog.file_vectors())
    if not chunks:
        dim = catalog.identity.dim if catalog.identity is not None else 0
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids, vectors = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    # a video's frames (cnclip.index.video) resemble each other by nature: photos only
    frames = catalog.searchable_ids_where("path GLOB '*#t=*'", ())
    if frames.size:
        keep = ~np.isin(ids, frames)
        ids, vectors = ids[keep], vectors[keep]
    return ids, vectors


def _notes(groups: list[DupeGroup], cap: int, threshold: float, limit: int | None, total: int) -> list[str]:
    notes = []
    capped = [g for g in groups if g.capped]
    if capped:
        largest = max(g.size for g in capped)
        notes.append(
            f"{len(capped)} group{'s' if len(capped) != 1 else ''} of more than {cap} photos (the largest: "
            f"{largest:,}) list only their {cap} largest files; at threshold {threshold:g} different photos "
            "chain together: raise the threshold"
        )
    if limit is not None and total > limit:
        notes.append(f"showing the first {limit} of {total:,} groups")
    return notes


def find_duplicates(
    index: Index | Catalog,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    max_members: int = MAX_MEMBERS,
    limit: int | None = None,
    max_pairs: int | None = None,
    progress: Progress | None = None,
) -> DupeReport:
    """Groups of near-identical photos among the searchable files of an index (or its catalog).

    Offline files and files without a vector are left out. Reads one snapshot of the catalog,
    so a concurrent `cnclip index` cannot mix two states. Groups come largest first, then by
    score; `limit` keeps the first groups only, `max_members` caps the files listed per group
    (the largest by bytes; `size` still counts them all). Image headers of the listed files are
    read to rank copies by pixels. Raises CNClipError for a threshold outside (0, 1] and when
    the threshold links more than `max_pairs` pairs (see `group_vectors`).
    """
    threshold = check_threshold(threshold)
    if max_members < 2:
        raise ValueError(f"max_members must be at least 2, got {max_members}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    catalog = index.catalog if not isinstance(index, Catalog) else index
    with catalog.snapshot() as snap:
        ids, vectors = _read_all(snap)
        groups, pairs = group_vectors(ids, vectors, threshold, max_pairs=max_pairs, progress=progress)
        records = snap.files_by_ids(np.concatenate(groups).tolist() if groups else [])

    def vector_of(wanted: np.ndarray) -> np.ndarray:
        return vectors[np.searchsorted(ids, wanted)]  # ids come from file_vectors in ascending order

    made = (_group(g, records, vector_of, max_members) for g in groups)
    found = sorted((g for g in made if g is not None), key=lambda g: (-g.size, -g.score, g.best.path))
    shown = found[:limit] if limit is not None else found
    return DupeReport(
        groups=shown,
        threshold=threshold,
        files=int(ids.size),
        pairs=pairs,
        total_groups=len(found),
        notes=_notes(shown, max_members, threshold, limit, len(found)),
    )
