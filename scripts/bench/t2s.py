"""Does reading Traditional Chinese queries as Simplified help? Recall on Flickr8k-CN val.

The validation captions (Simplified, human-written) are converted to Traditional with OpenCC
`s2t`, as a user in Taiwan or Hong Kong would type them, and evaluated as typed and after
cnclip's `t2s` conversion (`cnclip.model.t2s.to_simplified`, what `cnclip search` does by
default). The original captions with and without `t2s` show what the conversion costs users who
type Simplified. Prints a Markdown table; recall in percent, text->image and image->text.

    nice .venv/bin/python scripts/bench/t2s.py --model runs/flickr8k/best

`--model`: a model fine-tuned on Flickr8k-CN (scripts/bench/train_flickr8k_cn.py writes one), or
any model `load_model` takes. The data (research-only licence) is read from ../shared and never copied.
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
from cnclip.model.t2s import to_simplified_all  # noqa: E402
from cnclip.train.evaluate import evaluate_pairs  # noqa: E402
from cnclip.train.pairs import Pair, read_pairs  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-cn"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model to evaluate (fine-tuned on Flickr8k-CN)")
    ap.add_argument("--data", type=Path, default=DATA / "val.jsonl", help="pairs file (default: Flickr8k-CN val)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found; pass --data FILE")
    import opencc

    pairs, _ = read_pairs(args.data)
    texts = [p.text for p in pairs]
    s2t = opencc.OpenCC("s2t")
    traditional = [s2t.convert(t) for t in texts]
    back = to_simplified_all(traditional)
    model = cnclip.load_encoder(args.model, device="cpu", backend="torch", precision="fp32")

    def with_texts(new: list[str]) -> list[Pair]:
        return [Pair(p.image, t) for p, t in zip(pairs, new, strict=True)]

    start = time.perf_counter()
    rows = [
        ("Simplified captions, as typed", texts),
        ("Simplified captions, t2s", to_simplified_all(texts)),
        ("Traditional (s2t) captions, as typed (--no-t2s)", traditional),
        ("Traditional (s2t) captions, t2s (the default)", back),
    ]
    results = [(name, evaluate_pairs(model, with_texts(new), args.batch_size)) for name, new in rows]
    wall = time.perf_counter() - start

    print(f"### Traditional Chinese queries, Flickr8k-CN val — {dt.date.today().isoformat()}\n")
    print(f"Machine: {machine()}. Model: {args.model}. Evaluation took {wall:.0f} s.\n")
    print("| captions | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | MR |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, e in results:
        cells = [e["t2i"][k] for k in ("R@1", "R@5", "R@10")] + [e["i2t"][k] for k in ("R@1", "R@5", "R@10")]
        print(f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + f" | {100 * e['MR']:.1f} |")
    changed = sum(a != b for a, b in zip(texts, traditional, strict=True))
    same_back = sum(a == b for a, b in zip(texts, back, strict=True))
    touched = sum(a != b for a, b in zip(texts, to_simplified_all(texts), strict=True))
    tokenizer = model.tokenizer
    unk = tokenizer.convert_tokens_to_ids(["[UNK]"])[0]
    unknown = sum(tokenizer.encode(t).count(unk) for t in traditional)
    print(
        f"\n{len(texts):,} captions of {results[0][1]['images']:,} images: s2t changed {changed:,} of them; "
        f"t2s gave back the original for {same_back:,}; t2s altered {touched:,} of the Simplified originals; "
        f"the Traditional captions hold {unknown:,} [UNK] tokens."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
