"""Index folders on network file systems: detection from mountinfo, refusal by default, and the
opt-in mode (rollback journal) that is safe there; local folders keep WAL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cnclip.errors import CNClipError
from cnclip.index import filesystem
from cnclip.index.catalog import Catalog

MOUNTINFO = (
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    "60 27 0:50 / /mnt/nas rw,relatime shared:5 - nfs4 nas:/export rw,vers=4.2\n"
    "61 60 0:51 / /mnt/nas/local\\040disk rw - ext4 /dev/sdb1 rw\n"
    "62 27 0:52 / /home/me/remote rw,nosuid - fuse.sshfs me@host:/data rw,user_id=0\n"
    "63 27 0:53 / /media/usb rw - fuseblk /dev/sdc1 rw\n"
    "64 27 0:54 / /mnt/share rw - cifs //server/share rw\n"
    "65 27 0:55 / /mnt/nasty rw - ext4 /dev/sdd1 rw\n"
)


@pytest.fixture
def fake_mounts(tmp_path, monkeypatch):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    monkeypatch.setattr(filesystem, "MOUNTINFO", str(path))


@pytest.mark.parametrize(
    "path, fstype, network",
    [
        ("/home/me/Pictures", "ext4", False),
        ("/mnt/nas", "nfs4", True),
        ("/mnt/nas/index/new-not-made-yet", "nfs4", True),
        ("/mnt/nas/local disk/index", "ext4", False),  # a mount point with a space, inside the NFS mount
        ("/mnt/nasty/index", "ext4", False),  # /mnt/nas is not a prefix of /mnt/nasty
        ("/home/me/remote/index", "fuse.sshfs", True),
        ("/media/usb/index", "fuseblk", False),
        ("/mnt/share/cnclip", "cifs", True),
    ],
)
def test_the_mount_holding_a_folder_names_its_type(fake_mounts, path, fstype, network):
    assert filesystem.filesystem_type(path) == fstype
    assert filesystem.is_network(fstype) is network


def test_without_mountinfo_every_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.setattr(filesystem, "MOUNTINFO", str(tmp_path / "missing"))  # macOS, Windows
    assert filesystem.filesystem_type(tmp_path) == "local"
    assert filesystem.network_mode(tmp_path) is False


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted under tmp_path for the test (needs root on Linux)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    point = tmp_path / "ram"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_a_real_tmpfs_mount_is_seen_as_tmpfs_and_local(tmpfs, tmp_path):
    outside = filesystem.filesystem_type(tmp_path)
    assert outside != "tmpfs"
    assert filesystem.filesystem_type(tmpfs) == "tmpfs"
    assert filesystem.filesystem_type(tmpfs / "index" / "not-yet") == "tmpfs"
    assert filesystem.network_mode(tmpfs / "index") is False
    with Catalog.open(tmpfs / "index", create=True) as catalog:  # and a catalog opens there as usual
        assert catalog._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture
def on_nfs(monkeypatch):
    monkeypatch.delenv(filesystem.NETWORK_INDEX_ENV, raising=False)
    monkeypatch.setattr(filesystem, "filesystem_type", lambda path: "nfs4")


def test_an_index_on_a_network_drive_is_refused_in_one_line_naming_folder_type_and_remedy(on_nfs, tmp_path):
    folder = tmp_path / "idx"
    with pytest.raises(CNClipError) as e:
        Catalog.open(folder, create=True)
    message = str(e.value)
    assert str(folder) in message and "nfs4" in message and "--index" in message
    assert "local disk" in message and filesystem.NETWORK_INDEX_ENV in message
    assert "\n" not in message
    assert not folder.exists()  # refused before anything was made


def test_the_opt_in_runs_the_catalog_with_a_rollback_journal(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    Catalog.open(folder, create=True).close()  # made on a local disk in WAL mode, then copied to the NAS
    monkeypatch.setattr(filesystem, "filesystem_type", lambda path: "nfs4")
    monkeypatch.setenv(filesystem.NETWORK_INDEX_ENV, "1")
    with Catalog.open(folder) as catalog:
        assert catalog._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert catalog._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: NORMAL is only safe with WAL
        catalog.set_meta("k", "v")
        with catalog.snapshot() as snap:
            assert snap.get_meta("k") == "v"
    assert not (folder / "catalog.sqlite3-wal").exists()
    with Catalog.open(tmp_path / "new", create=True) as fresh:
        assert fresh._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_local_folder_keeps_wal_even_with_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv(filesystem.NETWORK_INDEX_ENV, "1")
    assert not filesystem.is_network(filesystem.filesystem_type(tmp_path))
    with Catalog.open(tmp_path / "idx", create=True) as catalog:
        assert catalog._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
