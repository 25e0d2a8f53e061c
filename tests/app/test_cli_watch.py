"""Keeping an index current: the real `cnclip index DIR --watch` (one stderr line per batch, Ctrl+C
stops it cleanly) and `create_app(watch=...)`, the server of `cnclip serve --watch DIR`."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import eventually, random_images, run_cli, write_photos
from fastapi.testclient import TestClient

import cnclip
from cnclip.app.serve import create_app

WITHIN_S = 20.0  # changes land in 1-2 s here; the margin is for a loaded CI machine, not the feature
START_S = 120.0  # a cold `cnclip` process imports torch and loads the model first


def _eventually(condition, what: str):
    return eventually(condition, what, WITHIN_S)


def _found(reader: cnclip.Index) -> set[str]:
    """Every searchable path: an image query with k above the library's size."""
    return {h.path for h in reader.search_image(random_images(1, seed=99)[0], k=50)}


class _Lines:
    """The lines a process writes to a pipe, read on a thread so that it never blocks on a full pipe."""

    def __init__(self, pipe):
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
        pytest.fail(f"no line with {text!r} within {timeout:.0f} s; got:\n" + "\n".join(self.seen))

    def rest(self) -> list[str]:
        self._thread.join(timeout=10)
        while not self._queue.empty():
            self.seen.append(self._queue.get())
        return self.seen


def test_index_watch_applies_changes_until_ctrl_c(tmp_path, model_dir):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    write_photos(photos, 3, seed=1)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "cnclip", "index", str(photos), "--index", str(idx), "--model", str(model_dir)]
    proc = subprocess.Popen(
        [*command, "--watch", "-q", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        err, out = _Lines(proc.stderr), _Lines(proc.stdout)
        first = json.loads(out.wait_for('"added"', START_S))
        assert first["added"] == 3
        err.wait_for("watching", START_S)

        [new] = write_photos(photos, 1, seed=2, prefix="new")
        assert err.wait_for("watch: ", WITHIN_S) == "watch: 1 added (1 embedded, 0 reused)"
        assert json.loads(out.wait_for('"added"', WITHIN_S))["added"] == 1
        with cnclip.Index.open(idx) as reader:
            assert str(new) in _found(reader)

        os.rename(new, photos / "renamed.png")
        (photos / "p0.png").unlink()
        expected = {str(photos / "p1.png"), str(photos / "p2.png"), str(photos / "renamed.png")}
        with cnclip.Index.open(idx) as reader:
            _eventually(lambda: _found(reader) == expected, "the rename and the deletion")
        assert "removed" in err.wait_for("watch: ", WITHIN_S)  # in one batch or two
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave it behind; the test fails below
            code = proc.wait()
    assert code == 130, "\n".join(err.rest())  # Ctrl+C: 130, as in every command
    assert any(line.startswith("watch: stopping") for line in err.rest())


def test_index_watch_needs_a_folder_no_ray_and_a_positive_poll_interval(tmp_path):
    out = run_cli("index", "--texts", tmp_path / "t.txt", "--index", tmp_path / "idx", "--watch")
    assert out.returncode == 1 and "--watch needs the FOLDER" in out.stderr
    (tmp_path / "photos").mkdir()
    out = run_cli("index", tmp_path / "photos", "--index", tmp_path / "idx", "--watch", "--ray")
    assert out.returncode == 1 and "drop --ray" in out.stderr
    out = run_cli("index", tmp_path / "photos", "--watch", "--watch-poll", "0")
    assert out.returncode == 2 and "above 0" in out.stderr
    out = run_cli("index", tmp_path / "photos", "--index", tmp_path / "idx", "--watch-poll", "5")
    assert out.returncode == 1 and "add --watch" in out.stderr  # not silently ignored


def test_serve_watch_keeps_the_served_index_current(tmp_path, model_dir):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    write_photos(photos, 3, seed=3)
    with cnclip.Index.open(idx, model=str(model_dir), create=True) as index:
        index.add_folder(photos)
    before = set(threading.enumerate())
    batches = []

    def search() -> set[str]:
        body = client.get("/api/search", params={"q": "猫", "k": 50}).json()
        return {h["path"] for h in body["results"]}

    with TestClient(create_app(idx, watch=[photos], on_watch=batches.append), base_url="http://127.0.0.1") as client:
        assert len(search()) == 3
        [new] = write_photos(photos / "later", 1, seed=4, prefix="new")  # in a folder made after the start
        _eventually(lambda: str(new) in search(), "a new photo is served")
        (photos / "p0.png").unlink()
        _eventually(lambda: str(photos / "p0.png") not in search(), "a deleted photo leaves")
        assert client.get("/api/health").json()["count"] == 3
    assert sum(b.summary.added for b in batches) == 1 and sum(b.summary.removed for b in batches) == 1
    left = [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name != "cnclip-rebuild_0"]
    assert not left, f"threads left running: {left}"


def test_index_watch_follows_a_removed_symlink_to_a_folder(tmp_path, model_dir):
    # to the OS's events the link is a file without an image extension; its photos must leave all the same
    photos, nas, idx = tmp_path / "photos", tmp_path / "nas", tmp_path / "idx"
    write_photos(photos, 3, seed=5)
    linked = write_photos(nas / "2023", 2, seed=6, prefix="n")
    os.symlink(nas / "2023", photos / "nas2023")
    command = [sys.executable, "-m", "cnclip", "index", str(photos), "--index", str(idx), "--model", str(model_dir)]
    proc = subprocess.Popen([*command, "--watch", "-q"], stderr=subprocess.PIPE, text=True)
    try:
        err = _Lines(proc.stderr)
        err.wait_for("watching", START_S)
        write_photos(photos, 1, seed=7, prefix="new")
        err.wait_for("watch: 1 added", WITHIN_S)  # the watcher's own first pass is over: it sees no link gone
        with cnclip.Index.open(idx) as reader:
            assert {str(photos / "nas2023" / p.name) for p in linked} <= _found(reader)
            (photos / "nas2023").unlink()
            assert err.wait_for("watch: ", WITHIN_S) == "watch: 2 removed (0 embedded, 0 reused)"
            _eventually(lambda: _found(reader) == {str(p) for p in photos.glob("*.png")}, "the linked photos leave")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 130, "\n".join(err.rest())  # Ctrl+C: 130, as in every command
