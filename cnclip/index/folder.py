"""`Index`: an index folder as users see it — add folders and texts, search every direction.

One ranking routine (`_top_k` over a `VectorIndex`) serves text->image, image->image and
image->text; the catalog stays the record and the FAISS file is rebuilt whenever it is stale.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cnclip.errors import ModelMismatchError, QueryError
from cnclip.index.catalog import Catalog, ModelIdentity
from cnclip.index.scan import Indexer, IndexSummary, Progress, from_catalog_path, to_catalog_path
from cnclip.index.vectors import ONDISK_KIND, VectorIndex
from cnclip.model.onnx_runtime import TextEncoder
from cnclip.model.runtime import Runtime
from cnclip.model.transform import load_image
from cnclip.model.zeroshot import TextHit, check_query

if TYPE_CHECKING:  # the model's modules load torch, open_clip and transformers (~7 s): only when needed
    from cnclip.model.clip import CNClipModel

log = logging.getLogger(__name__)

INDEX_ENV = "CNCLIP_INDEX"
DEFAULT_INDEX = Path("index") / "default"
# Below this many changed files `refresh` always updates the saved vector index in place.
_SYNC_MIN_REBUILD = 10_000
QUERY_CACHE_SIZE = 1024  # recent query embeddings kept per open index (2 KB each at 512-d)
PREPROCESSING = "squash-bicubic-clip-meanstd"


@dataclass(frozen=True)
class Hit:
    """One search result: a file path and its cosine similarity (`id`: the file's catalog id)."""

    path: str
    score: float
    id: int | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score}


def _load(source: str | os.PathLike, runtime: Runtime | None) -> CNClipModel:
    from cnclip.model.checkpoint import load_model

    return load_model(source, device=runtime.device if runtime is not None else "cpu")


def default_index_path() -> Path:
    """`$CNCLIP_INDEX`, else `index/default` under the current folder."""
    return Path(os.environ.get(INDEX_ENV) or DEFAULT_INDEX)


def model_identity(model: CNClipModel, source: str) -> ModelIdentity:
    return ModelIdentity(
        name=model.config.name,
        source=source,
        digest=model.weights_digest(),
        dim=model.embed_dim,
        image_size=model.config.vision.image_size,
        preprocessing=PREPROCESSING,
    )


class Index:
    """An index folder: a SQLite catalog (the record) plus a derived FAISS file."""

    def __init__(
        self,
        catalog: Catalog,
        model: CNClipModel | None = None,
        runtime: Runtime | None = None,
        vector_kind: str = "auto",
    ):
        self.catalog = catalog
        self._model = model
        self._runtime = runtime
        # What `refresh` builds: "auto" (exact, IVF-Flat, or on disk past ONDISK_THRESHOLD) or a kind.
        self.vector_kind = vector_kind
        self._images: VectorIndex | None = None
        self._images_generation: int | None = None
        # Recent query embeddings: a server sees the same queries again and again (paging,
        # refreshes), and the text tower is most of a query's cost.
        self._query_vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_encoder: TextEncoder | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        model: CNClipModel | str | None = None,
        create: bool = False,
        runtime: Runtime | None = None,
        vector_kind: str = "auto",
    ) -> Index:
        """Open (or with `create`, make) the index at `path` (default: `default_index_path()`).

        `model` may be a loaded model or anything `load_model` takes; by default the index's own
        model is loaded when first needed. A model other than the index's is refused. `runtime`
        (e.g. `Runtime.resolve()`: ONNX Runtime on CPUs) is applied to the model; without it the
        model runs as loaded (PyTorch fp32 on the CPU). `vector_kind` is the vector index kind
        `refresh` builds ("auto" or one of `cnclip.index.vectors.KINDS`, e.g. "ivf-pq-ondisk").
        """
        # The model first: a model that fails to load must not leave an empty index folder behind.
        loaded = _load(model, runtime) if isinstance(model, str | os.PathLike) else model
        if loaded is not None and runtime is not None:
            runtime.apply(loaded)
        catalog = Catalog.open(Path(path) if path is not None else default_index_path(), create=create)
        index = cls(catalog, runtime=runtime, vector_kind=vector_kind)
        if loaded is not None:
            try:
                index._bind(loaded)
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
    def model(self) -> CNClipModel:
        if self._model is None:
            identity = self.catalog.identity
            if identity is None:
                raise ModelMismatchError(f"{self.catalog.folder} has no model yet; index a folder first")
            model = _load(identity.source, self._runtime)
            self._bind(self._runtime.apply(model) if self._runtime is not None else model)
        return self._model

    def _bind(self, model: CNClipModel) -> None:
        recorded = self.catalog.identity
        # a model built in memory has no source: keep the recorded one, else its zoo name
        source = model.source or (recorded.source if recorded else None) or model.config.name or "unknown"
        identity = model_identity(model, source)
        if identity != recorded:  # only write when something changed: search must not queue behind `index`
            self.catalog.bind_model(identity)  # raises ModelMismatchError on a different model
        self._model = model

    # -- adding -----------------------------------------------------------------------------------

    def add_folder(
        self, folder: str | os.PathLike, *, progress: Callable[[Progress], None] | None = None, **options
    ) -> IndexSummary:
        """Bring the index up to date with `folder` (recursively); see `Indexer` for options."""
        summary = Indexer(self.model, self.catalog, **options).run(folder, progress)
        self.refresh()
        return summary

    def add_texts(self, texts: Sequence[str], collection: str = "default") -> int:
        """Add texts (for image->text search); returns how many were new."""
        texts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        known = self.catalog.known_texts(texts, collection)
        new = [t for t in texts if t not in known]
        if not new:
            return 0
        return self.catalog.add_texts(new, self.model.embed_texts(new), collection)

    # -- searching --------------------------------------------------------------------------------

    def refresh(self) -> VectorIndex:
        """The image vector index, brought up to date with the catalog if the catalog changed.

        A small change is applied to the saved index in place (vectors of new file ids added,
        vanished ids removed); a large one, or one that would leave the index far from what a
        fresh build makes (`VectorIndex.needs_rebuild`), rebuilds it from the catalog. A saved
        index of another kind than `vector_kind` asks for is rebuilt; with "auto" an on-disk
        index stays on disk (it was chosen for a collection too large for RAM).
        """
        generation = self.catalog.generation()  # read first: a write after it makes us stale, not wrong
        if self._images is not None and self._images_generation == generation:
            return self._images
        folder = self.catalog.folder
        cached = VectorIndex.load(folder)
        kind = self.vector_kind
        if kind == "auto" and cached is not None and cached.kind == ONDISK_KIND:
            kind = ONDISK_KIND
        other_kind = (
            cached is not None and kind != "auto" and cached.kind != VectorIndex.resolve_kind(kind, cached.ntotal)
        )
        if cached is None or cached.meta.get("generation") != generation or other_kind:
            identity = self.catalog.identity
            dim = identity.dim if identity else self.model.embed_dim
            synced = self._sync(cached) if cached is not None and cached.dim == dim and not other_kind else None
            if synced is None:
                # A function, not an iterator: the on-disk kind reads the catalog twice. It is
                # built inside the index folder, so `save` below only writes its meta.
                synced = VectorIndex.build_streaming(
                    self.catalog.file_vectors, total=self.catalog.count(), dim=dim, kind=kind, folder=folder
                )
            cached = synced
            cached.meta["generation"] = generation
            try:
                cached.save(folder)
            except OSError as e:  # a read-only index still searches; it just rebuilds next time
                log.warning("could not save the vector index in %s: %s", folder, e)
        if cached.ondisk is not None:
            # PQ codes alone gave recall@10 ~0.75 at 10^6; exact re-ranking from the catalog ~0.997
            cached.ondisk.reranker = self.catalog.vectors_for_ids
        self._images, self._images_generation = cached, generation
        return cached

    def _sync(self, index: VectorIndex) -> VectorIndex | None:
        """Apply the catalog's changes since `index` was saved, or None when a rebuild is better."""
        wanted, held = self.catalog.file_ids(), index.ids()
        gone = np.setdiff1d(held, wanted, assume_unique=True)
        new = np.setdiff1d(wanted, held, assume_unique=True)
        after = held.size - gone.size + new.size
        # Past half of the index changed, a build is about as cheap and gives fresh IVF cells.
        if gone.size + new.size > max(_SYNC_MIN_REBUILD, held.size // 2) or index.needs_rebuild(ntotal=after):
            return None
        index.remove(gone)
        if new.size:
            # File ids only grow, so the new ones are (almost always) all above what the index holds.
            for ids, vectors in self.catalog.file_vectors(after_id=int(new[0]) - 1):
                keep = np.isin(ids, new, assume_unique=True)
                if keep.any():
                    index.add(ids[keep], vectors[keep])
        log.debug("vector index synced: %d added, %d removed", new.size, gone.size)
        return index

    def stats(self) -> dict:
        """What the index holds, without loading the model or touching the vector index:
        counts, the model record, and the saved vector index (kind, recall, whether current)."""
        identity = self.catalog.identity
        saved = VectorIndex.load(self.catalog.folder)
        vectors = None
        if saved is not None:
            vectors = saved.info()
            vectors["current"] = saved.meta.get("generation") == self.catalog.generation()
            del vectors["memory_mapped"]
        return {
            "index": str(self.catalog.folder),
            "images": self.catalog.count(),
            "texts": self.catalog.text_count(),
            "model": None
            if identity is None
            else {"name": identity.name, "source": identity.source, "digest": identity.digest, "dim": identity.dim},
            "vector_index": vectors,
        }

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings, without loading the model when its text tower was exported before and
        the runtime runs text in ONNX Runtime: the same vectors, seconds sooner."""
        if self._model is None and self._runtime is not None and "text" in self._runtime.onnx_towers:
            identity = self.catalog.identity
            if self._text_encoder is None and identity is not None:
                self._text_encoder = TextEncoder.cached(identity.digest)
            if self._text_encoder is not None:
                return self._text_encoder.embed_texts(texts)
        return self.model.embed_texts(texts)

    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        """Text -> images, best first."""
        return self._image_hits(self.query_vector(query), k)

    def query_vector(self, query: str) -> np.ndarray:
        """The (1, D) embedding of a text query, from a small cache of recent queries."""
        query = check_query(query)
        vector = self._query_vectors.pop(query, None)
        if vector is None:
            vector = self._embed_texts([query])
        self._query_vectors[query] = vector
        if len(self._query_vectors) > QUERY_CACHE_SIZE:
            self._query_vectors.popitem(last=False)
        return vector

    def search_image(self, image: Image.Image | str | os.PathLike, k: int = 10, exclude_self: bool = True) -> list[Hit]:
        """Image -> similar images; an indexed query file is left out of its own results by default."""
        vector, self_path = self._image_vector(image)
        hits = self._image_hits(vector, k + 1 if self_path and exclude_self else k)
        if self_path and exclude_self:
            hits = [h for h in hits if h.path != self_path][:k]
        return hits

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
            return self.model.embed_images([image]), None
        path = os.path.abspath(Path(image).expanduser())
        stored = self.catalog.vector_for_path(to_catalog_path(path))
        if stored is not None:  # already indexed: no need to decode and embed it again
            return stored[None, :].astype(np.float32), path
        return self.model.embed_images([load_image(path)]), None

    def _image_hits(self, vectors: np.ndarray, k: int) -> list[Hit]:
        if k < 1:
            raise QueryError(f"k must be at least 1, not {k}")
        scores, ids = self.refresh().search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        records = self.catalog.files_by_ids(ids[0].tolist())
        return [
            Hit(from_catalog_path(records[i].path), float(s), i)
            for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True)
            if i in records  # a file removed since the vector index was built
        ]
