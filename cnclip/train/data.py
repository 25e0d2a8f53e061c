"""Paired image-caption data: reading JSONL / CSV / sidecar-caption folders, and batching them.

Bad records (bad JSON, a missing image, an empty caption) are counted in a `DataReport` and
left out; they never stop a run. Also converts the official Chinese-CLIP layouts (base64 TSV +
texts JSONL, or LMDB) into a folder of image files and a `pairs.jsonl` that `read_pairs` reads.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import os
import pickle
import random
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cnclip import atomic
from cnclip.errors import CNClipError, ImageError
from cnclip.model.tokenizer import Tokenizer, normalize_text
from cnclip.model.transform import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image, preprocess
from cnclip.userpath import expand_user

__all__ = [
    "DataReport",
    "Pair",
    "PairDataset",
    "collate_pairs",
    "read_official",
    "read_official_lmdb",
    "read_pairs",
    "unique_image_batches",
]

log = logging.getLogger(__name__)

# The reasons a record is left out. Short and stable: scripts and tests match on them.
BAD_JSON = "bad JSON"
MISSING_FIELD = "missing field"
BAD_FIELD = "bad field"  # present but of the wrong type (a number where a path belongs)
EMPTY_TEXT = "empty text"
IMAGE_NOT_FOUND = "image not found"
NO_CAPTION_FILE = "no caption file"
UNREADABLE_CAPTION_FILE = "unreadable caption file"
BAD_BASE64 = "bad base64"
BAD_IMAGE_ID = "bad image id"
DUPLICATE_IMAGE_ID = "duplicate image id"
UNKNOWN_IMAGE_ID = "unknown image id"
BAD_RECORD = "bad record"  # an LMDB pair that is not a readable (image_id, text_id, text) tuple

_MAX_EXAMPLES = 5
_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
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


@dataclass(frozen=True)
class Pair:
    """One training or evaluation example: an image file (absolute path) and one caption."""

    image: str
    text: str


def simplified_captions(pairs: Sequence[Pair]) -> list[Pair]:
    """`pairs` with their captions in Simplified characters (OpenCC t2s), for Traditional captions."""
    from cnclip.model.chinese import to_simplified

    return [Pair(p.image, to_simplified(p.text)) for p in pairs]


@dataclass
class DataReport:
    """What reading a dataset kept and left out."""

    source: str
    kept: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few "where: reason" lines
    images: int = 0  # distinct image files among the kept pairs (read_official: files written)

    @property
    def dropped(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        """One line: what was kept and, by reason, what was dropped."""
        text = f"kept {self.kept} pairs of {self.images} images"
        if self.problems:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.problems.items(), key=lambda kv: -kv[1]))
            text += f"; dropped {self.dropped}: {reasons}"
        return text


def _problem(report: DataReport, reason: str, where: str, detail: str = "", count: int = 1) -> None:
    report.problems[reason] = report.problems.get(reason, 0) + count
    if len(report.examples) < _MAX_EXAMPLES:
        report.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


def _finish(pairs: list[Pair], report: DataReport) -> None:
    """Fill in the totals, log them, and refuse a dataset with nothing left to use."""
    report.kept = len(pairs)
    report.images = len({p.image for p in pairs})
    if not pairs:
        if report.dropped:
            raise CNClipError(
                f"{report.source}: no usable image-caption pairs ({report.summary()}; first: {report.examples[0]}); "
                "fix those records or point at another dataset"
            )
        raise CNClipError(f"{report.source}: holds no image-caption pairs; point at a file or folder that has some")
    if report.dropped:
        log.warning("%s: %s", report.source, report.summary())
    else:
        log.info("%s: %s", report.source, report.summary())


# -- reading pairs ------------------------------------------------------------------------------------


class _FileCheck:
    """os.path.isfile with a memo: several captions per image are the norm, one stat per image is enough."""

    def __init__(self) -> None:
        self._seen: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        found = self._seen.get(path)
        if found is None:
            found = self._seen[path] = os.path.isfile(path)
        return found


def _record_pairs(
    image: object, text: object, base: str, where: str, report: DataReport, is_file: _FileCheck
) -> list[Pair]:
    """The pairs of one JSONL/CSV record (a list of texts gives several); problems go to `report`."""
    if image is None or text is None:
        _problem(report, MISSING_FIELD, where)
        return []
    texts = [text] if isinstance(text, str) else text
    if not isinstance(image, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        _problem(report, BAD_FIELD, where, "image must be a string, text a string or a list of strings")
        return []
    image = image.strip()
    if not image:
        _problem(report, MISSING_FIELD, where, "empty image path")
        return []
    # Relative paths are relative to the dataset file, so a dataset folder can be moved as a whole.
    path = os.path.abspath(os.path.join(base, image))
    pairs = []
    for caption in texts or [""]:
        caption = caption.strip()
        if not caption:
            _problem(report, EMPTY_TEXT, where)
        elif not is_file(path):
            _problem(report, IMAGE_NOT_FOUND, where, image)
        else:
            pairs.append(Pair(path, caption))
    return pairs


def _not_utf8(path: str | os.PathLike, exc: UnicodeDecodeError) -> CNClipError:
    # An encoding error is a whole-file problem (often a GBK export), not one bad record.
    return CNClipError(f"{os.fspath(path)} is not UTF-8 text ({exc.reason}); re-save it as UTF-8")


def _json_objects(path: Path, report: DataReport) -> Iterator[tuple[dict, str]]:
    """(object, "file:line") for each JSON-object line; other non-blank lines are counted as bad JSON."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{os.fspath(path)}:{lineno}"
                try:
                    obj = json.loads(line)
                except ValueError:
                    _problem(report, BAD_JSON, where)
                    continue
                if isinstance(obj, dict):
                    yield obj, where
                else:
                    _problem(report, BAD_JSON, where, "not an object")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _read_jsonl(path: Path, report: DataReport) -> list[Pair]:
    base, is_file, pairs = str(path.parent.absolute()), _FileCheck(), []
    for obj, where in _json_objects(path, report):
        text = obj.get("text") if obj.get("text") is not None else obj.get("caption")
        pairs.extend(_record_pairs(obj.get("image"), text, base, where, report, is_file))
    return pairs


def _csv_columns(header: list[str], path: Path) -> tuple[int, int]:
    """Positions of the image and text (or caption) columns; CNClipError naming what is there otherwise."""
    names = [h.strip().lower() for h in header]
    text_name = "text" if "text" in names else "caption"
    if "image" not in names or text_name not in names:
        found = ", ".join(repr(h) for h in header) or "nothing"
        raise CNClipError(f"{path}: needs a header with 'image' and 'text' (or 'caption') columns; found {found}")
    return names.index("image"), names.index(text_name)


def _read_csv(path: Path, report: DataReport) -> list[Pair]:
    base, is_file, pairs = str(path.parent.absolute()), _FileCheck(), []
    try:
        # newline="" lets the csv module handle quoted fields that span lines.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=_CSV_DELIMITERS[path.suffix.lower()])
            image_col, text_col = _csv_columns(next(reader, []), path)
            while True:
                lineno = reader.line_num + 1  # where the record starts; line_num is where it ended
                row = next(reader, None)
                if row is None:
                    break
                if not any(cell.strip() for cell in row):
                    continue
                image = row[image_col] if image_col < len(row) else None
                text = row[text_col] if text_col < len(row) else None
                where = f"{report.source}:{lineno}"
                pairs.extend(_record_pairs(image or None, text, base, where, report, is_file))
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except csv.Error as exc:
        raise CNClipError(f"{path}:{reader.line_num}: malformed CSV ({exc}); fix the quoting there") from None
    return pairs


def _walk_images(root: str) -> Iterator[str]:
    """Image files under root, recursively, in sorted order, hidden files and folders left out."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(folder, name)


def _read_folder(root: Path, report: DataReport) -> list[Pair]:
    pairs = []
    for image in _walk_images(str(root.absolute())):
        sidecar = os.path.splitext(image)[0] + ".txt"
        if not os.path.isfile(sidecar):
            _problem(report, NO_CAPTION_FILE, image)
            continue
        if not os.path.isfile(image):  # a dangling symlink
            _problem(report, IMAGE_NOT_FOUND, image)
            continue
        try:
            with open(sidecar, encoding="utf-8-sig") as f:
                captions = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.reason if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
            _problem(report, UNREADABLE_CAPTION_FILE, sidecar, reason)
            continue
        if not captions:
            _problem(report, EMPTY_TEXT, sidecar)
        pairs.extend(Pair(image, caption) for caption in captions)
    return pairs


def read_pairs(source: str | os.PathLike) -> tuple[list[Pair], DataReport]:
    """Read image-caption pairs from a JSONL, CSV or TSV file, or a folder of images with .txt sidecars.

    JSONL lines are {"image": path, "text": caption or [captions]} ("caption" is accepted for "text");
    CSV/TSV need a header with image and text (or caption) columns. Relative image paths are relative
    to the file's folder. Pairs come back in file order with absolute image paths; bad records are
    counted in the report. Raises CNClipError for a missing or unknown source, or when no pair is left.
    """
    path = Path(source)
    report = DataReport(source=os.fspath(source))
    if path.is_dir():
        pairs = _read_folder(path, report)
    elif not path.is_file():
        raise CNClipError(f"{report.source} does not exist; pass a JSONL, CSV or TSV file or a folder of images")
    elif path.suffix.lower() not in (*_JSONL_SUFFIXES, *_CSV_DELIMITERS):
        raise CNClipError(
            f"{report.source}: unknown dataset type {path.suffix or '(no extension)'!r}; "
            "use .jsonl, .json (one object per line), .csv, .tsv or a folder of images with .txt captions"
        )
    else:
        read = _read_jsonl if path.suffix.lower() in _JSONL_SUFFIXES else _read_csv
        try:
            pairs = read(path, report)
        except OSError as exc:
            raise CNClipError(f"{report.source}: cannot read ({exc.strerror or exc}); check its permissions") from None
    _finish(pairs, report)
    return pairs, report


# -- batching -----------------------------------------------------------------------------------------


def _greedy_batches(order: list[int], keys: Sequence[str], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Full batches with distinct keys, filled in `order`; returns them and the indices left over.

    An index whose key is already in the current batch waits in `pending` (one queue per key) and is
    placed first in the next batches, so it is delayed by a batch or two, not sent to the end.
    """
    pending: dict[str, deque[int]] = {}
    full: list[list[int]] = []
    fresh = iter(order)
    while True:
        batch: list[int] = []
        seen: set[str] = set()
        # Pending keys are distinct from each other, so the first batch_size of them all fit.
        for key in list(islice(pending, batch_size)):
            queue = pending[key]
            batch.append(queue.popleft())
            seen.add(key)
            if not queue:
                del pending[key]
        while len(batch) < batch_size:
            i = next(fresh, None)
            if i is None:
                return full, batch + [j for queue in pending.values() for j in queue]
            if keys[i] in seen:
                pending.setdefault(keys[i], deque()).append(i)
            else:
                batch.append(i)
                seen.add(keys[i])
        full.append(batch)


def _spread_duplicates(full: list[list[int]], leftover: list[int], keys: Sequence[str]) -> None:
    """Swap repeated keys out of `leftover` into full batches that lack them, in place.

    Each swap takes back an index whose key is not in `leftover`, so batches stay duplicate-free
    and the leftover can form full batches; this is what makes an evenly dividing epoch exact.
    """
    counts = Counter(keys[i] for i in leftover)
    # A key in `leftover` never leaves it (its last index stays), so a batch position that cannot be
    # swapped out now never can: one cursor per batch, and one per key over the batches, suffice.
    members: dict[int, set[str]] = {}
    cursor: dict[int, int] = {}
    next_batch: dict[str, int] = {}

    def displace(b: int, i: int) -> int | None:
        """Put index i into batch b (counted from the end) in place of one it returns; None if it cannot."""
        batch = full[-1 - b]  # from the end, so a displaced pair moves the least in the epoch's order
        seen = members.get(b)
        if seen is None:
            seen = members[b] = {keys[j] for j in batch}
        if keys[i] in seen:
            return None
        k = cursor.get(b, 0)
        while k < len(batch) and counts[keys[batch[k]]]:
            k += 1
        cursor[b] = k
        if k == len(batch):
            return None
        j, batch[k] = batch[k], i
        seen.discard(keys[j])
        seen.add(keys[i])
        return j

    for pos, i in enumerate(leftover):
        key = keys[i]
        if counts[key] <= 1:
            continue
        b = next_batch.get(key, 0)
        while b < len(full):
            j = displace(b, i)
            b += 1
            if j is not None:
                leftover[pos] = j
                counts[key] -= 1
                counts[keys[j]] += 1
                break
        next_batch[key] = b


def _distinct_batches(indices: list[int], keys: Sequence[str], batch_size: int) -> list[list[int]]:
    """Pack indices into as few batches with distinct keys as possible, the fullest first."""
    queues: dict[str, deque[int]] = {}
    for i in indices:
        queues.setdefault(keys[i], deque()).append(i)
    batches = []
    while queues:
        # Keys with the most indices left go first, so no key is left alone in many tiny batches.
        chosen = sorted(queues, key=lambda k: -len(queues[k]))[:batch_size]
        batches.append([queues[k].popleft() for k in chosen])
        for k in chosen:
            if not queues[k]:
                del queues[k]
    return batches


def unique_image_batches(
    pairs: Sequence[Pair], batch_size: int, *, seed: int, epoch: int, drop_last: bool = True
) -> list[list[int]]:
    """Shuffled batches of indices into `pairs` in which no image appears twice.

    A repeated image in a batch would be a false negative for the contrastive loss. The order depends
    only on (seed, epoch). Every pair appears once per epoch, except those in batches smaller than
    batch_size when drop_last (at most batch_size - 1 pairs, unless one image has more captions than
    there are batches).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    keys = [p.image for p in pairs]
    order = list(range(len(keys)))
    # A string seed is hashed with SHA-512, so the order is the same in every process and Python run.
    random.Random(f"cnclip-batches:{seed}:{epoch}").shuffle(order)
    full, leftover = _greedy_batches(order, keys, batch_size)
    if leftover and full:
        _spread_duplicates(full, leftover, keys)
    tail = _distinct_batches(leftover, keys, batch_size)
    if drop_last:
        tail = [b for b in tail if len(b) == batch_size]
    return full + tail


# -- tensors for training -----------------------------------------------------------------------------


class PairDataset(torch.utils.data.Dataset):
    """Pairs as (pixels (3, s, s) float32, token ids list[int]); None for an image that will not decode."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        image_size: int,
        tokenizer: Tokenizer,
        draft: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.pairs = list(pairs)
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.draft = draft  # decode big JPEGs at reduced size in the DCT domain: much faster, nearly the same
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]] | None:
        pair = self.pairs[i]
        try:
            img = load_image(pair.image, max_pixels=self.max_pixels, draft_size=self.image_size if self.draft else None)
            pixels = preprocess(img, self.image_size)
        except (ImageError, OSError) as exc:
            # One bad file must not stop an epoch; collate_pairs drops it and counts it.
            log.warning("skipping unreadable image: %s", exc)
            return None
        return pixels, self.tokenizer.encode(normalize_text(pair.text))

    def collate(self, items: Sequence[tuple[torch.Tensor, list[int]] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`collate_pairs` with this dataset's pad id and image size (use as a DataLoader's collate_fn)."""
        return collate_pairs(items, pad_id=self.tokenizer.pad_id, image_size=self.image_size)

    # The tokenizer's per-instance word cache cannot be pickled; spawned DataLoader workers
    # (the default on macOS and Windows) rebuild the tokenizer from its vocabulary instead.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self.tokenizer, Tokenizer):
            tok = state.pop("tokenizer")
            state["_tokenizer_args"] = (str(tok.vocab_path), tok.context_length)
        return state

    def __setstate__(self, state: dict) -> None:
        args = state.pop("_tokenizer_args", None)
        self.__dict__.update(state)
        if args is not None:
            self.tokenizer = Tokenizer(args[0], context_length=args[1])


def collate_pairs(
    items: Sequence[tuple[torch.Tensor, Sequence[int] | torch.Tensor] | None],
    pad_id: int = 0,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack PairDataset items: pixels (N, 3, s, s), token ids (N, L) long padded with pad_id, and dropped.

    None items (unreadable images) are left out and counted in `dropped`. L is the longest row in the
    batch. With no item left, the tensors are empty: (0, 3, s, s) with s = image_size or 0, and (0, 0).
    """
    kept = [item for item in items if item is not None]
    dropped = len(items) - len(kept)
    if not kept:
        size = image_size or 0
        return torch.empty((0, 3, size, size)), torch.empty((0, 0), dtype=torch.long), dropped
    rows = [ids.tolist() if isinstance(ids, torch.Tensor) else list(ids) for _, ids in kept]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    return torch.stack([pixels for pixels, _ in kept]), tokens, dropped


# -- the official Chinese-CLIP layouts ----------------------------------------------------------------


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
            _problem(report, BAD_IMAGE_ID, where, image_id[:40])
            continue
        if image_id in written:
            _problem(report, DUPLICATE_IMAGE_ID, where, image_id)
            continue
        data = _b64decode(b64)
        if data is None:
            _problem(report, BAD_BASE64, where)
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
        _problem(report, BAD_FIELD, where, "text must be a string")
        return
    text = text.strip()
    if not text:
        _problem(report, EMPTY_TEXT, where, count=max(1, len(image_ids)))
        return
    for image_id in image_ids:
        name = written.get(str(image_id)) if isinstance(image_id, (int, str)) else None
        if name is None:
            _problem(report, UNKNOWN_IMAGE_ID, where, str(image_id)[:40])
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
                _problem(report, MISSING_FIELD, where, "no tab between image id and base64")
                continue
            yield image_id.strip().decode("utf-8", "replace"), b64, where


def _jsonl_texts(path: Path, report: DataReport) -> Iterator[_TextRecord]:
    for obj, where in _json_objects(path, report):
        if "text" not in obj or "image_ids" not in obj:
            _problem(report, MISSING_FIELD, where, "needs text and image_ids")
        elif not isinstance(obj["image_ids"], list):
            _problem(report, BAD_FIELD, where, "image_ids must be a list")
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
                _problem(report, BAD_RECORD, here, "not an (image_id, text_id, text) tuple")
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


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (labels, texts to index), stripped."""
    try:
        text = expand_user(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise CNClipError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise CNClipError(f"{path}: not UTF-8 text; save it as UTF-8, one entry per line") from e
    except OSError as e:
        raise CNClipError(f"{path}: {e.strerror or e}") from e
    # Tabs are kept: in label files they separate a folder name from its label.
    lines = (line.strip(" \r\n\f\v\u3000") for line in text.splitlines())
    return [line for line in lines if line.strip()]
