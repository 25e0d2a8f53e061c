"""Search filters: parsing, the SQL they select, and filtered top-k equal to brute force at 10^5."""

from __future__ import annotations

import numpy as np
import pytest
from vector_sets import clustered

from cnclip.errors import QueryError
from cnclip.index.catalog import Catalog, ModelIdentity, NewFile
from cnclip.index.filters import SearchFilter, parse_date, parse_size
from cnclip.index.folder import FILTER_SCAN_ROWS, Index
from cnclip.index.metadata import PhotoInfo

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


def test_contradictions_are_refused():
    with pytest.raises(QueryError, match="swap them"):
        SearchFilter(after=parse_date("2024-09"), before=parse_date("2024-06"))
    with pytest.raises(QueryError, match="swap them"):
        SearchFilter(min_size=10, max_size=5)
    with pytest.raises(QueryError, match="unknown kind 'gif'"):
        SearchFilter(kind="gif")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """10^5 files in 10 folders, with dates over 2020-2024, two cameras and sizes; exact vector search."""
    folder = tmp_path_factory.mktemp("big")
    vectors = clustered(N, DIM, seed=3)
    rng = np.random.default_rng(5)
    days = rng.integers(0, 5 * 365, N)
    with Catalog.open(folder / "idx", create=True) as catalog:
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
    index = Index.open(folder / "idx", vector_kind="exact")
    yield index, ids, vectors, days
    index.close()


def _truth(ids, vectors, mask, query, k):
    chosen_ids, chosen = ids[mask], vectors[mask]
    scores = chosen @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return chosen_ids[order].tolist(), scores[order]


@pytest.mark.parametrize(
    ("name", "options", "rows"),
    [
        ("one folder in one month", {"folders": ["/photos/f3"], "after": "2022-03", "before": "2022-04"}, "few"),
        ("a camera", {"camera": "iphone"}, "many"),
        ("two years", {"after": "2021", "before": "2023"}, "many"),
        ("large files in one folder", {"folders": ["/photos/f7"], "min_size": 60_000}, "few"),
    ],
)
def test_filtered_top_k_equals_brute_force_over_the_filtered_rows(big, name, options, rows):
    index, ids, vectors, days = big
    where = index.filter(**options)
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
    assert (mask.sum() <= FILTER_SCAN_ROWS) == (rows == "few"), mask.sum()  # both strategies are covered
    rng = np.random.default_rng(11)
    for q in range(5):
        query = vectors[rng.integers(N)] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
        query /= np.linalg.norm(query)
        want_ids, want_scores = _truth(ids, vectors, mask, query, 10)
        hits = index._image_hits(query[None, :], 10, where)
        assert [h.id for h in hits] == want_ids, (name, q)
        np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)


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


def test_folder_names_relative_to_an_indexed_root_and_unknown_ones(big, tmp_path):
    index, *_ = big
    index.catalog.record_root("/photos")
    assert index.filter(folders=["f3"]).folders == ("/photos/f3",)
    assert index.filter(folders=["/photos/f3"]).folders == ("/photos/f3",)
    with pytest.raises(QueryError, match=r"no indexed photos under 旅行/2024; give a folder inside an indexed one"):
        index.filter(folders=["旅行/2024"])
