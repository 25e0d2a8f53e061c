"""`Watcher`: files created, changed, moved and deleted under a watched folder reach searches within
seconds through the incremental scan, and every kind of removal takes photos out; moved files keep
their vectors; a failed batch is tried again; a folder that goes away keeps its files offline and
comes back, also when a drive is remounted between two checks; stopping interrupts even a long first
pass and leaves no thread behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time

import pytest
from conftest import eventually, random_images, write_photos, write_video

from cnclip.errors import CNClipError
from cnclip.index import scan
from cnclip.index.index import Index
from cnclip.index.watch import WatchBatch, Watcher, _mount_id, _plan

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


def test_stopping_during_a_batch_of_videos_ends_after_the_video_in_flight(library, tiny_vit_encoder, monkeypatch):
    index, photos, idx = library
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        write_video(photos / f"v{i}.mp4", [color], seconds_each=2)
    watcher = Watcher(idx, [photos], model=tiny_vit_encoder)  # its first pass finds the three new videos
    embedded, real = [], tiny_vit_encoder.embed_images

    def embed_images(images, **kw):
        embedded.append(len(images))
        assert watcher._stopping.wait(WITHIN_S)  # Ctrl+C while the first video is embedded
        return real(images, **kw)

    monkeypatch.setattr(tiny_vit_encoder, "embed_images", embed_images)
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


def _remove_file(photos, elsewhere):
    (photos / "album" / "a0.png").unlink()


def _remove_folder(photos, elsewhere):
    shutil.rmtree(photos / "album")


def _remove_symlink_to_folder(photos, elsewhere):
    (photos / "album").unlink()  # to the OS's events, a file without an image extension


def _rename_folder_out(photos, elsewhere):
    os.rename(photos / "album", elsewhere / "album")


def _rename_file_out(photos, elsewhere):
    os.rename(photos / "album" / "a0.png", elsewhere / "a0.png")


@pytest.mark.parametrize(
    "remove",
    [_remove_file, _remove_folder, _remove_symlink_to_folder, _rename_folder_out, _rename_file_out],
    ids=["file", "folder", "symlink-to-folder", "folder-renamed-out", "file-renamed-out"],
)
def test_every_kind_of_removal_leaves_searches(tmp_path, tiny_vit, remove):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    kept = {str(p) for p in write_photos(photos, 3, seed=1)}
    elsewhere.mkdir()
    if remove is _remove_symlink_to_folder:
        album = write_photos(elsewhere / "nas", 2, seed=2, prefix="a")
        os.symlink(elsewhere / "nas", photos / "album")
    else:
        album = write_photos(photos / "album", 2, seed=2, prefix="a")
    album = {str(photos / "album" / p.name) for p in album}
    gone = {str(photos / "album" / "a0.png")} if remove in (_remove_file, _rename_file_out) else album
    batches: list[WatchBatch] = []
    errors: list[Exception] = []
    with Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(photos)
        assert _found(index) == kept | album
        with Watcher(
            tmp_path / "idx",
            [photos],
            model=tiny_vit,
            scan_first=False,
            on_batch=batches.append,
            on_error=errors.append,
        ):
            remove(photos, elsewhere)
            _eventually(lambda: _found(index) == kept | album - gone, "the removed photos leave searches")
            _eventually(lambda: _total(batches, "removed") == len(gone), "the removal reported")
        assert errors == [] and index.stats()["offline"] == 0  # removed, not kept offline


def test_a_failed_batch_is_tried_again_with_back_off(library, tiny_vit, monkeypatch):
    index, photos, idx = library
    real, attempts = scan.Indexer.run, []

    def failing_twice(self, folder, *args, **kwargs):
        attempts.append(time.monotonic())
        if len(attempts) <= 2:  # e.g. a drive's read error, or a catalog that could not be written
            raise OSError(errno.EIO, "Input/output error", str(folder))
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(scan.Indexer, "run", failing_twice)
    errors: list[Exception] = []
    with Watcher(idx, [photos], model=tiny_vit, scan_first=False, on_error=errors.append):
        [new] = write_photos(photos, 1, seed=25, prefix="new")
        _eventually(lambda: str(new) in _found(index), "the photo, once a retry succeeds, with no new event")
    assert len(attempts) == 3 and len(errors) == 2
    assert all("Input/output error" in str(e) and "trying again in" in str(e) for e in errors)
    assert attempts[1] - attempts[0] >= 1.0 and attempts[2] - attempts[1] >= 2.0  # 1 s, then doubled


def test_stopping_during_the_first_pass_interrupts_its_hashing(library, tiny_vit, monkeypatch):
    index, photos, idx = library
    for i in range(200):  # new files: each is hashed (slowly here, as on a slow drive) before any embedding
        (photos / "many" / f"{i // 50}").mkdir(parents=True, exist_ok=True)
        (photos / "many" / f"{i // 50}" / f"{i}.png").write_bytes(b"x" * (i + 1))
    hashed, real = [], scan.content_hash

    def slow_hash(path):
        hashed.append(path)
        time.sleep(0.05)
        return real(path)

    monkeypatch.setattr(scan, "content_hash", slow_hash)
    watcher = Watcher(idx, [photos], model=tiny_vit).start()  # its first pass walks and hashes them all
    _eventually(lambda: hashed, "the first pass hashes")
    started = time.monotonic()
    watcher.stop(WITHIN_S)
    assert watcher.wait(0) and watcher.error is None
    assert time.monotonic() - started < 1.0 and len(hashed) < 100  # not all 200 (10 s)
    index.refresh()
    assert len(_found(index)) == 3 and index.catalog.count() == 3  # what was committed stays: no sweep ran


def test_a_stopped_scan_ends_its_walk_and_keeps_what_was_committed(tmp_path, tiny_vit_encoder, monkeypatch):
    photos = tmp_path / "photos"
    kept = write_photos(photos, 2, seed=26)
    for i in range(50):
        write_photos(photos / f"f{i:02}", 1, seed=27, prefix="x")
    with Index.open(tmp_path / "idx", model=tiny_vit_encoder, create=True) as index:
        index.add_folder(photos)  # all indexed; now they change, as if a whole drive was touched
        for folder in photos.glob("f*"):
            os.utime(folder / "x0.png", ns=(1, 1))
        (photos / kept[0].name).unlink()  # a removal the sweep of a complete scan would apply
        checks, looked_up, real = [], [], index.catalog.lookup

        def lookup(path):
            looked_up.append(path)
            return real(path)

        monkeypatch.setattr(index.catalog, "lookup", lookup)
        indexer = scan.Indexer(tiny_vit_encoder, index.catalog, should_stop=lambda: checks.append(1) or len(checks) > 5)
        with pytest.raises(scan.ScanStopped):
            indexer.run(photos)
        assert len(looked_up) < 10  # the walk ended after a few folders, not after all 51
        assert index.catalog.count() == 52  # nothing swept: the removed photo goes at a complete scan


@pytest.fixture
def tmpfs(tmp_path):
    """(mount, unmount): a fresh tmpfs mounted at a folder (made if missing), and unmounted; every
    one still mounted is unmounted after the test. Needs root, and Linux 6.8+."""
    if getattr(os, "geteuid", lambda: -1)() != 0:
        pytest.skip("mounting a tmpfs needs root: run as root to test a drive unmounted and mounted again")
    if _mount_id(str(tmp_path)) is None:  # the same drive back would have the same device and inode
        pytest.skip("no unique mount ids here (statx STATX_MNT_ID_UNIQUE, Linux 6.8+): a remount cannot be told")
    mounted = []

    def mount(folder):
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs was refused, even as root: {done.stderr.decode(errors='replace').strip()}")
        mounted.append(folder)

    def unmount(folder):
        subprocess.run(["umount", str(folder)], check=True)
        mounted.remove(folder)

    yield mount, unmount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_watched_drive_unmounted_and_mounted_again_between_two_checks_is_rescanned(tmp_path, tiny_vit, tmpfs):
    mount, unmount = tmpfs
    card, idx = tmp_path / "card", tmp_path / "idx"
    mount(card)
    write_photos(card, 2, seed=28, prefix="c")
    with Index.open(idx, model=tiny_vit, create=True) as index:
        index.add_folder(card)
        with Watcher(idx, [card], model=tiny_vit, scan_first=False):
            unmount(card)
            mount(card)  # another card, or the same one back, well within a check of the folder (2 s)
            [new] = write_photos(card, 1, seed=29, prefix="new")  # the watch of the old mount died with it
            _eventually(lambda: _found(index) == {str(new)}, "the remounted folder rescanned")
        assert index.stats()["offline"] == 2  # the first card's photos: not seen is not gone


def test_a_drive_mounted_inside_a_watched_folder_is_followed(library, tiny_vit, tmpfs):
    index, photos, idx = library
    mount, unmount = tmpfs
    card = photos / "card"
    card.mkdir()
    with Watcher(idx, [photos], model=tiny_vit, scan_first=False):
        mount(card)  # no event: the watch of the folder "card" stays on what lies under the mount
        [first] = write_photos(card, 1, seed=30, prefix="c")
        _eventually(lambda: str(first) in _found(index), "a photo on the drive mounted inside")
        unmount(card)
        mount(card)
        [second] = write_photos(card, 1, seed=31, prefix="d")
        _eventually(lambda: str(second) in _found(index) and str(first) not in _found(index), "the drive remounted")
    assert len(_found(index)) == 4


def test_a_removed_file_that_was_no_photo_rescans_nothing(library, tiny_vit):
    # a deleted file without an image extension may have been a symlink to a folder; only the catalog
    # knows, and a note or a temporary file must not cost a rescan of its (maybe large) folder
    index, photos, idx = library
    batches: list[WatchBatch] = []
    watcher = Watcher(idx, [photos], model=tiny_vit, on_batch=batches.append)
    gone = watcher._folder_to_scan(str(photos), str(photos / "notes.txt"), False, False)
    assert gone == str(photos / "notes.txt")
    with Index.open(idx, model=tiny_vit) as writer:
        assert watcher._apply(writer, {str(photos): {gone: False}})
    assert batches == []


def test_new_photos_get_their_words_read_while_watching(library, tiny_vit):
    from conftest import word_photo

    index, photos, idx = library
    batches: list[WatchBatch] = []
    errors: list[Exception] = []
    with Watcher(idx, [photos], model=tiny_vit, on_batch=batches.append, on_error=errors.append, words=True):
        word_photo(photos / "快递.png", ["请凭取件码领取"])
        _eventually(lambda: index.search_text("取件码", words="only"), "the new photo found by its words")
        assert [h.path for h in index.search_text("取件码", words="only")] == [str(photos / "快递.png")]
    assert errors == [] and sum(b.words for b in batches) == 4  # the three photos there before, then the new one
    assert "read for words" in " ".join(b.describe() for b in batches)
