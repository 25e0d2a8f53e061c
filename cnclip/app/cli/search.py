"""`cnclip search`, `cnclip tag` and `cnclip dupes`: asking an index (or a model) what it sees."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cnclip.app.cli.common import (
    MODEL_HELP,
    Subparsers,
    add_index_option,
    add_model_option,
    add_no_t2s,
    add_runtime_options,
    as_json,
    positive_int,
    progress_bar,
    runtime,
    say,
)
from cnclip.errors import CNClipError
from cnclip.userpath import expand_user

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


def add_search(sub: Subparsers) -> None:
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
    add_index_option(p)
    add_model_option(p, "check the index's model against this one (default: the model recorded in the index)")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, score}")
    p.add_argument("--grid", metavar="OUT.jpg", help="also write a contact sheet of the hits")
    p.add_argument("--html", metavar="OUT.html", help="also write an HTML page of the hits")
    words = p.add_mutually_exclusive_group()
    words.add_argument(
        "--words",
        dest="words",
        action="store_const",
        const="only",
        default="auto",
        help="only photos whose words (read by cnclip index) contain the query; by default they come first, "
        "then the photos that look like it",
    )
    words.add_argument("--no-words", dest="words", action="store_const", const="off", help="rank by the picture alone")
    _add_filter_options(p)
    add_no_t2s(p)
    add_runtime_options(p)
    p.set_defaults(func=_cmd_search)


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


def _cmd_search(args: argparse.Namespace) -> int:
    from cnclip.index.index import Index
    from cnclip.index.query import build_terms

    images, nots, not_images = args.image or [], args.not_texts or [], args.not_images or []
    if args.query is None and not images:
        raise CNClipError("give a text query or --image FILE")
    if args.texts and (args.query is not None or len(images) != 1 or nots or not_images):
        raise CNClipError("--texts searches texts by one image; give --image FILE alone")
    terms = build_terms(args.query, images, nots, not_images)  # checked before the index and its model load
    with Index.open(args.index, model=args.model, runtime=runtime(args), t2s=args.t2s) as index:
        where = _filter(index, args)
        if args.texts:
            if not where.empty:
                raise CNClipError("filters choose photos; --texts returns texts, so leave the filters out")
            hits = index.search_texts_by_image(images[0], k=args.k)
            rows = [(h.score, h.text) for h in hits]
        else:
            hits = _search_photos(index, args, terms, where)
            rows = [(h.score, _hit_line(h)) for h in hits]
        payload = [h.to_dict() for h in hits]
    if args.json:
        print(as_json(payload))
    else:
        for score, what in rows:
            print(f"{score:.4f}\t{what}")
    return 0


def _hit_line(hit) -> str:
    """A hit as `cnclip search` prints it: the path (a video: at its moment), and the line of
    words it was found by, if any."""
    line = hit.path if hit.t is None else f"{hit.path}#t={hit.t:g}"
    if hit.words:
        line += "\t「" + " / ".join(w["text"] for w in hit.words[:2]) + "」"
    return line


def _search_photos(index, args: argparse.Namespace, terms, where) -> list:
    """The hits of one text, one image or their combination; the contact sheets of them when asked for."""
    from cnclip.index.query import IMAGE, describe

    exclude_self = not args.include_self
    if args.words != "auto" and (len(terms) > 1 or terms[0].kind == IMAGE):
        raise CNClipError("--words and --no-words go with one text query; combined and image queries use pictures")
    if len(terms) > 1:
        hits = index.search_combined(terms, k=args.k, exclude_self=exclude_self, where=where)
        title = describe(terms)
    elif terms[0].kind == IMAGE:
        hits = index.search_image(args.image[0], k=args.k, exclude_self=exclude_self, where=where)
        title = f"相似图片：{os.path.basename(args.image[0])}"
    else:
        hits = index.search_text(args.query, k=args.k, where=where, words=args.words)
        title = args.query
    _write_sheets(args, hits, title)
    return hits


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


def _write_sheets(args: argparse.Namespace, hits, title: str) -> None:
    if not (args.grid or args.html):
        return
    from cnclip.app.gallery import GalleryItem, write_grid, write_html

    items = [GalleryItem(h.path, h.score, rank, words=h.words or ()) for rank, h in enumerate(hits, 1)]
    if args.grid:
        say(f"wrote {write_grid(items, args.grid, title=title)}")
    if args.html:
        say(f"wrote {write_html(items, args.html, title=title)}")


def add_words(sub: Subparsers) -> None:
    p = sub.add_parser("words", help="the lines of words read in indexed photos, to read or copy")
    p.add_argument("files", nargs="+", metavar="FILE", help="photos in the index")
    add_index_option(p)
    p.add_argument("--json", action="store_true", help="per photo: {path, read, lines: [{text, score, box}], error}")
    p.set_defaults(func=_cmd_words)


def _cmd_words(args: argparse.Namespace) -> int:
    from cnclip.index.index import Index

    with Index.open(args.index) as index:
        found = [(os.path.abspath(expand_user(f)), index.words_of(f)) for f in args.files]
    if args.json:
        print(
            as_json(
                [
                    {"path": path, "read": rec is not None}
                    | ({"lines": [], "error": None} if rec is None else {"lines": rec["lines"], "error": rec["error"]})
                    for path, rec in found
                ]
            )
        )
        return 0
    for path, rec in found:
        if len(found) > 1:
            print(f"{path}:")
        indent = "\t" if len(found) > 1 else ""
        if rec is None:
            say(f"{path}: its words are not read yet (cnclip index --ocr-only reads them)")
        elif rec["error"]:
            say(f"{path}: its words could not be read: {rec['error']}")
        for line in [] if rec is None else rec["lines"]:
            print(f"{indent}{line['text']}")
    return 0


def add_tag(sub: Subparsers) -> None:
    p = sub.add_parser("tag", help="zero-shot labels for an image")
    p.add_argument("file", help="image file")
    p.add_argument("--labels", required=True, metavar="FILE", help="labels, one per line, e.g. 猫 / 狗 / 海滩")
    add_index_option(p, "take the model from this index (default: the one `cnclip info` names)")
    add_model_option(p, MODEL_HELP.replace("then ViT-B-16", "then the index's model"))
    p.add_argument("-k", type=positive_int, default=5, help="labels to print (default 5)")
    p.add_argument("--json", action="store_true")
    add_no_t2s(p, "labels")
    add_runtime_options(p, "torch")
    p.set_defaults(func=_cmd_tag)


def _cmd_tag(args: argparse.Namespace) -> int:
    from cnclip.index.index import Index
    from cnclip.model.checkpoint import MODEL_ENV, load_model
    from cnclip.model.transform import load_image
    from cnclip.model.zeroshot import zero_shot
    from cnclip.train.lines import read_lines

    labels = read_lines(args.labels)
    chosen = runtime(args)
    name = args.model or os.environ.get(MODEL_ENV)  # then the index's model
    if name:
        encoder = chosen.build(load_model(name))
    else:
        with Index.open(args.index, runtime=chosen) as index:
            encoder = index.encoder
    hits = zero_shot(encoder, load_image(args.file), labels, t2s=args.t2s)[: args.k]
    if args.json:
        print(as_json([{"label": h.text, "score": h.score} for h in hits]))
    else:
        for h in hits:
            print(f"{h.score:.4f}\t{h.text}")
    return 0


def add_dupes(sub: Subparsers) -> None:
    p = sub.add_parser(
        "dupes", help="groups of near-identical photos (resized, re-compressed, cropped, bursts); deletes nothing"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine similarity, in (0, 1], from which two photos count as copies (default 0.95)",
    )
    add_index_option(p)
    p.add_argument("--limit", type=positive_int, help="list only the first N groups (largest first)")
    p.add_argument("--json", action="store_true", help="print the groups as JSON")
    p.add_argument("--html", metavar="OUT.html", help="also write an HTML page of the groups with thumbnails")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_dupes)


def _cmd_dupes(args: argparse.Namespace) -> int:
    from cnclip.index.dupes import check_threshold, find_duplicates
    from cnclip.index.index import Index
    from cnclip.index.scan import Progress

    threshold = check_threshold(args.threshold)  # before opening anything
    bar = progress_bar("comparing", args)
    with Index.open(args.index) as index:
        try:
            report = find_duplicates(index, threshold, limit=args.limit, progress=lambda d, t: bar(Progress(d, t)))
        finally:
            bar.close()
    if args.html:
        say(f"wrote {_write_dupes_html(report, args.html)}")
    if args.json:
        print(as_json(report.to_dict()))
    else:
        _print_groups(report)
    for note in report.notes:
        say(f"note: {note}")
    listed = " in the groups listed" if len(report.groups) < report.total_groups else ""
    groups = "1 group" if report.total_groups == 1 else f"{report.total_groups} groups"
    say(
        f"{groups} of near-duplicates among {report.files} photos at threshold {threshold:g}: "
        f"{report.duplicates} photos besides the best copies{listed} (* marks them: most pixels, then bytes, then "
        "oldest). Nothing was deleted or moved."
    )
    return 0


def _print_groups(report) -> None:
    for number, group in enumerate(report.groups, 1):
        print(f"group {number}: {group.size} photos" + (f", {len(group.members)} listed" if group.capped else ""))
        for i, m in enumerate(group.members):
            size = f"{m.width}x{m.height}" if m.pixels else "?x?"
            print(f"{'*' if i == 0 else ' '} {m.similarity:.4f}\t{size}\t{m.bytes}\t{m.path}")
        print()


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
