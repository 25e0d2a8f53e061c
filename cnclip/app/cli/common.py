"""What the command modules share: the JSON printer, progress and download bars, argument types, and the
options several commands take (--index, --model, --no-t2s, how the model runs)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

Subparsers = argparse._SubParsersAction  # what add_subparsers gives: each command module adds its parsers to it

MODEL_HELP = (
    "zoo name (ViT-B-16, ...), official .pt, safetensors file, model folder or Hugging Face id "
    "(default: $CNCLIP_MODEL, then ViT-B-16)"
)
INDEX_HELP = (
    "index folder (default: $CNCLIP_INDEX, then ./index/default where it exists, then the per-user "
    "index, ~/.local/share/cnclip/index/default on Linux)"
)
WAIT_HELP = "if another process is writing the index, wait up to this long for it (default 0: say so and stop)"
WATCH_POLL_HELP = (
    "with --watch: look for changes every SECONDS instead of waiting for the system's file events "
    "(network drives: NFS, SMB, where those do not arrive)"
)


def as_json(value: object) -> str:
    """JSON with Chinese kept readable; file names that are not UTF-8 (lone surrogates in Python)
    become \\udcXX escapes, so the output is valid UTF-8 and json.loads gives back the same str."""
    text = json.dumps(value, ensure_ascii=False)
    return re.sub("[\udc80-\udcff]", lambda m: f"\\u{ord(m.group()):04x}", text)


def say(message: str, flush: bool = False) -> None:
    """One line on stderr, where progress, notes and warnings go (results go to stdout)."""
    print(message, file=sys.stderr, flush=flush)


def duration(seconds: float) -> str:
    """M:SS, or H:MM:SS from an hour on."""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class ProgressBar:
    """One self-rewriting stderr line: done/total, images per second and time left."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.start = time.monotonic()

    def __call__(self, p) -> None:
        if not self.enabled or p.total == 0:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = p.done / elapsed
        eta = (p.total - p.done) / rate if rate > 0 else 0
        width = 28
        filled = int(width * p.done / p.total)
        bar = "█" * filled + "·" * (width - filled)
        print(
            f"\r{self.label} {bar} {p.done}/{p.total}  {rate:5.1f} img/s  ETA {duration(eta)} ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def progress_bar(label: str, args: argparse.Namespace) -> ProgressBar:
    """The bar of a command with -q/--quiet: shown on a terminal only."""
    return ProgressBar(label, enabled=not args.quiet and sys.stderr.isatty())


class DownloadBar:
    """One self-rewriting stderr line for a weights download: size, speed and time left."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start: tuple[float, int] | None = None  # when the bar began and the bytes already there (a resume)
        self.shown = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self.start = self.start or (now, done)
        finished = total is not None and done >= total
        if not finished and now - self.shown < 0.2:
            return
        self.shown = now
        rate = (done - self.start[1]) / max(now - self.start[0], 1e-9)
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
        eta = f"  ETA {duration((total - done) / rate)}" if total and rate > 0 else ""
        print(f"\rdownloading weights {size}  {rate / 1e6:.1f} MB/s{eta} ", end="", file=sys.stderr, flush=True)
        if finished:
            print(file=sys.stderr)
            self.start = None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def at_least_zero(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def above_zero(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def add_index_option(p: argparse.ArgumentParser, help: str = INDEX_HELP) -> None:
    p.add_argument("--index", help=help)


def add_model_option(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", help=help)


def add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=at_least_zero, default=0.0, metavar="SECONDS", help=WAIT_HELP)


def add_watch_poll_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch-poll", type=above_zero, metavar="SECONDS", help=WATCH_POLL_HELP)


def add_no_t2s(p: argparse.ArgumentParser, what: str = "queries") -> None:
    p.add_argument(
        "--no-t2s",
        dest="t2s",
        action="store_const",
        const=False,
        default=None,
        help=f"keep {what} as typed (default: Traditional Chinese is read as Simplified, OpenCC t2s; $CNCLIP_T2S=0 "
        "turns that off everywhere)",
    )


def add_runtime_options(p: argparse.ArgumentParser, backend: str | None = None) -> None:
    """--device / --backend / --precision; `backend` is the command's default (None: $CNCLIP_BACKEND, then auto)."""
    g = p.add_argument_group("how the model runs")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: $CNCLIP_DEVICE, then cuda when a GPU is visible)")
    g.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default=backend,
        help="auto: on CPUs both towers in ONNX Runtime when it is installed (same output; text 2-3x, images "
        "~1.3x faster; exported once per model), else PyTorch; onnx: ONNX Runtime or an error; torch: PyTorch"
        + ("" if backend is None else f" (default here: {backend}: one image does not pay back exporting the model)"),
    )
    g.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        help="auto: fp16 on GPUs; on CPUs with AMX or AVX-512 BF16 the fastest of fp32 and bf16 per tower, measured "
        "once per model (bf16 only where it ranks as fp32 does); fp32 on other CPUs. int8: images through a "
        "quantized image tower in ONNX Runtime (CPU only; embeddings close to fp32, not equal), text in fp32",
    )


def runtime(args: argparse.Namespace):
    """The `Runtime` that --device / --backend / --precision ask for."""
    from cnclip.model.runtime import Runtime

    chosen = Runtime.resolve(args.device, args.backend, args.precision)
    if chosen.calibrate:  # say so when a one-time measurement makes this command wait
        from cnclip.model import calibrate

        calibrate.notify = lambda message: say(message, flush=True)
    return chosen


def print_watch_batch(batch, json_out: bool = False) -> None:
    """One stderr line per batch of watched changes that changed something (and its JSON on stdout with --json)."""
    for item in batch.summary.skipped:
        say(f"watch: skipped {item['path']}: {item['reason']}")
    for item in batch.summary.offline:
        say(f"watch: offline {item['path']}: {item['reason']}; {item['files']} files kept")
    line = batch.describe()
    if line:
        say(f"watch: {line}", flush=True)
        if json_out:
            print(as_json(batch.to_dict()), flush=True)
