"""`cnclip models`, `cnclip convert` and `cnclip export-onnx`: the model zoo, and weights turned into
other formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnclip.app.cli.common import MODEL_HELP, Subparsers, as_json, say
from cnclip.errors import CNClipError


def add_models(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--all", action="store_true", help="include the tiny test shapes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from cnclip.model.config import available_models, get_model_config

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
        print(as_json(rows))
        return 0
    for r in rows:
        tower = f"{r['image_tower']}\ttext {r['text_layers']} layers"
        print(f"{r['name']}\tembed {r['embed_dim']}\t{r['resolution']}px\t{tower}\t{r['hub'] or '-'}")
    return 0


def add_convert(sub: Subparsers) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to a Hugging Face-compatible folder")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="output folder")
    p.add_argument("--config", help="the zoo shape SRC must have (checked against the weights)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from cnclip.model.checkpoint import load_model

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
    say(f"wrote {dst} ({model.config.name or 'custom shape'}, {kind} format)")
    return 0


def add_export_onnx(sub: Subparsers) -> None:
    p = sub.add_parser("export-onnx", help="export the image and text towers to ONNX (dynamic batch axis)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="output folder: image.onnx and text.onnx")
    p.add_argument("--towers", default="image,text", help="comma list of towers to export (default: image,text)")
    p.set_defaults(func=_cmd_export_onnx)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from cnclip.model.checkpoint import load_model
    from cnclip.model.onnx_export import export_onnx

    model = load_model(args.model)
    for tower, path in export_onnx(model, args.out, tuple(args.towers.split(","))).items():
        say(f"wrote {path} ({tower} tower, dynamic batch axis)")
    return 0
