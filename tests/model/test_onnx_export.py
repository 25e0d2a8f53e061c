"""ONNX export of both towers, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images, run_cli

import cnclip
from cnclip.errors import CNClipError
from cnclip.model.encoder import Encoder
from cnclip.model.onnx_export import OnnxTower, export_cached, export_onnx
from cnclip.model.transform import ImageTransform

TEXTS = ["猫", "海边的日落和沙滩上的脚印", "一只在沙发上睡觉的橘猫，旁边有一本书", "iPhone 截图 2024"]


@pytest.mark.parametrize("shape", ["tiny_vit", "tiny_rn"])
def test_exported_towers_equal_torch(shape, request, tmp_path):
    model = request.getfixturevalue(shape)
    paths = export_onnx(model, tmp_path)
    assert not any(m.training for m in model.modules())  # the exporter must not leave dropout on
    ids = model.tokenizer(TEXTS)
    for batch in (ids[:, : int(ids.ne(0).sum(1).max())], ids[:1, :3], ids):  # padded, unpadded, full 52
        with torch.inference_mode():
            want = model.encode_text(batch).numpy()
        np.testing.assert_allclose(OnnxTower(paths["text"])(batch), want, atol=1e-5, rtol=1e-4)
    for n in (1, 5):  # batch sizes other than the exported example's
        pixels = ImageTransform(model.config.vision.image_size).batch(random_images(n, seed=n))
        with torch.inference_mode():
            want = model.encode_image(pixels).numpy()
        np.testing.assert_allclose(OnnxTower(paths["image"])(pixels), want, atol=1e-5, rtol=1e-4)


def test_onnx_towers_give_the_same_embeddings_and_cache_the_export(tmp_path):
    torch.manual_seed(1)
    model = cnclip.create_model("tiny-vit")
    images = random_images(3, seed=2)
    fp32 = Encoder.build(model)
    want_text, want_image = fp32.embed_texts(TEXTS), fp32.embed_images(images)
    onnx = Encoder.build(model, onnx_towers=("text", "image"), onnx_folder=tmp_path)
    np.testing.assert_allclose(onnx.embed_texts(TEXTS), want_text, atol=1e-5)
    np.testing.assert_allclose(onnx.embed_images(images), want_image, atol=1e-5)
    exported = sorted(tmp_path.rglob("*.onnx"))
    assert [p.name for p in exported] == ["image.onnx", "text.onnx"]
    stamps = [p.stat().st_mtime_ns for p in exported]
    Encoder.build(model, onnx_towers=("text",), onnx_folder=tmp_path).embed_texts(TEXTS)  # cached by weights digest
    assert [p.stat().st_mtime_ns for p in exported] == stamps
    other = cnclip.create_model("tiny-vit")  # other weights get their own export, on first use
    other_onnx = Encoder.build(other, onnx_towers=("text",), onnx_folder=tmp_path)
    assert len(list(tmp_path.rglob("text.onnx"))) == 1
    other_onnx.embed_texts(TEXTS[:1])
    assert len(list(tmp_path.rglob("text.onnx"))) == 2
    np.testing.assert_array_equal(Encoder.build(model).embed_texts(TEXTS), want_text)  # the model is unchanged


def test_an_export_made_by_another_export_version_is_not_reused(tmp_path, tiny_vit, monkeypatch):
    from cnclip.model import onnx_runtime

    digest = tiny_vit.weights_digest()
    old = export_cached(tiny_vit, "text", tmp_path)
    monkeypatch.setattr(onnx_runtime, "EXPORT_VERSION", onnx_runtime.EXPORT_VERSION + 1)
    new = export_cached(tiny_vit, "text", tmp_path)
    assert new != old and new.is_file() and old.is_file()
    assert digest in new.parent.name and digest in old.parent.name


def test_bad_onnx_file_is_one_clear_error(tmp_path):
    (tmp_path / "text.onnx").write_bytes(b"not a model")
    with pytest.raises(CNClipError, match="export it again"):
        OnnxTower(tmp_path / "text.onnx")


def test_export_onnx_cli(tmp_path, tiny_vit):
    src = tiny_vit.save_pretrained(tmp_path / "model")
    out = run_cli("export-onnx", src, tmp_path / "onnx")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["image.onnx", "text.onnx"]
    ids = tiny_vit.tokenizer(TEXTS[:2])
    with torch.inference_mode():
        want = tiny_vit.encode_text(ids).numpy()
    np.testing.assert_allclose(OnnxTower(tmp_path / "onnx" / "text.onnx")(ids), want, atol=1e-5, rtol=1e-4)


def test_image_runs_split_into_small_batches_give_the_same_features(tmp_path, tiny_vit):
    path = export_onnx(tiny_vit, tmp_path, ("image",))["image"]
    pixels = ImageTransform(tiny_vit.config.vision.image_size).batch(random_images(7, seed=3))
    whole = OnnxTower(path)(pixels)
    for rows in (1, 3, 4, 7, 50):
        split = OnnxTower(path, rows_per_run=rows)
        np.testing.assert_allclose(split(pixels), whole, atol=1e-6)
        assert split(pixels[:0]).shape == (0, whole.shape[1])


def test_export_past_the_protobuf_limit_leaves_one_data_file(tmp_path, tiny_vit, monkeypatch):
    # Past 2 GB of weights the exporter writes one external file per tensor beside the model.
    # Reproduce that layout on a tiny model by re-saving the export the same way.
    import onnx

    real_export = torch.onnx.export

    def export_with_external_tensors(*args, **kwargs):
        real_export(*args, **kwargs)
        path = args[2]
        onnx.save_model(
            onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
        )

    monkeypatch.setattr(torch.onnx, "export", export_with_external_tensors)
    paths = export_onnx(tiny_vit, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "image.onnx", "image.onnx.data", "text.onnx", "text.onnx.data"
    ]  # fmt: skip
    assert paths["image"].stat().st_size < 100_000  # the weights live in the .data file
    pixels = ImageTransform(tiny_vit.config.vision.image_size).batch(random_images(2, seed=4))
    ids = tiny_vit.tokenizer(TEXTS)
    with torch.inference_mode():
        want_image, want_text = tiny_vit.encode_image(pixels).numpy(), tiny_vit.encode_text(ids).numpy()
    np.testing.assert_allclose(OnnxTower(paths["image"])(pixels), want_image, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(OnnxTower(paths["text"])(ids), want_text, atol=1e-5, rtol=1e-4)

    # the cache moves the data file with the model
    monkeypatch.setattr(cnclip.model.onnx_export, "export_onnx", export_onnx)
    tower = cnclip.model.onnx_export.cached_tower(tiny_vit, "image", tmp_path / "cache")
    assert sorted(p.name for p in tower.path.parent.iterdir()) == ["image.onnx", "image.onnx.data"]
    np.testing.assert_allclose(tower(pixels), want_image, atol=1e-5, rtol=1e-4)
