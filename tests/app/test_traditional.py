"""Traditional Chinese through the real CLI and the Python API: queries, zero-shot labels and
evaluation captions are read as Simplified (OpenCC t2s) unless the user says otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_images, run_cli

import cnclip
from cnclip.model.t2s import T2S_ENV, to_simplified_all

TRADITIONAL, SIMPLIFIED = "海邊的日落和沙灘上的腳印", "海边的日落和沙滩上的脚印"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    torch.manual_seed(11)
    base = tmp_path_factory.mktemp("t2s")
    model_dir = cnclip.create_model("tiny-vit").save_pretrained(base / "model")
    photos = base / "photos"
    photos.mkdir()
    for i, image in enumerate(random_images(6, seed=4)):
        image.save(photos / f"p{i}.png")
    out = run_cli("index", photos, "--index", base / "idx", "--model", model_dir, "-q")
    assert out.returncode == 0, out.stderr
    return base, model_dir, photos


def _search(idx, query, *extra, env=None):
    out = run_cli("search", query, "--index", idx, "-k", "6", "--json", *extra, env=env)
    assert out.returncode == 0, out.stderr
    return [(h["path"], round(h["score"], 5)) for h in json.loads(out.stdout)]


def test_cli_search_reads_traditional_as_simplified(built):
    idx = built[0] / "idx"
    simplified = _search(idx, SIMPLIFIED)
    assert _search(idx, TRADITIONAL) == simplified
    as_typed = _search(idx, TRADITIONAL, "--no-t2s")
    assert as_typed != simplified  # the tiny model reads other tokens: the option really reaches the model
    assert _search(idx, TRADITIONAL, env={T2S_ENV: "0"}) == as_typed
    assert _search(idx, SIMPLIFIED, "--no-t2s") == simplified  # Simplified text is the same either way


def test_bad_t2s_setting_is_one_line(built):
    out = run_cli("search", TRADITIONAL, "--index", built[0] / "idx", env={T2S_ENV: "maybe"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "$CNCLIP_T2S is 'maybe'" in lines[0], out.stderr


def test_api_query_vector_and_texts(built, monkeypatch):
    monkeypatch.delenv(T2S_ENV, raising=False)
    base, model_dir, _ = built
    model = cnclip.load_encoder(model_dir, device="cpu", backend="torch", precision="fp32")
    with cnclip.Index.open(base / "idx") as index:
        assert index.t2s is True
        np.testing.assert_allclose(index.query_vector(TRADITIONAL), model.embed_texts([SIMPLIFIED]), atol=1e-6)
    with cnclip.Index.open(base / "idx", t2s=False) as index:
        np.testing.assert_allclose(index.query_vector(TRADITIONAL), model.embed_texts([TRADITIONAL]), atol=1e-6)
    # image->text: added texts are embedded as Simplified and stored as typed
    with cnclip.Index.open(base / "idx") as index:
        index.add_texts([TRADITIONAL])
        ids, vectors = index.catalog.text_vectors("default")
        assert index.catalog.texts_by_ids(ids.tolist()) == {int(ids[0]): TRADITIONAL}
        np.testing.assert_allclose(vectors[:1], model.embed_texts([SIMPLIFIED]), atol=1e-5)


def test_tag_labels_in_traditional(built, tmp_path):
    _, model_dir, photos = built
    simplified, traditional = tmp_path / "s.txt", tmp_path / "t.txt"
    simplified.write_text("猫\n海边\n汽车\n", encoding="utf-8")
    traditional.write_text("貓\n海邊\n汽車\n", encoding="utf-8")

    def tag(labels, *extra):
        out = run_cli("tag", photos / "p0.png", "--labels", labels, "--model", model_dir, "--json", *extra)
        assert out.returncode == 0, out.stderr
        return [round(h["score"], 5) for h in json.loads(out.stdout)]

    assert tag(traditional) == tag(simplified)
    assert tag(traditional, "--no-t2s") != tag(simplified)


def test_eval_t2s_reads_traditional_captions_as_simplified(built, tmp_path):
    _, model_dir, photos = built
    captions = ["一隻貓在睡覺", "海邊的日落", "城市裡的夜景", "雪山和湖泊", "兩個孩子在玩", "紅色的汽車"]
    for name, texts in (("t.jsonl", captions), ("s.jsonl", to_simplified_all(captions))):
        rows = [
            json.dumps({"image": str(photos / f"p{i}.png"), "text": t}, ensure_ascii=False) for i, t in enumerate(texts)
        ]
        (tmp_path / name).write_text("\n".join(rows) + "\n", encoding="utf-8")

    def evaluate(name, *extra):
        out = run_cli("eval", "--data", tmp_path / name, "--model", model_dir, "--json", "-q", *extra)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    simplified = evaluate("s.jsonl")
    assert evaluate("t.jsonl", "--t2s") == simplified
    assert evaluate("t.jsonl") != simplified  # captions are evaluated as written unless --t2s
