"""Fine-tuning benchmark on Flickr8k-CN: train on train.jsonl, evaluate on val.jsonl.

Runs `cnclip train` (the real trainer) and prints a Markdown table: text->image and
image->text Recall@1/5/10 and mean recall before and after training, training pairs/s and
wall time, with the machine named.

    # a real fine-tune, where the official weights can be had (a GPU machine with internet):
    python scripts/bench/train_flickr8k_cn.py --model ViT-B-16 --epochs 3 --batch-size 128
    # on a CPU without the weights: a small shape from scratch, ~20 minutes on 2 cores
    nice .venv/bin/python scripts/bench/train_flickr8k_cn.py --shape small --epochs 6
    # training speed of a shape, no evaluation
    nice .venv/bin/python scripts/bench/train_flickr8k_cn.py --shape ViT-B-16 --max-steps 6 --batch-size 16 --no-eval

The data (research-only licence) is read from ../shared/data/flickr8k-cn and never copied.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import machine  # noqa: E402

import cnclip  # noqa: E402
from cnclip.model.config import ModelConfig, TextConfig, VisionConfig, get_model_config  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-cn"

# A shape that learns something from scratch on a CPU in minutes (ViT-B-16 is ~40x the compute).
SMALL = ModelConfig(
    embed_dim=256,
    vision=VisionConfig(kind="vit", image_size=96, layers=4, width=256, patch_size=16, head_width=64),
    text=TextConfig(hidden_size=256, layers=4, heads=4, intermediate_size=1024, max_position_embeddings=64),
)


def shape(name: str) -> ModelConfig:
    return SMALL if name == "small" else dataclasses.replace(get_model_config(name), name=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with train.jsonl, val.jsonl and images/")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="start from these weights (zoo name, path, hub id): a real fine-tune")
    src.add_argument("--shape", default="small", help="or random weights of this shape: 'small' or a zoo name")
    ap.add_argument("--out", type=Path, help="run folder (default: a temporary one)")
    ap.add_argument("--no-eval", action="store_true", help="measure training speed only")
    ap.add_argument("--seed", type=int, default=0)
    args, train_args = ap.parse_known_args(argv)
    for name in ("train.jsonl", "val.jsonl"):
        if not (args.data / name).is_file():
            raise SystemExit(f"{args.data / name} not found; pass --data FOLDER (Flickr8k-CN with train/val.jsonl)")

    out = args.out or Path(tempfile.mkdtemp(prefix="cnclip-flickr8k-"))
    model_arg = args.model
    if model_arg is None:
        torch.manual_seed(args.seed)
        model_arg = str(cnclip.create_model(shape(args.shape)).save_pretrained(out / "init"))
    command = ["--train", str(args.data / "train.jsonl"), "--model", model_arg, "--out", str(out / "run")]
    command += ["--seed", str(args.seed), "--no-resume", *train_args]
    if not args.no_eval:
        command += ["--val", str(args.data / "val.jsonl")]
    print("cnclip train " + " ".join(command), file=sys.stderr)

    from cnclip.train import main as train_main

    start = time.perf_counter()
    rc = train_main(command)
    wall = time.perf_counter() - start
    if rc:
        return rc
    summary = json.loads((out / "run" / "summary.json").read_text("utf-8"))
    events = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text("utf-8").splitlines()]
    rates = [e["pairs_per_s"] for e in events if e["kind"] == "train"]

    label = args.model or f"{args.shape} shape, random init"
    print(f"### Flickr8k-CN, {label} — {dt.date.today().isoformat()}\n")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"Machine: {machine()}; torch {torch.__version__}; device {device}.\n")
    o = summary["options"]
    print(
        f"{summary['steps']} steps of {o['batch_size']} pairs x {o['accum_freq']} accumulation, lr {o['lr']}, "
        f"{summary['epochs']} epochs over {summary['pairs_seen']:,} pairs in {wall / 60:.1f} min; "
        f"training throughput {rates[-1] if rates else 0:.1f} pairs/s (whole run, data loading included).\n"
    )
    if summary["first_eval"]:
        print("| | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | MR |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, e in (("before", summary["first_eval"]), (f"best (step {summary['best_step']})", summary["best"])):
            cells = [e["t2i"][k] for k in ("R@1", "R@5", "R@10")] + [e["i2t"][k] for k in ("R@1", "R@5", "R@10")]
            print(f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + f" | {100 * e['MR']:.1f} |")
        print(
            f"\nValidation: {summary['best']['images']} images, {summary['best']['texts']} captions (chance R@1 "
            f"{100 / summary['best']['images']:.2f})."
        )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
