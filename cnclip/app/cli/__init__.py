"""The `cnclip` command: the only place that parses argv, prints and exits.

Each group of commands is a module that adds its parsers beside its handlers (models, index, search, train,
evaluate, serve; what they share is in common.py). `main` parses and is the one error boundary.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from cnclip import __version__, faults
from cnclip.app.cli.common import DownloadBar
from cnclip.app.cli.evaluate import add_eval
from cnclip.app.cli.index import add_gc, add_index, add_info
from cnclip.app.cli.models import add_convert, add_export_onnx, add_models
from cnclip.app.cli.search import add_dupes, add_search, add_tag, add_words
from cnclip.app.cli.serve import add_serve
from cnclip.app.cli.train import add_import_official, add_pretrain_text, add_train, run_train
from cnclip.errors import CNClipError

__all__ = ["build_parser", "main"]

_DownloadBar = DownloadBar  # the name it had when the CLI was one module

# each adds one command's parser; `cnclip --help` lists them in this order
COMMANDS = (
    add_train,
    add_models,
    add_convert,
    add_export_onnx,
    add_index,
    add_gc,
    add_search,
    add_words,
    add_info,
    add_dupes,
    add_tag,
    add_eval,
    add_serve,
    add_pretrain_text,
    add_import_official,
)

WEIGHTS_SOURCE_HELP = (
    "where zoo weights are downloaded from, in order: hf (or $HF_ENDPOINT, e.g. https://hf-mirror.com), "
    "modelscope, https://host/path/{file}, or a folder (default: $CNCLIP_WEIGHTS_SOURCE, then hf, and "
    "modelscope when the hub cannot be reached); allowed before or after the command"
)


def _weights_source(text: str) -> str:
    """--weights-source LIST, checked as it is parsed: a bad LIST stops the command before any work."""
    from cnclip.model.download import parse_sources

    try:
        parse_sources(text)
    except CNClipError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip", description="Chinese-CLIP text-image search.")
    parser.add_argument("--version", action="version", version=f"cnclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    parser.add_argument("--weights-source", type=_weights_source, metavar="LIST", help=WEIGHTS_SOURCE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    parser.commands = sub.choices  # name -> its parser, for errors in the command's own words
    for command in sub.choices.values():  # also after the command: `cnclip convert SRC DST --weights-source ms`
        command.add_argument(
            "--weights-source", type=_weights_source, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def _use_weights_source(value: str) -> None:
    """Every model load reads $CNCLIP_WEIGHTS_SOURCE: in this process and in those it starts (the trainer under
    torchrun, Ray workers)."""
    from cnclip.model.download import SOURCES_ENV

    os.environ[SOURCES_ENV] = value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # the rest: the trainer's options, which it parses itself
    if rest and args.command != "train":  # the command's own usage, which names its options
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    if args.weights_source is not None:
        _use_weights_source(args.weights_source)
    if args.command == "train":  # its own logging and error boundary (torchrun runs it without this one)
        return run_train(rest, args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if isinstance(sys.stdout, io.TextIOWrapper):
        # a file name that is not UTF-8 (lone surrogates in Python) prints as its own bytes, as `ls` does,
        # instead of a UnicodeEncodeError on terminals whose locale encoding is strict (zh_CN.UTF-8)
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        status = _run(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print a traceback
        return status
    except BrokenPipeError:
        # `cnclip search 猫 -k 200 | head -1`: the reader has what it wanted; end as `cat` does (SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def run() -> NoReturn:
    """The `cnclip` command (and `python -m cnclip`): `main`, then exit with its status.

    After Ctrl+C (130) everything worth keeping is committed, and the process ends at once:
    tearing down torch's and ONNX Runtime's thread pools at interpreter exit took ~1.3 s, and now
    and then aborted ("terminate called without an active exception", status -6 instead of 130)."""
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _run(args: argparse.Namespace) -> int:
    """The command, inside the one error boundary: a `CNClipError` is one line and exit status 1."""
    from cnclip.model.download import reporting

    bar = DownloadBar(enabled=sys.stderr.isatty() and not getattr(args, "quiet", False))
    try:
        faults.check()
        with reporting(bar):
            return args.func(args)
    except CNClipError as e:
        print(f"cnclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cnclip: interrupted", file=sys.stderr)
        return 130
