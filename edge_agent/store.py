"""The buffer database file: its schema and migrations, its connections, and its recovery.

Over 600 lines on purpose: the schema, each migration to it and the recovery of a damaged
file are read together (a migration is only right against the schema it ends in), and that
runs at open; the rest is small helpers on one connection (transactions, meta, the
running totals) that the buffer's writer and readers share.

Schema history (the version is kept in `meta`):
    1   readings, schemas, dead_letters, counters, meta
    2   + held: readings stamped while the wall clock was not trusted, kept with their
          monotonic time and boot id until their timestamps can be corrected
    +   processor_state, windows (`_add_processor_state`, `_add_windows`): what processors
          commit with the readings (deadband's last values, aggregate windows still open);
          tables added where missing, readable by an older agent, which ignores them
    +   readings.priority, held.priority, index readings_drain (`_add_priority`): each
          reading's priority class (0 high, 1 normal, 2 low) and an index by priority and
          time of acceptance, so the uploader finds the head of each drain lane (high, live,
          backlog, low) and `drop_oldest` the oldest of a class in a few page reads however
          deep the backlog; added where missing with NOT NULL DEFAULT 1 (normal), which
          SQLite does without rewriting the rows: an older agent still reads and writes the
          file (its inserts get the default)

Running totals (`_add_pending_totals`, added to a file of any version at open):
    pending_totals  readings and bytes of records pending, per data source and schema
    row_counts      rows in `held` and in `dead_letters`
kept by SQLite triggers on those tables, so every statement that inserts, deletes or moves a
row updates them in its own transaction, whichever code (or older agent) runs it: the status
page, /healthz, /metrics and `buffer stats` read a few rows instead of counting a million.

File format: a new file is made with `auto_vacuum = INCREMENTAL`, so that the writer can give
freed pages back to the file system after a burst. That cannot be switched on in an existing
file: a file made by an older agent is rebuilt once at start (`VACUUM INTO` a file beside it,
then renamed over it), keeping every row. It is not a schema version: an older agent still
reads and writes the rebuilt file.

A newer agent migrates an older file in place, in one transaction, keeping every pending
reading. An older agent refuses a newer file. A file that SQLite itself reports as damaged
(SQLITE_CORRUPT, SQLITE_NOTADB, or a failed `PRAGMA quick_check`) is moved aside under a
timestamped name and a new one is made, so a corrupted SD card sector never turns into a
crash loop. Any other error (permissions, a read-only mount, a lock, a full disk) is an access
problem: the file is left alone and the error (`BufferAccessError`) names the path, the
user and the modes.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.clock import file_stamp
from edge_agent.errors import BufferAccessError, BufferStoreError

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger("edge_agent.buffer")

SCHEMA_VERSION = 2
# Priority classes as stored (`[[sources]] priority`): lower is sent first.
HIGH, NORMAL, LOW = 0, 1, 2
PRIORITIES = {"high": HIGH, "normal": NORMAL, "low": LOW}
BUSY_TIMEOUT_MS = 30_000
# SQLite's primary result codes that mean the file itself is damaged: only these (and a
# failed quick_check) move a file aside. Extended codes carry the primary one in the low byte.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_FULL = 13
_SQLITE_BUSY_OR_LOCKED = (5, 6)
_AUTO_VACUUM_INCREMENTAL = 2


def connect(path: Path, sync: str = "full") -> sqlite3.Connection:
    """A connection in autocommit mode (we BEGIN ourselves), WAL, with our pragmas.

    Automatic checkpoints are off here: only the buffer's writer connection turns them on,
    with a large threshold, so that fsyncs stay at one per commit plus a few per checkpoint.
    `auto_vacuum` takes effect only in a file that has no table yet (a new one); it must be
    set before `journal_mode`, which writes the file's first page.

    Raises BufferStoreError for a damaged file, BufferAccessError for anything else.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise open_error(path, exc) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=" + ("FULL" if sync == "full" else "NORMAL"))
        conn.execute("PRAGMA wal_autocheckpoint=0")
    except sqlite3.Error as exc:
        conn.close()
        raise open_error(path, exc) from exc
    return conn


def is_corrupt(exc: BaseException) -> bool:
    """SQLite says the file is damaged (not: cannot be opened, read or written)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def open_error(path: Path, exc: sqlite3.Error) -> BufferStoreError:
    """The error for a file that could not be opened or used: damaged, or out of reach."""
    if is_corrupt(exc):
        return BufferStoreError(f"the buffer database {path} is damaged: {exc}")
    return BufferAccessError(access_problem(path, exc, "open the buffer database"))


def access_problem(path: Path, exc: BaseException, doing: str) -> str:
    """Why `path` cannot be used, for a person: the error, who the agent runs as, who owns
    the directory and the files, the modes, a read-only mount, and what to do."""
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    directory = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    readonly = _read_only(directory)
    if code & 0xFF == _SQLITE_FULL:
        fix = "free disk space"
    elif code & 0xFF in _SQLITE_BUSY_OR_LOCKED:
        fix = "another process holds the database locked: stop it (`fuser` shows which)"
    elif readonly:
        fix = (
            "mount it read-write (a file system the kernel made read-only after errors needs "
            "its SD card checked: see `dmesg`), or set [agent] data_dir to a writable directory"
        )
    else:
        fix = (
            f"make {path.parent} and the buffer files in it writable by {_user()} (for example "
            f"`chown -R {_user()} {path.parent}`), or set [agent] data_dir to a writable "
            "directory"
        )
    files = [directory] + [
        p for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))) if p.exists()
    ]
    owners = "; ".join(_owner_and_mode(p) for p in files)
    mounted = " The file system is mounted read-only." if readonly else ""
    detail = getattr(exc, "strerror", None) or str(exc)
    return (
        f"cannot {doing} {path} ({detail}): the agent runs as user "
        f"{_user()} (uid {os.geteuid()}, gid {os.getegid()}); {owners}.{mounted} "
        f"The file was left as it is; {fix}"
    )


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _owner_and_mode(p: Path) -> str:
    try:
        st = p.stat()
    except OSError as exc:
        return f"{p}: {exc.strerror}"
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{p} is owned by {user}:{group}, mode {stat.filemode(st.st_mode)}"


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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


def _add_processor_state(conn: sqlite3.Connection) -> None:
    """Processor state by scope (`deadband/<source>/<metric>`) and key (a series)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS processor_state (scope TEXT NOT NULL, key TEXT NOT NULL, "
        "value TEXT NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID"
    )


def _add_windows(conn: sqlite3.Connection) -> None:
    """Open aggregate windows: running figures per series, metric and window (never sent).

    The value columns have no type, so that an integer stays an integer (a count, a min).
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS windows (datasource_id TEXT NOT NULL, series TEXT NOT NULL, "
        "metric TEXT NOT NULL, start REAL NOT NULL, window_s INTEGER NOT NULL, "
        "spec TEXT NOT NULL, n INTEGER NOT NULL, total REAL NOT NULL, low, high, "
        "first, first_at REAL NOT NULL, last, last_at REAL NOT NULL, "
        "PRIMARY KEY (datasource_id, series, metric, start, window_s))"
    )


def _add_priority(conn: sqlite3.Connection) -> None:
    """The priority class of each pending and held reading, and the drain index."""
    for table in ("readings", "held"):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "priority" not in columns:
            conn.execute(
                f"ALTER TABLE {table} ADD COLUMN priority INTEGER NOT NULL DEFAULT {NORMAL}"
            )
    conn.execute("CREATE INDEX IF NOT EXISTS readings_drain ON readings(priority, created)")


# Step n turns a version-n file into version n+1. A new file runs them all.
_MIGRATIONS = {1: _migrate_1_to_2}


# -- running totals ----------------------------------------------------------------------------

# Bytes of a record: its UTF-8 text (`length` of TEXT counts characters).
_RECORD_BYTES = "length(CAST({}.record AS BLOB))"

# One statement per row changed, in SQLite's C: measured at +0.6 us per reading inserted and
# per reading deleted (scripts/bench row 1e), against +0.3 us for counting in Python at each
# of the dozen places that insert or delete. Triggers also cover the places added later and
# an older agent writing the same file, and never disagree with the rows after a rollback.
_TOTALS_DDL = f"""
CREATE TABLE IF NOT EXISTS pending_totals (
    datasource_id TEXT NOT NULL,
    schema_id INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (datasource_id, schema_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS row_counts (name TEXT PRIMARY KEY, rows INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS pending_totals_insert AFTER INSERT ON readings BEGIN
    INSERT INTO pending_totals VALUES
        (NEW.datasource_id, NEW.schema_id, 1, {_RECORD_BYTES.format("NEW")})
    ON CONFLICT DO UPDATE SET readings = readings + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS pending_totals_delete AFTER DELETE ON readings BEGIN
    UPDATE pending_totals SET readings = readings - 1,
        bytes = bytes - {_RECORD_BYTES.format("OLD")}
    WHERE datasource_id = OLD.datasource_id AND schema_id = OLD.schema_id;
END;
CREATE TRIGGER IF NOT EXISTS pending_totals_update
AFTER UPDATE OF datasource_id, schema_id, record ON readings BEGIN
    UPDATE pending_totals SET readings = readings - 1,
        bytes = bytes - {_RECORD_BYTES.format("OLD")}
    WHERE datasource_id = OLD.datasource_id AND schema_id = OLD.schema_id;
    INSERT INTO pending_totals VALUES
        (NEW.datasource_id, NEW.schema_id, 1, {_RECORD_BYTES.format("NEW")})
    ON CONFLICT DO UPDATE SET readings = readings + 1, bytes = bytes + excluded.bytes;
END;
"""
_COUNTED_TABLES = ("held", "dead_letters")
_COUNT_DDL = """
CREATE TRIGGER IF NOT EXISTS row_counts_{0}_insert AFTER INSERT ON {0} BEGIN
    INSERT INTO row_counts VALUES ('{0}', 1) ON CONFLICT DO UPDATE SET rows = rows + 1;
END;
CREATE TRIGGER IF NOT EXISTS row_counts_{0}_delete AFTER DELETE ON {0} BEGIN
    UPDATE row_counts SET rows = rows - 1 WHERE name = '{0}';
END;
"""


def _add_pending_totals(conn: sqlite3.Connection) -> None:
    """Running totals of the pending readings (and of held rows and dead letters), kept by
    triggers; counted once from the rows when the tables are new. Idempotent; call inside
    the migration's transaction, so nothing is inserted between the count and the triggers.
    """
    new = not _has_table(conn, "pending_totals")
    # Statement by statement: executescript would COMMIT the caller's transaction.
    for statement in _statements(
        _TOTALS_DDL + "".join(_COUNT_DDL.format(t) for t in _COUNTED_TABLES)
    ):
        conn.execute(statement)
    if new:
        write_recount(conn)


def _statements(script: str) -> list[str]:
    """The statements of `script` (CREATE TRIGGER bodies hold semicolons of their own)."""
    out, part = [], ""
    for line in script.strip().splitlines():
        part += line + "\n"
        if sqlite3.complete_statement(part):
            out.append(part.strip())
            part = ""
    return out


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


# (datasource_id, schema_id) -> (readings, bytes); and table -> rows
Totals = tuple[dict[tuple[str, int], tuple[int, int]], dict[str, int]]


def kept_totals(conn: sqlite3.Connection) -> Totals:
    """The running totals as kept (pairs with no pending reading left out)."""
    pending = {
        (ds, schema): (n, size)
        for ds, schema, n, size in conn.execute(
            "SELECT datasource_id, schema_id, readings, bytes FROM pending_totals "
            "WHERE readings != 0 OR bytes != 0"
        )
    }
    rows = {t: 0 for t in _COUNTED_TABLES}
    rows.update(conn.execute("SELECT name, rows FROM row_counts"))
    return pending, rows


def counted_totals(conn: sqlite3.Connection) -> Totals:
    """The totals counted from the rows themselves: a full scan of each table."""
    pending = {
        (ds, schema): (n, size)
        for ds, schema, n, size in conn.execute(
            f"SELECT datasource_id, schema_id, count(*), sum({_RECORD_BYTES.format('readings')}) "
            "FROM readings GROUP BY datasource_id, schema_id"
        )
    }
    rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in _COUNTED_TABLES}
    return pending, rows


def write_recount(conn: sqlite3.Connection) -> None:
    """Replace the running totals by a full count (call inside a write transaction)."""
    pending, rows = counted_totals(conn)
    conn.execute("DELETE FROM pending_totals")
    conn.executemany(
        "INSERT INTO pending_totals VALUES (?, ?, ?, ?)",
        [(ds, schema, n, size) for (ds, schema), (n, size) in pending.items()],
    )
    conn.execute("DELETE FROM row_counts")
    conn.executemany("INSERT INTO row_counts VALUES (?, ?)", list(rows.items()))


def forget_empty_totals(conn: sqlite3.Connection) -> None:
    """Delete the totals of pairs with nothing pending (call inside a write transaction):
    a data source or schema that is gone does not stay in the table for ever."""
    conn.execute("DELETE FROM pending_totals WHERE readings = 0 AND bytes = 0")


def create_or_migrate(conn: sqlite3.Connection) -> int | None:
    """Bring the file to SCHEMA_VERSION; returns the version it had (None: it was new)."""
    version = schema_version(conn)
    if version is not None and version > SCHEMA_VERSION:
        raise BufferStoreError(
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
        _add_pending_totals(conn)
        _add_processor_state(conn)
        _add_windows(conn)
        _add_priority(conn)
        set_meta(conn, "schema_version", str(SCHEMA_VERSION))
    if version is not None and version < SCHEMA_VERSION:
        log.info("buffer: migrated the database from schema %d to %d", version, SCHEMA_VERSION)
    return version


def open_checked(path: Path, sync: str) -> Path | None:
    """Create, check, migrate and (once) rebuild the file; returns where a damaged file was
    moved, if it was.

    A newer schema is not "damaged": that error goes to the caller, and the file is kept. An
    access problem raises BufferAccessError and touches nothing.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BufferAccessError(
            access_problem(path, exc, "create the directory of the buffer database")
        ) from None
    problem = _check(path, sync)
    moved = None
    if problem is not None:
        moved = _move_aside(path, problem)
        problem = _check(path, sync)
        if problem is not None:
            raise BufferStoreError(f"cannot create a new buffer database at {path}: {problem}")
    rebuild_for_auto_vacuum(path, sync)
    return moved


def _check(path: Path, sync: str) -> str | None:
    """None when the file is usable (after creating or migrating it), else what is damaged.

    Only what SQLite reports as damage comes back; any other error raises BufferAccessError.
    """
    try:
        conn = connect(path, sync)
    except BufferAccessError:
        raise
    except BufferStoreError as exc:
        return str(exc.__cause__)
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            return f"quick_check: {result}"
        create_or_migrate(conn)
    except BufferStoreError:
        raise
    except sqlite3.DatabaseError as exc:
        if is_corrupt(exc):
            return str(exc)
        raise BufferAccessError(access_problem(path, exc, "use the buffer database")) from exc
    finally:
        conn.close()
    return None


def _move_aside(path: Path, problem: str) -> Path:
    stamp = file_stamp(time.time())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        for suffix in ("", "-wal", "-shm"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                src.replace(target.with_name(target.name + suffix))
    except OSError as exc:
        raise BufferAccessError(
            access_problem(path, exc, f"move aside the damaged ({problem}) buffer database")
        ) from None
    log.error(
        "buffer: the database %s is damaged (%s); moved it to %s and started a new one. "
        "Readings in the moved file are not uploaded; `edge-agent buffer export` on a copy "
        "may recover some",
        path,
        problem,
        target,
    )
    return target


# -- giving space back -----------------------------------------------------------------------


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def disk_bytes(path: Path) -> int:
    """Bytes the database takes on disk: the file, its WAL and its shared-memory index."""
    total = 0
    for p in (path, wal_path(path), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def free_pages(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def rebuild_for_auto_vacuum(path: Path, sync: str) -> bool:
    """Rebuild a file made without `auto_vacuum = INCREMENTAL` (by an older agent) so that
    freed pages can be given back; every row is kept. True if it was rebuilt.

    `VACUUM INTO` writes a compact copy beside the file (only the pages in use), which is
    then renamed over it: the file system briefly holds both. Without room for that the file
    is kept as it is (it works, it just cannot shrink) and the next start tries again. The
    connection holds an exclusive lock throughout, so no other process writes in between.
    """
    spare = path.with_name(path.name + ".rebuild")
    spare.unlink(missing_ok=True)  # left by a crash during an earlier rebuild
    conn = connect(path, sync)
    try:
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == _AUTO_VACUUM_INCREMENTAL:
            return False
        need = used_bytes(conn) + (1 << 20)
        fs = os.statvfs(path.parent)
        free = fs.f_bavail * fs.f_frsize
        if free < need:
            log.warning(
                "buffer: the database %s cannot give freed space back until it is rebuilt "
                "once, which needs %d bytes free beside it (there are %d); it works as it is, "
                "and the next start tries again",
                path,
                need,
                free,
            )
            return False
        log.info("buffer: rebuilding %s once so that it can give freed space back", path)
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        with transaction(conn):  # takes the exclusive lock, held until the connection closes
            pass
        conn.execute("VACUUM INTO ?", (str(spare),))
        _fsync(spare)
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError("the WAL could not be checkpointed")
        # Renamed while the lock is held; the old file's WAL is empty, so nothing of it can
        # be replayed onto the new file.
        os.replace(spare, path)
        _fsync(path.parent)
    except (sqlite3.Error, OSError) as exc:
        spare.unlink(missing_ok=True)
        log.warning(
            "buffer: could not rebuild %s to give freed space back (%s); it works as it is, "
            "and the next start tries again",
            path,
            exc,
        )
        return False
    finally:
        conn.close()
    log.info("buffer: rebuilt %s; freed pages are given back from now on", path)
    return True


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
