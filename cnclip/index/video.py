"""Videos in an index: frames sampled with PyAV, stored as rows named `VIDEO#t=SECONDS`.

Each sampled frame is a row of its own in the catalog (path `clip.mp4#t=83.5`, the video's size
and time, hash `CONTENT#t=83.5`), so the vector index, the change journal, offline folders and
filters treat it like a photo; a row at the video's own path, without a vector, records that the
video was read (as for an image that would not decode). Search folds a video's frames into one
result with the time of its best frame.

Frames: only key frames are decoded (an encoder puts them every second or two, and at scene
cuts), so a long video costs seconds, not a full decode. A key frame is kept every `every`
seconds, and sooner when the picture changed a lot since the last kept frame (a new scene);
at most `MAX_FRAMES` per video (the interval widens for long ones).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp"})
FRAME_MARK = "#t="
EVERY = 5.0  # seconds between kept frames
SCENE_GAP = 1.0  # a new scene is kept if at least this long after the last kept frame
SCENE_CHANGE = 0.12  # mean absolute difference of 16x16 grey thumbnails (0-1) that counts as a new scene
MAX_FRAMES = 1000
LIVE_PHOTO_VIDEOS = frozenset({".mov", ".mp4"})  # IMG_1234.HEIC + IMG_1234.MOV: the still is indexed


class VideoError(Exception):
    """A video that cannot be read; the message is the reason, as a skipped line shows it."""


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def frame_path(path: str, t: float) -> str:
    return f"{path}{FRAME_MARK}{t:.2f}"


def split_frame_path(path: str) -> tuple[str, float | None]:
    """`clip.mp4#t=83.50` -> ("clip.mp4", 83.5); any other path -> (path, None)."""
    base, mark, t = path.rpartition(FRAME_MARK)
    if not mark or not is_video(base):
        return path, None
    try:
        return base, float(t)
    except ValueError:
        return path, None


def _open(path: str):
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot read the video ({_why(e)})") from e
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream (sound only?)")
    return container


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def sample_frames(path: str, every: float = EVERY, max_frames: int = MAX_FRAMES) -> Iterator[tuple[float, Image.Image]]:
    """(seconds, RGB frame) for the frames worth embedding, in time order. Raises VideoError for a
    video that cannot be read at all; a video that breaks midway yields what came before."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.skip_frame = "NONKEY"
        duration = _duration(container, stream)
        if duration:
            every = max(every, duration / max_frames)
        last_t, last_thumb, kept = None, None, 0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else 0.0
                image = frame.to_image()
                thumb = np.asarray(image.convert("L").resize((16, 16)), dtype=np.float32) / 255.0
                new_scene = last_thumb is not None and float(np.abs(thumb - last_thumb).mean()) > SCENE_CHANGE
                if last_t is None or t - last_t >= every or (new_scene and t - last_t >= SCENE_GAP):
                    yield t, image.convert("RGB")
                    last_t, last_thumb, kept = t, thumb, kept + 1
                    if kept >= max_frames:
                        return
        except av.error.FFmpegError as e:
            if kept == 0:
                raise VideoError(f"cannot decode the video ({_why(e)})") from e
    finally:
        container.close()


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def frame_at(path: str, t: float) -> Image.Image:
    """The frame shown at `t` seconds (for a thumbnail): the key frame before it, decoded forward."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.time_base is not None:
            container.seek(int(t / stream.time_base), stream=stream, backward=True)
        best = None
        for frame in container.decode(stream):
            best = frame
            if frame.time is None or frame.time >= t - 1e-3:
                break
        if best is None:
            raise VideoError("no frame could be decoded")
        return best.to_image().convert("RGB")
    finally:
        container.close()


def video_facts(path: str) -> tuple[str | None, int | None, int | None]:
    """(when recorded, width, height): the time from the container's `creation_time` (UTC, as
    phones write it) as local ISO text like the photos' EXIF times, None where it does not say."""
    try:
        container = _open(path)
    except VideoError:
        return None, None, None
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width or None, stream.codec_context.height or None
        text = container.metadata.get("creation_time") or stream.metadata.get("creation_time")
    finally:
        container.close()
    return _local_time(text), width, height


def _local_time(text: str | None) -> str | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone().replace(tzinfo=None)
    return when.replace(microsecond=0).isoformat()
