"""Deprecated alias, kept for one release: what was `cnclip.train.data` now lives in `cnclip.train.pairs`,
`cnclip.train.batches`, `cnclip.train.official_formats` and `cnclip.train.lines`; import from those.

The torch-using names (`PairDataset`, `collate_pairs`, `unique_image_batches`) load on first use, so
`from cnclip.train.data import read_lines` stays torch-free, as it was.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cnclip.train.lines import read_lines
from cnclip.train.official_formats import (
    BAD_BASE64,
    BAD_IMAGE_ID,
    BAD_RECORD,
    DUPLICATE_IMAGE_ID,
    UNKNOWN_IMAGE_ID,
    read_official,
    read_official_lmdb,
)
from cnclip.train.pairs import (
    BAD_FIELD,
    BAD_JSON,
    EMPTY_TEXT,
    IMAGE_NOT_FOUND,
    MISSING_FIELD,
    NO_CAPTION_FILE,
    UNREADABLE_CAPTION_FILE,
    DataReport,
    Pair,
    read_pairs,
    simplified_captions,
)

if TYPE_CHECKING:
    from cnclip.train.batches import PairDataset, collate_pairs, unique_image_batches

_LAZY = {"PairDataset": "batches", "collate_pairs": "batches", "unique_image_batches": "batches"}

__all__ = [
    "BAD_BASE64",
    "BAD_FIELD",
    "BAD_IMAGE_ID",
    "BAD_JSON",
    "BAD_RECORD",
    "DUPLICATE_IMAGE_ID",
    "EMPTY_TEXT",
    "IMAGE_NOT_FOUND",
    "MISSING_FIELD",
    "NO_CAPTION_FILE",
    "UNKNOWN_IMAGE_ID",
    "UNREADABLE_CAPTION_FILE",
    "DataReport",
    "Pair",
    "PairDataset",
    "collate_pairs",
    "read_lines",
    "read_official",
    "read_official_lmdb",
    "read_pairs",
    "simplified_captions",
    "unique_image_batches",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnclip.train.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cnclip.train.{module}"), name)
    globals()[name] = value
    return value
