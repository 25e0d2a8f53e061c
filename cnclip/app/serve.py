"""`cnclip serve`: a JSON API and a web page over one index (FastAPI).

Every index call (SQLite catalog, FAISS, the model) runs on one worker thread that owns the
`Index`: the catalog's SQLite connection refuses other threads, and the model already uses every
core, so queries lose nothing by taking turns. Uploads are decoded and thumbnails made in the
request threads beside it. Files are served only by catalog id, and only from inside the folders
that were indexed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import io
import ipaddress
import logging
import mimetypes
import os
import re
import socket
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnclip.errors import CNClipError, ImageError, IndexNotFoundError, ModelMismatchError, QueryError
from cnclip.index.catalog import Catalog, FileRecord
from cnclip.index.dupes import DEFAULT_THRESHOLD, DupeReport, find_duplicates
from cnclip.index.filters import SearchFilter
from cnclip.index.folder import Hit, Index
from cnclip.index.query import FILE, TEXT, Term
from cnclip.index.scan import from_catalog_path
from cnclip.index.video import VideoError, frame_at, split_frame_path
from cnclip.model.runtime import Runtime
from cnclip.model.zeroshot import TextHit, check_query, zero_shot

if TYPE_CHECKING:
    from cnclip.index.watch import WatchBatch

log = logging.getLogger(__name__)

TOKEN_ENV = "CNCLIP_TOKEN"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# A 100 MP photo passes; a small file that claims a gigapixel canvas is refused before decoding.
MAX_UPLOAD_PIXELS = 100_000_000
# Memory of decoded uploads held at once by a server: two of the largest (8 bytes a pixel: the
# decoded image and its RGB copy). A request that finds it in use waits up to UPLOAD_WAIT_S, then gets 503.
UPLOAD_MEMORY_BYTES = 1600 * 2**20
UPLOAD_WAIT_S = 10.0
MAX_K = 200
MAX_LABELS = 64  # each label is embedded with 8 prompt templates
MAX_FOLDERS = 64  # `in` folders per search; each adds a condition, and SQLite nests at most 1000
MAX_DUPE_GROUPS = 1000  # per /api/dupes answer; each lists at most cnclip.index.dupes.MAX_MEMBERS files
MAX_ID = 2**63 - 1  # SQLite's integer range: larger ids cannot exist and would overflow the query
THUMB_SIDE = 256
THUMB_CACHE_BYTES = 64 * 1024 * 1024  # ~4,000 thumbnails of ~15 KB
WEB_DIR = Path(__file__).with_name("web")
_COOKIE = "cnclip_token"
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

T = TypeVar("T")


# -- start-up checks ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: the API shows every indexed photo."""
    if not is_loopback(host) and not token:
        raise CNClipError(
            f"refusing to serve on {host} without a token: anyone who can reach it would see every indexed "
            f"photo; pass --token SECRET (or set ${TOKEN_ENV}), or use --host 127.0.0.1"
        )


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for `host`:`port` (0 picks a free port), or a CNClipError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so, and
    # with Nagle on, every keep-alive response waited ~40 ms for a delayed ACK (measured here).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        # Listening at once: a client that connects before the server loop starts (the printed URL
        # opened right away) waits in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CNClipError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from e
    return sock


# -- the index, on its own thread -----------------------------------------------------------------


class _IndexWorker:
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


def _warm(index: Index) -> int:
    """Load the model, run the text tower once and bring the vector index up to date; the model's input size."""
    index.model.embed_texts(["预热"])
    index.refresh()
    return index.model.config.vision.image_size


def _frame_time(index: Index, file_id: int) -> float | None:
    """The time of a video frame's row (None for a photo)."""
    record = index.catalog.files_by_ids([file_id]).get(file_id)
    return None if record is None else split_frame_path(record.path)[1]


def _servable(index: Index, file_id: int) -> tuple[FileRecord | None, dict[str, float]]:
    return index.catalog.files_by_ids([file_id]).get(file_id), index.catalog.roots()


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def _not_found(file_id: int) -> HTTPException:
    return HTTPException(404, f"no file with id {file_id} in the index")


def resolve_file(record: FileRecord | None, roots: Sequence[str], file_id: int) -> str:
    """The real path of an indexed file, if it may be served; HTTP 404 otherwise.

    Its real path (symlinks resolved) must lie inside the real path of a folder that was indexed,
    so a symlink in a photo folder that points elsewhere serves nothing. An index made before
    folders were recorded falls back to the file's own folder.
    """
    if record is None:
        raise _not_found(file_id)
    path = split_frame_path(from_catalog_path(record.path))[0]  # a video's frame: the video
    real = os.path.realpath(path)
    folders = [os.path.realpath(from_catalog_path(r)) for r in roots] or [os.path.realpath(os.path.dirname(path))]
    if not any(_inside(real, folder) for folder in folders):
        log.warning("not serving file %d: %s resolves to %s, outside the indexed folders", file_id, path, real)
        raise _not_found(file_id)
    if not os.path.isfile(real):
        raise HTTPException(404, f"file {file_id} is no longer on disk; run cnclip index to update the index")
    return real


# -- thumbnails -----------------------------------------------------------------------------------


class _ThumbCache:
    """JPEG thumbnails by file id, least recently used dropped first. A file id stands for one
    content for life (a changed file gets a new id), so an entry never goes stale."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, file_id: int) -> bytes | None:
        with self._lock:
            data = self._items.get(file_id)
            if data is not None:
                self._items.move_to_end(file_id)
            return data

    def put(self, file_id: int, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(file_id, None)
            self._bytes += len(data) - (len(old) if old else 0)
            self._items[file_id] = data
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._bytes -= len(self._items.popitem(last=False)[1])


def make_thumbnail(path: str, side: int = THUMB_SIDE, t: float | None = None) -> bytes:
    """JPEG bytes of the image at `path` (of a video: its frame at `t` seconds) scaled to fit
    `side` x `side` (ImageError if it will not decode)."""
    from cnclip.model.transform import load_image

    if t is None:
        image = load_image(path, draft_size=side)
    else:
        try:
            image = frame_at(path, t)
        except VideoError as e:
            raise ImageError(f"{path}: {e}") from e
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


# -- uploads --------------------------------------------------------------------------------------


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """The memory that decoding a `mode` image of width x height pixels to RGB holds at its peak, as
    Pillow stores pixels (1, 2 or 4 bytes each): the decoded image plus one RGB copy (the
    conversion, or an EXIF rotation)."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * (stored + 4)


class DecodeBudget:
    """Bytes of decoded uploads that the request threads of one app may hold at once.

    A request reserves what its image takes decoded (`decoded_bytes`, from the header) before
    decoding and gives it back when its answer is made; while the budget is in use it waits, and
    after `wait_s` it gets a 503. Without it, forty uploads of a 300 KB PNG of 10000x10000 pixels
    (800 MB each decoded) were decoded at once, and the server ran out of memory."""

    def __init__(self, limit: int, wait_s: float = UPLOAD_WAIT_S):
        if limit <= 0:
            raise ValueError(f"the upload memory budget must be positive, not {limit}")
        self.limit, self.wait_s = limit, wait_s
        self.used = 0
        self.peak = 0  # the most ever reserved at once
        self._turn = threading.Condition()

    @contextmanager
    def reserve(self, size: int, name: str) -> Iterator[None]:
        """Hold `size` bytes of the budget for the with-block (HTTP 413 if it exceeds all of it, 503 after waiting)."""
        if size > self.limit:
            raise HTTPException(
                413, f"{name} takes {size // 2**20} MB to decode; this server decodes at most {self.limit // 2**20} MB"
            )
        with self._turn:
            if not self._turn.wait_for(lambda: self.used + size <= self.limit, timeout=self.wait_s):
                raise HTTPException(
                    503,
                    f"busy decoding other large images; send {name} again in a few seconds",
                    headers={"Retry-After": str(max(1, round(self.wait_s)))},
                )
            self.used += size
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._turn:
                self.used -= size
                self._turn.notify_all()


@contextmanager
def decoded_upload(upload: UploadFile, budget: DecodeBudget, draft_size: int | None = None) -> Iterator[Image.Image]:
    """An uploaded image, decoded while its memory is reserved in `budget` (until the with-block ends).

    Oversized (413) and non-image (415) uploads are refused from the header, before decoding.
    `draft_size`: JPEGs decode at a reduced scale whose sides stay >= it (and reserve that much)."""
    data, name = _upload_bytes(upload)
    mode, width, height = _upload_header(data, name, draft_size)
    with budget.reserve(decoded_bytes(mode, width, height), name):
        yield _decode_upload(data, name, draft_size)


def _upload_bytes(upload: UploadFile) -> tuple[bytes, str]:
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    name = upload.filename or "the upload"
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    if not data:
        raise HTTPException(400, f"{name} is empty")
    return data, name


def _upload_header(data: bytes, name: str, draft_size: int | None) -> tuple[str, int, int]:
    """(mode, width, height) the image will decode to, read from its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:  # the header only
                width, height = probe.size
                if draft_size is not None and width * height <= MAX_UPLOAD_PIXELS:
                    probe.draft("RGB", (draft_size, draft_size))  # as load_image will: JPEG's reduced scale
                mode, decoded = probe.mode, probe.size
    except UnidentifiedImageError as e:
        raise HTTPException(415, f"{name} is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from e
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name} has too many pixels (at most {MAX_UPLOAD_PIXELS:,})") from e
    except Exception as e:  # Pillow reports a bad header with many exception types
        raise ImageError(f"{name}: unreadable image header") from e
    if width * height > MAX_UPLOAD_PIXELS:
        raise HTTPException(413, f"{name} is {width}x{height} pixels; at most {MAX_UPLOAD_PIXELS:,} are accepted")
    return mode, *decoded


def _decode_upload(data: bytes, name: str, draft_size: int | None) -> Image.Image:
    from cnclip.model.transform import load_image

    # load_image reads a file: that keeps one decoder (EXIF rotation, modes, caps) for every image
    suffix = os.path.splitext(name)[1][:10] if re.fullmatch(r"[\w.\-]*", os.path.splitext(name)[1]) else ""
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(tmp.name, max_pixels=MAX_UPLOAD_PIXELS, draft_size=draft_size)
        except ImageError as e:
            raise ImageError(str(e).replace(tmp.name, name)) from None


def split_labels(values: Sequence[str]) -> list[str]:
    """Labels from form fields: each may hold several, split at newlines or commas (，、 too)."""
    labels = [part.strip() for value in values for part in re.split(r"[\n\r,，、]+", value)]
    labels = list(dict.fromkeys(label for label in labels if label))
    if not labels:
        raise QueryError("no labels given; send labels=猫,狗,海滩 (comma- or newline-separated, or repeated fields)")
    if len(labels) > MAX_LABELS:
        raise QueryError(f"{len(labels)} labels given; at most {MAX_LABELS} per request")
    return [check_query(label) for label in labels]


# -- responses ------------------------------------------------------------------------------------


class ImageResult(BaseModel):
    id: int
    path: str
    name: str
    score: float
    thumb: str
    image: str
    t: float | None = None  # a video: seconds into it of the best-matching frame (play from there)


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


def _display(path: str) -> str:
    """File names that are not UTF-8 (lone surrogates) shown with U+FFFD, as JSON cannot carry them."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _image_results(hits: Sequence[Hit], started: float) -> SearchResponse:
    results = [
        ImageResult(
            id=h.id,
            path=_display(h.path),
            name=_display(os.path.basename(h.path)),
            score=round(h.score, 6),
            thumb=f"/api/thumb/{h.id}",
            image=f"/api/image/{h.id}",
            t=h.t,
        )
        for h in hits
        if h.id is not None
    ]
    return SearchResponse(results=results, count=len(results), took_ms=_since(started))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


_STATUS = ((IndexNotFoundError, 503), (ModelMismatchError, 409), (CNClipError, 400))


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": "one line"}` with a 4xx status; a traceback never leaves the server."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no such page: {request.url.path}" if exc.detail == "Not Found" else _one_line(exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(422, _one_line(f"{where}: {first.get('msg', 'invalid value')}"))

    @app.exception_handler(CNClipError)
    async def cnclip_error(request: Request, exc: CNClipError) -> JSONResponse:
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        return _error(status, _one_line(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return _error(500, "internal error; the server log has the details")


# -- the guard: host, token, body size, headers ---------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _cross_site(request: Request) -> bool:
    """A request a page of another origin made the browser send (browsers say so; programs send neither header)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True  # "none": typed or bookmarked by the user
    origin = request.headers.get("origin")
    if origin is None:
        return False
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    return origin.lower() != own


class _Guard:
    """ASGI middleware in front of everything: checks the Host header (no token: loopback names only,
    which stops DNS-rebinding pages), the token on /api/, and the request body size (413 from
    Content-Length before reading, or as soon as a streamed body passes the cap); adds safety headers."""

    def __init__(self, app, token: str | None, hosts: frozenset[str], max_body: int):
        self.app, self.token, self.hosts, self.max_body = app, token, hosts, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._with_headers(scope, send)
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _error(413, f"request body over {self.max_body // 2**20} MB")(scope, receive, send)
        await self._limited(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        if request.url.path.startswith("/api/") and _cross_site(request):
            # another web page the user has open must not read thumbnails or post forms here
            return _error(403, "cross-site request refused; use the page this server serves, or a program")
        if self.token is None:
            host = (request.url.hostname or "").lower()
            if host not in self.hosts:
                return _error(403, f"host {host!r} not allowed; open the page at http://127.0.0.1:PORT/")
            return None
        if not request.url.path.startswith("/api/") or self._has_token(request):
            return None
        return _error(
            401,
            "this server needs its token: send 'Authorization: Bearer TOKEN', or open the page as /?token=TOKEN",
            {"WWW-Authenticate": "Bearer"},
        )

    def _has_token(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        given = [auth[7:].strip() if auth[:7].lower() == "bearer " else None]
        given += [request.query_params.get("token"), request.cookies.get(_COOKIE)]
        return any(g is not None and hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    async def _limited(self, scope, receive, send) -> None:
        received, exceeded, started = 0, False, False

        async def capped_receive():
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                exceeded = True
                raise _BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            if exceeded:  # the app's own answer to the broken-off body is replaced by the 413 below
                return
            started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except _BodyTooLarge:
            exceeded = True
        if exceeded and not started:
            await _error(413, f"request body over {self.max_body // 2**20} MB")(scope, receive, send)

    @staticmethod
    def _with_headers(scope, send):
        page = not scope["path"].startswith("/api/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not page:  # other origins may not embed API answers (thumbnails in an <img>) either
                    headers.append((b"cross-origin-resource-policy", b"same-origin"))
                if page:
                    headers += [(b"content-security-policy", _PAGE_POLICY.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        return send_with_headers


# -- the app --------------------------------------------------------------------------------------


def create_app(
    index_path: str | os.PathLike,
    *,
    token: str | None = None,
    runtime: Runtime | None = None,
    host: str = "127.0.0.1",
    warm: bool = True,
    thumb_cache_bytes: int = THUMB_CACHE_BYTES,
    t2s: bool | None = None,
    watch: Sequence[str | os.PathLike] = (),
    watch_poll: float | None = None,
    on_watch: Callable[[WatchBatch], None] | None = None,
    upload_memory: int = UPLOAD_MEMORY_BYTES,
) -> FastAPI:
    """The FastAPI app serving the index at `index_path`: the API under /api/, the page at /.

    The index is opened (and with `warm`, its model loaded and text tower run once) here, so a
    missing index or model fails before a port is opened. `runtime` is how the model runs (e.g.
    `Runtime.resolve()`: ONNX Runtime on CPUs); `host` is the address served on, accepted in the
    Host header besides the loopback names when there is no `token`. `t2s`: queries in
    Traditional Chinese are read as Simplified (default: `$CNCLIP_T2S`, else on). `watch`: folders
    kept current while serving (a `Watcher`, polling every `watch_poll` seconds if given, with its
    own writer `Index` and model; `on_watch` gets each batch), started and stopped with the app.
    `upload_memory`: bytes that uploads decoding at once may take (`DecodeBudget`, `app.state.upload_memory`).
    """
    watcher = None
    if watch:
        from cnclip.index.watch import Watcher

        watcher = Watcher(index_path, watch, runtime=runtime, poll=watch_poll, on_batch=on_watch)
    worker = _IndexWorker(index_path, runtime, t2s)
    try:
        image_size = worker.run(_warm) if warm else None
    except BaseException:
        worker.close()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if watcher is not None:
            try:
                watcher.start()
            except BaseException:
                worker.close()
                raise
        yield
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)  # it may finish an embedding batch first
        worker.close()

    app = FastAPI(
        title="cnclip",
        summary="Chinese text-image search over one index",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's docs page loads its scripts from a CDN; the schema is enough
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.index = worker
    app.state.upload_memory = uploads = DecodeBudget(upload_memory)
    hosts = _LOOPBACK_NAMES | {host.lower().strip("[]")}
    app.add_middleware(_Guard, token=token or None, hosts=hosts, max_body=MAX_UPLOAD_BYTES + 64 * 1024)
    _add_error_handlers(app)
    app.include_router(_api(worker, runtime, image_size, _ThumbCache(thumb_cache_bytes), uploads), prefix="/api")
    _add_page(app, token or None)
    return app


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


@dataclass(frozen=True)
class _Filters:
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
) -> _Filters:
    blank = (None, "")
    return _Filters(
        after=None if after in blank else after,
        before=None if before in blank else before,
        within=tuple(f for f in within or () if f.strip()),
        kind=kind,
        camera=None if camera in blank else camera,
        min_size=None if min_size in blank else min_size,
        max_size=None if max_size in blank else max_size,
    )


Filters = Annotated[_Filters, Depends(_filters)]
NO_FILTERS = _Filters()


def _api(
    worker: _IndexWorker, runtime: Runtime | None, image_size: int | None, thumbs: _ThumbCache, uploads: DecodeBudget
) -> APIRouter:
    api = APIRouter()
    stats_cache: dict = {}

    def path_of(file_id: int) -> str:
        record, roots = worker.run(_servable, file_id)
        return resolve_file(record, list(roots), file_id)

    @api.get("/search", response_model=SearchResponse)
    def search_text(
        q: Annotated[str, Query(description="what to look for, e.g. 海边的日落")],
        filters: Filters,
        k: K = 20,
        not_: NotTexts = None,
        like: LikeId = None,
    ):
        """Text -> images, best first; with `not` and `like`, the text minus those texts plus that photo;
        the filter parameters limit which files may be returned."""
        started = time.perf_counter()
        check_query(q)
        nots = [check_query(text) for text in not_ or () if text.strip()]  # an empty form field adds nothing
        if not nots and like is None and filters == NO_FILTERS:
            return _image_results(worker.run(Index.search_text, q, k), started)
        return _image_results(worker.run(_combined, q, nots, like, k, filters), started)

    @api.post("/search/image", response_model=SearchResponse)
    def search_image(file: Upload, filters: Filters, k: FormK = 20):
        """Image -> similar images, best first (filter parameters in the query string)."""
        started = time.perf_counter()
        with decoded_upload(file, uploads, image_size) as image:
            found = worker.run(lambda index: index.search_image(image, k, where=filters.where(index)))
        return _image_results(found, started)

    @api.get("/similar", response_model=SearchResponse)
    def similar(id: QueryFileId, filters: Filters, k: K = 20):
        """Indexed image -> similar images, itself left out."""
        started = time.perf_counter()
        return _image_results(worker.run(_similar, id, k, filters), started)

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
            hits = worker.run(lambda index: zero_shot(index.model, image, names, t2s=index.t2s))[:k]
        found = [LabelResult(label=h.text, score=round(h.score, 6)) for h in hits]
        return TagResponse(labels=found, count=len(found), took_ms=_since(started))

    @api.get("/texts", response_model=TextsResponse)
    def texts(
        image_id: QueryFileId,
        k: K = 10,
        collection: str | None = None,
    ):
        """Indexed image -> the closest texts of the index's text collections (`cnclip index --texts`)."""
        started = time.perf_counter()
        hits = worker.run(_texts, image_id, k, collection)
        found = [TextResult(text=h.text, score=round(h.score, 6)) for h in hits]
        return TextsResponse(results=found, count=len(found), took_ms=_since(started))

    @api.get("/thumb/{file_id}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumb(file_id: FileId):
        """A JPEG thumbnail (at most 256 px a side) of an indexed image."""
        path = path_of(file_id)
        data = thumbs.get(file_id)
        if data is None:
            try:
                data = make_thumbnail(path, t=worker.run(_frame_time, file_id))
            except ImageError as e:
                raise HTTPException(404, f"file {file_id} no longer decodes; run cnclip index to update") from e
            thumbs.put(file_id, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @api.get("/image/{file_id}", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}})
    def image(file_id: FileId):
        """The original file of an indexed image."""
        path = path_of(file_id)
        media = mimetypes.guess_type(path)[0]
        if media is None or not media.startswith(("image/", "video/")):
            media = "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/health")
    def health() -> dict:
        """Status and what the index holds: image and text counts, model, vector index, last update."""
        stats, roots = worker.run(_stats, stats_cache)
        last = max(roots.values(), default=None)
        return {
            "status": "ok",
            "count": stats["images"],
            "videos": stats["videos"],
            "texts": stats["texts"],
            "model": stats["model"],
            "vector_index": stats["vector_index"],
            "last_update": None if last is None else dt.datetime.fromtimestamp(last, dt.timezone.utc).isoformat(),
            "runtime": (runtime or Runtime()).describe(),
            "runtime_choice": stats["runtime"],
            "t2s": worker.index.t2s,
            "rebuild": worker.run(_rebuild_status),
        }

    dupes_cache = _DupesCache(worker.index.catalog.folder)

    @api.get("/dupes", response_model=DupesResponse)
    def dupes(threshold: Threshold = DEFAULT_THRESHOLD, limit: DupeLimit = 100):
        """Groups of near-identical photos, largest first, each with its best copy first; deletes nothing."""
        started = time.perf_counter()
        return _dupe_results(dupes_cache.get(threshold, limit), started)

    return api


class _DupesCache:
    """The latest `find_duplicates` report, kept until the catalog changes or other parameters are asked for.

    It runs in the request's thread on a catalog connection of its own, one request at a time: at
    100,000 photos it takes most of a minute, and searches on the index worker must not wait for it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()
        self._last: tuple[tuple[int, float, int], DupeReport] | None = None

    def get(self, threshold: float, limit: int) -> DupeReport:
        with self._lock, Catalog.open(self.folder) as catalog:
            key = (catalog.generation(), threshold, limit)
            if self._last is None or self._last[0] != key:
                self._last = (key, find_duplicates(catalog, threshold, limit=limit))
            return self._last[1]


def _dupe_results(report: DupeReport, started: float) -> DupesResponse:
    groups = [
        DupeGroupResult(
            size=g.size,
            score=round(g.score, 6),
            capped=g.capped,
            members=[
                DupeFile(
                    id=m.id,
                    path=_display(m.path),
                    name=_display(os.path.basename(m.path)),
                    score=round(m.similarity, 6),
                    thumb=f"/api/thumb/{m.id}",
                    image=f"/api/image/{m.id}",
                    width=m.width,
                    height=m.height,
                    bytes=m.bytes,
                    mtime=m.mtime_ns / 1e9,
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
        took_ms=_since(started),
    )


def _stats(index: Index, cache: dict) -> tuple[dict, dict[str, float]]:
    """`Index.stats()` (which reads the saved vector index) once per catalog generation, and the scanned folders."""
    generation = index.catalog.generation()
    if cache.get("generation") != generation:
        index.refresh()  # so the saved vector index it reports is the current one
        cache.update(generation=generation, stats=index.stats())
    return cache["stats"], index.catalog.roots()


def _rebuild_status(index: Index) -> dict:
    """`Index.rebuild_status()` once a background rebuild that has finished is taken in (or its failure counted)."""
    index.refresh()
    return index.rebuild_status()


def _indexed_path(index: Index, file_id: int) -> str:
    """The path of an indexed file that has a stored vector (searches use the vector, never the file)."""
    record = index.catalog.files_by_ids([file_id]).get(file_id)
    if record is None or index.catalog.vector_for_path(record.path) is None:
        raise _not_found(file_id)
    return from_catalog_path(record.path)


def _combined(index: Index, q: str, nots: list[str], like: int | None, k: int, filters: _Filters) -> list[Hit]:
    """The text, minus each of `nots`, plus the indexed photo `like` (itself left out), filtered."""
    where = filters.where(index)
    if not nots and like is None:
        return index.search_text(q, k, where=where)
    terms = [Term(TEXT, q)] + [Term(TEXT, text, -1.0) for text in nots]
    if like is not None:
        _indexed_path(index, like)  # 404 for an id not in the index, as /api/similar answers
        terms.append(Term(FILE, like))
    return index.search_combined(terms, k, where=where)


def _similar(index: Index, file_id: int, k: int, filters: _Filters) -> list[Hit]:
    return index.search_image(_indexed_path(index, file_id), k, where=filters.where(index))


def _texts(index: Index, file_id: int, k: int, collection: str | None) -> list[TextHit]:
    return index.search_texts_by_image(_indexed_path(index, file_id), k, collection)


def _add_page(app: FastAPI, token: str | None) -> None:
    page = (WEB_DIR / "index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    def index_page(token_param: Annotated[str | None, Query(alias="token")] = None):
        if token_param is not None:
            # Keep a correct token in a same-site cookie (then thumbnails load as plain <img>) and
            # take it out of the address bar; a wrong one just leaves the page asking for it.
            if token is not None and hmac.compare_digest(token_param.encode(), token.encode()):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(_COOKIE, token, httponly=True, samesite="strict")
                return response
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
