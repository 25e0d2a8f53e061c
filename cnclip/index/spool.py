"""Spool folders of vector builds, which hold every row until the build has read them twice: where
they go (inside the index folder) and the sweep of those that a killed process left behind.

A spool is named for its process and host (`cnclip-spool-PID@HOST-XXXX`), so that the next build
or writer can tell an abandoned one (its process has ended) from one in use.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cnclip.oslock import pid_alive, this_host

# Inside an index folder: spools live on the disk that holds the index and go with it.
SPOOL_FOLDER = "tmp"
_PREFIX = "cnclip-spool-"
_NAME = re.compile(rf"^{_PREFIX}(\d+)@(.+)-[^-]+$")


def default_spool_dir() -> str | None:
    """$TMPDIR if set, else /var/tmp (/tmp may be a RAM disk, as on Fedora and Arch); None: tempfile's choice."""
    if os.environ.get("TMPDIR") or os.name != "posix":
        return None
    return "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else None


def spool_root(index_folder: str | os.PathLike[str] | None) -> str | None:
    """Where a build for the index in `index_folder` spools: its `tmp` folder, or where it cannot be
    made there (a read-only index) or without an index, `default_spool_dir()`."""
    if index_folder is not None:
        root = Path(index_folder) / SPOOL_FOLDER
        with contextlib.suppress(OSError):
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return str(root)
    return default_spool_dir()


@contextlib.contextmanager
def spooling(root: str | os.PathLike[str] | None) -> Iterator[Path]:
    """A new spool folder under `root` (None: the system's temporary folder) for the block, removed
    after it; abandoned spools under `root` are swept first."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    sweep(root)
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}@{this_host()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the spools under `root` whose process, on this host, has ended; the paths removed.

    Another host's spools (an index on a shared drive) are left alone: their processes cannot be seen."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            match = _NAME.match(entry.name)
            if match and match[2] == this_host() and not pid_alive(int(match[1])) and entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed
