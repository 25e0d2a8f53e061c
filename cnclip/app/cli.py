"""The `cnclip` command: the only place that parses argv, prints and exits."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cnclip import faults
from cnclip.errors import CNClipError
from cnclip.userpath import expand_user

MODEL_HELP = (
    "zoo name (ViT-B-16, ...), official .pt, safetensors file, model folder or Hugging Face id "
    "(default: $CNCLIP_MODEL, then ViT-B-16)"
)


WAIT_HELP = "if another process is writing the index, wait up to this long for it (default 0: say so and stop)"
WATCH_POLL_HELP = (
    "with --watch: look for changes every SECONDS instead of waiting for the system's file events "
    "(network drives: NFS, SMB, where those do not arrive)"
)


SEARCH_EPILOG = """combined queries:
  One text or one --image searches as it is. Anything more is combined on the unit embeddings:
  the sum of weight x unit vector over the terms, renormalized (a subtracted term's weight is
  negative; the default weight is 1).
    cnclip search "猫 + 狗 - 草地"            + and - with a space on both sides split the text
    cnclip search "海边" --image ref.jpg      a text and an image together
    cnclip search "猫" --not "狗" --not 室内   --not subtracts a text (repeatable)
    cnclip search "日落 + 夜景:0.5"           a term ending in :NUMBER has that weight (above 0)
    cnclip search --image a.jpg --image b.jpg:2 --not-image c.jpg
  Indexed query images are left out of the results unless --include-self. A combination that
  cancels out (猫 - 猫) is an error. "Wi-Fi" or "C++" are plain text: no spaces around them."""


def _json(value: object) -> str:
    """JSON with Chinese kept readable; file names that are not UTF-8 (lone surrogates in Python)
    become \\udcXX escapes, so the output is valid UTF-8 and json.loads gives back the same str."""
    text = json.dumps(value, ensure_ascii=False)
    return re.sub("[\udc80-\udcff]", lambda m: f"\\u{ord(m.group()):04x}", text)


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
        print(_json(rows))
        return 0
    for r in rows:
        tower = f"{r['image_tower']}\ttext {r['text_layers']} layers"
        print(f"{r['name']}\tembed {r['embed_dim']}\t{r['resolution']}px\t{tower}\t{r['hub'] or '-'}")
    return 0


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
    print(f"wrote {dst} ({model.config.name or 'custom shape'}, {kind} format)", file=sys.stderr)
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from cnclip.model.checkpoint import load_model
    from cnclip.model.onnx_export import export_onnx

    model = load_model(args.model)
    for tower, path in export_onnx(model, args.out, tuple(args.towers.split(","))).items():
        print(f"wrote {path} ({tower} tower, dynamic batch axis)", file=sys.stderr)
    return 0


class _ProgressBar:
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
            f"\r{self.label} {bar} {p.done}/{p.total}  {rate:5.1f} img/s  ETA {_duration(eta)} ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


class _DownloadBar:
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
        eta = f"  ETA {_duration((total - done) / rate)}" if total and rate > 0 else ""
        print(f"\rdownloading weights {size}  {rate / 1e6:.1f} MB/s{eta} ", end="", file=sys.stderr, flush=True)
        if finished:
            print(file=sys.stderr)
            self.start = None


def _take_weights_source(argv: list[str]) -> list[str]:
    """argv without `--weights-source LIST`, which may stand anywhere; LIST goes into $CNCLIP_WEIGHTS_SOURCE so
    that every model load, in this process and those it starts (cnclip train, Ray workers), uses it."""
    from cnclip.model.download import SOURCES_ENV, parse_sources

    rest, i = [], 0
    while i < len(argv):
        if argv[i] == "--weights-source" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith("--weights-source="):
            value, i = argv[i].partition("=")[2], i + 1
        else:
            rest.append(argv[i])
            i += 1
            continue
        parse_sources(value)  # a bad LIST stops here, before any work
        os.environ[SOURCES_ENV] = value
    return rest


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def _interval(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text}")
    return value


def _add_no_t2s(p: argparse.ArgumentParser, what: str = "queries") -> None:
    p.add_argument(
        "--no-t2s",
        dest="t2s",
        action="store_const",
        const=False,
        default=None,
        help=f"keep {what} as typed (default: Traditional Chinese is read as Simplified, OpenCC t2s; $CNCLIP_T2S=0 "
        "turns that off everywhere)",
    )


def _add_runtime_options(p: argparse.ArgumentParser, backend: str | None) -> None:
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


def _runtime(args: argparse.Namespace):
    from cnclip.model.runtime import Runtime

    runtime = Runtime.resolve(args.device, args.backend, args.precision)
    if runtime.calibrate:  # say so when a one-time measurement makes this command wait
        from cnclip.model import calibrate

        calibrate.notify = lambda message: print(message, file=sys.stderr, flush=True)
    return runtime


def _cmd_index(args: argparse.Namespace) -> int:
    from cnclip.index.folder import Index

    if args.folder is not None and not expand_user(args.folder).is_dir() and not _known_folder(args):
        raise CNClipError(f"{args.folder} is not a folder; give the folder of images to index")
    if args.folder is None and not args.texts:
        raise CNClipError("nothing to index; give a folder of images and/or --texts FILE")
    if args.watch and (args.folder is None or args.ray or args.address):
        raise CNClipError("--watch needs the FOLDER to watch, and embeds in this process: drop --ray")
    if args.watch_poll and not args.watch:
        raise CNClipError("--watch-poll sets how --watch looks for changes; add --watch")
    from cnclip.train.data import read_lines

    texts = read_lines(args.texts) if args.texts else None
    runtime = _runtime(args)
    opened = (
        Index.open(args.index, model=args.model, create=True, runtime=runtime, vector_kind=args.vector_index)
        if args.model
        else _open_for_indexing(args, runtime)
    )
    with opened as index:
        if texts is not None:
            added = index.add_texts(texts, collection=args.collection)
            print(
                f"added {added} new texts ({len(texts) - added} already present) to {index.catalog.folder}",
                file=sys.stderr,
            )
            if args.json:
                print(_json({"texts_added": added}))
        if args.folder is None:
            return 0
        bar = _ProgressBar("embedding", enabled=not args.quiet and sys.stderr.isatty())
        try:
            summary = index.add_folder(
                args.folder,
                progress=bar,
                ray=_ray_options(args),
                wait=args.wait,
                **_scan_options(args),
            )
        finally:
            bar.close()
        _prepare_text_search(index, runtime, quiet=args.quiet)
        model = index.model if args.watch else None
    for item in summary.skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    for item in summary.offline:
        print(
            f"offline {item['path']}: {item['reason']}; {item['files']} files kept, left out of searches until "
            "it is back (--prune removes them)",
            file=sys.stderr,
        )
    if args.json:
        print(_json(summary.to_dict()))
    else:
        offline = sum(item["files"] for item in summary.offline)
        print(
            f"{summary.added} added, {summary.updated} updated, {summary.removed} removed, "
            f"{summary.unchanged} unchanged, {len(summary.skipped)} skipped"
            + (f", {offline} offline" if offline else "")
            + f" ({summary.embedded} embedded, {summary.reused} reused)",
            file=sys.stderr,
        )
    return _watch(args, index.catalog.folder, model) if args.watch else 0


def _scan_options(args: argparse.Namespace) -> dict:
    """The `Indexer` options of `cnclip index` (its first pass and the watching after it)."""
    options = {"batch_size": args.batch_size, "include_hidden": args.hidden, "draft": not args.exact_decode}
    return options | {"prune": args.prune} | ({"max_pixels": args.max_pixels} if args.max_pixels else {})


def _print_watch_batch(batch, as_json: bool = False) -> None:
    """One stderr line per batch that changed something (and its JSON on stdout with --json)."""
    for item in batch.summary.skipped:
        print(f"watch: skipped {item['path']}: {item['reason']}", file=sys.stderr)
    for item in batch.summary.offline:
        print(f"watch: offline {item['path']}: {item['reason']}; {item['files']} files kept", file=sys.stderr)
    line = batch.describe()
    if line:
        print(f"watch: {line}", file=sys.stderr, flush=True)
        if as_json:
            print(_json(batch.to_dict()), flush=True)


def _watch(args: argparse.Namespace, index_folder, model) -> int:
    """`cnclip index DIR --watch` after its first pass: apply changes as they happen, until Ctrl+C."""
    from cnclip.index.watch import Watcher

    watcher = Watcher(
        index_folder,
        [args.folder],
        model=model,
        poll=args.watch_poll,
        on_batch=lambda batch: _print_watch_batch(batch, args.json),
        on_error=lambda e: print(f"watch: {e}", file=sys.stderr, flush=True),
        **_scan_options(args),
    ).start()
    print(f"watching {args.folder} for changes (Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        while not watcher.wait(1.0):
            pass
    except KeyboardInterrupt:
        print("watch: stopping (Ctrl+C again quits at once; the next run picks up the rest)", file=sys.stderr)
    finally:
        watcher.stop()
    if watcher.error is not None:
        raise CNClipError(f"watching {args.folder} stopped: {watcher.error}") from watcher.error
    return 0


def _known_folder(args: argparse.Namespace) -> bool:
    """Whether the index already holds files from `args.folder` (a drive not mounted is not a typo)."""
    from cnclip.index.catalog import Catalog
    from cnclip.index.folder import default_index_path

    try:
        with Catalog.open(args.index or default_index_path()) as catalog:
            return catalog.has_files_under(os.path.abspath(expand_user(args.folder)))
    except CNClipError:
        return False


def _cmd_gc(args: argparse.Namespace) -> int:
    from cnclip.index.catalog import Catalog
    from cnclip.index.folder import default_index_path
    from cnclip.index.lock import WriterLock

    folder = args.index or default_index_path()
    with Catalog.open(folder) as catalog, WriterLock(folder).hold(args.wait):
        removed = catalog.collect_garbage(args.older_than * 86400)
        left = catalog.unused_vectors()
        offline = catalog.offline_count()  # their vectors are in use: gc never touches them
    if args.json:
        print(_json({"vectors_removed": removed, "unused_vectors_left": left, "offline_files_kept": offline}))
        return 0
    print(f"removed {removed} unused vectors from {folder} ({left} younger ones kept)", file=sys.stderr)
    if offline:
        print(
            f"kept the vectors of {offline} offline files (a drive or folder that could not be seen); "
            "they return when it is back, or go with `cnclip index DIR --prune`",
            file=sys.stderr,
        )
    return 0


def _cmd_dupes(args: argparse.Namespace) -> int:
    from cnclip.index.dupes import check_threshold, find_duplicates
    from cnclip.index.folder import Index
    from cnclip.index.scan import Progress

    threshold = check_threshold(args.threshold)  # before opening anything
    bar = _ProgressBar("comparing", enabled=not args.quiet and sys.stderr.isatty())
    with Index.open(args.index) as index:
        try:
            report = find_duplicates(index, threshold, limit=args.limit, progress=lambda d, t: bar(Progress(d, t)))
        finally:
            bar.close()
    if args.html:
        print(f"wrote {_write_dupes_html(report, args.html)}", file=sys.stderr)
    if args.json:
        print(_json(report.to_dict()))
    else:
        for number, group in enumerate(report.groups, 1):
            print(f"group {number}: {group.size} photos" + (f", {len(group.members)} listed" if group.capped else ""))
            for i, m in enumerate(group.members):
                size = f"{m.width}x{m.height}" if m.pixels else "?x?"
                print(f"{'*' if i == 0 else ' '} {m.similarity:.4f}\t{size}\t{m.bytes}\t{m.path}")
            print()
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    listed = " in the groups listed" if len(report.groups) < report.total_groups else ""
    print(
        f"{report.total_groups} groups of near-duplicates among {report.files} photos at threshold {threshold:g}: "
        f"{report.duplicates} photos besides the best copies{listed} (* marks them: most pixels, then bytes, then "
        "oldest). Nothing was deleted or moved.",
        file=sys.stderr,
    )
    return 0


def _write_dupes_html(report, out: str) -> Path:
    from cnclip.app.gallery import GalleryItem, write_groups_html

    sections = []
    for number, group in enumerate(report.groups, 1):
        heading = f"第 {number} 组 · {group.size} 张" + (f"（列出 {len(group.members)} 张）" if group.capped else "")
        items = [
            GalleryItem(
                m.path,
                m.similarity,
                rank,
                label=("最佳 · " if rank == 1 else "") + (f"{m.width}×{m.height}" if m.pixels else "?"),
            )
            for rank, m in enumerate(group.members, 1)
        ]
        sections.append((heading, items))
    title = f"重复照片（阈值 {report.threshold:g}）"
    return write_groups_html(sections, out, title=title, count=f"{report.total_groups} 组，共 {report.files} 张照片")


def _prepare_text_search(index, runtime, quiet: bool) -> None:
    """Export the text tower now (once per model) when searches will run it in ONNX Runtime: then
    `cnclip search` answers without loading the model at all."""
    chosen = index.model.runtime or runtime
    if "text" not in chosen.onnx_towers:
        return
    from cnclip.model.onnx_runtime import export_folder

    model = index.model
    if not (export_folder(model.weights_digest()) / "text.onnx").exists() and not quiet:
        print("preparing the text tower for fast searches (once per model) ...", file=sys.stderr)
    from cnclip.model.onnx_export import export_cached

    export_cached(model, "text")


def _ray_options(args: argparse.Namespace):
    if not (args.ray or args.address):
        return None
    from cnclip.index.ray import RayOptions

    return RayOptions(
        address=args.address,
        workers=args.ray_workers,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        shard_dir=args.shard_dir,
        gpus_per_worker=args.ray_gpus,
        device=args.device,
        backend=args.backend,
    )


def _open_for_indexing(args: argparse.Namespace, runtime):
    """Without --model: an existing index keeps its model; a new one gets $CNCLIP_MODEL or ViT-B-16."""
    from cnclip.errors import IndexNotFoundError
    from cnclip.index.folder import Index
    from cnclip.model.checkpoint import DEFAULT_MODEL, MODEL_ENV

    default = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    kind = args.vector_index
    try:
        index = Index.open(args.index, runtime=runtime, vector_kind=kind)
    except IndexNotFoundError:
        return Index.open(args.index, model=default, create=True, runtime=runtime, vector_kind=kind)
    if index.catalog.identity is None:  # made but never given a model: treat it as new
        index.close()
        return Index.open(args.index, model=default, runtime=runtime, vector_kind=kind)
    return index


def _cmd_search(args: argparse.Namespace) -> int:
    from cnclip.index.folder import Index
    from cnclip.index.query import IMAGE, build_terms, describe

    images, nots, not_images = args.image or [], args.not_texts or [], args.not_images or []
    if args.query is None and not images:
        raise CNClipError("give a text query or --image FILE")
    if args.texts and (args.query is not None or len(images) != 1 or nots or not_images):
        raise CNClipError("--texts searches texts by one image; give --image FILE alone")
    terms = build_terms(args.query, images, nots, not_images)  # checked before the index and its model load
    with Index.open(args.index, model=args.model, runtime=_runtime(args), t2s=args.t2s) as index:
        where = _filter(index, args)
        if args.texts:
            if not where.empty:
                raise CNClipError("filters choose photos; --texts returns texts, so leave the filters out")
            hits = index.search_texts_by_image(images[0], k=args.k)
            rows = [(h.score, h.text) for h in hits]
            payload = [h.to_dict() for h in hits]
        else:
            if len(terms) > 1:
                hits = index.search_combined(terms, k=args.k, exclude_self=not args.include_self, where=where)
                title = describe(terms)
            elif terms[0].kind == IMAGE:
                hits = index.search_image(images[0], k=args.k, exclude_self=not args.include_self, where=where)
                title = f"相似图片：{os.path.basename(images[0])}"
            else:
                hits = index.search_text(args.query, k=args.k, where=where)
                title = args.query
            rows = [(h.score, h.path if h.t is None else f"{h.path}#t={h.t:g}") for h in hits]  # a video: its moment
            payload = [h.to_dict() for h in hits]
            _write_sheets(args, hits, title)
    if args.json:
        print(_json(payload))
    else:
        for score, what in rows:
            print(f"{score:.4f}\t{what}")
    return 0


def _filter(index, args: argparse.Namespace):
    """The search filter the options ask for (an empty one without filter options)."""
    return index.filter(
        after=args.after,
        before=args.before,
        folders=args.within or (),
        kind=args.kind,
        camera=args.camera,
        min_size=args.min_size,
        max_size=args.max_size,
    )


def _add_filter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (date taken from EXIF, else the file's time)")
    g.add_argument("--after", metavar="DATE", help="taken from this date on: 2024, 2024-06 or 2024-06-15")
    g.add_argument("--before", metavar="DATE", help="taken before this date (--before 2024-09: up to 31 August)")
    g.add_argument(
        "--in",
        dest="within",
        action="append",
        metavar="FOLDER",
        help="only under this folder: absolute, or relative to an indexed folder, e.g. 旅行/2024 (repeatable)",
    )
    g.add_argument("--kind", choices=("photo", "video"), help="only photos or only videos")
    g.add_argument("--camera", help="camera model contains this, e.g. iPhone")
    g.add_argument("--min-size", metavar="SIZE", help="file size at least this, e.g. 500K, 2M")
    g.add_argument("--max-size", metavar="SIZE", help="file size at most this")


def _write_sheets(args: argparse.Namespace, hits, title: str) -> None:
    if not (args.grid or args.html):
        return
    from cnclip.app.gallery import GalleryItem, write_grid, write_html

    items = [GalleryItem(h.path, h.score, rank) for rank, h in enumerate(hits, 1)]
    if args.grid:
        print(f"wrote {write_grid(items, args.grid, title=title)}", file=sys.stderr)
    if args.html:
        print(f"wrote {write_html(items, args.html, title=title)}", file=sys.stderr)


def _cmd_info(args: argparse.Namespace) -> int:
    from cnclip.index.folder import Index

    with Index.open(args.index, runtime=_runtime(args)) as index:
        stats = index.stats()
    if args.json:
        print(_json(stats))
        return 0
    model = stats["model"]
    print(f"index    {stats['index']}")
    print(f"images   {stats['images']:,}")
    if stats["videos"]:
        print(f"videos   {stats['videos']:,}")
    print(f"texts    {stats['texts']:,}")
    print(
        f"model    {model['name'] or '-'} ({model['digest'][:12]}), {model['dim']}-d, from {model['source']}"
        if model
        else "model    none yet"
    )
    vectors = stats["vector_index"]
    if vectors is None:
        print("vectors  not built yet (the next search builds it)")
    else:
        recall = "" if vectors["recall_at_10"] is None else f", recall@10 {vectors['recall_at_10']:.3f} at build"
        state = "current" if vectors["current"] else "stale (the next search updates it)"
        print(f"vectors  {vectors['kind']}, {vectors['ntotal']:,} vectors{recall}; {state}")
    if stats["precisions"]:
        print("computed " + ", ".join(f"{n:,} {name}" for name, n in sorted(stats["precisions"].items())))
    runtime = stats["runtime"]
    if runtime is not None:
        towers = ", ".join(f"{t}: {runtime[t]['engine']} {runtime[t]['precision']}" for t in ("image", "text"))
        print(f"runtime  {runtime['device']}; {towers}\n         {runtime['reason']}")
    return 0


def _cmd_tag(args: argparse.Namespace) -> int:
    from cnclip.index.folder import Index
    from cnclip.model.checkpoint import load_model
    from cnclip.model.transform import load_image
    from cnclip.model.zeroshot import zero_shot
    from cnclip.train.data import read_lines

    labels = read_lines(args.labels)
    runtime = _runtime(args)
    if args.model:
        model = runtime.apply(load_model(args.model, device=runtime.device))
    else:
        with Index.open(args.index, runtime=runtime) as index:
            model = index.model
    hits = zero_shot(model, load_image(args.file), labels, t2s=args.t2s)[: args.k]
    if args.json:
        print(_json([{"label": h.text, "score": h.score} for h in hits]))
    else:
        for h in hits:
            print(f"{h.score:.4f}\t{h.text}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from cnclip.app.serve import TOKEN_ENV, check_bind, create_app, listen_socket
    except ImportError as e:
        raise CNClipError(
            f"cnclip serve needs FastAPI and uvicorn ({e.name} is missing); install them: pip install 'cnclip[serve]'"
        ) from e
    from cnclip.index.folder import default_index_path

    if args.watch_poll and not args.watch:
        raise CNClipError("--watch-poll sets how --watch DIR looks for changes; add --watch DIR")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)
    sock = listen_socket(args.host, args.port)  # a busy port fails before the model loads
    index = args.index or default_index_path()
    runtime = _runtime(args)
    print(f"loading {index} ({runtime.describe()}) ...", file=sys.stderr)
    options = {"watch": args.watch or (), "watch_poll": args.watch_poll, "on_watch": _print_watch_batch}
    if args.upload_memory is not None:
        options["upload_memory"] = args.upload_memory * 2**20
    app = create_app(index, token=token, runtime=runtime, host=args.host, t2s=args.t2s, **options)
    if args.watch:
        print(f"watching {', '.join(args.watch)} for changes", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/" + ("?token=" + token if token else "")
    print(f"serving {index} at {url}  (Ctrl+C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", access_log=args.verbose)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _cmd_pretrain_text(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cnclip.train.pretrain import PretrainOptions, pretrain_text

    names = PretrainOptions.__dataclass_fields__
    opts = PretrainOptions(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    summary = pretrain_text(opts, report=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {summary.model_folder}; use it with --model in cnclip train / cnclip index", file=sys.stderr)
    if args.json:
        print(_json(asdict(summary)))
    return 0


def _cmd_import_official(args: argparse.Namespace) -> int:
    from cnclip.train.data import read_official, read_official_lmdb

    if bool(args.lmdb) == bool(args.imgs or args.texts):
        raise CNClipError("give either --imgs FILE --texts FILE (tsv + jsonl) or --lmdb DIR")
    if args.lmdb:
        path, report = read_official_lmdb(args.lmdb, args.out)
    else:
        if not (args.imgs and args.texts):
            raise CNClipError("the tsv layout needs both --imgs *_imgs.tsv and --texts *_texts.jsonl")
        path, report = read_official(args.imgs, args.texts, args.out)
    print(f"wrote {path}: {report.summary()}", file=sys.stderr)
    for line in report.examples:
        print(f"  {line}", file=sys.stderr)
    print(f"train on it with: cnclip train --train {path} --out runs/NAME", file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from cnclip.index.scan import Progress
    from cnclip.model.checkpoint import load_model
    from cnclip.train.data import simplified_captions
    from cnclip.train.evaluate import evaluate_pairs, zero_shot_accuracy

    if args.labels and args.zero_shot is None:
        raise CNClipError("--labels names the classes of --zero-shot FOLDER; add --zero-shot FOLDER")
    if args.zero_shot is not None and not expand_user(args.zero_shot).is_dir():
        raise CNClipError(f"{args.zero_shot} is not a folder; give a folder with one sub-folder of images per class")
    pairs = _read_pairs(args.data) if args.data is not None else None  # data problems show before the model loads
    if pairs is not None and args.t2s:
        pairs = simplified_captions(pairs)
    runtime = _runtime(args)
    model = runtime.apply(load_model(args.model, device=runtime.device))
    bar = _ProgressBar("embedding", enabled=not args.quiet and sys.stderr.isatty())
    skipped: list[str] = []
    options = {"batch_size": args.batch_size, "progress": lambda done, total: bar(Progress(done, total))}
    try:
        if pairs is not None:
            result = evaluate_pairs(model, pairs, on_skip=skipped.append, **options)
        else:
            result = zero_shot_accuracy(model, args.zero_shot, args.labels, on_skip=skipped.append, **options)
    finally:
        bar.close()
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    del result["failed"]  # named on stderr just above
    if args.json:
        print(_json(result))
    elif pairs is not None:
        _print_recall_table(result)
    else:
        print(f"top1\t{100 * result['top1']:.1f}\ntop5\t{100 * result['top5']:.1f}")
        print(f"{result['images']} images, {result['classes']} classes", file=sys.stderr)
    return 0


def _read_pairs(path: str) -> list:
    """Image-caption pairs from a data file; what was left out is summed up on stderr."""
    from cnclip.train.data import read_pairs

    pairs, report = read_pairs(path)
    if report.dropped:
        problems = ", ".join(f"{count} {reason}" for reason, count in report.problems.items())
        print(
            f"{report.source}: left out {report.dropped} of {report.kept + report.dropped} ({problems})",
            file=sys.stderr,
        )
        for example in report.examples:
            print(f"  {example}", file=sys.stderr)
    return pairs


def _print_recall_table(result: dict) -> None:
    """Recall in percent, one row per direction, then the mean recall."""
    print("\tR@1\tR@5\tR@10")
    for direction in ("t2i", "i2t"):
        print(direction + "".join(f"\t{100 * result[direction][k]:.1f}" for k in ("R@1", "R@5", "R@10")))
    print(f"MR\t{100 * result['MR']:.1f}")
    print(f"{result['images']} images, {result['texts']} texts", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip", description="Chinese-CLIP text-image search.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    parser.add_argument(
        "--weights-source",
        metavar="LIST",
        help="where zoo weights are downloaded from, in order: hf (or $HF_ENDPOINT, e.g. https://hf-mirror.com), "
        "modelscope, https://host/path/{file}, or a folder (default: $CNCLIP_WEIGHTS_SOURCE, then hf, and "
        "modelscope when the hub cannot be reached); allowed before or after the command",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # listed for --help only: main() hands `cnclip train ...` to cnclip.train.main before parsing
    sub.add_parser("train", help="fine-tune on image-caption pairs (cnclip train --help)", add_help=False)

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

    p = sub.add_parser("export-onnx", help="export the image and text towers to ONNX (dynamic batch axis)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="output folder: image.onnx and text.onnx")
    p.add_argument("--towers", default="image,text", help="comma list of towers to export (default: image,text)")
    p.set_defaults(func=_cmd_export_onnx)

    index_help = "index folder (default: $CNCLIP_INDEX, then ./index/default)"
    p = sub.add_parser("index", help="bring an index up to date with a folder of images")
    p.add_argument("folder", nargs="?", help="folder of images, walked recursively")
    p.add_argument("--index", help=index_help)
    p.add_argument("--model", help=MODEL_HELP + "; only for a new index, or to check an existing one")
    p.add_argument("--texts", metavar="FILE", help="also add the texts in FILE (one per line) for image->text search")
    p.add_argument("--collection", default="default", help="name of the text collection (default: default)")
    p.add_argument("--hidden", action="store_true", help="include hidden files and folders")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument(
        "--max-pixels", type=_positive_int, default=None, help="refuse images with more pixels (default 178,956,970)"
    )
    p.add_argument(
        "--exact-decode",
        action="store_true",
        help="decode JPEGs at full size (slower; bit-exact official preprocessing)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_runtime_options(p, None)
    p.add_argument(
        "--vector-index",
        choices=("auto", "exact", "ivf-flat", "ivf-sq8", "ivf-pq-ondisk"),
        default="auto",
        help="the derived search index (auto: exact below 100k vectors, IVF-Flat, on-disk IVF-PQ from 10M)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="remove files that cannot be seen (offline folders, a missing or empty FOLDER) instead of keeping "
        "them offline",
    )
    p.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS", help=WAIT_HELP)
    p.add_argument(
        "--watch",
        action="store_true",
        help="after indexing, keep watching FOLDER and apply new, changed, moved and deleted files within "
        "seconds, until Ctrl+C",
    )
    p.add_argument("--watch-poll", type=_interval, metavar="SECONDS", help=WATCH_POLL_HELP)
    g = p.add_argument_group("on a Ray cluster (pip install 'cnclip[ray]')")
    g.add_argument("--ray", action="store_true", help="embed with Ray Data (a local Ray instance without --address)")
    g.add_argument("--address", help="Ray cluster to join, e.g. ray://head:10001 or auto (implies --ray)")
    g.add_argument("--ray-workers", type=_positive_int, default=2, help="embedding actors, one model each (default 2)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per embedding actor (default 0: CPU)")
    g.add_argument("--shard-size", type=_positive_int, default=1024, help="files per embedding shard (default 1024)")
    g.add_argument("--shard-dir", help="where shards go (default INDEX/shards; shared storage on a cluster)")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser(
        "gc", help="delete the kept vectors of removed photos (kept so that a restored photo is not embedded again)"
    )
    p.add_argument("--index", help=index_help)
    p.add_argument(
        "--older-than",
        type=_seconds,
        default=0.0,
        metavar="DAYS",
        help="only vectors unused for longer than this many days (default 0: all unused)",
    )
    p.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS", help=WAIT_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser(
        "search",
        help="search an index by Chinese text, by image, or by both combined",
        epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="?", help="what to look for, e.g. 海边的日落, or a combination: 猫 + 狗 - 草地")
    p.add_argument(
        "--image", metavar="FILE", action="append", help="search by this image; repeat it, or add a text, to combine"
    )
    p.add_argument("--not", dest="not_texts", metavar="TEXT", action="append", help="subtract this text (repeatable)")
    p.add_argument(
        "--not-image", dest="not_images", metavar="FILE", action="append", help="subtract this image (repeatable)"
    )
    p.add_argument("--texts", action="store_true", help="with --image: return the closest indexed texts")
    p.add_argument("--include-self", action="store_true", help="with --image: keep the query image in its own results")
    p.add_argument("--index", help=index_help)
    p.add_argument(
        "--model", help="check the index's model against this one (default: the model recorded in the index)"
    )
    p.add_argument("-k", type=_positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, score}")
    p.add_argument("--grid", metavar="OUT.jpg", help="also write a contact sheet of the hits")
    p.add_argument("--html", metavar="OUT.html", help="also write an HTML page of the hits")
    _add_filter_options(p)
    _add_no_t2s(p)
    _add_runtime_options(p, None)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("info", help="what an index holds: counts, model, vector index")
    p.add_argument("--index", help=index_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_runtime_options(p, None)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "dupes", help="groups of near-identical photos (resized, re-compressed, cropped, bursts); deletes nothing"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine similarity, in (0, 1], from which two photos count as copies (default 0.95)",
    )
    p.add_argument("--index", help=index_help)
    p.add_argument("--limit", type=_positive_int, help="list only the first N groups (largest first)")
    p.add_argument("--json", action="store_true", help="print the groups as JSON")
    p.add_argument("--html", metavar="OUT.html", help="also write an HTML page of the groups with thumbnails")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_dupes)

    p = sub.add_parser("tag", help="zero-shot labels for an image")
    p.add_argument("file", help="image file")
    p.add_argument("--labels", required=True, metavar="FILE", help="labels, one per line, e.g. 猫 / 狗 / 海滩")
    p.add_argument("--index", help="take the model from this index (default: $CNCLIP_INDEX, then ./index/default)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("-k", type=_positive_int, default=5, help="labels to print (default 5)")
    p.add_argument("--json", action="store_true")
    _add_no_t2s(p, "labels")
    _add_runtime_options(p, "torch")
    p.set_defaults(func=_cmd_tag)

    p = sub.add_parser("eval", help="retrieval recall on image-caption pairs, or zero-shot accuracy on a folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="FILE", help="image-caption pairs: JSONL, CSV or a folder with .txt captions")
    what.add_argument("--zero-shot", metavar="FOLDER", help="a folder with one sub-folder of images per class")
    p.add_argument(
        "--labels", metavar="FILE", help="with --zero-shot: folder<TAB>label per line, or labels in folder order"
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (fractions, not percent)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--t2s", action="store_true", help="read Traditional Chinese captions as Simplified (OpenCC t2s) first"
    )
    _add_runtime_options(p, None)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("serve", help="a web page and JSON API to search an index from a browser or a program")
    p.add_argument("--index", help=index_help)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--token",
        help="require this secret (Authorization: Bearer, or /?token= for the page); needed for a non-loopback "
        "--host (default: $CNCLIP_TOKEN)",
    )
    p.add_argument(
        "--watch",
        action="append",
        metavar="DIR",
        help="keep the index current with DIR while serving: new, changed, moved and deleted files are applied "
        "within seconds (repeatable)",
    )
    p.add_argument("--watch-poll", type=_interval, metavar="SECONDS", help=WATCH_POLL_HELP)
    p.add_argument(
        "--upload-memory",
        type=_positive_int,
        metavar="MB",
        help="memory that uploaded images may take decoded at once (default: room for two of 100 megapixels); "
        "an upload that finds it in use waits a few seconds, then gets 503",
    )
    _add_no_t2s(p)
    _add_runtime_options(p, None)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "pretrain-text", help="adapt the text tower to a corpus: masked-language pretraining, whole-word masking"
    )
    p.add_argument("--corpus", required=True, help="text file (one document or sentence per line) or folder of .txt")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="run folder: model/ (the adapted model), last/, metrics.jsonl")
    p.add_argument("--from-scratch", action="store_true", help="random weights in --model's zoo shape")
    p.add_argument("--mlm-head", help="BERT checkpoint (file or folder) whose cls.predictions.* start the MLM head")
    p.add_argument("--user-dict", help="jieba user dictionary: domain words kept whole when masking")
    p.add_argument(
        "--max-length",
        type=_positive_int,
        help="tokens per packed block (default 128, or fewer if the tower has fewer positions)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32, help="blocks per micro-batch")
    p.add_argument("--accum", type=_positive_int, default=1, help="micro-batches per step (effective batch size)")
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent warming up")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the blocks (default 0.05)")
    p.add_argument("--eval-every", type=_positive_int, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=_positive_int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh even if --out has a run")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=_cmd_pretrain_text)

    p = sub.add_parser(
        "import-official", help="convert the official Chinese-CLIP data layout (tsv+jsonl or LMDB) to pairs.jsonl"
    )
    p.add_argument("--imgs", metavar="FILE", help="*_imgs.tsv: image_id<TAB>base64 image")
    p.add_argument("--texts", metavar="FILE", help="*_texts.jsonl: {text_id, text, image_ids}")
    p.add_argument("--lmdb", metavar="DIR", help="the official LMDB folder (imgs/ and pairs/) instead")
    p.add_argument("--out", required=True, help="folder for images/ and pairs.jsonl")
    p.set_defaults(func=_cmd_import_official)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = _take_weights_source(list(sys.argv[1:] if argv is None else argv))
    except CNClipError as e:
        print(f"cnclip: error: --weights-source: {e}", file=sys.stderr)
        return 2
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "train":  # the trainer parses its own options (torchrun runs it too)
        from cnclip.train import main as train_main

        verbose = any(a in ("-v", "--verbose") for a in argv[:first])
        return train_main(argv[first + 1 :] + (["--verbose"] if verbose else []))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from cnclip.model.download import reporting

    bar = _DownloadBar(enabled=sys.stderr.isatty() and not getattr(args, "quiet", False))
    if isinstance(sys.stdout, io.TextIOWrapper):
        # a file name that is not UTF-8 (lone surrogates in Python) prints as its own bytes, as `ls` does,
        # instead of a UnicodeEncodeError on terminals whose locale encoding is strict (zh_CN.UTF-8)
        sys.stdout.reconfigure(errors="surrogateescape")
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


if __name__ == "__main__":
    sys.exit(main())
