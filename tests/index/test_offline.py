"""Not seen is not gone: folders that cannot be seen keep their files offline, restored photos are
reused, and a sweep never removes most of a library as a side effect (faults injected in-process)."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import random_images

from cnclip.index import scan
from cnclip.index.folder import Index


def _photos(folder, n: int, seed: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(random_images(n, seed=seed)):
        paths.append(folder / f"{folder.name}{i}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture
def library(tmp_path):
    """Pictures/ with 3 local photos and `trip`, a symlink to a folder of 4 on a "NAS"."""
    pictures = tmp_path / "Pictures"
    _photos(pictures, 3, seed=1)
    nas_trip = tmp_path / "nas" / "trip"
    _photos(nas_trip, 4, seed=2)
    (pictures / "trip").symlink_to(nas_trip, target_is_directory=True)
    return pictures, nas_trip


@pytest.fixture
def index(tmp_path, tiny_vit):
    with Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        yield index


def _paths(index: Index) -> set[str]:
    hits = index.search_image(random_images(1, seed=99)[0], k=100)
    return {os.path.basename(h.path) for h in hits}


def test_an_unmounted_symlinked_folder_stays_offline_and_comes_back_without_embedding(library, index, tmp_path):
    pictures, nas_trip = library
    first = index.add_folder(pictures)
    assert first.added == 7 and index.catalog.count() == 7

    unmounted = tmp_path / "nas-unmounted"
    nas_trip.parent.rename(unmounted)  # the drive is gone: Pictures/trip is a dangling symlink
    gone = index.add_folder(pictures)
    assert gone.removed == 0 and gone.embedded == 0
    [offline] = gone.offline
    assert offline["path"] == str(pictures / "trip") and offline["files"] == 4
    assert "symlink target missing" in offline["reason"]
    assert index.catalog.count() == 3 and index.stats()["offline"] == 4
    assert _paths(index) == {"Pictures0.png", "Pictures1.png", "Pictures2.png"}  # offline files are not found
    again = index.add_folder(pictures)  # still unmounted: still kept
    assert again.removed == 0 and again.offline[0]["files"] == 4

    unmounted.rename(nas_trip.parent)  # mounted again
    back = index.add_folder(pictures)
    assert (back.embedded, back.removed, back.offline, back.unchanged) == (0, 0, [], 7)
    assert index.catalog.count() == 7 and index.stats()["offline"] == 0
    assert len(_paths(index)) == 7


def test_a_folder_that_cannot_be_read_keeps_its_files(library, index, monkeypatch):
    pictures, _ = library
    index.add_folder(pictures)
    real = os.scandir

    def failing(path):
        if os.path.basename(path) == "trip":
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(scan.os, "scandir", failing)
    summary = index.add_folder(pictures)
    assert summary.removed == 0
    assert summary.offline == [{"path": str(pictures / "trip"), "reason": "permission denied", "files": 4}]
    assert index.catalog.count() == 3


def test_an_empty_then_missing_root_keeps_everything_until_pruned_and_vectors_outlive_prune(index, tmp_path):
    root = tmp_path / "mnt" / "photos"
    _photos(root, 4, seed=3)
    index.add_folder(root)
    aside = tmp_path / "aside"
    shutil.move(root, aside)
    root.mkdir()  # a mount point with the drive gone: an empty folder
    empty = index.add_folder(root)
    assert empty.removed == 0 and empty.offline[0]["files"] == 4 and "folder is empty" in empty.offline[0]["reason"]
    assert index.search_image(random_images(1, seed=98)[0]) == []

    root.rmdir()  # not even the mount point
    missing = index.add_folder(root)
    assert missing.removed == 0 and "folder not found" in missing.offline[0]["reason"]

    pruned = index.add_folder(root, prune=True)  # removing what cannot be seen is an explicit act
    assert pruned.removed == 4 and pruned.offline == []
    assert index.catalog.files_under(str(root)) == 0 and index.catalog.unused_vectors() == 4

    shutil.move(aside, root)  # and back after all: nothing is embedded again
    restored = index.add_folder(root)
    assert (restored.added, restored.reused, restored.embedded) == (4, 4, 0)
    assert index.catalog.unused_vectors() == 0


def test_most_of_a_root_gone_at_once_is_kept_offline_unless_pruned(index, tmp_path):
    root = tmp_path / "photos"
    paths = _photos(root, 6, seed=4)
    index.add_folder(root)
    paths[0].unlink()  # one photo deleted: an ordinary removal
    assert index.add_folder(root).removed == 1
    for p in paths[1:4]:
        p.unlink()  # then 3 of the 5 left at once: more than half
    held = index.add_folder(root)
    assert held.removed == 0 and held.offline[0]["files"] == 3
    assert "3 of 5 files gone at once" in held.offline[0]["reason"] and "--prune" in held.offline[0]["reason"]
    assert index.catalog.count() == 2
    assert index.add_folder(root, prune=True).removed == 3


def test_a_photo_deleted_and_restored_from_the_trash_is_reused(index, tmp_path):
    root = tmp_path / "photos"
    paths = _photos(root, 5, seed=5)
    index.add_folder(root)
    trash = tmp_path / "trash.png"
    shutil.move(paths[2], trash)
    assert index.add_folder(root).removed == 1
    assert index.catalog.unused_vectors() == 1  # kept, by content
    shutil.move(trash, paths[2])
    restored = index.add_folder(root)
    assert (restored.added, restored.reused, restored.embedded) == (1, 1, 0)
    assert len(_paths(index)) == 5

    paths[2].unlink()
    index.add_folder(root)
    assert index.catalog.collect_garbage(older_than_s=3600) == 0  # kept while young
    assert index.catalog.collect_garbage() == 1
    assert index.catalog.unused_vectors() == 0
