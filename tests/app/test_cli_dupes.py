"""`cnclip dupes` run as a user would, on a generated folder of photos, near-copies and exact copies.

A tiny random model need not see a resized or re-compressed photo as a copy, so these tests check
the plumbing against the index's own stored vectors (the grouping itself is tested on vectors in
tests/index/test_dupes.py); only byte-identical copies, which share one vector, group whatever the
model.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from conftest import indexed_vectors, random_images, run_cli
from PIL import Image

import cnclip


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_vit):
    """(photo folder, index folder): originals, their near-copies and exact copies, unrelated photos."""
    base = tmp_path_factory.mktemp("dupes")
    photos = base / "照片"
    (photos / "备份").mkdir(parents=True)
    originals = random_images(4, seed=31, size=(160, 120))
    for i, image in enumerate(originals):
        image.save(photos / f"原图{i}.jpg", quality=92)
    first = originals[0]
    first.resize((80, 60), Image.Resampling.BICUBIC).save(photos / "原图0-小.jpg", quality=92)
    first.save(photos / "原图0-q60.jpg", quality=60)
    first.crop((4, 3, 156, 117)).save(photos / "原图0-裁剪.jpg", quality=92)  # 5 % off the edges
    for i, image in enumerate(random_images(5, seed=32, size=(120, 90))):
        image.save(photos / f"别的{i}.jpg", quality=92)
    shutil.copyfile(photos / "原图0.jpg", photos / "备份" / "原图0 副本.jpg")
    shutil.copyfile(photos / "原图3.jpg", photos / "备份" / "原图3.jpg")
    os.utime(photos / "备份" / "原图0 副本.jpg", ns=(10**18, 10**18))  # the older of two equal copies
    with cnclip.Index.open(base / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(photos)
    return photos, base / "idx"


def expected_groups(vectors: dict[str, np.ndarray], threshold: float) -> set[frozenset[str]]:
    """Connected components of the pairs at or above `threshold`, by brute force over the stored vectors."""
    paths = sorted(vectors)
    parent = {p: p for p in paths}

    def root(p: str) -> str:
        while parent[p] != p:
            p = parent[p]
        return p

    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if float(vectors[a] @ vectors[b]) >= threshold:
                parent[root(a)] = root(b)
    groups: dict[str, set[str]] = {}
    for p in paths:
        groups.setdefault(root(p), set()).add(p)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def dupes_json(idx, threshold: float) -> dict:
    out = run_cli("dupes", "--index", idx, "--threshold", repr(threshold), "--json", "-q")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_byte_identical_copies_group_best_copy_first_and_nothing_changes(library):
    photos, idx = library
    before = {p: p.stat().st_mtime_ns for p in photos.rglob("*")}
    found = dupes_json(idx, 1.0)
    vectors = indexed_vectors(idx)
    groups = {frozenset(m["path"] for m in g["members"]) for g in found["groups"]}
    assert groups == expected_groups(vectors, 1.0 - 1e-5)
    copy0, copy3 = str(photos / "备份" / "原图0 副本.jpg"), str(photos / "备份" / "原图3.jpg")
    assert frozenset({str(photos / "原图0.jpg"), copy0}) in groups
    assert frozenset({str(photos / "原图3.jpg"), copy3}) in groups
    group0 = next(g for g in found["groups"] if copy0 in {m["path"] for m in g["members"]})
    best = group0["members"][0]
    assert best["path"] == copy0  # same pixels and bytes: the older one
    assert (best["width"], best["height"], best["similarity"]) == (160, 120, 1.0)
    assert found["files"] == len(vectors) == 14
    assert {p: p.stat().st_mtime_ns for p in photos.rglob("*")} == before  # nothing deleted, moved or touched


def test_groups_at_a_threshold_taken_from_the_vectors_plain_json_and_html(library, tmp_path):
    photos, idx = library
    vectors = indexed_vectors(idx)
    paths = sorted(vectors)
    sims = sorted((float(vectors[a] @ vectors[b]) for i, a in enumerate(paths) for b in paths[i + 1 :]), reverse=True)
    # below the 6th most similar pair, in a gap wide enough that float rounding cannot move a pair across
    k = next(k for k in range(6, len(sims)) if sims[k - 1] - sims[k] > 1e-4)
    threshold = round((sims[k - 1] + sims[k]) / 2, 6)
    expected = expected_groups(vectors, threshold)
    assert sum(len(g) * (len(g) - 1) // 2 for g in expected) >= k >= 6  # several pairs, chained or not

    found = dupes_json(idx, threshold)
    assert {frozenset(m["path"] for m in g["members"]) for g in found["groups"]} == expected
    assert found["pairs"] == k and found["total_groups"] == len(expected)
    sizes = [g["size"] for g in found["groups"]]
    assert sizes == sorted(sizes, reverse=True)
    for g in found["groups"]:
        best, *rest = g["members"]
        for m in rest:  # best copy first: most pixels, then most bytes, then oldest
            assert (best["width"] * best["height"], best["bytes"]) >= (m["width"] * m["height"], m["bytes"])
            assert m["similarity"] == pytest.approx(float(vectors[m["path"]] @ vectors[best["path"]]), abs=1e-5)

    page = tmp_path / "dupes.html"
    out = run_cli("dupes", "--index", idx, "--threshold", repr(threshold), "--html", page, "-q")
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.strip().split("\n\n")
    assert len(blocks) == len(expected)
    for block, g in zip(blocks, found["groups"], strict=True):
        head, *lines = block.splitlines()
        assert head.startswith("group ") and f"{g['size']} photos" in head
        assert [line.rsplit("\t", 1)[1] for line in lines] == [m["path"] for m in g["members"]]
        assert [line[0] for line in lines] == ["*"] + [" "] * (len(lines) - 1)
    assert "Nothing was deleted or moved" in out.stderr and f"wrote {page}" in out.stderr
    html = page.read_text("utf-8")
    assert html.count("<section") == len(expected)
    assert html.count("data:image/jpeg;base64,") == sum(len(g) for g in expected)
    assert html.count("最佳 · ") == len(expected)


def test_bad_threshold_and_missing_index_are_one_line_errors(library, tmp_path):
    _, idx = library
    for args, needle in [
        (("--threshold", "0", "--index", idx), "outside (0, 1]"),
        (("--threshold", "1.5", "--index", idx), "outside (0, 1]"),
        (("--threshold", "nan", "--index", idx), "outside (0, 1]"),
        (("--index", tmp_path / "nope"), "nope"),
    ]:
        out = run_cli("dupes", *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1, out.stderr
        assert lines[0].startswith("cnclip: error:") and needle in lines[0]
        assert out.stdout == ""
    assert not (tmp_path / "nope").exists()
    assert math.isfinite(dupes_json(idx, 0.99)["threshold"])
