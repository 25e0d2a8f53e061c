"""The main job end to end: the real `cnclip index` / `cnclip search` on a generated folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import indexed_vectors, run_cli, solid_photo
from PIL import Image

import cnclip

_solid = solid_photo


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(6):
        _solid(root / f"p{i}.png", tuple(int(c) for c in rng.integers(0, 256, 3)))
    for i in range(3):
        _solid(root / "子目录" / f"海边{i}.jpg", tuple(int(c) for c in rng.integers(0, 256, 3)))
    return root


def _index(photos, idx, model_dir, *extra):
    out = run_cli("index", photos, "--index", idx, "--model", model_dir, "--json", "-q", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_incremental_indexing_counts(photos, tmp_path, model_dir):
    idx = tmp_path / "idx"
    first, _ = _index(photos, idx, model_dir)
    assert (first["added"], first["updated"], first["removed"], first["unchanged"]) == (9, 0, 0, 0)
    assert first["embedded"] == 9 and first["skipped"] == []

    again, _ = _index(photos, idx, model_dir)
    assert (again["added"], again["updated"], again["removed"], again["unchanged"], again["embedded"]) == (
        0,
        0,
        0,
        9,
        0,
    )

    _solid(photos / "p0.png", (1, 2, 3))  # modified
    os.utime(photos / "p0.png", ns=(1, 1))
    (photos / "p1.png").unlink()  # deleted
    os.rename(photos / "p2.png", photos / "子目录" / "改名.png")  # renamed and moved
    _solid(photos / "new.png", (9, 200, 9))  # added
    third, _ = _index(photos, idx, model_dir)
    assert (third["added"], third["updated"], third["removed"], third["unchanged"]) == (2, 1, 2, 6)
    assert third["embedded"] == 2 and third["reused"] == 1  # the rename was not re-embedded

    out = run_cli("search", "海边", "--index", idx, "-k", "20", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    paths = {h["path"] for h in hits}
    assert len(hits) == 9 and str(photos / "p1.png") not in paths and str(photos / "子目录" / "改名.png") in paths
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)

    info = run_cli("info", "--index", idx, "--json")
    assert info.returncode == 0, info.stderr
    stats = json.loads(info.stdout)
    assert stats["images"] == 9 and stats["texts"] == 0 and stats["model"]["dim"] == 32
    assert stats["vector_index"]["kind"] == "exact" and stats["vector_index"]["current"] is True


def test_plain_output_and_image_search(photos, tmp_path, model_dir):
    idx = tmp_path / "idx"
    _index(photos, idx, model_dir)
    grid, page = tmp_path / "out" / "hits.jpg", tmp_path / "out" / "hits.html"
    missing = run_cli("search", "一只猫", "--index", idx, "--grid", grid)  # a folder that does not exist
    assert missing.returncode == 1 and "does not exist; create it first" in missing.stderr
    assert not grid.parent.exists()
    grid.parent.mkdir()
    out = run_cli("search", "一只猫", "--index", idx, "-k", "3", "--grid", grid, "--html", page)
    lines = out.stdout.strip().splitlines()
    assert Image.open(grid).format == "JPEG" and page.read_text("utf-8").count('class="card') == 3
    assert out.returncode == 0 and len(lines) == 3
    score, path = lines[0].split("\t")
    assert float(score) <= 1 and os.path.isfile(path)

    query = photos / "p3.png"
    out = run_cli("search", "--image", query, "--index", idx, "-k", "5", "--json")
    hits = json.loads(out.stdout)
    assert out.returncode == 0 and len(hits) == 5 and str(query) not in {h["path"] for h in hits}
    out = run_cli("search", "--image", query, "--index", idx, "-k", "1", "--include-self", "--json")
    assert json.loads(out.stdout)[0]["path"] == str(query)


def test_image_to_text_and_tag(photos, tmp_path, model_dir):
    idx = tmp_path / "idx"
    _index(photos, idx, model_dir)
    texts = tmp_path / "texts.txt"
    texts.write_text("海边的日落\n一只猫\n城市夜景\n一只猫\n", "utf-8")
    assert run_cli("index", "--texts", texts, "--index", idx).returncode == 0
    out = run_cli("search", "--image", photos / "p0.png", "--texts", "--index", idx, "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(h["text"] for h in json.loads(out.stdout)) == ["一只猫", "城市夜景", "海边的日落"]

    labels = tmp_path / "labels.txt"
    labels.write_text("猫\n狗\n海滩\n", "utf-8")
    out = run_cli("tag", photos / "p0.png", "--labels", labels, "--index", idx, "--json")
    assert out.returncode == 0, out.stderr
    tags = json.loads(out.stdout)
    assert sorted(t["label"] for t in tags) == ["海滩", "狗", "猫"]
    assert sum(t["score"] for t in tags) == pytest.approx(1, abs=1e-5)


def test_bad_input_zoo(tmp_path, model_dir):
    root = tmp_path / "zoo"
    good = _solid(root / "good.jpg", (10, 120, 200))
    (root / "empty.jpg").write_bytes(b"")
    data = good.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("not an image")
    Image.new("RGB", (600, 600), (1, 2, 3)).save(root / "huge.png")
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 40 * 30).astype(np.uint16).reshape(30, 40)).save(root / "deep.png")
    Image.new("P", (40, 30), 3).save(root / "palette.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(root / "alpha.png")
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (5, 5, 5)).save(root / "rotated.jpg", exif=exif)
    _solid(root / ".hidden" / "secret.png", (0, 0, 0))
    _solid(root / "中文 名字.png", (50, 60, 70))
    os.symlink(root, root / "loop")  # a symlink loop back to the root
    os.symlink(root / "missing.png", root / "dangling.png")
    raw_name = os.fsencode(str(root)) + b"/caf\xe9.png"  # a name that is not UTF-8
    _solid(tmp_path / "latin1.png", (90, 90, 90))
    os.rename(tmp_path / "latin1.png", raw_name)

    summary, stderr = _index(root, tmp_path / "idx", model_dir, "--max-pixels", "100000")
    skipped = {os.path.basename(s["path"]): s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"empty.jpg", "truncated.jpg", "notes.png", "huge.png", "dangling.png"}
    assert "empty" in skipped["empty.jpg"] and "pixels" in skipped["huge.png"]
    assert summary["added"] == 9  # good, cmyk, deep, palette, alpha, anim, rotated, 中文 名字, café
    for name in skipped:  # one stderr line per skipped file, naming it
        assert sum(name in line for line in stderr.splitlines()) == 1

    out = run_cli("search", "图片", "--index", tmp_path / "idx", "-k", "50", "--json")
    paths = {h["path"] for h in json.loads(out.stdout)}
    assert str(root / "中文 名字.png") in paths and os.fsdecode(raw_name) in paths
    assert not any(".hidden" in p for p in paths)
    with_hidden, _ = _index(root, tmp_path / "idx", model_dir, "--hidden", "--max-pixels", "100000")
    assert with_hidden["added"] == 1


def test_query_and_path_errors(photos, tmp_path, model_dir):
    idx = tmp_path / "idx"
    _index(photos, idx, model_dir)
    for args, needle in [
        (("search", "   ", "--index", idx), "empty"),
        (("search", "猫" * 10_000, "--index", idx), "10,000 characters"),
        (("search", "猫", "--index", tmp_path / "nowhere"), "no cnclip index"),
        (("index", tmp_path / "no-such-dir", "--index", idx), "not a folder"),
        (("index", tmp_path / "no-such-dir", "--index", tmp_path / "new1"), "not a folder"),
        (("index", photos, "--index", tmp_path / "new2", "--model", "ViT-Nope"), "unknown model"),
        (("index", photos, "--index", tmp_path / "new3", "--model", tmp_path / "nothing.pt"), "nothing.pt"),
        (("index", "--index", tmp_path / "new4"), "nothing to index"),
    ]:
        out = run_cli(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and needle in lines[0], out.stderr
    # a failed first run leaves no half-made index behind
    assert not any((tmp_path / f"new{i}").exists() for i in range(1, 5))


def test_model_mismatch_is_refused(photos, tmp_path, model_dir):
    import torch

    idx = tmp_path / "idx"
    _index(photos, idx, model_dir)
    torch.manual_seed(99)
    other = cnclip.create_model("tiny-vit").save_pretrained(tmp_path / "other")
    for args in (
        ("index", photos, "--index", idx, "--model", other),
        ("search", "猫", "--index", idx, "--model", other),
    ):
        out = run_cli(*args)
        assert out.returncode == 1 and "model" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_kill_9_mid_index_then_resume_and_search_meanwhile(tmp_path, model_dir):
    root = tmp_path / "many"
    rng = np.random.default_rng(1)
    n = 240
    for i in range(n):
        _solid(root / f"{i:03d}.png", tuple(int(c) for c in rng.integers(0, 256, 3)), size=(160, 120))
    idx = tmp_path / "idx"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "cnclip", "index", str(root), "--index", str(idx), "--model", str(model_dir)]
    proc = subprocess.Popen([*cmd, "--batch-size", "4", "-q"], env=env, stderr=subprocess.DEVNULL)
    db = idx / "catalog.sqlite3"
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and committed < 20:
        time.sleep(0.2)
        if db.exists():
            with sqlite3.connect(db) as con:
                try:
                    committed = con.execute("select count(*) from files").fetchone()[0]
                except sqlite3.OperationalError:
                    committed = 0
    assert proc.poll() is None, "indexing finished before it could be interrupted; use more images"
    searching = run_cli("search", "红色", "--index", idx, "-k", "5", "--json")  # while index runs
    assert searching.returncode == 0, searching.stderr
    assert 1 <= len(json.loads(searching.stdout)) <= 5
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    out = subprocess.run([*cmd, "--json", "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)
    assert resumed["unchanged"] >= 20 and resumed["unchanged"] + resumed["added"] == n
    assert resumed["embedded"] == resumed["added"] and resumed["removed"] == 0
    final = run_cli("search", "红色", "--index", idx, "-k", str(n + 10), "--json")
    assert len(json.loads(final.stdout)) == n
    shutil.rmtree(root)


# -- several processes on one index (issue 15) ----------------------------------------------------

HOLD_LOCK = (
    "import sys, time\n"
    "from cnclip.index.lock import WriterLock\n"
    "WriterLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def _holder(idx, seconds: float) -> subprocess.Popen:
    """Another process holding the index's writer lock for `seconds`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(idx), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_in_one_line_waits_with_wait_and_a_killed_writer_frees_the_lock(
    photos, tmp_path, model_dir
):
    idx = tmp_path / "idx"
    _index(photos, idx, model_dir)
    holder = _holder(idx, 600)
    try:
        out = run_cli("index", photos, "--index", idx, "--model", model_dir, "-q")
        assert out.returncode == 1
        assert out.stderr.startswith(
            f"cnclip: error: index {idx} is being written by another process (pid {holder.pid}"
        )
        assert "--wait" in out.stderr and len(out.stderr.strip().splitlines()) == 1
        search = run_cli("search", "海边", "--index", idx, "--json")  # readers never wait for the lock
        assert search.returncode == 0 and len(json.loads(search.stdout)) == 9
    finally:
        holder.kill()  # kill -9: the OS frees its lock, nothing to break by hand
        holder.wait()
    assert _index(photos, idx, model_dir)[0]["unchanged"] == 9

    holder = _holder(idx, 2)
    summary, _ = _index(photos, idx, model_dir, "--wait", "120")
    assert holder.wait(timeout=60) == 0 and summary["unchanged"] == 9


def test_two_index_runs_at_once_embed_each_photo_once(photos, tmp_path, model_dir):
    idx = tmp_path / "idx"
    cmd = [sys.executable, "-m", "cnclip", "index", str(photos), "--index", str(idx), "--model", str(model_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs = [subprocess.Popen([*cmd, "--json", "-q", "--wait", "120"], stdout=subprocess.PIPE, env=env) for _ in "ab"]
    summaries = [json.loads(run.communicate(timeout=300)[0]) for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert sorted(s["embedded"] for s in summaries) == [0, 9]  # the second waited, then found all done
    assert len(indexed_vectors(idx)) == 9


def test_offline_prune_and_gc_through_the_cli(photos, tmp_path, model_dir):
    idx = tmp_path / "idx"
    _index(photos, idx, model_dir)
    aside = tmp_path / "aside"
    shutil.move(photos / "子目录", aside)
    os.symlink(tmp_path / "nas" / "子目录", photos / "子目录")  # a folder on a drive that is not mounted
    summary, stderr = _index(photos, idx, model_dir)
    assert summary["removed"] == 0 and summary["offline"][0]["files"] == 3
    assert f"offline {photos / '子目录'}: symlink target missing" in stderr
    hits = json.loads(run_cli("search", "海边", "--index", idx, "--json", "-k", "20").stdout)
    assert len(hits) == 6 and not any("子目录" in h["path"] for h in hits)
    info = json.loads(run_cli("info", "--index", idx, "--json").stdout)
    assert (info["images"], info["offline"], info["unused_vectors"]) == (6, 3, 0)

    kept = run_cli("gc", "--index", idx)  # offline is not gone: gc keeps their vectors, and says so
    assert kept.returncode == 0 and "removed 0 unused vectors" in kept.stderr
    assert "kept the vectors of 3 offline files" in kept.stderr and "--prune" in kept.stderr

    pruned, _ = _index(photos, idx, model_dir, "--prune")
    assert pruned["removed"] == 3
    gc = run_cli("gc", "--index", idx, "--json")
    assert gc.returncode == 0
    assert json.loads(gc.stdout) == {"vectors_removed": 3, "unused_vectors_left": 0, "offline_files_kept": 0}


def test_the_default_index_is_found_from_any_folder_and_info_says_why(photos, tmp_path, model_dir):
    """Indexed from one folder, searched and described from another: one per-user index."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "CNCLIP_INDEX": None}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = run_cli("index", photos, "--model", model_dir, "-q", cwd=tmp_path / "a", env=env)
    assert out.returncode == 0, out.stderr
    hits = run_cli("search", "海边", "--json", cwd=tmp_path / "b", env=env)
    assert hits.returncode == 0 and len(json.loads(hits.stdout)) == 9
    info = run_cli("info", cwd=tmp_path / "b", env=env)
    home = tmp_path / "data" / "cnclip" / "index" / "default"
    assert f"index    {home} (chosen by the per-user default)" in info.stdout
    assert json.loads(run_cli("info", "--json", cwd=tmp_path, env=env).stdout)["index_chosen_by"] == (
        "the per-user default"
    )
