"""What a user installs: the sdist and the wheel carry the licence, the pins and the package data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The sdist's and the wheel's file lists (and the wheel), built from a copy of the tracked files."""
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    src = tmp_path_factory.mktemp("src")
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    for kind in ("sdist", "wheel"):  # one process each: building both in one lost the wheel here
        code = f"import sys; from setuptools import build_meta as b; b.build_{kind}(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, check=True, capture_output=True, timeout=300)
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    with tarfile.open(sdist) as t, zipfile.ZipFile(wheel) as w:
        [metadata] = [n for n in w.namelist() if n.endswith(".dist-info/METADATA")]
        return {
            "sdist": [n.split("/", 1)[1] for n in t.getnames() if "/" in n],
            "wheel": w.namelist(),
            "wheel_file": wheel,
            "requires": [
                line.split(":", 1)[1].strip()
                for line in w.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")
            ],
        }


def test_the_licence_and_the_vocabularys_notice_ship_in_both(built):
    assert "LICENSE" in built["sdist"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in built["wheel"])
    text = (ROOT / "LICENSE").read_text("utf-8")
    assert "MIT License" in text and "Apache License, Version 2.0" in text and "vocab.txt" in text


def test_the_sdist_carries_the_pins_the_install_command_uses(built):
    assert "constraints.txt" in built["sdist"]


def test_the_wheel_carries_the_package_data(built):
    wheel = set(built["wheel"])
    assert "cnclip/model/resources/vocab.txt" in wheel
    assert "cnclip/model/configs/ViT-B-16.json" in wheel
    assert any(n.startswith("cnclip/app/web/") for n in wheel)


def test_the_plain_install_serves(built):
    """`cnclip serve` is one of the three jobs: its server needs no extra."""
    plain = {r.split(">")[0].split("=")[0].strip() for r in built["requires"] if "extra ==" not in r}
    assert {"fastapi", "uvicorn", "python-multipart"} <= plain


def test_the_installed_wheel_runs_every_job_from_outside_the_source_tree(built, tmp_path):
    """The wheel installed on its own (its dependencies taken from this environment, so that the
    test needs no 5 GB download), run through its console script from a folder far from the
    sources: --version, index, search and serve answer, and the code that ran is the wheel's."""
    import json
    import os
    import re
    import threading
    import urllib.request

    import torch
    from conftest import write_photos

    import cnclip

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", target, built["wheel_file"]],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    script = target / "bin" / "cnclip"
    work = tmp_path / "elsewhere"
    write_photos(work / "photos", 3, seed=1)
    torch.manual_seed(0)
    cnclip.create_model("tiny-vit").save_pretrained(work / "model")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "XDG_DATA_HOME": str(work / "data")}
    env.pop("CNCLIP_INDEX", None)

    def cnclip_cli(*args):
        return subprocess.run([script, *map(str, args)], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = subprocess.run(
        [sys.executable, "-c", "import cnclip; print(cnclip.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(target))  # the wheel's code, not the checkout's
    assert cnclip_cli("--version").stdout.strip() == f"cnclip {cnclip.__version__}"
    indexed = cnclip_cli("index", "photos", "--model", "model", "-q")
    assert indexed.returncode == 0, indexed.stderr
    hits = cnclip_cli("search", "海边", "--json")
    assert hits.returncode == 0 and len(json.loads(hits.stdout)) == 3, hits.stderr
    server = subprocess.Popen([script, "serve", "--port", "0"], cwd=work, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if found:
                threading.Thread(target=server.stderr.read, daemon=True).start()
                break
        else:
            pytest.fail("cnclip serve did not start")
        url = found.group(1)
        with urllib.request.urlopen(url + "api/health", timeout=60) as answer:
            assert json.loads(answer.read())["count"] == 3
        with urllib.request.urlopen(url, timeout=60) as page:
            assert b"<html" in page.read().lower()  # the page's files are in the wheel
    finally:
        server.terminate()
        server.wait(timeout=30)
