"""Where weights come from: a list of sources tried in order, resumable verified downloads into the cache.

A zoo name's official `.pt` file is used from the cache when it is there (no network at all).
Otherwise it comes from the first source that answers: the Hugging Face hub (`HF_ENDPOINT` points
it at a mirror such as https://hf-mirror.com), ModelScope (`MODELSCOPE_ENDPOINT`), a URL template
or a folder. The bytes stream into `<cache>/weights/<file>.part`, which a later attempt resumes with
an HTTP Range request only from the same URL and the same version of the file (`If-Range` with the
ETag or Last-Modified recorded in `<file>.part.json`), so a part never joins two sources' bytes;
the finished file is checked (size, SHA-256 when known, the caller's check) and only then renamed
to its final name, so a wrong or cut-off file never looks like a good one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, quote_plus

from cnclip import atomic, faults
from cnclip.errors import CheckpointError, CNClipError, ModelNotFoundError
from cnclip.model.config import ModelConfig
from cnclip.oslock import FileLock
from cnclip.userpath import expand_user

log = logging.getLogger(__name__)

SOURCES_ENV = "CNCLIP_WEIGHTS_SOURCE"
DEFAULT_SOURCES = "hf,modelscope"  # ModelScope is asked only when the hub cannot be reached
HUB_ENDPOINT = "https://huggingface.co"
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"
SOURCE_HELP = "comma list of hf, modelscope, URL templates with {file}, folders"
CHUNK = 256 * 1024
TIMEOUT = 20.0  # seconds to connect, and between two reads; a blocked host fails over after this
RETRIES = 4  # reconnections in a row that bring no new bytes before a source counts as unreachable

Progress = Callable[[int, "int | None"], None]
_REPORT: ContextVar[Progress | None] = ContextVar("cnclip_download_progress", default=None)


class _Unreachable(Exception):
    """The source could not be asked (no connection, timeout, 5xx): the next source is tried."""


class _Refused(Exception):
    """The source answered, but not with the file (404) or with a bad one: the search stops here."""

    def __init__(self, reason: str, bad_file: bool = False):
        super().__init__(reason)
        self.bad_file = bad_file


@dataclass(frozen=True)
class Source:
    """One place to get weights from."""

    kind: str  # "hf", "modelscope", "url" (a template with {file}) or "folder"
    where: str  # the endpoint, template or folder

    @property
    def label(self) -> str:
        """How messages name this source: 'hub', 'modelscope https://mirror', a template, a folder."""
        name = {"hf": "hub", "modelscope": "modelscope"}.get(self.kind)
        if name is None:
            return self.where
        default = HUB_ENDPOINT if self.kind == "hf" else MODELSCOPE_ENDPOINT
        return name if self.where == default else f"{name} {self.where}"

    def locate(self, config: ModelConfig) -> str | None:
        """The URL or path of `config`'s official file here; None if this source does not carry the model."""
        file = config.official_file or ""
        if self.kind == "hf":
            return config.hub_repo and f"{self.where}/{config.hub_repo}/resolve/main/{quote(file)}"
        if self.kind == "modelscope":
            # the layout of modelscope's own file download (modelscope.hub.file_download.get_file_download_url)
            repo = config.modelscope_repo
            return repo and f"{self.where}/api/v1/models/{repo}/repo?Revision=master&FilePath={quote_plus(file)}"
        if self.kind == "url":
            return self.where.replace("{file}", quote(file))
        return str(Path(self.where) / file)


def parse_sources(text: str | None = None) -> list[Source]:
    """Sources from a comma list (default `$CNCLIP_WEIGHTS_SOURCE`, then "hf,modelscope").

    Items: `hf` (the hub, or `$HF_ENDPOINT`), `modelscope` (or `$MODELSCOPE_ENDPOINT`), a URL
    template such as `https://example.com/weights/{file}`, or a folder holding the `.pt` files.
    """
    text = text if text is not None else (os.environ.get(SOURCES_ENV) or DEFAULT_SOURCES)
    sources = [_parse_one(item.strip()) for item in text.split(",") if item.strip()]
    if not sources:
        raise ModelNotFoundError(f"no weights source in {text!r}; give a {SOURCE_HELP}")
    return sources


def _parse_one(item: str) -> Source:
    if item.lower() in ("hf", "hub", "huggingface"):
        return Source("hf", _endpoint("HF_ENDPOINT", HUB_ENDPOINT))
    if item.lower() in ("modelscope", "ms"):
        return Source("modelscope", _modelscope_endpoint())
    if "://" in item:
        return Source("url", item if "{file}" in item else item.rstrip("/") + "/{file}")
    folder = expand_user(item)
    if item.startswith((".", "~", "/")) or os.sep in item or folder.is_dir():
        return Source("folder", str(folder))
    raise ModelNotFoundError(f"unknown weights source {item!r}; give a {SOURCE_HELP}")


def _endpoint(env: str, default: str) -> str:
    return (os.environ.get(env) or default).rstrip("/")


def _modelscope_endpoint() -> str:
    if os.environ.get("MODELSCOPE_ENDPOINT"):
        return _endpoint("MODELSCOPE_ENDPOINT", MODELSCOPE_ENDPOINT)
    domain = os.environ.get("MODELSCOPE_DOMAIN")  # the modelscope package's own setting: a bare host name
    if domain:
        return (domain if "://" in domain else "https://" + domain).rstrip("/")
    return MODELSCOPE_ENDPOINT


@contextlib.contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Within the block, downloads that get no `progress` argument report to this one (the CLI's bar)."""
    token = _REPORT.set(progress)
    try:
        yield
    finally:
        _REPORT.reset(token)


def weights_dir() -> Path:
    """Where downloaded weights are kept: `$CNCLIP_CACHE/weights`, else ~/.cache/cnclip/weights."""
    # imported here: the CLI loads this module for `reporting` on every command, and onnx_runtime brings numpy
    from cnclip.model.onnx_runtime import cache_dir

    return cache_dir() / "weights"


def cached_weights(config: ModelConfig) -> Path | None:
    """`config`'s official file if this machine already has it, else None; never touches the network.

    Besides cnclip's cache this looks in huggingface_hub's, where earlier cnclip versions put it.
    """
    target = weights_dir() / _official_file(config)
    if target.is_file():
        return target
    if not config.hub_repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(config.hub_repo, _official_file(config))
    return Path(found) if isinstance(found, str) else None


def fetch_official(
    config: ModelConfig,
    sources: str | Sequence[Source] | None = None,
    *,
    progress: Progress | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """The path of `config`'s official `.pt` in the cache, downloaded from the first source that answers.

    `sources`: a comma list or parsed sources (default `$CNCLIP_WEIGHTS_SOURCE`, then hub then
    ModelScope). The next source is tried only when one cannot be reached; a 404 or a bad file stops.
    `progress(done_bytes, total_bytes or None)` is called as bytes arrive, the last time with
    done == total. `check(path)` may raise a CNClipError to refuse the file before it is published.
    With `HF_HUB_OFFLINE=1` only folders are read. Raises one-line ModelNotFoundError / CheckpointError.
    """
    cached = cached_weights(config)
    if cached is not None:
        return cached
    chosen = parse_sources(sources) if sources is None or isinstance(sources, str) else list(sources)
    folder = weights_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelNotFoundError(f"cannot create {folder} ({_why(e)}); set CNCLIP_CACHE to a writable folder") from e
    target = folder / _official_file(config)
    with _exclusive(target):
        if target.is_file():  # another process finished it while this one waited
            return target
        return _fetch(config, chosen, target, progress or _REPORT.get(), check)


def _fetch(config: ModelConfig, sources: list[Source], target: Path, progress, check) -> Path:
    failures: list[str] = []
    offline = [s.label for s in sources if s.kind != "folder"] if _offline() else []
    if offline:
        failures.append(f"{', '.join(offline)}: not tried, HF_HUB_OFFLINE=1")
    for source in sources:
        if source.label in offline:
            continue
        where = source.locate(config)
        if where is None:
            failures.append(f"{source.label}: does not carry {config.name}")
            continue

        def answered(source=source) -> None:
            if failures:  # say once, on stderr through the CLI's logging, why the file comes from elsewhere
                log.warning("%s comes from %s (%s)", target.name, source.label, "; ".join(failures))
            else:
                log.info("downloading %s from %s", target.name, source.label)

        try:
            _download(source, where, target, config, progress, check, answered)
            return target
        except _Unreachable as e:
            failures.append(f"{source.label}: {e}")
        except _Refused as e:
            failures.append(f"{source.label}: {e}")
            raise (CheckpointError if e.bad_file else ModelNotFoundError)(_no_source(config, failures)) from None
    raise ModelNotFoundError(_no_source(config, failures))


def _no_source(config: ModelConfig, failures: list[str]) -> str:
    file = _official_file(config)
    by_hand = " or ".join(
        url
        for url in (
            config.hub_repo and f"{HUB_ENDPOINT}/{config.hub_repo}/resolve/main/{file}",
            config.modelscope_repo and f"{MODELSCOPE_ENDPOINT}/models/{config.modelscope_repo}/files",
        )
        if url
    )
    return (
        f"{config.name}: {file} is not in {weights_dir()} and no source gave it ({'; '.join(failures)}); "
        f"download it by hand{' from ' + by_hand if by_hand else ''} and pass its path with --model PATH, "
        f"e.g. --model /path/to/{file}"
    )


# -- one source ---------------------------------------------------------------------------------------


@dataclass
class _Answer:
    stream: BinaryIO  # an HTTP response or an open file
    start: int  # where its first byte belongs: the offset asked for, or 0 when the source ignored Range
    total: int | None  # the whole file's size, when the source says
    sha256: str | None = None  # the file's digest, when the source says (the hub's X-Linked-Etag)
    version: str | None = None  # what a resume sends as If-Range: a strong ETag, else Last-Modified


def _download(source: Source, where: str, target: Path, config: ModelConfig, progress, check, answered) -> None:
    part = target.with_name(target.name + ".part")
    try:
        digest = _receive(source, where, part, config.size, progress, answered)
        _verify(part, config, digest, check)
    except _Refused as e:
        if e.bad_file:
            part.unlink(missing_ok=True)
            _record_of(part).unlink(missing_ok=True)
        raise
    atomic.publish(part, target)
    _record_of(part).unlink(missing_ok=True)


def _receive(source: Source, where: str, part: Path, size: int | None, progress, answered) -> str | None:
    """Stream the file into `part`, resuming it after dropped connections; the digest the source gave.

    `size`: the pinned size, when known; a source announcing another is refused before any byte is kept."""
    stalled, longest, first = 0, 0, True
    while True:
        offset, version, digest = _resumable(part, where)
        try:
            answer = _open(source, where, offset, version)
        except _Unreachable:
            if first or stalled >= RETRIES:  # a source that never answered fails over at once
                raise
            stalled += 1
            time.sleep(stalled)
            continue
        if first:
            answered()
            first = False
        if size is not None and answer.total is not None and answer.total != size:
            answer.stream.close()
            announced = f"the source announces {answer.total} bytes, not the expected {size}"
            raise _Refused(f"bad file, {announced}", bad_file=True)
        if answer.start == 0:
            digest = None
            _begin(part, where, answer)
        digest = answer.sha256 or digest
        dropped = _copy(answer, part, progress)
        done = part.stat().st_size
        if answer.total is None and not dropped:
            if progress:
                progress(done, done)
            return digest
        if done == answer.total:
            return digest
        if answer.total is not None and done > answer.total:
            raise _Refused(f"bad file, {done} bytes where {answer.total} were announced", bad_file=True)
        # progress is a part longer than ever before: a source that restarts and drops at one place never gets there
        stalled = 0 if done > longest else stalled + 1
        longest = max(longest, done)
        if stalled > RETRIES:
            raise _Unreachable(f"connection dropped at byte {done} of {answer.total or 'unknown'}")
        time.sleep(stalled)  # at once after a drop that brought bytes; slower while nothing comes


def _record_of(part: Path) -> Path:
    """Where a part's source and version are noted, beside it."""
    return part.with_name(part.name + ".json")


def _resumable(part: Path, where: str) -> tuple[int, str | None, str | None]:
    """(offset, version, sha256) to resume `part` from `where` with: offset 0 (start over) unless the
    part's record says its bytes came from `where` and names their version."""
    try:
        record = json.loads(_record_of(part).read_text(encoding="utf-8"))
        offset = part.stat().st_size
    except (OSError, ValueError):  # no part, no record (a part left by an older cnclip), a torn record
        return 0, None, None
    if not isinstance(record, dict) or record.get("url") != where or not record.get("version"):
        return 0, None, None
    return offset, record["version"], record.get("sha256")


def _begin(part: Path, where: str, answer: _Answer) -> None:
    """Empty `part`, then record where its bytes will come from: in this order a crash in between leaves an
    empty part, never old bytes under the new source's name."""
    try:
        part.write_bytes(b"")
        atomic.write_json(_record_of(part), {"url": where, "version": answer.version, "sha256": answer.sha256})
    except OSError as e:
        raise _cannot_write(part, e) from e


def _copy(answer: _Answer, part: Path, progress) -> bool:
    """Append what `answer` sends to `part` (rewriting it when the source restarted from byte 0).

    Returns whether the connection broke."""
    import http.client  # already loaded by urllib.request when the answer is an HTTP response

    done, dropped = answer.start, False
    try:
        with answer.stream as stream, open(part, "r+b" if part.exists() else "wb") as out:
            out.seek(answer.start)
            out.truncate()
            if progress:
                progress(done, answer.total)
            while True:
                try:
                    chunk = stream.read(CHUNK)
                except (OSError, http.client.HTTPException):
                    dropped = True
                    break
                if not chunk:
                    break
                out.write(chunk)
                out.flush()  # what a kill here leaves is exactly what was written
                faults.point("download.mid")
                done += len(chunk)
                if progress:
                    progress(done, answer.total)
    except OSError as e:  # reads are caught above: this is the cache's disk
        raise _cannot_write(part, e) from e
    return dropped


def _cannot_write(part: Path, e: OSError) -> ModelNotFoundError:
    return ModelNotFoundError(f"cannot write {part} ({_why(e)}); free some space or set CNCLIP_CACHE to another folder")


def _open(source: Source, where: str, offset: int, version: str | None = None) -> _Answer:
    """Ask `source` for the file from byte `offset` on, if it is still `version`; from byte 0 otherwise."""
    if source.kind == "folder":
        return _open_file(Path(where), offset, version)
    import http.client
    import urllib.request
    from urllib.error import HTTPError, URLError

    offset = offset if version else 0  # bytes of an unknown version are never resumed
    request = urllib.request.Request(where, headers={"User-Agent": "cnclip"})
    if version and offset:  # urllib passes both on through redirects, to the hub's CDN that knows the version
        request.add_header("Range", f"bytes={offset}-")
        request.add_header("If-Range", version)
    request.seen = {}  # filled by _KeepDigest while redirects are followed
    try:
        response = _opener().open(request, timeout=TIMEOUT)
    except HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # the part is complete already, or longer than the file: start over
            if _range_total(e.headers.get("Content-Range")) == offset and _version(e.headers) in (None, version):
                return _Answer(io.BytesIO(), offset, offset, version=version)
            return _open(source, where, 0)
        if e.code in (408, 429) or e.code >= 500:  # busy or a broken gateway: as good as unreachable
            raise _Unreachable(f"HTTP {e.code}") from e
        raise _Refused(f"HTTP {e.code}") from e
    except (URLError, OSError, http.client.HTTPException) as e:
        raise _Unreachable(_why(e)) from e
    headers = response.headers
    hints = (request.seen.get("sha256"), headers.get("X-Linked-Etag"), headers.get("ETag"))
    digest = next(filter(None, map(_sha256_hint, hints)), None)
    if offset and response.status == 206:
        # a server that ignores If-Range shows another version by its ETag, or answers from another offset
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range", "").strip())
        if match and int(match[1]) == offset and _version(headers) in (None, version):
            return _Answer(response, offset, int(match[2]) if match[2] != "*" else None, digest, version)
        response.close()
        return _open(source, where, 0)
    # a 200 to a Range request: another version (If-Range) or a server that ignores Range; start over
    length = headers.get("Content-Length", "")
    return _Answer(response, 0, int(length) if length.isdigit() else None, digest, _version(headers))


def _open_file(path: Path, offset: int, version: str | None) -> _Answer:
    if not path.parent.is_dir():  # an unmounted share: as good as unreachable
        raise _Unreachable(f"no folder {path.parent}")
    try:
        stream = open(path, "rb")
    except FileNotFoundError as e:
        raise _Refused(f"no {path.name} there") from e
    except OSError as e:
        raise _Unreachable(_why(e)) from e
    stat = os.fstat(stream.fileno())
    now = f"{stat.st_size}-{stat.st_mtime_ns}"  # a folder's file is another version once its size or time changes
    start = offset if offset <= stat.st_size and version == now else 0
    stream.seek(start)
    return _Answer(stream, start, stat.st_size, version=now)


@functools.cache
def _opener():
    import urllib.request

    class _KeepDigest(urllib.request.HTTPRedirectHandler):
        """Follows redirects, keeping the hub's X-Linked-Etag or ETag when it is an LFS file's SHA-256: only
        the first answer, the redirect to the CDN, carries it."""

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            seen = getattr(req, "seen", {})
            if not seen.get("sha256"):
                seen["sha256"] = _sha256_hint(headers.get("X-Linked-Etag")) or _sha256_hint(headers.get("ETag"))
            if new is not None:
                new.seen = seen
            return new

    return urllib.request.build_opener(_KeepDigest)  # proxies from $https_proxy etc. still apply


def _verify(part: Path, config: ModelConfig, digest: str | None, check) -> None:
    """Refuse a finished part that is not the file: wrong size, wrong digest, or `check` says so."""
    size = part.stat().st_size
    problem = None
    if size == 0:
        problem = "an empty file"
    elif config.size is not None and size != config.size:
        problem = f"{size} bytes, not the expected {config.size}"
    else:
        wanted = {d.lower() for d in (config.sha256, digest) if d}
        got = _sha256(part) if wanted else None
        if wanted - {got}:
            problem = f"sha256 {got[:16]}... is not the expected {sorted(wanted - {got})[0][:16]}..."
    if problem is None and check is not None:
        try:
            check(part)
        except CNClipError as e:
            problem = str(e).replace(str(part), part.stem)  # the .part is gone by the time this is read
    if problem is not None:
        raise _Refused(f"bad file, {problem}", bad_file=True)


# -- small helpers -------------------------------------------------------------------------------------


def _official_file(config: ModelConfig) -> str:
    if not config.official_file:
        raise ModelNotFoundError(
            f"{config.name} has no published weights; use cnclip.create_model({config.name!r}) for random ones"
        )
    return config.official_file


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Hold `<target>.lock`: two processes (Ray workers, two shells) must not write one `.part` together."""
    lock = FileLock(target.with_name(target.name + ".lock"))
    if not lock.acquire(wait=0):
        log.warning("another cnclip process is downloading %s; waiting for it", target.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _range_total(content_range: str | None) -> int | None:
    match = re.search(r"/(\d+)\s*$", content_range or "")
    return int(match[1]) if match else None


def _version(headers) -> str | None:
    """What names this version of the file in If-Range: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = (headers.get("ETag") or "").strip()
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified") or None


def _sha256_hint(etag: str | None) -> str | None:
    value = (etag or "").strip().removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _why(e: BaseException) -> str:
    """A failure in a few words: 'connection refused', 'timed out', 'HTTP 404'."""
    import ssl
    from urllib.error import HTTPError, URLError

    if isinstance(e, HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    elif isinstance(e, URLError):
        return " ".join(str(e.reason).split())
    known = [
        (ConnectionRefusedError, "connection refused"),
        (ConnectionResetError, "connection reset"),
        (TimeoutError, "timed out"),
        (socket.gaierror, "host not found"),
        (ssl.SSLError, "TLS failed"),
    ]
    for kind, words in known:
        if isinstance(e, kind):
            return words
    text = " ".join((getattr(e, "strerror", None) or str(e)).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
