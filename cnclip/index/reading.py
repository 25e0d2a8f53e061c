"""The second stage of indexing: reading the words in every photo (and video key frame) whose
vector is committed.

Vectors come first, so searching by what a photo looks like works while its words are read.
Words are recorded per content (vector), a batch per transaction: a run killed at any point
keeps every batch it committed and the next run reads only what is left; a copy or a restored
photo is never read twice; a photo whose content changed is new content and is read again.
A photo the reader fails on keeps its vector and gets one line (recorded, so it is not retried
until its content changes). A photo that cannot be got at (deleted since, its drive unmounted or
dropped, permission refused) is not recorded: the next run reads it if it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cnclip import faults
from cnclip.errors import CNClipError, ReaderError
from cnclip.index.catalog import Catalog
from cnclip.index.scan import Progress, from_catalog_path
from cnclip.index.video import VideoError, frame_at, split_frame_path
from cnclip.index.words import tokens
from cnclip.model.ocr import READER, Line, WordReader

log = logging.getLogger(__name__)

BATCH = 16  # photos per committed transaction: at most this much reading is lost to a kill


@dataclass
class ReadSummary:
    """What one reading pass did: photos read, of which with words, and those it could not read."""

    read: int = 0
    with_words: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    # could not be opened or read through now (gone, offline, refused): not recorded, tried again next run
    unreachable: list[tuple[str, str]] = field(default_factory=list)
    stopped: bool = False  # asked to stop before the end; the next run goes on
    engine: str = ""  # what ran the reader's models (onnxruntime, openvino)

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "with_words": self.with_words,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "unreachable": [{"path": p, "reason": r} for p, r in self.unreachable],
            "stopped": self.stopped,
            "engine": self.engine,
        }


@dataclass(frozen=True)
class _Unreachable:
    """A photo that could not be opened or read through (it went away, or its drive dropped or
    refused): not recorded, so the next run tries it again."""

    reason: str


def _io_error(error: BaseException | None) -> OSError | None:
    """The operating system's error behind `error`, if any: one with an errno (ENOENT, EIO,
    ESTALE, EACCES...). A decoder's complaint about the data itself has none."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__
    return None


def _read_one(reader: WordReader, path: str) -> list[Line] | str | _Unreachable:
    """The lines in one photo, or in one key frame of a video (its frame decoded again: a seek to
    the key frame it was embedded from); a one-line reason when it cannot be read (recorded: the
    same content would fail again), or `_Unreachable` when the file cannot be got at now."""
    file, t = split_frame_path(from_catalog_path(path))
    try:
        return reader.read_file(file) if t is None else reader.read(frame_at(file, t))
    except ReaderError:
        raise  # no photo's fault: nothing is recorded, and the run stops with this one line
    except (CNClipError, VideoError, OSError) as e:
        if isinstance(e, OSError):  # the file went away or became unreadable since it was embedded
            reason = f"{file}: {e.strerror or e}"
        else:
            reason = str(e) if t is None else f"{file} at {t:g} s: {e}"
        return _Unreachable(reason) if _io_error(e) is not None else reason


def _read_content(reader: WordReader, paths: list[str]) -> tuple[str, list[Line] | str | _Unreachable]:
    """(the path read, what `_read_one` gave) for one content indexed under `paths`: a copy that
    can be got at stands in for one that cannot (a photo kept both on a laptop and on a NAS that
    is not mounted just now)."""
    first: tuple[str, _Unreachable] | None = None
    for path in paths:
        result = _read_one(reader, path)
        if not isinstance(result, _Unreachable):
            return path, result
        first = first or (path, result)
    assert first is not None  # every content has a path
    return first


def read_words(
    catalog: Catalog,
    reader: WordReader,
    *,
    root: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    retry_failed: bool = False,
) -> ReadSummary:
    """Read the words of every photo under `root` (catalog path; None: the whole index) not read
    yet, and with `retry_failed` those it failed on before (same content: the failure is kept
    until then, so that an ordinary run does not spend the reader on them again)."""
    counts = catalog.words_progress(root)
    summary = ReadSummary()
    todo, after = counts["photos"] - counts["read"] + (counts["failed"] if retry_failed else 0), 0
    # Two threads: one picture decodes while the one before it is read (the reader takes one
    # picture at a time and keeps both cores busy).
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cnclip-words") as pool:
        while not summary.stopped:
            batch = catalog.photos_to_read(root, after=after, limit=BATCH, retry_failed=retry_failed)
            if not batch:
                break
            after = batch[-1][0]
            futures = [pool.submit(_read_content, reader, paths) for _, paths in batch]
            rows = []
            for (vector_id, _), future in zip(batch, futures, strict=True):
                if should_stop is not None and should_stop():
                    summary.stopped = True
                    break
                path, result = future.result()
                if isinstance(result, _Unreachable):  # gone or offline since it was embedded
                    log.warning("cannot get at %s to read its words now: %s", from_catalog_path(path), result.reason)
                    summary.unreachable.append((from_catalog_path(path), result.reason))
                    continue
                if isinstance(result, str):
                    log.warning("cannot read the words in %s: %s", from_catalog_path(path), result)
                    summary.failed.append((from_catalog_path(path), result))
                    rows.append((vector_id, [], result, ""))
                    continue
                summary.with_words += bool(result)
                text = "\n".join(line.text for line in result)
                rows.append((vector_id, [line.to_dict() for line in result], None, tokens(text)))
            for future in futures:  # stopped: the ones not started yet are dropped, unrecorded
                future.cancel()
            catalog.put_words(READER, rows)
            faults.point("words.after_batch")
            summary.read += len(rows)
            if progress is not None:
                progress(Progress(summary.read, max(todo, summary.read)))
    summary.engine = reader.engine  # read last: an engine picked for the CPU may have fallen back
    return summary
