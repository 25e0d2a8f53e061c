"""Choosing how a model runs: device, engine and precision, from the CLI and the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import indexed_vectors, random_images, run_cli

import cnclip
from cnclip.errors import CNClipError
from cnclip.index.index import Index
from cnclip.model.encoder import Encoder
from cnclip.model.runtime import Runtime

TEXTS = ["海边的日落", "一只橘猫"]


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_cpu_bf16_answer_can_be_forced(monkeypatch, value):
    from cnclip.model.cpu import CPU_BF16_ENV, cpu_has_fast_bf16

    monkeypatch.setenv(CPU_BF16_ENV, value)
    assert cpu_has_fast_bf16() is (value == "1")


def test_auto_on_a_cpu_runs_both_towers_in_onnx_runtime(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Runtime.resolve() == Runtime("cpu", "fp32", ("image", "text"))
    assert Runtime.resolve(backend="onnx") == Runtime("cpu", "fp32", ("image", "text"))
    assert Runtime.resolve(precision="bf16") == Runtime("cpu", "bf16", ())  # ORT runs fp32 only
    assert Runtime.resolve(backend="torch") == Runtime("cpu", "fp32", ())
    monkeypatch.setattr("cnclip.model.runtime.onnxruntime_available", lambda: False)
    assert Runtime.resolve() == Runtime("cpu", "fp32", ())  # auto falls back to PyTorch
    with pytest.raises(CNClipError, match="needs onnxruntime"):
        Runtime.resolve(backend="onnx")
    monkeypatch.undo()
    monkeypatch.setenv("CNCLIP_BACKEND", "torch")
    assert Runtime.resolve().onnx_towers == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tensorrt"}, "unknown backend 'tensorrt'"),
        ({"precision": "int4"}, "unknown precision 'int4'"),
        ({"device": "cpu", "precision": "fp16"}, "fp16 inference needs a GPU"),
        ({"device": "cpu", "backend": "onnx", "precision": "bf16"}, "runs fp32 or int8 on the CPU"),
        ({"device": "cpu", "backend": "torch", "precision": "int8"}, "int8 runs on the CPU in ONNX Runtime"),
        ({"device": "toaster"}, "unknown device 'toaster'"),
    ],
)
def test_impossible_choices_are_one_clear_error(kwargs, message):
    with pytest.raises(CNClipError, match=message):
        Runtime.resolve(**kwargs)


def test_a_gpu_asked_for_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CNClipError, match="sees no GPU here; use --device cpu"):
        Runtime.resolve(device="cuda")


def test_onnx_runtime_is_opened_only_for_the_tower_used(tmp_path, monkeypatch):
    monkeypatch.setenv("CNCLIP_CACHE", str(tmp_path))
    torch.manual_seed(5)
    model = cnclip.create_model("tiny-vit")
    images = random_images(3, seed=4)
    want = Encoder.build(model).embed_images(images)
    encoder = Runtime("cpu", "fp32", ("image", "text")).build(model)
    assert encoder.onnx_towers == ("image", "text")
    assert list(tmp_path.rglob("*.onnx")) == []  # nothing exported until a tower is used
    np.testing.assert_allclose(encoder.embed_images(images), want, atol=1e-5)
    assert [p.name for p in tmp_path.rglob("*.onnx")] == ["image.onnx"]


def test_bf16_keeps_the_index_identity_and_close_embeddings(tmp_path, tiny_vit):
    torch.manual_seed(6)
    model = cnclip.create_model("tiny-vit")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(4, seed=9)):
        img.save(folder / f"{i}.png")
    with Index.open(tmp_path / "idx", model=model, create=True) as index:
        index.add_folder(folder)
        want = index.search_text(TEXTS[0], k=4)
    fp32 = Encoder.build(model).embed_texts(TEXTS)
    bf16 = Runtime("cpu", "bf16").build(model)
    assert bf16.precisions == {"image": "bf16", "text": "bf16"} and model.dtype == torch.float32
    got = bf16.embed_texts(TEXTS)
    assert got.dtype == np.float32 and np.all((got * fp32).sum(1) > 0.99)
    with Index.open(tmp_path / "idx", model=bf16) as index:  # same weights: the index accepts it
        assert [h.path for h in index.search_text(TEXTS[0], k=4)][:1] == [want[0].path]


def test_cnclip_index_backends_give_the_same_vectors(tmp_path, tiny_vit):
    model_dir = tiny_vit.save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(5, seed=11)):
        img.save(folder / f"{i}.jpg")
    cache = tmp_path / "cache"
    results = {}
    for backend in ("torch", "onnx"):
        idx = tmp_path / f"idx-{backend}"
        env_args = ("index", folder, "--index", idx, "--model", model_dir, "--json", "-q", "--backend", backend)
        out = run_cli(*env_args, env={"CNCLIP_CACHE": str(cache)})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["embedded"] == 5
        exported = sorted(p.name for p in cache.rglob("*.onnx"))
        # with ONNX Runtime the text tower is exported too, so later searches need no model
        assert exported == ([] if backend == "torch" else ["image.onnx", "text.onnx"])
        results[backend] = indexed_vectors(idx)
    assert results["torch"].keys() == results["onnx"].keys()
    for key, vector in results["torch"].items():
        np.testing.assert_allclose(results["onnx"][key], vector, atol=1e-5)


def test_cnclip_search_with_onnx_text_finds_the_same(tmp_path, tiny_vit):
    model_dir = tiny_vit.save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(4, seed=12)):
        img.save(folder / f"{i}.png")
    idx = tmp_path / "idx"
    assert run_cli("index", folder, "--index", idx, "--model", model_dir, "-q").returncode == 0
    found = {}
    for backend in ("torch", "auto"):
        out = run_cli("search", TEXTS[0], "--index", idx, "--json", "--backend", backend)
        assert out.returncode == 0, out.stderr
        found[backend] = json.loads(out.stdout)
    assert [h["path"] for h in found["auto"]] == [h["path"] for h in found["torch"]]
    np.testing.assert_allclose([h["score"] for h in found["auto"]], [h["score"] for h in found["torch"]], atol=1e-5)
