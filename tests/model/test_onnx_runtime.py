"""Queries through ONNX Runtime without PyTorch: `onnx_runtime.TextEncoder` and the light `cnclip search`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_images, run_cli

import cnclip
from cnclip.errors import CNClipError
from cnclip.model.encoder import Encoder
from cnclip.model.onnx_export import export_cached
from cnclip.model.onnx_runtime import TEXT_TOKENIZER, TextEncoder, export_folder

TEXTS = ["猫", "海边的日落和沙滩上的脚印", "一只在沙发上睡觉的橘猫，旁边有一本书", "“iPhone” 截图 2024", "ＡＢＣ全角"]


def _no_torch(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run Python with torch, open_clip and transformers made unimportable: proof that a path never loads them."""
    guard = "import sys\nfor m in ('torch', 'open_clip', 'transformers'): sys.modules[m] = None\n"
    return subprocess.run(
        [sys.executable, "-c", guard + code],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
        timeout=120,
    )


def test_text_encoder_equals_the_model_through_onnx_runtime(tmp_path):
    torch.manual_seed(11)
    model = cnclip.create_model("tiny-vit")
    export_cached(model, "text", tmp_path)
    folder = export_folder(model.weights_digest(), tmp_path)
    assert (folder / TEXT_TOKENIZER).exists() and (folder / "vocab.txt").exists()
    encoder = TextEncoder.cached(model.weights_digest(), tmp_path)
    texts = TEXTS * 30  # > one batch of 64, of varied lengths
    onnx = Encoder.build(model, onnx_towers=("text",), onnx_folder=tmp_path)
    np.testing.assert_allclose(encoder.embed_texts(texts), onnx.embed_texts(texts), atol=1e-6)
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), Encoder.build(model).embed_texts(TEXTS), atol=1e-5)
    assert encoder.embed_texts([]).shape == (0, model.embed_dim)
    with pytest.raises(TypeError, match="wrap a single query"):
        encoder.embed_texts("猫")


def test_missing_or_damaged_exports_give_no_encoder(tmp_path, tiny_vit):
    assert TextEncoder.cached("0" * 32, tmp_path) is None
    export_cached(tiny_vit, "text", tmp_path)
    folder = export_folder(tiny_vit.weights_digest(), tmp_path)
    (folder / TEXT_TOKENIZER).write_text("{not json")
    assert TextEncoder.cached(tiny_vit.weights_digest(), tmp_path) is None
    with pytest.raises(CNClipError, match="no usable text export"):
        TextEncoder(folder)


def test_importing_cnclip_loads_no_torch():
    modules = "cnclip, cnclip.app.cli, cnclip.index.index, cnclip.model.runtime, cnclip.model.onnx_runtime"
    out = _no_torch(f"import {modules}; print(cnclip.__version__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == cnclip.__version__


def test_cli_search_after_index_runs_without_torch(tmp_path):
    torch.manual_seed(12)
    model_dir = cnclip.create_model("tiny-vit").save_pretrained(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(random_images(5, seed=9)):
        img.save(photos / f"p{i}.jpg")
    index = tmp_path / "idx"
    cache = {"CNCLIP_CACHE": str(tmp_path / "cache")}
    out = run_cli("index", photos, "--index", index, "--model", model_dir, env=cache)
    assert out.returncode == 0, out.stderr
    assert "preparing the text tower for fast searches" in out.stderr
    want = run_cli("search", "海边的日落", "--index", index, "--json", "--backend", "torch", env=cache)
    assert want.returncode == 0, want.stderr

    # The same search with torch, open_clip and transformers unimportable: same files, same scores.
    argv = ["search", "海边的日落", "--index", str(index), "--json"]
    code = f"from cnclip.app.cli import main; sys.exit(main({argv!r}))"
    light = _no_torch(code, env={"CNCLIP_DEVICE": "cpu", **cache})
    assert light.returncode == 0, light.stderr
    got, expected = json.loads(light.stdout), json.loads(want.stdout)
    assert [h["path"] for h in got] == [h["path"] for h in expected]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in expected], atol=1e-5)

    # Without the export (another cache) the search loads the model, and still answers.
    other = run_cli("search", "海边的日落", "--index", index, "--json", env={"CNCLIP_CACHE": str(tmp_path / "c2")})
    assert other.returncode == 0, other.stderr
    assert [h["path"] for h in json.loads(other.stdout)] == [h["path"] for h in expected]


def test_runtime_resolves_without_torch_when_told_the_device():
    out = _no_torch(
        "from cnclip.model.runtime import Runtime; r = Runtime.resolve(); print(r.device, r.precision, *r.onnx_towers)",
        env={"CNCLIP_DEVICE": "cpu"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "fp32", "image", "text"]
