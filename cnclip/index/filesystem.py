"""Which file system holds an index folder, and whether an index may live there.

SQLite documents WAL mode as unsafe across machines on a network file system, and `flock` is
local-only on many NFS, SMB and FUSE mounts: two hosts could both write one index. Such a folder
is refused unless $CNCLIP_NETWORK_INDEX=1, which opens the catalog with a rollback journal and
relies on the writer lock's single-host lease (cnclip.index.lock). Only the index folder matters:
photos on a network drive are fine.
"""

from __future__ import annotations

import os
import re

from cnclip.errors import CNClipError

__all__ = ["MOUNTINFO", "NETWORK_INDEX_ENV", "filesystem_type", "is_network", "mounts", "network_mode"]

NETWORK_INDEX_ENV = "CNCLIP_NETWORK_INDEX"
# Linux lists every mount of this process's view here; other systems fall back to "local".
MOUNTINFO = "/proc/self/mountinfo"

# Kernel file systems whose data lives on another machine.
_NETWORK_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs", "beegfs", "ncpfs"}
)
# FUSE file systems that serve this machine's own disks; any other FUSE one (sshfs, rclone, s3fs,
# davfs...) counts as remote.
_LOCAL_FUSE = frozenset(
    {"fuseblk", "fuse.fuse-overlayfs", "fuse.lxcfs", "fuse.bindfs", "fuse.mergerfs", "fuse.gocryptfs", "fuse.encfs"}
)
_OPT_IN = frozenset({"1", "true", "yes", "on"})


def mounts() -> list[tuple[str, str]]:
    """(mount point, file-system type) of every mount this process sees, in the kernel's order
    (a later mount on the same point lies on top); empty where the system has no mount table to
    read (macOS, Windows)."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            table = f.read()
    except OSError:
        return []
    found = []
    # Fields: id parent major:minor root MOUNT_POINT options [optional...] - TYPE source super-options
    for line in table.splitlines():
        fields = line.split(" ")
        if "-" in fields[5:]:
            found.append((_unescape(fields[4]), fields[fields.index("-", 5) + 1]))
    return found


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type of the mount holding `path` as the kernel names it ("ext4", "nfs4", "fuse.sshfs"),
    for a path not made yet too; "local" where the system does not tell (macOS, Windows)."""
    target = os.path.realpath(path)
    best, found = -1, "local"
    for point, fstype in mounts():
        # The longest mount point containing the path holds it; of equal ones the later is on top.
        if len(point) >= best and _contains(point, target):
            best, found = len(point), fstype
    return found


def is_network(fstype: str) -> bool:
    """Whether a file system of type `fstype` (as `filesystem_type` names it) may be shared by several machines."""
    if fstype in _LOCAL_FUSE:
        return False
    return fstype in _NETWORK_TYPES or fstype == "fuse" or fstype.startswith("fuse.")


def network_mode(folder: str | os.PathLike[str]) -> bool:
    """Whether the index at `folder` must run in network mode: False on a local disk; True on a
    network file system when $CNCLIP_NETWORK_INDEX=1; CNClipError there otherwise."""
    fstype = filesystem_type(folder)
    if not is_network(fstype):
        return False
    if os.environ.get(NETWORK_INDEX_ENV, "").strip().lower() in _OPT_IN:
        return True
    raise CNClipError(
        f"index folder {folder} is on a network file system ({fstype}), where its database and writer lock "
        "are not safe; put the index on a local disk with --index (e.g. --index ~/.local/share/cnclip/index; "
        f"photos on a network drive are fine), or set {NETWORK_INDEX_ENV}=1 to use it from one host at a time"
    )


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _contains(point: str, path: str) -> bool:
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
