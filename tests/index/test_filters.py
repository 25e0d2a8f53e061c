"""Search filters: parsing, the SQL they select, and filtered top-k against brute force at 10^5, per index kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vector_sets import clustered

import cnclip.index.vectors.ondisk_train as ondisk_train
from cnclip.errors import QueryError
from cnclip.index.catalog import Catalog, ModelIdentity, NewFile
from cnclip.index.filters import SearchFilter, parse_date, parse_size
from cnclip.index.index import Index
from cnclip.index.metadata import PhotoInfo
from cnclip.index.vectors import FILTER_SCAN_ROWS, ONDISK_KIND

N, DIM = 100_000, 64


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("2024", "2024-01-01T00:00:00"),
        ("2024-06", "2024-06-01T00:00:00"),
        ("2024-6-5", "2024-06-05T00:00:00"),
        ("2024/06/15", "2024-06-15T00:00:00"),
        ("2024.6", "2024-06-01T00:00:00"),
        ("2024年6月", "2024-06-01T00:00:00"),
        ("2024年6月15日", "2024-06-15T00:00:00"),
        (" 2024年 ", "2024-01-01T00:00:00"),
    ],
)
def test_dates_name_the_start_of_a_period(text, start):
    assert parse_date(text) == start


@pytest.mark.parametrize("text", ["last summer", "24-06", "2024-13", "2024-02-30", ""])
def test_unreadable_dates_are_one_clear_error(text):
    with pytest.raises(QueryError, match="2024-06"):
        parse_date(text)


def test_sizes():
    assert parse_size("500") == 500
    assert parse_size("2M") == parse_size("2MB") == parse_size("2 mib") == 2 * 1024**2
    assert parse_size("1.5G") == int(1.5 * 1024**3)
    with pytest.raises(QueryError, match="500K, 2M"):
        parse_size("big")
    with pytest.raises(QueryError, match="larger than any file"):
        parse_size("9999999999999999999G")
    with pytest.raises(QueryError, match="cannot be"):
        SearchFilter(min_size=-1)


def test_contradictions_are_refused():
    with pytest.raises(QueryError, match="swap them"):
        SearchFilter(after=parse_date("2024-09"), before=parse_date("2024-06"))
    with pytest.raises(QueryError, match="swap them"):
        SearchFilter(min_size=10, max_size=5)
    with pytest.raises(QueryError, match="unknown kind 'gif'"):
        SearchFilter(kind="gif")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A catalog of 10^5 files in 10 folders, with dates over 2020-2024, two cameras and sizes."""
    folder = tmp_path_factory.mktemp("big") / "idx"
    vectors = clustered(N, DIM, seed=3)
    rng = np.random.default_rng(5)
    days = rng.integers(0, 5 * 365, N)
    with Catalog.open(folder, create=True) as catalog:
        catalog.bind_model(
            ModelIdentity(name=None, source="synthetic", digest="ab" * 32, dim=DIM, image_size=224, preprocessing="x")
        )
        scan = catalog.begin_scan()
        rows = [NewFile(f"/photos/f{i % 10}/p{i}.jpg", 1000 + i, 1, f"h{i}", vector=vectors[i]) for i in range(N)]
        for start in range(0, N, 10_000):
            catalog.put_files(scan, rows[start : start + 10_000])
        ids = np.array([catalog.file_id_for_path(r.path) for r in rows], dtype=np.int64)
        infos = []
        for i in range(N):
            taken = np.datetime64("2020-01-01") + np.timedelta64(int(days[i]), "D")
            camera = "Apple iPhone 13" if i % 3 == 0 else "SONY ILCE-7M3"
            infos.append((int(ids[i]), PhotoInfo(f"{taken}T12:00:00", "exif", camera, 4000, 3000)))
        catalog.set_info(infos)
    return folder, ids, vectors, days


@pytest.fixture(scope="module")
def big(library):
    """The library searched exactly."""
    folder, ids, vectors, days = library
    index = Index.open(folder, vector_kind="exact")
    yield index, ids, vectors, days
    index.close()


@pytest.fixture(scope="module", params=["ivf-flat", ONDISK_KIND])
def approximate(request, library):
    """The library behind an approximate vector index, built once per kind."""
    folder, ids, vectors, days = library
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ondisk_train, "_OPQ_ITER", 2)  # OPQ trained briefly: the kind's search path is the point
        patch.setattr(ondisk_train, "_OPQ_FIRST_ITER", 2)
        index = Index.open(folder, vector_kind=request.param)
        index.refresh()
    yield index, ids, vectors, days
    index.close()
    Index.open(folder, vector_kind="exact").close()  # the other fixtures' kind again


def _truth(ids, vectors, mask, query, k):
    chosen_ids, chosen = ids[mask], vectors[mask]
    scores = chosen @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return chosen_ids[order].tolist(), scores[order]


FILTERS = [
    ("one folder in one month", {"folders": ["/photos/f3"], "after": "2022-03", "before": "2022-04"}, "few"),
    ("a camera", {"camera": "iphone"}, "many"),
    ("two years", {"after": "2021", "before": "2023"}, "many"),
    ("large files in one folder", {"folders": ["/photos/f7"], "min_size": 60_000}, "few"),
]


def _mask(where, options, days):
    paths = np.array([f"/photos/f{i % 10}/" for i in range(N)])
    mask = np.ones(N, bool)
    if "folders" in options:
        mask &= paths == options["folders"][0] + "/"
    if "camera" in options:
        mask &= np.arange(N) % 3 == 0
    dates = np.datetime64("2020-01-01") + days.astype("timedelta64[D]")
    if "after" in options:
        mask &= dates >= np.datetime64(where.after[:10])
    if "before" in options:
        mask &= dates < np.datetime64(where.before[:10])
    if "min_size" in options:
        mask &= 1000 + np.arange(N) >= options["min_size"]
    return mask


def _queries(vectors, n=5):
    rng = np.random.default_rng(11)
    for _ in range(n):
        query = vectors[rng.integers(N)] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
        yield query / np.linalg.norm(query)


@pytest.mark.parametrize(("name", "options", "rows"), FILTERS)
def test_filtered_top_k_equals_brute_force_over_the_filtered_rows(big, name, options, rows):
    index, ids, vectors, days = big
    where = index.filter(**options)
    mask = _mask(where, options, days)
    assert (mask.sum() <= FILTER_SCAN_ROWS) == (rows == "few"), mask.sum()  # both sizes are covered
    for q, query in enumerate(_queries(vectors)):
        want_ids, want_scores = _truth(ids, vectors, mask, query, 10)
        hits = index._image_hits(query[None, :], 10, where)
        assert [h.id for h in hits] == want_ids, (name, q)
        np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)


@pytest.mark.parametrize(("name", "options", "rows"), FILTERS)
def test_filters_keep_the_recall_of_approximate_indexes(approximate, name, options, rows):
    """IVF-Flat visits more cells the fewer files a filter selects; the on-disk index scans few
    selected rows exactly and over-fetches for many. Either way only selected files come back,
    and the top 10 match brute force over them about as well as unfiltered search does."""
    index, ids, vectors, days = approximate
    where = index.filter(**options)
    mask = _mask(where, options, days)
    found = []
    for query in _queries(vectors):
        want_ids, _ = _truth(ids, vectors, mask, query, 10)
        got = [h.id for h in index._image_hits(query[None, :], 10, where)]
        assert len(got) == 10 and set(got) <= set(ids[mask].tolist()), name
        found.append(len(set(got) & set(want_ids)) / 10)
        if rows == "few" and index.refresh().kind == ONDISK_KIND:
            assert got == want_ids, name  # the selected rows' own vectors, scanned exactly
    assert np.mean(found) >= 0.9, (name, found)


def test_a_repeated_filter_sees_catalog_changes(big, tmp_path):
    """The files a filter selects are cached per open index, until anything in the catalog
    changes, including facts written by another connection (another process)."""
    index, ids, vectors, days = big
    where = index.filter(camera="Leica")
    assert index._image_hits(vectors[:1], 10, where) == []
    with Catalog.open(index.catalog.folder) as other:
        other.set_info([(int(ids[5]), PhotoInfo("2021-01-01T00:00:00", "exif", "Leica Q2", 4000, 3000))])
    try:
        assert [h.id for h in index._image_hits(vectors[:1], 10, where)] == [int(ids[5])]
    finally:
        with Catalog.open(index.catalog.folder) as other:
            other.set_info([(int(ids[5]), PhotoInfo("2021-01-01T00:00:00", "exif", "SONY ILCE-7M3", 4000, 3000))])
    assert index._image_hits(vectors[:1], 10, where) == []


@pytest.mark.parametrize(
    ("after", "before", "through_index"),
    [("2022-03", "2022-04", True), ("2022-01", "2022-07", True), ("2021", "2023", False), ("2021", None, False)],
)
def test_only_short_periods_read_through_the_date_index(big, after, before, through_index):
    """Reading many rows through the date index (a random lookup each) was up to 9x slower than
    scanning the table; SQLite is kept off it unless the period is at most half a year."""
    index, *_ = big
    clause, params = index.filter(after=after, before=before).sql()
    plan = index.catalog._db.execute(
        f"EXPLAIN QUERY PLAN SELECT id FROM files WHERE vector_id IS NOT NULL AND offline IS NULL AND ({clause})",
        params,
    ).fetchall()
    assert ("files_taken" in " ".join(str(row[-1]) for row in plan)) == through_index, plan


def test_a_filter_that_selects_nothing_returns_nothing(big):
    index, *_ = big
    where = index.filter(after="2030")
    assert index._image_hits(np.ones((1, DIM), np.float32) / 8, 10, where) == []


def test_fewer_matches_than_k_returns_them_all(big):
    index, ids, vectors, days = big
    first_day = int(days.min())
    mask = days == first_day
    where = SearchFilter(after=f"{np.datetime64('2020-01-01') + first_day}T00:00:00", before="2020-01-02T00:00:00")
    assert 10 < mask.sum() < 200
    hits = index._image_hits(vectors[:1], 200, where)
    assert sorted(h.id for h in hits) == sorted(ids[mask].tolist())


EDGES = [  # the last and first second of each period a filter below names
    "2023-12-31T23:59:59",
    "2024-01-01T00:00:00",
    "2024-05-31T23:59:59",
    "2024-06-01T00:00:00",
    "2024-07-15T12:00:00",
    "2024-08-31T23:59:59",
    "2024-09-01T00:00:00",
    "2024-12-31T23:59:59",
    "2025-01-01T00:00:00",
]


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    """One photo taken at each of EDGES, named by its time."""
    folder = tmp_path_factory.mktemp("edges") / "idx"
    vectors = clustered(len(EDGES), DIM, seed=7)
    with Catalog.open(folder, create=True) as catalog:
        catalog.bind_model(
            ModelIdentity(name=None, source="synthetic", digest="cd" * 32, dim=DIM, image_size=224, preprocessing="x")
        )
        rows = [NewFile(f"/photos/{t}.jpg", 1000, 1, f"h{t}", vector=v) for t, v in zip(EDGES, vectors, strict=True)]
        catalog.put_files(catalog.begin_scan(), rows)
        infos = [(catalog.file_id_for_path(r.path), PhotoInfo(t, "exif")) for r, t in zip(rows, EDGES, strict=True)]
        catalog.set_info(infos)
    index = Index.open(folder, vector_kind="exact")
    yield index
    index.close()


@pytest.mark.parametrize(
    ("after", "before", "first", "last"),
    [
        ("2024-06", "2024-09", "2024-06-01T00:00:00", "2024-08-31T23:59:59"),  # a short period: the date index
        ("2024-06-01", "2024-09-01", "2024-06-01T00:00:00", "2024-08-31T23:59:59"),
        ("2024", "2025", "2024-01-01T00:00:00", "2024-12-31T23:59:59"),  # a long one: a table scan
        ("2024-06", None, "2024-06-01T00:00:00", EDGES[-1]),
        (None, "2024-06", EDGES[0], "2024-05-31T23:59:59"),
        ("2025", None, "2025-01-01T00:00:00", EDGES[-1]),
        (None, "2024", EDGES[0], "2023-12-31T23:59:59"),
    ],
)
def test_after_takes_its_first_second_and_before_stops_short_of_its_own(edges, after, before, first, last):
    """A photo taken at 00:00:00 on the first day of `--after`'s period is in; one taken then on
    the first day of `--before`'s period is out, and the second before it is in."""
    where = edges.filter(after=after, before=before)
    hits = edges._image_hits(np.ones((1, DIM), np.float32) / 8, len(EDGES), where)
    assert sorted(Path(h.path).stem for h in hits) == [t for t in EDGES if first <= t <= last]


def test_folder_names_relative_to_an_indexed_root_and_unknown_ones(big, tmp_path):
    index, *_ = big
    index.catalog.record_root("/photos")
    assert index.filter(folders=["f3"]).folders == ("/photos/f3",)
    assert index.filter(folders=["/photos/f3"]).folders == ("/photos/f3",)
    with pytest.raises(QueryError, match=r"no indexed photos under 旅行/2024; give a folder inside an indexed one"):
        index.filter(folders=["旅行/2024"])
