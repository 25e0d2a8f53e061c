"""`LRUCache`: a bounded mapping that drops the least recently used entries first.

cnclip's caches are per object and keyed by what makes an entry valid (a catalog change token,
a file id), which `functools.lru_cache` cannot express; this one class serves them all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `maxsize` of `sizeof(value)` (default: 1 per entry, so `maxsize` entries), least
    recently used dropped first; the newest entry is always kept, even when it alone is larger.
    Values are never None (`get` answers None for a missing key). Safe to share between threads."""

    def __init__(self, maxsize: int, sizeof: Callable[[V], int] | None = None):
        if maxsize < 0:
            raise ValueError(f"an LRU cache's maxsize must be 0 or more, not {maxsize}")
        self.maxsize = maxsize
        self._sizeof = sizeof
        self._items: OrderedDict[K, V] = OrderedDict()
        self._size = 0  # the sum of sizeof() over the entries
        self._lock = threading.Lock()

    def _size_of(self, value: V) -> int:
        return 1 if self._sizeof is None else self._sizeof(value)

    def get(self, key: K) -> V | None:
        """The value stored for `key`, now the most recently used, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Store `value` as the most recently used, then drop the least recently used past `maxsize`."""
        with self._lock:
            if key in self._items:
                self._size -= self._size_of(self._items.pop(key))
            self._items[key] = value
            self._size += self._size_of(value)
            while self._size > self.maxsize and len(self._items) > 1:
                self._size -= self._size_of(self._items.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
