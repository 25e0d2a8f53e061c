"""The encoder runs a model without changing it: engines, precisions, numpy rows, deprecated model helpers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_images

import cnclip
from cnclip.model.encoder import Encoder, converted
from cnclip.model.runtime import Runtime
from cnclip.model.transform import ImageTransform

TEXTS = ["海边的日落", "一只在沙发上睡觉的橘猫", "城市夜景"]


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("CNCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(4)
    return cnclip.create_model("tiny-vit")


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "runtime",
    [
        Runtime("cpu", "bf16"),
        Runtime("cpu", "bf16", text_precision="fp32"),
        Runtime("cpu", "fp32", text_precision="bf16"),
        Runtime("cpu", "int8", ("image", "text"), text_precision="fp32"),
    ],
    ids=["bf16", "bf16-images", "bf16-text", "int8"],
)
def test_build_leaves_the_model_as_it_was(model, runtime):
    before = _snapshot(model)
    digest = model.weights_digest()
    encoder = runtime.build(model)
    encoder.embed_images(random_images(2, seed=1))
    encoder.embed_texts(TEXTS)
    assert encoder.precisions == runtime.precisions and encoder.runtime is runtime
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert encoder.weights_digest() == digest == model.weights_digest()


def test_a_tower_in_another_dtype_is_a_copy_sharing_the_other_tower(model):
    assert converted(model, torch.device("cpu"), {"image": torch.float32, "text": torch.float32}) is model
    mixed = converted(model, torch.device("cpu"), {"image": torch.bfloat16, "text": None})
    assert mixed is not model and mixed.image_dtype == torch.bfloat16 and model.image_dtype == torch.float32
    assert mixed.text_projection is model.text_projection  # the fp32 text tower is not copied
    assert mixed.bert.embeddings.word_embeddings.weight is model.bert.embeddings.word_embeddings.weight
    assert mixed.tokenizer is model.tokenizer


def test_fp32_vectors_equal_the_towers_normalized(model):
    """What `CNClipModel.embed_*` gave before encoders: the model's own towers, rows normalized in fp32."""
    images = random_images(5, seed=2)
    encoder = Runtime("cpu", "fp32").build(model)
    with torch.inference_mode():
        pixels = ImageTransform(model.config.vision.image_size).batch(images)
        want_images = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        want_texts = torch.nn.functional.normalize(model.encode_text(model.tokenizer(TEXTS)), dim=-1).numpy()
    got = encoder.embed_images(images)
    assert got.dtype == np.float32 and got.shape == (5, model.embed_dim)
    np.testing.assert_allclose(got, want_images, atol=1e-6)
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), want_texts, atol=1e-6)


def test_identity_is_the_models(model):
    encoder = Encoder.build(model)
    assert encoder.config is model.config and encoder.tokenizer is model.tokenizer
    assert encoder.embed_dim == model.embed_dim and encoder.device == torch.device("cpu")
    assert encoder.image_precision == "fp32" and encoder.text_precision == "fp32" and encoder.runtime is None
    assert encoder.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert encoder.source is None  # built in memory; load_model records where a model came from


def test_deprecated_model_helpers_warn_and_give_the_encoders_vectors(model, tmp_path):
    images = random_images(3, seed=3)
    encoder = Encoder.build(model)
    with pytest.warns(DeprecationWarning, match="Encoder.embed_images"):
        np.testing.assert_array_equal(model.embed_images(images), encoder.embed_images(images))
    with pytest.warns(DeprecationWarning, match="Encoder.embed_texts"):
        np.testing.assert_array_equal(model.embed_texts(TEXTS), encoder.embed_texts(TEXTS))
    with pytest.warns(DeprecationWarning, match="Encoder.preprocess"):
        torch.testing.assert_close(model.preprocess.batch(images), encoder.preprocess.batch(images))
    with pytest.warns(DeprecationWarning, match="Runtime.build"):
        model.use_onnx(("text",), folder=tmp_path)
    with pytest.warns(DeprecationWarning):
        onnx_texts = model.embed_texts(TEXTS)
    assert [p.name for p in tmp_path.rglob("*.onnx")] == ["text.onnx"]
    np.testing.assert_allclose(onnx_texts, encoder.embed_texts(TEXTS), atol=1e-5)
    copy.deepcopy(model)  # ONNX sessions do not copy: the deprecated encoder stays behind
    with pytest.warns(DeprecationWarning):
        model.use_onnx(())
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(model.embed_texts(TEXTS), encoder.embed_texts(TEXTS))


def test_load_encoder_loads_and_builds(tiny_vit_dir):
    encoder = cnclip.load_encoder(tiny_vit_dir, backend="torch", precision="fp32", device="cpu")
    assert isinstance(encoder, cnclip.Encoder)
    assert encoder.runtime == Runtime("cpu", "fp32") and encoder.source == str(tiny_vit_dir.resolve())
    want = Encoder.build(cnclip.load_model(tiny_vit_dir)).embed_texts(TEXTS)
    np.testing.assert_array_equal(encoder.embed_texts(TEXTS), want)


def test_int8_and_onnx_need_onnx_towers_on_the_cpu(model):
    with pytest.raises(cnclip.CNClipError, match="int8 runs in ONNX Runtime"):
        Encoder.build(model, precisions={"image": "int8"})
    with pytest.raises(cnclip.CNClipError, match="unknown tower"):
        Encoder.build(model, onnx_towers=("audio",))


def test_a_converted_encoder_lets_the_original_model_go():
    """A bf16 (or GPU) encoder runs from its own copy: the fp32 model it came from can be freed."""
    import gc
    import weakref

    torch.manual_seed(5)
    model = cnclip.create_model("tiny-vit")
    digest, original = model.weights_digest(), weakref.ref(model)
    encoder = Encoder.build(model, precisions={"image": "bf16", "text": "bf16"})
    del model
    gc.collect()
    assert original() is None
    assert encoder.weights_digest() == digest
    assert np.isfinite(encoder.embed_texts(["一只猫"])).all()
