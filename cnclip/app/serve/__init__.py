"""`cnclip serve`: a JSON API and a web page over one index (FastAPI).

Every index call (SQLite catalog, FAISS, the model) runs on one worker thread that owns the
`Index` (worker.py): the catalog's SQLite connection refuses other threads, and the model already
uses every core, so queries lose nothing by taking turns. Uploads are decoded and thumbnails made
in the request threads beside it (media.py). Files are served only by catalog id, and only from
inside the folders that were indexed. app.py builds the app; guard.py decides who may reach it;
routes.py holds the API; schemas.py what it answers.
"""

from cnclip.app.serve.app import create_app
from cnclip.app.serve.guard import TOKEN_ENV, check_bind, is_loopback, listen_socket
from cnclip.app.serve.media import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    UPLOAD_MEMORY_BYTES,
    DecodeBudget,
    decoded_bytes,
    decoded_upload,
    make_thumbnail,
    resolve_file,
)
from cnclip.app.serve.schemas import DupeFile, ImageResult

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "TOKEN_ENV",
    "UPLOAD_MEMORY_BYTES",
    "DecodeBudget",
    "DupeFile",
    "ImageResult",
    "check_bind",
    "create_app",
    "decoded_bytes",
    "decoded_upload",
    "is_loopback",
    "listen_socket",
    "make_thumbnail",
    "resolve_file",
]
