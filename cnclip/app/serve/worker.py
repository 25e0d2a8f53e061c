"""The index's own thread: `IndexWorker` owns the `Index` and runs every call on it (the catalog's
SQLite connection refuses other threads); the calls the routes send there; the `--watch` thread
started and stopped with the app."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cnclip.app.serve.schemas import not_found
from cnclip.index.catalog import FileRecord
from cnclip.index.filters import SearchFilter
from cnclip.index.index import Hit, Index
from cnclip.index.query import FILE, TEXT, Term
from cnclip.index.scan import from_catalog_path
from cnclip.index.video import split_frame_path
from cnclip.lru import LRUCache
from cnclip.model.runtime import Runtime
from cnclip.model.zeroshot import TextHit

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cnclip.index.watch import WatchBatch, Watcher

T = TypeVar("T")


class IndexWorker:
    """Owns the `Index` on one thread; `run(fn, ...)` calls `fn(index, ...)` there and returns its result."""

    def __init__(self, path: str | os.PathLike, runtime: Runtime | None, t2s: bool | None = None):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cnclip-index")
        try:
            # serving: follows the catalog in memory, never makes a request wait for a whole-file
            # write or a rebuild; `cnclip index` (the writer) saves the vector files
            self.index: Index = self._pool.submit(Index.open, path, runtime=runtime, serving=True, t2s=t2s).result()
        except BaseException:
            self._pool.shutdown()
            raise

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, self.index, *args).result()

    def close(self) -> None:
        self._pool.submit(self.index.close).result()
        self._pool.shutdown()


def folder_watcher(
    index_path: str | os.PathLike,
    folders: Sequence[str | os.PathLike],
    runtime: Runtime | None,
    poll: float | None,
    on_batch: Callable[[WatchBatch], None] | None,
) -> Watcher | None:
    """A `Watcher` keeping `folders` current (with its own writer `Index` and model), or None for no folders."""
    if not folders:
        return None
    from cnclip.index.watch import Watcher

    return Watcher(index_path, folders, runtime=runtime, poll=poll, on_batch=on_batch)


def lifespan(worker: IndexWorker, watching: Watcher | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the watcher runs while the app does; the worker closes after it."""

    @asynccontextmanager
    async def running(app: FastAPI) -> AsyncIterator[None]:
        if watching is not None:
            try:
                watching.start()
            except BaseException:
                worker.close()
                raise
        yield
        if watching is not None:
            await asyncio.to_thread(watching.stop)  # it may finish an embedding batch first
        worker.close()

    return running


@dataclass(frozen=True)
class Filters:
    """Filter parameters of a search request; `where` makes the `SearchFilter` on the index's thread."""

    after: str | None = None
    before: str | None = None
    within: tuple[str, ...] = ()
    kind: str | None = None
    camera: str | None = None
    min_size: str | None = None
    max_size: str | None = None

    def where(self, index: Index) -> SearchFilter:
        return index.filter(
            after=self.after,
            before=self.before,
            folders=self.within,
            kind=self.kind,
            camera=self.camera,
            min_size=self.min_size,
            max_size=self.max_size,
        )


NO_FILTERS = Filters()


# -- calls run on the index's thread (`IndexWorker.run(fn, ...)`) -----------------------------------


def warm_up(index: Index) -> int:
    """Load the model, run the text tower once and bring the vector index up to date; the model's input size."""
    index.encoder.embed_texts(["预热"])
    index.refresh()
    return index.encoder.config.vision.image_size


def frame_time(index: Index, file_id: int) -> float | None:
    """The time of a video frame's row (None for a photo)."""
    record = index.catalog.files_by_ids([file_id]).get(file_id)
    return None if record is None else split_frame_path(record.path)[1]


def words_of(index: Index, file_id: int) -> dict | None:
    """What was read in the file (`Catalog.words_of_file`)."""
    return index.catalog.words_of_file(file_id)


def servable(index: Index, file_id: int) -> tuple[FileRecord | None, dict[str, float]]:
    """The catalog's record of `file_id` (None if there is none) and the indexed folders, for `resolve_file`."""
    return index.catalog.files_by_ids([file_id]).get(file_id), index.catalog.roots()


def stats(index: Index, cache: LRUCache[tuple, dict]) -> tuple[dict, dict[str, float]]:
    """`Index.stats()` (which reads the saved vector index) once per committed change to the
    catalog (new files, or a batch of words read while the files stay the same), and the scanned folders."""
    token = index.catalog.change_token()  # read first: a write after it makes the entry stale
    found = cache.get(token)
    if found is None:
        index.refresh()  # so the saved vector index it reports is the current one
        found = index.stats()
        cache.put(token, found)
    return found, index.catalog.roots()


def rebuild_status(index: Index) -> dict:
    """`Index.rebuild_status()` once a background rebuild that has finished is taken in (or its failure counted)."""
    index.refresh()
    return index.rebuild_status()


def _indexed_path(index: Index, file_id: int) -> str:
    """The path of an indexed file that has a stored vector (searches use the vector, never the file)."""
    record = index.catalog.files_by_ids([file_id]).get(file_id)
    if record is None or index.catalog.vector_for_path(record.path) is None:
        raise not_found(file_id)
    return from_catalog_path(record.path)


def combined(
    index: Index, q: str, nots: list[str], like: int | None, k: int, filters: Filters, words: str = "auto"
) -> list[Hit]:
    """The text, minus each of `nots`, plus the indexed photo `like` (itself left out), filtered;
    a text alone uses the words read in photos as `words` says (see `Index.search_text`)."""
    where = filters.where(index)
    if not nots and like is None:
        return index.search_text(q, k, where=where, words=words)
    terms = [Term(TEXT, q)] + [Term(TEXT, text, -1.0) for text in nots]
    if like is not None:
        _indexed_path(index, like)  # 404 for an id not in the index, as /api/similar answers
        terms.append(Term(FILE, like))
    return index.search_combined(terms, k, where=where)


def similar(index: Index, file_id: int, k: int, filters: Filters) -> list[Hit]:
    """Images like the indexed `file_id`, itself left out."""
    return index.search_image(_indexed_path(index, file_id), k, where=filters.where(index))


def texts(index: Index, file_id: int, k: int, collection: str | None) -> list[TextHit]:
    """The indexed texts closest to the indexed image `file_id`."""
    return index.search_texts_by_image(_indexed_path(index, file_id), k, collection)
