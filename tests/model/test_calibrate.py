"""The runtime choice measured per CPU and model: which engine and precision per tower, bf16
only where it keeps fp32's rankings, cached once, reported with its reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_images, run_cli

import cnclip
from cnclip.index.index import Index
from cnclip.model import calibrate
from cnclip.model.calibrate import Calibration, choose, compare, overlap
from cnclip.model.cpu import CPU_BF16_ENV
from cnclip.model.encoder import Encoder
from cnclip.model.runtime import Runtime

FAITHFUL = {
    "image_min_cosine": 0.9999,
    "text_min_cosine": 0.9999,
    "overlap_bf16_images": 1.0,
    "overlap_bf16_text": 0.99,
    "overlap_bf16_both": 0.99,
}
# The 2-core Xeon with AMX: bf16 images ~3x fp32; ONNX Runtime's text fastest
AMX_SPEEDS = {
    "image": {"onnx-fp32": 3.9, "torch-fp32": 4.5, "torch-bf16": 12.0},
    "text": {"onnx-fp32": 60.0, "torch-fp32": 20.0, "torch-bf16": 45.0},
}


def test_the_fastest_faithful_candidate_wins_per_tower():
    choice, reason = choose(AMX_SPEEDS, FAITHFUL)
    assert choice == {"image": "torch-bf16", "text": "onnx-fp32"}
    assert reason.startswith("measured on this CPU: image: torch-bf16 (images/s: torch-bf16 12.0, torch-fp32 4.5")
    assert "lowest cosine 0.99990, top-10 overlap 0.990" in reason


@pytest.mark.parametrize(
    "spoiled",
    [{"image_min_cosine": 0.998}, {"overlap_bf16_images": 0.9}, {"overlap_bf16_both": 0.94}],
)
def test_bf16_that_moves_rankings_is_left_out(spoiled):
    choice, reason = choose(AMX_SPEEDS, {**FAITHFUL, **spoiled})
    assert choice["image"] == "torch-fp32"  # the fastest that is left (4.5 against ONNX's 3.9)
    assert "bf16 left out: rankings moved" in reason


def test_a_lead_within_timing_noise_keeps_the_default():
    speeds = {"image": {"onnx-fp32": 4.3, "torch-fp32": 4.4}, "text": {"onnx-fp32": 50.0, "torch-fp32": 20.0}}
    assert choose(speeds, FAITHFUL)[0] == {"image": "onnx-fp32", "text": "onnx-fp32"}
    no_onnx = {"image": {"torch-fp32": 4.4, "torch-bf16": 4.5}, "text": {"torch-fp32": 20.0, "torch-bf16": 30.0}}
    assert choose(no_onnx, FAITHFUL)[0] == {"image": "torch-fp32", "text": "torch-bf16"}


def test_overlap_and_compare_on_known_vectors():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(40, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    assert overlap(queries, items, queries, items) == 1.0
    assert overlap(queries, items, queries, -items) == 0.0  # reversed rankings share nothing in the top 10
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    found = compare(unit, q, unit, q)
    assert found["image_min_cosine"] == pytest.approx(1.0) and found["overlap_bf16_both"] == 1.0


@pytest.fixture
def measured_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CNCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(21)
    return cnclip.create_model("tiny-vit")


def _ceilings(monkeypatch, fp32: float, bf16: float) -> None:
    """Pretend this CPU's matrix products run at these GFLOP/s (the tiny model's own timings stay real)."""
    monkeypatch.setattr(calibrate, "matmul_gflops", lambda dtype, *a, **k: bf16 if dtype == torch.bfloat16 else fp32)


def test_measurement_covers_every_candidate_and_is_cached(measured_model, monkeypatch):
    _ceilings(monkeypatch, fp32=200.0, bf16=500.0)
    found = calibrate.calibrated(measured_model)
    assert found.ceilings == {"fp32": 200.0, "bf16": 500.0}
    assert set(found.speeds["image"]) == set(found.speeds["text"]) == set(calibrate.CANDIDATES)
    assert all(v > 0 for tower in found.speeds.values() for v in tower.values())
    assert 0.99 < found.fidelity["image_min_cosine"] <= 1.0 + 1e-6
    assert found.choice == choose(found.speeds, found.fidelity)[0]
    path = calibrate.cache_path(measured_model.weights_digest())
    assert json.loads(path.read_text("utf-8"))["choice"] == found.choice
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured twice"))
    assert calibrate.calibrated(measured_model) == found
    assert calibrate.load_cached("0" * 32) is None  # another model is measured on its own


def test_bf16_slower_than_fp32_is_not_tried(measured_model, monkeypatch):
    """Software bf16 (flags that claim AMX on a CPU without it) would take minutes per batch."""
    _ceilings(monkeypatch, fp32=150.0, bf16=0.4)
    found = calibrate.measure(measured_model)
    assert "torch-bf16" not in found.speeds["image"] and found.fidelity == {}
    assert found.choice["image"] in ("onnx-fp32", "torch-fp32")
    assert found.reason.endswith("bf16 not tried: its matrix products ran at 0.4 GFLOP/s, fp32's at 150.0")


def test_matmul_ceiling_is_a_plausible_rate():
    assert 0.01 < calibrate.matmul_gflops(torch.float32, n=128) < 1e5


def test_an_unreadable_cache_file_is_measured_again(measured_model, monkeypatch):
    path = calibrate.cache_path(measured_model.weights_digest())
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    assert calibrate.load_cached(measured_model.weights_digest()) is None
    fake = Calibration({"image": "torch-fp32", "text": "onnx-fp32"}, AMX_SPEEDS, FAITHFUL, "cpu", "why")
    monkeypatch.setattr(calibrate, "measure", lambda model: fake)
    assert calibrate.calibrated(measured_model) == fake
    assert calibrate.load_cached(measured_model.weights_digest()) == fake


def test_no_fast_bf16_means_onnx_fp32_without_measuring(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = Runtime.resolve()
    assert runtime == Runtime("cpu", "fp32", ("image", "text")) and not runtime.calibrate
    assert "no AMX or AVX-512 BF16" in runtime.reason
    assert runtime.for_digest("0" * 32) is runtime


def _amx(monkeypatch, choice: dict[str, str]) -> Runtime:
    """An AMX machine's "auto", with `choice` as its measurement."""
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake = Calibration(choice, AMX_SPEEDS, FAITHFUL, "Intel Xeon (simulated)", "measured: " + str(choice))
    monkeypatch.setattr(calibrate, "measure", lambda model: fake)
    runtime = Runtime.resolve()
    assert runtime.calibrate and Runtime.resolve(precision="fp32").calibrate is False
    return runtime


def test_a_measured_choice_casts_each_tower(measured_model, monkeypatch):
    images = random_images(9, seed=3)
    fp32 = Encoder.build(measured_model)
    want_images = fp32.embed_images(images)
    want_text = fp32.embed_texts(["海边的日落"])
    runtime = _amx(monkeypatch, {"image": "torch-bf16", "text": "onnx-fp32"})
    assert runtime.for_digest(measured_model.weights_digest()) is None  # not measured yet
    encoder = runtime.build(measured_model)
    assert measured_model.image_dtype == torch.float32 and measured_model.dtype == torch.float32  # left as it was
    assert encoder.onnx_towers == ("text",) and encoder.image_precision == "bf16"
    assert encoder.runtime.to_dict()["image"] == {"engine": "torch", "precision": "bf16"}
    assert encoder.runtime.reason.startswith("measured: ")
    got = encoder.embed_images(images)  # 9 images: bf16 runs 8 at a time, the rest after
    assert np.all((got * want_images).sum(1) > 0.999)
    np.testing.assert_allclose(encoder.embed_texts(["海边的日落"]), want_text, atol=1e-5)
    chosen = runtime.for_digest(measured_model.weights_digest())  # now cached: no model needed
    assert chosen is not None and chosen.onnx_towers == ("text",) and chosen.precision == "bf16"


def test_an_index_records_the_precision_of_each_vector_and_mixing_searches(tmp_path, measured_model, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(6, seed=8)):
        img.save(folder / f"{i}.png")
    with Index.open(tmp_path / "idx", model=measured_model, create=True) as index:
        index.add_folder(folder)
        fp32_hits = [h.path for h in index.search_text("一只猫", k=6)]
    for i, img in enumerate(random_images(3, seed=80)):
        img.save(folder / f"new{i}.png")
    runtime = _amx(monkeypatch, {"image": "torch-bf16", "text": "torch-bf16"})
    with Index.open(tmp_path / "idx", model=measured_model, runtime=runtime) as index:
        index.add_folder(folder)  # 3 new photos in bf16 beside 6 in fp32: one index, one model identity
        assert index.stats()["precisions"] == {"fp32": 6, "bf16": 3}
        assert index.stats()["runtime"]["image"] == {"engine": "torch", "precision": "bf16"}
        hits = [h.path for h in index.search_text("一只猫", k=9)]
    assert [h for h in hits if "new" not in h] == fp32_hits  # bf16 text ranks the fp32 vectors alike


def test_cnclip_info_says_what_was_chosen_and_why(tmp_path, tiny_vit):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(3, seed=2)):
        img.save(folder / f"{i}.png")
    model_dir = tiny_vit.save_pretrained(tmp_path / "model")
    idx = tmp_path / "idx"
    assert run_cli("index", folder, "--index", idx, "--model", model_dir, "-q").returncode == 0
    out = run_cli("info", "--index", idx, "--json", env={CPU_BF16_ENV: "0"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["precisions"] == {"fp32": 3}
    assert info["runtime"]["image"] == {"engine": "onnx", "precision": "fp32"}
    assert "no AMX or AVX-512 BF16" in info["runtime"]["reason"]
    plain = run_cli("info", "--index", idx, env={CPU_BF16_ENV: "1", "CNCLIP_CACHE": str(tmp_path / "fresh")})
    assert plain.returncode == 0, plain.stderr
    assert "computed 3 fp32" in plain.stdout and "not measured yet for this model" in plain.stdout


def test_a_one_shot_search_runs_the_text_tower_in_onnx_runtime_whatever_serve_would_choose(
    tmp_path, measured_model, monkeypatch
):
    """On AMX, PyTorch bf16 may measure faster per query, but a one-shot `cnclip search` would pay
    ~4 s to import torch and load the model for one query of 2-7 ms: ONNX Runtime answers it."""
    from cnclip.model.onnx_runtime import TextEncoder

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(3, seed=9)):
        img.save(folder / f"{i}.png")
    model = cnclip.load_model(str(measured_model.save_pretrained(tmp_path / "model")))  # an index can load it
    runtime = _amx(monkeypatch, {"image": "torch-bf16", "text": "torch-bf16"})
    with Index.open(tmp_path / "idx", model=model, create=True, runtime=runtime) as index:
        index.add_folder(folder)  # measures (serve: PyTorch bf16 for text), and exports text for searches
    assert "text" not in runtime.for_digest(model.weights_digest()).onnx_towers
    assert TextEncoder.cached(model.weights_digest()) is not None

    def no_model(self):
        raise AssertionError("a one-shot text query loaded the model")

    with monkeypatch.context() as patch, Index.open(tmp_path / "idx", runtime=runtime) as index:
        patch.setattr(Index, "encoder", property(no_model))
        assert len(index.search_text("一只猫", k=3)) == 3

    def no_onnx(self, texts, batch_size=64):
        raise AssertionError("serve ran text in ONNX Runtime against its measured choice")

    monkeypatch.setattr(TextEncoder, "embed_texts", no_onnx)
    with Index.open(tmp_path / "idx", runtime=runtime, serving=True) as index:
        assert len(index.search_text("一只猫", k=3)) == 3


def test_a_model_of_another_index_is_refused_before_it_is_measured(tmp_path, measured_model, monkeypatch):
    from cnclip.errors import ModelMismatchError

    with Index.open(tmp_path / "idx", model=cnclip.create_model("tiny-vit"), create=True) as index:
        index.add_folder(_one_photo(tmp_path))
    runtime = _amx(monkeypatch, {"image": "torch-bf16", "text": "torch-bf16"})
    measured = []
    monkeypatch.setattr(calibrate, "measure", lambda model: measured.append(model) or pytest.fail("measured"))
    with pytest.raises(ModelMismatchError):
        Index.open(tmp_path / "idx", model=measured_model, runtime=runtime)
    assert measured == []


def _one_photo(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    random_images(1, seed=4)[0].save(folder / "0.png")
    return folder
