"""`expand_user`: `~` and `~user` expanded, or one line saying what to give instead of a RuntimeError."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnclip.errors import CNClipError, PathError
from cnclip.userpath import expand_user


def test_home_and_plain_paths_are_expanded_as_pathlib_does(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_user("~/photos") == tmp_path / "photos"
    assert expand_user(Path("rel/x")) == Path("rel/x")


def test_a_user_that_does_not_exist_is_a_one_line_cnclip_error():
    with pytest.raises(PathError) as caught:
        expand_user("~nosuchuser-cnclip/photos/2024")
    assert isinstance(caught.value, CNClipError) and isinstance(caught.value, ValueError)
    assert str(caught.value) == "cannot expand ~nosuchuser-cnclip: no such user; give the full path"
