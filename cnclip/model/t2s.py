"""Traditional -> Simplified Chinese for text on its way into the model (OpenCC's `t2s` profile).

Chinese-CLIP learned from Simplified captions, so a query typed in Traditional characters
(Taiwan, Hong Kong) reaches tokens the model saw rarely or never. Converting first lets one model
serve both. Simplified text passes through unchanged (bar a handful of characters that both scripts
share with different uses, which OpenCC's phrase tables mostly keep), so the conversion is on for
queries by default; `--no-t2s` or `$CNCLIP_T2S=0` keeps text as typed.

Torch-free; OpenCC loads on first use (~20 ms) and converts a query in microseconds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from cnclip.errors import CNClipError

T2S_ENV = "CNCLIP_T2S"  # 1/0: the default for queries when no option says otherwise
DEFAULT_T2S = True  # measured on Flickr8k-CN val: see the README, "Traditional Chinese queries"

_converter = None
_lock = threading.Lock()


def t2s_default() -> bool:
    """`$CNCLIP_T2S` (1/0, yes/no, on/off) if set, else `DEFAULT_T2S`."""
    value = os.environ.get(T2S_ENV, "").strip().lower()
    if not value:
        return DEFAULT_T2S
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise CNClipError(f"${T2S_ENV} is {value!r}; set it to 1 (convert Traditional to Simplified) or 0 (keep as typed)")


def _t2s():
    global _converter
    with _lock:
        if _converter is None:
            try:
                import opencc
            except ImportError as e:
                raise CNClipError(
                    "Traditional->Simplified conversion needs OpenCC: pip install opencc (or pass --no-t2s)"
                ) from e
            _converter = opencc.OpenCC("t2s")
        return _converter


def to_simplified(text: str) -> str:
    """`text` with Traditional characters and phrases in their Simplified form (OpenCC t2s)."""
    if text.isascii():  # nothing to convert, and no need to load OpenCC for English or paths
        return text
    converter = _t2s()
    with _lock:  # one shared converter; a conversion takes microseconds
        return converter.convert(text)


def to_simplified_all(texts: Sequence[str]) -> list[str]:
    return [to_simplified(t) for t in texts]
