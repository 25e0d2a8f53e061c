"""Bringing a catalog up to date with a folder: walk, mark-and-sweep, embed only what changed.

Crash safety comes from the catalog: each embedded batch is committed as it finishes, and the
sweep that deletes vanished files runs only after a complete walk, so a killed run loses at most
the batch in flight and deletes nothing.

Not seen is not gone. A folder that cannot be walked (a failed read, a symlink into a drive that
is not mounted, a root that is missing or suddenly empty) keeps its files, marked offline with
the reason; they leave searches and come back, without embedding, when a scan sees them again.
A run that would remove more than half of a root's files keeps them offline too. Removing what
is offline is an explicit act (`prune=True`, `cnclip index DIR --prune`), and the vectors of
removed files stay (by content hash) until `Catalog.collect_garbage`, so a restored photo is
reused, not embedded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnclip import faults
from cnclip.errors import CNClipError
from cnclip.index.catalog import Catalog, FolderRecord, NewFile
from cnclip.index.video import LIVE_PHOTO_VIDEOS, VIDEO_EXTENSIONS, frame_path, is_video, split_frame_path
from cnclip.model.transform import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

if TYPE_CHECKING:  # the model's modules load torch; searching an index must not need them
    from cnclip.index.ray_embed import RayOptions
    from cnclip.model.encoder import Encoder

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20
# A run that would remove more than this share of a root's files keeps them offline instead (rsync's
# --max-delete, for the day a drive is half there): deleting most of a library is never a side effect.
MAX_REMOVE_FRACTION = 0.5
NOT_MOUNTED = "a drive not mounted?"


class ScanStopped(CNClipError):
    """Raised once `Indexer(should_stop=...)` says so: what was committed stays, and nothing is swept."""


@dataclass
class IndexSummary:
    """What one `index` run did; `to_dict()` is the `--json` output."""

    added: int = 0  # paths new to the catalog (a renamed file counts here and in `removed`)
    updated: int = 0  # known paths whose size or mtime changed
    removed: int = 0
    unchanged: int = 0
    embedded: int = 0  # images actually run through the model
    reused: int = 0  # new or changed paths whose content was already embedded (renames, copies)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # folders whose known files were kept, offline, because they could not be seen: path, reason, files
    offline: list[dict] = field(default_factory=list)
    shards: dict[str, int] | None = None  # with Ray: embedding shards computed now / read back
    video_frames: int = 0  # frames of videos run through the model (each video counts once in `embedded`)

    def to_dict(self) -> dict:
        extra = {"shards": dict(self.shards)} if self.shards is not None else {}
        if self.video_frames:
            extra["video_frames"] = self.video_frames
        return extra | {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "embedded": self.embedded,
            "reused": self.reused,
            "skipped": list(self.skipped),
            "offline": list(self.offline),
        }


@dataclass(frozen=True)
class Progress:
    """Reported after each committed batch (and each video): `done` of `total` images and videos
    needing the model."""

    done: int
    total: int


@dataclass(frozen=True)
class _Found:
    path: str
    size: int
    mtime_ns: int


@dataclass
class _Walk:
    """What a walk could not see."""

    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    moved: list[tuple[str, str]] = field(default_factory=list)  # folders now on another device: (path, reason)
    folders: list[tuple[str, int, bool]] = field(default_factory=list)  # walked: (catalog path, st_dev, mount point)
    root_empty: bool = False


def to_catalog_path(path: str) -> str:
    """A filesystem path as catalog text. Bytes that are not UTF-8 (which Python carries as lone
    surrogates U+DC80..U+DCFF) are moved to the private-use block U+F780..U+F7FF, which SQLite's
    UTF-8 text can hold; `from_catalog_path` reverses it."""
    return path.translate(_TO_PUA)


def from_catalog_path(text: str) -> str:
    return text.translate(_FROM_PUA)


_TO_PUA = {0xDC80 + i: 0xF780 + i for i in range(128)}
_FROM_PUA = {v: k for k, v in _TO_PUA.items()}


def content_hash(path: str) -> str:
    """blake2b-128 of the file's bytes: the identity of an image's content across renames."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Indexer:
    """Brings `catalog` up to date with folders, embedding with `encoder` only what is new or changed."""

    def __init__(
        self,
        encoder: Encoder,
        catalog: Catalog,
        *,
        batch_size: int = 32,
        workers: int | None = None,
        include_hidden: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft: bool = True,
        ray: RayOptions | None = None,
        on_shard: Callable[[str], None] | None = None,
        prune: bool = False,
        videos: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.encoder = encoder
        self.ray = ray
        self.on_shard = on_shard
        self.catalog = catalog
        self.batch_size = batch_size
        self.workers = workers
        self.include_hidden = include_hidden
        self.max_pixels = max_pixels
        self.draft = draft
        self.prune = prune  # remove what cannot be seen, instead of keeping it offline
        self.videos = videos  # index videos' frames too (cnclip.index.video)
        self.should_stop = should_stop  # asked between folders walked and files hashed (a watcher's stop)

    def run(
        self,
        folder: str | os.PathLike,
        progress: Callable[[Progress], None] | None = None,
        *,
        within: str | os.PathLike | None = None,
    ) -> IndexSummary:
        """Bring the catalog up to date with `folder`. `within`: the indexed folder that `folder` lies
        in, when only `folder` is rescanned (a watcher's batch): the removal guard then weighs what
        is gone against all of `within`, an emptied `folder` is just emptied, and `folder` is not
        recorded as an indexed folder of its own."""
        root = os.path.abspath(Path(folder).expanduser())
        outer = None if within is None else os.path.abspath(Path(within).expanduser())
        summary = IndexSummary()
        scan = self.catalog.begin_scan()
        try:
            is_folder, unreachable = stat.S_ISDIR(os.stat(root).st_mode), None
        except (FileNotFoundError, NotADirectoryError):
            is_folder, unreachable = False, f"folder not found ({NOT_MOUNTED})"
        except OSError as e:  # a network mount that dropped, a failing disk: there, but not reachable
            is_folder, unreachable = False, f"{_reason(e)} ({NOT_MOUNTED})"
        if not is_folder:
            if not self.catalog.missing_under(scan, to_catalog_path(root))[1]:
                if unreachable and not unreachable.startswith("folder not found"):
                    raise CNClipError(f"cannot read {folder}: {unreachable.split(' (')[0]}; check the drive or mount")
                raise CNClipError(f"{folder} is not a folder; give the folder of images to index")
            self._keep_offline(scan, root, unreachable or "not a folder any more", summary)
            summary.removed = len(self.catalog.finish_scan(scan, to_catalog_path(root)))
            return summary
        walk = _Walk()
        todo, unchanged = [], []
        for found in self._walk(root, summary, walk):
            record = self.catalog.lookup(to_catalog_path(found.path))
            if record is not None and record.size == found.size and record.mtime_ns == found.mtime_ns:
                unchanged.append(to_catalog_path(found.path))
                if is_video(found.path):  # its frames were seen too
                    unchanged.extend(self.catalog.frame_paths(to_catalog_path(found.path)))
                if len(unchanged) >= 4096:
                    self.catalog.touch(scan, unchanged)
                    unchanged.clear()
                summary.unchanged += 1
            else:
                todo.append((found, record is not None))
        self.catalog.touch(scan, unchanged)
        to_embed = self._reuse_known(scan, todo, summary)
        self._embed(scan, to_embed, summary, progress)
        self._guard(scan, root, walk, summary, outer)
        faults.point("scan.before_sweep")
        removed = self.catalog.finish_scan(scan, to_catalog_path(root))
        self.catalog.record_folders(scan, to_catalog_path(root), walk.folders)
        if outer is None or outer == root:
            self.catalog.record_root(to_catalog_path(root))
        summary.removed = sum(split_frame_path(p)[1] is None for p in removed)  # a video counts once
        self._fill_info(root)
        return summary

    def _fill_info(self, root: str) -> None:
        """Read what search filters need (date taken, camera, size) for the files under `root` that
        lack it: new and changed files, and all files of an index made before filters existed.
        Headers only, in threads; no file is embedded again."""
        from concurrent.futures import ThreadPoolExecutor

        from cnclip.index.metadata import read_info

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="cnclip-info") as pool:
            while todo := self.catalog.files_without_info(to_catalog_path(root)):
                # a video's frames share its facts: read each file once
                files = {split_frame_path(from_catalog_path(path))[0]: mtime for _, path, mtime in todo}
                facts = dict(zip(files, pool.map(read_info, files, files.values()), strict=True))
                self.catalog.set_info(
                    [(file_id, facts[split_frame_path(from_catalog_path(path))[0]]) for file_id, path, _ in todo]
                )

    def _guard(self, scan: int, root: str, walk: _Walk, summary: IndexSummary, outer: str | None = None) -> None:
        """Keep offline what this scan could not see, unless pruning: unreadable folders, an empty
        root, or more than MAX_REMOVE_FRACTION of the root (of `outer`, when given) at once."""
        for path, reason in walk.unreachable:
            self._keep_offline(scan, path, reason, summary)
        for path, reason in walk.moved:
            if self.catalog.missing_under(scan, to_catalog_path(path))[0]:
                self._keep_offline(scan, path, reason, summary)
                if not self.prune:  # keep the old device on record until the old disk is back or pruned
                    kept = to_catalog_path(path)
                    walk.folders = [f for f in walk.folders if not _is_at_or_under(f[0], kept)]
        if self.prune:
            return  # what is gone from the root is meant to go
        missing, total = self.catalog.missing_under(scan, to_catalog_path(root))
        if outer is not None and outer != root:
            total = self.catalog.files_under(to_catalog_path(outer))
            walk.root_empty = False  # a subfolder emptied by its owner, not a drive gone
        if walk.root_empty and missing:
            self._keep_offline(scan, root, f"folder is empty ({NOT_MOUNTED})", summary)
        elif missing > total * MAX_REMOVE_FRACTION:
            reason = f"{missing} of {total} files gone at once; run with --prune to remove them"
            self._keep_offline(scan, root, reason, summary)

    def _keep_offline(self, scan: int, path: str, reason: str, summary: IndexSummary) -> None:
        if self.prune:
            self._skip(summary, path, reason)
            return  # the sweep removes what it held
        files = self.catalog.mark_offline(scan, to_catalog_path(path), reason)
        if files:
            log.info("offline: %s (%s): %d files kept", path, reason, files)
            summary.offline.append({"path": path, "reason": reason, "files": files})
        else:  # nothing indexed there yet: an ordinary skip
            self._skip(summary, path, reason)

    # -- walking --------------------------------------------------------------------------------

    def _walk(self, root: str, summary: IndexSummary, walk: _Walk) -> Iterator[_Found]:
        """Image files under root, following symlinks once (loops and repeats are cut by inode).

        Whatever cannot be reached goes to `walk.unreachable`, whatever the error: a folder that
        cannot be read, a symlink whose target is missing or fails (a dropped network mount answers
        EIO, ENOTCONN, ESTALE or EACCES), a file that cannot be stat'ed. Each folder's device is
        compared with the last scan's: a mount point found empty is unreachable, and a folder now
        on another device goes to `walk.moved`, so that what it no longer shows is kept offline."""
        known = self.catalog.folders_under(to_catalog_path(root))
        seen_dirs: set[tuple[int, int]] = set()
        # (folder, its parent's device (None: unknown), whether a folder above it changed device)
        stack: list[tuple[str, int | None, bool]] = [(root, _parent_device(root), False)]
        while stack:
            self._stop_if_asked()
            folder, parent_dev, above_moved = stack.pop()
            try:
                st = os.stat(folder)
                key = (st.st_dev, st.st_ino)
                if key in seen_dirs:
                    continue  # a symlink loop, or a second link to a folder already walked
                seen_dirs.add(key)
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                walk.unreachable.append((folder, _reason(e)))
                continue
            mount = parent_dev is not None and st.st_dev != parent_dev
            moved = above_moved or self._check_device(
                folder, st.st_dev, bool(entries), known.get(to_catalog_path(folder)), walk
            )
            if moved is None:
                continue  # an empty mount point: unreachable
            walk.folders.append((to_catalog_path(folder), st.st_dev, mount))
            if folder == root and not entries:
                walk.root_empty = True
            subdirs = []
            stills = {os.path.splitext(e.name)[0].lower() for e in entries if _extension(e.name) in IMAGE_EXTENSIONS}
            for entry in entries:
                if entry.name.startswith(".") and not self.include_hidden:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=True):
                        subdirs.append((entry.path, st.st_dev, moved))
                        continue
                    if entry.is_symlink() and not os.path.exists(entry.path):
                        # maybe a folder on a drive that is not mounted: what it held is not gone
                        walk.unreachable.append((entry.path, f"symlink target missing ({NOT_MOUNTED})"))
                        continue
                    ext = _extension(entry.name)
                    if ext not in IMAGE_EXTENSIONS and (ext not in VIDEO_EXTENSIONS or not self.videos):
                        continue
                    if ext in LIVE_PHOTO_VIDEOS and os.path.splitext(entry.name)[0].lower() in stills:
                        continue  # the moving half of a Live Photo: its still is indexed
                    entry_st = entry.stat(follow_symlinks=True)
                except FileNotFoundError:
                    continue  # deleted while we looked: gone, and the sweep says so
                except OSError as e:
                    # not "not found": something is there that cannot be reached right now (a mount
                    # behind a symlink that dropped, a loop, a failing disk): what it held is kept
                    walk.unreachable.append((entry.path, _reason(e)))
                    continue
                if stat.S_ISREG(entry_st.st_mode):
                    yield _Found(entry.path, entry_st.st_size, _storable_mtime(entry.path, entry_st.st_mtime_ns))
            stack.extend(reversed(subdirs))

    def _check_device(
        self, folder: str, dev: int, has_entries: bool, before: FolderRecord | None, walk: _Walk
    ) -> bool | None:
        """Compare a folder with its record: None when it was a mount point and is now empty
        (unreachable), True when it is now on another device (moved), else False."""
        if before is None:
            return False
        if before.mount and not has_entries and self.catalog.has_files_under(to_catalog_path(folder)):
            walk.unreachable.append((folder, f"mount point is empty ({NOT_MOUNTED})"))
            return None
        if before.dev != dev:
            walk.moved.append((folder, f"now on another device than when indexed ({NOT_MOUNTED} another disk?)"))
            return True
        return False

    def _stop_if_asked(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise ScanStopped("the scan was stopped; the next run picks up the rest")

    @staticmethod
    def _skip(summary: IndexSummary, path: str, reason: str) -> None:
        log.info("skipped %s: %s", path, reason)  # the CLI prints the summary's list
        summary.skipped.append({"path": path, "reason": reason})

    # -- reuse and embedding -----------------------------------------------------------------------

    def _reuse_known(self, scan: int, todo: list[tuple[_Found, bool]], summary: IndexSummary) -> list:
        """Hash new/changed files; commit those whose content is already embedded; return the rest."""
        to_embed, reuse, first_of_hash = [], [], {}
        for found, known in todo:
            if self.should_stop is not None and self.should_stop():
                self.catalog.put_files(scan, reuse)  # what was hashed is kept: no file is hashed twice
                self._stop_if_asked()
            if found.size == 0:
                self._skip(summary, found.path, "empty file (0 bytes)")
                continue
            try:
                digest = content_hash(found.path)
            except OSError as e:
                self._skip(summary, found.path, _reason(e))
                continue
            if is_video(found.path):
                frames = self.catalog.frame_vectors(digest)
                if frames:  # a renamed or copied video: its frames are in the index already
                    reuse.extend(_video_rows(found, digest, [(t, None) for t in frames], frames, None))
                    self._count(summary, known)
                    summary.reused += 1
                elif digest in first_of_hash:
                    first_of_hash[digest][1].append((found, known))
                else:
                    first_of_hash[digest] = (found, [])
                    to_embed.append((found, known, digest))
                continue
            vector_id = self.catalog.vector_id_for_hash(digest)
            if vector_id is not None:
                reuse.append(
                    NewFile(to_catalog_path(found.path), found.size, found.mtime_ns, digest, vector_id=vector_id)
                )
                self._count(summary, known)
                summary.reused += 1
            elif digest in first_of_hash:  # a copy of a file embedded in this same run
                first_of_hash[digest][1].append((found, known))
            else:
                first_of_hash[digest] = (found, [])
                to_embed.append((found, known, digest))
            if len(reuse) >= 1024:
                self.catalog.put_files(scan, reuse)
                reuse.clear()
        self.catalog.put_files(scan, reuse)
        return [(f, known, digest, first_of_hash[digest][1]) for f, known, digest in to_embed]

    def _embed(self, scan: int, items: list, summary: IndexSummary, progress) -> None:
        videos = [item for item in items if is_video(item[0].path)]
        items = [item for item in items if not is_video(item[0].path)]
        total = len(videos) + len(items)  # a video counts once, reported when its rows are committed
        for done, video in enumerate(videos, 1):
            self._embed_video(scan, video, summary)
            if progress is not None:
                progress(Progress(done, total))
        if not items:
            return
        by_path = {found.path: (found, known, digest, copies) for found, known, digest, copies in items}
        paths = [found.path for found, *_ in items]
        done = len(videos)
        if self.ray is not None:
            from cnclip.index.ray_embed import ShardReport, embed_with_ray

            report = ShardReport()
            batches = embed_with_ray(
                self.encoder,
                [(found.path, digest) for found, _, digest, _ in items],
                self.ray,
                Path(self.ray.shard_dir) if self.ray.shard_dir else self.catalog.folder / "shards",
                max_pixels=self.max_pixels,
                draft=self.draft,
                report=report,
                on_shard=self.on_shard,
            )
        else:
            from cnclip.model.embed import embed_files

            batches = embed_files(
                self.encoder,
                paths,
                batch_size=self.batch_size,
                workers=self.workers,
                max_pixels=self.max_pixels,
                draft=self.draft,
            )
        # Ray's actors choose their own runtime: their precision is not known here
        precision = None if self.ray is not None else self.encoder.image_precision
        for batch in batches:
            rows = []
            for path, vector in zip(batch.paths, batch.vectors, strict=True):
                found, known, digest, copies = by_path[path]
                for f in (found, *(copy for copy, _ in copies)):  # same bytes: same vector, one forward pass
                    rows.append(
                        NewFile(to_catalog_path(f.path), f.size, f.mtime_ns, digest, vector=vector, precision=precision)
                    )
                self._count(summary, known)
                summary.embedded += 1
                for _, copy_known in copies:
                    self._count(summary, copy_known)
                    summary.reused += 1
            self.catalog.put_files(scan, rows)
            for path, reason in batch.failed:
                self._skip(summary, path, _strip_path(reason, path))
                for copy, _ in by_path[path][3]:
                    self._skip(summary, copy.path, _strip_path(reason, path))
            done += len(batch.paths) + len(batch.failed)
            if progress is not None:
                progress(Progress(done, total))
        if self.ray is not None:
            summary.shards = {"computed": report.computed, "reused": report.reused}
            # files of shards an earlier run wrote were not run through the model this time
            summary.embedded -= report.reused_files
            summary.reused += report.reused_files

    def _embed_video(self, scan: int, item: tuple, summary: IndexSummary) -> None:
        """Sample one video's frames, embed them a batch at a time, and commit the video's rows together."""
        from cnclip.index.video import VideoError, sample_frames

        found, known, digest, copies = item
        times: list[float] = []
        vectors: list[np.ndarray] = []
        batch: list = []
        try:
            for t, image in sample_frames(found.path):
                batch.append((t, image))
                if len(batch) == self.batch_size:
                    times += [t for t, _ in batch]
                    vectors.append(self.encoder.embed_images([im for _, im in batch]))
                    batch.clear()
            if batch:
                times += [t for t, _ in batch]
                vectors.append(self.encoder.embed_images([im for _, im in batch]))
        except VideoError as e:
            for f in (found, *(copy for copy, _ in copies)):
                self._skip(summary, f.path, str(e))
            return
        if not times:
            for f in (found, *(copy for copy, _ in copies)):
                self._skip(summary, f.path, "no frame could be decoded")
            return
        matrix = np.concatenate(vectors)
        frames = list(zip(times, matrix, strict=True))
        rows = []
        for f, f_known in ((found, known), *copies):
            rows += _video_rows(f, digest, frames, None, self.encoder.image_precision)
            self._count(summary, f_known)
        self.catalog.put_files(scan, rows)
        summary.embedded += 1
        summary.reused += len(copies)
        summary.video_frames += len(times)

    @staticmethod
    def _count(summary: IndexSummary, known: bool) -> None:
        if known:
            summary.updated += 1
        else:
            summary.added += 1


# SQLite integers are signed 64-bit: nanoseconds since 1970 reach only 1677..2262
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1


def _storable_mtime(path: str, mtime_ns: int) -> int:
    """`mtime_ns` clamped to what the catalog can store (a tar archive or a camera with a bad clock
    can set years like 1601 or 2500); the same file clamps to the same value, so it stays unchanged."""
    if _NS_MIN <= mtime_ns <= _NS_MAX:
        return mtime_ns
    log.warning(
        "%s: modification time out of range (%d s since 1970); stored as the nearest it can hold",
        path,
        mtime_ns // 10**9,
    )
    return min(max(mtime_ns, _NS_MIN), _NS_MAX)


def _is_at_or_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _parent_device(folder: str) -> int | None:
    """The device of the folder that holds `folder` (None if it cannot be read): a folder on
    another device than its parent is a mount point."""
    try:
        return os.stat(os.path.dirname(folder.rstrip(os.sep)) or os.sep).st_dev
    except OSError:
        return None


def _reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == 40:  # ELOOP
        return "symlink loop"
    return e.strerror or str(e)


def _strip_path(reason: str, path: str) -> str:
    """ImageError messages start with the file name; the summary already has the path."""
    for prefix in (f"{path}: ", f"{os.path.basename(path)}: "):
        if reason.startswith(prefix):
            return reason[len(prefix) :]
    return reason


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _video_rows(
    found: _Found,
    digest: str,
    frames: list[tuple[float, np.ndarray | None]],
    known_ids: dict[float, int] | None,
    precision: str | None,
) -> list[NewFile]:
    """The catalog rows of one video: its own (no vector: read, nothing to search) and one per
    frame, `VIDEO#t=SECONDS`, with a new vector or, from `known_ids`, a stored one."""
    path = to_catalog_path(found.path)
    rows = [NewFile(path, found.size, found.mtime_ns, digest)]
    for t, vector in frames:
        frame_hash = frame_path(digest, t)
        if known_ids is not None:
            rows.append(NewFile(frame_path(path, t), found.size, found.mtime_ns, frame_hash, vector_id=known_ids[t]))
        else:
            rows.append(
                NewFile(frame_path(path, t), found.size, found.mtime_ns, frame_hash, vector=vector, precision=precision)
            )
    return rows
