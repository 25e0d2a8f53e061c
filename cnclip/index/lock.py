"""The writer lock of an index folder: one writer at a time (index runs, vector-file saves and
rebuilds, on-disk builds); readers never take it and never wait for it.

An OS lock on `write.lock` (flock on POSIX, msvcrt on Windows): the system releases it when its
process ends, however it ends, so a lock left by a killed process is simply free again: there are
no stale locks to break. The holder writes its pid and command into the file, for the message the
next writer gets.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cnclip.errors import CNClipError, IndexBusyError

LOCK_FILE = "write.lock"
_POLL_S = 0.1

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class WriterLock:
    """The writer lock of the index in `folder`. Reentrant: nested `hold`s of one instance nest."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        """Whether this instance holds the lock."""
        return self._depth > 0

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; False if another writer has it or the folder is read-only."""
        if self._depth:
            self._depth += 1
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False  # a read-only index: nothing can be written, so nothing needs the lock
        if not _try_lock(fd):
            os.close(fd)
            return False
        self._fd, self._depth = fd, 1
        self._record_owner(fd)
        return True

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to `wait` seconds for another writer; IndexBusyError if it stays busy."""
        if self._depth:
            self._depth += 1
            return
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as e:
            raise CNClipError(
                f"cannot write index {self.path.parent}: {e.strerror or e}; check its permissions and free space"
            ) from e
        deadline = time.monotonic() + max(0.0, wait)
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise IndexBusyError(
                    f"index {self.path.parent} is being written by another process ({self.owner() or 'unknown'}); "
                    "wait for it to finish, or pass --wait SECONDS"
                )
            time.sleep(_POLL_S)

    def release(self) -> None:
        """Give the lock back (the last of nested holds does)."""
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)

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

    @staticmethod
    def _record_owner(fd: int) -> None:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()}: {command}\n".encode("utf-8", "replace"))
