"""The lines of a user's text file: labels for `cnclip tag` and zero-shot `eval`, texts for `index --texts`.

Torch-free: reading a file must not cost those commands a torch import (`index --texts` may embed
in ONNX Runtime and never need torch at all).
"""

from __future__ import annotations

import os

from cnclip.errors import CNClipError
from cnclip.userpath import expand_user

__all__ = ["read_lines"]


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (labels, texts to index), stripped."""
    try:
        text = expand_user(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise CNClipError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise CNClipError(f"{path}: not UTF-8 text; save it as UTF-8, one entry per line") from e
    except OSError as e:
        raise CNClipError(f"{path}: {e.strerror or e}") from e
    # Tabs are kept: in label files they separate a folder name from its label.
    lines = (line.strip(" \r\n\f\v\u3000") for line in text.splitlines())
    return [line for line in lines if line.strip()]
