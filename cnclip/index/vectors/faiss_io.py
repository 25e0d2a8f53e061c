"""The files of a vector index folder that every kind shares, and the one way a faiss index is written."""

from __future__ import annotations

from pathlib import Path

import faiss

from cnclip import atomic
from cnclip.errors import CNClipError

# Written last by every kind: what the folder holds (its kind, sizes, recall, meta). Nothing is
# loadable before it is in place.
META_FILE = "vectors.json"
# The faiss index of the in-memory kinds (exact, ivf-flat, ivf-sq8).
INDEX_FILE = "vectors.faiss"


def write_faiss(index: faiss.Index, path: Path) -> None:
    """Publish a faiss index as `path` (cnclip.atomic); a failure is one CNClipError, never a traceback.

    faiss reports a full disk or a read-only folder as a RuntimeError with a C++ backtrace."""
    try:
        with atomic.replacing(path) as tmp:
            faiss.write_index(index, str(tmp))
    except (OSError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CNClipError(
            f"cannot write the vector index {path}: {first}; check free disk space and permissions"
        ) from e
