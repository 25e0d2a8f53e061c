"""`cnclip train`: argument parsing, set-up and reporting around `Trainer` (this is the
trainer's command-line layer, so it prints).

    cnclip train --train pairs.jsonl --val val.jsonl --model ViT-B-16 --out runs/mine
    torchrun --nproc_per_node 4 -m cnclip.train --train pairs.jsonl --out runs/mine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.options import options_from
from cnclip.train.contrastive import Trainer, TrainOptions
from cnclip.train.distributed import DistInfo, cleanup, init_distributed
from cnclip.train.loop import METRICS_FILE, find_checkpoint

log = logging.getLogger(__name__)


T2S_CAPTIONS_HELP = "read Traditional Chinese captions as Simplified (OpenCC t2s) before tokenizing"


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions()
    p = argparse.ArgumentParser(
        prog="cnclip train",
        description="Fine-tune (or train from scratch) on image-caption pairs. Runs as one process, "
        "or under torchrun as many (NCCL on GPUs, gloo on CPUs).",
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--train", required=True, help="pairs: JSONL {image, text}, CSV image,text, or folder with .txt sidecars"
    )
    g.add_argument("--val", help="held-out pairs, evaluated during training (Recall@1/5/10 both ways)")
    g.add_argument(
        "--model",
        help="starting weights: zoo name, checkpoint path, folder or hub id (default: $CNCLIP_MODEL, then ViT-B-16)",
    )
    g.add_argument("--from-scratch", action="store_true", help="random weights in --model's zoo shape")
    g.add_argument("--out", required=True, help="run folder: best/, last/, metrics.jsonl, plot.png")
    g.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    g.add_argument("--t2s", action="store_true", help=T2S_CAPTIONS_HELP)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per process and micro-batch")
    g.add_argument(
        "--accum-freq",
        type=int,
        default=d.accum_freq,
        help="micro-batches per step (K-fold contrastive batch)",
    )
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--wd", type=float, default=d.weight_decay, help="AdamW weight decay (not on norms, biases, scale)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps before the cosine decay")
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower")
    g.add_argument("--local-gather", action="store_true", help="gather features without gradient (cheaper, 1/N grads)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--workers", type=int, default=d.workers, help="data-loading worker processes")

    g = p.add_argument_group("locking (LiT is --lock-image)")
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    g.add_argument("--lock-image-unlocked", type=int, default=0, metavar="N", help="...but train its last N groups")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    g.add_argument("--lock-text-unlocked", type=int, default=0, metavar="N", help="...but train its last N layers")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: every epoch)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between resumable checkpoints")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def train_options(args: argparse.Namespace) -> TrainOptions:
    """The `TrainOptions` of the command line (--wd and --local-gather are named otherwise than their fields)."""
    return options_from(args, TrainOptions, weight_decay=args.wd, gather_with_grad=not args.local_gather)


def _say(dist: DistInfo, message: str) -> None:
    if dist.is_main:
        print(message, file=sys.stderr, flush=True)


def _read(path: str, what: str, dist: DistInfo, t2s: bool = False):
    from cnclip.train.pairs import read_pairs, simplified_captions

    pairs, report = read_pairs(path)
    if t2s:
        pairs = simplified_captions(pairs)
    _say(dist, f"{what}: {len(pairs):,} pairs from {path}" + (", captions read as Simplified" if t2s else ""))
    if report.dropped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.problems.items()))
        _say(dist, f"{what}: left out {report.dropped} records ({reasons}); e.g. " + "; ".join(report.examples[:3]))
    return pairs, report


def _load(args: argparse.Namespace, resume_from: Path | None):
    from cnclip.model.checkpoint import DEFAULT_MODEL, MODEL_ENV, create_model, load_model

    if resume_from is not None:
        return load_model(resume_from)
    name = args.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL  # as every command that takes a model
    if args.from_scratch:
        torch.manual_seed(args.seed)
        return create_model(name)
    return load_model(name)


def _printer(dist: DistInfo):
    """Progress on stderr: on a terminal one self-rewriting bar line, in a log one line per report."""
    tty = sys.stderr.isatty()

    def show(event: dict) -> None:
        if not dist.is_main:
            return
        if event["kind"] == "train":
            step, total = event["step"], event["total_steps"]
            line = (
                f"step {step}/{total}  epoch {event['epoch']}  loss {event['loss']:.4f}  "
                f"lr {event['lr']:.2e}  scale {event['logit_scale']:.1f}  {event['pairs_per_s']:.1f} pairs/s"
            )
            if tty:
                filled = int(20 * step / max(total, 1))
                print(f"\r{'█' * filled}{'·' * (20 - filled)} {line} ", end="", file=sys.stderr, flush=True)
                if step == total:
                    print(file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        else:
            if tty:
                print(file=sys.stderr)
            t, i = event["t2i"], event["i2t"]
            print(
                f"eval step {event['step']}: text->image R@1 {t['R@1']:.3f} R@5 {t['R@5']:.3f} R@10 {t['R@10']:.3f} | "
                f"image->text R@1 {i['R@1']:.3f} R@5 {i['R@5']:.3f} R@10 {i['R@10']:.3f} | mean {event['MR']:.3f}",
                file=sys.stderr,
                flush=True,
            )

    return show


def train(args: argparse.Namespace, dist: DistInfo) -> dict:
    """Run training as `args` says; returns the summary written to out/summary.json."""
    out = Path(args.out)
    pairs, report = _read(args.train, "train", dist, args.t2s)
    val_pairs = _read(args.val, "val", dist, args.t2s)[0] if args.val else None
    resume_from = None if args.no_resume else find_checkpoint(out)
    model = _load(args, resume_from)
    trainer = Trainer(model, pairs, train_options(args), out, dist, on_event=_printer(dist))
    if resume_from is not None:
        trainer.restore(resume_from)
        _say(dist, f"resuming from {resume_from} at step {trainer.progress.step}")
    _say(
        dist,
        f"training {model.config.name or 'custom'} on {dist.device} x{dist.world_size}: {trainer.total_steps} steps of "
        f"{trainer.global_batch} pairs, precision {trainer.amp_dtype or torch.float32}",
    )
    evaluate = None
    if val_pairs is not None:
        from cnclip.model.encoder import Encoder
        from cnclip.train.evaluate import evaluate_pairs

        def evaluate(m):  # the trainer calls in with `m` in eval mode
            return evaluate_pairs(Encoder.build(m), val_pairs, batch_size=args.eval_batch_size)

    progress = trainer.run(evaluate)
    summary = {
        "steps": progress.step,
        "epochs": progress.epoch,
        "pairs_seen": progress.seen,
        "unreadable_images": progress.unreadable,
        "data_problems": report.problems,
        "best_step": progress.best_step,
        "best": next((e for e in progress.history if e["step"] == progress.best_step), None),
        "first_eval": progress.history[0] if progress.history else None,
        "options": asdict(trainer.opts),
    }
    if dist.is_main:
        atomic.write_text(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2))
        _plot(out)
        if progress.best_step == 0 and progress.step > 0:
            _say(
                dist,
                f"done, but nothing beat the starting weights on --val: {out / 'best'} is the model you started "
                f"from (resumable state in {out / 'last'}); try a lower --lr, more pairs or more --epochs",
            )
        else:
            _say(dist, f"done: {out / 'best'} (use it with --model), resumable state in {out / 'last'}")
    return summary


def _plot(out: Path) -> None:
    from cnclip.train.plot import plot_run

    events = [json.loads(line) for line in (out / METRICS_FILE).read_text("utf-8").splitlines() if line.strip()]
    plot_run(events, out / "plot.png")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        dist = init_distributed(args.device)
    except CNClipError as e:
        print(f"cnclip train: error: {e}", file=sys.stderr)
        return 1
    try:
        train(args, dist)
        return 0
    except CNClipError as e:
        print(f"cnclip train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cnclip train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        cleanup(dist)
