"""OS file locks: exclusive between holders, reentrant within one, free again when the holder dies."""

from __future__ import annotations

import subprocess
import sys

from cnclip.oslock import FileLock

HOLD = (
    "import sys, time\n"
    "from cnclip.oslock import FileLock\n"
    "FileLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_exclusive_reentrant_and_waits(tmp_path):
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.try_acquire() and a.try_acquire()  # reentrant
    assert not b.try_acquire() and b.acquire(wait=0.2) is False
    a.release()
    assert not b.try_acquire()  # still held once
    a.release()
    with b.held_for(wait=0) as got:
        assert got and b.held and not a.try_acquire()
    assert not b.held and a.try_acquire()
    a.release()


def test_a_killed_holders_lock_is_free(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not FileLock(path).try_acquire()
    finally:
        holder.kill()  # kill -9: nothing to clean up by hand
        holder.wait()
    lock = FileLock(path)
    assert lock.acquire(wait=5)
    lock.release()
