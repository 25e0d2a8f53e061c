"""What the API answers: its pydantic models, the one builder of a file's result, and `{"error": ...}`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from cnclip.index.dupes import DupeReport
from cnclip.index.index import Hit

R = TypeVar("R", bound="ImageResult")


class WordLine(BaseModel):
    text: str  # a line of words read in the photo, as read
    spans: list[list[int]]  # [start, end) character ranges of `text` that match the query


class ReadLine(BaseModel):
    text: str  # a line of words read in the photo
    score: float  # the recognizer's confidence, 0-1
    box: list[list[int]]  # its four corners (x, y) in the photo's pixels, clockwise from top left


class PhotoWords(BaseModel):
    id: int
    read: bool  # false: its words were not read yet (cnclip index --ocr-only reads them)
    lines: list[ReadLine]  # every line read in it, top to bottom
    error: str | None = None  # why it could not be read, when it could not


class ImageResult(BaseModel):
    id: int
    path: str
    name: str
    score: float
    thumb: str
    image: str
    t: float | None = None  # a video: seconds into it of the best-matching frame (play from there)
    words: list[WordLine] | None = None  # found by the words in it: the lines that hold the query

    @classmethod
    def of(cls: type[R], file_id: int, path: str, score: float, **fields: Any) -> R:
        """The result for indexed file `file_id` at `path` (its name, thumbnail and image URLs); every
        ImageResult and DupeFile is made here. `fields`: the subclass's own."""
        return cls(
            id=file_id,
            path=display(path),
            name=display(os.path.basename(path)),
            score=round(score, 6),
            thumb=f"/api/thumb/{file_id}",
            image=f"/api/image/{file_id}",
            **fields,
        )


class SearchResponse(BaseModel):
    results: list[ImageResult]
    count: int
    took_ms: float


class TextResult(BaseModel):
    text: str
    score: float


class TextsResponse(BaseModel):
    results: list[TextResult]
    count: int
    took_ms: float


class LabelResult(BaseModel):
    label: str
    score: float


class TagResponse(BaseModel):
    labels: list[LabelResult]
    count: int
    took_ms: float


class DupeFile(ImageResult):
    """One file of a near-duplicate group; `score` is its similarity to the group's best copy."""

    width: int | None
    height: int | None
    bytes: int
    mtime: float


class DupeGroupResult(BaseModel):
    size: int
    score: float
    capped: bool
    members: list[DupeFile]


class DupesResponse(BaseModel):
    groups: list[DupeGroupResult]
    count: int
    total: int
    files: int
    pairs: int
    threshold: float
    notes: list[str]
    took_ms: float


def display(path: str) -> str:
    """File names that are not UTF-8 (lone surrogates) shown with U+FFFD, as JSON cannot carry them."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def since(started: float) -> float:
    """Milliseconds since `started` (a `time.perf_counter()`), as answers report them in `took_ms`."""
    return round((time.perf_counter() - started) * 1000, 2)


def _word_lines(hit: Hit) -> list[WordLine] | None:
    return None if hit.words is None else [WordLine(**line) for line in hit.words]


def search_response(hits: Sequence[Hit], started: float) -> SearchResponse:
    results = [ImageResult.of(h.id, h.path, h.score, t=h.t, words=_word_lines(h)) for h in hits if h.id is not None]
    return SearchResponse(results=results, count=len(results), took_ms=since(started))


def dupes_response(report: DupeReport, started: float) -> DupesResponse:
    groups = [
        DupeGroupResult(
            size=g.size,
            score=round(g.score, 6),
            capped=g.capped,
            members=[
                DupeFile.of(
                    m.id, m.path, m.similarity, width=m.width, height=m.height, bytes=m.bytes, mtime=m.mtime_ns / 1e9
                )
                for m in g.members
            ],
        )
        for g in report.groups
    ]
    return DupesResponse(
        groups=groups,
        count=len(groups),
        total=report.total_groups,
        files=report.files,
        pairs=report.pairs,
        threshold=report.threshold,
        notes=report.notes,
        took_ms=since(started),
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the server answers: `{"error": "one line"}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def not_found(file_id: int) -> HTTPException:
    return HTTPException(404, f"no file with id {file_id} in the index")
