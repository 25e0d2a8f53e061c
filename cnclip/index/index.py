"""`Index`: an index folder as users see it — add folders and texts, search every direction.

One ranking routine (`_top_k` over a `VectorStore`) serves text->image, image->image and
image->text; the catalog stays the record and the FAISS file is rebuilt whenever it is stale.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cnclip import atomic
from cnclip.errors import CNClipError, ModelMismatchError, PathError, QueryError
from cnclip.index import reading
from cnclip.index.catalog import CATALOG_FILE, Catalog, ModelIdentity
from cnclip.index.filters import SearchFilter, parse_date, parse_size
from cnclip.index.lock import WriterLock
from cnclip.index.query import Term, combine_terms
from cnclip.index.reading import ReadSummary
from cnclip.index.scan import Indexer, IndexSummary, Progress, from_catalog_path, to_catalog_path
from cnclip.index.vectors import ONDISK_KIND, Selection, VectorIndex, VectorStore
from cnclip.index.video import split_frame_path
from cnclip.index.words import WordQuery, matching_lines
from cnclip.lru import LRUCache
from cnclip.model.cpu import onnxruntime_available
from cnclip.model.ocr import WordReader, default_reader
from cnclip.model.onnx_runtime import TextEncoder
from cnclip.model.runtime import Runtime
from cnclip.model.t2s import t2s_default, to_simplified_all
from cnclip.model.transform import load_image
from cnclip.model.zeroshot import TextHit, check_query
from cnclip.userpath import expand_user

if TYPE_CHECKING:  # the model's modules load torch, open_clip and transformers (~7 s): only when needed
    from cnclip.model.clip import CNClipModel
    from cnclip.model.encoder import Encoder

log = logging.getLogger(__name__)

INDEX_ENV = "CNCLIP_INDEX"
DEFAULT_INDEX = Path("index") / "default"
# Below this many changed files `refresh` always updates the saved vector index in place.
_SYNC_MIN_REBUILD = 10_000
# Background rebuilds of every serving Index of the process take turns (each holds a whole index).
_REBUILD_TURN = threading.Lock()
# After a background rebuild fails (out of memory, a full disk) the next waits this long, doubled
# per failure in a row up to the maximum: a failure that repeats must not rebuild back to back.
REBUILD_RETRY_S = 5.0
REBUILD_RETRY_MAX_S = 300.0
FILTER_CACHE_SIZE = 16  # recent filters' selected file ids kept per open index, until the catalog changes
QUERY_CACHE_SIZE = 1024  # recent query embeddings kept per open index (2 KB each at 512-d)
PREPROCESSING = "squash-bicubic-clip-meanstd"
VECTOR_KIND_META = "vector_kind"  # catalog meta: the vector index kind the user chose
WORD_MODES = ("auto", "only", "off")  # how `search_text` uses the words read in photos
AUTO_WORDS_MIN_CHARS = 2  # "auto" puts word matches first from this many characters (猫 alone: by the picture)
OCR_ENV = "CNCLIP_OCR"  # 1/0: whether `cnclip index` reads words in photos by default (default 1)


def ocr_default() -> bool:
    """Whether indexing reads words in photos when no option says: `$CNCLIP_OCR` (1/0), else yes."""
    value = os.environ.get(OCR_ENV, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise CNClipError(f"${OCR_ENV} is {value!r}; set it to 1 (read words in photos) or 0 (don't)")


@dataclass(frozen=True)
class Hit:
    """One search result: a file path and its cosine similarity (`id`: the file's catalog id)."""

    path: str
    score: float
    id: int | None = None
    t: float | None = None  # a video: the time (seconds) of its best-matching frame
    # found by the words read in it: the lines that hold the query, each {"text", "spans": [[start, end], ...]}
    words: tuple[dict, ...] | None = None

    def to_dict(self) -> dict:
        extra = ({} if self.t is None else {"t": self.t}) | ({} if self.words is None else {"words": list(self.words)})
        return {"path": self.path, "score": self.score} | extra


def _load(source: str | os.PathLike) -> CNClipModel:
    from cnclip.model.checkpoint import load_model

    return load_model(source)  # on the CPU: the encoder puts what runs elsewhere where it runs


def _encoder(runtime: Runtime | None, model: CNClipModel) -> Encoder:
    """`runtime.build(model)` (without a runtime: the model as it is); where "auto" measures per
    machine (and may run the text tower in PyTorch), the fp32 text tower is first exported for ONNX
    Runtime (once per model, seconds), so that later one-shot searches need no torch at all
    (`Index._embed_texts`)."""
    from cnclip.model.encoder import Encoder

    if runtime is None:
        return Encoder.build(model)
    if runtime.calibrate and onnxruntime_available():
        from cnclip.model.onnx_export import export_cached

        try:
            export_cached(model, "text")
        except (OSError, CNClipError) as e:  # searches still work, through the model
            log.warning("could not export the text tower for quick searches: %s", e)
    return runtime.build(model)


def default_index_path() -> Path:
    """The index used when none is named: see `default_index_choice`."""
    return default_index_choice()[0]


def default_index_choice() -> tuple[Path, str]:
    """(the index used when none is named, why): `$CNCLIP_INDEX`; else `./index/default` where the
    current folder has one (the repository layout, and indexes made before the per-user default);
    else the per-user one in the platform's data folder (`~/.local/share/cnclip/index/default` on
    Linux), so that every command finds it from any folder."""
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV]), f"${INDEX_ENV}"
    if (DEFAULT_INDEX / CATALOG_FILE).is_file():
        return DEFAULT_INDEX, "./index/default exists in the current folder"
    from platformdirs import user_data_path  # honours $XDG_DATA_HOME on Linux

    return user_data_path("cnclip", appauthor=False) / "index" / "default", "the per-user default"


def model_identity(model: CNClipModel | Encoder, source: str) -> ModelIdentity:
    return ModelIdentity(
        name=model.config.name,
        source=source,
        digest=model.weights_digest(),
        dim=model.embed_dim,
        image_size=model.config.vision.image_size,
        preprocessing=PREPROCESSING,
    )


def _in_background(build: Callable[[], VectorStore]) -> Future[VectorStore]:
    """`build()` on a daemon thread once the rebuilds started before it are done; its result as a Future.

    Not a ThreadPoolExecutor: the interpreter joins those threads at exit, so Ctrl+C on a server
    waited out a rebuild of minutes whose result (a serving rebuild writes nothing) was thrown away."""
    job: Future[VectorStore] = Future()

    def run() -> None:
        with _REBUILD_TURN:
            if not job.set_running_or_notify_cancel():
                return
            try:
                job.set_result(build())
            except BaseException as e:  # noqa: BLE001 - handed to whoever reads the result
                job.set_exception(e)

    threading.Thread(target=run, name="cnclip-rebuild", daemon=True).start()
    return job


class Index:
    """An index folder: a SQLite catalog (the record) plus a derived FAISS file."""

    def __init__(
        self,
        catalog: Catalog,
        encoder: Encoder | None = None,
        runtime: Runtime | None = None,
        vector_kind: str = "auto",
        serving: bool = False,
        t2s: bool | None = None,
    ):
        self.catalog = catalog
        # Text queries (and added texts) go through Traditional->Simplified before the model.
        self.t2s = t2s_default() if t2s is None else t2s
        self._encoder = encoder
        self._runtime = runtime
        # What `refresh` builds: "auto" (exact, IVF-Flat, or on disk past ONDISK_THRESHOLD) or a kind.
        # A kind the user chose is recorded in the catalog, so that every later reader keeps it.
        if vector_kind != "auto" and catalog.get_meta(VECTOR_KIND_META) != vector_kind:
            catalog.set_meta(VECTOR_KIND_META, vector_kind)
        self.vector_kind = catalog.get_meta(VECTOR_KIND_META) or vector_kind
        # A long-running reader (a server): it never writes the vector files (a request must not
        # wait for a whole-file write) and rebuilds in the background while the old index answers.
        self.serving = serving
        self.lock = WriterLock(catalog.folder)
        self._images: VectorStore | None = None
        self._images_generation: int | None = None
        self._rebuilding: Future[VectorStore] | None = None
        self._rebuild_failures = 0  # in a row, since the last background rebuild that succeeded
        self._rebuild_error: str | None = None
        self._rebuild_retry_at = 0.0  # time.monotonic() before which no background rebuild starts
        # Recent query embeddings: a server sees the same queries again and again (paging,
        # refreshes), and the text tower is most of a query's cost.
        self._query_vectors: LRUCache[str, np.ndarray] = LRUCache(QUERY_CACHE_SIZE)
        self._text_encoder: TextEncoder | None = None
        # The files recent filters selected: the page repeats one filter for every query typed,
        # and reading the selection costs a pass over the catalog (~0.5 s per 10^6 files).
        self._selected: LRUCache[tuple, Selection] = LRUCache(FILTER_CACHE_SIZE)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        model: CNClipModel | Encoder | str | None = None,
        create: bool = False,
        runtime: Runtime | None = None,
        vector_kind: str = "auto",
        serving: bool = False,
        t2s: bool | None = None,
    ) -> Index:
        """Open (or with `create`, make) the index at `path` (default: `default_index_path()`).

        `model` may be an `Encoder`, a loaded model or anything `load_model` takes; by default the
        index's own model is loaded when first needed. A model other than the index's is refused.
        A model runs as `runtime` says (e.g. `Runtime.resolve()`: ONNX Runtime on CPUs); without
        one, as loaded (PyTorch fp32 on the CPU). An encoder runs as it was built. `vector_kind` is
        the vector index kind `refresh` builds ("auto" or one of `cnclip.index.vectors.KINDS`, e.g.
        "ivf-pq-ondisk"); a kind given here is recorded in the index and kept by every later
        reader. `serving=True` is for a long-running reader such as `cnclip serve` (see
        `refresh`). `t2s` converts text queries from Traditional to Simplified Chinese first
        (default: `$CNCLIP_T2S`, else on).
        """
        # The model first: a model that fails to load must not leave an empty index folder behind.
        loaded = _load(model) if isinstance(model, str | os.PathLike) else model
        catalog = Catalog.open(Path(path) if path is not None else default_index_path(), create=create)
        try:
            index = cls(catalog, runtime=runtime, vector_kind=vector_kind, serving=serving, t2s=t2s)
            if loaded is not None:
                # refused before the encoder is built: on AMX "auto" measures the model (tens of
                # seconds) first, which a model of another index must not cost
                index._bind(loaded)
                from cnclip.model.encoder import Encoder  # torch is loaded already: a model is

                index._encoder = loaded if isinstance(loaded, Encoder) else _encoder(runtime, loaded)
        except BaseException:
            catalog.close()
            raise
        return index

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model --------------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """What embeds for this index: its model, loaded when first needed and run as `runtime` says."""
        if self._encoder is None:
            identity = self.catalog.identity
            if identity is None:
                raise ModelMismatchError(f"{self.catalog.folder} has no model yet; index a folder first")
            model = _load(identity.source)
            self._bind(model)
            self._encoder = _encoder(self._runtime, model)
        return self._encoder

    @property
    def model(self) -> Encoder:
        """Deprecated for one release: `encoder`, which embeds as `Index.model` did."""
        warnings.warn(
            "Index.model is Index.encoder now (an Encoder: embed_texts and embed_images as before)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.encoder

    def _bind(self, model: CNClipModel | Encoder) -> None:
        """Record `model`'s identity in the catalog; a model other than the index's is refused."""
        recorded = self.catalog.identity
        # a model built in memory has no source: keep the recorded one, else its zoo name
        source = model.source or (recorded.source if recorded else None) or model.config.name or "unknown"
        identity = model_identity(model, source)
        if identity != recorded:  # only write when something changed: search must not queue behind `index`
            self.catalog.bind_model(identity)  # raises ModelMismatchError on a different model

    # -- adding -----------------------------------------------------------------------------------

    def add_folder(
        self,
        folder: str | os.PathLike,
        *,
        progress: Callable[[Progress], None] | None = None,
        wait: float = 0.0,
        **options,
    ) -> IndexSummary:
        """Bring the index up to date with `folder` (recursively); see `Indexer` for options.

        Holds the index's writer lock, waiting up to `wait` seconds for another writer
        (IndexBusyError after that), and saves the vector index at the end."""
        expand_user(folder)  # `~user` of no such user: one line here, not a RuntimeError from the scan
        with self.lock.hold(wait):
            atomic.remove_stale_temps(self.catalog.folder)  # a killed writer's, now that no other writes
            summary = Indexer(self.encoder, self.catalog, **options).run(folder, progress)
            self.refresh()
        return summary

    def add_texts(self, texts: Sequence[str], collection: str = "default") -> int:
        """Add texts (for image->text search); returns how many were new."""
        texts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        known = self.catalog.known_texts(texts, collection)
        new = [t for t in texts if t not in known]
        if not new:
            return 0
        return self.catalog.add_texts(new, self.encoder.embed_texts(self._model_texts(new)), collection)

    def _model_texts(self, texts: list[str]) -> list[str]:
        """Texts as the model reads them: in Simplified characters unless `t2s` is off."""
        return to_simplified_all(texts) if self.t2s else texts

    # -- searching --------------------------------------------------------------------------------

    def refresh(self) -> VectorStore:
        """The image vector index, brought up to date with the catalog if the catalog changed.

        The index held in memory follows the catalog in place (vectors of new file ids added,
        vanished ids removed), at a cost that grows with the change, not with the index: the
        file is not read again. Only the writer (the process holding the lock, e.g. `add_folder`)
        saves it. Without one in memory, the saved index is loaded and brought up to date the
        same way. A large change, or one that would leave the index far from what a fresh build
        makes (`VectorStore.needs_rebuild`), rebuilds it from one snapshot of the catalog; when
        `serving`, in a background thread while the old index keeps answering (its results may
        lag the catalog until the swap). A saved index of another kind than `vector_kind` asks
        for is rebuilt; with "auto" an on-disk index stays on disk.
        """
        generation = self.catalog.generation()  # read first: a write after it makes us stale, not wrong
        held = self._swap_in_rebuilt() or self._images
        if held is not None and (self._images_generation == generation or self._rebuilding is not None):
            return held  # current, or a rebuild is on its way: no journal read per request meanwhile
        index = self._sync(held) if held is not None else self._load_current(generation)
        if index is None and held is not None and self.serving and self._rebuild_in_background():
            return held
        if index is None:
            index = self._rebuild()  # saved by `_build` where this process may write
            generation = int(index.meta["generation"])
        elif index.meta.get("generation") != generation:
            index.meta["generation"] = generation
            if self.lock.held:
                self._save(index)
        # The on-disk kind's PQ codes alone gave recall@10 ~0.75 at 10^6; exact re-ranking from
        # the catalog ~0.997. The kinds that hold exact vectors ignore it.
        index.set_reranker(self.catalog.vectors_for_ids)
        self._images, self._images_generation = index, generation
        return index

    def _rebuild_in_background(self) -> bool:
        """Start (or keep) a rebuild on another thread; False for the on-disk kind, which is built
        in the folder under the writer lock and so stays in the caller's thread."""
        if self._rebuilding is None:
            if time.monotonic() < self._rebuild_retry_at:
                return True  # backing off after a failure: the old index keeps answering meanwhile
            kind = self._wanted_kind(self._images)
            if VectorIndex.resolve_kind(kind, self.catalog.count()) == ONDISK_KIND:
                return False
            self._rebuilding = _in_background(self._rebuild)
            log.info("rebuilding the vector index of %s in the background", self.catalog.folder)
        return True

    def _swap_in_rebuilt(self) -> VectorStore | None:
        """The index a background rebuild finished, now in use; None while none has finished."""
        job = self._rebuilding
        if job is None or not job.done():
            return None
        self._rebuilding = None
        try:
            index = job.result()
        except Exception as e:  # noqa: BLE001 - the old index stays in use; a refresh after the back-off tries again
            self._rebuild_failures += 1
            wait = min(REBUILD_RETRY_S * 2 ** min(self._rebuild_failures - 1, 20), REBUILD_RETRY_MAX_S)
            self._rebuild_retry_at = time.monotonic() + wait
            self._rebuild_error = " ".join(str(e).split()) or type(e).__name__  # MemoryError() says nothing
            log.warning(
                "rebuilding the vector index of %s failed (%d in a row): %s; trying again in %.0f s",
                self.catalog.folder,
                self._rebuild_failures,
                self._rebuild_error,
                wait,
            )
            return None
        self._rebuild_failures, self._rebuild_error, self._rebuild_retry_at = 0, None, 0.0
        self._images, self._images_generation = index, int(index.meta["generation"])
        return index

    def rebuild_status(self) -> dict:
        """The background rebuild of a serving index: whether one is running, how many failed in a
        row since the last success, the last failure's message and the seconds until the next try."""
        job = self._rebuilding
        return {
            "running": job is not None and not job.done(),
            "failures": self._rebuild_failures,
            "last_error": self._rebuild_error,
            "retry_in_s": round(max(0.0, self._rebuild_retry_at - time.monotonic()), 1),
        }

    def _wanted_kind(self, saved: VectorStore | None) -> str:
        if self.vector_kind == "auto" and saved is not None and saved.kind == ONDISK_KIND:
            return ONDISK_KIND  # it was chosen for a collection too large for RAM
        return self.vector_kind

    def _load_current(self, generation: int) -> VectorStore | None:
        """The saved vector index, brought up to date in memory; None when a rebuild is due.

        A one-shot process maps the file and pages in only what its searches touch; a serving one
        reads it into memory at once, because the first change it follows would otherwise copy the
        whole mapped file while a request waits (13 s at 10^6 x 512-d on this VM's disk)."""
        saved = VectorIndex.load(self.catalog.folder, mmap=not self.serving)
        if saved is None:
            return None
        kind = self._wanted_kind(saved)
        if kind != "auto" and saved.kind != VectorIndex.resolve_kind(kind, saved.ntotal):
            return None
        identity = self.catalog.identity
        if identity is not None and saved.dim != identity.dim:
            return None
        if not self._built_from_this_catalog(saved):
            log.info(
                "the saved vector index of %s was built from another catalog or history: rebuilding",
                self.catalog.folder,
            )
            return None
        return saved if saved.meta.get("generation") == generation else self._sync(saved)

    def _built_from_this_catalog(self, index: VectorStore) -> bool:
        """Whether `index` was built from this catalog and up to a point of its own history: the
        catalog's identity, and the change-journal entry at the position it was brought up to.

        A vector file next to a catalog moved in from elsewhere, or next to one restored from a
        backup (an older journal, or one that has since gone its own way), says so here and is
        rebuilt; a generation counter alone can match by chance."""
        if index.meta.get("catalog_id") != self.catalog.catalog_id():
            return False
        seq = index.meta.get("changes_seq")
        if not isinstance(seq, int) or seq > self.catalog.change_seq():
            return False  # a position past the newest entry: stale, not "nothing new"
        mark = self.catalog.journal_mark(seq)
        if mark is None:  # dropped from the journal since: nothing to compare, the ids are diffed
            return seq <= self.catalog.journal_pruned()
        return mark == index.meta.get("changes_mark")

    def _rebuild(self) -> VectorStore:
        """A new vector index from one snapshot of the catalog (its generation in `meta`).

        The on-disk kind is built inside the index folder, which only the lock holder may write:
        a reader takes the lock if it is free, and otherwise says that a writer is at work."""
        kind = self._wanted_kind(VectorIndex.load(self.catalog.folder) if self.vector_kind == "auto" else None)
        with self.catalog.snapshot() as snap:
            total = snap.count()
            if VectorIndex.resolve_kind(kind, total) == ONDISK_KIND and not self.lock.held:
                with self.lock.hold(wait=0.0):
                    return self._build(snap, kind, total)
            return self._build(snap, kind, total)

    def _build(self, snap: Catalog, kind: str, total: int) -> VectorStore:
        identity = snap.identity
        dim = identity.dim if identity else self.encoder.embed_dim
        # A function, not an iterator: the on-disk kind reads the catalog twice.
        index = VectorIndex.build_streaming(
            snap.file_vectors, total=total, dim=dim, kind=kind, folder=self.catalog.folder
        )
        index.meta["generation"] = snap.generation()
        index.meta["catalog_id"] = snap.catalog_id()
        index.meta["changes_seq"] = seq = snap.change_seq()
        index.meta["changes_mark"] = snap.journal_mark(seq)
        if self.lock.held:
            self._save(index)
        elif not self.serving and self.lock.try_acquire():
            try:  # no writer at work: save it, so the next process need not build it again
                self._save(index)
            finally:
                self.lock.release()
        return index

    def _save(self, index: VectorStore) -> None:
        try:
            index.save(self.catalog.folder)
        except (OSError, CNClipError) as e:  # a read-only or full disk: search still works from memory
            log.warning("could not save the vector index in %s: %s", self.catalog.folder, e)

    def _sync(self, index: VectorStore) -> VectorStore | None:
        """Apply the catalog's changes since `index` was built or synced, in place; None when a
        rebuild is better. Reads the catalog's change journal: the cost follows the change."""
        if not self._built_from_this_catalog(index):
            return None
        seq = index.meta.get("changes_seq")
        changes = self.catalog.changes_since(int(seq)) if seq is not None else None
        if changes is None:  # built before the journal existed, or too far behind it
            seq = self.catalog.change_seq()  # first: what happens during the diff is replayed next time
            wanted, held = self.catalog.file_ids(), index.ids()
            changes = (np.setdiff1d(wanted, held, True), np.setdiff1d(held, wanted, True), seq)
        added, removed, seq = changes
        after = index.ntotal - removed.size + added.size
        # Past half of the index changed, a build is about as cheap and gives fresh IVF cells.
        if added.size + removed.size > max(_SYNC_MIN_REBUILD, index.ntotal // 2) or index.needs_rebuild(ntotal=after):
            return None
        index.remove(removed)
        if added.size:
            vectors = self.catalog.vectors_for_ids(added)
            present = ~np.isnan(vectors[:, 0])  # NaN: removed again since
            index.add(added[present], vectors[present])
        index.meta["changes_seq"] = int(seq)
        index.meta["changes_mark"] = self.catalog.journal_mark(int(seq))
        log.debug("vector index synced: %d added, %d removed", added.size, removed.size)
        return index

    def stats(self) -> dict:
        """What the index holds, without loading the model or touching the vector index:
        counts, the model record, and the saved vector index (kind, recall, whether current)."""
        identity = self.catalog.identity
        videos, frames = self.catalog.frame_count()
        saved = VectorIndex.load(self.catalog.folder)
        vectors = None
        if saved is not None:
            vectors = saved.info()
            # the change journal follows the set of searchable images only (texts do not touch it)
            vectors["current"] = (
                self._built_from_this_catalog(saved) and saved.meta["changes_seq"] == self.catalog.change_seq()
            )
            del vectors["memory_mapped"]
        return {
            "index": str(self.catalog.folder),
            "images": self.catalog.count() - frames,
            "videos": videos,
            "offline": self.catalog.offline_count(),
            "unused_vectors": self.catalog.unused_vectors(),
            "texts": self.catalog.text_count(),
            "words": self.catalog.words_progress(),
            "model": None
            if identity is None
            else {"name": identity.name, "source": identity.source, "digest": identity.digest, "dim": identity.dim},
            "vector_index": vectors,
            "precisions": self.catalog.precision_counts(),
            "runtime": self.runtime_choice(),
        }

    def runtime_choice(self) -> dict | None:
        """How this index's model runs here and why (None without a runtime or a model): the
        loaded model's, else the cached measurement for its weights, else that it is not measured yet."""
        if self._encoder is not None and self._encoder.runtime is not None:
            return self._encoder.runtime.to_dict()
        identity = self.catalog.identity
        if self._runtime is None or identity is None:
            return None
        chosen = self._runtime.for_digest(identity.digest)
        if chosen is None:
            return {**self._runtime.to_dict(), "reason": self._runtime.reason + "; not measured yet for this model"}
        return chosen.to_dict()

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings, without loading the model when its text tower was exported before and
        the runtime runs text in ONNX Runtime: the same vectors, seconds sooner."""
        identity = self.catalog.identity
        if self._encoder is None and self._runtime is not None and identity is not None:
            # a choice measured per model is read from its cache; not measured yet: load the model
            chosen = self._runtime.for_digest(identity.digest)
            onnx = chosen is not None and "text" in chosen.onnx_towers
            # ... except in a one-shot process ("auto" on a CPU with fast bf16, not serving): importing
            # torch and loading the model (~4 s) never pays back its 2-7 ms per query over ONNX
            # Runtime's ~15 ms, so an exported text tower answers, measured or not
            onnx = onnx or (self._runtime.calibrate and not self.serving)
            if self._text_encoder is None and onnx:
                self._text_encoder = TextEncoder.cached(identity.digest)
            if self._text_encoder is not None:
                return self._text_encoder.embed_texts(texts)
        return self.encoder.embed_texts(texts)

    def search_text(self, query: str, k: int = 10, where: SearchFilter | None = None, words: str = "auto") -> list[Hit]:
        """Text -> images, best first; `where` (from `filter`) limits which files may be returned.

        `words`: "auto" ranks the photos whose words (read by `read_words`) contain the query
        first (a query of two characters or more), by how much they also look like it, then every
        other photo by the picture alone; "only" returns just the photos with the words; "off"
        ranks by the picture alone."""
        if words not in WORD_MODES:
            raise QueryError(f"words must be one of {', '.join(WORD_MODES)}, not {words!r}")
        vector = self.query_vector(query)
        wanted = None if words == "off" else WordQuery.parse(query)
        if (
            words == "auto"
            and wanted is not None
            and (wanted.chars < AUTO_WORDS_MIN_CHARS or not self.catalog.has_words())
        ):
            wanted = None  # one character is in too many photos' words to rank them above the pictures
        if wanted is None:
            return [] if words == "only" else self._image_hits(vector, k, where)
        matched = self._word_hits(vector, wanted, k, where)
        if words == "only" or len(matched) >= k:
            return matched[:k]
        taken = {h.path for h in matched}
        rest = [h for h in self._image_hits(vector, k + len(taken), where) if h.path not in taken]
        return matched + rest[: k - len(matched)]

    def _word_hits(self, vector: np.ndarray, wanted: WordQuery, k: int, where: SearchFilter | None) -> list[Hit]:
        """The best `k` of the photos whose words match, by their picture's score, with the lines matched."""
        if k < 1:
            raise QueryError(f"k must be at least 1, not {k}")
        ids = self.catalog.word_file_ids(wanted.fts)
        if where is not None and not where.empty and len(ids):
            ids = np.intersect1d(ids, self._selection(where).ids, assume_unique=False)
        if len(ids) == 0:
            return []
        scores, found = self.refresh().search_within(vector, k, Selection(ids))
        keep = found[0] >= 0
        hits, _ = self._fold_videos(found[0][keep].tolist(), scores[0][keep].tolist())
        lines = self.catalog.words_for_ids([h.id for h in hits])
        return [replace(h, words=tuple(matching_lines(lines.get(h.id, []), wanted.terms))) for h in hits]

    def words_of(self, path: str | os.PathLike) -> dict | None:
        """What was read in the indexed photo at `path`: {"lines": [{"text", "score", "box"}],
        "error", "reader"}, or None when its words were not read yet. Raises PathError for a
        file that is not in the index."""
        absolute = os.path.abspath(expand_user(path))
        file_id = self.catalog.file_id_for_path(to_catalog_path(absolute))
        if file_id is None:
            raise PathError(f"{absolute} is not in this index ({self.catalog.folder}); index its folder first")
        return self.catalog.words_of_file(file_id)

    def read_words(
        self,
        folder: str | os.PathLike | None = None,
        *,
        reader: WordReader | None = None,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        wait: float = 0.0,
        retry_failed: bool = False,
    ) -> ReadSummary:
        """Read the words in the indexed photos (under `folder`, or all) not read yet, and with
        `retry_failed` those the reader failed on; see `cnclip.index.reading`. Holds the writer
        lock, as `add_folder` does."""
        root = None if folder is None else to_catalog_path(os.path.abspath(expand_user(folder)))
        with self.lock.hold(wait):
            return reading.read_words(
                self.catalog,
                reader or default_reader(),
                root=root,
                progress=progress,
                should_stop=should_stop,
                retry_failed=retry_failed,
            )

    def query_vector(self, query: str) -> np.ndarray:
        """The (1, D) embedding of a text query, from a small cache of recent queries."""
        query = self._model_texts([check_query(query)])[0]
        vector = self._query_vectors.get(query)
        if vector is None:
            vector = self._embed_texts([query])
            self._query_vectors.put(query, vector)
        return vector

    def search_image(
        self,
        image: Image.Image | str | os.PathLike,
        k: int = 10,
        exclude_self: bool = True,
        where: SearchFilter | None = None,
    ) -> list[Hit]:
        """Image -> similar images; an indexed query file is left out of its own results by default."""
        vector, self_path = self._image_vector(image)
        self_path = split_frame_path(self_path)[0] if self_path else None  # a frame: its whole video
        hits = self._image_hits(vector, k + 1 if self_path and exclude_self else k, where)
        if self_path and exclude_self:
            hits = [h for h in hits if h.path != self_path][:k]
        return hits

    def search_combined(
        self, terms: Sequence[Term], k: int = 10, exclude_self: bool = True, where: SearchFilter | None = None
    ) -> list[Hit]:
        """Images closest to a weighted sum of texts and images (`cnclip.index.query.Term`), best first.

        Text terms go through `query_vector`; indexed images and file ids use their stored vectors
        and are left out of the results by default, as in `search_image`."""
        vector, own = combine_terms(terms, self.query_vector, self._image_vector, self._file_vector)
        own = {split_frame_path(p)[0] for p in own} if exclude_self else set()  # a video frame: its whole video
        hits = self._image_hits(vector, k + len(own) if k > 0 else k, where)  # k < 1 is refused there
        return [h for h in hits if h.path not in own][:k]

    def search_texts_by_image(
        self, image: Image.Image | str | os.PathLike, k: int = 10, collection: str | None = None
    ) -> list[TextHit]:
        """Image -> closest texts added with `add_texts`."""
        ids, vectors = self.catalog.text_vectors(collection)
        if len(ids) == 0:
            return []
        query, _ = self._image_vector(image)
        scores, found = VectorIndex.build(ids, vectors, kind="exact").search(query, k)
        texts = self.catalog.texts_by_ids(found[0].tolist())
        return [TextHit(texts[i], float(s)) for i, s in zip(found[0].tolist(), scores[0].tolist(), strict=True)]

    def _image_vector(self, image) -> tuple[np.ndarray, str | None]:
        if isinstance(image, Image.Image):
            return self.encoder.embed_images([image]), None
        path = os.path.abspath(expand_user(image))
        stored = self.catalog.vector_for_path(to_catalog_path(path))
        if stored is not None:  # already indexed: no need to decode and embed it again
            return stored[None, :].astype(np.float32), path
        return self.encoder.embed_images([load_image(path)]), None

    def _file_vector(self, file_id: int) -> tuple[np.ndarray, str]:
        record = self.catalog.files_by_ids([file_id]).get(file_id)
        stored = None if record is None else self.catalog.vector_for_path(record.path)
        if stored is None:
            raise QueryError(f"no indexed file with id {file_id}; take file ids from search results")
        return stored[None, :].astype(np.float32), from_catalog_path(record.path)

    def _image_hits(self, vectors: np.ndarray, k: int, where: SearchFilter | None = None) -> list[Hit]:
        if k < 1:
            raise QueryError(f"k must be at least 1, not {k}")
        query = np.ascontiguousarray(vectors, dtype=np.float32)
        fetch = k
        while True:
            if where is None or where.empty:
                scores, ids = self.refresh().search(query, fetch)
            else:
                scores, ids = self._filtered_search(query, fetch, where)
            hits, folded = self._fold_videos(ids[0].tolist(), scores[0].tolist())
            # a video is one result however many of its frames match: ask for more until k files
            if len(hits) >= k or not folded or ids.shape[1] < fetch or fetch >= len(self.refresh()):
                return hits[:k]
            fetch *= 4

    def _fold_videos(self, ids: list[int], scores: list[float]) -> tuple[list[Hit], bool]:
        """Hits in rank order, a video's frames folded into its best one; whether any were folded."""
        records = self.catalog.files_by_ids(ids)
        hits, seen, folded = [], set(), False
        for i, score in zip(ids, scores, strict=True):
            if i not in records:  # a file removed since the vector index was built
                continue
            path, t = split_frame_path(from_catalog_path(records[i].path))
            if path in seen:
                folded = True
                continue
            seen.add(path)
            hits.append(Hit(path, float(score), i, t))
        return hits, folded

    def _filtered_search(self, query: np.ndarray, k: int, where: SearchFilter) -> tuple[np.ndarray, np.ndarray]:
        """The top `k` among the files `where` selects, as exact as the unfiltered search
        (`VectorStore.search_within`: each kind filters as its vectors allow)."""
        selection = self._selection(where)
        if len(selection) == 0:
            return np.empty((1, 0), np.float32), np.empty((1, 0), np.int64)
        scores, ids = self.refresh().search_within(query, k, selection)
        found = ids[0] >= 0
        return scores[:, found], ids[:, found]

    def _selection(self, where: SearchFilter) -> Selection:
        """The searchable files `where` selects, from a small cache valid until the catalog changes."""
        key = (where, self.catalog.change_token())  # read first: a write after it makes the entry stale
        found = self._selected.get(key)
        if found is None:
            found = Selection(self.catalog.searchable_ids_where(*where.sql()))
            self._selected.put(key, found)
        return found

    def filter(
        self,
        *,
        after: str | None = None,
        before: str | None = None,
        folders: Sequence[str | os.PathLike] = (),
        kind: str | None = None,
        camera: str | None = None,
        min_size: int | str | None = None,
        max_size: int | str | None = None,
    ) -> SearchFilter:
        """A `SearchFilter` for the search methods' `where`: dates as "2024", "2024-06" or
        "2024-06-15" (`after` inclusive, `before` exclusive); `folders` absolute, or relative to
        an indexed folder (e.g. "旅行/2024"); sizes in bytes or as "2M"."""
        return SearchFilter(
            after=parse_date(after) if after else None,
            before=parse_date(before) if before else None,
            folders=tuple(self._folder(f) for f in folders),
            kind=kind or None,
            camera=camera or None,
            min_size=parse_size(min_size) if isinstance(min_size, str) else min_size,
            max_size=parse_size(max_size) if isinstance(max_size, str) else max_size,
        )

    def _folder(self, folder: str | os.PathLike) -> str:
        """A folder to filter by, as a catalog path: absolute (or relative to the current folder)
        if it holds indexed files, else relative to the indexed folder that has it."""
        path = expand_user(folder)
        here = to_catalog_path(os.path.abspath(path))
        if self.catalog.has_files_under(here):
            return here
        if not path.is_absolute():
            for root in self.catalog.roots():
                inside = to_catalog_path(os.path.join(from_catalog_path(root), path))
                if self.catalog.has_files_under(inside):
                    return inside
        roots = ", ".join(from_catalog_path(r) for r in self.catalog.roots()) or "none yet"
        raise QueryError(f"no indexed photos under {folder}; give a folder inside an indexed one ({roots})")
