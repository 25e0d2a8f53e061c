"""Not seen is not gone: folders that cannot be seen keep their files offline, restored photos are
reused, and a sweep never removes most of a library as a side effect (faults injected in-process)."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from conftest import mount_tmpfs, random_images, umount

from cnclip.index import scan
from cnclip.index.index import Index


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


# -- what the walk cannot reach: every error, not only "not found" ----------------------------------


@pytest.fixture
def nas_library(tmp_path):
    """Pictures/ with 6 local photos and `nas`, a symlink to a folder of 4 on a network mount: the
    4 are fewer than half, so only the walk, not the removal guard, can keep them."""
    pictures = tmp_path / "Pictures"
    _photos(pictures, 6, seed=11)
    share = tmp_path / "mnt" / "nas" / "photos"
    _photos(share, 4, seed=12)
    (pictures / "nas").symlink_to(share, target_is_directory=True)
    return pictures, share


def _keeps_the_nas(index: Index, summary, path, reason: str) -> None:
    assert summary.removed == 0, summary
    [offline] = summary.offline
    assert offline["path"] == str(path) and offline["files"] == 4 and reason in offline["reason"], offline
    assert index.catalog.count() == 6 and index.stats()["offline"] == 4
    assert index.catalog.collect_garbage() == 0 and index.catalog.unused_vectors() == 0


def test_a_symlink_loop_where_a_mounted_folder_was_keeps_its_files(nas_library, index):
    pictures, _ = nas_library
    assert index.add_folder(pictures).added == 10
    (pictures / "nas").unlink()
    (pictures / "nas").symlink_to(pictures / "nas")  # a real loop: ELOOP from every stat
    _keeps_the_nas(index, index.add_folder(pictures), pictures / "nas", "symlink loop")


class _Unreachable:
    """A directory entry whose target fails with `errno` (a dropped sshfs/SMB/NFS mount behind it)."""

    def __init__(self, entry, errno: int):
        self._entry, self._errno = entry, errno

    def __getattr__(self, name):
        return getattr(self._entry, name)

    def _fail(self, *args, **kwargs):
        raise OSError(self._errno, os.strerror(self._errno), self._entry.path)

    is_dir = is_file = stat = _fail


class _Listing(list):
    """What os.scandir returns, as a list that is also a context manager (as pathlib uses it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _failing_entries(monkeypatch, name: str, errno: int) -> None:
    real = os.scandir

    def scandir(path="."):
        with real(path) as entries:
            return _Listing(_Unreachable(e, errno) if e.name == name else e for e in entries)

    monkeypatch.setattr(scan.os, "scandir", scandir)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EIO, os.strerror(errno.EIO)),
        (errno.ENOTCONN, os.strerror(errno.ENOTCONN)),  # sshfs, rclone: "Transport endpoint is not connected"
        (errno.ESTALE, os.strerror(errno.ESTALE)),  # NFS
        (errno.EACCES, "permission denied"),  # SMB with expired credentials
        (errno.ELOOP, "symlink loop"),
    ],
)
def test_a_mount_behind_a_symlink_that_fails_keeps_its_files(nas_library, index, monkeypatch, code, reason):
    pictures, _ = nas_library
    index.add_folder(pictures)
    _failing_entries(monkeypatch, "nas", code)
    _keeps_the_nas(index, index.add_folder(pictures), pictures / "nas", reason)
    monkeypatch.undo()  # the mount is back: nothing is embedded again
    back = index.add_folder(pictures)
    assert (back.embedded, back.removed, back.offline, back.unchanged) == (0, 0, [], 10)


def test_a_photo_that_cannot_be_read_is_kept_not_removed(tmp_path, index, monkeypatch):
    paths = _photos(tmp_path / "photos", 5, seed=13)
    index.add_folder(tmp_path / "photos")
    _failing_entries(monkeypatch, paths[1].name, errno.EIO)
    summary = index.add_folder(tmp_path / "photos")
    assert summary.removed == 0
    assert summary.offline == [{"path": str(paths[1]), "reason": os.strerror(errno.EIO), "files": 1}]
    assert index.catalog.collect_garbage() == 0


# -- mount points and devices -----------------------------------------------------------------------


@pytest.fixture
def usb(tmp_path):
    """Pictures/ with 6 photos and Pictures/usb, a real mount point (tmpfs) holding 4."""
    pictures = tmp_path / "Pictures"
    _photos(pictures, 6, seed=14)
    mount = pictures / "usb"
    mount.mkdir()
    mount_tmpfs(mount)
    try:
        stash = _photos(tmp_path / "stash", 4, seed=15)
        for p in stash:
            shutil.copy2(p, mount / p.name)
        yield pictures, mount, stash
    finally:
        while os.path.ismount(mount):
            umount(mount)


def test_an_unmounted_drive_leaves_an_empty_mount_point_and_keeps_its_files(usb, index):
    pictures, mount, stash = usb
    assert index.add_folder(pictures).added == 10
    umount(mount)  # the mount point is an empty folder again
    summary = index.add_folder(pictures)
    assert summary.removed == 0
    [offline] = summary.offline
    assert offline["path"] == str(mount) and offline["files"] == 4 and "mount point" in offline["reason"]
    assert index.catalog.collect_garbage() == 0 and index.catalog.unused_vectors() == 0

    mount_tmpfs(mount)  # plugged in again (a new device number, the same photos)
    for p in stash:
        shutil.copy2(p, mount / p.name)
    back = index.add_folder(pictures)
    assert (back.embedded, back.removed, back.offline, back.unchanged) == (0, 0, [], 10)
    assert index.stats()["offline"] == 0


def test_a_folder_now_on_another_device_keeps_what_it_no_longer_shows(nas_library, index, tmp_path, monkeypatch):
    """Another disk mounted where the photos were (faked by the device number, so this runs
    without root): what is missing is kept offline, what it shows is indexed."""
    pictures, share = nas_library
    index.add_folder(pictures)
    other = tmp_path / "other-disk"
    _photos(other, 1, seed=16)
    (pictures / "nas").unlink()
    (pictures / "nas").symlink_to(other, target_is_directory=True)
    real = os.stat

    def stat(path, *args, **kwargs):
        st = real(path, *args, **kwargs)
        if os.path.realpath(path) == str(other):
            fields = list(st[:10])
            fields[2] = st.st_dev + 1  # st_dev
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(scan.os, "stat", stat)
    summary = index.add_folder(pictures)
    assert summary.removed == 0 and summary.added == 1
    [offline] = summary.offline
    assert offline["path"] == str(pictures / "nas") and offline["files"] == 4 and "device" in offline["reason"]
    assert index.catalog.collect_garbage() == 0

    monkeypatch.undo()
    (pictures / "nas").unlink()
    (pictures / "nas").symlink_to(share, target_is_directory=True)  # the first disk is back
    back = index.add_folder(pictures)
    assert back.embedded == 0 and back.offline == [] and index.stats()["offline"] == 0


# -- odd values: clocks that lie ---------------------------------------------------------------------


def test_a_photo_from_a_clock_past_2262_is_indexed_and_does_not_block_the_rest(tmp_path, index):
    """A modification time past what SQLite's 64-bit integers hold in nanoseconds (tar archives,
    cameras with a bad clock) once stopped every run at the same file, for good."""
    root = tmp_path / "photos"
    paths = _photos(root, 4, seed=17)
    os.utime(paths[1], ns=(0, 10**19))  # the year 2286
    first = index.add_folder(root)
    assert (first.added, first.skipped) == (4, [])
    again = index.add_folder(root)  # clamped the same way each time: unchanged, not re-read
    assert (again.unchanged, again.updated, again.removed) == (4, 0, 0)
    paths[3].unlink()
    assert index.add_folder(root).removed == 1  # the sweep runs again


def test_file_times_outside_the_calendar_give_no_date_instead_of_an_error():
    from cnclip.index.metadata import file_time

    assert file_time(0) is not None
    assert file_time(2**63 - 1) is not None  # 2262, still a date
    assert file_time(400_000 * 365 * 86400 * 10**9) is None  # past year 9999
    assert file_time(-(10**20)) is None
