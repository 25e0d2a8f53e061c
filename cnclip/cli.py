"""The `cnclip` command: the only place that parses argv, prints and exits."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import CNClipError

MODEL_HELP = (
    "zoo name (ViT-B-16, ...), official .pt, safetensors file, model folder or Hugging Face id "
    "(default: $CNCLIP_MODEL, then ViT-B-16)"
)


def _cmd_models(args: argparse.Namespace) -> int:
    from .config import available_models, get_model_config

    rows = []
    for name in available_models(include_tiny=args.all):
        c = get_model_config(name)
        rows.append(
            {
                "name": name,
                "image_tower": f"{c.vision.kind} width {c.vision.width}",
                "text_layers": c.text.layers,
                "embed_dim": c.embed_dim,
                "resolution": c.vision.image_size,
                "hub": c.hub_repo,
            }
        )
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for r in rows:
        tower = f"{r['image_tower']}\ttext {r['text_layers']} layers"
        print(f"{r['name']}\tembed {r['embed_dim']}\t{r['resolution']}px\t{tower}\t{r['hub'] or '-'}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_model

    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise CNClipError(f"{dst} already exists and is not empty; choose another folder or pass --overwrite")
    model = load_model(args.src, config=args.config)
    model.save_pretrained(dst)
    kind = (
        "Hugging Face ChineseCLIP"
        if model.config.vision.kind == "vit"
        else "cnclip (transformers has no ResNet ChineseCLIP)"
    )
    print(f"wrote {dst} ({model.config.name or 'custom shape'}, {kind} format)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip", description="Chinese-CLIP text-image search.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--all", action="store_true", help="include the tiny test shapes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("convert", help="convert a checkpoint to a Hugging Face-compatible folder")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="output folder")
    p.add_argument("--config", help="the zoo shape SRC must have (checked against the weights)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except CNClipError as e:
        print(f"cnclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cnclip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
