"""`cnclip train`, `cnclip pretrain-text` and `cnclip import-official`: training, and the data it takes.

`train` hands what follows it to `cnclip.train.main`, which parses its own options (torchrun runs it too).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cnclip.app.cli.common import MODEL_HELP, Subparsers, add_model_option, as_json, positive_int, say
from cnclip.errors import CNClipError
from cnclip.options import options_from


def add_train(sub: Subparsers) -> None:
    # listed for --help; main() hands the rest of the command line to run_train
    sub.add_parser("train", help="fine-tune on image-caption pairs (cnclip train --help)", add_help=False)


def run_train(argv: Sequence[str], verbose: bool) -> int:
    """`cnclip train ARGV...`: the trainer's own parser, logging and error boundary; `verbose` is `cnclip -v`."""
    from cnclip.train import main as train_main

    return train_main([*argv, *(["--verbose"] if verbose else [])])


def add_pretrain_text(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pretrain-text", help="adapt the text tower to a corpus: masked-language pretraining, whole-word masking"
    )
    p.add_argument("--corpus", required=True, help="text file (one document or sentence per line) or folder of .txt")
    add_model_option(p, MODEL_HELP)
    p.add_argument("--out", required=True, help="run folder: model/ (the adapted model), last/, metrics.jsonl")
    p.add_argument("--from-scratch", action="store_true", help="random weights in --model's zoo shape")
    p.add_argument("--mlm-head", help="BERT checkpoint (file or folder) whose cls.predictions.* start the MLM head")
    p.add_argument("--user-dict", help="jieba user dictionary: domain words kept whole when masking")
    p.add_argument(
        "--max-length",
        type=positive_int,
        help="tokens per packed block (default 128, or fewer if the tower has fewer positions)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="blocks per micro-batch")
    p.add_argument("--accum", type=positive_int, default=1, help="micro-batches per step (effective batch size)")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent warming up")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the blocks (default 0.05)")
    p.add_argument("--eval-every", type=positive_int, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=positive_int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh even if --out has a run")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=_cmd_pretrain_text)


def _cmd_pretrain_text(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cnclip.train.mlm import PretrainOptions, pretrain_text

    summary = pretrain_text(options_from(args, PretrainOptions), report=lambda line: say(line, flush=True))
    say(f"wrote {summary.model_folder}; use it with --model in cnclip train / cnclip index")
    if args.json:
        print(as_json(asdict(summary)))
    return 0


def add_import_official(sub: Subparsers) -> None:
    p = sub.add_parser(
        "import-official", help="convert the official Chinese-CLIP data layout (tsv+jsonl or LMDB) to pairs.jsonl"
    )
    p.add_argument("--imgs", metavar="FILE", help="*_imgs.tsv: image_id<TAB>base64 image")
    p.add_argument("--texts", metavar="FILE", help="*_texts.jsonl: {text_id, text, image_ids}")
    p.add_argument("--lmdb", metavar="DIR", help="the official LMDB folder (imgs/ and pairs/) instead")
    p.add_argument("--out", required=True, help="folder for images/ and pairs.jsonl")
    p.set_defaults(func=_cmd_import_official)


def _cmd_import_official(args: argparse.Namespace) -> int:
    from cnclip.train.official_formats import read_official, read_official_lmdb

    if bool(args.lmdb) == bool(args.imgs or args.texts):
        raise CNClipError("give either --imgs FILE --texts FILE (tsv + jsonl) or --lmdb DIR")
    if args.lmdb:
        path, report = read_official_lmdb(args.lmdb, args.out)
    else:
        if not (args.imgs and args.texts):
            raise CNClipError("the tsv layout needs both --imgs *_imgs.tsv and --texts *_texts.jsonl")
        path, report = read_official(args.imgs, args.texts, args.out)
    say(f"wrote {path}: {report.summary()}")
    for line in report.examples:
        say(f"  {line}")
    say(f"train on it with: cnclip train --train {path} --out runs/NAME")
    return 0
