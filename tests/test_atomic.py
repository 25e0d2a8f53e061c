"""cnclip.atomic: a reader or a crash sees the old content or the new, never half, and no temporaries stay."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from cnclip import atomic


def test_replacing_publishes_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "vectors.json"
    atomic.write_json(path, {"a": 1})
    assert path.read_text("utf-8") == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text("utf-8") == '{\n  "a": 1\n}\n' and list(tmp_path.iterdir()) == [path]
    with atomic.replacing(path, suffix=".npy") as tmp:
        assert tmp.name.endswith(".tmp.npy") and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and list(tmp_path.iterdir()) == [path]


def test_temp_names_are_unique_and_short(tmp_path):
    long = tmp_path / ("照片" * 60 + ".jpg")
    names = {atomic.temp_name(long) for _ in range(50)}
    assert len(names) == 50 and all(len(n.name.encode()) < 255 for n in names)


def test_replacing_folder_swaps_whole_and_restores_on_failure(tmp_path):
    folder = tmp_path / "last"
    with atomic.replacing_folder(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic.replacing_folder(folder) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (folder / "a").read_text() == "1"
    with atomic.replacing_folder(folder) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary, no old copy left


def test_a_swap_that_fails_after_moving_the_old_folder_aside_puts_it_back(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    with atomic.replacing_folder(folder) as tmp:
        (tmp / "a").write_text("1")
    real_replace, renames = os.replace, []

    def swap_fails(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        if len(renames) == 2:  # the new folder into place, after the old one was moved aside
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", swap_fails)
    with pytest.raises(OSError, match="Input/output"), atomic.replacing_folder(folder) as tmp:
        (tmp / "a").write_text("2")
    monkeypatch.undo()
    old_copy = str(atomic.previous_folder(folder))
    assert renames[0] == (str(folder), old_copy) and renames[1][1] == str(folder)  # the fault came after the move
    assert (folder / "a").read_text() == "1" and sorted(p.name for p in folder.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary, no old copy left


class _DiskFillsUp:
    """A file whose writes stop half-way with ENOSPC, as on a full disk."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


WRITERS = [  # a writer, what it is given, what it writes
    (atomic.write_bytes, b"new content " * 1000, b"new content " * 1000),
    (atomic.write_text, "新的内容" * 1000, "新的内容".encode() * 1000),
    (atomic.write_json, {"新": [1, 2]}, '{\n  "新": [\n    1,\n    2\n  ]\n}\n'.encode()),
]


@pytest.mark.parametrize("fault", ["write", "fsync"])
@pytest.mark.parametrize(("write", "content", "written"), WRITERS, ids=["bytes", "text", "json"])
def test_a_write_that_fails_midway_keeps_the_old_file_whole(tmp_path, monkeypatch, write, content, written, fault):
    path = tmp_path / "vectors.json"
    old = b'{"old": "content"}\n' * 100
    path.write_bytes(old)
    real_open = open
    if fault == "write":
        monkeypatch.setattr(atomic, "open", lambda *a, **k: _DiskFillsUp(real_open(*a, **k)), raising=False)
    else:  # delayed allocation: the write "succeeds", flushing it to disk does not

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
    with real_open(path, "rb") as reader:
        with pytest.raises(OSError, match="No space left"):
            write(path, content)
        monkeypatch.undo()
        assert reader.read() == old
    assert path.read_bytes() == old and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(("write", "content", "written"), WRITERS, ids=["bytes", "text", "json"])
def test_a_reader_of_the_old_file_keeps_its_bytes_after_a_write(tmp_path, write, content, written):
    path = tmp_path / "vectors.json"
    old = b'{"old": "content"}\n' * 100
    path.write_bytes(old)
    with open(path, "rb") as reader:
        write(path, content)
        assert reader.read() == old  # the new content is a new file, renamed over the old name
    assert path.read_bytes() == written and list(tmp_path.iterdir()) == [path]


def test_publish_and_stale_temporaries(tmp_path):
    part = tmp_path / "w.pt.part"
    part.write_bytes(b"weights")
    atomic.publish(part, tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == b"weights" and not part.exists()
    atomic.temp_name(tmp_path / "vectors.faiss").write_bytes(b"left by a killed writer")
    atomic.temp_name(tmp_path / "last").mkdir()
    assert atomic.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_published_files_get_the_users_mode_whatever_the_writer_made(tmp_path):
    """safetensors and mkstemp write 0600 temporaries: published, a file is 0666 & ~umask (0644
    usually), and a target the user chmod'ed keeps its mode."""
    mask = os.umask(0o022)
    os.umask(mask)
    new = tmp_path / "new.bin"
    with atomic.replacing(new) as tmp:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask

    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    atomic.write_bytes(kept, b"new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640

    part = tmp_path / "download.part"
    os.close(os.open(part, os.O_CREAT | os.O_WRONLY, 0o600))
    atomic.publish(part, tmp_path / "weights.pt")
    assert stat.S_IMODE((tmp_path / "weights.pt").stat().st_mode) == 0o666 & ~mask
