"""The files the server sends and takes: indexed files served only from inside the indexed folders,
their JPEG thumbnails, and uploads decoded within a memory budget (`DecodeBudget`)."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fastapi import HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

from cnclip.app.serve.schemas import not_found
from cnclip.errors import ImageError
from cnclip.index.catalog import FileRecord
from cnclip.index.scan import from_catalog_path
from cnclip.index.video import VideoError, frame_at, split_frame_path

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# A 100 MP photo passes; a small file that claims a gigapixel canvas is refused before decoding.
MAX_UPLOAD_PIXELS = 100_000_000
# Memory of decoded uploads held at once by a server: two of the largest (8 bytes a pixel: the
# decoded image and its RGB copy). A request that finds it in use waits up to UPLOAD_WAIT_S, then gets 503.
UPLOAD_MEMORY_BYTES = 1600 * 2**20
UPLOAD_WAIT_S = 10.0
THUMB_SIDE = 256
# Thumbnails kept in memory, by file id (~4,000 of ~15 KB). A file id stands for one content for
# life (a changed file gets a new id), so a cached thumbnail never goes stale.
THUMB_CACHE_BYTES = 64 * 1024 * 1024


# -- indexed files --------------------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def resolve_file(record: FileRecord | None, roots: Sequence[str], file_id: int) -> str:
    """The real path of an indexed file, if it may be served; HTTP 404 otherwise.

    Its real path (symlinks resolved) must lie inside the real path of a folder that was indexed,
    so a symlink in a photo folder that points elsewhere serves nothing. An index made before
    folders were recorded falls back to the file's own folder.
    """
    if record is None:
        raise not_found(file_id)
    path = split_frame_path(from_catalog_path(record.path))[0]  # a video's frame: the video
    real = os.path.realpath(path)
    folders = [os.path.realpath(from_catalog_path(r)) for r in roots] or [os.path.realpath(os.path.dirname(path))]
    if not any(_inside(real, folder) for folder in folders):
        log.warning("not serving file %d: %s resolves to %s, outside the indexed folders", file_id, path, real)
        raise not_found(file_id)
    if not os.path.isfile(real):
        raise HTTPException(404, f"file {file_id} is no longer on disk; run cnclip index to update the index")
    return real


def make_thumbnail(path: str, side: int = THUMB_SIDE, t: float | None = None) -> bytes:
    """JPEG bytes of the image at `path` (of a video: its frame at `t` seconds) scaled to fit
    `side` x `side` (ImageError if it will not decode)."""
    from cnclip.model.transform import load_image

    if t is None:
        image = load_image(path, draft_size=side)
    else:
        try:
            image = frame_at(path, t)
        except VideoError as e:
            raise ImageError(f"{path}: {e}") from e
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


# -- uploads --------------------------------------------------------------------------------------


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """The memory that decoding a `mode` image of width x height pixels to RGB holds at its peak, as
    Pillow stores pixels (1, 2 or 4 bytes each): the decoded image plus one RGB copy (the
    conversion, or an EXIF rotation)."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * (stored + 4)


class DecodeBudget:
    """Bytes of decoded uploads that the request threads of one app may hold at once.

    A request reserves what its image takes decoded (`decoded_bytes`, from the header) before
    decoding and gives it back when its answer is made; while the budget is in use it waits, and
    after `wait_s` it gets a 503. Without it, forty uploads of a 300 KB PNG of 10000x10000 pixels
    (800 MB each decoded) were decoded at once, and the server ran out of memory."""

    def __init__(self, limit: int, wait_s: float = UPLOAD_WAIT_S):
        if limit <= 0:
            raise ValueError(f"the upload memory budget must be positive, not {limit}")
        self.limit, self.wait_s = limit, wait_s
        self.used = 0
        self.peak = 0  # the most ever reserved at once
        self._turn = threading.Condition()

    @contextmanager
    def reserve(self, size: int, name: str) -> Iterator[None]:
        """Hold `size` bytes of the budget for the with-block (HTTP 413 if it exceeds all of it, 503 after waiting)."""
        if size > self.limit:
            raise HTTPException(
                413, f"{name} takes {size // 2**20} MB to decode; this server decodes at most {self.limit // 2**20} MB"
            )
        with self._turn:
            if not self._turn.wait_for(lambda: self.used + size <= self.limit, timeout=self.wait_s):
                raise HTTPException(
                    503,
                    f"busy decoding other large images; send {name} again in a few seconds",
                    headers={"Retry-After": str(max(1, round(self.wait_s)))},
                )
            self.used += size
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._turn:
                self.used -= size
                self._turn.notify_all()


@contextmanager
def decoded_upload(upload: UploadFile, budget: DecodeBudget, draft_size: int | None = None) -> Iterator[Image.Image]:
    """An uploaded image, decoded while its memory is reserved in `budget` (until the with-block ends).

    Oversized (413) and non-image (415) uploads are refused from the header, before decoding.
    `draft_size`: JPEGs decode at a reduced scale whose sides stay >= it (and reserve that much)."""
    data, name = _upload_bytes(upload)
    mode, width, height = _upload_header(data, name, draft_size)
    with budget.reserve(decoded_bytes(mode, width, height), name):
        yield _decode_upload(data, name, draft_size)


def _upload_bytes(upload: UploadFile) -> tuple[bytes, str]:
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    name = upload.filename or "the upload"
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    if not data:
        raise HTTPException(400, f"{name} is empty")
    return data, name


def _upload_header(data: bytes, name: str, draft_size: int | None) -> tuple[str, int, int]:
    """(mode, width, height) the image will decode to, read from its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:  # the header only
                width, height = probe.size
                if draft_size is not None and width * height <= MAX_UPLOAD_PIXELS:
                    probe.draft("RGB", (draft_size, draft_size))  # as load_image will: JPEG's reduced scale
                mode, decoded = probe.mode, probe.size
    except UnidentifiedImageError as e:
        raise HTTPException(415, f"{name} is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from e
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name} has too many pixels (at most {MAX_UPLOAD_PIXELS:,})") from e
    except Exception as e:  # Pillow reports a bad header with many exception types
        raise ImageError(f"{name}: unreadable image header") from e
    if width * height > MAX_UPLOAD_PIXELS:
        raise HTTPException(413, f"{name} is {width}x{height} pixels; at most {MAX_UPLOAD_PIXELS:,} are accepted")
    return mode, *decoded


def _decode_upload(data: bytes, name: str, draft_size: int | None) -> Image.Image:
    from cnclip.model.transform import load_image

    # load_image reads a file: that keeps one decoder (EXIF rotation, modes, caps) for every image
    suffix = os.path.splitext(name)[1][:10] if re.fullmatch(r"[\w.\-]*", os.path.splitext(name)[1]) else ""
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(tmp.name, max_pixels=MAX_UPLOAD_PIXELS, draft_size=draft_size)
        except ImageError as e:
            raise ImageError(str(e).replace(tmp.name, name)) from None
