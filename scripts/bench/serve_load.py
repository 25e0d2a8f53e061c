"""Load on `cnclip serve`: N concurrent clients on loopback for a fixed time, a mix of requests.

Builds an index of `--photos` generated images with a random-weight model (`tiny-vit` by default;
latency depends on the model's shape, not its weights), starts the real `cnclip serve` in a
subprocess on a free loopback port, and runs `--clients` client threads (one keep-alive
connection each) for `--seconds`: text searches (mostly distinct queries, so the text tower runs),
thumbnails of earlier results, image searches by upload and health checks, in the `--mix`
proportions. Prints a Markdown table of requests/s, p50/p99 latency and errors per kind.

    nice .venv/bin/python scripts/bench/serve_load.py                           # ~1 minute
    nice .venv/bin/python scripts/bench/serve_load.py --model ViT-B-16 --photos 200
    .venv/bin/python scripts/bench/serve_load.py --url http://127.0.0.1:8000 --token T   # a running server

Clients and server share the machine: on 2 cores the clients' own work (one Python process)
takes CPU from the server, so the figures are a floor for what a separate client would see.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import log, machine  # noqa: E402  (same folder)
from query import QUERIES  # noqa: E402

KINDS = ("text", "thumb", "image", "health")


@dataclass
class Tally:
    """Latencies (seconds) and failures of one request kind, across all clients."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    examples: list[str] = field(default_factory=list)


def photo_jpeg(rng: np.random.Generator, size: tuple[int, int] = (320, 240)) -> bytes:
    """A smooth random JPEG (a colour, a gradient, some noise), different for every draw."""
    width, height = size
    base = rng.integers(0, 256, size=3)
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(-120, 120, size=3)
    arr = base + ramp + rng.integers(-30, 30, size=(height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=88)
    return out.getvalue()


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"photo{i:05d}.jpg").write_bytes(photo_jpeg(rng))


def build_index(folder: Path, model_name: str, photos: int) -> Path:
    import torch

    import cnclip

    index = folder / "idx"
    if (index / "catalog.sqlite3").exists():
        log(f"reusing the index in {index}")
        return index
    torch.manual_seed(0)
    model_dir = cnclip.create_model(model_name).save_pretrained(folder / "model")
    make_photos(folder / "photos", photos)
    started = time.perf_counter()
    with cnclip.Index.open(index, model=str(model_dir), create=True) as ix:
        summary = ix.add_folder(folder / "photos")
    log(f"indexed {summary.added} photos with {model_name} in {time.perf_counter() - started:.1f} s")
    return index


def start_server(index: Path, backend: str | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "cnclip", "serve", "--index", str(index), "--port", "0"]
    if backend:
        command += ["--backend", backend]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, CNCLIP_TOKEN=""))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r" at (http://\S+?/)", line)
        if found:
            # keep draining stderr so the server never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1).rstrip("/")
    raise SystemExit("cnclip serve did not start:\n" + "".join(lines))


class Client:
    """One simulated user: a keep-alive connection, its own random stream."""

    def __init__(self, url: str, token: str | None, mix: dict[str, float], upload: bytes, seed: int):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60)
        self.kinds, self.weights = list(mix), list(mix.values())
        self.upload, self.rng = upload, random.Random(seed)
        self.ids: list[int] = [1]

    def request(self, kind: str) -> httpx.Response:
        if kind == "text":
            # two phrases and a number: almost every query is new, so the text tower runs
            a, b = self.rng.sample(QUERIES, 2)
            r = self.http.get("/api/search", params={"q": f"{a}{b}{self.rng.randrange(100)}", "k": 20})
            if r.status_code == 200:
                self.ids = [h["id"] for h in r.json()["results"]] or self.ids
            return r
        if kind == "thumb":
            return self.http.get(f"/api/thumb/{self.rng.choice(self.ids)}")
        if kind == "image":
            return self.http.post("/api/search/image", files={"file": ("q.jpg", self.upload, "image/jpeg")})
        return self.http.get("/api/health")

    def run(self, until: float, tallies: dict[str, Tally], lock: threading.Lock) -> None:
        while time.perf_counter() < until:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            started = time.perf_counter()
            try:
                r = self.request(kind)
                ok, why = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:120]}"
            except httpx.HTTPError as e:
                ok, why = False, f"{type(e).__name__}: {e}"
            elapsed = time.perf_counter() - started
            with lock:
                tally = tallies[kind]
                tally.latencies.append(elapsed)
                if not ok:
                    tally.errors += 1
                    if len(tally.examples) < 3:
                        tally.examples.append(why)
        self.http.close()


def run_load(url: str, token: str | None, clients: int, seconds: float, mix: dict[str, float]) -> dict[str, Tally]:
    upload = photo_jpeg(np.random.default_rng(123), (640, 480))  # a phone-sized query would be slower to decode
    workers = [Client(url, token, mix, upload, seed) for seed in range(clients)]
    for kind in KINDS:  # warm-up: one of each, not counted
        workers[0].request(kind).raise_for_status()
    tallies: dict[str, Tally] = defaultdict(Tally)
    lock = threading.Lock()
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=w.run, args=(until, tallies, lock)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tallies


def row(name: str, tally: Tally, seconds: float, total: int) -> str:
    ms = np.asarray(tally.latencies) * 1000
    p50, p99 = (np.percentile(ms, 50), np.percentile(ms, 99)) if ms.size else (float("nan"),) * 2
    share = 100 * ms.size / max(total, 1)
    rate = ms.size / seconds
    return f"| {name} | {share:.0f} % | {ms.size:,} | {rate:,.1f} | {p50:.1f} | {p99:.1f} | {tally.errors} |"


def report(tallies: dict[str, Tally], seconds: float, clients: int, health: dict) -> str:
    total = sum(len(t.latencies) for t in tallies.values())
    everything = Tally(
        latencies=[x for t in tallies.values() for x in t.latencies], errors=sum(t.errors for t in tallies.values())
    )
    model = (health.get("model") or {}).get("name") or "?"
    lines = [
        f"Measured {dt.date.today()} on {machine()}.",
        "",
        f"Server: `cnclip serve`, {health.get('count', '?'):,} images, model {model} (random weights), "
        f"{health.get('runtime', '?')}. Clients: {clients} threads in one process on loopback, {seconds:g} s.",
        "",
        "| request | share | requests | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(kind, tallies[kind], seconds, total) for kind in KINDS if kind in tallies]
    lines.append(row("**all**", everything, seconds, total))
    for kind, tally in tallies.items():
        for example in tally.examples:
            lines.append(f"\n{kind} error: {example}")
    return "\n".join(lines)


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in KINDS:
            raise SystemExit(f"--mix: unknown request kind {kind!r}; use {', '.join(KINDS)}")
        mix[kind] = float(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--mix", default="text=70,thumb=20,image=5,health=5", help="request kinds and their weights")
    ap.add_argument("--photos", type=int, default=500, help="generated photos in the index")
    ap.add_argument("--model", default="tiny-vit", help="zoo shape with random weights (tiny-vit, ViT-B-16, ...)")
    ap.add_argument("--backend", choices=("auto", "torch", "onnx"), help="passed to cnclip serve (default: auto)")
    ap.add_argument("--keep", type=Path, help="build (or reuse) the index in this folder instead of a temporary one")
    ap.add_argument("--url", help="load a server that is already running instead (no index is built)")
    ap.add_argument("--token", help="with --url: the server's token")
    args = ap.parse_args(argv)

    mix = parse_mix(args.mix)
    proc = None
    with tempfile.TemporaryDirectory(prefix="cnclip-serve-load-") as tmp:
        url = args.url
        if url is None:
            index = build_index(args.keep or Path(tmp), args.model, args.photos)
            proc, url = start_server(index, args.backend)
            log(f"server up at {url}")
        try:
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            health = httpx.get(f"{url}/api/health", headers=headers).json()
            log(f"{args.clients} clients for {args.seconds:g} s ...")
            tallies = run_load(url, args.token, args.clients, args.seconds, mix)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    print(report(tallies, args.seconds, args.clients, health))
    return 0


if __name__ == "__main__":
    sys.exit(main())
