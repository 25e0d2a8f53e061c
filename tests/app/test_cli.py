"""The real `cnclip` command, run as a user would."""

from __future__ import annotations

import json

import numpy as np
from conftest import run_cli
from reference import official_model, save_official_checkpoint

import cnclip
from cnclip.model.config import get_model_config


def test_models_lists_the_zoo():
    out = run_cli("models", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)] == cnclip.available_models()


def test_convert_official_to_hf_folder(tmp_path):
    from transformers import ChineseCLIPModel

    ref = official_model(get_model_config("tiny-vit"))
    src = save_official_checkpoint(ref, tmp_path / "official.pt", half=True)
    out = run_cli("convert", src, tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert "Hugging Face ChineseCLIP" in out.stderr
    ours = cnclip.load_model(src)
    hf = ChineseCLIPModel.from_pretrained(tmp_path / "hf").eval()
    ids = ours.tokenizer(["一只猫", "海边的日落"])
    theirs = hf.get_text_features(input_ids=ids, attention_mask=ids.ne(0)).pooler_output.detach().numpy()
    np.testing.assert_allclose(ours.encode_text(ids).detach().numpy(), theirs, atol=1e-5)
    # refuses to write over a folder that already holds something
    again = run_cli("convert", src, tmp_path / "hf")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert run_cli("convert", src, tmp_path / "hf", "--overwrite").returncode == 0


def test_convert_errors_are_one_line(tmp_path):
    for args, needle in [
        (("convert", tmp_path / "missing.pt", tmp_path / "out"), "missing.pt"),
        (("convert", "ViT-Z-1", tmp_path / "out"), "ViT-Z-1"),
        (("convert", "OFA-Sys/chinese-clip-vit-base-patch16", tmp_path / "out"), "--model PATH"),
    ]:
        out = run_cli(*args)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cnclip: error:") and needle in lines[0], out.stderr
        assert not (tmp_path / "out").exists()


def test_a_file_name_that_is_not_utf8_prints_as_its_own_bytes(tmp_path, tiny_vit, monkeypatch):
    import io
    import os
    import shutil
    import sys

    from conftest import write_photos

    from cnclip.app import cli

    photo = write_photos(tmp_path / "photos", 1, seed=3)[0]
    raw = os.fsencode(tmp_path / "photos") + b"/\xc3\xa8\xb9\xfe.png"  # a GBK name from an old archive
    shutil.copyfile(photo, raw)  # and a copy under it: one group of dupes
    model = str(tiny_vit.save_pretrained(tmp_path / "model"))
    with cnclip.Index.open(tmp_path / "idx", model=model, create=True) as index:
        index.add_folder(tmp_path / "photos")
    for argv in (["search", "猫"], ["dupes", "--threshold", "1"]):
        out = io.BytesIO()
        # what a zh_CN.UTF-8 terminal gives: strict UTF-8, where a lone surrogate raised UnicodeEncodeError
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", errors="strict"))
        assert cli.main([*argv, "--index", str(tmp_path / "idx")]) == 0
        sys.stdout.flush()
        assert b"\t" + raw + b"\n" in out.getvalue(), out.getvalue()  # usable as a path: `cut -f2 | xargs ...`


def test_train_gets_the_rest_of_the_line_and_weights_source_from_either_side(monkeypatch):
    import os

    import cnclip.train
    from cnclip.app import cli
    from cnclip.model.download import SOURCES_ENV

    seen = []
    monkeypatch.setattr(cnclip.train, "main", lambda argv: seen.append((argv, os.environ[SOURCES_ENV])) or 0)
    monkeypatch.setenv(SOURCES_ENV, "hf")  # and put back afterwards
    assert cli.main(["-v", "train", "--train", "p.jsonl", "--weights-source", "modelscope", "--lr=1e-4", "-v"]) == 0
    assert cli.main(["--weights-source", "ms", "train", "-h"]) == 0
    assert seen == [(["--train", "p.jsonl", "--lr=1e-4", "-v", "--verbose"], "modelscope"), (["-h"], "ms")]


def test_version_and_a_closed_pipe_end_quietly(tmp_path):
    import subprocess
    import sys

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"cnclip {cnclip.__version__}"
    # `cnclip ... | head -1`: the reader is gone before the first line is written
    proc = subprocess.Popen([sys.executable, "-m", "cnclip", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_mistake_after_a_command_shows_that_commands_usage(tmp_path):
    out = run_cli("search", "猫", "--topk", "5", "--index", tmp_path)
    assert (
        out.returncode == 2 and "usage: cnclip search" in out.stderr and "unrecognized arguments: --topk" in out.stderr
    )


def test_tag_takes_its_model_from_cnclip_model(tmp_path, tiny_vit_dir):
    from conftest import random_images

    random_images(1, seed=3)[0].save(tmp_path / "a.png")
    (tmp_path / "labels.txt").write_text("猫\n狗\n海滩\n", encoding="utf-8")
    args = ("tag", tmp_path / "a.png", "--labels", tmp_path / "labels.txt", "--index", tmp_path / "no-index")
    out = run_cli(*args, "--json", env={"CNCLIP_MODEL": str(tiny_vit_dir)})
    assert out.returncode == 0, out.stderr
    assert sorted(h["label"] for h in json.loads(out.stdout)) == sorted(["猫", "狗", "海滩"])
