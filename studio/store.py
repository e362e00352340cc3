"""The studio's one SQLite database, `DATA/studio.db`: history, batch runs and listening tests.

How to use it:

    store = open_store(data_dir)                 # one Store per data directory and process
    with store.transaction() as db:              # BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)
        db.execute("INSERT INTO ...", (...))     # every write goes inside one transaction
    rows = store.query("SELECT ... WHERE id = ?", (x,))   # reads: sqlite3.Row objects

    rel = store.write_wav("batch/run/x.wav", wav, sample_rate)   # audio beside the db, atomically
    store.file(rel)                               # -> absolute Path, only inside the data directory

Write the audio file first, then commit the row that names it: a crash in between leaves an
unreferenced file, never a row pointing at nothing.

How to add a migration (another module adding its tables):

    from studio.store import register_migration
    register_migration(2, '''CREATE TABLE listening_sessions (...); CREATE INDEX ...;''')

at import time of that module. Versions are whole numbers, applied in order, each once, inside
one transaction with the `PRAGMA user_version` bump, so a database is never half-migrated.
A store notices migrations registered after it was opened and applies them on its next use.
Never edit a migration that has shipped: add a new one (ALTER TABLE ... ADD COLUMN, new tables).

Concurrency: WAL journal (readers never block the writer), `busy_timeout` so writers from other
threads and other studio processes sharing the data directory wait for each other instead of
failing, one connection per thread (sqlite3 connections must not be shared between threads), and
`BEGIN IMMEDIATE` so a transaction takes the write lock at its start (no deadlocked upgrades from
read to write). `foreign_keys=ON` is set on every connection (SQLite's default is off).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

DB_NAME = "studio.db"
#: How long a writer waits for another writer (thread or process) before giving up (ms). A batch
#: output commits in milliseconds; minutes would mean a stuck process, which should surface.
BUSY_TIMEOUT_MS = 60_000

#: Migration 1: generations (the history) and batch runs. Times are ISO 8601 UTC text; JSON
#: columns hold objects; paths are relative to the data directory (the folder of studio.db).
SCHEMA_V1 = """
CREATE TABLE batch_runs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,           -- what the user named it; resuming uses it
    created     TEXT NOT NULL,
    updated     TEXT NOT NULL,
    user        TEXT,                           -- NULL until authentication exists
    systems     TEXT NOT NULL,                  -- JSON list of canonical system strings
    source      TEXT NOT NULL,                  -- the test set: a file path or 'pasted'
    concurrency INTEGER NOT NULL,
    status      TEXT NOT NULL                   -- created | running | done | failed | stopped
);
CREATE TABLE generations (
    id          TEXT PRIMARY KEY,               -- sortable: UTC time + random hex
    created     TEXT NOT NULL,
    user        TEXT,
    kind        TEXT NOT NULL DEFAULT 'clone',  -- clone | design (Spark voice creation)
    model       TEXT NOT NULL,                  -- f5 | spark
    mode        TEXT NOT NULL DEFAULT 'offline',-- offline | streaming
    status      TEXT NOT NULL DEFAULT 'ok',     -- ok | error | cancelled
    params      TEXT NOT NULL DEFAULT '{}',     -- request options by Triton input name
    text        TEXT NOT NULL DEFAULT '',       -- the target text
    ref_text    TEXT NOT NULL DEFAULT '',
    voice       TEXT,                           -- library voice used, if any
    prompt_path TEXT,                           -- relative path of the prompt clip
    audio_path  TEXT,                           -- relative path of the generated audio
    sample_rate INTEGER,
    seed        INTEGER,                        -- the seed the server used
    metrics     TEXT NOT NULL DEFAULT '{}',     -- latency_s, first_chunk_s, audio_s, rtf, tokens, ...
    info        TEXT NOT NULL DEFAULT '{}',     -- the server's last `info` object
    error       TEXT,
    notes       TEXT,
    extra       TEXT NOT NULL DEFAULT '{}',     -- other fields a caller recorded
    batch_run   INTEGER REFERENCES batch_runs(id) ON DELETE CASCADE  -- NULL: the page's own history
);
CREATE INDEX generations_batch_run ON generations(batch_run);
CREATE INDEX generations_created ON generations(created);
CREATE TABLE batch_rows (
    run_id         INTEGER NOT NULL REFERENCES batch_runs(id) ON DELETE CASCADE,
    row_id         TEXT NOT NULL,
    position       INTEGER NOT NULL,            -- order in the test set
    prompt         TEXT NOT NULL,               -- a saved voice name or an audio path
    reference_text TEXT NOT NULL,
    target_text    TEXT NOT NULL,
    seed           INTEGER,
    PRIMARY KEY (run_id, row_id)
);
CREATE TABLE batch_outputs (
    run_id        INTEGER NOT NULL,
    system        TEXT NOT NULL,                -- canonical system string (studio.systems)
    row_id        TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    audio_path    TEXT,
    sample_rate   INTEGER,
    metrics       TEXT NOT NULL DEFAULT '{}',
    error         TEXT,
    generation_id TEXT REFERENCES generations(id) ON DELETE SET NULL,
    updated       TEXT NOT NULL,
    PRIMARY KEY (run_id, system, row_id),
    FOREIGN KEY (run_id, row_id) REFERENCES batch_rows(run_id, row_id) ON DELETE CASCADE
);
CREATE TABLE imports (
    source   TEXT PRIMARY KEY,                  -- e.g. history/history.jsonl
    imported TEXT NOT NULL,
    size     INTEGER NOT NULL,                  -- bytes of the file when imported
    records  INTEGER NOT NULL
);
"""

#: Migration 2: listening tests (studio/listening.py): sessions over a batch run, raters, their blind items,
#: answers (one per item).
SCHEMA_V2 = """
CREATE TABLE listening_sessions (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,        -- the organiser's name for it (never shown to raters)
    kind            TEXT NOT NULL CHECK (kind IN ('ab', 'mos', 'smos')),
    run_id          INTEGER NOT NULL REFERENCES batch_runs(id) ON DELETE CASCADE,
    systems         TEXT NOT NULL,               -- JSON list of the canonical system strings under test
    items_per_rater INTEGER NOT NULL CHECK (items_per_rater >= 1),
    instructions    TEXT NOT NULL DEFAULT '',
    join_token      TEXT NOT NULL UNIQUE,        -- secret of the shared link: each visitor becomes a rater
    created         TEXT NOT NULL,
    user            TEXT                         -- NULL until authentication exists
);
CREATE TABLE raters (
    id          INTEGER PRIMARY KEY,
    session_id  INTEGER NOT NULL REFERENCES listening_sessions(id) ON DELETE CASCADE,
    token       TEXT NOT NULL UNIQUE,            -- the rater's link secret
    slot        INTEGER NOT NULL,                -- 1, 2, ... in order of arrival
    label       TEXT NOT NULL,
    via         TEXT NOT NULL CHECK (via IN ('link', 'join')),
    created     TEXT NOT NULL,
    UNIQUE (session_id, slot)
);
CREATE TABLE rater_items (
    id          TEXT PRIMARY KEY,                -- opaque random id: the only handle the rater sees
    rater_id    INTEGER NOT NULL REFERENCES raters(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,                -- the rater's own random order, from 0
    row_id      TEXT NOT NULL,
    system_a    TEXT NOT NULL,                   -- MOS/SMOS: the system heard; A/B: the one heard as A
    system_b    TEXT,                            -- A/B: the one heard as B
    fetched_ref REAL, fetched_a REAL, fetched_b REAL,  -- when the audio route first served each clip (unix s)
    played_ref  TEXT, played_a TEXT, played_b TEXT,    -- when the player reported each clip's end (UTC)
    UNIQUE (rater_id, position)
);
CREATE INDEX rater_items_unit ON rater_items(row_id, system_a, system_b);
CREATE TABLE answers (
    id          INTEGER PRIMARY KEY,
    item_id     TEXT NOT NULL UNIQUE REFERENCES rater_items(id) ON DELETE CASCADE,
    choice      TEXT CHECK (choice IN ('A', 'B', 'none')),   -- A/B
    score       INTEGER CHECK (score BETWEEN 1 AND 5),       -- MOS / SMOS
    reason      TEXT,
    answered    TEXT NOT NULL,
    CHECK ((choice IS NULL) <> (score IS NULL))
);
"""

#: Ordered (version, SQL) pairs. Append through `register_migration`; never edit a shipped one.
MIGRATIONS: list[tuple[int, str]] = [(1, SCHEMA_V1), (2, SCHEMA_V2)]
_migrations_lock = threading.Lock()


class StoreError(RuntimeError):
    """The database cannot be used (newer schema gap, corrupt file); the message says why."""


def register_migration(version: int, sql: str) -> None:
    """Add migration `version` (applied after every lower one). Registering the same pair twice
    is harmless (modules get imported twice under different names); a different SQL for a taken
    version is a programming error."""
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"a migration version is a whole number >= 1; got {version!r}")
    with _migrations_lock:
        for have, have_sql in MIGRATIONS:
            if have == version:
                if have_sql.strip() != sql.strip():
                    raise ValueError(f"migration {version} is already registered with different SQL")
                return
        MIGRATIONS.append((version, sql))
        MIGRATIONS.sort(key=lambda m: m[0])


def latest_version() -> int:
    with _migrations_lock:
        return max(v for v, _ in MIGRATIONS)


def split_statements(sql: str) -> list[str]:
    """SQL text -> single statements (sqlite3's executescript would commit our transaction)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip().strip(";").strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {buf.strip()[:80]!r}")
    return out


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def to_json(obj) -> str:
    """Compact JSON for the JSON columns; numpy scalars become plain numbers."""
    return json.dumps(obj if obj is not None else {}, ensure_ascii=False, separators=(",", ":"), default=_plain)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def from_json(text: str | None, default=None):
    if text is None or text == "":
        return {} if default is None else default
    return json.loads(text)


# --- files beside the database -----------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name, fsync, rename into place, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def wav_bytes(wav: np.ndarray, sample_rate: int, subtype: str = "FLOAT") -> bytes:
    """A mono WAV file's bytes (FLOAT: bit exact float32; PCM_16 for prompt clips)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wav, dtype=np.float32), int(sample_rate), subtype=subtype, format="WAV")
    return buf.getvalue()


# --- the store ----------------------------------------------------------------------------------------
class Store:
    """`data_dir/studio.db` plus the files beside it. Safe to share between threads."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir).expanduser()
        self.path = self.root / DB_NAME
        self._local = threading.local()
        self._version_lock = threading.Lock()
        self._applied = 0  # highest migration this object has seen applied
        self.root.mkdir(parents=True, exist_ok=True)
        self.migrate()

    # -- connections ------------------------------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use; a forked child opens its own)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._open()
            self._local.conn, self._local.pid, self._local.depth = conn, os.getpid(), 0
        if self._applied < latest_version() and not self._local.depth:
            self.migrate()  # a module registered a migration after this store was opened
        return conn

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit BEGINs; `transaction()` says where each one starts.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=True)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch the database to WAL mode (got {mode}); "
                             "is the data directory on a network file system?")
        # NORMAL is durable across application crashes in WAL mode; FULL also survives power loss
        # at one more fsync per commit, which a commit per generation easily affords.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # -- transactions -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commits when the block ends, rolls back if it raises.

        Nested use joins the outer transaction (the outer block commits)."""
        conn = self.connection()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        conn.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield conn
        except BaseException:
            self._local.depth = 0
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._local.depth = 0
        conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """Rows of one read statement (outside a transaction: a consistent WAL snapshot)."""
        return self.connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self.connection().execute(sql, params).fetchone()

    # -- schema -----------------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        """Apply every registered migration newer than the database's `user_version`, in order, in one
        transaction. Returns the version reached. Another process migrating at the same time waits on
        the write lock and then finds nothing left to do."""
        with self._version_lock:
            with _migrations_lock:
                pending = list(MIGRATIONS)
            conn = getattr(self._local, "conn", None)
            if conn is None or self._local.pid != os.getpid():
                conn = self._open()
                self._local.conn, self._local.pid, self._local.depth = conn, os.getpid(), 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = int(conn.execute("PRAGMA user_version").fetchone()[0])
                for version, sql in pending:
                    if version <= current:
                        continue
                    for statement in split_statements(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {int(version)}")
                    current = version
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            # A newer studio may have migrated further: those tables are simply unused here.
            self._applied = max(v for v, _ in pending)
            return current

    # -- files ------------------------------------------------------------------------------------
    def abspath(self, rel: str) -> Path:
        """Where a relative path of the store lives; ValueError if it leaves the data directory."""
        path = (self.root / rel).resolve()
        if Path(rel).is_absolute() or not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{rel!r} is not a path inside the data directory")
        return path

    def write_wav(self, rel: str, wav: np.ndarray, sample_rate: int, subtype: str = "FLOAT") -> str:
        """Write audio atomically at `rel` (relative to the data directory); returns `rel`."""
        write_bytes_atomic(self.abspath(rel), wav_bytes(wav, sample_rate, subtype))
        return rel

    def write_file(self, rel: str, data: bytes) -> str:
        write_bytes_atomic(self.abspath(rel), data)
        return rel

    def file(self, rel: str | None) -> Path | None:
        """Absolute path of a stored file, only if it exists inside the data directory."""
        if not rel:
            return None
        try:
            path = self.abspath(rel)
        except ValueError:
            return None
        return path if path.is_file() else None


_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def open_store(data_dir: Path) -> Store:
    """The process's Store for `data_dir` (created and migrated on first use)."""
    key = Path(data_dir).expanduser().resolve()
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = Store(key)
        return store


__all__ = ["BUSY_TIMEOUT_MS", "DB_NAME", "MIGRATIONS", "Store", "StoreError", "from_json", "latest_version",
           "open_store", "register_migration", "split_statements", "to_json", "utc_now", "wav_bytes",
           "write_bytes_atomic"]
