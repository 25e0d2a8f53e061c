"""The on-disk vector index's old module path: `from cnclip.index.ondisk import OnDiskIndex` keeps working.

Kept for compatibility for one release (the README's examples used it); the code lives in
cnclip.index.vectors (ondisk, ondisk_build, ondisk_train, ondisk_files). Import from there.
"""

from __future__ import annotations

from cnclip.index.vectors.ondisk import KIND, RERANK_FACTOR, OnDiskIndex
from cnclip.index.vectors.ondisk_build import SHARD_ROWS
from cnclip.index.vectors.ondisk_files import remove_files
from cnclip.index.vectors.ondisk_train import min_rows

__all__ = ["KIND", "RERANK_FACTOR", "SHARD_ROWS", "OnDiskIndex", "min_rows", "remove_files"]
