"""Hugging Face folders both ways, cnclip's own folders, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import random_images
from reference import hf_model, official_model, save_official_checkpoint

import cnclip
from cnclip.errors import CheckpointError, ModelNotFoundError, VocabularyError
from cnclip.model.config import get_model_config
from cnclip.model.encoder import Encoder
from cnclip.model.tokenizer import DEFAULT_VOCAB
from cnclip.model.transform import ImageTransform

TEXTS = ["一只猫", "海边的日落", "iPhone 15 拍的夜景", ""]


def _hf_features(hf, pixels, texts, tokenizer):
    ids = tokenizer(texts)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.get_text_features(input_ids=ids, attention_mask=ids.ne(0)).pooler_output
    return img, txt


def _our_features(model, pixels, texts):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(model.tokenizer(texts))


def test_load_hf_folder_matches_transformers(tmp_path):
    config = get_model_config("tiny-vit")
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_bytes((DEFAULT_VOCAB).read_bytes())
    model = cnclip.load_model(tmp_path)
    assert model.config.name == "tiny-vit"
    pixels = ImageTransform(model.config.vision.image_size).batch(random_images(3))
    for ours, theirs in zip(
        _our_features(model, pixels, TEXTS), _hf_features(hf, pixels, TEXTS, model.tokenizer), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_vision_mlp_other_than_4x_its_width_loads_both_ways(tmp_path):
    import dataclasses

    base = get_model_config("tiny-vit")
    config = dataclasses.replace(base, name=None, vision=dataclasses.replace(base.vision, mlp_width=100))
    hf = hf_model(config)  # transformers' own model, vision intermediate_size 100 (not 4 x 64)
    assert hf.config.vision_config.intermediate_size == 100
    hf.save_pretrained(tmp_path / "theirs")
    (tmp_path / "theirs" / "vocab.txt").write_bytes(DEFAULT_VOCAB.read_bytes())
    model = cnclip.load_model(tmp_path / "theirs")
    assert model.config.vision.mlp_width == 100
    pixels = ImageTransform(model.config.vision.image_size).batch(random_images(2))
    for ours, theirs in zip(
        _our_features(model, pixels, TEXTS), _hf_features(hf, pixels, TEXTS, model.tokenizer), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    again = cnclip.load_model(model.save_pretrained(tmp_path / "ours"))
    torch.testing.assert_close(_our_features(again, pixels, TEXTS)[0], _our_features(model, pixels, TEXTS)[0])


def test_transformers_loads_our_folder(tmp_path):
    from transformers import BertTokenizer, ChineseCLIPImageProcessor, ChineseCLIPModel

    ref = official_model(get_model_config("tiny-vit"))
    model = cnclip.load_model(save_official_checkpoint(ref, tmp_path / "official.pt"))
    folder = model.save_pretrained(tmp_path / "hf")
    assert {"config.json", "model.safetensors", "vocab.txt", "preprocessor_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    hf = ChineseCLIPModel.from_pretrained(folder).eval()
    images = random_images(3)
    pixels = ImageTransform(model.config.vision.image_size).batch(images)
    for ours, theirs in zip(
        _our_features(model, pixels, TEXTS), _hf_features(hf, pixels, TEXTS, model.tokenizer), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # their tokenizer and image processor, read from our folder, feed the model the same inputs
    hf_ids = BertTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(hf_ids, model.tokenizer(TEXTS))
    hf_pixels = ChineseCLIPImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    # HF's resize rounds differently by up to one grey level (1/255/std = 0.015); no crop either way
    torch.testing.assert_close(hf_pixels, pixels, atol=0.016, rtol=0)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_round_trip_is_exact(name, tmp_path):
    torch.manual_seed(1)
    model = cnclip.create_model(name)
    images = random_images(2)
    before = Encoder.build(model).embed_images(images), Encoder.build(model).embed_texts(TEXTS)
    again = cnclip.load_model(model.save_pretrained(tmp_path / "m"))
    assert again.config == model.config
    after = Encoder.build(again).embed_images(images), Encoder.build(again).embed_texts(TEXTS)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.weights_digest() == model.weights_digest()
    # and once more through the loaded copy: saving is stable
    third = cnclip.load_model(again.save_pretrained(tmp_path / "m2"))
    np.testing.assert_array_equal(Encoder.build(third).embed_texts(TEXTS), before[1])


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    model = cnclip.create_model("tiny-rn")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = cnclip.load_model(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(Encoder.build(loaded).embed_texts(TEXTS), Encoder.build(model).embed_texts(TEXTS))


def test_folder_vocab_wins(tmp_path):
    model = cnclip.create_model("tiny-vit")
    folder = model.save_pretrained(tmp_path / "m")
    vocab = (folder / "vocab.txt").read_text("utf-8").rstrip("\n").split("\n")  # not splitlines(): \x1c is a token
    猫 = vocab.index("猫")
    vocab[猫], vocab[猫 + 1] = vocab[猫 + 1], vocab[猫]  # a vocabulary that differs from the bundled one
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
    loaded = cnclip.load_model(folder)
    assert loaded.tokenizer.encode("猫")[1] == 猫 + 1


# -- errors: one line, naming the thing -----------------------------------------------------------


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message
    return message


def test_truncated_checkpoint(tmp_path):
    path = save_official_checkpoint(official_model(get_model_config("tiny-vit")), tmp_path / "cut.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(path)
    _one_line(e, path, "download it again")


def test_empty_and_non_checkpoint_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(tmp_path / "empty.pt")
    _one_line(e, "empty.pt", "empty")
    (tmp_path / "notes.pt").write_text("这不是模型")
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(tmp_path / "notes.pt")
    _one_line(e, "notes.pt")
    for name in ("noise.pt", "noise.safetensors"):  # random bytes reach deep into the readers
        (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(1000))
        with pytest.raises(CheckpointError) as e:
            cnclip.load_model(tmp_path / name)
        _one_line(e, name)
    torch.save({"state_dict": {"module.foo.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(tmp_path / "other.pt")
    _one_line(e, "other.pt", "not a Chinese-CLIP checkpoint")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(path)
    _one_line(e, "evil.pt", "weights only")
    assert "must never run" not in capsys.readouterr().out


def test_checkpoint_of_other_shape_than_named(tmp_path):
    path = save_official_checkpoint(official_model(get_model_config("tiny-vit")), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(path, config="ViT-B-16")
    _one_line(e, "tiny.pt", "tiny-vit", "ViT-B-16")
    # a tensor of the wrong size inside an otherwise right-looking checkpoint
    state = torch.load(path)
    state["state_dict"]["module.visual.ln_post.weight"] = torch.zeros(7)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        cnclip.load_model(path)
    _one_line(e, "tiny.pt", "ln_post")


def test_folder_without_vocab(tmp_path):
    folder = cnclip.create_model("tiny-vit").save_pretrained(tmp_path / "m")
    (folder / "vocab.txt").unlink()
    with pytest.raises(VocabularyError) as e:
        cnclip.load_model(folder)
    _one_line(e, folder, "vocab.txt")


def test_vocab_larger_than_embedding(tmp_path):
    folder = cnclip.create_model("tiny-vit").save_pretrained(tmp_path / "m")
    with open(folder / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("额外的词\n")
    with pytest.raises(VocabularyError) as e:
        cnclip.load_model(folder)
    _one_line(e, "vocab.txt", "21129")


def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        cnclip.load_model("ViT-Q-99")
    _one_line(e, "ViT-Q-99", "ViT-B-16")
    with pytest.raises(ModelNotFoundError) as e:
        cnclip.load_model(tmp_path / "nope.pt")
    _one_line(e, "nope.pt")


def test_hub_offline_says_how_to_point_at_a_local_copy():
    with pytest.raises(ModelNotFoundError) as e:
        cnclip.load_model("OFA-Sys/chinese-clip-vit-base-patch16")
    _one_line(e, "OFA-Sys/chinese-clip-vit-base-patch16", "--model PATH", "CNCLIP_MODEL")
    with pytest.raises(ModelNotFoundError) as e:
        cnclip.load_model("ViT-B-16")
    _one_line(e, "clip_cn_vit-b-16.pt", "--model PATH")


def test_tiny_models_have_no_published_weights():
    with pytest.raises(ModelNotFoundError) as e:
        cnclip.load_model("tiny-vit")
    _one_line(e, "create_model")


def test_cnclip_config_records_shape(tmp_path):
    folder = cnclip.create_model("tiny-rn").save_pretrained(tmp_path / "rn")
    recorded = json.loads((folder / "cnclip_config.json").read_text())
    assert recorded["vision"]["kind"] == "resnet"
    # fields added since the first release stay out when unset: older cnclip versions read these folders
    assert "mlp_width" not in recorded["vision"] and not {"modelscope_repo", "sha256", "size"} & set(recorded)
    assert not (folder / "config.json").exists()  # transformers has no ResNet ChineseCLIP
