"""`cnclip index` (and its `--watch`), `cnclip gc` and `cnclip info`: building an index, keeping it current,
collecting its garbage and saying what it holds."""

from __future__ import annotations

import argparse
import os

from cnclip.app.cli.common import (
    MODEL_HELP,
    Subparsers,
    add_index_option,
    add_model_option,
    add_runtime_options,
    add_wait_option,
    add_watch_poll_option,
    as_json,
    at_least_zero,
    positive_int,
    print_watch_batch,
    progress_bar,
    runtime,
    say,
)
from cnclip.errors import CNClipError
from cnclip.options import options_from
from cnclip.userpath import expand_user


def add_index(sub: Subparsers) -> None:
    p = sub.add_parser("index", help="bring an index up to date with a folder of images")
    p.add_argument("folder", nargs="?", help="folder of images, walked recursively")
    add_index_option(p)
    add_model_option(p, MODEL_HELP + "; only for a new index, or to check an existing one")
    p.add_argument("--texts", metavar="FILE", help="also add the texts in FILE (one per line) for image->text search")
    p.add_argument("--collection", default="default", help="name of the text collection (default: default)")
    p.add_argument("--hidden", action="store_true", help="include hidden files and folders")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--max-pixels", type=positive_int, default=None, help="refuse images with more pixels (default 178,956,970)"
    )
    p.add_argument(
        "--exact-decode",
        action="store_true",
        help="decode JPEGs at full size (slower; bit-exact official preprocessing)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_runtime_options(p)
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
    add_wait_option(p)
    p.add_argument(
        "--watch",
        action="store_true",
        help="after indexing, keep watching FOLDER and apply new, changed, moved and deleted files within "
        "seconds, until Ctrl+C",
    )
    add_watch_poll_option(p)
    g = p.add_argument_group("words in photos (read after the vectors are in; searches use both)")
    ocr = g.add_mutually_exclusive_group()
    ocr.add_argument(
        "--no-ocr",
        dest="ocr",
        action="store_false",
        default=None,
        help="do not read the words in photos this time (default: read them; $CNCLIP_OCR=0 turns it off)",
    )
    ocr.add_argument(
        "--ocr-only",
        action="store_true",
        help="only read the words of photos already indexed (under FOLDER, or all), without scanning; "
        "photos the reader failed on are tried again",
    )
    _add_ray_options(p)
    p.set_defaults(func=_cmd_index)


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("on a Ray cluster (pip install 'cnclip[ray]')")
    g.add_argument("--ray", action="store_true", help="embed with Ray Data (a local Ray instance without --address)")
    g.add_argument("--address", help="Ray cluster to join, e.g. ray://head:10001 or auto (implies --ray)")
    g.add_argument("--ray-workers", type=positive_int, default=2, help="embedding actors, one model each (default 2)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per embedding actor (default 0: CPU)")
    g.add_argument("--shard-size", type=positive_int, default=1024, help="files per embedding shard (default 1024)")
    g.add_argument("--shard-dir", help="where shards go (default INDEX/shards; shared storage on a cluster)")


def _cmd_index(args: argparse.Namespace) -> int:
    if args.ocr_only:
        return _cmd_read_words(args)
    _check_index_args(args)
    from cnclip.train.lines import read_lines

    texts = read_lines(args.texts) if args.texts else None
    chosen = runtime(args)
    with _open_for_indexing(args, chosen) as index:
        if texts is not None:
            added = index.add_texts(texts, collection=args.collection)
            say(f"added {added} new texts ({len(texts) - added} already present) to {index.catalog.folder}")
            if args.json:
                print(as_json({"texts_added": added}))
        if args.folder is None:
            return 0
        summary = _add_folder(index, args)
        _prepare_text_search(index, chosen, quiet=args.quiet)
        _print_summary(summary, args.json and not _reads_words(args))
        if _reads_words(args):
            words = _read_words(index, args)
            if args.json:
                print(as_json(summary.to_dict() | {"words": words.to_dict()}))
        encoder = index.encoder if args.watch else None
    return _watch(args, index.catalog.folder, encoder) if args.watch else 0


def _reads_words(args: argparse.Namespace) -> bool:
    from cnclip.index.index import ocr_default

    return ocr_default() if args.ocr is None else args.ocr


def _read_words(index, args: argparse.Namespace, folder: str | None = None, retry_failed: bool = False):
    """The second stage: the words in the photos not read yet, with their own progress bar."""
    bar = progress_bar("reading words", args)
    try:
        summary = index.read_words(
            folder if folder is not None else args.folder, progress=bar, wait=args.wait, retry_failed=retry_failed
        )
    finally:
        bar.close()
    for path, reason in summary.failed:
        say(f"could not read the words in {path}: {reason} (its picture stays searchable)")
    for path, reason in summary.unreachable:
        say(f"could not get at {path} to read its words: {reason} (the next run tries again)")
    if not args.json:
        say(f"words: {summary.read} photos read, {summary.with_words} with words ({summary.engine})")
    return summary


def _cmd_read_words(args: argparse.Namespace) -> int:
    """`cnclip index [FOLDER] --ocr-only`: read the words of photos already indexed, trying again
    the ones the reader failed on (asked for by name, unlike the stage after each indexing)."""
    from cnclip.index.index import Index

    if args.texts or args.watch or args.ray or args.address:
        raise CNClipError("--ocr-only reads words of photos already indexed; leave out --texts, --watch and --ray")
    with Index.open(args.index) as index:
        summary = _read_words(index, args, folder=args.folder, retry_failed=True)
    if args.json:
        print(as_json({"words": summary.to_dict()}))
    return 0


def _check_index_args(args: argparse.Namespace) -> None:
    if args.folder is not None and not expand_user(args.folder).is_dir() and not _known_folder(args):
        raise CNClipError(f"{args.folder} is not a folder; give the folder of images to index")
    if args.folder is None and not args.texts:
        raise CNClipError("nothing to index; give a folder of images and/or --texts FILE")
    if args.watch and (args.folder is None or args.ray or args.address):
        raise CNClipError("--watch needs the FOLDER to watch, and embeds in this process: drop --ray")
    if args.watch_poll and not args.watch:
        raise CNClipError("--watch-poll sets how --watch looks for changes; add --watch")


def _known_folder(args: argparse.Namespace) -> bool:
    """Whether the index already holds files from `args.folder` (a drive not mounted is not a typo)."""
    from cnclip.index.catalog import Catalog
    from cnclip.index.index import default_index_path

    try:
        with Catalog.open(args.index or default_index_path()) as catalog:
            return catalog.has_files_under(os.path.abspath(expand_user(args.folder)))
    except CNClipError:
        return False


def _open_for_indexing(args: argparse.Namespace, chosen):
    """With --model: that model (checked against an existing index). Without: an existing index keeps its
    model; a new one gets $CNCLIP_MODEL or ViT-B-16."""
    from cnclip.errors import IndexNotFoundError
    from cnclip.index.index import Index
    from cnclip.model.checkpoint import DEFAULT_MODEL, MODEL_ENV

    kind = args.vector_index
    if args.model:
        return Index.open(args.index, model=args.model, create=True, runtime=chosen, vector_kind=kind)
    default = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    try:
        index = Index.open(args.index, runtime=chosen, vector_kind=kind)
    except IndexNotFoundError:
        return Index.open(args.index, model=default, create=True, runtime=chosen, vector_kind=kind)
    if index.catalog.identity is None:  # made but never given a model: treat it as new
        index.close()
        return Index.open(args.index, model=default, runtime=chosen, vector_kind=kind)
    return index


def _add_folder(index, args: argparse.Namespace):
    bar = progress_bar("embedding", args)
    try:
        return index.add_folder(
            args.folder, progress=bar, ray=_ray_options(args), wait=args.wait, **_scan_options(args)
        )
    finally:
        bar.close()


def _ray_options(args: argparse.Namespace):
    if not (args.ray or args.address):
        return None
    from cnclip.index.ray_embed import RayOptions

    return options_from(args, RayOptions, workers=args.ray_workers, gpus_per_worker=args.ray_gpus)


def _scan_options(args: argparse.Namespace) -> dict:
    """The `Indexer` options of `cnclip index` (its first pass and the watching after it)."""
    options = {"batch_size": args.batch_size, "include_hidden": args.hidden, "draft": not args.exact_decode}
    return options | {"prune": args.prune} | ({"max_pixels": args.max_pixels} if args.max_pixels else {})


def _prepare_text_search(index, chosen, quiet: bool) -> None:
    """Export the text tower now (once per model) when searches will run it in ONNX Runtime: then
    `cnclip search` answers without loading the model at all."""
    encoder = index.encoder
    if "text" not in (encoder.runtime or chosen).onnx_towers:
        return
    from cnclip.model.onnx_runtime import export_folder

    if not (export_folder(encoder.weights_digest()) / "text.onnx").exists() and not quiet:
        say("preparing the text tower for fast searches (once per model) ...")
    encoder.prepare("text")


def _print_summary(summary, json_out: bool) -> None:
    for item in summary.skipped:
        say(f"skipped {item['path']}: {item['reason']}")
    for item in summary.offline:
        say(
            f"offline {item['path']}: {item['reason']}; {item['files']} files kept, left out of searches until "
            "it is back (--prune removes them)"
        )
    if json_out:
        print(as_json(summary.to_dict()))
        return
    offline = sum(item["files"] for item in summary.offline)
    say(
        f"{summary.added} added, {summary.updated} updated, {summary.removed} removed, "
        f"{summary.unchanged} unchanged, {len(summary.skipped)} skipped"
        + (f", {offline} offline" if offline else "")
        + f" ({summary.embedded} embedded, {summary.reused} reused)"
    )


def _watch(args: argparse.Namespace, index_folder, encoder) -> int:
    """`cnclip index DIR --watch` after its first pass: apply changes as they happen, until Ctrl+C."""
    from cnclip.index.watch import Watcher

    watcher = Watcher(
        index_folder,
        [args.folder],
        model=encoder,
        poll=args.watch_poll,
        on_batch=lambda batch: print_watch_batch(batch, args.json),
        on_error=lambda e: say(f"watch: {e}", flush=True),
        words=_reads_words(args),
        **_scan_options(args),
    ).start()
    say(f"watching {args.folder} for changes (Ctrl+C stops)", flush=True)
    interrupted = False
    try:
        while not watcher.wait(1.0):
            pass
    except KeyboardInterrupt:
        interrupted = True
        say("watch: stopping (Ctrl+C again quits at once; the next run picks up the rest)")
    finally:
        watcher.stop()
    if watcher.error is not None:
        raise CNClipError(f"watching {args.folder} stopped: {watcher.error}") from watcher.error
    return 130 if interrupted else 0  # Ctrl+C ends every command with 130, as shells expect


def add_gc(sub: Subparsers) -> None:
    p = sub.add_parser(
        "gc", help="delete the kept vectors of removed photos (kept so that a restored photo is not embedded again)"
    )
    add_index_option(p)
    p.add_argument(
        "--older-than",
        type=at_least_zero,
        default=0.0,
        metavar="DAYS",
        help="only vectors unused for longer than this many days (default 0: all unused)",
    )
    add_wait_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_gc)


def _cmd_gc(args: argparse.Namespace) -> int:
    from cnclip.index.catalog import Catalog
    from cnclip.index.index import default_index_path
    from cnclip.index.lock import WriterLock

    folder = args.index or default_index_path()
    with Catalog.open(folder) as catalog, WriterLock(folder).hold(args.wait):
        removed = catalog.collect_garbage(args.older_than * 86400)
        left = catalog.unused_vectors()
        offline = catalog.offline_count()  # their vectors are in use: gc never touches them
    if args.json:
        print(as_json({"vectors_removed": removed, "unused_vectors_left": left, "offline_files_kept": offline}))
        return 0
    say(f"removed {removed} unused vectors from {folder} ({left} younger ones kept)")
    if offline:
        say(
            f"kept the vectors of {offline} offline files (a drive or folder that could not be seen); "
            "they return when it is back, or go with `cnclip index DIR --prune`"
        )
    return 0


def add_info(sub: Subparsers) -> None:
    p = sub.add_parser("info", help="what an index holds: counts, model, vector index")
    add_index_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_runtime_options(p)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from cnclip.index.index import Index, default_index_choice

    path, why = (args.index, "--index") if args.index else default_index_choice()
    with Index.open(path, runtime=runtime(args)) as index:
        stats = index.stats() | {"index_chosen_by": why}
    if args.json:
        print(as_json(stats))
        return 0
    model = stats["model"]
    print(f"index    {stats['index']} (chosen by {why})")
    print(f"images   {stats['images']:,}")
    if stats["videos"]:
        print(f"videos   {stats['videos']:,}")
    print(f"texts    {stats['texts']:,}")
    words = stats["words"]
    if words["read"]:
        left = words["photos"] - words["read"]
        print(
            f"words    {words['with_words']:,} photos with words; {words['read']:,} of {words['photos']:,} read"
            + (f", {left:,} to read (cnclip index --ocr-only)" if left else "")
            + (f", {words['failed']:,} could not be read (--ocr-only tries again)" if words["failed"] else "")
        )
    else:
        print("words    none read yet (cnclip index --ocr-only reads them)")
    print(
        f"model    {model['name'] or '-'} ({model['digest'][:12]}), {model['dim']}-d, from {model['source']}"
        if model
        else "model    none yet"
    )
    _print_vectors_and_runtime(stats)
    return 0


def _print_vectors_and_runtime(stats: dict) -> None:
    vectors = stats["vector_index"]
    if vectors is None:
        print("vectors  not built yet (the next search builds it)")
    else:
        recall = "" if vectors["recall_at_10"] is None else f", recall@10 {vectors['recall_at_10']:.3f} at build"
        state = "current" if vectors["current"] else "stale (the next search updates it)"
        print(f"vectors  {vectors['kind']}, {vectors['ntotal']:,} vectors{recall}; {state}")
    if stats["precisions"]:
        print("computed " + ", ".join(f"{n:,} {name}" for name, n in sorted(stats["precisions"].items())))
    chosen = stats["runtime"]
    if chosen is not None:
        towers = ", ".join(f"{t}: {chosen[t]['engine']} {chosen[t]['precision']}" for t in ("image", "text"))
        print(f"runtime  {chosen['device']}; {towers}\n         {chosen['reason']}")
