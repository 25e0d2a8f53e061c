"""The kinds of vector index, the sizes at which "auto" switches between them, and which kind a build makes."""

from __future__ import annotations

from cnclip.errors import CNClipError
from cnclip.index.vectors.ondisk_train import min_rows
from cnclip.index.vectors.tuning import MIN_TRAIN_PER_LIST

# Below this many vectors `kind="auto"` builds an exact IndexFlatIP. Measured on the 2-core
# build machine (scripts/bench): one exact 512-d query costs ~0.08 ms per 1,000 vectors on
# one thread (8.4 ms at 100k, 17 ms at 200k, 82 ms at 1M). At 100k exact search stays well
# inside the ~15 ms left for search in the 60 ms budget (text encoding takes 30-40 ms), with
# room for a 1024-d model (twice the cost) or a busy machine, and it is perfect, needs no
# training and is built in well under a second. Above it IVF-Flat answers in under 1 ms.
EXACT_THRESHOLD: int = 100_000

# The ANN kind `kind="auto"` picks above the threshold, and all kinds a build accepts.
ANN_KIND: str = "ivf-flat"
ONDISK_KIND: str = "ivf-pq-ondisk"
# The kinds held in RAM (cnclip.index.vectors.memory); the on-disk one is cnclip.index.vectors.ondisk.
IN_MEMORY_KINDS: tuple[str, ...] = ("exact", "ivf-flat", "ivf-sq8")
KINDS: tuple[str, ...] = (*IN_MEMORY_KINDS, ONDISK_KIND)
# From this many vectors `kind="auto"` builds the on-disk IVF-PQ index: IVF-Flat would hold
# 4*dim bytes a vector in RAM (20 GB at 10M x 512-d, most of the 24 GB build machine), the
# on-disk index ~m+8 bytes a vector on disk and only the quantizers in RAM.
ONDISK_THRESHOLD: int = 10_000_000


def choose_kind(kind: str, n: int, exact_threshold: int = EXACT_THRESHOLD) -> str:
    """The kind asked for: "auto" decided by the size `n`, any other kind checked to be one of KINDS."""
    if kind == "auto":
        return "exact" if n < exact_threshold else ONDISK_KIND if n >= ONDISK_THRESHOLD else ANN_KIND
    if kind not in KINDS:
        raise CNClipError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
    return kind


def resolve_kind(kind: str, n: int, exact_threshold: int = EXACT_THRESHOLD) -> str:
    """The kind a build makes for `kind` ("auto" or one of KINDS) and `n` vectors: the one asked
    for, or exact where there are too few vectors to train the approximate kind's quantizers."""
    kind = choose_kind(kind, n, exact_threshold)
    if kind == ONDISK_KIND:
        return "exact" if n < min_rows() else kind
    return "exact" if n < 2 * MIN_TRAIN_PER_LIST else kind
