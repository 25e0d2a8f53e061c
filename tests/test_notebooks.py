"""The notebooks run top to bottom (on a tiny random model and a generated folder)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

import cnclip

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_quickstart_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model_dir = cnclip.create_model("tiny-vit").save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("CNCLIP_MODEL", str(model_dir))
    monkeypatch.delenv("QUICKSTART_PHOTOS", raising=False)
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "".join(o.get("text", "") for outs in outputs.values() for o in outs)
    assert "9 images in" in text and "'added': 9" in text
    assert any("image/jpeg" in o.get("data", {}) for outs in outputs.values() for o in outs)  # the contact sheet
    assert not any(o.get("output_type") == "error" for outs in outputs.values() for o in outs)


def test_finetune_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model_dir = cnclip.create_model("tiny-vit").save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("CNCLIP_MODEL", str(model_dir))
    monkeypatch.setenv("FINETUNE_EPOCHS", "1")
    for name in ("FINETUNE_TRAIN", "FINETUNE_VAL"):
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(NOTEBOOKS / "finetune.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "kept 800 pairs of 400 images" in text and "best step:" in text and "mean recall" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the training curves
    assert not any(o.get("output_type") == "error" for o in outputs)
