"""`cnclip eval`: retrieval recall on image-caption pairs, or zero-shot accuracy on a folder of classes."""

from __future__ import annotations

import argparse

from cnclip.app.cli.common import (
    MODEL_HELP,
    Subparsers,
    add_model_option,
    add_runtime_options,
    as_json,
    positive_int,
    progress_bar,
    runtime,
    say,
)
from cnclip.errors import CNClipError
from cnclip.userpath import expand_user


def add_eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="retrieval recall on image-caption pairs, or zero-shot accuracy on a folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="FILE", help="image-caption pairs: JSONL, CSV or a folder with .txt captions")
    what.add_argument("--zero-shot", metavar="FOLDER", help="a folder with one sub-folder of images per class")
    p.add_argument(
        "--labels", metavar="FILE", help="with --zero-shot: folder<TAB>label per line, or labels in folder order"
    )
    add_model_option(p, MODEL_HELP)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (fractions, not percent)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--t2s", action="store_true", help="read Traditional Chinese captions as Simplified (OpenCC t2s) first"
    )
    add_runtime_options(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from cnclip.model.checkpoint import load_model
    from cnclip.train.pairs import simplified_captions

    if args.labels and args.zero_shot is None:
        raise CNClipError("--labels names the classes of --zero-shot FOLDER; add --zero-shot FOLDER")
    if args.zero_shot is not None and not expand_user(args.zero_shot).is_dir():
        raise CNClipError(f"{args.zero_shot} is not a folder; give a folder with one sub-folder of images per class")
    pairs = _read_pairs(args.data) if args.data is not None else None  # data problems show before the model loads
    if pairs is not None and args.t2s:
        pairs = simplified_captions(pairs)
    chosen = runtime(args)
    encoder = chosen.build(load_model(args.model))
    result = _evaluate(encoder, pairs, args)
    if args.json:
        print(as_json(result))
    elif pairs is not None:
        _print_recall_table(result)
    else:
        print(f"top1\t{100 * result['top1']:.1f}\ntop5\t{100 * result['top5']:.1f}")
        say(f"{result['images']} images, {result['classes']} classes")
    return 0


def _evaluate(encoder, pairs: list | None, args: argparse.Namespace) -> dict:
    """The metrics of `pairs`, or of --zero-shot FOLDER without them; images that would not load named on stderr."""
    from cnclip.index.scan import Progress
    from cnclip.train.evaluate import evaluate_pairs, zero_shot_accuracy

    bar = progress_bar("embedding", args)
    skipped: list[str] = []
    options = {"batch_size": args.batch_size, "progress": lambda done, total: bar(Progress(done, total))}
    try:
        if pairs is not None:
            result = evaluate_pairs(encoder, pairs, on_skip=skipped.append, **options)
        else:
            result = zero_shot_accuracy(encoder, args.zero_shot, args.labels, on_skip=skipped.append, **options)
    finally:
        bar.close()
    for line in skipped:
        say(f"skipped {line}")
    del result["failed"]  # named on stderr just above
    return result


def _read_pairs(path: str) -> list:
    """Image-caption pairs from a data file; what was left out is summed up on stderr."""
    from cnclip.train.pairs import read_pairs

    pairs, report = read_pairs(path)
    if report.dropped:
        problems = ", ".join(f"{count} {reason}" for reason, count in report.problems.items())
        say(f"{report.source}: left out {report.dropped} of {report.kept + report.dropped} ({problems})")
        for example in report.examples:
            say(f"  {example}")
    return pairs


def _print_recall_table(result: dict) -> None:
    """Recall in percent, one row per direction, then the mean recall."""
    print("\tR@1\tR@5\tR@10")
    for direction in ("t2i", "i2t"):
        print(direction + "".join(f"\t{100 * result[direction][k]:.1f}" for k in ("R@1", "R@5", "R@10")))
    print(f"MR\t{100 * result['MR']:.1f}")
    say(f"{result['images']} images, {result['texts']} texts")
