"""Throughput of `cnclip pretrain-text` (masked-language pretraining of the text tower), in tokens/s.

Runs the real `pretrain_text` on a corpus of Chinese sentences: the Flickr8k-CN captions when
../shared/data/flickr8k-cn is there (read, never copied), else generated sentences. Prints a
Markdown table with the machine named: tokens/s (all tokens of the packed blocks, forward +
backward + AdamW step), blocks/s, and held-out masked-token accuracy / perplexity before and after.

    # speed of the ViT-B-16 text tower (RoBERTa-base shape, 102 M parameters), random weights
    nice .venv/bin/python scripts/bench/pretrain_text.py --shape ViT-B-16 --max-steps 8
    # a small shape that learns visibly in minutes on a CPU
    nice .venv/bin/python scripts/bench/pretrain_text.py --shape tiny-vit --max-length 64 --epochs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import machine  # noqa: E402

from cnclip.train.mlm import PretrainOptions, pretrain_text  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-cn"


def write_corpus(path: Path, limit: int) -> str:
    """Captions of Flickr8k-CN's train split if present, else generated sentences; returns what was used."""
    lines: list[str] = []
    if (DATA / "train.jsonl").is_file():
        with open(DATA / "train.jsonl", encoding="utf-8") as f:
            lines = [json.loads(line)["text"] for line in f][:limit]
        source = f"Flickr8k-CN train captions ({len(lines):,})"
    else:
        rng = random.Random(0)
        who, what = ["一只狗", "两个孩子", "一位老人", "一个女孩"], ["在草地上奔跑", "在海边玩耍", "在街上散步"]
        lines = [f"{rng.choice(who)}{rng.choice(what)}。" for _ in range(limit)]
        source = f"generated sentences ({len(lines):,})"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="ViT-B-16", help="zoo shape whose text tower is trained (random weights)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--lines", type=int, default=30000, help="corpus lines to use")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cnclip-mlm-bench-") as work:
        corpus = Path(work) / "corpus.txt"
        source = write_corpus(corpus, args.lines)
        opts = PretrainOptions(
            corpus=str(corpus), out=str(Path(work) / "run"), model=args.shape, from_scratch=True,
            max_length=args.max_length, batch_size=args.batch_size, accum=args.accum, epochs=args.epochs,
            max_steps=args.max_steps, lr=args.lr, precision=args.precision, max_val_blocks=64,
            save_every=10**9, log_every=10**9,
        )  # fmt: skip
        t = time.perf_counter()
        s = pretrain_text(opts, report=lambda line: print(line, file=sys.stderr, flush=True))
        wall = time.perf_counter() - t

    print(f"### `cnclip pretrain-text` throughput, {args.shape} text tower — {dt.date.today().isoformat()}\n")
    print(f"Machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads.\n")
    print(f"Corpus: {source}; blocks of <= {args.max_length} tokens; batch {args.batch_size} x accum {args.accum}; "
          f"precision {args.precision}; random initial weights.\n")  # fmt: skip
    print("| steps | tokens/s | train blocks | held-out accuracy before → after | perplexity before → after | wall s |")
    print("|---:|---:|---:|---|---|---:|")
    b, a = s.before, s.after
    print(
        f"| {s.steps} | {s.tokens_per_second:,.0f} | {s.train_blocks:,} | {100 * b['accuracy']:.1f}% → "
        f"{100 * a['accuracy']:.1f}% | {b['perplexity']:,.0f} → {a['perplexity']:,.1f} | {wall:.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
