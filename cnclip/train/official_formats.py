"""The official Chinese-CLIP dataset layouts (base64 TSV + texts JSONL, or LMDB), converted into a
folder of image files and a `pairs.jsonl` that `cnclip.train.pairs.read_pairs` reads.

Bad lines and records are counted in the `DataReport` and left out; an LMDB record that would
run code when unpickled is refused before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.train.pairs import BAD_FIELD, EMPTY_TEXT, MISSING_FIELD, DataReport, json_objects

__all__ = ["read_official", "read_official_lmdb"]

log = logging.getLogger(__name__)

# The reasons a record is left out, besides those shared with cnclip.train.pairs.
BAD_BASE64 = "bad base64"
BAD_IMAGE_ID = "bad image id"
DUPLICATE_IMAGE_ID = "duplicate image id"
UNKNOWN_IMAGE_ID = "unknown image id"
BAD_RECORD = "bad record"  # an LMDB pair that is not a readable (image_id, text_id, text) tuple

# Image ids become file names, so anything that could climb out of the images folder is refused.
_IMAGE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")
# The official files use URL-safe base64; plain base64 from other tools is accepted too.
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_FORMAT_SUFFIX = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "AVIF": ".avif",
    "HEIF": ".heic",
}


def _b64decode(data: bytes) -> bytes | None:
    """Bytes of URL-safe or standard base64 (padding optional); None for anything that is not base64."""
    data = data.strip().translate(_URLSAFE_TO_STD)
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _image_suffix(data: bytes) -> str:
    """The file extension of the image format in `data` (header only), .jpg when Pillow cannot tell."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _FORMAT_SUFFIX.get(img.format or "", ".jpg")
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, Image.DecompressionBombError):
        return ".jpg"


# (image id, base64 bytes, where) and (text, image ids, where): the two official streams, whatever the layout.
_ImageRecord = tuple[str, bytes, str]
_TextRecord = tuple[object, list[object], str]


def _write_images(images: Iterable[_ImageRecord], folder: Path, report: DataReport) -> dict[str, str]:
    """Decode and write each image as folder/<id><ext>, one at a time; returns id -> path relative to out_dir."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for image_id, b64, where in images:
        if not _IMAGE_ID.fullmatch(image_id):
            report.add_problem(BAD_IMAGE_ID, where, image_id[:40])
            continue
        if image_id in written:
            report.add_problem(DUPLICATE_IMAGE_ID, where, image_id)
            continue
        data = _b64decode(b64)
        if data is None:
            report.add_problem(BAD_BASE64, where)
            continue
        name = image_id + _image_suffix(data)
        (folder / name).write_bytes(data)
        written[image_id] = f"{folder.name}/{name}"
    report.images = len(written)
    return written


def _write_pairs(records: Iterable[_TextRecord], written: dict[str, str], out: Path, report: DataReport) -> None:
    """Write one {"image", "text"} line per (text, known image id); replaces `out` only when done,
    so a failure never leaves a half-written or empty pairs file behind."""
    with atomic.replacing(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for text, image_ids, where in records:
                for line in _pair_lines(text, image_ids, written, where, report):
                    f.write(line)
                    report.kept += 1
        if report.kept == 0:
            raise CNClipError(
                f"{report.source}: no usable image-caption pairs ({report.summary()}"
                + (f"; first: {report.examples[0]}" if report.examples else "")
                + "); check that the texts and the images belong together"
            )


def _pair_lines(
    text: object, image_ids: list[object], written: dict[str, str], where: str, report: DataReport
) -> Iterator[str]:
    """The JSONL lines of one official text record: one per image id that was written."""
    if not isinstance(text, str):
        report.add_problem(BAD_FIELD, where, "text must be a string")
        return
    text = text.strip()
    if not text:
        report.add_problem(EMPTY_TEXT, where, count=max(1, len(image_ids)))
        return
    for image_id in image_ids:
        name = written.get(str(image_id)) if isinstance(image_id, (int, str)) else None
        if name is None:
            report.add_problem(UNKNOWN_IMAGE_ID, where, str(image_id)[:40])
        else:
            yield json.dumps({"image": name, "text": text}, ensure_ascii=False) + "\n"


def _convert_official(
    images: Iterable[_ImageRecord], records: Iterable[_TextRecord], out_dir: Path, report: DataReport
) -> Path:
    out = out_dir / "pairs.jsonl"
    try:
        written = _write_images(images, out_dir / "images", report)
        _write_pairs(records, written, out, report)
    except OSError as exc:  # a full disk or an unwritable out_dir, most likely
        where = f"{exc.filename}: " if exc.filename else ""
        raise CNClipError(f"converting {report.source} into {out_dir} failed: {where}{exc.strerror or exc}") from None
    log.log(logging.WARNING if report.dropped else logging.INFO, "%s: %s", report.source, report.summary())
    return out


def _tsv_images(path: Path, report: DataReport) -> Iterator[_ImageRecord]:
    # Binary and line by line: these files reach many GB, and base64 is ASCII anyway.
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            image_id, tab, b64 = line.partition(b"\t")
            where = f"{path}:{lineno}"
            if not tab:
                report.add_problem(MISSING_FIELD, where, "no tab between image id and base64")
                continue
            yield image_id.strip().decode("utf-8", "replace"), b64, where


def _jsonl_texts(path: Path, report: DataReport) -> Iterator[_TextRecord]:
    for obj, where in json_objects(path, report):
        if "text" not in obj or "image_ids" not in obj:
            report.add_problem(MISSING_FIELD, where, "needs text and image_ids")
        elif not isinstance(obj["image_ids"], list):
            report.add_problem(BAD_FIELD, where, "image_ids must be a list")
        else:
            yield obj["text"], obj["image_ids"], where


def _need_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise CNClipError(f"{path} does not exist; pass the official {what} file")


def read_official(
    imgs_tsv: str | os.PathLike, texts_jsonl: str | os.PathLike, out_dir: str | os.PathLike
) -> tuple[Path, DataReport]:
    """Convert the official `*_imgs.tsv` + `*_texts.jsonl` pair of files into files `read_pairs` reads.

    Writes out_dir/images/<image_id>.<ext> (the decoded bytes as they are) and out_dir/pairs.jsonl with
    one {"image": "images/<id>.<ext>", "text": ...} per (text, image id); returns that JSONL's path. The TSV
    is streamed, one image in memory at a time. Bad lines are counted in the report.
    """
    tsv, texts, out = Path(imgs_tsv), Path(texts_jsonl), Path(out_dir)
    _need_file(tsv, "image TSV (image_id<TAB>base64)")
    _need_file(texts, "texts JSONL")
    report = DataReport(source=os.fspath(texts_jsonl))
    return _convert_official(_tsv_images(tsv, report), _jsonl_texts(texts, report), out, report), report


# -- the official LMDB layout -------------------------------------------------------------------------


class _RefusedPickle(Exception):
    """A pickle that names a class or function: refused, since unpickling it could run any code."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (tuples, str, int, ...): every class or function lookup is refused."""

    def find_class(self, module: str, name: str) -> object:
        raise _RefusedPickle(f"{module}.{name}")


def _unpickle_pair(data: bytes, where: str) -> tuple[object, object, object] | None:
    """The (image_id, text_id, text) tuple in `data`; None if corrupt; CNClipError if it holds code."""
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data)).load()
    except _RefusedPickle as exc:
        raise CNClipError(
            f"{where}: the pickled record refers to {exc}, not plain data; cnclip only unpickles "
            "(image_id, text_id, text) tuples and refuses this LMDB as unsafe"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError):
        return None
    if not isinstance(obj, tuple) or len(obj) != 3:
        return None
    return obj


def _open_lmdb(lmdb: Any, path: Path) -> Any:
    if not path.is_dir():
        raise CNClipError(f"{path} does not exist; pass the official LMDB folder that holds imgs/ and pairs/")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, create=False, subdir=True)
    except lmdb.Error as exc:
        raise CNClipError(f"{path}: cannot open as an LMDB database ({exc}); check the folder is intact") from None


def _lmdb_count(txn: Any, key: bytes) -> int | None:
    value = txn.get(key)
    try:
        return int(bytes(value).decode("ascii")) if value is not None else None
    except ValueError:
        return None


def _lmdb_records(env: Any, where: str, report: DataReport) -> list[_TextRecord]:
    """Every pair record, unpickled safely, before anything is written (an unsafe LMDB leaves no files)."""
    records: list[_TextRecord] = []
    with env.begin() as txn:
        count = _lmdb_count(txn, b"num_samples")
        # The official writer numbers records 0..num_samples-1; reading by number keeps that order.
        keys: Iterable[bytes] = (
            (str(i).encode() for i in range(count))
            if count is not None
            else (k for k, _ in txn.cursor() if k != b"num_samples")
        )
        for key in keys:
            here = f"{where}:{key.decode('utf-8', 'replace')}"
            value = txn.get(key)
            record = _unpickle_pair(bytes(value), here) if value is not None else None
            if record is None:
                report.add_problem(BAD_RECORD, here, "not an (image_id, text_id, text) tuple")
                continue
            image_id, _text_id, text = record
            records.append((text, [image_id], here))
    return records


def _lmdb_images(env: Any, where: str) -> Iterator[_ImageRecord]:
    with env.begin() as txn:
        for key, value in txn.cursor():
            if key != b"num_images":
                image_id = bytes(key).decode("utf-8", "replace")
                yield image_id, bytes(value), f"{where}:{image_id}"


def read_official_lmdb(lmdb_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, DataReport]:
    """Convert an official LMDB split folder (imgs/ and pairs/) into files `read_pairs` reads, like `read_official`.

    Pair records are unpickled with an unpickler that allows plain data only; a record that refers to
    any class or function raises CNClipError before anything is written. Needs the lmdb package.
    """
    try:
        import lmdb
    except ImportError:
        raise CNClipError("reading the official LMDB layout needs the lmdb package: pip install lmdb") from None
    root, out = Path(lmdb_dir), Path(out_dir)
    report = DataReport(source=os.fspath(lmdb_dir))
    imgs_env, pairs_env = _open_lmdb(lmdb, root / "imgs"), _open_lmdb(lmdb, root / "pairs")
    try:
        records = _lmdb_records(pairs_env, str(root / "pairs"), report)
        return _convert_official(_lmdb_images(imgs_env, str(root / "imgs")), records, out, report), report
    finally:
        imgs_env.close()
        pairs_env.close()
