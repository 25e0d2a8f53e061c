"""Combined queries through the real `cnclip search`: `A + B - C`, --not, several --image, text and
image together, against the library's own `Index.search_combined` on the same index."""

from __future__ import annotations

import json

import pytest
from conftest import random_images, run_cli

import cnclip
from cnclip.index.query import IMAGE, TEXT, Term, parse_query

# PyTorch in both the CLI and the library below, so their scores agree to float rounding
TORCH = ("--backend", "torch")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """(index folder, photo folder): 7 generated photos indexed by a tiny random model."""
    import torch

    base = tmp_path_factory.mktemp("cli-combined")
    torch.manual_seed(8)
    model = cnclip.create_model("tiny-vit").save_pretrained(base / "model")
    photos = base / "照片"
    photos.mkdir()
    for i, image in enumerate(random_images(7, seed=31)):
        image.save(photos / f"p{i}.png")
    out = run_cli("index", photos, "--index", base / "idx", "--model", model, "-q", *TORCH)
    assert out.returncode == 0, out.stderr
    return base / "idx", photos


def _search(idx, *args: str) -> list[dict]:
    out = run_cli("search", *args, "--index", idx, "--json", "-k", "20", *TORCH)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _library(idx, terms, **options) -> list[tuple[str, float]]:
    with cnclip.Index.open(idx) as index:
        return [(h.path, h.score) for h in index.search_combined(terms, k=20, **options)]


def _same(cli: list[dict], library: list[tuple[str, float]]) -> None:
    assert [h["path"] for h in cli] == [p for p, _ in library]
    assert [h["score"] for h in cli] == pytest.approx([s for _, s in library], abs=1e-5)


def test_texts_images_and_nots_together_leave_the_query_photos_out(indexed):
    idx, photos = indexed
    a, b, c = (str(photos / f"p{i}.png") for i in (1, 4, 0))
    combined = _search(idx, "海边 + 日落:0.5", "--not", "人群", "--image", a, "--image", f"{b}:2", "--not-image", c)
    expected = parse_query("海边 + 日落:0.5") + [Term(IMAGE, a), Term(IMAGE, b, 2.0), Term(TEXT, "人群", -1.0)]
    _same(combined, _library(idx, [*expected, Term(IMAGE, c, -1.0)]))
    assert len(combined) == 4 and not {a, b, c} & {h["path"] for h in combined}


def test_include_self_and_the_title_of_the_page(indexed, tmp_path):
    idx, photos = indexed
    a, page = str(photos / "p1.png"), tmp_path / "hits.html"
    kept = _search(idx, "海边 - 人群", "--image", a, "--include-self", "--html", page)
    terms = [Term(TEXT, "海边"), Term(TEXT, "人群", -1.0), Term(IMAGE, a)]
    _same(kept, _library(idx, terms, exclude_self=False))
    assert a in {h["path"] for h in kept}
    assert "海边 - 人群 + p1.png" in page.read_text("utf-8")


def test_spaced_operators_are_arithmetic_and_other_hyphens_or_colons_plain_text(indexed):
    idx, _ = indexed
    arithmetic = _search(idx, "海边 + 日落:0.5 - 人群")
    plain_text = "Wi-Fi 比分 3:2 猫 -狗"  # no + or - with spaces around it: one text, and no weight
    plain = _search(idx, plain_text)
    with cnclip.Index.open(idx) as index:
        _same(plain, [(h.path, h.score) for h in index.search_text(plain_text, k=20)])
        terms = [Term(TEXT, "海边"), Term(TEXT, "日落", 0.5), Term(TEXT, "人群", -1.0)]
        _same(arithmetic, [(h.path, h.score) for h in index.search_combined(terms, k=20)])
    assert len(arithmetic) == 7


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("猫 - 猫",), "cancels out"),
        (("猫 + + 狗",), "empty term"),
        (("猫 + 狗:0",), "above 0"),
        (("--not", "狗"), "give a text query or --image FILE"),
        (("猫", "--image", "p.png", "--texts"), "--texts searches texts by one image"),
        (("猫", "--not", " "), "empty"),
    ],
)
def test_unusable_combinations_are_one_line_errors(indexed, args, says):
    idx, _ = indexed
    out = run_cli("search", *args, "--index", idx, *TORCH)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout == "" and out.stderr.startswith("cnclip: error: ") and says in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
