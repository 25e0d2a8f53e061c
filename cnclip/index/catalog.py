"""The SQLite catalog: the source of truth of a cnclip index.

An index is a folder; its catalog is `<folder>/catalog.sqlite3`. The catalog records which model
built the index, every indexed file (path, size, mtime, content hash) and one embedding per distinct
content hash, plus text collections for image -> text search. Anything else in the folder (the FAISS
index in particular) is derived from the catalog and can be rebuilt from it; `Catalog.generation()`
tells such caches when they are stale.

Scans are mark-and-sweep: `begin_scan` hands out a scan id, the scanner records every file it sees
(`touch` for unchanged files, `put_files` for new or changed ones), and only `finish_scan` deletes
the files under the scanned root that the scan did not see. A scan that is killed half-way therefore
deletes nothing, and every committed `put_files` batch survives it.

Concurrency: the catalog runs in WAL mode, so one process can `search` (read) while another `index`es
(writes); writers queue behind each other for up to `BUSY_TIMEOUT_S`. A `Catalog` wraps one SQLite
connection and must stay in the thread that opened it: open one per thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from cnclip import faults
from cnclip.errors import CNClipError, IndexNotFoundError, ModelMismatchError
from cnclip.index.filesystem import network_mode
from cnclip.index.metadata import INFO_VERSION, PhotoInfo

__all__ = [
    "BUSY_TIMEOUT_S",
    "CATALOG_FILE",
    "SCHEMA_VERSION",
    "Catalog",
    "FileRecord",
    "FolderRecord",
    "ModelIdentity",
    "NewFile",
]

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
# Long enough to ride out another process committing a big batch, short enough that a stuck
# writer surfaces as an error instead of a hang.
BUSY_TIMEOUT_S = 30.0

# Vectors are stored as raw little-endian float32 so the file reads the same on any machine.
_VEC_DTYPE = np.dtype("<f4")
_PAGE_SIZE = 32768
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Journal rows kept (see `changes_since`); a reader further behind diffs every id instead.
_JOURNAL_KEEP = 1_000_000
# Stay well under SQLite's bound-parameter limit (999 before 3.32) when building IN (...) lists.
_IN_CHUNK = 500

# Keys the catalog itself keeps in `meta`; set_meta refuses them so a cache cannot corrupt them.
_META_MODEL = "model"
_META_GENERATION = "generation"
_META_SCAN = "last_scan"
_META_JOURNAL_PRUNED = "journal_pruned"  # the change journal holds no entry at or below this position
_META_ID = "catalog_id"  # random, made with the catalog: what derived files record to know their catalog
_RESERVED_META = frozenset({_META_MODEL, _META_GENERATION, _META_SCAN, _META_JOURNAL_PRUNED, _META_ID})
# One key per scanned folder, "root:" + its catalog path -> unix time its last scan finished;
# `cnclip serve` serves files only from inside these folders.
_META_ROOT = "root:"


# --------------------------------------------------------------------------- schema & migrations


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Create the schema."""
    # AUTOINCREMENT so ids are never reused: a stale FAISS cache can then at worst miss a file,
    # never map an old id to a different file.
    statements = [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE vectors (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            hash TEXT NOT NULL UNIQUE,
            vector BLOB NOT NULL
        )""",
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            hash TEXT NOT NULL,
            vector_id INTEGER REFERENCES vectors(id),
            seen_scan INTEGER NOT NULL
        )""",
        # Needed by the orphan sweep and by the foreign-key check on every vector delete;
        # without it each deleted vector would scan the whole files table.
        "CREATE INDEX files_vector_id ON files(vector_id)",
        """CREATE TABLE texts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            collection TEXT NOT NULL,
            text TEXT NOT NULL,
            vector BLOB NOT NULL,
            UNIQUE (collection, text)
        )""",
        f"INSERT INTO meta (key, value) VALUES ('{_META_GENERATION}', '0'), ('{_META_SCAN}', '0')",
    ]
    for sql in statements:
        conn.execute(sql)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Offline files and kept vectors: not seen is not gone, and nothing computed is computed twice."""
    # A file whose folder could not be read keeps its row, marked offline with the reason and
    # since when; it is left out of searches until a scan sees it again.
    conn.execute("ALTER TABLE files ADD COLUMN offline TEXT")
    conn.execute("ALTER TABLE files ADD COLUMN offline_since REAL")
    # A vector no file uses any more is kept (a restored or re-added photo reuses it) until
    # `collect_garbage` ages it out; this is when it lost its last file.
    conn.execute("ALTER TABLE vectors ADD COLUMN unused_since REAL")
    # A journal of files entering (+1) and leaving (-1) the searchable set, so that a process
    # holding a vector index applies a commit at a cost that grows with the change, not with the
    # index (a diff of every id at 10^6 files costs a reader hundreds of ms per commit).
    conn.execute(
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, file_id INTEGER NOT NULL, op INTEGER NOT NULL)"
    )
    searchable = "{0}.vector_id IS NOT NULL AND {0}.offline IS NULL"
    for sql in (
        f"CREATE TRIGGER files_in AFTER INSERT ON files WHEN {searchable.format('new')} "
        "BEGIN INSERT INTO changes (file_id, op) VALUES (new.id, 1); END",
        f"CREATE TRIGGER files_out AFTER DELETE ON files WHEN {searchable.format('old')} "
        "BEGIN INSERT INTO changes (file_id, op) VALUES (old.id, -1); END",
        "CREATE TRIGGER files_offline AFTER UPDATE OF offline ON files "
        "WHEN new.vector_id IS NOT NULL AND (old.offline IS NULL) != (new.offline IS NULL) "
        "BEGIN INSERT INTO changes (file_id, op) "
        "VALUES (new.id, CASE WHEN new.offline IS NULL THEN 1 ELSE -1 END); END",
    ):
        conn.execute(sql)


# Migration i takes the catalog from schema version i to i + 1. To change the schema, append one
# function; it runs inside the same write transaction as the version bump, so it is all-or-nothing.
def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """The precision each vector was computed in ("fp32", "bf16", "fp16"; NULL: not recorded)."""
    # The weights digest stays the model's identity (bf16 and fp32 vectors rank alike, checked
    # by cnclip.model.calibrate); this says which is which, should one ever need re-embedding.
    conn.execute("ALTER TABLE vectors ADD COLUMN precision TEXT")


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    """What search filters read (cnclip.index.metadata): when taken, camera, pixel size, kind."""
    for column in ("taken TEXT", "taken_from TEXT", "camera TEXT", "width INTEGER", "height INTEGER", "kind TEXT"):
        conn.execute(f"ALTER TABLE files ADD COLUMN {column}")
    # NULL: not read yet (files indexed before filters existed, or changed since): the next scan reads it
    conn.execute("ALTER TABLE files ADD COLUMN info_version INTEGER")
    conn.execute("CREATE INDEX files_taken ON files (taken)")


def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    """The catalog's identity, and the device of every scanned folder.

    The identity is a random id made once: every derived file records it, so a vector file is
    never used with a catalog it was not built from (one moved away, or restored from a backup).
    A folder's device (st_dev) and whether it was a mount point tell an unmounted drive (an empty
    mount point) or another disk mounted in its place from photos that were deleted."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (_META_ID, uuid.uuid4().hex)
    )
    conn.execute(
        "CREATE TABLE folders (path TEXT PRIMARY KEY, dev INTEGER NOT NULL, mount INTEGER NOT NULL, "
        "seen_scan INTEGER NOT NULL) WITHOUT ROWID"
    )


def _migrate_5_to_6(conn: sqlite3.Connection) -> None:
    """The words read in photos (cnclip.index.reading), and their full-text index.

    Words belong to a content hash, as vectors do, so they hang off the vector: a copy, a renamed
    or restored photo has them at once, and they go when `collect_garbage` drops the vector.
    `lines` is JSON (text, confidence, box per line; [] when the photo has no words); `error` says
    why a photo could not be read. The full-text rows (rowid = vector id) hold the tokens of
    `cnclip.index.words.tokens`, only for photos with words."""
    conn.execute(
        "CREATE TABLE words (vector_id INTEGER PRIMARY KEY, reader TEXT NOT NULL, lines TEXT NOT NULL, "
        "error TEXT, read_at REAL NOT NULL)"
    )
    try:
        conn.execute("CREATE VIRTUAL TABLE words_fts USING fts5(tokens, tokenize='unicode61 remove_diacritics 2')")
    except sqlite3.OperationalError as e:
        if "fts5" in str(e):
            raise CNClipError(
                f"this Python's SQLite {sqlite3.sqlite_version} has no FTS5, which words in photos need; "
                "use a Python from python.org, Debian/Ubuntu or conda"
            ) from e
        raise


_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migrate_0_to_1,
    _migrate_1_to_2,
    _migrate_2_to_3,
    _migrate_3_to_4,
    _migrate_4_to_5,
    _migrate_5_to_6,
]
SCHEMA_VERSION: int = len(_MIGRATIONS)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ModelIdentity:
    """Which model embedded an index's vectors; vectors of two different models never mix."""

    name: str | None  # zoo name such as "ViT-B-16", or None for an unnamed checkpoint
    source: str  # what load_model was given, so search can load the same model again
    digest: str  # hex digest of the weights
    dim: int  # embedding size
    image_size: int
    preprocessing: str  # e.g. "squash-bicubic-clip-meanstd"

    def to_json(self) -> str:
        """Serialize to a JSON object string."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> ModelIdentity:
        """Parse `to_json` output; unknown keys are ignored, missing or mistyped ones raise CNClipError."""
        try:
            data = json.loads(s)
            ident = cls(
                name=data.get("name"),
                source=data["source"],
                digest=data["digest"],
                dim=data["dim"],
                image_size=data["image_size"],
                preprocessing=data["preprocessing"],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CNClipError(f"unreadable model record in index catalog ({e!r}); rebuild the index") from e
        ok = (
            (ident.name is None or isinstance(ident.name, str))
            and all(isinstance(v, str) for v in (ident.source, ident.digest, ident.preprocessing))
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (ident.dim, ident.image_size))
        )
        if not ok:
            raise CNClipError(f"malformed model record in index catalog: {s[:200]}; rebuild the index")
        return ident

    def same_model(self, other: ModelIdentity) -> bool:
        """True when both produce interchangeable vectors (a renamed or converted copy is the same model)."""
        return (self.digest, self.dim, self.image_size, self.preprocessing) == (
            other.digest,
            other.dim,
            other.image_size,
            other.preprocessing,
        )

    def label(self) -> str:
        """Short human name: zoo name plus digest prefix (names alone can collide across fine-tunes)."""
        short = self.digest[:12]
        return f"{self.name} ({short})" if self.name else short


@dataclass(frozen=True)
class FileRecord:
    """One indexed file as the catalog knows it."""

    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str


@dataclass(frozen=True)
class FolderRecord:
    """A scanned folder as its last complete scan saw it: its device and whether it was a mount point."""

    dev: int
    mount: bool


# eq=False: a generated __eq__ would compare numpy arrays element-wise and fail on truth-testing.
@dataclass(frozen=True, eq=False)
class NewFile:
    """A new or changed file for `Catalog.put_files`.

    Give `vector` when it was just embedded, or `vector_id` (from `vector_id_for_hash`) when its
    content is already in the index. Give neither for a file that could not be embedded: it is
    recorded, so later scans skip it until it changes, but it is not searchable.
    """

    path: str
    size: int
    mtime_ns: int
    hash: str
    vector: np.ndarray | None = None  # float32 (dim,)
    vector_id: int | None = None
    precision: str | None = None  # the image tower's precision that computed `vector`


# --------------------------------------------------------------------------- helpers


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _prefix_range(root: str) -> tuple[str, str]:
    """[lo, hi) such that lo <= path < hi exactly when path starts with `root` + separator.

    A range on the UNIQUE path index instead of LIKE: LIKE treats `%` and `_` in paths as
    wildcards and is case-insensitive for ASCII. Python's code-point order equals SQLite's
    BINARY collation (memcmp of UTF-8), so the bounds mean the same on both sides.
    """
    seps = os.sep + (os.altsep or "")
    # "/a/photos/" and "/a/photos" name the same folder; "/" strips to "" and yields just "/".
    lo = os.fspath(root).rstrip(seps) + os.sep
    hi = lo[:-1] + chr(ord(lo[-1]) + 1)
    return lo, hi


def _absolute(root: str) -> str:
    if not os.path.isabs(root):
        # A relative or empty root would turn a sweep into "everything not seen", or worse.
        raise ValueError(f"a scanned folder must be an absolute path, got {root!r}")
    return root


def _decode_matrix(blobs: Sequence[bytes], dim: int, what: str) -> np.ndarray:
    """Stack float32 blobs into an (n, dim) array with one copy."""
    nbytes = dim * _VEC_DTYPE.itemsize
    for b in blobs:
        if len(b) != nbytes:
            raise CNClipError(
                f"{what} holds a vector of {len(b) // _VEC_DTYPE.itemsize} floats but the index's model makes {dim}; "
                "the catalog is inconsistent, rebuild the index"
            )
    # bytearray.join gives a writable buffer, so the array is writable without a second copy.
    buf = bytearray().join(blobs)
    return np.frombuffer(buf, dtype=_VEC_DTYPE).reshape(len(blobs), dim).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- the catalog


class Catalog:
    """An open index catalog. Create with `Catalog.open`; use as a context manager or call `close`.

    One instance per thread (the SQLite connection refuses other threads). Several processes may
    open the same catalog: readers never block, writers wait for each other.
    """

    def __init__(self, folder: Path, conn: sqlite3.Connection) -> None:
        """Wrap an already configured connection; use `Catalog.open` instead."""
        self.folder = folder
        self.path = folder / CATALOG_FILE
        self._conn = conn

    # ---------------------------------------------------------------- opening & closing

    @classmethod
    def open(cls, folder: str | Path, create: bool = False) -> Catalog:
        """Open the index at `folder`; with `create`, make the folder and an empty catalog if missing.

        A folder on a network file system is refused unless $CNCLIP_NETWORK_INDEX=1 (cnclip.index.filesystem)."""
        folder = Path(folder)
        path = folder / CATALOG_FILE
        network = network_mode(folder)
        if not path.is_file():
            if not create:
                raise IndexNotFoundError(
                    f"no cnclip index at {folder}; build one with `cnclip index DIR --index {folder}`"
                )
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CNClipError(
                    f"cannot create index folder {folder}: {e.strerror or e}; choose another --index"
                ) from e
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so every write is explicit and
            # reads outside a transaction never hold a snapshot open.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise CNClipError(f"cannot open index catalog {path}: {e}; check the path and its permissions") from e
        try:
            cls._configure(conn, network)
            cls._migrate(conn, path)
        except sqlite3.OperationalError as e:
            conn.close()
            raise CNClipError(f"cannot open index catalog {path}: {e}; check the path and its permissions") from e
        except sqlite3.DatabaseError as e:  # SQLITE_NOTADB / SQLITE_CORRUPT
            conn.close()
            raise CNClipError(f"{path} is not a usable cnclip catalog ({e}); move it away and rebuild the index") from e
        except BaseException:
            conn.close()
            raise
        log.debug("opened catalog %s (schema %d)", path, SCHEMA_VERSION)
        return cls(folder, conn)

    @staticmethod
    def _configure(conn: sqlite3.Connection, network: bool = False) -> None:
        # Reading user_version first makes a non-database file fail here with SQLITE_NOTADB.
        conn.execute("PRAGMA user_version").fetchone()
        # Only takes effect on a new, empty file (and must come before WAL fixes it). A 2-4 KiB
        # vector row fits once in a default 4 KiB page, wasting half the file for 512-d models;
        # 32 KiB pages hold 7-15 rows and keep the overhead near 10 % for 512- to 1024-d vectors.
        conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        if network:
            # WAL's shared-memory index cannot be shared between hosts; a rollback journal relies on
            # the file system's byte-range locks instead (readers then wait while a batch commits).
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise CNClipError(
                    f"index catalog {conn.execute('PRAGMA database_list').fetchone()[2]} stays in {mode} mode, "
                    "which is unsafe on a network drive; stop the other cnclip processes using it and run again"
                )
            # Without WAL, NORMAL could corrupt the file on power loss; FULL syncs at every commit.
            conn.execute("PRAGMA synchronous=FULL")
        else:
            # WAL lets readers run during a write; it is persistent, so this only switches once.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("catalog journal mode is %s, not wal; concurrent search during indexing may block", mode)
            # NORMAL in WAL mode can lose the last commits on power loss but never corrupts the file;
            # a lost batch is simply re-embedded by the next scan.
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        # A big sweep grows the WAL to hundreds of MB; without a limit it keeps that size on disk forever.
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")

    @staticmethod
    def _migrate(conn: sqlite3.Connection, path: Path) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise CNClipError(
                f"index catalog {path} has schema version {version} but this cnclip reads up to {SCHEMA_VERSION}; "
                "upgrade cnclip (pip install -U cnclip)"
            )
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated in the meantime.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                foreign = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if foreign:
                    raise CNClipError(
                        f"{path} is an SQLite database but not a cnclip catalog; move it away or choose another --index"
                    )
            for step in range(version, SCHEMA_VERSION):
                log.info("migrating catalog %s from schema %d to %d", path, step, step + 1)
                _MIGRATIONS[step](conn)
            # PRAGMA takes no bound parameters; the value is our own int.
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<Catalog {str(self.path)!r} {state}>"

    @property
    def schema_version(self) -> int:
        """The catalog's schema version (SQLite `user_version`)."""
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CNClipError(f"index catalog {self.path} is closed; open it again with Catalog.open")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so a busy catalog waits
        in BEGIN (honouring busy_timeout) instead of failing half-way through."""
        conn = self._db
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise CNClipError(
                    f"index catalog {self.path} is busy: another process is writing to it; wait for it, then run again"
                ) from e
            raise CNClipError(f"cannot write index catalog {self.path}: {e}; check permissions and free space") from e
        try:
            yield conn
            faults.point("catalog.before_commit")
            conn.execute("COMMIT")
        except BaseException as e:
            # SQLite rolls back by itself after some errors (disk full, I/O); a second ROLLBACK would fail.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise CNClipError(
                    f"cannot write index catalog {self.path}: {e}; check free disk space, then run again"
                ) from e
            raise
        faults.point("catalog.after_commit")

    @contextmanager
    def snapshot(self) -> Iterator[Catalog]:
        """A read-only view of the catalog frozen as of its first read, on its own connection.

        For reads that must agree with each other while another process commits: a rebuild reads
        the generation, the count and then every row (the on-disk build even reads them twice).
        """
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            # The snapshot is taken at the first read and held until COMMIT; with a rollback journal
            # (a network index) it also holds off other processes' commits until then.
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            raise CNClipError(f"cannot read index catalog {self.path}: {e}; check the path and its permissions") from e
        view = Catalog(self.folder, conn)
        try:
            view.generation()
            yield view
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")
            conn.close()

    # ---------------------------------------------------------------- metadata

    def get_meta(self, key: str) -> str | None:
        """The value stored under `key`, or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        """Store `value` under `key` (for derived caches; the catalog's own keys are refused)."""
        if key in _RESERVED_META or key.startswith(_META_ROOT):
            raise ValueError(f"meta key {key!r} is reserved by the catalog; pick another key")
        if not isinstance(value, str):
            raise TypeError(f"meta values are str, got {type(value).__name__}")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def _meta_int(self, key: str) -> int:
        value = self.get_meta(key)
        return int(value) if value is not None else 0

    def _bump(self, conn: sqlite3.Connection, key: str) -> int:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = ?", (key,))
        return int(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def generation(self) -> int:
        """A counter that grows with every committed change to the set of (file id, vector) pairs
        or texts. A derived cache records it when built and is stale once it differs. Read it
        *before* reading vectors: a write in between then makes the cache look stale, never fresh."""
        return self._meta_int(_META_GENERATION)

    def change_token(self) -> tuple[int, int]:
        """A value that differs after any committed write to the catalog, by this connection or
        another process (SQLite's data_version and this connection's change count): what a cache
        of query answers (e.g. the files a search filter selects) is keyed by."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0]), int(self._db.total_changes)

    def catalog_id(self) -> str:
        """This catalog's identity: a random id made with it, kept for life (and by its backups)."""
        value = self.get_meta(_META_ID)
        if value is None:  # only a catalog opened read-only before its migration could lack it
            raise CNClipError(
                f"index catalog {self.path} has no identity; open it once with cnclip index to upgrade it"
            )
        return value

    def record_root(self, root: str) -> None:
        """Remember that the folder `root` (absolute, catalog form) was just scanned completely."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (_META_ROOT + root, f"{time.time():.3f}"),
            )

    def roots(self) -> dict[str, float]:
        """The folders scanned into this index (catalog paths) -> unix time their last scan finished."""
        hi = _META_ROOT[:-1] + chr(ord(_META_ROOT[-1]) + 1)
        rows = self._db.execute("SELECT key, value FROM meta WHERE key >= ? AND key < ?", (_META_ROOT, hi))
        return {key[len(_META_ROOT) :]: float(value) for key, value in rows}

    # ---------------------------------------------------------------- model identity

    @property
    def identity(self) -> ModelIdentity | None:
        """The model bound to this index, or None before the first `bind_model`."""
        raw = self.get_meta(_META_MODEL)
        return None if raw is None else ModelIdentity.from_json(raw)

    def bind_model(self, identity: ModelIdentity) -> None:
        """Record the index's model, or check that `identity` is the same model (ModelMismatchError if not)."""
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_MODEL,)).fetchone()
            if row is not None:
                bound = ModelIdentity.from_json(row[0])
                if not bound.same_model(identity):
                    raise ModelMismatchError(
                        f"index {self.folder} was built with model {bound.label()}, not {identity.label()}; "
                        "use the index's model, or build a new index with --index"
                    )
                if bound == identity:
                    return
                log.info("index %s: model recorded as %s, was %s", self.folder, identity.label(), bound.label())
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (_META_MODEL, identity.to_json()),
            )

    def _dim(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_MODEL,)).fetchone()
        if row is None:
            raise CNClipError(f"index {self.folder} has no model yet; call Catalog.bind_model before adding vectors")
        return ModelIdentity.from_json(row[0]).dim

    def _encode(self, vector: np.ndarray, dim: int, what: str) -> bytes:
        arr = np.asarray(vector)
        if arr.shape != (dim,):
            raise ModelMismatchError(
                f"vector for {what} has shape {arr.shape} but index {self.folder} holds ({dim},) vectors; "
                "embed with the index's model"
            )
        return arr.astype(_VEC_DTYPE, copy=False).tobytes()

    # ---------------------------------------------------------------- scans

    def begin_scan(self) -> int:
        """Start a scan and return its id; ids only grow, also across processes."""
        with self._write() as conn:
            return self._bump(conn, _META_SCAN)

    def lookup(self, path: str) -> FileRecord | None:
        """The record of `path`, or None if it is not indexed."""
        row = self._db.execute("SELECT id, path, size, mtime_ns, hash FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else FileRecord(*row)

    def touch(self, scan_id: int, paths: Sequence[str]) -> None:
        """Record that unchanged `paths` were seen by scan `scan_id` (offline ones are back online);
        unknown paths are ignored."""
        if not paths:
            return
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(
                "UPDATE files SET offline = NULL, offline_since = NULL WHERE path = ? AND offline IS NOT NULL",
                ((p,) for p in paths),
            )
            back_online = conn.total_changes - before
            # max(): a slower, older scan running alongside must not move a file back to an
            # earlier scan id, or the newer scan's sweep would delete it.
            conn.executemany(
                "UPDATE files SET seen_scan = max(seen_scan, ?) WHERE path = ?", ((scan_id, p) for p in paths)
            )
            if back_online:  # they return to searches without being embedded again
                self._bump(conn, _META_GENERATION)

    def vector_id_for_hash(self, content_hash: str) -> int | None:
        """The id of the stored vector for this content, if any (renames and duplicates reuse it)."""
        row = self._db.execute("SELECT id FROM vectors WHERE hash = ?", (content_hash,)).fetchone()
        return None if row is None else int(row[0])

    def put_files(self, scan_id: int, rows: Sequence[NewFile]) -> None:
        """Add or update `rows` as seen by scan `scan_id`, with their vectors, in one transaction.

        A file whose vector changes gets a new file id (ids map to one vector for life); a file
        re-put with the same vector keeps its id.
        """
        if not rows:
            return
        with self._write() as conn:
            dim = self._dim(conn) if any(r.vector is not None for r in rows) else 0
            changed = False
            for row in rows:
                vid = self._vector_for_row(conn, row, dim)
                old = conn.execute(
                    "SELECT id, vector_id, seen_scan, offline FROM files WHERE path = ?", (row.path,)
                ).fetchone()
                if old is not None and old[1] == vid:
                    conn.execute(
                        "UPDATE files SET size = ?, mtime_ns = ?, hash = ?, seen_scan = max(seen_scan, ?), "
                        "offline = NULL, offline_since = NULL, "
                        "info_version = CASE WHEN size = ? AND mtime_ns = ? THEN info_version END WHERE id = ?",
                        (row.size, row.mtime_ns, row.hash, scan_id, row.size, row.mtime_ns, old[0]),
                    )
                    changed = changed or old[3] is not None  # back online: back in searches
                    continue
                seen = scan_id
                if old is not None:
                    conn.execute("DELETE FROM files WHERE id = ?", (old[0],))
                    seen = max(seen, old[2])
                conn.execute(
                    "INSERT INTO files (path, size, mtime_ns, hash, vector_id, seen_scan) VALUES (?, ?, ?, ?, ?, ?)",
                    (row.path, row.size, row.mtime_ns, row.hash, vid, seen),
                )
                changed = True
            if changed:
                self._bump(conn, _META_GENERATION)

    def _vector_for_row(self, conn: sqlite3.Connection, row: NewFile, dim: int) -> int | None:
        if row.vector is not None and row.vector_id is not None:
            raise ValueError(f"NewFile for {row.path} has both vector and vector_id; give one")
        if row.vector_id is not None:
            found = conn.execute("SELECT hash FROM vectors WHERE id = ?", (row.vector_id,)).fetchone()
            if found is None:
                # Only possible if another process swept it between vector_id_for_hash and now.
                raise CNClipError(f"vector {row.vector_id} for {row.path} is no longer in the index; scan again")
            if found[0] != row.hash:
                raise ValueError(f"vector {row.vector_id} belongs to content {found[0]}, not {row.path}'s {row.hash}")
            conn.execute("UPDATE vectors SET unused_since = NULL WHERE id = ?", (row.vector_id,))
            return int(row.vector_id)
        if row.vector is None:
            return None
        blob = self._encode(row.vector, dim, row.path)
        cur = conn.execute(
            "INSERT INTO vectors (hash, vector, precision) VALUES (?, ?, ?) ON CONFLICT(hash) DO NOTHING",
            (row.hash, blob, row.precision),
        )
        if cur.rowcount == 1:
            return int(cur.lastrowid)
        # Same content already embedded (a duplicate in this batch, a concurrent scan, or a kept
        # vector of removed content): keep that one.
        conn.execute("UPDATE vectors SET unused_since = NULL WHERE hash = ?", (row.hash,))
        return int(conn.execute("SELECT id FROM vectors WHERE hash = ?", (row.hash,)).fetchone()[0])

    def frame_paths(self, video: str) -> list[str]:
        """The catalog paths of the frames stored for the video at catalog path `video`."""
        lo = video + "#t="
        rows = self._db.execute("SELECT path FROM files WHERE path >= ? AND path < ?", (lo, video + "#t>"))
        return [r[0] for r in rows]

    def frame_vectors(self, digest: str) -> dict[float, int]:
        """Seconds -> vector id of the stored frames of the video whose content hash is `digest`."""
        lo = digest + "#t="
        rows = self._db.execute("SELECT hash, id FROM vectors WHERE hash >= ? AND hash < ?", (lo, digest + "#t>"))
        return {float(h[len(lo) :]): int(i) for h, i in rows}

    def frame_count(self) -> tuple[int, int]:
        """(videos, searchable frames) in the index."""
        frames = self._db.execute(
            "SELECT count(*), count(DISTINCT substr(path, 1, instr(path, '#t=') - 1)) FROM files "
            "WHERE path GLOB '*#t=*' AND vector_id IS NOT NULL AND offline IS NULL"
        ).fetchone()
        return int(frames[1]), int(frames[0])

    def files_without_info(self, root: str, limit: int = 512) -> list[tuple[int, str, int]]:
        """Up to `limit` (id, path, mtime_ns) of files under `root` whose filter facts are not read yet."""
        lo, hi = _prefix_range(_absolute(root))
        rows = self._db.execute(
            "SELECT id, path, mtime_ns FROM files WHERE path >= ? AND path < ? AND offline IS NULL "
            "AND (info_version IS NULL OR info_version < ?) LIMIT ?",
            (lo, hi, INFO_VERSION, limit),
        ).fetchall()
        return [(int(i), str(p), int(m)) for i, p, m in rows]

    def set_info(self, rows: Sequence[tuple[int, PhotoInfo]]) -> None:
        """Record the filter facts of files (by id), in one transaction."""
        if not rows:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE files SET taken = ?, taken_from = ?, camera = ?, width = ?, height = ?, kind = ?, "
                "info_version = ? WHERE id = ?",
                [
                    (i.taken, i.taken_from, i.camera, i.width, i.height, i.kind, INFO_VERSION, file_id)
                    for file_id, i in rows
                ],
            )

    def info_for_ids(self, ids: Sequence[int]) -> dict[int, PhotoInfo]:
        """The recorded filter facts of files (ids without them are absent)."""
        out: dict[int, PhotoInfo] = {}
        for chunk in _chunks([int(i) for i in ids], _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                f"SELECT id, taken, taken_from, camera, width, height, coalesce(kind, 'photo') FROM files "
                f"WHERE id IN ({marks}) AND taken IS NOT NULL",
                tuple(chunk),
            ):
                out[int(row[0])] = PhotoInfo(*row[1:])
        return out

    def searchable_ids_where(self, clause: str, params: Sequence) -> np.ndarray:
        """int64 ids of searchable files (with a vector, online) that also match the SQL `clause`
        on the files table (built by `cnclip.index.filters.SearchFilter.sql`, never from user text)."""
        rows = self._db.execute(
            f"SELECT id FROM files WHERE vector_id IS NOT NULL AND offline IS NULL AND ({clause})", tuple(params)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def precision_counts(self) -> dict[str, int]:
        """How many searchable files have vectors of each precision ("unrecorded": from before it was kept)."""
        rows = self._db.execute(
            "SELECT coalesce(v.precision, 'unrecorded'), count(*) FROM files f JOIN vectors v ON v.id = f.vector_id "
            "WHERE f.offline IS NULL GROUP BY 1"
        ).fetchall()
        return {str(name): int(n) for name, n in rows}

    def missing_under(self, scan_id: int, root: str) -> tuple[int, int]:
        """(files under `root` that scan `scan_id` has not seen, all files under `root`); a video
        counts once, not once per stored frame (rows `VIDEO#t=SECONDS`)."""
        lo, hi = _prefix_range(_absolute(root))
        row = self._db.execute(
            "SELECT count(*) FILTER (WHERE seen_scan < ?), count(*) FROM files WHERE path >= ? AND path < ? "
            "AND path NOT GLOB '*#t=*'",
            (scan_id, lo, hi),
        ).fetchone()
        return int(row[0]), int(row[1])

    def files_under(self, root: str) -> int:
        """How many files (online or not) the catalog holds under the folder `root`."""
        return self.missing_under(0, root)[1]

    def has_files_under(self, root: str) -> bool:
        """Whether the catalog holds any file under the folder `root`: one index probe, where
        counting them (`files_under`) reads every row below (a request's filter asks this)."""
        lo, hi = _prefix_range(_absolute(root))
        row = self._db.execute("SELECT 1 FROM files WHERE path >= ? AND path < ? LIMIT 1", (lo, hi)).fetchone()
        return row is not None

    def offline_count(self) -> int:
        """How many files are offline (kept, but left out of searches)."""
        return int(self._db.execute("SELECT count(*) FROM files WHERE offline IS NOT NULL").fetchone()[0])

    def mark_offline(self, scan_id: int, folder: str, reason: str) -> int:
        """Keep the files under `folder` (or the file `folder`) that scan `scan_id` could not see,
        marked offline with `reason`.

        They leave searches (until a scan sees them again) but keep their rows and vectors, and the
        sweep of this scan does not remove them. Returns how many files are offline under `folder`.
        """
        lo, hi = _prefix_range(_absolute(folder))
        now = time.time()
        with self._write() as conn:
            # the path itself too: a dangling symlink may have pointed at one file, and a video's
            # frames (rows `VIDEO#t=SECONDS`) lie beside it, not under it
            where = "(path = ? OR (path >= ? AND path < ?) OR (path >= ? AND path < ?)) AND seen_scan < ?"
            params = (folder, lo, hi, folder + "#t=", folder + "#t>", scan_id)
            newly = conn.execute(f"SELECT count(*) FROM files WHERE {where} AND offline IS NULL", params).fetchone()[0]
            marked = conn.execute(
                "UPDATE files SET offline = ?, offline_since = coalesce(offline_since, ?), seen_scan = ? "
                f"WHERE {where}",
                (reason, now, scan_id, *params),
            ).rowcount
            if newly:
                self._bump(conn, _META_GENERATION)
        if marked:
            log.info("scan %d: %d files under %s offline (%s)", scan_id, marked, folder, reason)
        return marked

    def folders_under(self, root: str) -> dict[str, FolderRecord]:
        """Catalog path -> record of every scanned folder at or under the folder `root`."""
        lo, hi = _prefix_range(_absolute(root))
        rows = self._db.execute(
            "SELECT path, dev, mount FROM folders WHERE path = ? OR (path >= ? AND path < ?)", (root, lo, hi)
        )
        return {path: FolderRecord(int(dev), bool(mount)) for path, dev, mount in rows}

    def record_folders(self, scan_id: int, root: str, folders: Sequence[tuple[str, int, bool]]) -> None:
        """Record the (catalog path, device, mount point) of the folders scan `scan_id` walked under
        `root`, and forget folders under it that it did not walk and that hold no file any more."""
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO folders (path, dev, mount, seen_scan) VALUES (?, ?, ?, ?) ON CONFLICT(path) "
                "DO UPDATE SET dev = excluded.dev, mount = excluded.mount, seen_scan = excluded.seen_scan",
                ((path, int(dev), int(mount), scan_id) for path, dev, mount in folders),
            )
            lo, hi = _prefix_range(_absolute(root))
            stale = conn.execute(
                "SELECT path FROM folders WHERE (path = ? OR (path >= ? AND path < ?)) AND seen_scan < ?",
                (root, lo, hi, scan_id),
            ).fetchall()
            for (path,) in stale:
                f_lo, f_hi = _prefix_range(_absolute(path))
                if conn.execute("SELECT 1 FROM files WHERE path >= ? AND path < ? LIMIT 1", (f_lo, f_hi)).fetchone():
                    continue  # an unreachable folder: its record must outlive the outage
                conn.execute("DELETE FROM folders WHERE path = ?", (path,))

    def offline_files(self) -> list[tuple[str, str, float]]:
        """(path, reason, since when (unix time)) of every offline file, by path."""
        rows = self._db.execute(
            "SELECT path, offline, offline_since FROM files WHERE offline IS NOT NULL ORDER BY path"
        ).fetchall()
        return [(r[0], r[1], float(r[2] or 0)) for r in rows]

    def finish_scan(self, scan_id: int, root: str) -> list[str]:
        """Remove the files under directory `root` that scan `scan_id` did not see (nor marked offline).

        Returns the removed paths, sorted. Files outside `root` are untouched, so one index can hold
        several folders. Vectors left without a file are kept, marked unused, until
        `collect_garbage`: a photo restored from the trash is then reused, not embedded again.
        """
        lo, hi = _prefix_range(_absolute(root))
        with self._write() as conn:
            # seen_scan < scan_id rather than != : files seen by a newer concurrent scan stay.
            where = "path >= ? AND path < ? AND seen_scan < ?"
            params = (lo, hi, scan_id)
            gone = [r[0] for r in conn.execute(f"SELECT path FROM files WHERE {where} ORDER BY path", params)]
            if gone:
                conn.execute(f"DELETE FROM files WHERE {where}", params)
                self._bump(conn, _META_GENERATION)
            self._prune_journal(conn)
            unused = conn.execute(
                "UPDATE vectors SET unused_since = ? WHERE unused_since IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM files WHERE files.vector_id = vectors.id)",
                (time.time(),),
            ).rowcount
        if gone or unused:
            log.info("scan %d of %s: removed %d missing files; %d vectors now unused", scan_id, root, len(gone), unused)
        return gone

    def change_seq(self) -> int:
        """The position of the newest entry of the change journal (0 when empty)."""
        return int(self._db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def journal_mark(self, seq: int) -> str | None:
        """What the change journal holds at position `seq` ("seq:file_id:op"; "0" for the empty
        start), or None when that entry does not exist (yet, or any more). A derived file records
        the mark it was built up to: another mark at the same position means another history."""
        if seq <= 0:
            return "0"
        row = self._db.execute("SELECT file_id, op FROM changes WHERE seq = ?", (int(seq),)).fetchone()
        return None if row is None else f"{int(seq)}:{int(row[0])}:{int(row[1])}"

    def journal_pruned(self) -> int:
        """The journal holds no entry at or below this position (older ones were dropped)."""
        return self._meta_int(_META_JOURNAL_PRUNED)

    def changes_since(self, seq: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(file ids that became searchable, file ids that stopped being searchable, new position)
        since journal position `seq`; None when the journal no longer reaches back that far, or `seq`
        lies past its newest entry (a catalog restored from a backup)."""
        if seq < self._meta_int(_META_JOURNAL_PRUNED) or seq > self.change_seq():
            return None  # too far behind, or past the newest entry: another history, not "nothing new"
        net: dict[int, int] = {}
        last = seq
        for row_seq, file_id, op in self._db.execute(
            "SELECT seq, file_id, op FROM changes WHERE seq > ? ORDER BY seq", (int(seq),)
        ):
            net[file_id] = op  # the last word on a file wins
            last = row_seq
        added = np.array(sorted(f for f, op in net.items() if op > 0), dtype=np.int64)
        removed = np.array(sorted(f for f, op in net.items() if op < 0), dtype=np.int64)
        return added, removed, last

    def _prune_journal(self, conn: sqlite3.Connection) -> None:
        newest = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
        cut = newest - _JOURNAL_KEEP
        if cut > 0 and conn.execute("DELETE FROM changes WHERE seq <= ?", (cut,)).rowcount:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (_META_JOURNAL_PRUNED, str(cut)),
            )

    def unused_vectors(self) -> int:
        """How many stored vectors no file uses (kept for reuse until `collect_garbage`)."""
        return int(self._db.execute("SELECT count(*) FROM vectors WHERE unused_since IS NOT NULL").fetchone()[0])

    def collect_garbage(self, older_than_s: float = 0.0) -> int:
        """Delete vectors that no file has used for more than `older_than_s` seconds; returns how many."""
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        # re-checked here: a scan may have reused a vector after it was marked unused
        unused = (
            "SELECT id FROM vectors WHERE unused_since IS NOT NULL AND unused_since <= ? "
            "AND NOT EXISTS (SELECT 1 FROM files WHERE files.vector_id = vectors.id)"
        )
        cutoff = (time.time() - older_than_s,)
        with self._write() as conn:
            conn.execute(f"DELETE FROM words_fts WHERE rowid IN ({unused})", cutoff)  # words go with their vector
            conn.execute(f"DELETE FROM words WHERE vector_id IN ({unused})", cutoff)
            removed = conn.execute(f"DELETE FROM vectors WHERE id IN ({unused})", cutoff).rowcount
        if removed:
            log.info("catalog %s: collected %d unused vectors", self.path, removed)
        return removed

    # ---------------------------------------------------------------- reading files & vectors

    def count(self) -> int:
        """Number of searchable files (online, with a vector; what `file_vectors` yields)."""
        return int(
            self._db.execute("SELECT count(*) FROM files WHERE vector_id IS NOT NULL AND offline IS NULL").fetchone()[0]
        )

    def file_vectors(self, batch: int = 65536, after_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (file ids int64 (n,), vectors float32 (n, dim)) chunks in id order, ids > `after_id`.

        File ids only grow and a changed file gets a new one, so `after_id` = the largest id a
        derived index holds gives exactly what was added since. One SQL statement serves all
        chunks, so they come from one consistent snapshot even while another process writes.
        Do not write through this Catalog until the iterator is exhausted or closed.
        """
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        ident = self.identity
        if ident is None:
            return
        cur = self._db.execute(
            "SELECT files.id, vectors.vector FROM files JOIN vectors ON vectors.id = files.vector_id "
            "WHERE files.id > ? AND files.offline IS NULL ORDER BY files.id",
            (int(after_id),),
        )
        try:
            while rows := cur.fetchmany(batch):
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                yield ids, _decode_matrix([r[1] for r in rows], ident.dim, f"index catalog {self.path}")
        finally:
            cur.close()

    def file_ids(self) -> np.ndarray:
        """Ids of the online files that have a vector (what a derived index should hold), ascending int64."""
        rows = self._db.execute(
            "SELECT id FROM files WHERE vector_id IS NOT NULL AND offline IS NULL ORDER BY id"
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def files_by_ids(self, ids: Sequence[int]) -> dict[int, FileRecord]:
        """Records for the given file ids; ids no longer in the catalog are absent from the result."""
        out: dict[int, FileRecord] = {}
        for chunk in _chunks([int(i) for i in ids], _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                f"SELECT id, path, size, mtime_ns, hash FROM files WHERE id IN ({marks})", tuple(chunk)
            ):
                out[row[0]] = FileRecord(*row)
        return out

    def vector_for_path(self, path: str) -> np.ndarray | None:
        """The stored vector of an indexed file, or None (not indexed, or indexed without a vector)."""
        row = self._db.execute(
            "SELECT vectors.vector FROM files JOIN vectors ON vectors.id = files.vector_id WHERE files.path = ?",
            (path,),
        ).fetchone()
        if row is None:
            return None
        return _decode_matrix([row[0]], self._dim(self._db), path)[0]

    def vectors_for_ids(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (len(ids), dim) stored vectors of file ids, in order; NaN rows for ids not indexed.

        What an on-disk (PQ) vector index re-ranks its candidates with: the catalog already holds
        the exact vectors, so no second copy is kept.
        """
        ids = [int(i) for i in ids]
        dim = self._dim(self._db)
        out = np.full((len(ids), dim), np.nan, dtype=np.float32)
        rows_of: dict[int, list[int]] = {}
        for row, file_id in enumerate(ids):
            rows_of.setdefault(file_id, []).append(row)
        for chunk in _chunks(list(rows_of), _IN_CHUNK):
            found = self._db.execute(
                "SELECT files.id, vectors.vector FROM files JOIN vectors ON vectors.id = files.vector_id "
                f"WHERE files.id IN ({','.join('?' * len(chunk))})",
                list(chunk),
            ).fetchall()
            if found:
                matrix = _decode_matrix([r[1] for r in found], dim, "vectors")
                for (file_id, _), vector in zip(found, matrix, strict=True):
                    out[rows_of[file_id]] = vector
        return out

    def file_id_for_path(self, path: str) -> int | None:
        """The file id of `path`, or None if it is not indexed."""
        row = self._db.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else int(row[0])

    # ---------------------------------------------------------------- texts

    def add_texts(self, texts: Sequence[str], vectors: np.ndarray, collection: str = "default") -> int:
        """Store texts with their (n, dim) vectors, skipping ones already in `collection`; returns the number added."""
        if len(texts) == 0:
            return 0
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"add_texts needs one vector row per text: {len(texts)} texts, vectors {vectors.shape}")
        with self._write() as conn:
            dim = self._dim(conn)
            blobs = [self._encode(v, dim, f"text {t!r}") for t, v in zip(texts, vectors, strict=True)]
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO texts (collection, text, vector) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                ((collection, t, b) for t, b in zip(texts, blobs, strict=True)),
            )
            added = conn.total_changes - before
            if added:
                self._bump(conn, _META_GENERATION)
        return added

    def known_texts(self, texts: Sequence[str], collection: str = "default") -> set[str]:
        """The subset of `texts` already stored in `collection` (so callers embed only the rest)."""
        found: set[str] = set()
        unique = list(dict.fromkeys(texts))
        for chunk in _chunks(unique, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT text FROM texts WHERE collection = ? AND text IN ({marks})", (collection, *chunk)
            )
            found.update(r[0] for r in rows)
        return found

    def text_vectors(self, collection: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(text ids int64 (n,), vectors float32 (n, dim)) in id order, of one collection or all."""
        if collection is None:
            rows = self._db.execute("SELECT id, vector FROM texts ORDER BY id").fetchall()
        else:
            rows = self._db.execute(
                "SELECT id, vector FROM texts WHERE collection = ? ORDER BY id", (collection,)
            ).fetchall()
        ident = self.identity
        dim = ident.dim if ident is not None else 0
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.zeros((0, dim), dtype=np.float32)
        return ids, _decode_matrix([r[1] for r in rows], dim, f"index catalog {self.path}")

    def texts_by_ids(self, ids: Sequence[int]) -> dict[int, str]:
        """Texts for the given text ids; unknown ids are absent from the result."""
        out: dict[int, str] = {}
        for chunk in _chunks([int(i) for i in ids], _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            out.update(self._db.execute(f"SELECT id, text FROM texts WHERE id IN ({marks})", tuple(chunk)).fetchall())
        return out

    def text_count(self) -> int:
        """Number of stored texts across all collections."""
        return int(self._db.execute("SELECT count(*) FROM texts").fetchone()[0])

    # ---------------------------------------------------------------- words read in photos

    def photos_to_read(
        self, root: str | None = None, after: int = 0, limit: int = 64, retry_failed: bool = False
    ) -> list[tuple[int, list[str]]]:
        """Up to `limit` (vector id, its paths) of online photos and video frames under `root`
        whose content was never read for words (or, with `retry_failed`, could not be), in vector
        id order after `after`; a content's paths (its copies) sorted."""
        lo, hi = _prefix_range(_absolute(root)) if root else ("", "\U0010ffff")
        rows = self._db.execute(
            "SELECT f.vector_id, json_group_array(f.path) FROM files f WHERE f.vector_id > ? AND f.offline IS NULL "
            "AND f.path >= ? AND f.path < ? "
            "AND NOT EXISTS (SELECT 1 FROM words w WHERE w.vector_id = f.vector_id AND (? = 0 OR w.error IS NULL)) "
            "GROUP BY f.vector_id ORDER BY f.vector_id LIMIT ?",
            (after, lo, hi, int(retry_failed), limit),
        ).fetchall()
        return [(int(v), sorted(json.loads(paths))) for v, paths in rows]

    def put_words(self, reader: str, rows: Sequence[tuple[int, list[dict], str | None, str]]) -> None:
        """Record what `reader` read, in one transaction: per vector id its lines (dicts with
        "text", "score", "box"), the error if it could not be read, and the full-text tokens."""
        if not rows:
            return
        now = time.time()
        with self._write() as conn:
            ids = [(vector_id,) for vector_id, _, _, _ in rows]
            conn.executemany("DELETE FROM words_fts WHERE rowid = ?", ids)  # a re-read replaces
            conn.executemany(
                "INSERT OR REPLACE INTO words (vector_id, reader, lines, error, read_at) VALUES (?, ?, ?, ?, ?)",
                [(v, reader, json.dumps(lines, ensure_ascii=False), error, now) for v, lines, error, _ in rows],
            )
            conn.executemany(
                "INSERT INTO words_fts (rowid, tokens) VALUES (?, ?)", [(v, t) for v, _, _, t in rows if t]
            )

    def word_file_ids(self, match: str) -> np.ndarray:
        """int64 ids of searchable files whose words match the FTS5 expression `match` (made by
        `cnclip.index.words.WordQuery`, never from user text directly)."""
        try:
            rows = self._db.execute(
                "SELECT f.id FROM words_fts JOIN files f ON f.vector_id = words_fts.rowid "
                "WHERE words_fts MATCH ? AND f.offline IS NULL",
                (match,),
            ).fetchall()
        except sqlite3.OperationalError as e:
            raise CNClipError(f"cannot search the words of {self.path}: {e}") from e
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def words_for_ids(self, ids: Sequence[int]) -> dict[int, list[str]]:
        """File id -> the lines of text read in it, for files that have any."""
        out: dict[int, list[str]] = {}
        for chunk in _chunks([int(i) for i in ids], _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for file_id, lines in self._db.execute(
                f"SELECT f.id, w.lines FROM files f JOIN words w ON w.vector_id = f.vector_id "
                f"WHERE f.id IN ({marks}) AND w.lines != '[]'",
                tuple(chunk),
            ):
                out[int(file_id)] = [line["text"] for line in json.loads(lines)]
        return out

    def words_of_file(self, file_id: int) -> dict | None:
        """What was read in file `file_id`: {"lines": [{"text", "score", "box"}], "error": reason or
        None, "reader": who read it}; None when its content was not read yet (or there is no such file)."""
        row = self._db.execute(
            "SELECT w.lines, w.error, w.reader FROM files f JOIN words w ON w.vector_id = f.vector_id WHERE f.id = ?",
            (int(file_id),),
        ).fetchone()
        if row is None:
            return None
        return {"lines": json.loads(row[0]), "error": row[1], "reader": row[2]}

    def words_progress(self, root: str | None = None) -> dict[str, int]:
        """How far reading words is (under `root`, or everywhere): online pictures by content
        (photos and video frames), how many of them were read, how many have words, how many
        could not be read."""
        lo, hi = _prefix_range(_absolute(root)) if root else ("", "\U0010ffff")
        photos, read, with_words, failed = self._db.execute(
            "SELECT count(*), count(w.vector_id), count(CASE WHEN w.lines != '[]' THEN 1 END), "
            "count(w.error) FROM (SELECT DISTINCT vector_id FROM files WHERE vector_id IS NOT NULL "
            "AND offline IS NULL AND path >= ? AND path < ?) p "
            "LEFT JOIN words w ON w.vector_id = p.vector_id",
            (lo, hi),
        ).fetchone()
        return {"photos": int(photos), "read": int(read), "with_words": int(with_words), "failed": int(failed)}

    def has_words(self) -> bool:
        """Whether any photo of the index has words read in it."""
        return self._db.execute("SELECT 1 FROM words_fts LIMIT 1").fetchone() is not None
