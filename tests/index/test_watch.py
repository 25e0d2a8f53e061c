"""`Watcher`: files created, changed, moved and deleted under a watched folder reach searches within
seconds through the incremental scan; moved files keep their vectors; a folder that goes away keeps
its files offline and comes back; stopping leaves no thread behind."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
from conftest import eventually, random_images, write_photos, write_video

from cnclip.errors import CNClipError
from cnclip.index.folder import Index
from cnclip.index.watch import WatchBatch, Watcher, _plan

WITHIN_S = 20.0  # changes land in 1-2 s here; the margin is for a loaded CI machine, not the feature


def _found(index: Index) -> set[str]:
    """The searchable paths: an image query with k above the library's size returns every one."""
    return {h.path for h in index.search_image(random_images(1, seed=99)[0], k=100)}


def _total(batches: list[WatchBatch], count: str) -> int:
    return sum(getattr(b.summary, count) for b in batches)


def _eventually(condition, what: str):
    return eventually(condition, what, WITHIN_S)


@pytest.fixture
def library(tmp_path, tiny_vit):
    """(reader Index, photos folder with 3 indexed photos, index folder)."""
    photos = tmp_path / "photos"
    write_photos(photos, 3, seed=1)
    with Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(photos)
        yield index, photos, tmp_path / "idx"


@pytest.fixture
def watching(library, tiny_vit):
    """A started Watcher on the library (batches collected), stopped after the test with no thread left."""
    index, photos, idx = library
    before = set(threading.enumerate())
    batches: list[WatchBatch] = []
    errors: list[Exception] = []
    watcher = Watcher(idx, [photos], model=tiny_vit, scan_first=False, on_batch=batches.append, on_error=errors.append)
    watcher.start()
    yield index, photos, batches, errors
    watcher.stop()
    assert watcher.wait(0) and watcher.error is None and errors == []
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left running: {left}"


def test_created_renamed_and_deleted_files_reach_searches(watching):
    index, photos, batches, _ = watching
    [new] = write_photos(photos, 1, seed=7, prefix="new")
    _eventually(lambda: str(new) in _found(index), "a new photo is found")

    renamed = photos / "renamed.png"
    os.rename(new, renamed)
    _eventually(lambda: str(renamed) in _found(index) and str(new) not in _found(index), "the renamed photo")
    _eventually(lambda: _total(batches, "reused") == 1, "the rename reported")
    assert _total(batches, "embedded") == 1  # the rename reused the vector

    (photos / "p0.png").unlink()
    renamed.unlink()
    _eventually(lambda: _found(index) == {str(photos / "p1.png"), str(photos / "p2.png")}, "deleted photos leave")
    _eventually(lambda: _total(batches, "removed") == 3, "the old name of the renamed one, then these two")


def test_a_changed_photo_is_embedded_again(watching):
    index, photos, batches, _ = watching
    before = index.catalog.vector_for_path(str(photos / "p1.png"))
    random_images(1, seed=42)[0].save(photos / "p1.png")
    _eventually(lambda: _total(batches, "updated") >= 1, "the change is applied")
    after = index.catalog.vector_for_path(str(photos / "p1.png"))
    assert after is not None and not (after == before).all()
    assert len(_found(index)) == 3


def test_a_subfolder_created_later_is_watched(watching):
    index, photos, _, _ = watching
    [first] = write_photos(photos / "2024" / "trip", 1, seed=8, prefix="a")
    _eventually(lambda: str(first) in _found(index), "a photo in a new subfolder")
    [later] = write_photos(photos / "2024" / "trip", 1, seed=9, prefix="b")  # only the new folder's own watch sees this
    _eventually(lambda: str(later) in _found(index), "a later photo in that subfolder")


def test_a_moved_folder_keeps_its_vectors(watching):
    index, photos, batches, _ = watching
    album = write_photos(photos / "album", 4, seed=10, prefix="a")
    _eventually(lambda: {str(p) for p in album} <= _found(index) and _total(batches, "embedded") == 4, "the album")

    os.rename(photos / "album", photos / "moved")
    moved = {str(photos / "moved" / p.name) for p in album}
    _eventually(lambda: moved <= _found(index) and not {str(p) for p in album} & _found(index), "the moved album")
    _eventually(lambda: _total(batches, "reused") == 4, "the move reported")
    assert _total(batches, "embedded") == 4  # nothing embedded again
    assert index.stats()["offline"] == 0 and index.catalog.count() == 7


def test_photos_deleted_from_a_subfolder_are_removed_not_kept_offline(watching):
    index, photos, batches, _ = watching
    album = write_photos(photos / "album", 2, seed=14, prefix="a")
    _eventually(lambda: {str(p) for p in album} <= _found(index), "the album")
    for path in album:  # the folder stays, empty: its owner emptied it, no drive went away
        path.unlink()
    _eventually(lambda: not {str(p) for p in album} & _found(index), "the emptied album")
    _eventually(lambda: _total(batches, "removed") == 2, "the removal reported")
    assert index.stats()["offline"] == 0 and index.catalog.count() == 3
    assert str(photos) in index.catalog.roots() and str(photos / "album") not in index.catalog.roots()


def test_hidden_files_other_files_and_the_index_itself_are_ignored(tmp_path, tiny_vit):
    root = tmp_path / "photos"
    watcher = Watcher(root / "idx", [root], model=tiny_vit)
    scan = watcher._folder_to_scan
    assert scan(str(root), str(root / "a" / "x.jpg"), False, True) == str(root / "a")
    assert scan(str(root), str(root / "a"), True, True) == str(root / "a")  # a new folder: scan it
    assert scan(str(root), str(root / "a"), True, False) == str(root)  # a folder gone: scan its parent
    assert scan(str(root), str(root / "notes.txt"), False, True) is None
    assert scan(str(root), str(root / ".cache" / "x.jpg"), False, True) is None
    assert scan(str(root), str(root / "idx" / "catalog.sqlite3-wal"), False, True) is None
    assert scan(str(root), str(root / "idx" / "thumb.jpg"), False, True) is None
    assert scan(str(root), str(tmp_path / "elsewhere.jpg"), False, True) is None
    hidden = Watcher(root / "idx", [root], model=tiny_vit, include_hidden=True)
    assert hidden._folder_to_scan(str(root), str(root / ".cache" / "x.jpg"), False, True) == str(root / ".cache")


def test_a_batch_rescans_each_changed_folder_once_destinations_first(tmp_path):
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    touched = {
        str(root / "c"): False,  # lost a file
        str(root / "a" / "b"): True,  # gained one
        str(root / "a"): False,  # covers a/b: one recursive scan, which gains files
    }
    assert _plan({str(root): touched}) == [(str(root / "a"), str(root)), (str(root / "c"), str(root))]
    # a folder no longer there is rescanned from its nearest existing parent, here the root, which covers all
    gone = touched | {str(root / "gone" / "deeper"): False}
    assert _plan({str(root): gone}) == [(str(root), str(root))]


def test_a_watched_folder_that_goes_away_keeps_its_files_offline_and_comes_back(watching, tmp_path):
    index, photos, batches, _ = watching
    away = tmp_path / "unmounted"
    os.rename(photos, away)  # the drive is gone
    _eventually(lambda: not _found(index), "the missing folder's files leave searches")
    _eventually(lambda: any(b.summary.offline for b in batches), "the offline files reported")
    assert index.catalog.count() == 0 and index.stats()["offline"] == 3  # kept, not removed
    assert _total(batches, "removed") == 0

    os.rename(away, photos)  # mounted again
    _eventually(lambda: len(_found(index)) == 3, "its files return")
    back = _eventually(lambda: [b for b in batches if b.online], "their return reported")
    assert back[0].online == 3 and "3 back online" in back[0].describe()
    assert index.stats()["offline"] == 0 and _total(batches, "embedded") == 0
    [new] = write_photos(photos, 1, seed=11, prefix="new")  # and it is watched again
    _eventually(lambda: str(new) in _found(index), "a photo added after it came back")


def test_polling_finds_changes_where_events_do_not_arrive(library, tiny_vit):
    index, photos, idx = library
    with Watcher(idx, [photos], model=tiny_vit, poll=0.2, scan_first=False):
        [new] = write_photos(photos, 1, seed=12, prefix="new")
        _eventually(lambda: str(new) in _found(index), "a new photo, by polling")
        (photos / "p0.png").unlink()
        _eventually(lambda: str(photos / "p0.png") not in _found(index), "a deleted photo, by polling")


def test_the_first_pass_catches_up_on_changes_made_while_not_watching(library, tiny_vit):
    index, photos, idx = library
    [new] = write_photos(photos, 1, seed=13, prefix="new")
    batches: list[WatchBatch] = []
    with Watcher(idx, [photos], model=tiny_vit, on_batch=batches.append):
        _eventually(lambda: str(new) in _found(index), "a photo added before the watcher started")
    assert batches[0].summary.added == 1 and batches[0].summary.unchanged == 3
    assert index.stats()["vector_index"]["current"]  # saved by the watcher (at the latest when it stopped)


def test_a_watcher_on_a_missing_index_says_so_and_ends(tmp_path, tiny_vit):
    errors: list[Exception] = []
    photos = tmp_path / "photos"
    photos.mkdir()
    watcher = Watcher(tmp_path / "no-index", [photos], model=tiny_vit, on_error=errors.append).start()
    try:
        assert watcher.wait(WITHIN_S)
    finally:
        watcher.stop()
    assert isinstance(watcher.error, CNClipError) and "no cnclip index" in str(watcher.error)
    assert errors == [watcher.error]
    with pytest.raises(CNClipError, match="nothing to watch"):
        Watcher(tmp_path / "no-index", [])


def test_stopping_during_a_batch_of_videos_ends_after_the_video_in_flight(library, tiny_vit, monkeypatch):
    index, photos, idx = library
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        write_video(photos / f"v{i}.mp4", [color], seconds_each=2)
    watcher = Watcher(idx, [photos], model=tiny_vit)  # its first pass finds the three new videos
    embedded, real = [], tiny_vit.embed_images

    def embed_images(images, **kw):
        embedded.append(len(images))
        assert watcher._stopping.wait(WITHIN_S)  # Ctrl+C while the first video is embedded
        return real(images, **kw)

    monkeypatch.setattr(tiny_vit, "embed_images", embed_images)
    watcher.start()
    _eventually(lambda: embedded, "the first video is embedded")
    watcher.stop(WITHIN_S)
    assert watcher.wait(0) and watcher.error is None
    assert len(embedded) == 1  # the two other videos are left for the next run
    index.refresh()
    assert index.catalog.frame_count() == (1, 1) and len(_found(index)) == 4  # committed work is kept


def test_a_folder_gone_during_a_batch_does_not_drop_the_rest_of_it(library, tiny_vit):
    index, photos, idx = library
    gone = write_photos(photos / "b" / "inner", 1, seed=20, prefix="b")  # deleted while "a" is scanned
    later = write_photos(photos / "c", 1, seed=21, prefix="c")
    write_photos(photos / "a", 1, seed=22, prefix="a")
    errors: list[Exception] = []
    watcher = Watcher(idx, [photos], model=tiny_vit, on_error=errors.append)
    watcher._check_stop = lambda _: shutil.rmtree(photos / "b" / "inner", ignore_errors=True)
    batch = {str(photos): {str(photos / name): True for name in ("a", "b/inner", "c")}}
    with Index.open(idx, model=tiny_vit) as writer:
        watcher._apply(writer, batch)
    assert errors == []
    index.refresh()
    assert str(later[0]) in _found(index) and str(gone[0]) not in _found(index)


def test_a_symlink_to_a_folder_made_while_watching_is_indexed(watching, tmp_path):
    index, photos, _, _ = watching
    album = write_photos(tmp_path / "nas" / "2023", 2, seed=23, prefix="n")
    os.symlink(tmp_path / "nas" / "2023", photos / "nas2023")  # the scan follows it, as `cnclip index` does
    linked = {str(photos / "nas2023" / p.name) for p in album}
    _eventually(lambda: linked <= _found(index), "the photos of the linked folder")


def test_a_change_of_permissions_or_dates_alone_is_applied(watching):
    # watchdog 7 reports chmod and touch apart from writes: a photo made readable, or given its date back
    index, photos, batches, _ = watching
    path = photos / "p1.png"
    when = 1_560_000_000 * 10**9  # 2019-06-08: the date a PNG without EXIF is filtered by
    os.utime(path, ns=(when, when))
    _eventually(lambda: index.catalog.lookup(str(path)).mtime_ns == when, "the new date is in the index")
    assert _total(batches, "embedded") == 0 and len(_found(index)) == 3


def test_a_folder_whose_permissions_change_is_rescanned(watching):
    # e.g. `chmod +rx album` on a folder that could not be read (kept offline): only an attribute changes
    index, photos, batches, _ = watching
    album = photos / "album"
    write_photos(album, 1, seed=24, prefix="a")
    _eventually(lambda: any(str(album) in b.folders for b in batches), "the new album")
    seen = len(batches)
    os.chmod(album, 0o750)
    _eventually(lambda: any(str(album) in b.folders for b in batches[seen:]), "the album rescanned")
