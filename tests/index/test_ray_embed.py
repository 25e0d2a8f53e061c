"""Embedding with Ray Data on a local Ray instance: the same index as one process, and restartable shards."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import indexed_vectors, random_images, run_cli

import cnclip
from cnclip.index.ray_embed import SHARD_SUFFIX, RayOptions


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(random_images(9, seed=21)):
        img.save(folder / ("sub" if i % 3 == 0 else ".") / f"{i}.png")
    random_images(1, seed=21)[0].save(folder / "sub" / "copy-of-0.png")  # same bytes as 0.png: embedded once
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def _single_process(photos, model_dir, tmp_path) -> dict[str, np.ndarray]:
    with cnclip.Index.open(tmp_path / "single", model=str(model_dir), create=True) as index:
        summary = index.add_folder(photos)
    assert summary.embedded == 9 and len(summary.skipped) == 1
    return indexed_vectors(tmp_path / "single")


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for path, vector in want.items():
        np.testing.assert_allclose(got[path], vector, atol=1e-5, err_msg=path)


def test_cli_index_with_ray_equals_the_single_process_index(photos, model_dir, tmp_path):
    want = _single_process(photos, model_dir, tmp_path)
    out = run_cli(
        "index", photos, "--index", tmp_path / "ray", "--model", model_dir, "--json", "-q",
        "--ray", "--ray-workers", "2", "--shard-size", "3", "--batch-size", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["shards"] == {"computed": 4, "reused": 0}  # 9 distinct images + the broken one, 3 per shard
    assert (summary["added"], summary["embedded"], summary["reused"]) == (10, 9, 1)
    assert [s["path"] for s in summary["skipped"]] == [str(photos / "broken.jpg")]
    assert len(list((tmp_path / "ray" / "shards").glob(f"*{SHARD_SUFFIX}"))) == 4
    _assert_same(indexed_vectors(tmp_path / "ray"), want)
    search = run_cli("search", "海边", "--index", tmp_path / "ray", "--json")
    assert search.returncode == 0 and len(json.loads(search.stdout)) == 10


# Ray runs in child processes, never in the pytest process: a Ray driver shares its process with
# everything else the test session loaded, and a local cluster's shutdown is then hard to contain.
_RUN = """
import json, os, sys
import cnclip
from cnclip.index.ray_embed import RayOptions
index_dir, model_dir, photos, stop = sys.argv[1:5]
written = []
def on_shard(key):
    written.append(key)
    if stop == "stop":
        print(json.dumps({"written": written}), flush=True)
        # A crash right after the first shard reached the disk. os._exit, not SystemExit: Ray's
        # shutdown on the way out could end the process with its own status (1 in ~8 runs).
        os._exit(3)
with cnclip.Index.open(index_dir, model=model_dir, create=True) as index:
    summary = index.add_folder(photos, ray=RayOptions(workers=2, shard_size=4, batch_size=2, num_cpus=2),
                               on_shard=on_shard)
    print(json.dumps({"written": written, "summary": summary.to_dict(), "count": index.catalog.count()}))
"""


def _ray_run(tmp_path, model_dir, photos, stop: bool) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path / "ray"), str(model_dir), str(photos), "stop" if stop else "go"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr
    return out.returncode, json.loads(lines[-1])


def test_an_interrupted_ray_run_resumes_without_recomputing_finished_shards(photos, model_dir, tmp_path):
    want = _single_process(photos, model_dir, tmp_path)
    code, cut = _ray_run(tmp_path, model_dir, photos, stop=True)
    assert code == 3 and len(cut["written"]) == 1
    shard = tmp_path / "ray" / "shards" / f"{cut['written'][0]}{SHARD_SUFFIX}"
    first = shard.stat().st_mtime_ns
    with cnclip.Index.open(tmp_path / "ray") as index:
        assert index.catalog.count() == 0  # nothing merged yet; the shard is on disk
    code, resumed = _ray_run(tmp_path, model_dir, photos, stop=False)
    assert code == 0
    assert cut["written"][0] not in resumed["written"]  # the finished shard was read back, not recomputed
    assert shard.stat().st_mtime_ns == first
    summary = resumed["summary"]
    assert summary["shards"] == {"computed": 2, "reused": 1}  # 10 files to embed in shards of 4, 4, 2
    assert summary["embedded"] == 5 and summary["reused"] == 5  # 4 read back from the shard, 1 copy
    _assert_same(indexed_vectors(tmp_path / "ray"), want)


def test_ray_needs_a_model_the_workers_can_load(photos, tmp_path):
    from cnclip.errors import CNClipError

    model = cnclip.create_model("tiny-vit")  # built in memory: no source to hand to the actors
    with cnclip.Index.open(tmp_path / "ray", model=model, create=True) as index:
        with pytest.raises(CNClipError, match="--ray needs a model the workers can load"):
            index.add_folder(photos, ray=RayOptions(num_cpus=2))
