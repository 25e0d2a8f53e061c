"""Near-duplicate groups (cnclip.index.dupes): exact pairs against brute force, union-find against
brute-force components, best-copy order, offline files left out, caps that say so."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cnclip.errors import CNClipError
from cnclip.index.catalog import Catalog, ModelIdentity, NewFile
from cnclip.index.dupes import TOLERANCE, check_threshold, find_duplicates, group_vectors, similar_pairs

DIM = 16


def clustered(n: int, dim: int = 48, centres: int = 400, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few hundred centres: many pairs near any threshold from 0.85 to 0.99."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((centres, dim))
    noise = rng.uniform(0.02, spread, (n, 1))  # some tight copies, some loose look-alikes
    x = base[rng.integers(0, centres, n)] / math.sqrt(dim) + noise * rng.standard_normal((n, dim)) / math.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_pairs(x: np.ndarray, threshold: float) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(pairs at or above the threshold, pairs too close to it to call either way), i < j, in float64."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    upper = np.triu(np.ones_like(sims, dtype=bool), 1)
    over = set(zip(*np.nonzero(upper & (sims >= threshold)), strict=True))
    unsure = set(zip(*np.nonzero(upper & (np.abs(sims - threshold) < 2 * TOLERANCE)), strict=True))
    return {(int(i), int(j)) for i, j in over}, {(int(i), int(j)) for i, j in unsure}


def components(n: int, pairs: set[tuple[int, int]]) -> list[set[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    found: dict[int, set[int]] = {}
    for i in range(n):
        found.setdefault(root(i), set()).add(i)
    return [g for g in found.values() if len(g) > 1]


@pytest.mark.parametrize("threshold", [0.9, 0.97])
def test_pairs_equal_brute_force_across_block_edges(threshold):
    x = clustered(2500)
    found = {}
    for rows, cols, scores in similar_pairs(x, threshold, block=300):  # 9 blocks, the last one short
        assert (rows < cols).all()
        for i, j, s in zip(rows.tolist(), cols.tolist(), scores.tolist(), strict=True):
            assert (i, j) not in found, "a pair came twice"
            found[(i, j)] = s
    over, unsure = brute_pairs(x, threshold)
    assert len(over) > 1000  # the set has plenty of pairs, and of pairs that are not over the threshold
    assert set(found) - unsure == over - unsure
    for (i, j), s in found.items():
        assert s == pytest.approx(float(x[i] @ x[j]), abs=1e-5)


def test_groups_equal_the_components_of_brute_force_pairs():
    x = clustered(3000, spread=0.45, seed=1)
    ids = 7 + 3 * np.arange(len(x))  # ids are not row numbers
    sims = np.triu(x.astype(np.float64) @ x.astype(np.float64).T, 1)
    # a threshold no pair sits on (within float32 rounding), so that every pair is clearly in or out
    threshold = next(t for t in np.arange(0.93, 0.94, 1e-4) if not (np.abs(sims - t) < 2 * TOLERANCE).any())
    groups, pairs = group_vectors(ids, x, threshold, block=512)
    over, unsure = brute_pairs(x, threshold)
    assert not unsure
    assert pairs == len(over)
    expected = components(len(x), over)
    assert len(expected) > 100 and max(map(len, expected)) > 5  # chains, not just pairs
    assert {frozenset(g.tolist()) for g in groups} == {frozenset(7 + 3 * r for r in g) for g in expected}
    assert all((np.diff(g) > 0).all() for g in groups)


def test_copies_are_found_at_threshold_one():
    x = clustered(50, seed=2)
    x = np.concatenate([x, x[[3, 3, 10]]])  # the same vector three more times, as files sharing one content
    groups, pairs = group_vectors(np.arange(len(x)), x, 1.0)
    assert sorted(map(sorted, (g.tolist() for g in groups))) == [[3, 50, 51], [10, 52]]
    assert pairs == 4


def test_a_threshold_that_links_too_many_pairs_stops_with_advice():
    x = clustered(400, centres=3, spread=0.5)
    with pytest.raises(CNClipError, match=r"more than 100 pairs of the 400 photos.*raise the threshold"):
        group_vectors(np.arange(400), x, 0.5, max_pairs=100)


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, float("nan")])
def test_threshold_outside_zero_to_one_is_refused(bad):
    with pytest.raises(CNClipError, match=r"outside \(0, 1\]"):
        check_threshold(bad)
    with pytest.raises(CNClipError, match=r"outside \(0, 1\]"):
        group_vectors(np.arange(3), clustered(3), bad)


# -- from a catalog -------------------------------------------------------------------------------


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


class Library:
    """A catalog of real image files (their headers give the pixels) with chosen vectors, sizes and times."""

    def __init__(self, tmp_path):
        self.root = tmp_path / "photos"
        self.catalog = Catalog.open(tmp_path / "idx", create=True)
        identity = ModelIdentity(
            name="tiny", source="tiny", digest="ab" * 32, dim=DIM, image_size=32, preprocessing="x"
        )
        self.catalog.bind_model(identity)
        self.scan = self.catalog.begin_scan()
        self.rng = np.random.default_rng(5)

    def add(self, name: str, vector: np.ndarray, size=(64, 48), nbytes=100, mtime=1, write=True) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if write:
            Image.new("RGB", size, (90, 120, 150)).save(path)
        self.catalog.put_files(self.scan, [NewFile(str(path), nbytes, mtime, f"hash-{name}", vector)])
        return str(path)

    def near(self, v: np.ndarray, noise: float = 0.05) -> np.ndarray:
        return unit(v + noise * unit(self.rng.standard_normal(DIM)))


@pytest.fixture
def library(tmp_path):
    lib = Library(tmp_path)
    yield lib
    lib.catalog.close()


def test_best_copy_first_groups_by_size_then_score_offline_files_left_out(library):
    rng = np.random.default_rng(0)
    a, b, c, d = (unit(rng.standard_normal(DIM)) for _ in range(4))
    lib = library
    # group a: most pixels wins; then more bytes; then the oldest; a file gone from disk (no header) last
    lib.add("a/best.png", lib.near(a), size=(200, 150), nbytes=500, mtime=5)
    lib.add("a/heavy.png", lib.near(a), size=(100, 75), nbytes=900, mtime=9)
    lib.add("a/old.png", lib.near(a), size=(100, 75), nbytes=300, mtime=1)
    lib.add("a/new.png", lib.near(a), size=(100, 75), nbytes=300, mtime=9)
    lib.add("a/gone.png", lib.near(a), nbytes=10_000, mtime=0, write=False)
    # groups b and c have two files each: c's are closer copies, so it comes first
    lib.add("b/1.png", lib.near(b, 0.15))
    lib.add("b/2.png", lib.near(b, 0.15))
    lib.add("c/1.png", lib.near(c, 0.02))
    lib.add("c/2.png", lib.near(c, 0.02))
    # group d lies on a drive that is not mounted; so does a copy of a
    lib.add("drive/d1.png", lib.near(d))
    lib.add("drive/d2.png", lib.near(d))
    lib.add("drive/a-copy.png", lib.near(a), size=(400, 300), nbytes=99_999)
    for i in range(20):
        lib.add(f"other/{i}.png", unit(rng.standard_normal(DIM)))
    scan = lib.catalog.begin_scan()
    online = [r.path for r in lib.catalog.files_by_ids(lib.catalog.file_ids()).values() if "/drive/" not in r.path]
    lib.catalog.touch(scan, online)
    lib.catalog.mark_offline(scan, str(lib.root / "drive"), "not mounted")

    report = find_duplicates(lib.catalog, 0.9)

    names = [[m.path.removeprefix(str(lib.root) + "/") for m in g.members] for g in report.groups]
    assert [n[0] for n in names] == ["a/best.png", "c/1.png", "b/1.png"]  # the best copy first
    assert [sorted(n) for n in names] == [
        ["a/best.png", "a/gone.png", "a/heavy.png", "a/new.png", "a/old.png"],
        ["c/1.png", "c/2.png"],
        ["b/1.png", "b/2.png"],
    ]
    assert report.files == 5 + 4 + 20 and report.total_groups == 3 and report.notes == []
    best, *rest = report.groups[0].members
    assert (best.width, best.height, best.pixels, best.similarity) == (200, 150, 30_000, 1.0)
    assert [m.similarity for m in rest] == sorted((m.similarity for m in rest), reverse=True)  # closest first
    gone = next(m for m in rest if m.path.endswith("gone.png"))
    assert gone.width is None and gone.pixels is None
    vectors = dict(zip(*(lambda ids, v: (ids.tolist(), v))(*next(lib.catalog.file_vectors())), strict=True))
    for m in rest:
        assert m.similarity == pytest.approx(float(vectors[m.id] @ vectors[best.id]), abs=1e-6)
    assert report.groups[0].score == pytest.approx(np.mean([m.similarity for m in rest]))
    assert report.groups[1].score > report.groups[2].score
    assert report.duplicates == 4 + 1 + 1
    as_json = report.to_dict()
    assert as_json["groups"][0]["members"][0] == {
        "id": best.id,
        "path": best.path,
        "similarity": 1.0,
        "width": 200,
        "height": 150,
        "bytes": 500,
        "mtime": 5e-9,
    }


def test_a_huge_group_lists_its_largest_files_and_says_so(library):
    rng = np.random.default_rng(1)
    a, b = unit(rng.standard_normal(DIM)), unit(rng.standard_normal(DIM))
    for i in range(12):
        library.add(f"burst/{i:02d}.png", library.near(a, 0.02), nbytes=100 + i)
    library.add("pair/1.png", library.near(b, 0.02))
    library.add("pair/2.png", library.near(b, 0.02))

    report = find_duplicates(library.catalog, 0.9, max_members=5)
    burst = report.groups[0]
    assert burst.size == 12 and burst.capped and len(burst.members) == 5
    assert sorted(m.bytes for m in burst.members) == [107, 108, 109, 110, 111]
    assert "1 group of more than 5 photos (the largest: 12)" in report.notes[0]
    assert "raise the threshold" in report.notes[0]
    assert report.duplicates == 11 + 1

    first = find_duplicates(library.catalog, 0.9, limit=1)
    assert [g.size for g in first.groups] == [12] and first.total_groups == 2
    assert first.notes == ["showing the first 1 of 2 groups"]


def test_an_empty_index_has_no_groups(tmp_path):
    with Catalog.open(tmp_path / "idx", create=True) as catalog:
        report = find_duplicates(catalog)
    assert (report.groups, report.files, report.pairs, report.total_groups) == ([], 0, 0, 0)
