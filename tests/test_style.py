"""ruff's lint rules (pyproject.toml) hold for the whole repository, notebooks included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff if ruff.exists() else "ruff"), "check", "."], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, NO_COLOR="1"))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
