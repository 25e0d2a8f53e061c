"""Video frames: which are sampled, how their rows are named, bad videos."""

from __future__ import annotations

import pytest
from conftest import write_video

from cnclip.index import video
from cnclip.index.video import VideoError, frame_at, frame_path, sample_frames, split_frame_path, video_facts

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def test_frame_paths_round_trip():
    assert frame_path("/a/clip.mp4", 83.5) == "/a/clip.mp4#t=83.50"
    assert split_frame_path("/a/clip.mp4#t=83.50") == ("/a/clip.mp4", 83.5)
    assert split_frame_path("/a/photo#t=1.jpg") == ("/a/photo#t=1.jpg", None)  # not a video
    assert split_frame_path("/a/clip.mp4") == ("/a/clip.mp4", None)
    assert split_frame_path("/a/x.jpg#t=1.00") == ("/a/x.jpg#t=1.00", None)


def test_one_frame_every_few_seconds_and_at_scene_changes(tmp_path):
    path = write_video(tmp_path / "v.mp4", [RED, GREEN, BLUE], seconds_each=4, gop_seconds=1)
    frames = list(sample_frames(str(path), every=5.0))
    # key frames each second; kept: 0 s, then each new colour (a scene change) 4 and 8 s in
    assert [t for t, _ in frames] == [0.0, 4.0, 8.0]
    for (_, image), color in zip(frames, [RED, GREEN, BLUE], strict=True):
        r, g, b = image.resize((1, 1)).getpixel((0, 0))
        assert max(range(3), key=lambda c: (r, g, b)[c]) == max(range(3), key=lambda c: color[c])
    same = write_video(tmp_path / "same.mp4", [RED, RED, RED], seconds_each=4, gop_seconds=1)
    assert [t for t, _ in sample_frames(str(same), every=5.0)] == [0.0, 5.0, 10.0]  # no scene change: every 5 s


def test_long_videos_are_capped(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", [RED, RED, RED], seconds_each=4, gop_seconds=1)
    assert len(list(sample_frames(str(path), every=1.0, max_frames=3))) == 3


def test_frame_at_and_facts(tmp_path):
    path = write_video(tmp_path / "v.mp4", [RED, GREEN], seconds_each=4)
    r, g, b = frame_at(str(path), 5.0).resize((1, 1)).getpixel((0, 0))
    assert g > r and g > b
    taken, width, height = video_facts(str(path))
    assert (width, height) == (96, 64) and taken is None  # PyAV writes no creation time


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x18ftypmp42" + bytes(100), b"not a video at all"])
def test_unreadable_videos_raise_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match="cannot read the video|no video stream|cannot decode"):
        list(sample_frames(str(path)))


def test_container_creation_time_is_local_time():
    assert video._local_time("2024-07-01T10:00:00.000000Z") is not None
    assert video._local_time("not a time") is None
    assert video._local_time(None) is None
