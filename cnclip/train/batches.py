"""Batching pairs for training: image-unique batches of indices, the tensors of a batch, their collation.

A contrastive batch must not hold one image twice (it would be its own false negative), so the
batches are built here, not by a random sampler; `PairDataset` and `collate_pairs` feed a DataLoader.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from itertools import islice

import torch

from cnclip.errors import ImageError
from cnclip.model.tokenizer import Tokenizer, normalize_text
from cnclip.model.transform import DEFAULT_MAX_PIXELS, load_image, preprocess
from cnclip.train.pairs import Pair

__all__ = ["PairDataset", "collate_pairs", "unique_image_batches"]

log = logging.getLogger(__name__)


def _greedy_batches(order: list[int], keys: Sequence[str], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Full batches with distinct keys, filled in `order`; returns them and the indices left over.

    An index whose key is already in the current batch waits in `pending` (one queue per key) and is
    placed first in the next batches, so it is delayed by a batch or two, not sent to the end.
    """
    pending: dict[str, deque[int]] = {}
    full: list[list[int]] = []
    fresh = iter(order)
    while True:
        batch: list[int] = []
        seen: set[str] = set()
        # Pending keys are distinct from each other, so the first batch_size of them all fit.
        for key in list(islice(pending, batch_size)):
            queue = pending[key]
            batch.append(queue.popleft())
            seen.add(key)
            if not queue:
                del pending[key]
        while len(batch) < batch_size:
            i = next(fresh, None)
            if i is None:
                return full, batch + [j for queue in pending.values() for j in queue]
            if keys[i] in seen:
                pending.setdefault(keys[i], deque()).append(i)
            else:
                batch.append(i)
                seen.add(keys[i])
        full.append(batch)


def _spread_duplicates(full: list[list[int]], leftover: list[int], keys: Sequence[str]) -> None:
    """Swap repeated keys out of `leftover` into full batches that lack them, in place.

    Each swap takes back an index whose key is not in `leftover`, so batches stay duplicate-free
    and the leftover can form full batches; this is what makes an evenly dividing epoch exact.
    """
    counts = Counter(keys[i] for i in leftover)
    # A key in `leftover` never leaves it (its last index stays), so a batch position that cannot be
    # swapped out now never can: one cursor per batch, and one per key over the batches, suffice.
    members: dict[int, set[str]] = {}
    cursor: dict[int, int] = {}
    next_batch: dict[str, int] = {}

    def displace(b: int, i: int) -> int | None:
        """Put index i into batch b (counted from the end) in place of one it returns; None if it cannot."""
        batch = full[-1 - b]  # from the end, so a displaced pair moves the least in the epoch's order
        seen = members.get(b)
        if seen is None:
            seen = members[b] = {keys[j] for j in batch}
        if keys[i] in seen:
            return None
        k = cursor.get(b, 0)
        while k < len(batch) and counts[keys[batch[k]]]:
            k += 1
        cursor[b] = k
        if k == len(batch):
            return None
        j, batch[k] = batch[k], i
        seen.discard(keys[j])
        seen.add(keys[i])
        return j

    for pos, i in enumerate(leftover):
        key = keys[i]
        if counts[key] <= 1:
            continue
        b = next_batch.get(key, 0)
        while b < len(full):
            j = displace(b, i)
            b += 1
            if j is not None:
                leftover[pos] = j
                counts[key] -= 1
                counts[keys[j]] += 1
                break
        next_batch[key] = b


def _distinct_batches(indices: list[int], keys: Sequence[str], batch_size: int) -> list[list[int]]:
    """Pack indices into as few batches with distinct keys as possible, the fullest first."""
    queues: dict[str, deque[int]] = {}
    for i in indices:
        queues.setdefault(keys[i], deque()).append(i)
    batches = []
    while queues:
        # Keys with the most indices left go first, so no key is left alone in many tiny batches.
        chosen = sorted(queues, key=lambda k: -len(queues[k]))[:batch_size]
        batches.append([queues[k].popleft() for k in chosen])
        for k in chosen:
            if not queues[k]:
                del queues[k]
    return batches


def unique_image_batches(
    pairs: Sequence[Pair], batch_size: int, *, seed: int, epoch: int, drop_last: bool = True
) -> list[list[int]]:
    """Shuffled batches of indices into `pairs` in which no image appears twice.

    A repeated image in a batch would be a false negative for the contrastive loss. The order depends
    only on (seed, epoch). Every pair appears once per epoch, except those in batches smaller than
    batch_size when drop_last (at most batch_size - 1 pairs, unless one image has more captions than
    there are batches).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    keys = [p.image for p in pairs]
    order = list(range(len(keys)))
    # A string seed is hashed with SHA-512, so the order is the same in every process and Python run.
    random.Random(f"cnclip-batches:{seed}:{epoch}").shuffle(order)
    full, leftover = _greedy_batches(order, keys, batch_size)
    if leftover and full:
        _spread_duplicates(full, leftover, keys)
    tail = _distinct_batches(leftover, keys, batch_size)
    if drop_last:
        tail = [b for b in tail if len(b) == batch_size]
    return full + tail


# -- tensors for training -----------------------------------------------------------------------------


class PairDataset(torch.utils.data.Dataset):
    """Pairs as (pixels (3, s, s) float32, token ids list[int]); None for an image that will not decode."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        image_size: int,
        tokenizer: Tokenizer,
        draft: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.pairs = list(pairs)
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.draft = draft  # decode big JPEGs at reduced size in the DCT domain: much faster, nearly the same
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]] | None:
        pair = self.pairs[i]
        try:
            img = load_image(pair.image, max_pixels=self.max_pixels, draft_size=self.image_size if self.draft else None)
            pixels = preprocess(img, self.image_size)
        except (ImageError, OSError) as exc:
            # One bad file must not stop an epoch; collate_pairs drops it and counts it.
            log.warning("skipping unreadable image: %s", exc)
            return None
        return pixels, self.tokenizer.encode(normalize_text(pair.text))

    def collate(self, items: Sequence[tuple[torch.Tensor, list[int]] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`collate_pairs` with this dataset's pad id and image size (use as a DataLoader's collate_fn)."""
        return collate_pairs(items, pad_id=self.tokenizer.pad_id, image_size=self.image_size)

    # The tokenizer's per-instance word cache cannot be pickled; spawned DataLoader workers
    # (the default on macOS and Windows) rebuild the tokenizer from its vocabulary instead.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self.tokenizer, Tokenizer):
            tok = state.pop("tokenizer")
            state["_tokenizer_args"] = (str(tok.vocab_path), tok.context_length)
        return state

    def __setstate__(self, state: dict) -> None:
        args = state.pop("_tokenizer_args", None)
        self.__dict__.update(state)
        if args is not None:
            self.tokenizer = Tokenizer(args[0], context_length=args[1])


def collate_pairs(
    items: Sequence[tuple[torch.Tensor, Sequence[int] | torch.Tensor] | None],
    pad_id: int = 0,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack PairDataset items: pixels (N, 3, s, s), token ids (N, L) long padded with pad_id, and dropped.

    None items (unreadable images) are left out and counted in `dropped`. L is the longest row in the
    batch. With no item left, the tensors are empty: (0, 3, s, s) with s = image_size or 0, and (0, 0).
    """
    kept = [item for item in items if item is not None]
    dropped = len(items) - len(kept)
    if not kept:
        size = image_size or 0
        return torch.empty((0, 3, size, size)), torch.empty((0, 0), dtype=torch.long), dropped
    rows = [ids.tolist() if isinstance(ids, torch.Tensor) else list(ids) for _, ids in kept]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    return torch.stack([pixels for pixels, _ in kept]), tokens, dropped
