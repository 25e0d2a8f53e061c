"""kill -9 at every named moment of `cnclip index` (cnclip.faults), not at a random time.

Each case indexes a folder, changes it (photos added, deleted, modified, renamed), then runs the
real `cnclip index` with `$CNCLIP_FAULT` set so that it dies right at one point. Then:
- a reader that opens the index right after the crash searches exactly what the catalog holds
  (a brute-force search over the catalog's own vectors), whatever the vector files say;
- the next run finishes the job: the catalog equals one built from scratch on the changed
  folder, the saved vector file is current and equals it too, and no temporary is left.
"""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest
from conftest import indexed_vectors, run_cli, solid_photo

import cnclip
from cnclip.faults import POINTS
from cnclip.index.index import Index

# the point, and which time it is reached (a catalog commit happens many times per run)
INDEX_POINTS = [
    "catalog.before_commit@2",  # mid-embedding: a batch complete, not committed
    "catalog.after_commit@2",  # a batch committed, the next not begun
    "catalog.after_commit@4",
    "scan.before_sweep",  # every new photo in, nothing removed yet
    "atomic.mid_write",  # the vector file's meta half-written
    "atomic.before_rename",  # a new vector file complete under its temporary name
    "atomic.after_rename",  # the new vector file in place, its meta not yet
    "vectors.between_files",
]


@pytest.fixture(scope="module")
def model(model_dir):
    return cnclip.load_model(str(model_dir))


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _first_state(photos, rng) -> None:
    for i in range(12):
        solid_photo(photos / f"d{i % 3}" / f"p{i:02d}.png", _colour(rng))


def _change(photos, rng) -> None:
    """Less than half of the library at once, so the run removes rather than keeps offline."""
    (photos / "d0" / "p00.png").unlink()
    (photos / "d1" / "p01.png").unlink()
    solid_photo(photos / "d2" / "p02.png", _colour(rng))  # modified
    os.utime(photos / "d2" / "p02.png", ns=(1, 1))
    os.rename(photos / "d0" / "p03.png", photos / "d1" / "renamed.png")
    for i in range(5):
        solid_photo(photos / "new" / f"n{i}.png", _colour(rng))


def _matches_the_catalog(idx) -> None:
    """A reader's results equal a brute-force search over the catalog's vectors."""
    with Index.open(idx) as index:
        vectors = index.refresh()
        ids, stored = (np.concatenate(p) for p in zip(*index.catalog.file_vectors(), strict=True))
        assert vectors.ntotal == ids.size == index.catalog.count()
        queries = np.random.default_rng(7).standard_normal((4, stored.shape[1])).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        scores, found = vectors.search(queries, 5)
        exact = queries @ stored.T
        column = {int(file_id): i for i, file_id in enumerate(ids)}
        for q in range(len(queries)):
            # the best scores, each from the catalog's own vector of the file returned (a renamed
            # photo shares its vector with its old path until the sweep: ties in either order)
            np.testing.assert_allclose(scores[q], np.sort(exact[q])[::-1][:5], atol=1e-5)
            np.testing.assert_allclose(scores[q], [exact[q][column[int(i)]] for i in found[q]], atol=1e-5)


def test_every_index_point_is_a_known_fault_point():
    assert {p.split("@")[0] for p in INDEX_POINTS} <= set(POINTS)


@pytest.mark.parametrize("point", INDEX_POINTS)
def test_kill_9_at_a_named_point_of_index_loses_nothing_and_misleads_no_reader(point, tmp_path, model_dir, model):
    rng = np.random.default_rng(abs(hash(point)) % 2**32)
    photos, idx, reference = tmp_path / "photos", tmp_path / "idx", tmp_path / "reference"
    _first_state(photos, rng)
    with Index.open(idx, model=model, create=True) as index:
        index.add_folder(photos)
    _change(photos, rng)

    killed = run_cli(
        "index", photos, "--index", idx, "--model", model_dir, "-q", "--batch-size", "2", env={"CNCLIP_FAULT": point}
    )
    assert killed.returncode == -signal.SIGKILL, f"{point} was never reached: {killed.returncode} {killed.stderr}"
    _matches_the_catalog(idx)  # right after the crash, before anyone repairs anything

    with Index.open(idx, model=model) as index:
        index.add_folder(photos)  # the next run carries on
    with Index.open(reference, model=model, create=True) as index:
        index.add_folder(photos)
    got, want = indexed_vectors(idx), indexed_vectors(reference)
    assert sorted(got) == sorted(want)
    for path, vector in got.items():
        np.testing.assert_allclose(vector, want[path], atol=1e-5)
    _matches_the_catalog(idx)
    with Index.open(idx) as index:
        assert index.stats()["vector_index"]["current"] is True and index.stats()["offline"] == 0
    assert not [p.name for p in idx.iterdir() if ".tmp" in p.name]


def test_an_unknown_fault_point_is_refused_in_one_line(tmp_path):
    out = run_cli("info", "--index", tmp_path, env={"CNCLIP_FAULT": "no.such.point"})
    assert out.returncode != 0 and "no fault point 'no.such.point'" in out.stderr
    assert "Traceback" not in out.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
