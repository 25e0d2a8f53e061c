"""The JSON API under /api/: searches, zero-shot tags, files and thumbnails by id, health, duplicates.

Index calls go to the `IndexWorker`'s thread; uploads are decoded and thumbnails made in the
request's own thread; duplicate groups are found on a catalog connection of their own.
"""

from __future__ import annotations

import datetime as dt
import mimetypes
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

import cnclip.app.serve.worker as on_index
from cnclip.app.serve.media import DecodeBudget, decoded_upload, make_thumbnail, resolve_file
from cnclip.app.serve.schemas import (
    DupesResponse,
    LabelResult,
    PhotoWords,
    SearchResponse,
    TagResponse,
    TextResult,
    TextsResponse,
    dupes_response,
    search_response,
    since,
)
from cnclip.app.serve.worker import NO_FILTERS, Filters, IndexWorker
from cnclip.errors import ImageError, QueryError
from cnclip.index.catalog import Catalog
from cnclip.index.dupes import DEFAULT_THRESHOLD, DupeReport, find_duplicates
from cnclip.index.index import Index
from cnclip.lru import LRUCache
from cnclip.model.runtime import Runtime
from cnclip.model.zeroshot import check_query, zero_shot

MAX_K = 200
MAX_LABELS = 64  # each label is embedded with 8 prompt templates
MAX_FOLDERS = 64  # `in` folders per search; each adds a condition, and SQLite nests at most 1000
MAX_DUPE_GROUPS = 1000  # per /api/dupes answer; each lists at most cnclip.index.dupes.MAX_MEMBERS files
MAX_ID = 2**63 - 1  # SQLite's integer range: larger ids cannot exist and would overflow the query

# Parameter types, at module level so FastAPI can resolve them (annotations are strings here).
K = Annotated[int, Query(ge=1, le=MAX_K, description=f"number of results, 1 to {MAX_K}")]
FormK = Annotated[int, Form(ge=1, le=MAX_K, description=f"number of results, 1 to {MAX_K}")]
FileId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a file id from a search result")]
QueryFileId = Annotated[int, Query(ge=1, le=MAX_ID, description="a file id from a search result")]
Upload = Annotated[UploadFile, File(description="an image: JPEG, PNG, WebP, GIF, BMP or TIFF")]
Threshold = Annotated[float, Query(gt=0, le=1, description="cosine similarity from which two photos are copies")]
DupeLimit = Annotated[int, Query(ge=1, le=MAX_DUPE_GROUPS, description="groups to return, largest first")]
NotTexts = Annotated[list[str] | None, Query(alias="not", description="a text to subtract, e.g. 草地 (repeatable)")]
LikeId = Annotated[int | None, Query(ge=1, le=MAX_ID, description="a file id: more like this photo, added to the text")]


def _filters(
    after: Annotated[str | None, Query(description="taken from this date on: 2024, 2024-06 or 2024-06-15")] = None,
    before: Annotated[str | None, Query(description="taken before this date (2024-09: up to 31 August)")] = None,
    within: Annotated[
        list[str] | None,
        Query(
            alias="in",
            max_length=MAX_FOLDERS,
            description=f"under this folder, absolute or relative to an indexed one (up to {MAX_FOLDERS})",
        ),
    ] = None,
    kind: Annotated[Literal["photo", "video"] | None, Query(description="only photos or only videos")] = None,
    camera: Annotated[str | None, Query(max_length=200, description="camera model contains this")] = None,
    min_size: Annotated[str | None, Query(max_length=20, description="file size at least, e.g. 500K")] = None,
    max_size: Annotated[str | None, Query(max_length=20, description="file size at most, e.g. 20M")] = None,
) -> Filters:
    blank = (None, "")
    return Filters(
        after=None if after in blank else after,
        before=None if before in blank else before,
        within=tuple(f for f in within or () if f.strip()),
        kind=kind,
        camera=None if camera in blank else camera,
        min_size=None if min_size in blank else min_size,
        max_size=None if max_size in blank else max_size,
    )


FilterParams = Annotated[Filters, Depends(_filters)]


def split_labels(values: Sequence[str]) -> list[str]:
    """Labels from form fields: each may hold several, split at newlines or commas (，、 too)."""
    labels = [part.strip() for value in values for part in re.split(r"[\n\r,，、]+", value)]
    labels = list(dict.fromkeys(label for label in labels if label))
    if not labels:
        raise QueryError("no labels given; send labels=猫,狗,海滩 (comma- or newline-separated, or repeated fields)")
    if len(labels) > MAX_LABELS:
        raise QueryError(f"{len(labels)} labels given; at most {MAX_LABELS} per request")
    return [check_query(label) for label in labels]


def api_router(
    worker: IndexWorker,
    runtime: Runtime | None,
    image_size: int | None,
    thumbs: LRUCache[int, bytes],
    uploads: DecodeBudget,
) -> APIRouter:
    """The routes, mounted at /api by `create_app`. `image_size`: the model's input side, to which
    JPEG uploads may decode at a reduced scale (None: full size); `thumbs`: JPEG thumbnails by file id."""
    api = APIRouter()
    _search_routes(api, worker, image_size, uploads)
    _file_routes(api, worker, thumbs)
    _status_routes(api, worker, runtime)
    return api


def _search_routes(api: APIRouter, worker: IndexWorker, image_size: int | None, uploads: DecodeBudget) -> None:
    @api.get("/search", response_model=SearchResponse)
    def search_text(
        q: Annotated[str, Query(description="what to look for, e.g. 海边的日落")],
        filters: FilterParams,
        k: K = 20,
        not_: NotTexts = None,
        like: LikeId = None,
        words: Annotated[
            Literal["auto", "only", "off"],
            Query(
                description="the words read in photos: auto ranks photos with the words first, only returns "
                "just those, off ranks by the picture alone (combined queries use pictures)"
            ),
        ] = "auto",
    ):
        """Text -> images, best first; with `not` and `like`, the text minus those texts plus that photo;
        the filter parameters limit which files may be returned. Photos found by their words carry
        the lines matched (`words`, with the matched character ranges)."""
        started = time.perf_counter()
        check_query(q)
        nots = [check_query(text) for text in not_ or () if text.strip()]  # an empty form field adds nothing
        if not nots and like is None and filters == NO_FILTERS:
            return search_response(worker.run(Index.search_text, q, k, None, words), started)
        return search_response(worker.run(on_index.combined, q, nots, like, k, filters, words), started)

    @api.post("/search/image", response_model=SearchResponse)
    def search_image(file: Upload, filters: FilterParams, k: FormK = 20):
        """Image -> similar images, best first (filter parameters in the query string)."""
        started = time.perf_counter()
        with decoded_upload(file, uploads, image_size) as image:
            found = worker.run(lambda index: index.search_image(image, k, where=filters.where(index)))
        return search_response(found, started)

    @api.get("/similar", response_model=SearchResponse)
    def similar(id: QueryFileId, filters: FilterParams, k: K = 20):
        """Indexed image -> similar images, itself left out."""
        started = time.perf_counter()
        return search_response(worker.run(on_index.similar, id, k, filters), started)

    @api.post("/tag", response_model=TagResponse)
    def tag(
        file: Upload,
        labels: Annotated[list[str], Form(description="candidate labels: comma- or newline-separated, or repeated")],
        k: Annotated[int | None, Form(ge=1, le=MAX_LABELS)] = None,
    ):
        """Zero-shot labels: the probability of each label for the image, best first."""
        started = time.perf_counter()
        names = split_labels(labels)
        with decoded_upload(file, uploads, image_size) as image:
            hits = worker.run(lambda index: zero_shot(index.encoder, image, names, t2s=index.t2s))[:k]
        found = [LabelResult(label=h.text, score=round(h.score, 6)) for h in hits]
        return TagResponse(labels=found, count=len(found), took_ms=since(started))

    @api.get("/texts", response_model=TextsResponse)
    def texts(
        image_id: QueryFileId,
        k: K = 10,
        collection: str | None = None,
    ):
        """Indexed image -> the closest texts of the index's text collections (`cnclip index --texts`)."""
        started = time.perf_counter()
        hits = worker.run(on_index.texts, image_id, k, collection)
        found = [TextResult(text=h.text, score=round(h.score, 6)) for h in hits]
        return TextsResponse(results=found, count=len(found), took_ms=since(started))


def _file_routes(api: APIRouter, worker: IndexWorker, thumbs: LRUCache[int, bytes]) -> None:
    def path_of(file_id: int) -> str:
        record, roots = worker.run(on_index.servable, file_id)
        return resolve_file(record, list(roots), file_id)

    @api.get("/thumb/{file_id}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumb(file_id: FileId):
        """A JPEG thumbnail (at most 256 px a side) of an indexed image."""
        path = path_of(file_id)
        data = thumbs.get(file_id)
        if data is None:
            try:
                data = make_thumbnail(path, t=worker.run(on_index.frame_time, file_id))
            except ImageError as e:
                raise HTTPException(404, f"file {file_id} no longer decodes; run cnclip index to update") from e
            thumbs.put(file_id, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @api.get("/words/{file_id}", response_model=PhotoWords)
    def words(file_id: FileId):
        """Every line of words read in an indexed photo (or video frame), with boxes, to show and copy."""
        path_of(file_id)  # 404 for a file not in the index, as its image
        record = worker.run(on_index.words_of, file_id)
        if record is None:
            return PhotoWords(id=file_id, read=False, lines=[])
        return PhotoWords(id=file_id, read=True, lines=record["lines"], error=record["error"])

    @api.get("/image/{file_id}", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}})
    def image(file_id: FileId):
        """The original file of an indexed image."""
        path = path_of(file_id)
        media = mimetypes.guess_type(path)[0]
        if media is None or not media.startswith(("image/", "video/")):
            media = "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


def _status_routes(api: APIRouter, worker: IndexWorker, runtime: Runtime | None) -> None:
    stats_cache: LRUCache[tuple, dict] = LRUCache(1)  # by the catalog's change token

    @api.get("/health")
    def health() -> dict:
        """Status and what the index holds: image and text counts, model, vector index, last update."""
        stats, roots = worker.run(on_index.stats, stats_cache)
        last = max(roots.values(), default=None)
        return {
            "status": "ok",
            "count": stats["images"],
            "videos": stats["videos"],
            "texts": stats["texts"],
            "words": stats["words"],  # pictures read for words, and with words
            "model": stats["model"],
            "vector_index": stats["vector_index"],
            "last_update": None if last is None else dt.datetime.fromtimestamp(last, dt.timezone.utc).isoformat(),
            "runtime": (runtime or Runtime()).describe(),
            "runtime_choice": stats["runtime"],
            "t2s": worker.index.t2s,
            "rebuild": worker.run(on_index.rebuild_status),
        }

    dupes_cache = _DupesCache(worker.index.catalog.folder)

    @api.get("/dupes", response_model=DupesResponse)
    def dupes(threshold: Threshold = DEFAULT_THRESHOLD, limit: DupeLimit = 100):
        """Groups of near-identical photos, largest first, each with its best copy first; deletes nothing."""
        started = time.perf_counter()
        return dupes_response(dupes_cache.get(threshold, limit), started)


class _DupesCache:
    """The latest `find_duplicates` report, kept until the catalog changes or other parameters are asked for.

    It runs in the request's thread on a catalog connection of its own, one request at a time: at
    100,000 photos it takes most of a minute, and searches on the index worker must not wait for it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()  # held while a report is made: a second request waits for it
        self._reports: LRUCache[tuple[int, float, int], DupeReport] = LRUCache(1)

    def get(self, threshold: float, limit: int) -> DupeReport:
        with self._lock, Catalog.open(self.folder) as catalog:
            key = (catalog.generation(), threshold, limit)
            report = self._reports.get(key)
            if report is None:
                report = find_duplicates(catalog, threshold, limit=limit)
                self._reports.put(key, report)
            return report
