"""The buffer database file: its schema and migrations, its connections, and its recovery.

Schema history (the version is kept in `meta`):
    1   readings, schemas, dead_letters, counters, meta
    2   + held: readings stamped while the wall clock was not trusted, kept with their
          monotonic time and boot id until their timestamps can be corrected

A newer agent migrates an older file in place, in one transaction, keeping every pending
reading. An older agent refuses a newer file. A file that cannot be opened or fails
`PRAGMA quick_check` is moved aside under a timestamped name and a new one is made, so a
corrupted SD card sector never turns into a crash loop.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import BufferError

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger("edge_agent.buffer")

SCHEMA_VERSION = 2
_BUSY_TIMEOUT_MS = 30_000


def connect(path: Path, sync: str = "full") -> sqlite3.Connection:
    """A connection in autocommit mode (we BEGIN ourselves), WAL, with our pragmas.

    Automatic checkpoints are off here: only the buffer's writer connection turns them on,
    with a large threshold, so that fsyncs stay at one per commit plus a few per checkpoint.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=" + ("FULL" if sync == "full" else "NORMAL"))
        conn.execute("PRAGMA wal_autocheckpoint=0")
    except sqlite3.Error as exc:
        raise BufferError(f"cannot open the buffer database {path}: {exc}") from exc
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The one place that knows transactions: BEGIN IMMEDIATE, COMMIT, or ROLLBACK on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def bump(conn: sqlite3.Connection, counts: Mapping[str, int]) -> None:
    """Add to persistent counters; call inside a transaction."""
    conn.executemany(
        "INSERT INTO counters(name, value) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        [(name, n) for name, n in counts.items() if n],
    )


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database file that hold data (pages in use, not the free list)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def file_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database file (pages in use and free), without the WAL."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(conn.execute("PRAGMA page_count").fetchone()[0] * page_size)


def schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        return None
    return int(row[0]) if row else None


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


def _create_v1(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.table("schemas").create({"id": int, "signature": str}, pk="id", if_not_exists=True)
    db.table("readings").create(
        {"id": int, "datasource_id": str, "schema_id": int, "created": float, "record": str},
        pk="id",
        not_null={"datasource_id", "schema_id", "created", "record"},
        if_not_exists=True,
    )
    db.table("dead_letters").create(
        {
            "id": int,
            "datasource_id": str,
            "record": str,
            "status": int,
            "reason": str,
            "failed_at": float,
            "attempts": int,
            "origin": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db.table("counters").create({"name": str, "value": int}, pk="name", if_not_exists=True)
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS schemas_signature ON schemas(signature)")
    db.execute(
        "CREATE INDEX IF NOT EXISTS readings_batch ON readings(datasource_id, schema_id, id)"
    )


def _migrate_1_to_2(db: sqlite_utils.Database) -> None:
    db.table("held").create(
        {
            "id": int,
            "datasource_id": str,
            "schema_id": int,
            "created": float,
            "record": str,
            "mono": float,
            "boot": str,
        },
        pk="id",
        not_null={"datasource_id", "schema_id", "created", "record", "mono", "boot"},
        if_not_exists=True,
    )


# Step n turns a version-n file into version n+1. A new file runs them all.
_MIGRATIONS = {1: _migrate_1_to_2}


def create_or_migrate(conn: sqlite3.Connection) -> int | None:
    """Bring the file to SCHEMA_VERSION; returns the version it had (None: it was new)."""
    version = schema_version(conn)
    if version is not None and version > SCHEMA_VERSION:
        raise BufferError(
            f"the buffer database was written by a newer agent (schema {version}, this agent "
            f"knows {SCHEMA_VERSION}); upgrade the agent, or move the database aside to start "
            "a new one (its pending readings stay in the moved file)"
        )
    # Imported here: only creating or migrating a file needs it, and it costs every CLI
    # command ~50 ms of start-up (click, dateutil, tabulate...) when imported at the top.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    with transaction(conn):
        current = version
        if current is None:
            _create_v1(db)
            current = 1
        while current < SCHEMA_VERSION:
            _MIGRATIONS[current](db)
            current += 1
        set_meta(conn, "schema_version", str(SCHEMA_VERSION))
    if version is not None and version < SCHEMA_VERSION:
        log.info("buffer: migrated the database from schema %d to %d", version, SCHEMA_VERSION)
    return version


def open_checked(path: Path, sync: str) -> Path | None:
    """Create, check and migrate the file; returns where a broken file was moved, if it was.

    A newer schema is not "broken": that error goes to the caller, and the file is kept.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BufferError(
            f"cannot create the data directory {path.parent}: {exc.strerror}; "
            "create it and make it writable by the agent, or set [agent] data_dir"
        ) from None
    problem = _check(path, sync)
    moved = None
    if problem is not None:
        moved = _move_aside(path, problem)
        problem = _check(path, sync)
        if problem is not None:
            raise BufferError(f"cannot create a new buffer database at {path}: {problem}")
    return moved


def _check(path: Path, sync: str) -> str | None:
    """None when the file is usable (after creating or migrating it), else what is wrong."""
    try:
        conn = connect(path, sync)
    except BufferError as exc:
        if isinstance(exc.__cause__, sqlite3.DatabaseError) and not _is_access_error(exc):
            return str(exc.__cause__)
        raise
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            return f"quick_check: {result}"
        create_or_migrate(conn)
    except BufferError:
        raise
    except sqlite3.DatabaseError as exc:
        if _is_access_error(exc):
            raise BufferError(f"cannot use the buffer database {path}: {exc}") from exc
        return str(exc)
    finally:
        conn.close()
    return None


def _is_access_error(exc: BaseException) -> bool:
    """Errors of permissions, a full disk or a busy file: moving the file aside would not help."""
    text = str(exc.__cause__ or exc).lower()
    return any(
        word in text for word in ("readonly", "read-only", "permission", "disk is full", "locked")
    )


def _move_aside(path: Path, problem: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.replace(target.with_name(target.name + suffix))
    log.error(
        "buffer: the database %s is damaged (%s); moved it to %s and started a new one. "
        "Readings in the moved file are not uploaded; `edge-agent buffer export` on a copy "
        "may recover some",
        path,
        problem,
        target,
    )
    return target
