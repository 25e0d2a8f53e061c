"""cnclip.atomic: a reader or a crash sees the old content or the new, never half, and no temporaries stay."""

from __future__ import annotations

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


def test_publish_and_stale_temporaries(tmp_path):
    part = tmp_path / "w.pt.part"
    part.write_bytes(b"weights")
    atomic.publish(part, tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == b"weights" and not part.exists()
    atomic.temp_name(tmp_path / "vectors.faiss").write_bytes(b"left by a killed writer")
    atomic.temp_name(tmp_path / "last").mkdir()
    assert atomic.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
