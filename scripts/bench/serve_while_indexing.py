"""Search latency of `cnclip serve` while `cnclip index` adds photos to the same index (issue 15).

For each size: an index holding SIZE vectors (synthetic clustered `--dim`-d vectors written straight
into the catalog, under a random-weight tiny-vit model whose projection is `--dim` wide, so the files
have the real size of a 512-d index), its vector file built and saved as `cnclip index` would;
then the real `cnclip serve` in a subprocess, `--clients` client threads sending text searches
(distinct queries, so the text tower runs) for `--idle` seconds, and again while the real
`cnclip index` embeds `--add` new generated photos into the same index (commits every batch).
Prints a Markdown table: p50/p99/max latency idle and during, requests, errors, how long the
index run took.

    nice .venv/bin/python scripts/bench/serve_while_indexing.py                    # 20k and 1M, ~15 min
    nice .venv/bin/python scripts/bench/serve_while_indexing.py --sizes 20000 --add 500

Clients, server and indexer share the machine: on 2 cores the indexer's model takes CPU from the
server, which is part of what is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import log, machine  # noqa: E402  (same folder)
from query import QUERIES  # noqa: E402
from serve_load import make_photos, start_server  # noqa: E402

CHUNK = 20_000


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors from a mixture of Gaussians in a 16-d subspace (ANN behaves as on real embeddings)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, 16)))
    centers = rng.standard_normal((1000, 16))
    x = (centers[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, 16))) @ basis.T
    x += 0.05 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(work: Path, size: int, dim: int) -> Path:
    """An index folder holding `size` synthetic vectors and its saved vector file."""
    import torch

    import cnclip
    from cnclip.index.catalog import NewFile
    from cnclip.model.config import get_model_config

    torch.manual_seed(0)
    base = get_model_config("tiny-vit")
    model = cnclip.create_model(dataclasses.replace(base, name=None, embed_dim=dim))
    model_dir = model.save_pretrained(work / "model")
    index_dir = work / "idx"
    started = time.perf_counter()
    with cnclip.Index.open(index_dir, model=str(model_dir), create=True) as index:
        scan = index.catalog.begin_scan()
        for start in range(0, size, CHUNK):
            vectors = clustered(min(CHUNK, size - start), dim, seed=start)
            rows = [
                NewFile(f"/synthetic/{start + i:08d}.jpg", 1000, 1, f"synthetic-{start + i}", vector=v)
                for i, v in enumerate(vectors)
            ]
            index.catalog.put_files(scan, rows)
        filled = time.perf_counter() - started
        with index.lock.hold():
            vectors = index.refresh()
    log(
        f"{size:,} vectors: catalog filled in {filled:.0f} s, {vectors.kind} vector index built and saved "
        f"in {time.perf_counter() - started - filled:.0f} s"
    )
    return index_dir


@dataclasses.dataclass
class Phase:
    latencies: list[float] = dataclasses.field(default_factory=list)
    started: list[float] = dataclasses.field(default_factory=list)  # perf_counter at each request's start
    errors: int = 0
    example: str = ""


def client(url: str, seed: int, phase: list[Phase], stop: threading.Event) -> None:
    rng, http = random.Random(seed), httpx.Client(base_url=url, timeout=120)
    while not stop.is_set():
        a, b = rng.sample(QUERIES, 2)
        started = time.perf_counter()
        try:
            r = http.get("/api/search", params={"q": f"{a}{b}{rng.randrange(1000)}", "k": 20})
            ok, why = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:120]}"
        except httpx.HTTPError as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        current = phase[-1]
        current.latencies.append(time.perf_counter() - started)
        current.started.append(started)
        if not ok:
            current.errors += 1
            current.example = current.example or why
    http.close()


def measure(index_dir: Path, photos: Path, clients: int, idle: float, batch: int) -> tuple[Phase, Phase, float, float]:
    proc, url = start_server(index_dir, None)
    try:
        httpx.get(f"{url}/api/search", params={"q": "海边", "k": 5}, timeout=600).raise_for_status()  # warm-up
        phases, stop = [Phase()], threading.Event()
        threads = [threading.Thread(target=client, args=(url, s, phases, stop)) for s in range(clients)]
        for t in threads:
            t.start()
        time.sleep(idle)
        phases.append(Phase())
        started = time.perf_counter()
        command = [sys.executable, "-m", "cnclip", "index", str(photos), "--index", str(index_dir), "-q"]
        out = subprocess.run([*command, "--batch-size", str(batch)], capture_output=True, text=True)
        took = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join()
        if out.returncode != 0:
            raise SystemExit(f"cnclip index failed:\n{out.stderr}")
        return phases[0], phases[1], took, started
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def row(size: int, name: str, phase: Phase, seconds: float) -> str:
    ms = np.asarray(phase.latencies) * 1000
    p50, p99, top = np.percentile(ms, 50), np.percentile(ms, 99), ms.max()
    rate = ms.size / seconds
    return f"| {size:,} | {name} | {ms.size:,} | {rate:.1f} | {p50:.1f} | {p99:.1f} | {top:.0f} | {phase.errors} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,1000000", help="vectors in the index before the run (comma list)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--add", type=int, default=2000, help="photos `cnclip index` adds during the run")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds measured before indexing starts")
    ap.add_argument("--batch-size", type=int, default=32, help="cnclip index --batch-size (one commit per batch)")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    lines = [
        f"Measured {dt.date.today()} on {machine()}.",
        "",
        f"`cnclip serve` ({args.clients} client threads, distinct text queries, k=20) while `cnclip index` adds "
        f"{args.add:,} generated photos (batch {args.batch_size}, a commit per batch); {args.dim}-d vectors.",
        "",
        "| vectors | phase | requests | req/s | p50 ms | p99 ms | max ms | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    with tempfile.TemporaryDirectory(prefix="cnclip-swi-", dir=args.work) as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.add, seed=7)
        for size in (int(s) for s in args.sizes.split(",")):
            work = Path(tmp) / f"n{size}"
            index_dir = build(work, size, args.dim)
            idle, during, took, t0 = measure(index_dir, photos, args.clients, args.idle, args.batch_size)
            lines += [row(size, "idle", idle, args.idle), row(size, "while indexing", during, took)]
            notes.append(f"{size:,}: `cnclip index` of {args.add:,} photos took {took:.0f} s during the load")
            slowest = sorted(zip(during.latencies, during.started, strict=True), reverse=True)[:3]
            notes.append(
                f"{size:,}: slowest requests while indexing started at "
                + ", ".join(f"{s - t0:.1f} s ({1000 * lat:.0f} ms)" for lat, s in slowest)
                + " after `cnclip index` started"
            )
            notes += [f"{size:,} error: {p.example}" for p in (idle, during) if p.example]
            shutil.rmtree(work, ignore_errors=True)  # 1M x 512-d is ~4 GB of catalog and vector file
    print("\n".join(lines + [""] + notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
