"""Retrieval recall and zero-shot accuracy: exact answers on hand-built features, then the real CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_images, run_cli
from PIL import Image

import cnclip
from cnclip.errors import CNClipError
from cnclip.model.encoder import Encoder
from cnclip.model.zeroshot import PROMPT_TEMPLATES
from cnclip.train.evaluate import (
    EvaluationError,
    class_labels,
    embed_pairs,
    evaluate_pairs,
    match_ranks,
    retrieval_metrics,
    zero_shot_accuracy,
)
from cnclip.train.pairs import Pair


def features_for_scores(scores) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text rows whose dot products are `scores` (T, I) up to one common scale.

    Images are one-hot; text t carries its scores plus a private slot that makes its norm 1, so
    equal scores stay exactly equal (ties survive) and order is kept.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s / (2 * np.linalg.norm(s, axis=1).max())
    n_texts, n_images = s.shape
    images = np.eye(n_images, n_images + n_texts)
    texts = np.zeros((n_texts, n_images + n_texts))
    texts[:, :n_images] = s
    texts[np.arange(n_texts), n_images + np.arange(n_texts)] = np.sqrt(1 - (s**2).sum(axis=1))
    return images.astype(np.float32), texts.astype(np.float32)


def recalls(r1, r5, r10) -> dict:
    return {"R@1": r1, "R@5": r5, "R@10": r10}


# -- retrieval_metrics ------------------------------------------------------------------------------


def test_perfect_retrieval_is_all_ones():
    features = np.eye(6, dtype=np.float32)
    m = retrieval_metrics(features, features, np.arange(6))
    assert m == {"t2i": recalls(1.0, 1.0, 1.0), "i2t": recalls(1.0, 1.0, 1.0), "MR": 1.0}
    assert all(type(v) is float for d in (m["t2i"], m["i2t"]) for v in d.values())


def test_a_known_permutation_gives_its_fixed_points():
    # text t looks exactly like image perm[t]: only the 5 fixed points find their own image, and the
    # others' own image scores 0, tied with 18 other images, so they miss even at K = 10
    rng = np.random.default_rng(0)
    perm = np.arange(20)
    moved = rng.permutation(np.arange(5, 20))
    while (moved == np.arange(5, 20)).any():
        moved = rng.permutation(np.arange(5, 20))
    perm[5:] = moved
    images = np.eye(20, dtype=np.float32)
    m = retrieval_metrics(images, images[perm], np.arange(20))
    assert m["t2i"] == recalls(0.25, 0.25, 0.25) and m["i2t"] == recalls(0.25, 0.25, 0.25)
    assert m["MR"] == pytest.approx(0.25)


def test_text_to_image_ranks_are_exact():
    wanted = [0, 0, 1, 2, 4, 5, 6, 9, 10, 11, 3, 7]  # rank of each text's own image among 12
    values = np.linspace(0.25, 0.05, 12)  # distinct scores, best first
    scores = np.zeros((12, 12))
    for t, rank in enumerate(wanted):
        others = [i for i in range(12) if i != t]
        order = others[:rank] + [t] + others[rank:]
        scores[t, order] = values
    m = retrieval_metrics(*features_for_scores(scores), np.arange(12))
    assert m["t2i"] == recalls(2 / 12, 6 / 12, 10 / 12)


def test_image_to_text_hits_when_any_caption_is_in_the_top_k():
    # 3 images x 2 captions; columns are what each image sees
    scores = np.array(
        [
            # img0  img1  img2
            [0.1, 0.5, 0.6],  # caption 0 of image 0: last for image 0 ...
            [0.9, 0.6, 0.1],  # caption 1 of image 0: ... but this one is first -> hit at 1
            [0.3, 0.3, 0.5],  # captions 2, 3 of image 1: best is 0.4, four others above -> rank 4
            [0.2, 0.4, 0.3],
            [0.4, 0.7, 0.2],  # captions 4, 5 of image 2: best is 0.55, one other above -> rank 1
            [0.5, 0.8, 0.55],
        ]
    )
    owners = np.array([0, 0, 1, 1, 2, 2])
    m = retrieval_metrics(*features_for_scores(scores), owners)
    assert m["i2t"] == recalls(1 / 3, 1.0, 1.0)


def test_ties_count_against_the_hit():
    # text 0 scores its own image and another one equally: rank 1, a miss at K = 1
    m = retrieval_metrics(*features_for_scores([[0.5, 0.5], [0.2, 0.5]]), np.array([0, 1]))
    assert m["t2i"] == recalls(0.5, 1.0, 1.0)
    # a collapsed model (every vector the same) scores nothing, not everything
    same = np.full((12, 4), 0.5, dtype=np.float32)
    m = retrieval_metrics(same, same, np.arange(12))
    assert m == {"t2i": recalls(0.0, 0.0, 0.0), "i2t": recalls(0.0, 0.0, 0.0), "MR": 0.0}


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _reference_metrics(images, texts, owners) -> dict:
    """The protocol written plainly: the whole score matrix, one query at a time."""
    full = texts @ images.T  # (T, I)
    t2i = [np.count_nonzero(full[t] >= full[t, owners[t]]) - 1 for t in range(len(texts))]
    i2t = []
    for i in range(len(images)):
        best = full[owners == i, i].max()
        i2t.append(np.count_nonzero(full[owners != i, i] >= best))
    return {
        name: {f"R@{k}": float(np.mean(np.array(ranks) < k)) for k in (1, 5, 10)}
        for name, ranks in (("t2i", t2i), ("i2t", i2t))
    }


def test_chunked_equals_unchunked_on_random_data():
    rng = np.random.default_rng(1)
    images = _unit(rng.normal(size=(37, 16)))
    owners = np.concatenate([np.arange(37), rng.integers(0, 37, size=54)])
    texts = _unit(images[owners] + rng.normal(scale=1.2, size=(len(owners), 16)))
    results = [retrieval_metrics(images, texts, owners, chunk_rows=c) for c in (1, 5, 37, 1000, None)]
    assert all(r == results[0] for r in results)
    reference = _reference_metrics(images, texts, owners)
    assert {k: results[0][k] for k in ("t2i", "i2t")} == reference
    assert 0 < results[0]["t2i"]["R@1"] < results[0]["t2i"]["R@10"] < 1  # neither trivial nor perfect

    groups = np.arange(37)
    ranks = [match_ranks(images, texts, groups, owners, chunk_rows=c) for c in (1, 4, None)]
    np.testing.assert_array_equal(ranks[0], ranks[1])
    np.testing.assert_array_equal(ranks[0], ranks[2])


@pytest.mark.parametrize(
    "images, texts, owners, needle",
    [
        (np.eye(3), np.eye(3), np.array([0, 1, 3]), "outside"),
        (np.eye(3), np.eye(3), np.array([0, 1, 1]), "image row 2 has no caption"),
        (np.eye(3), np.eye(3), np.array([0, 1]), "text_to_image"),
        (np.eye(3), np.eye(3), np.array([0.0, 1.0, 2.0]), "integer"),
        (np.eye(3), np.eye(4)[:3], np.arange(3), "3-d but text features 4-d"),
        (2 * np.eye(3), np.eye(3), np.arange(3), "L2-normalized"),
        (np.full((3, 3), np.nan), np.eye(3), np.arange(3), "NaN"),
        (np.zeros((0, 3)), np.eye(3), np.arange(3), "non-empty"),
    ],
)
def test_bad_inputs_are_refused(images, texts, owners, needle):
    with pytest.raises(EvaluationError, match=needle):
        retrieval_metrics(images, texts, owners)


# -- embedding pairs with a real (tiny) model -------------------------------------------------------


@pytest.fixture
def pair_files(tmp_path):
    paths = []
    for i, img in enumerate(random_images(2, seed=3)):
        img.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    return paths[0], paths[1], str(bad)


def test_embed_pairs_embeds_each_image_once_and_drops_unreadable(tiny_vit_encoder, pair_files):
    a, b, bad = pair_files
    pairs = [Pair(b, "一只猫"), Pair(a, "海边的日落"), Pair(bad, "城市夜景"), Pair(b, "两只猫")]
    calls = []
    images, texts, owners, failed = embed_pairs(
        tiny_vit_encoder, pairs, batch_size=2, progress=lambda *c: calls.append(c)
    )
    np.testing.assert_allclose(images, tiny_vit_encoder.embed_images([b, a]), atol=1e-5)
    np.testing.assert_allclose(texts, tiny_vit_encoder.embed_texts(["一只猫", "海边的日落", "两只猫"]), atol=1e-5)
    assert owners.tolist() == [0, 1, 0]
    assert len(failed) == 1 and failed[0].startswith(f"{bad}: ")
    assert calls[-1] == (3, 3)

    skipped = []
    result = evaluate_pairs(tiny_vit_encoder, pairs, on_skip=skipped.append)
    assert (result["images"], result["texts"], result["failed"]) == (2, 3, 1) and skipped == failed
    assert set(result) == {"t2i", "i2t", "MR", "images", "texts", "failed"}

    with pytest.raises(EvaluationError, match="none of the 1 images"):
        embed_pairs(tiny_vit_encoder, [Pair(bad, "城市夜景")])
    with pytest.raises(EvaluationError, match="no image-caption pairs"):
        embed_pairs(tiny_vit_encoder, [])


def test_evaluation_leaves_the_models_mode_alone(tiny_vit, pair_files):
    """The trainer puts its model in eval mode before it evaluates; evaluating never switches it."""
    a, b, _ = pair_files
    tiny_vit.train()
    try:
        embed_pairs(Encoder.build(tiny_vit), [Pair(a, "一只猫"), Pair(b, "海边的日落")])
        assert tiny_vit.training
    finally:
        tiny_vit.eval()


# -- zero-shot accuracy with a model whose answers are known ----------------------------------------

COLOURS = {"红": (255, 0, 0), "绿": (0, 255, 0), "蓝": (0, 0, 255)}
ENGLISH = {"red": "红", "green": "绿", "blue": "蓝"}


class ColourModel:
    """Image vector = mean normalized pixel; a prompt's vector = the colour named in it, as the
    sign pattern of that colour's normalized pixel (red -> (+, -, -)). So images go to their colour."""

    embed_dim = 3
    config = SimpleNamespace(vision=SimpleNamespace(image_size=16))

    def __init__(self):
        self.prompts: list[str] = []

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))

    def embed_texts(self, texts, batch_size: int = 64) -> np.ndarray:
        self.prompts += texts
        rows = []
        for text in texts:
            (name,) = [n for n in (*COLOURS, *ENGLISH) if n in text]
            rgb = COLOURS[ENGLISH.get(name, name)]
            rows.append([1.0 if c else -1.0 for c in rgb])
        return _unit(np.array(rows))


@pytest.fixture
def colour_folder(tmp_path):
    """red/: 3 red + 1 green (misfiled); green/: 2 green; blue/: 2 blue + 1 corrupt file."""
    root = tmp_path / "colours"
    content = {"red": ["红", "红", "红", "绿"], "green": ["绿", "绿"], "blue": ["蓝", "蓝"]}
    for folder, colours in content.items():
        (root / folder).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (20, 20), COLOURS[colour]).save(root / folder / f"{i}.png")
    (root / "blue" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "blue" / "notes.txt").write_text("not an image")
    (root / "blue" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    return root


def test_zero_shot_accuracy_on_folder_names(colour_folder):
    model, skipped = ColourModel(), []
    result = zero_shot_accuracy(model, colour_folder, on_skip=skipped.append)
    assert result == {"top1": 7 / 8, "top5": 1.0, "images": 8, "classes": 3, "failed": 1}
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]
    assert "一张red的照片。" in model.prompts and len(model.prompts) == 3 * len(PROMPT_TEMPLATES)


def test_zero_shot_label_file_forms(colour_folder, tmp_path):
    mapped = tmp_path / "mapped.txt"
    mapped.write_text("green\t绿\n\nred\t 红\nblue\t蓝\nunused\t紫\n", encoding="utf-8")
    assert zero_shot_accuracy(ColourModel(), colour_folder, mapped)["top1"] == 7 / 8
    # plain lines are labels in sorted folder order (blue, green, red): here blue and red are swapped
    ordered = tmp_path / "ordered.txt"
    ordered.write_text("红\n绿\n蓝\n", encoding="utf-8")
    assert class_labels(["blue", "green", "red"], ordered) == ["红", "绿", "蓝"]
    assert zero_shot_accuracy(ColourModel(), colour_folder, ordered)["top1"] == 2 / 8


@pytest.mark.parametrize(
    "text, needle",
    [
        ("红\n绿\n", "2 labels for 3 class folders"),
        ("red\t红\n绿\n蓝\n", "mixes"),
        ("red\t红\ngreen\t绿\n", r"no label for class folder\(s\) blue"),
        ("red\t红\ngreen\t红\nblue\t蓝\n", "both green and red"),
        ("red\t\ngreen\t绿\nblue\t蓝\n", "line 1"),
    ],
)
def test_bad_label_files_are_refused(tmp_path, text, needle):
    path = tmp_path / "labels.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EvaluationError, match=needle):
        class_labels(["blue", "green", "red"], path)


def test_zero_shot_folder_errors(tmp_path):
    with pytest.raises(CNClipError, match="no such file"):
        class_labels(["a"], tmp_path / "missing.txt")
    with pytest.raises(EvaluationError, match="not a folder"):
        zero_shot_accuracy(ColourModel(), tmp_path / "missing")
    with pytest.raises(EvaluationError, match="no class folders"):
        zero_shot_accuracy(ColourModel(), tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(EvaluationError, match="no image files"):
        zero_shot_accuracy(ColourModel(), tmp_path)


# -- the real CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(7)
    cnclip.create_model("tiny-vit").save_pretrained(folder)
    return folder


@pytest.fixture
def eval_set(tmp_path):
    """12 images, 2 captions each, in a JSONL with paths relative to it; returns (jsonl, pairs)."""
    (tmp_path / "images").mkdir()
    words = ["猫", "狗", "海滩", "日落", "城市", "森林", "雪山", "花", "汽车", "桥", "湖", "夜景"]
    pairs, lines = [], []
    for i, img in enumerate(random_images(12, seed=11)):
        img.save(tmp_path / "images" / f"{i}.png")
        for caption in (f"一张{words[i]}的照片", f"{words[i]}的特写"):
            lines.append(json.dumps({"image": f"images/{i}.png", "text": caption}, ensure_ascii=False))
            pairs.append(Pair(str(tmp_path / "images" / f"{i}.png"), caption))
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl, pairs


def test_cli_eval_json_equals_the_library(saved_model, eval_set):
    jsonl, pairs = eval_set
    out = run_cli("eval", "--data", jsonl, "--model", saved_model, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got) == {"t2i", "i2t", "MR", "images", "texts"}
    assert (got["images"], got["texts"]) == (12, 24)
    for direction in ("t2i", "i2t"):
        assert set(got[direction]) == {"R@1", "R@5", "R@10"}
        assert 0 <= got[direction]["R@1"] <= got[direction]["R@5"] <= got[direction]["R@10"] <= 1
    expected = evaluate_pairs(cnclip.load_encoder(saved_model), pairs)
    del expected["failed"]
    assert got == expected

    table = run_cli("eval", "--data", jsonl, "--model", saved_model)
    assert table.returncode == 0, table.stderr
    rows = [line.split("\t") for line in table.stdout.splitlines()]
    assert rows[0] == ["", "R@1", "R@5", "R@10"] and [r[0] for r in rows[1:]] == ["t2i", "i2t", "MR"]
    assert float(rows[1][1]) == pytest.approx(100 * got["t2i"]["R@1"], abs=0.05)
    assert "12 images, 24 texts" in table.stderr


def test_cli_eval_reports_bad_lines_and_carries_on(saved_model, eval_set):
    jsonl, _ = eval_set
    good = run_cli("eval", "--data", jsonl, "--model", saved_model, "--json")
    with open(jsonl, "a", encoding="utf-8") as f:
        f.write('{"image": "images/0.png", "text": \n')
    out = run_cli("eval", "--data", jsonl, "--model", saved_model, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(good.stdout)
    assert "left out 1 of 25" in out.stderr and "test.jsonl" in out.stderr


def test_cli_eval_zero_shot_and_argument_errors(saved_model, colour_folder, tmp_path):
    out = run_cli("eval", "--zero-shot", colour_folder, "--model", saved_model, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got) == {"top1", "top5", "images", "classes"} and (got["images"], got["classes"]) == (8, 3)
    assert got["top5"] == 1.0  # 3 classes: every label is in the top 5
    assert "skipped" in out.stderr and "broken.jpg" in out.stderr

    for args, needle in [
        (("--labels", tmp_path / "l.txt", "--data", tmp_path / "x.jsonl"), "--zero-shot FOLDER"),
        (("--zero-shot", tmp_path / "missing"), "not a folder"),
    ]:
        bad = run_cli("eval", *args, "--model", saved_model)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and needle in lines[0], bad.stderr
