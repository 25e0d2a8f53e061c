"""`create_app`: the FastAPI app over one index — the guard in front, the API under /api/, the page at /,
every error as `{"error": "one line"}`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnclip.app.serve.guard import LOOPBACK_NAMES, TOKEN_COOKIE, Guard, token_matches
from cnclip.app.serve.media import MAX_UPLOAD_BYTES, THUMB_CACHE_BYTES, UPLOAD_MEMORY_BYTES, DecodeBudget
from cnclip.app.serve.routes import api_router
from cnclip.app.serve.schemas import error_response
from cnclip.app.serve.worker import IndexWorker, folder_watcher, lifespan, warm_up
from cnclip.errors import CNClipError, IndexNotFoundError, ModelMismatchError
from cnclip.lru import LRUCache
from cnclip.model.runtime import Runtime

if TYPE_CHECKING:
    from cnclip.index.watch import WatchBatch

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent.parent / "web"
_STATUS = ((IndexNotFoundError, 503), (ModelMismatchError, 409), (CNClipError, 400))


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
    watcher = folder_watcher(index_path, watch, runtime, watch_poll, on_watch)
    worker = IndexWorker(index_path, runtime, t2s)
    try:
        image_size = worker.run(warm_up) if warm else None
    except BaseException:
        worker.close()
        raise
    app = FastAPI(
        title="cnclip",
        summary="Chinese text-image search over one index",
        version="1",
        lifespan=lifespan(worker, watcher),
        docs_url=None,  # FastAPI's docs page loads its scripts from a CDN; the schema is enough
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.index = worker
    app.state.upload_memory = uploads = DecodeBudget(upload_memory)
    hosts = LOOPBACK_NAMES | {host.lower().strip("[]")}
    app.add_middleware(Guard, token=token or None, hosts=hosts, max_body=MAX_UPLOAD_BYTES + 64 * 1024)
    _add_error_handlers(app)
    thumbs: LRUCache[int, bytes] = LRUCache(thumb_cache_bytes, sizeof=len)
    app.include_router(api_router(worker, runtime, image_size, thumbs, uploads), prefix="/api")
    _add_page(app, token or None)
    return app


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": "one line"}` with a 4xx status; a traceback never leaves the server."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no such page: {request.url.path}" if exc.detail == "Not Found" else _one_line(exc.detail)
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(422, _one_line(f"{where}: {first.get('msg', 'invalid value')}"))

    @app.exception_handler(CNClipError)
    async def cnclip_error(request: Request, exc: CNClipError) -> JSONResponse:
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        return error_response(status, _one_line(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return error_response(500, "internal error; the server log has the details")


def _add_page(app: FastAPI, token: str | None) -> None:
    page = (WEB_DIR / "index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    def index_page(token_param: Annotated[str | None, Query(alias="token")] = None):
        if token_param is not None:
            # Keep a correct token in a same-site cookie (then thumbnails load as plain <img>) and
            # take it out of the address bar; a wrong one just leaves the page asking for it.
            if token_matches(token_param, token):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
