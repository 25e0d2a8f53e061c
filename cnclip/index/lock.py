"""The writer lock of an index folder: one writer at a time (index runs, vector-file saves and
rebuilds, on-disk builds); readers never take it and never wait for it.

An OS lock on `write.lock` (cnclip.oslock): a lock left by a killed process is free again, so
there are no stale locks. The holder writes its pid and command into the file, for the message
the next writer gets.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from cnclip.errors import CNClipError, IndexBusyError
from cnclip.oslock import FileLock

LOCK_FILE = "write.lock"


class WriterLock:
    """The writer lock of the index in `folder`. Reentrant: nested `hold`s of one instance nest."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._lock = FileLock(self.path)

    @property
    def held(self) -> bool:
        """Whether this instance holds the lock."""
        return self._lock.held

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; False if another writer has it or the folder is read-only."""
        try:
            fresh = not self._lock.held
            if not self._lock.try_acquire():
                return False
        except OSError:
            return False  # a read-only index: nothing can be written, so nothing needs the lock
        if fresh:
            self._record_owner()
        return True

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to `wait` seconds for another writer; IndexBusyError if it stays busy."""
        fresh = not self._lock.held
        try:
            got = self._lock.acquire(wait)
        except OSError as e:
            raise CNClipError(
                f"cannot write index {self.path.parent}: {e.strerror or e}; check its permissions and free space"
            ) from e
        if not got:
            raise IndexBusyError(
                f"index {self.path.parent} is being written by another process ({self.owner() or 'unknown'}); "
                "wait for it to finish, or pass --wait SECONDS"
            )
        if fresh:
            self._record_owner()

    def release(self) -> None:
        """Give the lock back (the last of nested holds does)."""
        self._lock.release()

    @contextlib.contextmanager
    def hold(self, wait: float = 0.0) -> Iterator[WriterLock]:
        """`with lock.hold(wait):` the lock for the block."""
        self.acquire(wait)
        try:
            yield self
        finally:
            self.release()

    def owner(self) -> str | None:
        """Who holds (or last held) the lock: "pid N: command", as its holder wrote it."""
        try:
            text = self.path.read_text("utf-8", errors="replace").strip()
        except OSError:
            return None
        return text or None

    def _record_owner(self) -> None:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        fd = self._lock.fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()}: {command}\n".encode("utf-8", "replace"))
