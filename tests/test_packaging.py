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
def built(tmp_path_factory) -> dict[str, list[str]]:
    """The sdist's and the wheel's file lists, built from a copy of the tracked files."""
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
