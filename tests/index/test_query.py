"""Combined queries: the `A + B - C` / `TEXT:W` syntax, the arithmetic against numpy, and
`Index.search_combined` against brute force over the stored vectors, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_images

import cnclip
from cnclip.errors import QueryError
from cnclip.index.query import (
    FILE,
    IMAGE,
    MAX_TERMS,
    TEXT,
    Term,
    build_terms,
    combine,
    describe,
    has_operators,
    image_term,
    parse_query,
    split_weight,
)

# -- the syntax -----------------------------------------------------------------------------------


def test_operators_need_spaces_on_both_sides():
    assert parse_query("猫 + 狗 - 草地") == [Term(TEXT, "猫"), Term(TEXT, "狗"), Term(TEXT, "草地", -1.0)]
    assert parse_query("  猫\t-\n狗 ") == [Term(TEXT, "猫"), Term(TEXT, "狗", -1.0)]
    for plain in ("Wi-Fi 路由器", "C++ 教程", "猫 -狗", "猫- 狗", "零下-10度", "a+b", "猫 +", "- 草地"):
        assert not has_operators(plain), plain
        assert build_terms(plain) == [Term(TEXT, plain.strip())]


def test_weights_scale_terms_and_keep_their_sign():
    assert split_weight("夜景:0.5") == ("夜景", 0.5)
    assert split_weight("夜景 : 2") == ("夜景", 2.0)
    assert split_weight("夜景:1e-1") == ("夜景", 0.1)
    assert split_weight("夜景") == ("夜景", 1.0)
    assert split_weight("时间:晚上") == ("时间:晚上", 1.0)
    assert parse_query("日落:2 + 夜景:.5 - 人群:3") == [
        Term(TEXT, "日落", 2.0),
        Term(TEXT, "夜景", 0.5),
        Term(TEXT, "人群", -3.0),
    ]
    # a lone query is taken literally: a weight would mean nothing once the vector is renormalized
    assert build_terms("比分 3:2") == [Term(TEXT, "比分 3:2")]
    assert build_terms("猫", not_texts=["狗:0.5"]) == [Term(TEXT, "猫"), Term(TEXT, "狗", -0.5)]


def test_image_terms_from_the_command_line(tmp_path):
    odd = tmp_path / "x:2.png"  # a file whose name ends like a weight is never split
    random_images(1)[0].save(odd)
    assert image_term(str(odd)) == Term(IMAGE, str(odd))
    assert image_term(str(tmp_path / "a.png:0.5"), -1.0) == Term(IMAGE, str(tmp_path / "a.png"), -0.5)
    assert build_terms(None, [str(odd)]) == [Term(IMAGE, str(odd))]
    terms = build_terms("海边", ["a.jpg", "b.jpg:2"], ["人群"], ["c.jpg"])
    assert terms == [
        Term(TEXT, "海边"),
        Term(IMAGE, "a.jpg"),
        Term(IMAGE, "b.jpg", 2.0),
        Term(TEXT, "人群", -1.0),
        Term(IMAGE, "c.jpg", -1.0),
    ]
    assert describe(terms) == "海边 + a.jpg + b.jpg:2 - 人群 - c.jpg"
    assert describe([Term(FILE, 7, 0.25), Term(TEXT, "猫")]) == "#7:0.25 + 猫"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: parse_query("猫 + + 狗"), "empty term"),
        (lambda: parse_query("猫 +   - 狗"), "empty term"),
        (lambda: parse_query("猫 + 狗:0"), "above 0"),
        (lambda: parse_query("猫 + 狗:-2"), "above 0"),
        (lambda: parse_query("猫 + 狗:inf"), "above 0"),  # not the text "狗:inf"
        (lambda: parse_query("猫 + 狗:NaN"), "above 0"),
        (lambda: build_terms("猫", not_texts=["狗:-Infinity"]), "above 0"),
        (lambda: build_terms("\u200b\ufeff"), "empty"),  # only invisible characters: no text to read
        (lambda: build_terms("猫", not_texts=["\x00"]), "empty"),
        (lambda: parse_query("猫 + :2"), "empty"),
        (lambda: build_terms("猫", not_texts=["   "]), "empty"),
        (lambda: build_terms(None, not_images=["a.jpg"]), "only subtracts"),
        (lambda: build_terms(" + ".join(["猫"] * (MAX_TERMS + 1))), f"at most {MAX_TERMS}"),
        (lambda: Term("video", "a.mp4"), "unknown query term kind"),
        (lambda: Term(TEXT, "猫", 0.0), "non-zero"),
        (lambda: Term(TEXT, "猫", float("nan")), "non-zero"),
        (lambda: Term(FILE, "12"), "file id"),
        (lambda: Term(FILE, True), "file id"),
    ],
)
def test_unusable_terms_are_one_line_query_errors(make, says):
    with pytest.raises(QueryError, match=says) as caught:
        make()
    assert "\n" not in str(caught.value)


# -- the arithmetic -------------------------------------------------------------------------------


def test_combine_is_the_renormalized_weighted_sum_of_unit_vectors():
    e1, e2 = np.eye(2, dtype=np.float32)
    np.testing.assert_allclose(combine(np.stack([e1, e2]), [1, 1]), [[2**-0.5, 2**-0.5]], rtol=1e-6)
    # rows are made unit first: a long vector counts no more than a short one
    np.testing.assert_allclose(combine(np.array([[3.0, 0.0], [0.0, 0.5]]), [1, 1]), [[2**-0.5, 2**-0.5]], rtol=1e-6)
    np.testing.assert_allclose(combine(np.stack([e1, e2]), [1, -3]), [[10**-0.5, -3 * 10**-0.5]], rtol=1e-6)
    out = combine(np.random.default_rng(0).normal(size=(3, 7)), [1, 0.5, -0.2])
    assert out.shape == (1, 7) and out.dtype == np.float32
    assert float(np.linalg.norm(out)) == pytest.approx(1.0, abs=1e-6)


def test_a_combination_that_cancels_out_is_refused():
    v = np.random.default_rng(1).normal(size=(1, 16))
    with pytest.raises(QueryError, match="cancels out"):
        combine(np.concatenate([v, v]), [1, -1])
    with pytest.raises(QueryError, match="cancels out"):
        combine(np.concatenate([v, 2 * v, v]), [1, -2, 1])  # unit rows: 1 - 2 + 1 = 0
    with pytest.raises(QueryError, match="one weight per vector"):
        combine(v, [1, 1])


# -- on an index ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("combined") / "photos"
    root.mkdir()
    for i, image in enumerate(random_images(8, seed=13)):
        image.save(root / f"{i}.png")
    return root


@pytest.fixture
def index(tiny_vit, photos, tmp_path):
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(photos, workers=1)
        yield index


def _stored(index) -> tuple[list[str], np.ndarray]:
    ids, vectors = next(index.catalog.file_vectors())
    records = index.catalog.files_by_ids(ids.tolist())
    return [records[i].path for i in ids.tolist()], vectors


def test_search_combined_ranks_by_the_weighted_sum_of_model_embeddings(index, tiny_vit_encoder, photos):
    outside = random_images(1, seed=77)[0]  # an image that is not in the index
    terms = [
        Term(TEXT, "海边的日落"),
        Term(TEXT, "夜景", 0.5),
        Term(TEXT, "人群", -0.8),
        Term(IMAGE, outside, 0.7),
        Term(IMAGE, photos / "3.png", -0.3),
    ]
    texts = tiny_vit_encoder.embed_texts(["海边的日落", "夜景", "人群"])
    images = tiny_vit_encoder.embed_images([outside, str(photos / "3.png")])
    weights = np.array([1, 0.5, -0.8, 0.7, -0.3])[:, None]
    rows = np.concatenate([texts, images]).astype(np.float64)
    summed = (weights * rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(axis=0)
    expected = summed / np.linalg.norm(summed)

    paths, vectors = _stored(index)
    scores = vectors.astype(np.float64) @ expected
    brute = [(paths[i], scores[i]) for i in np.argsort(-scores) if paths[i] != str(photos / "3.png")]

    hits = index.search_combined(terms, k=100)
    assert [h.path for h in hits] == [p for p, _ in brute]  # the indexed query image is left out
    assert [h.score for h in hits] == pytest.approx([s for _, s in brute], abs=1e-5)
    assert index.search_combined(terms, k=3) == hits[:3]

    kept = index.search_combined(terms, k=100, exclude_self=False)
    assert len(kept) == len(paths) and str(photos / "3.png") in {h.path for h in kept}


def test_a_file_id_term_is_the_indexed_photo(index, photos):
    path = photos / "5.png"
    file_id = index.catalog.file_id_for_path(str(path))
    by_path = index.search_combined([Term(TEXT, "雪山"), Term(IMAGE, path, 2.0)], k=100)
    by_id = index.search_combined([Term(TEXT, "雪山"), Term(FILE, file_id, 2.0)], k=100)
    assert by_id == by_path and len(by_id) == 7 and str(path) not in {h.path for h in by_id}
    with pytest.raises(QueryError, match="no indexed file with id 99999"):
        index.search_combined([Term(TEXT, "雪山"), Term(FILE, 99999)])


def test_text_terms_go_through_the_query_cache_and_traditional_to_simplified(index, tiny_vit_encoder, monkeypatch):
    simplified = index.search_combined([Term(TEXT, "城市夜景"), Term(TEXT, "汽车", -1.0)], k=5)
    calls = []
    real = tiny_vit_encoder.embed_texts
    monkeypatch.setattr(tiny_vit_encoder, "embed_texts", lambda texts: calls.append(texts) or real(texts))
    # 城市夜景 / 汽车 in Traditional characters: read as Simplified, then found in the cache
    assert index.search_combined([Term(TEXT, "城市夜景"), Term(TEXT, "汽車", -1.0)], k=5) == simplified
    assert calls == []


def test_terms_that_cancel_out_and_bad_k_are_query_errors(index):
    with pytest.raises(QueryError, match="cancels out"):
        index.search_combined(parse_query("猫 - 猫"))
    with pytest.raises(QueryError, match="cancels out"):
        index.search_combined([Term(TEXT, "猫", 2.0), Term(TEXT, "貓", -2.0)])  # the same text after t2s
    with pytest.raises(QueryError, match="only subtracts"):
        index.search_combined([Term(TEXT, "猫", -1.0)])
    with pytest.raises(QueryError, match="k must be at least 1"):
        index.search_combined([Term(TEXT, "猫"), Term(TEXT, "狗")], k=0)
