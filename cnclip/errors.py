"""The exceptions cnclip raises; each message is one line naming the thing and what to do.

The CLI catches `CNClipError` and prints its message; anything else is a bug.
"""

from __future__ import annotations


class CNClipError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in cnclip."""


class ModelNotFoundError(CNClipError, LookupError):
    """A model name, path or hub id that cannot be resolved to weights."""


class CheckpointError(CNClipError, ValueError):
    """A weights file that is unreadable, truncated, or of another shape than expected."""


class VocabularyError(CNClipError, ValueError):
    """A missing or malformed WordPiece vocabulary file."""


class ImageError(CNClipError, ValueError):
    """An image file that cannot be decoded (corrupt, truncated, too large, not an image)."""


class PathError(CNClipError, ValueError):
    """A path as the user gave it that cannot be used, e.g. `~user/photos` of no such user."""


class IndexNotFoundError(CNClipError, LookupError):
    """An index path that holds no cnclip index."""


class ModelMismatchError(CNClipError, ValueError):
    """An index opened with a different model than the one that built it (vectors would not mix)."""


class QueryError(CNClipError, ValueError):
    """An empty, over-long or otherwise unusable search query."""


class IndexBusyError(CNClipError, RuntimeError):
    """Another process is writing the index (its writer lock is held)."""


class ReaderError(CNClipError, RuntimeError):
    """The word reader cannot run at all (not installed, its models do not load, no such engine).
    Unlike a picture it fails on, nothing is recorded: the next run reads every photo again."""
