"""What search filters need to know about a photo: when it was taken, by which camera, its size.

Read from the file's header and EXIF block only (Pillow opens lazily, so no pixel is decoded:
~1 ms a photo), at index time and for files indexed before filters existed, without re-embedding.
"When taken" is EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime), as the camera's
local wall-clock time; without EXIF it is the file's modification time in this machine's local
time. Both are stored as ISO text ("2024-07-21T18:03:11"), so date filters compare strings.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

INFO_VERSION = 1  # bump to read every file's metadata again (a new field, a fixed reader)
KINDS = ("photo", "video")

_EXIF_IFD = 0x8769
_DATE_TAGS = (0x9003, 0x9004)  # DateTimeOriginal, DateTimeDigitized (in the Exif IFD)
_DATETIME = 0x0132  # DateTime (in IFD0): when the file was last changed by the camera or an editor
_MAKE, _MODEL = 0x010F, 0x0110
_EXIF_DATE = re.compile(r"\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


@dataclass(frozen=True)
class PhotoInfo:
    """Filterable facts about one file (`taken_from`: "exif" or "file")."""

    taken: str | None  # None: no date at all (no EXIF date and a file time outside the calendar)
    taken_from: str  # "exif", "video" (the container's creation time) or "file" (modification time)
    camera: str | None = None
    width: int | None = None
    height: int | None = None
    kind: str = "photo"


def exif_date(text: object) -> str | None:
    """EXIF "2024:07:21 18:03:11" -> "2024-07-21T18:03:11"; None for blanks and impossible dates."""
    if not isinstance(text, str):
        return None
    m = _EXIF_DATE.match(text)
    if m is None:
        return None
    try:
        return dt.datetime(*map(int, m.groups())).isoformat()
    except ValueError:  # "0000:00:00 00:00:00", what some cameras write when the clock was never set
        return None


def camera_name(make: object, model: object) -> str | None:
    """Make "Apple" + model "iPhone 13" -> "Apple iPhone 13"; a model naming its make is kept as is."""
    make = make.strip("\x00 ").strip() if isinstance(make, str) else ""
    model = model.strip("\x00 ").strip() if isinstance(model, str) else ""
    if not model:
        return make or None
    if make and not model.lower().startswith(make.lower().split()[0]):
        return f"{make} {model}"
    return model


def file_time(mtime_ns: int) -> str | None:
    """The file's modification time as a local ISO date; None outside the calendar (years 1 to 9999):
    such a clock is wrong, and no date is better than an error that stops the scan."""
    try:
        return dt.datetime.fromtimestamp(mtime_ns / 1e9).replace(microsecond=0).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def read_info(path: str | os.PathLike, mtime_ns: int) -> PhotoInfo:
    """The filterable facts of the image at `path`; the file's time when it has no readable EXIF."""
    import cnclip.model.transform  # noqa: F401  (registers the HEIC/HEIF opener; loaded by any scan already)
    from cnclip.index.video import is_video, split_frame_path, video_facts

    path = split_frame_path(os.fspath(path))[0]  # a video's frame: the video's facts
    if is_video(path):
        taken, width, height = video_facts(path)
        return PhotoInfo(taken or file_time(mtime_ns), "video" if taken else "file", None, width, height, "video")

    try:
        with Image.open(path) as image:
            width, height = image.size
            exif = image.getexif()
            taken = next((d for d in (exif_date(exif.get_ifd(_EXIF_IFD).get(t)) for t in _DATE_TAGS) if d), None)
            taken = taken or exif_date(exif.get(_DATETIME))
            camera = camera_name(exif.get(_MAKE), exif.get(_MODEL))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return PhotoInfo(file_time(mtime_ns), "file")
    if taken is None:
        return PhotoInfo(file_time(mtime_ns), "file", camera, width, height)
    return PhotoInfo(taken, "exif", camera, width, height)
