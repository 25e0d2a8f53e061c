"""The writer lock's single-host lease: on a network file system `flock` may not reach the other
hosts, so the holder also records (and keeps renewing) its host and pid in `write.lock`."""

from __future__ import annotations

import time

import pytest

from cnclip.errors import IndexBusyError
from cnclip.index import lock as lock_module
from cnclip.index.lock import WriterLock
from cnclip.oslock import this_host


def leave_lease_of(folder, host: str, monkeypatch) -> str:
    """The lock file as a writer on `host` leaves it while it writes (its flock not seen here)."""
    monkeypatch.setattr(lock_module, "this_host", lambda: host)
    writer = WriterLock(folder)
    writer.acquire()
    text = writer.path.read_text()
    writer.release()
    writer.path.write_text(text)
    monkeypatch.setattr(lock_module, "this_host", this_host)
    return text


def test_a_lease_of_another_live_host_refuses_the_writer_naming_host_and_pid(tmp_path, monkeypatch):
    text = leave_lease_of(tmp_path, "nas-client-2", monkeypatch)
    assert "nas-client-2" in text
    writer = WriterLock(tmp_path)
    with pytest.raises(IndexBusyError, match=r"host nas-client-2 \(pid \d+") as e:
        writer.acquire()
    assert "\n" not in str(e.value) and "--wait" in str(e.value)
    assert not writer.try_acquire() and not writer.held
    start = time.monotonic()
    with pytest.raises(IndexBusyError):
        writer.acquire(wait=0.3)  # waits for the lease, then gives up
    assert time.monotonic() - start >= 0.3
    assert writer.path.read_text() == text  # the other host's lease is left as it was


def test_a_lapsed_lease_of_another_host_or_one_of_this_host_is_taken_over(tmp_path, monkeypatch):
    leave_lease_of(tmp_path, "nas-client-2", monkeypatch)
    monkeypatch.setattr(lock_module, "LEASE_TTL_S", 0.0)  # its host stopped renewing it: down
    with WriterLock(tmp_path).hold() as writer:
        assert f"on {this_host()}" in writer.owner()
    monkeypatch.undo()
    leave_lease_of(tmp_path, this_host(), monkeypatch)  # this host: the flock already says it ended
    with WriterLock(tmp_path).hold():
        pass


def test_a_released_lease_frees_the_index_for_other_hosts_and_a_held_one_is_renewed(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "LEASE_RENEW_S", 0.05)
    writer = WriterLock(tmp_path)
    with writer.hold():
        with writer.hold():  # nested holds share one lease
            first = writer.lease()
            assert first is not None and first.host == this_host()
            time.sleep(0.3)
            assert writer.lease().renewed > first.renewed
        assert writer.lease() is not None
    assert writer.lease() is None and writer.owner().startswith("pid ")  # who last wrote stays readable
    monkeypatch.setattr(lock_module, "this_host", lambda: "nas-client-2")
    with WriterLock(tmp_path).hold():  # another host may write now
        pass
