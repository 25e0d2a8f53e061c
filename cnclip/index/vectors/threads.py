"""How many OpenMP threads a faiss call gets: one for a few queries, all for batches and builds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss

# Batches of at most this many queries run on one thread: a single query is a memory-bound
# scan that the second core only slows down (exact 100k: 8.4 ms on 1 thread, 10.8 ms on 2).
SINGLE_THREAD_MAX_QUERIES = 4


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """faiss calls made by this thread inside the block use `n` OpenMP threads."""
    # OpenMP keeps the thread count per calling thread (libgomp allocates a thread-local
    # setting on the first omp_set_num_threads), so this cannot slow a faiss job running in
    # another Python thread.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def search_threads(queries: int) -> int:
    """The OpenMP threads a search of `queries` queries runs on."""
    return 1 if queries <= SINGLE_THREAD_MAX_QUERIES else faiss.omp_get_max_threads()
