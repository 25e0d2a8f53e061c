"""Paths as users type them: a leading `~` or `~user` expanded, or a one-line error saying what to give."""

from __future__ import annotations

import os
from pathlib import Path

from cnclip.errors import PathError


def expand_user(path: str | os.PathLike[str]) -> Path:
    """`path` with a leading `~` or `~user` expanded; PathError when that home folder is unknown.

    `Path.expanduser` raises a bare RuntimeError there, which reached users as a traceback (CLI) or
    an internal error (server); every path a user gives goes through here instead."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:
        head = Path(path).parts[0]
        why = "no home folder is known ($HOME is not set)" if head == "~" else "no such user"
        raise PathError(f"cannot expand {head}: {why}; give the full path") from e
