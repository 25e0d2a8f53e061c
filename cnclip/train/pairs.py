"""Reading image-caption pairs: JSONL, CSV and TSV files, and folders of images with sidecar captions.

Bad records (bad JSON, a missing image, an empty caption) are counted in a `DataReport` and left
out; they never stop a run. Torch-free, so commands that only read files load quickly.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cnclip.errors import CNClipError
from cnclip.model.transform import IMAGE_EXTENSIONS

__all__ = ["DataReport", "Pair", "json_objects", "read_pairs", "simplified_captions"]

log = logging.getLogger(__name__)

# The reasons a record is left out. Short and stable: scripts and tests match on them.
BAD_JSON = "bad JSON"
MISSING_FIELD = "missing field"
BAD_FIELD = "bad field"  # present but of the wrong type (a number where a path belongs)
EMPTY_TEXT = "empty text"
IMAGE_NOT_FOUND = "image not found"
NO_CAPTION_FILE = "no caption file"
UNREADABLE_CAPTION_FILE = "unreadable caption file"

_MAX_EXAMPLES = 5
_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class Pair:
    """One training or evaluation example: an image file (absolute path) and one caption."""

    image: str
    text: str


def simplified_captions(pairs: Sequence[Pair]) -> list[Pair]:
    """`pairs` with their captions in Simplified characters (OpenCC t2s), for Traditional captions."""
    from cnclip.model.t2s import to_simplified

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

    def add_problem(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        """Count `count` records left out for `reason`; the first few keep "where: reason (detail)"."""
        self.problems[reason] = self.problems.get(reason, 0) + count
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


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
        report.add_problem(MISSING_FIELD, where)
        return []
    texts = [text] if isinstance(text, str) else text
    if not isinstance(image, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        report.add_problem(BAD_FIELD, where, "image must be a string, text a string or a list of strings")
        return []
    image = image.strip()
    if not image:
        report.add_problem(MISSING_FIELD, where, "empty image path")
        return []
    # Relative paths are relative to the dataset file, so a dataset folder can be moved as a whole.
    path = os.path.abspath(os.path.join(base, image))
    pairs = []
    for caption in texts or [""]:
        caption = caption.strip()
        if not caption:
            report.add_problem(EMPTY_TEXT, where)
        elif not is_file(path):
            report.add_problem(IMAGE_NOT_FOUND, where, image)
        else:
            pairs.append(Pair(path, caption))
    return pairs


def _not_utf8(path: str | os.PathLike, exc: UnicodeDecodeError) -> CNClipError:
    # An encoding error is a whole-file problem (often a GBK export), not one bad record.
    return CNClipError(f"{os.fspath(path)} is not UTF-8 text ({exc.reason}); re-save it as UTF-8")


def json_objects(path: Path, report: DataReport) -> Iterator[tuple[dict, str]]:
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
                    report.add_problem(BAD_JSON, where)
                    continue
                if isinstance(obj, dict):
                    yield obj, where
                else:
                    report.add_problem(BAD_JSON, where, "not an object")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _read_jsonl(path: Path, report: DataReport) -> list[Pair]:
    base, is_file, pairs = str(path.parent.absolute()), _FileCheck(), []
    for obj, where in json_objects(path, report):
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
            report.add_problem(NO_CAPTION_FILE, image)
            continue
        if not os.path.isfile(image):  # a dangling symlink
            report.add_problem(IMAGE_NOT_FOUND, image)
            continue
        try:
            with open(sidecar, encoding="utf-8-sig") as f:
                captions = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.reason if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
            report.add_problem(UNREADABLE_CAPTION_FILE, sidecar, reason)
            continue
        if not captions:
            report.add_problem(EMPTY_TEXT, sidecar)
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
