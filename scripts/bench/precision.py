"""Does bf16 keep fp32's search results? Recall and top-10 overlap on Flickr8k-CN val.

`cnclip.train.evaluate.compare_precisions`: the validation pairs embedded with both towers in
fp32, both in bf16, and mixed each way (an index built in one precision, searched in the other);
text->image and image->text Recall@1/5/10 for each, and the mean share of each caption's top-10
images that agrees with the fp32 ranking. The rule cnclip's "auto" follows on AMX CPUs: bf16 is
fine when recall moves by less than 0.5 point and the top-10 overlap is >= 0.95.

    nice .venv/bin/python scripts/bench/precision.py --model runs/flickr8k/best

On a CPU without AMX or AVX-512 BF16, bf16 is emulated (slow, same numbers). `--precision int8`
checks the quantized image tower of `--precision int8` (its text tower stays fp32, so the rows
with int8 text repeat the fp32 ones). The data
(research-only licence) is read from ../shared and never copied.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import machine  # noqa: E402

import cnclip  # noqa: E402
from cnclip.train.evaluate import compare_precisions  # noqa: E402
from cnclip.train.pairs import read_pairs  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-cn"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model to evaluate (fine-tuned on Flickr8k-CN)")
    ap.add_argument("--data", type=Path, default=DATA / "val.jsonl", help="pairs file (default: Flickr8k-CN val)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "int8"))
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found; pass --data FILE")
    pairs, _ = read_pairs(args.data)
    model = cnclip.load_model(args.model)
    start = time.perf_counter()
    result = compare_precisions(model, pairs, args.precision, args.batch_size)
    wall = time.perf_counter() - start

    print(f"### {args.precision} against fp32, Flickr8k-CN val — {dt.date.today().isoformat()}\n")
    print(f"Machine: {machine()}. Model: {args.model}. {len(pairs):,} captions; took {wall:.0f} s.\n")
    print("| towers | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | MR | top-10 overlap with fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = result["fp32"]
    worst = 0.0
    for name, e in result.items():
        cells = [e["t2i"][k] for k in ("R@1", "R@5", "R@10")] + [e["i2t"][k] for k in ("R@1", "R@5", "R@10")]
        base_cells = [base["t2i"][k] for k in ("R@1", "R@5", "R@10")] + [base["i2t"][k] for k in ("R@1", "R@5", "R@10")]
        worst = max(worst, *(abs(a - b) for a, b in zip(cells, base_cells, strict=True)))
        print(
            f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + f" | {100 * e['MR']:.1f} | "
            f"{e['top10_overlap']:.3f} |"
        )
    lowest = min(e["top10_overlap"] for e in result.values())
    verdict = "passes" if 100 * worst < 0.5 and lowest >= 0.95 else "fails"
    print(
        f"\nLargest recall change: {100 * worst:.2f} points; lowest top-10 overlap: {lowest:.3f}. "
        f"The rule (< 0.5 point, >= 0.95) {verdict}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
