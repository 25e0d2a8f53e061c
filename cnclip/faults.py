"""Named fault points: the moments where a crash or an I/O error must not lose or corrupt anything.

Writers call `point("catalog.after_commit")` and the like at each such moment. Normally that is
one dictionary look-up. With `$CNCLIP_FAULT` set, the process dies there (SIGKILL, as `kill -9`:
no cleanup, no `finally`) or raises an injected OSError, so tests can stop a real `cnclip`
process at every moment that matters instead of at a random time:

    CNCLIP_FAULT=catalog.after_commit          die the first time that point is reached
    CNCLIP_FAULT=catalog.after_commit@3        die the third time
    CNCLIP_FAULT=atomic.before_rename=ENOSPC   raise OSError(ENOSPC) there instead

`POINTS` lists every point, so a test can loop over all of them and fail when one is never reached.
"""

from __future__ import annotations

import errno
import os
import signal

from cnclip.errors import CNClipError

__all__ = ["FAULT_ENV", "POINTS", "check", "point"]

FAULT_ENV = "CNCLIP_FAULT"

POINTS: dict[str, str] = {
    "catalog.before_commit": "a catalog write transaction is complete but not committed",
    "catalog.after_commit": "a catalog write transaction has just committed",
    "scan.before_sweep": "a scan has walked and embedded everything, before it removes what it did not see",
    "atomic.mid_write": "half of a file's new content is written to its temporary",
    "atomic.before_rename": "a file's new content is on disk under its temporary name",
    "atomic.after_rename": "a file's new content has replaced the old, the folder not yet flushed",
    "vectors.between_files": "a vector file is saved, its meta file not yet",
    "ondisk.before_meta": "an on-disk index's lists are written, its meta file not yet",
    "download.mid": "part of a download is written to its .part file",
    "words.after_batch": "a batch of photos' words is committed, the next not begun",
    "words.load_reader": "the word reader is about to load its models",
}


def _parse(spec: str | None) -> tuple[str, int, str] | None:
    if not spec:
        return None
    name, _, action = spec.partition("=")
    name, _, nth = name.partition("@")
    if name not in POINTS:
        raise CNClipError(f"${FAULT_ENV} names no fault point {name!r}; known: {', '.join(sorted(POINTS))}")
    if action and action != "kill" and not isinstance(getattr(errno, action, None), int):
        raise CNClipError(f"${FAULT_ENV}: {action!r} is neither 'kill' nor an errno name such as ENOSPC")
    if not nth.isdigit() and nth:
        raise CNClipError(f"${FAULT_ENV}: {nth!r} after @ is not a count; write {name}@3")
    return name, int(nth or 1), action or "kill"


try:
    _ARMED, _PROBLEM = _parse(os.environ.get(FAULT_ENV)), None
except CNClipError as e:  # said by `check`, where the caller reports errors; never at import
    _ARMED, _PROBLEM = None, e
_reached: dict[str, int] = {}


def check() -> None:
    """Raise the CNClipError of a `$CNCLIP_FAULT` that names no point (the CLI calls this first)."""
    if _PROBLEM is not None:
        raise _PROBLEM


def point(name: str) -> None:
    """Mark the named moment; dies or raises there when `$CNCLIP_FAULT` asks for it."""
    if _ARMED is None or _ARMED[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != _ARMED[1]:
        return
    action = _ARMED[2]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, action)
    raise OSError(code, f"{os.strerror(code)} (injected at {name})")
