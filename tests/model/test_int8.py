"""`--precision int8`: the image tower quantized in ONNX Runtime, the text tower left in fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import indexed_vectors, random_images, run_cli

import cnclip
from cnclip.errors import CNClipError
from cnclip.model.encoder import Encoder
from cnclip.model.runtime import Runtime

TEXTS = ["海边的日落", "一只橘猫"]


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("CNCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(7)
    return cnclip.create_model("tiny-vit")


def test_int8_quantizes_the_image_tower_only(tmp_path, model):
    images = random_images(6, seed=5)
    fp32 = Encoder.build(model)
    fp32_images, fp32_texts = fp32.embed_images(images), fp32.embed_texts(TEXTS)
    runtime = Runtime.resolve(precision="int8")
    assert runtime == Runtime("cpu", "int8", ("image", "text"), text_precision="fp32")
    encoder = runtime.build(model)
    assert encoder.image_precision == "int8" and model.dtype == torch.float32
    got = encoder.embed_images(images)
    cosines = (got * fp32_images).sum(1)
    assert np.all(cosines > 0.999) and np.any(cosines < 0.999999), cosines  # close, and really quantized
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), fp32_texts, atol=1e-5)  # queries unchanged
    made = {p.name for p in (tmp_path / "cache").rglob("*.onnx")}
    assert made == {"image.onnx", "image.int8.onnx", "text.onnx"}
    assert encoder.runtime.to_dict()["image"] == {"engine": "onnx", "precision": "int8"}
    assert encoder.runtime.to_dict()["text"] == {"engine": "onnx", "precision": "fp32"}


def test_the_quantized_tower_is_made_once_per_model(tmp_path, model):
    image = random_images(1, seed=2)
    first = Runtime.resolve(precision="int8").build(model).embed_images(image)
    (quantized,) = (tmp_path / "cache").rglob("image.int8.onnx")
    stamp = quantized.stat().st_mtime_ns
    again = Runtime.resolve(precision="int8").build(model)  # sessions reopened, files reused
    np.testing.assert_array_equal(again.embed_images(image), first)
    assert quantized.stat().st_mtime_ns == stamp
    assert Runtime.resolve(precision="fp32").build(model).image_precision == "fp32"


def test_int8_needs_the_cpu_and_onnx_runtime(monkeypatch):
    with pytest.raises(CNClipError, match="int8 runs on the CPU in ONNX Runtime; use --device cpu"):
        Runtime.resolve(precision="int8", backend="torch")
    monkeypatch.setattr("cnclip.model.runtime.onnxruntime_available", lambda: False)
    with pytest.raises(CNClipError, match="--precision int8 needs onnxruntime; pip install onnxruntime"):
        Runtime.resolve(precision="int8")
    with pytest.raises(CNClipError, match="int8 runs in ONNX Runtime"):
        Encoder.build(cnclip.create_model("tiny-vit"), precisions={"image": "int8"}, onnx_towers=("text",))


def test_cnclip_index_in_int8_records_it_and_searches_like_fp32(tmp_path, tiny_vit):
    """The CLI end to end: vectors computed in int8 are recorded as such, sit within quantization
    error of fp32 ones, and fp32 text queries rank the photos as they rank the fp32 vectors."""
    model_dir = tiny_vit.save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(6, seed=13)):
        img.save(folder / f"{i}.jpg")
    env = {"CNCLIP_CACHE": str(tmp_path / "cache")}
    vectors = {}
    for precision in ("fp32", "int8"):
        idx = tmp_path / f"idx-{precision}"
        out = run_cli("index", folder, "--index", idx, "--model", model_dir, "-q", "--precision", precision, env=env)
        assert out.returncode == 0, out.stderr
        info = run_cli("info", "--index", idx, "--json", env=env)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["precisions"] == {precision: 6}
        vectors[precision] = indexed_vectors(idx)
    assert vectors["int8"].keys() == vectors["fp32"].keys()
    for path, vector in vectors["fp32"].items():
        assert float(vector @ vectors["int8"][path]) > 0.999, path
    out = run_cli("search", TEXTS[0], "--index", tmp_path / "idx-int8", "--json", "-k", "6", env=env)
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    query = Encoder.build(tiny_vit).embed_texts(TEXTS[:1])[0]
    assert sorted(h["path"] for h in hits) == sorted(vectors["int8"])
    for hit in hits:
        assert abs(hit["score"] - float(query @ vectors["int8"][hit["path"]])) < 1e-4


def test_compare_precisions_judges_int8_images_against_fp32(tmp_path, model):
    """What scripts/bench/precision.py --precision int8 reports: rankings with int8 images; the
    text tower stays fp32, so int8 text changes nothing."""
    from cnclip.train.evaluate import compare_precisions
    from cnclip.train.pairs import Pair

    paths = []
    for i, image in enumerate(random_images(12, seed=21)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    pairs = [Pair(p, text) for p, text in zip(paths, ["海边", "猫", "城市夜景", "雪山"] * 3, strict=True)]
    compared = compare_precisions(model, pairs, "int8")
    assert set(compared) == {"fp32", "int8", "int8 images, fp32 text", "fp32 images, int8 text"}
    assert compared["fp32"]["top10_overlap"] == 1.0
    assert compared["fp32 images, int8 text"]["top10_overlap"] == 1.0  # queries are not quantized
    assert 0.5 < compared["int8 images, fp32 text"]["top10_overlap"] <= 1.0
    assert model.dtype == torch.float32 and model.image_dtype == torch.float32  # the model given is not changed
