"""Publishing files and folders atomically: every writer in cnclip goes through here.

A reader, a second process or a crash sees either the old content or the new, never half of
it: the content is written under a unique temporary name in the same folder (so the rename
cannot cross file systems), flushed to disk, renamed over the target, and then the folder is
flushed too, so that the rename itself survives a power cut. A failure removes the temporary.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnclip import faults

__all__ = [
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "previous_folder",
    "publish",
    "remove_stale_temps",
    "replacing",
    "replacing_folder",
    "temp_name",
    "write_bytes",
    "write_json",
    "write_text",
]

TEMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


# New files get the mode the user's umask gives (0644 under the usual 022), whatever the writer
# used for its temporary: safetensors and mkstemp make 0600 files, which a `cnclip serve` running
# as another user could not read.
_NEW_FILE_MODE = 0o666 & ~_read_umask()


def _publish_mode(tmp: Path, target: Path) -> None:
    """Give `tmp` the mode its target has (a user's chmod survives a rewrite), else the new-file mode."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = _NEW_FILE_MODE
    os.chmod(tmp, mode)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new names) to disk."""
    if os.name != "posix":  # folders cannot be opened for fsync on Windows; NTFS journals renames
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and subfolder under `folder`, then `folder` itself."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        for name in dirs:
            fsync_dir(os.path.join(root, name))
        fsync_dir(root)


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """A hidden name beside `path`, unique to this call (process id plus random), for writing it.

    Short whatever the target's name: that may already be near the file-name length limit.
    `suffix` ends the name, for writers that insist on one (`np.save` appends `.npy` otherwise)."""
    path = Path(path)
    return path.with_name(f".{path.name[:64]}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}{suffix}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; published when the block ends without error.

    with replacing(out) as tmp:
        faiss.write_index(index, str(tmp))
    """
    path = Path(path)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        _publish_mode(tmp, path)
        fsync_file(tmp)
        faults.point("atomic.before_rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    faults.point("atomic.after_rename")
    fsync_dir(path.parent)


def publish(finished: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a file written to completely elsewhere in the same folder (a download's `.part`, an
    export in a private folder) into place as `path`, durably."""
    _publish_mode(Path(finished), Path(path))
    fsync_file(finished)
    os.replace(finished, path)
    fsync_dir(Path(path).parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Publish `data` as `path`."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        faults.point("atomic.mid_write")
        f.write(data[half:])


def write_text(path: str | os.PathLike, text: str) -> None:
    """Publish `text` (UTF-8) as `path`."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """Publish `data` as indented UTF-8 JSON with a final newline."""
    dumps = {"indent": 2, "ensure_ascii": False, **dumps}
    write_text(path, json.dumps(data, **dumps) + "\n")


def previous_folder(path: str | os.PathLike) -> Path:
    """Where `replacing_folder` keeps the old `path` while the new one is swapped in."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


@contextlib.contextmanager
def replacing_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new empty temporary folder to fill; it replaces the folder `path` when the block ends.

    A folder cannot be renamed over a non-empty one, so the old folder first moves to
    `previous_folder(path)` and is removed after the swap: a crash in between leaves the old
    folder whole there (readers that must survive that look there too).
    """
    path = Path(path)
    tmp, old = temp_name(path), previous_folder(path)
    tmp.mkdir()
    moved_aside = False
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            moved_aside = True
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove the temporaries that writers killed mid-write left in `folder`; returns how many.

    Only safe for a folder whose writers exclude each other (an index under its writer lock):
    any temporary there then belongs to a writer that is gone."""
    removed = 0
    for entry in Path(folder).glob(f".*{TEMP_SUFFIX}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
