"""End-to-end query latency: `Index.search_text` (text encoding + vector search + catalog lookup).

Fills a real index folder (SQLite catalog + derived FAISS file) with `--n` synthetic image
vectors drawn from the same clustered distribution as `ann.py`, then times Chinese text queries
through `cnclip.Index.search_text`, the call `cnclip search` makes, one query per call. The model
is the full ViT-B-16 shape with random weights by default: latency depends on the shape, not on
the weights.

    nice .venv/bin/python scripts/bench/query.py --n 1000000          # ~5 minutes, ~6 GB disk
    nice .venv/bin/python scripts/bench/query.py --n 1000000 --keep /var/tmp/q1m   # reuse next time

Prints a Markdown table: p50/p95 of the whole call and of its parts (text encoding, vector search),
with the text tower run by torch and then by ONNX Runtime (`Encoder.build(model, onnx_towers=("text",))`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import Mixture, log, machine  # noqa: E402  (same folder: the shared data generator)

import cnclip  # noqa: E402
from cnclip.index.catalog import NewFile  # noqa: E402

# Real queries people type into photo search: 2 to ~20 characters, a few mixed with English.
QUERIES = [
    "猫", "海边的日落", "一只在沙发上睡觉的橘猫", "雪山", "生日蛋糕和蜡烛", "穿红色衣服的小女孩",
    "城市夜景", "下雨天的街道", "一群人在草地上踢足球", "厨房", "我家的狗在公园里奔跑", "婚礼",
    "长城", "桌子上的笔记本电脑", "iPhone 截图", "黑白老照片", "樱花树下的自行车", "早餐",
    "海滩上的脚印", "两个孩子在玩水", "夕阳下的剪影", "西湖", "山顶上的云海和日出", "合影",
    "一碗热腾腾的牛肉面", "地铁站", "宝宝的第一次生日派对", "红叶", "高速公路上的车流", "书架",
    "在雪地里堆雪人的一家人", "火锅", "故宫的红墙", "公园里的长椅", "小狗 puppy", "风筝",
]  # fmt: skip


def fill_catalog(folder: Path, model: cnclip.CNClipModel, n: int, mix: Mixture) -> None:
    with cnclip.Index.open(folder, model=model, create=True) as index:
        have = index.catalog.count()
        if have == n:
            log(f"catalog in {folder} already holds {n:,} vectors")
            return
        if have:
            raise SystemExit(f"{folder} holds {have:,} vectors, not {n:,}; pass another --keep folder")
        scan = index.catalog.begin_scan()
        t = time.perf_counter()
        step = 50_000
        for start in range(0, n, step):
            vectors = mix.sample(min(step, n - start), stream=10 + start // step)
            rows = [
                NewFile(f"/bench/photos/{start + i:08d}.jpg", 1, 1, f"{start + i:032x}", vector=v)
                for i, v in enumerate(vectors)
            ]
            index.catalog.put_files(scan, rows)
            log(f"catalog: {start + len(rows):,}/{n:,} after {time.perf_counter() - t:.0f} s")


def time_queries(index: cnclip.Index, encoder: cnclip.Encoder, vectors, rounds: int):
    """(whole call, text encoding, vector search) seconds per query, one query per call."""
    for q in QUERIES[:5]:  # warm-up: first calls allocate and page in
        index.search_text(q)
    total, encode, search = [], [], []
    for _ in range(rounds):
        for q in QUERIES:
            t0 = time.perf_counter()
            index.search_text(q, k=10)
            t1 = time.perf_counter()
            v = encoder.embed_texts([q])
            t2 = time.perf_counter()
            vectors.search(v, 10)
            t3 = time.perf_counter()
            total.append(t1 - t0)
            encode.append(t2 - t1)
            search.append(t3 - t2)
    return total, encode, search


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="indexed image vectors")
    ap.add_argument("--model", default="ViT-B-16", help="zoo shape (random weights) or a checkpoint path")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the query list")
    ap.add_argument("--keep", type=Path, help="index folder to create or reuse (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if Path(args.model).exists():
        model = cnclip.load_model(args.model)
    else:
        torch.manual_seed(0)
        model = cnclip.create_model(args.model)
    model.eval()
    mix = Mixture(model.embed_dim, 5000, 64, 0.5, 0.05, 0)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="cnclip-query-bench-", dir="/var/tmp"))
    try:
        fill_catalog(folder, model, args.n, mix)
        runs = {}
        for runtime in ("torch", "onnxruntime"):
            encoder = cnclip.Encoder.build(model, onnx_towers=("text",) if runtime == "onnxruntime" else ())
            if runtime == "onnxruntime":
                t = time.perf_counter()
                encoder.embed_texts(QUERIES[:1])
                log(f"text tower exported / loaded for ONNX Runtime in {time.perf_counter() - t:.1f} s")
            with cnclip.Index.open(folder, model=encoder) as index:
                t = time.perf_counter()
                vectors = index.refresh()
                log(f"vector index ready in {time.perf_counter() - t:.1f} s: {vectors.info()}")
                runs[runtime] = time_queries(index, encoder, vectors, args.rounds)
            log(f"{runtime}: p50 {np.median(runs[runtime][0]) * 1e3:.1f} ms")
            check = encoder.embed_texts(QUERIES)
            if runtime == "torch":
                reference = check
        cosine = float((reference * check).sum(axis=1).min())
        info = vectors.info()
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    params = info["params"]
    kind = info["kind"] + (f" nlist={params['nlist']} nprobe={params['nprobe']}" if "nprobe" in params else "")
    recall = "" if info["recall_at_10"] is None else f"{info['recall_at_10']:.3f}"
    print(f"### {args.n:,} indexed vectors, {args.model} text tower — {dt.date.today().isoformat()}\n")
    print(f"Machine: {machine()}; torch {torch.__version__}, {args.threads} threads, {model.dtype}.\n")
    print(f"Index: {kind}; recall@10 measured at build {recall}; {len(QUERIES) * args.rounds} queries, one per call.")
    print(f"Text embeddings, ONNX Runtime vs torch: lowest cosine over {len(QUERIES)} queries {cosine:.7f}.\n")
    print("| text tower runs on | `Index.search_text` p50 ms | p95 ms | text encoding p50 ms | vector search p50 ms |")
    print("|---|---:|---:|---:|---:|")
    for runtime, (total, encode, search) in runs.items():
        p50, p95 = percentiles(total)
        print(f"| {runtime} | {p50:.1f} | {p95:.1f} | {percentiles(encode)[0]:.1f} | {percentiles(search)[0]:.1f} |")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
