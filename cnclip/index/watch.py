"""Keeping an index current with its folders: file-system events, batched, applied by the incremental scan.

A `Watcher` observes folders (watchdog: inotify, FSEvents or ReadDirectoryChangesW; polling for
network drives), lets a burst of changes settle, and rescans only the folders the changes touched,
holding the index's writer lock and going through the same `Indexer` as `cnclip index`: unchanged
files are skipped by size and mtime, moved ones reuse their vectors by content hash, a killed
watcher loses at most the embedding batch in flight, a batch that failed is tried again with
back-off, and a folder that cannot be seen (a drive unmounted) keeps its files offline and is
watched again when it comes back.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

try:  # watchdog 7 reports chmod and touch apart; before, as (file or folder) modified events
    from watchdog.events import DirAttribEvent, FileAttribEvent
except ImportError:  # pragma: no cover - watchdog < 7
    DirAttribEvent, FileAttribEvent = DirCreatedEvent, FileModifiedEvent

from cnclip.errors import CNClipError, IndexBusyError
from cnclip.index import filesystem, reading
from cnclip.index.index import Index, ocr_default
from cnclip.index.scan import NOT_MOUNTED, Indexer, IndexSummary, Progress, ScanStopped, to_catalog_path
from cnclip.index.video import VIDEO_EXTENSIONS
from cnclip.model.ocr import default_reader
from cnclip.model.transform import IMAGE_EXTENSIONS
from cnclip.userpath import expand_user

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

    from cnclip.index.catalog import Catalog
    from cnclip.model.clip import CNClipModel
    from cnclip.model.encoder import Encoder
    from cnclip.model.runtime import Runtime

log = logging.getLogger(__name__)

SETTLE_S = 1.0  # a batch is applied once no change has arrived for this long ...
MAX_DELAY_S = 5.0  # ... or this long after its first change, while a long copy goes on
ROOT_CHECK_S = 2.0  # how often each watched folder, and drive mounted in one, is checked for having gone or come back
RETRY_FIRST_S = 1.0  # a batch that failed (a read error, the catalog not writable) is tried again after this long,
RETRY_MAX_S = 60.0  # doubling at each failure up to this, without waiting for another change
# The saved vector file is brought up to date at most this often (and on stop): readers follow the
# catalog's change journal, so a whole-file write per batch would buy them nothing.
SAVE_EVERY_S = 60.0
_LOCK_POLL_S = 0.5
# Opened and closed-without-writing events (our own reads among them) and folder "modified" events
# say nothing the scan needs; a file's attributes do: a photo made readable, or its date set back.
_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    DirAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


@dataclass
class WatchBatch:
    """One applied batch: the folders rescanned and what the scans did."""

    folders: list[str]
    summary: IndexSummary
    online: int = 0  # offline files seen again (a drive back), back in searches without embedding
    words: int = 0  # photos whose words were read after the scans

    def describe(self) -> str:
        """One line, e.g. `3 added, 1 removed (1 embedded, 2 reused)`; empty when nothing changed."""
        s = self.summary
        counts = [
            (s.added, "added"),
            (s.updated, "updated"),
            (s.removed, "removed"),
            (self.online, "back online"),
            (sum(item["files"] for item in s.offline), "offline"),
            (len(s.skipped), "skipped"),
            (self.words, "read for words"),
        ]
        text = ", ".join(f"{n} {what}" for n, what in counts if n)
        return f"{text} ({s.embedded} embedded, {s.reused} reused)" if text else ""

    def to_dict(self) -> dict:
        return {"folders": list(self.folders), "online": self.online, "words_read": self.words} | self.summary.to_dict()


class Watcher:
    """Keeps the index at `index_path` current with `folders` until `stop`.

    `start` begins observing at once; a worker thread opens its own writer `Index` (with `model`, or
    the index's model loaded with `runtime` at the first batch), rescans the folders first when
    `scan_first`, then applies each batch of changes and reports it to `on_batch`. Errors in a batch
    go to `on_error` and the batch is tried again after a back-off (RETRY_FIRST_S doubling up to
    RETRY_MAX_S). `poll` (seconds) polls the folders instead of
    using OS events: for network drives, where events do not arrive. Other keyword `options` are
    `Indexer`'s (batch_size, include_hidden, max_pixels, draft, prune, ...). `words`: read the words
    in new and changed photos after each batch's scans (default: `$CNCLIP_OCR`, else yes).
    Callbacks run on the worker thread.
    """

    def __init__(
        self,
        index_path: str | os.PathLike,
        folders: Sequence[str | os.PathLike],
        *,
        model: CNClipModel | Encoder | None = None,
        runtime: Runtime | None = None,
        poll: float | None = None,
        scan_first: bool = True,
        settle: float = SETTLE_S,
        max_delay: float = MAX_DELAY_S,
        on_batch: Callable[[WatchBatch], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
        words: bool | None = None,
        **options,
    ):
        if not folders:
            raise CNClipError("nothing to watch; give at least one folder")
        if options.get("ray") is not None:
            raise CNClipError("a watcher embeds in this process, not with Ray; index with --ray first, then watch")
        if poll is not None and not poll > 0:
            raise CNClipError(f"the polling interval must be above 0 seconds, not {poll}")
        self.index_path = Path(index_path)
        self.roots = _outermost(os.path.abspath(expand_user(f)) for f in folders)
        self.poll = poll
        self.scan_first = scan_first
        self.settle, self.max_delay = settle, max_delay
        self.on_batch, self.on_error = on_batch, on_error
        self.options = options
        self.words = ocr_default() if words is None else words
        self.error: BaseException | None = None  # what ended the worker, if anything did
        self._model, self._runtime = model, runtime
        self._index_folder = os.path.abspath(expand_user(self.index_path))
        self._include_hidden = bool(options.get("include_hidden", False))
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._pending: dict[str, dict[str, bool]] = {}  # root -> folder -> whether files may have arrived
        self._first_change = self._last_change = 0.0
        self._observers: dict[str, BaseObserver] = {}
        self._seen: dict[str, tuple | None] = {}  # root -> its `_identity` when last checked
        self._mounts: dict[str, dict[str, tuple | None]] = {}  # root -> mount point inside it -> its `_identity`
        self._failed: dict[str, dict[str, bool]] = {}  # a failed batch, tried again at `_retry_at`
        self._retry_at, self._retry_delay = float("inf"), RETRY_FIRST_S
        self._observers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cnclip-watch", daemon=True)
        self._saved_generation: int | None = None  # the catalog's generation when the vector file was saved
        self._saved_at = float("-inf")

    # -- starting and stopping ---------------------------------------------------------------------

    def start(self) -> Watcher:
        """Observe the folders and start applying changes; CNClipError if the OS refuses to watch them."""
        if self._thread.ident is not None:
            raise CNClipError("this watcher was started already; make a new one")
        try:
            mounts = _mount_points()
            for root in self.roots:
                self._seen[root], self._mounts[root] = _identity(root), self._mounts_inside(root, mounts)
                if self._seen[root] is None:
                    self._report_error(CNClipError(f"{root} is not there ({NOT_MOUNTED}); watching for it"))
                else:
                    self._observe(root)
        except BaseException:
            self._stop_observers()
            raise
        if self.scan_first:
            for root in self.roots:
                self._queue(root, root, gains=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop observing and end the worker, which leaves a scan in flight between two folders
        walked, files hashed or embedding batches (committed work is kept, nothing is deleted) and
        saves the vector file."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._stop_observers()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for the worker to end (after `stop`, or an error); True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observing ---------------------------------------------------------------------------------

    def _observe(self, root: str) -> None:
        """(Re)start the observer of `root`; a new one, since a watch on a vanished folder is dead."""
        with self._observers_lock:
            old = self._observers.pop(root, None)
            if old is not None:
                _halt(old)
            if self._stopping.is_set() or self._seen.get(root) is None:
                return
            observer = self._new_observer()
            try:
                observer.schedule(_Handler(self, root), root, recursive=True, event_filter=_EVENTS)
                observer.start()
            except OSError as e:  # e.g. the inotify watch limit on a very large tree
                _halt(observer)
                raise CNClipError(
                    f"cannot watch {root}: {e.strerror or e}; raise fs.inotify.max_user_watches, or poll "
                    "with --watch-poll SECONDS"
                ) from e
            self._observers[root] = observer

    def _new_observer(self) -> BaseObserver:
        if self.poll is not None:
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.poll)
        from watchdog.observers import Observer

        return Observer()

    def _stop_observers(self) -> None:
        with self._observers_lock:
            observers, self._observers = list(self._observers.values()), {}
        for observer in observers:
            _halt(observer)

    def _check_roots(self) -> None:
        """A watched folder, or a drive mounted inside one, that went away, came back or is now
        another (a drive mounted over it, or unmounted and mounted again between two checks, which
        no event tells and which leaves the old watches dead) is observed anew and rescanned: gone,
        its files are kept offline; back, they return to searches without being embedded again."""
        table = _mount_points()
        for root in self.roots:
            now, mounts, before = _identity(root), self._mounts_inside(root, table), self._mounts.get(root, {})
            if now != self._seen.get(root):
                log.info("watched folder %s %s", root, "is gone" if now is None else "is back or another")
                changed = [root]
            else:
                changed = sorted(m for m in mounts.keys() | before.keys() if mounts.get(m) != before.get(m))
                for mount in changed:
                    log.info("watch: the drive at %s was mounted, unmounted or mounted again", mount)
            self._seen[root], self._mounts[root] = now, mounts
            if not changed:
                continue
            try:
                self._observe(root)
            except CNClipError as e:
                self._report_error(e)
            for folder in changed:
                self._queue(root, folder, gains=True)

    def _mounts_inside(self, root: str, mount_points: list[str]) -> dict[str, tuple | None]:
        """Mount point -> `_identity`, for those of `mount_points` inside `root` that a scan would walk."""
        inside = (m for m in mount_points if m != root and _inside(m, root))
        return {m: _identity(m) for m in inside if self._folder_to_scan(root, m, True, True) == m}

    def _note(self, root: str, event: FileSystemEvent) -> None:
        """Queue the folders an event touched (called on the observer's thread)."""
        if event.event_type == "moved":
            touched = [(event.src_path, False), (event.dest_path, True)]
        else:
            touched = [(event.src_path, event.event_type != "deleted")]
        for path, gains in touched:
            folder = self._folder_to_scan(root, os.fsdecode(path), event.is_directory, gains)
            if folder is not None:
                self._queue(root, folder, gains)

    def _folder_to_scan(self, root: str, path: str, is_dir: bool, gains: bool) -> str | None:
        """The folder whose rescan picks up a change at `path`, or None for a change the index ignores."""
        if not path:
            return None  # the far side of a move out of the watched tree
        path = os.path.abspath(path)
        if path == root:
            return root
        if not _inside(path, root) or _inside(path, self._index_folder):
            return None  # the index's own files, when it lives inside a watched folder
        hidden = any(part.startswith(".") for part in Path(os.path.relpath(path, root)).parts)
        if hidden and not self._include_hidden:
            return None
        if not is_dir and os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            if not gains:  # maybe a symlink to a folder (a file to the OS's events): `_apply` asks the catalog
                return path
            if not os.path.isdir(path):
                return None
            is_dir = True  # a new symlink to a folder, which the scan follows
        return path if is_dir and gains else os.path.dirname(path)

    def _queue(self, root: str, folder: str, gains: bool) -> None:
        now = time.monotonic()
        with self._cond:
            if not self._pending:
                self._first_change = now
            self._last_change = now
            folders = self._pending.setdefault(root, {})
            folders[folder] = folders.get(folder, False) or gains
            self._cond.notify_all()

    def _take_batch(self, timeout: float) -> dict[str, dict[str, bool]]:
        """The queued changes once they have settled (or waited `max_delay`); empty after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                due = min(self._last_change + self.settle, self._first_change + self.max_delay)
                if self._pending and now >= due:
                    batch, self._pending = self._pending, {}
                    return batch
                if now >= deadline:
                    break
                self._cond.wait(min(due, deadline) - now if self._pending else deadline - now)
        return {}

    # -- applying ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            # Its own connection on this thread (SQLite's rule), and a writer: a server's Index stays a reader.
            index = Index.open(self.index_path, model=self._model, runtime=None if self._model else self._runtime)
        except BaseException as e:  # noqa: BLE001 - reported, and `wait` returns
            self.error = e
            self._report_error(e)
            return
        try:
            self._saved_generation = index.catalog.generation()
            next_check = time.monotonic() + ROOT_CHECK_S
            while not self._stopping.is_set():
                batch = self._take_batch(max(0.0, min(next_check, self._retry_at) - time.monotonic()))
                if time.monotonic() >= next_check:
                    self._check_roots()
                    if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                        self._save(index)
                    next_check = time.monotonic() + ROOT_CHECK_S
                retrying = bool(self._failed) and time.monotonic() >= self._retry_at
                if retrying:
                    batch = _merged(batch, self._failed)
                    self._failed, self._retry_at = {}, float("inf")
                if batch and not self._stopping.is_set() and self._apply(index, batch) and retrying:
                    self._retry_delay = RETRY_FIRST_S
            self._save(index)
        except BaseException as e:  # noqa: BLE001 - a bug: reported instead of dying silently
            self.error = e
            log.exception("watching %s stopped", ", ".join(self.roots))
            self._report_error(e)
        finally:
            index.close()

    def _apply(self, index: Index, batch: dict[str, dict[str, bool]]) -> bool:
        """Rescan the folders of one batch under the writer lock, then report what changed; False
        when it failed, and is tried again later."""
        if not self._lock(index):
            return True  # stopping
        summary = IndexSummary()
        try:
            jobs = _plan(_with_something_to_rescan(batch, index.catalog))
            if not jobs:
                return True
            offline = index.catalog.offline_count()
            indexer = Indexer(index.encoder, index.catalog, should_stop=self._stopping.is_set, **self.options)
            for folder, root in jobs:
                folder = _nearest_existing(folder, root)  # gone since the plan: an earlier job took long
                if folder == root and not os.path.isdir(root):
                    if not index.catalog.has_files_under(to_catalog_path(root)):
                        continue  # a watched folder that is not there and holds nothing yet
                _add(summary, indexer.run(folder, self._check_stop, within=root))
            online = max(0, offline - index.catalog.offline_count())
            words = self._read_words(index, {root for _, root in jobs})
        except ScanStopped:
            return True
        except Exception as e:  # noqa: BLE001 - reported, and tried again
            if not isinstance(e, CNClipError | OSError):
                log.exception("watch: a batch failed")
            self._retry_later(batch, e)
            return False
        finally:
            index.lock.release()
        report = WatchBatch([folder for folder, _ in jobs], summary, online, words)
        if report.describe():
            log.info("watch: %s", report.describe())
        if self.on_batch is not None:
            try:
                self.on_batch(report)
            except Exception:  # noqa: BLE001 - a failing callback must not stop the watching
                log.exception("the watch callback failed")
        return True

    def _read_words(self, index: Index, roots: set[str]) -> int:
        """The second stage, as `cnclip index` runs it: the words of photos under `roots` not read
        yet. A failure here is logged and left for the next batch: the vectors are in."""
        if not self.words:
            return 0
        read = 0
        try:
            for root in sorted(roots):
                summary = reading.read_words(
                    index.catalog, default_reader(), root=to_catalog_path(root), should_stop=self._stopping.is_set
                )
                read += summary.read
                for path, reason in summary.failed:
                    log.warning("watch: could not read the words in %s: %s", path, reason)
        except CNClipError as e:
            log.warning("watch: reading words stopped: %s; the next batch goes on", e)
        return read

    def _retry_later(self, batch: dict[str, dict[str, bool]], error: Exception) -> None:
        """Keep a failed batch to apply again after the back-off, which doubles at each failure."""
        self._failed = _merged(self._failed, batch)
        delay, self._retry_delay = self._retry_delay, min(2 * self._retry_delay, RETRY_MAX_S)
        self._retry_at = time.monotonic() + delay
        reported = CNClipError(f"{error}; trying again in {delay:g} s")
        reported.__cause__ = error
        self._report_error(reported)

    def _lock(self, index: Index) -> bool:
        """Take the writer lock, waiting for another writer (a `cnclip index` run) as long as it takes."""
        waiting = False
        while not self._stopping.is_set():
            try:
                index.lock.acquire(wait=_LOCK_POLL_S)
                return True
            except IndexBusyError:
                if not waiting:
                    log.info("watch: waiting for another writer of %s (%s)", index.catalog.folder, index.lock.owner())
                    waiting = True
        return False

    def _save(self, index: Index) -> None:
        """Bring the saved vector file up to date if the catalog changed (`refresh` saves it while
        the lock is held); while another writer is at work, that one saves it, or the next try."""
        generation = index.catalog.generation()
        if generation == self._saved_generation or not index.lock.try_acquire():
            return
        try:
            index.refresh()
        except CNClipError as e:  # the catalog stays the record; the next reader builds what it needs
            log.warning("watch: could not bring the vector index of %s up to date: %s", index.catalog.folder, e)
            return
        finally:
            index.lock.release()
        self._saved_generation, self._saved_at = generation, time.monotonic()

    def _check_stop(self, _: Progress) -> None:
        if self._stopping.is_set():
            raise ScanStopped("the watcher was stopped")

    def _report_error(self, error: BaseException) -> None:
        if self.on_error is None or not isinstance(error, Exception):
            log.warning("watch: %s", error)
            return
        try:
            self.on_error(error)
        except Exception:  # noqa: BLE001
            log.exception("the watch error callback failed")


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, root: str):
        self.watcher, self.root = watcher, root

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._note(self.root, event)


def _plan(batch: dict[str, dict[str, bool]]) -> list[tuple[str, str]]:
    """(folder, its watched root) to rescan: each the nearest folder that still exists, none inside
    another (a scan is recursive), those that gained files first, so that files moved from one
    folder to another are seen in their new place before their old one is swept (and, counted
    there, do not look like most of the library gone at once)."""
    found: dict[str, tuple[str, bool]] = {}
    for root, folders in batch.items():
        for folder, gains in folders.items():
            folder = _nearest_existing(folder, root)
            found[folder] = (root, found.get(folder, (root, False))[1] or gains)
    kept: dict[str, tuple[str, bool]] = {}
    for folder in sorted(found, key=len):  # parents before their children
        outer = next((k for k in kept if _inside(folder, k)), None)
        if outer is None:
            kept[folder] = found[folder]
        else:
            kept[outer] = (kept[outer][0], kept[outer][1] or found[folder][1])
    order = sorted(kept, key=lambda f: (not kept[f][1], f))
    return [(folder, kept[folder][0]) for folder in order]


def _with_something_to_rescan(batch: dict[str, dict[str, bool]], catalog: Catalog) -> dict[str, dict[str, bool]]:
    """The batch without the paths that lost files, are gone and held nothing indexed: a removed
    file that was not a photo, rather than a symlink to a folder of them (which needs a rescan)."""
    return {
        root: {
            folder: gains
            for folder, gains in folders.items()
            if gains or folder == root or os.path.isdir(folder) or catalog.has_files_under(to_catalog_path(folder))
        }
        for root, folders in batch.items()
    }


def _merged(*batches: dict[str, dict[str, bool]]) -> dict[str, dict[str, bool]]:
    """One batch with the folders of all; a folder gains files if it does in any."""
    merged: dict[str, dict[str, bool]] = {}
    for batch in batches:
        for root, folders in batch.items():
            into = merged.setdefault(root, {})
            for folder, gains in folders.items():
                into[folder] = into.get(folder, False) or gains
    return merged


def _nearest_existing(folder: str, root: str) -> str:
    """`folder`, or its nearest parent that still exists, stopping at its watched `root`."""
    while folder != root and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder


def _outermost(folders) -> list[str]:
    """The folders, without repeats and without those inside another (its watch covers them)."""
    kept: list[str] = []
    for folder in sorted(set(folders), key=len):
        if not any(_inside(folder, k) for k in kept):
            kept.append(folder)
    return kept


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


def _identity(folder: str) -> tuple[int, int, int | None] | None:
    """(device, inode, mount id) of a folder, None when it is not there: another value means another
    folder. The same drive unmounted and mounted again has the same device and inode; only the mount
    id (where the system gives one) tells them apart."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, _mount_id(folder)) if os.path.isdir(folder) else None


_AT_FDCWD = -100
_STATX_MNT_ID_UNIQUE = 0x4000  # Linux 6.8+: a mount id that is never reused (the older one is)
_STATX_MNT_ID_AT = 0x90  # the offset of stx_mnt_id in struct statx


@functools.cache
def _statx() -> Callable | None:
    """libc's statx(2) (Linux with glibc 2.28+ or musl 1.2.5+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    statx.restype = ctypes.c_int
    return statx


def _mount_id(path: str) -> int | None:
    """The unique id of the mount that `path` lies on; None where the system does not give it."""
    statx = _statx()
    if statx is None:
        return None
    buffer = ctypes.create_string_buffer(256)  # struct statx
    if statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_MNT_ID_UNIQUE, buffer) != 0:
        return None
    if not int.from_bytes(buffer.raw[:4], sys.byteorder) & _STATX_MNT_ID_UNIQUE:  # stx_mask
        return None
    return int.from_bytes(buffer.raw[_STATX_MNT_ID_AT : _STATX_MNT_ID_AT + 8], sys.byteorder)


def _mount_points() -> list[str]:
    """The mount points of this process's mount table (Linux); empty where there is none to read."""
    return [point for point, _ in filesystem.mounts()]


def _halt(observer: BaseObserver) -> None:
    observer.stop()
    if observer.is_alive():
        observer.join(timeout=10)


def _add(total: IndexSummary, part: IndexSummary) -> None:
    for name in ("added", "updated", "removed", "unchanged", "embedded", "reused"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.skipped.extend(part.skipped)
    total.offline.extend(part.offline)
