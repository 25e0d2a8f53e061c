"""The writer lock of an index folder: one writer at a time (index runs, vector-file saves and
rebuilds, on-disk builds); readers never take it and never wait for it.

An OS lock on `write.lock` (cnclip.oslock): a lock left by a killed process is free again, so
there are no stale locks. The holder writes its pid, host and command into the file, for the
message the next writer gets, and a lease: on a network file system the OS lock may not reach
other hosts, so a writer also stays out while another host's lease is live. The holder renews it
every LEASE_RENEW_S and drops it on release; a host that went down stops renewing, and its lease
lapses LEASE_TTL_S later. Taking the lock sweeps the build spools that killed processes left.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cnclip.errors import CNClipError, IndexBusyError
from cnclip.index.spool import SPOOL_FOLDER, sweep
from cnclip.oslock import POLL_S, FileLock, this_host

LOCK_FILE = "write.lock"
# Renewed this often; another host takes the lease over once it has gone LEASE_TTL_S without a
# renewal, which leaves room for hosts' clocks that differ a little.
LEASE_RENEW_S = 30.0
LEASE_TTL_S = 300.0
_LEASE_LINE = re.compile(r"^lease (\S+) (\d+) (\d+(?:\.\d+)?)$", re.MULTILINE)


@dataclass(frozen=True)
class Lease:
    """A writer's claim in the lock file: its host, its pid there, and its last renewal (unix time)."""

    host: str
    pid: int
    renewed: float


class WriterLock:
    """The writer lock of the index in `folder`. Reentrant: nested `hold`s of one instance nest."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._lock = FileLock(self.path)
        self._depth = 0
        self._owner_line = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

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
            if not self._lock.try_acquire():
                return False
        except OSError:
            return False  # a read-only index: nothing can be written, so nothing needs the lock
        if self._other_hosts_lease() is not None:
            self._lock.release()
            return False
        self._begin()
        return True

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to `wait` seconds for another writer; IndexBusyError if it stays busy."""
        if self._depth:
            self._depth += 1
            return
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                got = self._lock.acquire(max(0.0, deadline - time.monotonic()))
            except OSError as e:
                raise CNClipError(
                    f"cannot write index {self.path.parent}: {e.strerror or e}; check its permissions and free space"
                ) from e
            if not got:
                raise IndexBusyError(
                    f"index {self.path.parent} is being written by another process ({self.owner() or 'unknown'}); "
                    "wait for it to finish, or pass --wait SECONDS"
                )
            lease = self._other_hosts_lease()
            if lease is None:
                break
            self._lock.release()
            if time.monotonic() >= deadline:
                raise IndexBusyError(
                    f"index {self.path.parent} is being written on host {lease.host} (pid {lease.pid}, lease renewed "
                    f"{max(0.0, time.time() - lease.renewed):.0f} s ago); wait for it to finish, or pass --wait "
                    f"SECONDS; if that host is down, its lease lapses {LEASE_TTL_S:.0f} s after its last renewal"
                )
            time.sleep(POLL_S)
        self._begin()

    def release(self) -> None:
        """Give the lock back (the last of nested holds does), dropping the lease."""
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        self._write(self._owner_line)  # who last wrote stays readable; the lease goes
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
        """Who holds (or last held) the lock: "pid N on HOST: command", as its holder wrote it."""
        lines = self._read().splitlines()
        return (lines[0].strip() or None) if lines else None

    def lease(self) -> Lease | None:
        """The lease in the lock file (whoever holds it, lapsed or not); None while no writer holds one."""
        match = _LEASE_LINE.search(self._read())
        return None if match is None else Lease(match[1], int(match[2]), float(match[3]))

    def _other_hosts_lease(self) -> Lease | None:
        lease = self.lease()
        if lease is None or lease.host == this_host():
            return None  # one of this host's: the OS lock just taken says that its writer has ended
        return lease if time.time() - lease.renewed < LEASE_TTL_S else None

    def _begin(self) -> None:
        self._depth = 1
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        self._owner_line = f"pid {os.getpid()} on {this_host()}: {command}\n"
        self._write(self._record())
        sweep(self.path.parent / SPOOL_FOLDER)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, args=(self._stop,), name="cnclip-lease", daemon=True)
        self._renewer.start()

    def _record(self) -> str:
        # Fixed width for centuries: a renewal rewrites the same bytes, so no reader sees a short file.
        # Rounded down: a lease never looks renewed later than it was.
        return f"{self._owner_line}lease {this_host()} {os.getpid()} {int(time.time() * 10) / 10:.1f}\n"

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(LEASE_RENEW_S):
            self._write(self._record())

    def _write(self, text: str) -> None:
        fd = self._lock.fd
        if fd is None:
            return
        data = text.encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
            os.ftruncate(fd, len(data))

    def _read(self) -> str:
        try:
            return self.path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
