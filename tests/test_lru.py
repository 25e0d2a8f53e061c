"""`LRUCache`: least recently used out first, bounded by count or by size, the newest always kept."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from cnclip.lru import LRUCache


def test_the_least_recently_used_goes_first():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2 and "b" not in cache


def test_a_size_bound_counts_sizeof_and_keeps_the_newest():
    cache: LRUCache[int, bytes] = LRUCache(10, sizeof=len)
    cache.put(1, b"1234")
    cache.put(2, b"5678")
    cache.put(1, b"12")  # replacing an entry counts its new size only
    cache.put(3, b"9012")
    assert [cache.get(k) for k in (1, 2, 3)] == [b"12", b"5678", b"9012"]
    cache.put(4, b"x" * 50)  # larger than the whole bound: kept alone
    assert len(cache) == 1 and cache.get(4) == b"x" * 50


def test_maxsize_cannot_be_negative():
    with pytest.raises(ValueError, match="0 or more"):
        LRUCache(-1)


def test_threads_may_share_one():
    cache: LRUCache[int, int] = LRUCache(64)

    def work(start: int) -> None:
        for i in range(start, start + 2000):
            cache.put(i % 100, i)
            cache.get((i + 7) % 100)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(0, 8000, 2000)))
    assert len(cache) == 64
