"""The masked-token objective (cnclip.train.mlm) and its data (cnclip.train.mlm_data): masking statistics,
packing, training, the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import run_cli

import cnclip
from cnclip.errors import CNClipError
from cnclip.model.tokenizer import default_tokenizer
from cnclip.train.mlm import HEAD_FILE, PretrainOptions, pretrain_text
from cnclip.train.mlm_data import (
    IGNORE,
    NOT_A_WORD,
    Masker,
    batch_rng,
    mask_batch,
    pack_blocks,
    read_corpus,
    word_pieces,
)

SUBJECTS = ["小猫", "小狗", "孩子们", "一位老人", "女孩", "男孩", "摄影师", "骑车的人"]
ACTIONS = ["在草地上奔跑", "在海边散步", "在沙发上睡觉", "在公园里玩耍", "在雪地里跳跃", "在河边钓鱼"]
SCENES = ["阳光很好", "天气很冷", "周围有很多人", "背景是高楼", "旁边有一条小河", "远处是雪山"]


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    """A small generated domain corpus: a grammar of subject, action and scene."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)}{rng.choice(ACTIONS)}，{rng.choice(SCENES)}。" for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return pack_blocks(tokenizer, corpus_lines(400), max_length=64)


def test_packing_fills_blocks_across_documents_without_cutting_words(tokenizer, blocks):
    assert len(blocks) > 10
    for b in blocks:
        assert b.ids[0] == tokenizer.cls_id and b.ids[-1] == tokenizer.sep_id and len(b.ids) <= 64
        assert b.words[0] == b.words[-1] == NOT_A_WORD
    # blocks are full (all but the last): documents continue into the same block after a [SEP]
    assert all(len(b.ids) >= 64 - 12 for b in blocks[:-1])
    assert all((b.ids[1:-1] == tokenizer.sep_id).sum() >= 2 for b in blocks[:-1])
    # each word's tokens lie together in one block: word indices are contiguous runs
    for b in blocks:
        words = b.words[b.words != NOT_A_WORD]
        runs = words[np.r_[True, words[1:] != words[:-1]]]
        assert len(runs) == len(set(runs.tolist()))


def test_words_come_from_jieba_and_a_user_dictionary_changes_them(tokenizer, tmp_path):
    pieces = word_pieces(tokenizer, "孩子们在公园里玩耍")
    assert [len(p) for p in pieces] != [1] * len(pieces)  # multi-character words, not characters
    text = "蓝鳍金枪鱼罐头"
    before = word_pieces(tokenizer, text)
    (tmp_path / "dict.txt").write_text("蓝鳍金枪鱼罐头 1000 n\n", encoding="utf-8")
    from cnclip.train.mlm_data import load_user_dict

    load_user_dict(tmp_path / "dict.txt")
    assert len(word_pieces(tokenizer, text)) == 1 < len(before)


def test_masking_statistics(tokenizer, blocks):
    masker = Masker.for_tokenizer(tokenizer)
    selected = maskable = masked = randomized = kept = 0
    for draw in range(60):
        rng = np.random.default_rng(draw)
        for b in blocks:
            inputs, labels = masker(b, rng)
            chosen = labels != IGNORE
            maskable += int((b.words != NOT_A_WORD).sum())
            selected += int(chosen.sum())
            assert np.array_equal(labels[chosen], b.ids[chosen])
            assert not chosen[b.words == NOT_A_WORD].any()  # [CLS], [SEP] never chosen
            for word in np.unique(b.words[chosen]):
                positions = b.words == word
                assert chosen[positions].all()  # a chosen jieba word is chosen whole
                if (inputs[positions] == tokenizer.mask_id).any():
                    assert (inputs[positions] == tokenizer.mask_id).all()  # and masked whole
                    masked += 1
                elif np.array_equal(inputs[positions], b.ids[positions]):
                    kept += 1
                else:
                    randomized += 1
            assert np.array_equal(inputs[~chosen], b.ids[~chosen])
    assert 0.14 < selected / maskable < 0.16
    words = masked + randomized + kept
    assert abs(masked / words - 0.8) < 0.02
    assert abs(randomized / words - 0.1) < 0.02  # (a random draw equal to the original counts as kept)
    assert abs(kept / words - 0.1) < 0.02


def test_masks_are_dynamic_across_epochs_and_repeat_after_a_resume(tokenizer, blocks):
    masker = Masker.for_tokenizer(tokenizer)
    epoch0 = mask_batch(blocks[:8], masker, batch_rng(0, 0, 3), tokenizer.pad_id)
    epoch1 = mask_batch(blocks[:8], masker, batch_rng(0, 1, 3), tokenizer.pad_id)
    again = mask_batch(blocks[:8], masker, batch_rng(0, 0, 3), tokenizer.pad_id)
    assert not torch.equal(epoch0["labels"], epoch1["labels"])
    for key in epoch0:
        assert torch.equal(epoch0[key], again[key])


def test_corpus_errors_are_one_line(tmp_path):
    with pytest.raises(CNClipError, match="no corpus at"):
        list(read_corpus(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CNClipError, match="no .txt files"):
        list(read_corpus(tmp_path / "empty"))
    (tmp_path / "gbk.txt").write_bytes("中文".encode("gbk"))
    with pytest.raises(CNClipError, match="not UTF-8"):
        list(read_corpus(tmp_path / "gbk.txt"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("第一行\n\n第二行\n", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text("第三行\n", encoding="utf-8")
    assert list(read_corpus(tmp_path / "docs")) == ["第一行", "第二行", "第三行"]


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    torch.manual_seed(0)
    return cnclip.create_model("tiny-vit").save_pretrained(tmp_path_factory.mktemp("start") / "tiny")


def test_held_out_mlm_loss_falls_and_the_image_tower_is_unchanged(tmp_path, start_model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(600)) + "\n", encoding="utf-8")
    opts = PretrainOptions(
        corpus=str(corpus), out=str(tmp_path / "run"), model=str(start_model), max_length=64, batch_size=16,
        epochs=8, lr=5e-3, val_fraction=0.1, log_every=1000,
    )  # fmt: skip
    summary = pretrain_text(opts)
    # ~144 held-out masked tokens with fixed masks; chance is 1/21128 (perplexity ~21,000 before)
    assert summary.after["loss"] < summary.before["loss"] - 3.0
    assert summary.after["perplexity"] < summary.before["perplexity"] / 100
    assert summary.after["accuracy"] > summary.before["accuracy"] + 0.03
    start, adapted = cnclip.load_model(start_model), cnclip.load_model(summary.model_folder)
    for (name, a), b in zip(start.visual.state_dict().items(), adapted.visual.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(
        start.bert.encoder.layer[0].output.dense.weight, adapted.bert.encoder.layer[0].output.dense.weight
    )
    assert (tmp_path / "run" / "model" / HEAD_FILE).is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == summary.steps


def test_cli_pretrain_then_train_and_index_take_the_adapted_model(tmp_path, start_model):
    from conftest import random_images

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(120)) + "\n", encoding="utf-8")
    out = run_cli(
        "pretrain-text", "--corpus", corpus, "--model", start_model, "--out", tmp_path / "run",
        "--max-length", "64", "--batch-size", "8", "--max-steps", "3", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 3 and "perplexity" in summary["after"]
    assert "masked-token accuracy" in out.stderr
    assert "prefix dict" not in out.stderr and "Loading model cost" not in out.stderr  # jieba's start-up lines
    adapted = tmp_path / "run" / "model"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(random_images(4, seed=3)):
        img.save(photos / f"{i}.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"image": f"photos/{i}.png", "text": t}) for i, t in enumerate(corpus_lines(4))),
        encoding="utf-8",
    )
    trained = run_cli("train", "--train", pairs, "--model", adapted, "--out", tmp_path / "ft", "--max-steps", "1",
                      "--batch-size", "4")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    indexed = run_cli("index", photos, "--index", tmp_path / "idx", "--model", adapted, "-q")
    assert indexed.returncode == 0, indexed.stderr
    # a second run continues from the saved checkpoint rather than starting over
    again = run_cli("pretrain-text", "--corpus", corpus, "--model", start_model, "--out", tmp_path / "run",
                    "--max-length", "64", "--batch-size", "8", "--max-steps", "5", "--json")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed_from_step"] == 3


def test_bad_inputs_to_pretrain_text(tmp_path, start_model):
    out = run_cli("pretrain-text", "--corpus", tmp_path / "nope.txt", "--model", start_model, "--out", tmp_path / "r")
    assert out.returncode != 0 and "no corpus at" in out.stderr and "Traceback" not in out.stderr
    corpus = tmp_path / "c.txt"
    corpus.write_text("你好世界\n", encoding="utf-8")
    out = run_cli("pretrain-text", "--corpus", corpus, "--model", start_model, "--out", tmp_path / "r",
                  "--mlm-head", corpus)  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, start_model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(200, seed=1)) + "\n", encoding="utf-8")

    def options(out: str) -> PretrainOptions:
        return PretrainOptions(
            corpus=str(corpus), out=str(tmp_path / out), model=str(start_model), max_length=64, batch_size=8,
            max_steps=6, save_every=3, log_every=1, lr=1e-3,
        )  # fmt: skip

    whole = pretrain_text(options("whole"))

    class Killed(Exception):
        pass

    def kill_at_step_5(line: str) -> None:
        if line.startswith("step 5/"):
            raise Killed  # after step 5, with the last checkpoint at step 3

    with pytest.raises(Killed):
        pretrain_text(options("cut"), report=kill_at_step_5)
    resumed = pretrain_text(options("cut"))
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    a, b = cnclip.load_model(whole.model_folder), cnclip.load_model(resumed.model_folder)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_block_with_no_masked_token_adds_nothing_instead_of_nan(tmp_path, start_model, tokenizer):
    """A word longer than 15 % of its block (here a URL's 65-token tail, a block of its own) is never
    masked, whole words only: the block has nothing to predict. Alone in a micro-batch its
    cross-entropy is 0/0; that NaN must not reach AdamW."""
    url = "https://example.com/a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0u1v2w3x4y5z6a7b8c9d0e1f2g3h4"
    lines = corpus_lines(30) + [url] + corpus_lines(10, seed=1)
    masker = Masker.for_tokenizer(tokenizer)
    unmaskable = [
        b for b in pack_blocks(tokenizer, lines, 64) if not (masker(b, np.random.default_rng(0))[1] != IGNORE).any()
    ]
    assert len(unmaskable) == 1 and len(unmaskable[0].ids) == 64
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    opts = PretrainOptions(
        corpus=str(corpus), out=str(tmp_path / "run"), model=str(start_model), max_length=64, batch_size=1,
        val_fraction=0.0, lr=1e-3, log_every=1, precision="fp32",
    )  # fmt: skip
    summary = pretrain_text(opts)
    adapted = cnclip.load_model(summary.model_folder)
    assert all(torch.isfinite(p).all() for p in adapted.bert.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary.steps == summary.train_blocks
    assert all(np.isfinite(row["loss"]) for row in rows if row["loss"] is not None)
    assert [row["loss"] for row in rows].count(None) == 1  # that block's step: no loss, no update


def test_the_mlm_head_comes_from_a_bert_checkpoint_when_given(tmp_path, start_model):
    from safetensors.torch import save_file
    from transformers import BertForMaskedLM

    from cnclip.train.mlm import MaskedLM

    clip = cnclip.load_model(start_model)
    torch.manual_seed(9)
    bert = BertForMaskedLM(clip.bert.config)  # stands in for e.g. hfl/chinese-roberta-wwm-ext's checkpoint
    state = {k: v.contiguous() for k, v in bert.state_dict().items() if k.startswith("cls.") and "decoder" not in k}
    save_file(state, str(tmp_path / "bert.safetensors"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(corpus_lines(60)) + "\n", encoding="utf-8")
    opts = PretrainOptions(
        corpus=str(corpus), out=str(tmp_path / "run"), model=str(start_model),
        mlm_head=str(tmp_path / "bert.safetensors"), max_length=64, batch_size=8, max_steps=1, lr=0.0,
    )  # fmt: skip
    lines = []
    summary = pretrain_text(opts, report=lines.append)
    assert any(line.startswith("MLM head from") for line in lines)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "model" / HEAD_FILE))
    for key, value in state.items():
        torch.testing.assert_close(saved[key.removeprefix("cls.")], value)  # lr 0: the head is the given one
    assert summary.steps == 1
    with pytest.raises(CNClipError, match="has no MLM head"):
        MaskedLM(clip).load_head({"bert.embeddings.word_embeddings.weight": torch.zeros(1)}, "some.bin")
