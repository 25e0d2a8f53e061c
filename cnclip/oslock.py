"""Exclusive OS locks on files (flock on POSIX, msvcrt on Windows), for coordination between processes.

The system releases such a lock when its process ends, however it ends (kill -9 included), so a
lock left by a dead process is simply free again: there are no stale locks to detect or break.
Used by the index's writer lock (cnclip.index.lock) and by weight downloads (cnclip.model.download).
Also here: this host's name and whether a process is alive, for what such locks cannot cover (a
lock that other hosts do not see, a temporary folder that a killed process left).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

POLL_S = 0.1

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


def this_host() -> str:
    """This machine's host name, made safe for file names and one-line records (no spaces or slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (or may: True where the system cannot tell)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class FileLock:
    """An exclusive lock on the file `path` (created if missing). Reentrant within one instance."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None  # open while held: the holder may write into the file
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def try_acquire(self) -> bool:
        """Take the lock if it is free now. OSError if the file cannot be opened (e.g. a read-only folder)."""
        if self._depth:
            self._depth += 1
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            return False
        self.fd, self._depth = fd, 1
        return True

    def acquire(self, wait: float | None = None) -> bool:
        """Take the lock, waiting up to `wait` seconds (None: as long as it takes); False if still busy."""
        deadline = None if wait is None else time.monotonic() + max(0.0, wait)
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    def release(self) -> None:
        """Give the lock back (the last of nested acquires does)."""
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0 and self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)

    @contextlib.contextmanager
    def held_for(self, wait: float | None = None) -> Iterator[bool]:
        """`with lock.held_for(wait) as got:` the lock for the block, if `got`."""
        got = self.acquire(wait)
        try:
            yield got
        finally:
            if got:
                self.release()
