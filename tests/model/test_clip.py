"""Parity with the official cn_clip implementation: same weights in, same embeddings out."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cn_clip.clip import image_transform as official_transform
from cn_clip.clip import tokenize as official_tokenize
from conftest import random_images
from reference import official_model, official_state_shapes, save_official_checkpoint

import cnclip
from cnclip.model.config import get_model_config
from cnclip.model.encoder import Encoder
from cnclip.model.transform import ImageTransform

TEXTS = ["一只猫", "海边的日落", "a dog 在草地上奔跑 🐶", "", "一张" + "很长的描述" * 20]


def _official_features(ref, images, size):
    pixels = torch.stack([official_transform(size)(img) for img in images])
    with torch.no_grad():
        img = ref.encode_image(pixels)
        txt = ref.encode_text(official_tokenize(TEXTS))
    return img, txt, pixels


def _assert_parity(model, ref, images):
    ref_img, ref_txt, pixels = _official_features(ref, images, model.config.vision.image_size)
    with torch.no_grad():
        ours_img = model.encode_image(pixels)
        ours_txt = model.encode_text(cnclip.tokenize(TEXTS))
    torch.testing.assert_close(ours_img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_txt, ref_txt, atol=1e-5, rtol=1e-5)
    # the high-level API, an encoder: PIL and strings in, normalized numpy out
    norm = lambda t: torch.nn.functional.normalize(t, dim=-1).numpy()  # noqa: E731
    encoder = Encoder.build(model)
    np.testing.assert_allclose(encoder.embed_images(images), norm(ref_img), atol=1e-5)
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), norm(ref_txt), atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_official_checkpoint_parity(name, tmp_path):
    ref = official_model(get_model_config(name))
    path = save_official_checkpoint(ref, tmp_path / "official.pt")
    model = cnclip.load_model(path)
    assert model.config.name == name  # the shape was recognized from the weights alone
    _assert_parity(model, ref, random_images(3))


def test_half_precision_checkpoint_loads_as_fp32(tmp_path):
    # the published .pt files hold fp16 weights; the official loader upcasts them on CPU
    ref = official_model(get_model_config("tiny-vit"))
    path = save_official_checkpoint(ref, tmp_path / "half.pt", half=True)
    ref.load_state_dict({k[len("module.") :]: v.float() for k, v in torch.load(path)["state_dict"].items()})
    model = cnclip.load_model(path)
    assert model.dtype == torch.float32
    _assert_parity(model, ref, random_images(2))


@pytest.mark.slow
def test_official_parity_full_vit_b_16(tmp_path):
    config = get_model_config("ViT-B-16")
    ref = official_model(config)
    path = save_official_checkpoint(ref, tmp_path / "clip_cn_vit-b-16.pt")
    del ref
    model = cnclip.load_model(path)
    assert model.config.name == "ViT-B-16"
    ref = official_model(config)
    _assert_parity(model, ref, random_images(2, size=(320, 240)))


def test_forward_returns_normalized_features_and_scale(tiny_vit, images):
    pixels = ImageTransform(tiny_vit.config.vision.image_size).batch(images)
    ids = cnclip.tokenize(["一只猫", "一只狗"])
    img, txt, scale = tiny_vit(pixels, ids)
    assert img.shape == (len(images), 32) and txt.shape == (2, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(images)))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    only_text = tiny_vit(text=ids)
    assert only_text[0] is None and only_text[1].shape == (2, 32)


def test_embed_texts_dynamic_padding_equals_full_padding(tiny_vit, tiny_vit_encoder):
    texts = ["猫", "一只在沙发上睡觉的橘猫", "海边的日落，天空是橙色的"]
    fixed = torch.nn.functional.normalize(tiny_vit.encode_text(cnclip.tokenize(texts)), dim=-1).detach().numpy()
    np.testing.assert_allclose(tiny_vit_encoder.embed_texts(texts, batch_size=2), fixed, atol=1e-5)


def test_embed_accepts_paths_and_rejects_bare_string(tiny_vit_encoder, images, tmp_path):
    path = tmp_path / "a.png"
    images[0].save(path)
    encoder = tiny_vit_encoder
    np.testing.assert_allclose(encoder.embed_images([path]), encoder.embed_images(images[:1]), atol=1e-6)
    with pytest.raises(TypeError, match="list of strings"):
        encoder.embed_texts("一只猫")


def test_lock_towers(tiny_vit):
    model = cnclip.create_model("tiny-vit")
    model.lock_image_tower()
    model.lock_text_tower(unlocked_layers=1)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.bert.encoder.layer[-1].parameters())
    assert not any(p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    assert model.text_projection.requires_grad


def test_available_models():
    assert cnclip.available_models() == ["RN50", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"]
    assert {"tiny-vit", "tiny-rn"} <= set(cnclip.available_models(include_tiny=True))
    assert cnclip.get_model_config("ViT-H-14").vision.heads == 16
    assert cnclip.get_model_config("RN50").vision.heads == 32


@pytest.mark.slow
def test_official_parity_full_rn50(tmp_path):
    config = get_model_config("RN50")
    ref = official_model(config)
    model = cnclip.load_model(save_official_checkpoint(ref, tmp_path / "clip_cn_rn50.pt"))
    assert model.config.name == "RN50"
    _assert_parity(model, ref, random_images(2, size=(320, 240)))


@pytest.mark.parametrize("name", cnclip.available_models())
def test_every_official_shape_is_recognized(name):
    # Shapes only (meta tensors, no memory): each official state dict must map onto its zoo entry,
    # including ViT-H's 80-wide heads, which the weights alone cannot reveal.
    from cnclip.model.checkpoint import infer_config
    from cnclip.model.config import match_zoo

    with torch.device("meta"):
        state = official_state_shapes(get_model_config(name))
    found = match_zoo(infer_config(state), ignore_heads=True)
    assert found == get_model_config(name)
    with torch.device("meta"):
        ours = cnclip.CNClipModel(found).state_dict()
    assert {k: v.shape for k, v in ours.items() if "position_ids" not in k} == {k: v.shape for k, v in state.items()}


def test_a_saved_model_folder_is_readable_by_other_users(tiny_vit, tmp_path):
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    folder = tiny_vit.save_pretrained(tmp_path / "model")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~mask and set(modes.values()) == {0o666 & ~mask}
