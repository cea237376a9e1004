"""The SQLite buffer: every accepted reading lives here until it is delivered or dead-lettered.

Tables (schema version in `meta`):
    readings      pending readings, oldest first (rowid order), with their data source and
                  record schema, so a batch is one data source and one schema
    schemas       record signatures (sorted keys and JSON types) -> small integer ids
    dead_letters  records the server refused, with its status and message
    counters      persistent counts: dropped readings by reason and data source, and more
    meta          schema version and other facts about this database

Writes of new readings go through one writer thread (`Buffer`) that gathers everything put
within `commit_interval_ms` into one transaction: one fsync per interval however many
readings arrive. A reading is accepted when that transaction commits; `put`'s `on_durable`
callback fires then (the MQTT source acknowledges the broker there). Readers and settlers
(the uploader, the `buffer` commands) use their own `BufferSession`, one connection each;
WAL mode lets them work while the writer commits.

Size: the database file never grows past `max_bytes` less a reserve for the WAL by more than
one commit; `when_full` decides which readings go, and each one is counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_agent.clock import Clock, SystemClock, utc_stamp
from edge_agent.config import BufferConfig
from edge_agent.errors import BufferError, EdgeAgentError
from edge_agent.records import Reading

log = logging.getLogger("edge_agent.buffer")

SCHEMA_VERSION = 1
# How many uncommitted readings may wait for the writer before `put` blocks: bounds memory
# when the disk is slow, and slows the sources (TCP flow control for MQTT) instead.
MAX_INTAKE = 50_000
_BUSY_TIMEOUT_MS = 30_000


def signature(record: dict[str, Any]) -> str:
    """Keys and JSON value types of a record: two records share a batch only if these match."""
    return ",".join(f"{k}:{_json_type(v)}" for k, v in sorted(record.items()))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int | float):
        return "n"
    if isinstance(value, str):
        return "s"
    if value is None:
        return "z"
    return "o" if isinstance(value, dict) else "a"


def connect(path: Path, sync: str = "full") -> sqlite3.Connection:
    """A connection in autocommit mode (we BEGIN ourselves), WAL, with our pragmas."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True, timeout=30)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=" + ("FULL" if sync == "full" else "NORMAL"))
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


def create_schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    version = _schema_version(conn)
    if version is not None and version > SCHEMA_VERSION:
        raise BufferError(
            f"the buffer database was written by a newer agent (schema {version}, this agent "
            f"knows {SCHEMA_VERSION}); upgrade the agent, or move the database aside"
        )
    with transaction(conn):
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
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS schemas_signature ON schemas(signature)")
        conn.execute(
            "CREATE INDEX IF NOT EXISTS readings_batch ON readings(datasource_id, schema_id, id)"
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )


def _schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        return None
    return int(row[0]) if row else None


def bump(conn: sqlite3.Connection, counts: dict[str, int]) -> None:
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


def wal_reserve(max_bytes: int) -> int:
    """Part of `max_bytes` kept for the WAL file; the database gets the rest."""
    return min(max_bytes // 4, 16 * 1024 * 1024)


# A reading as the writer stores it: data source, record signature, record JSON.
Row = tuple[str, str, str]


@dataclass
class _Pending:
    rows: list[Row]
    on_durable: Callable[[], None] | None


@dataclass(frozen=True)
class BatchRow:
    id: int
    record: str  # the JSON text, sent as is


@dataclass(frozen=True)
class Batch:
    datasource_id: str
    schema_id: int
    rows: tuple[BatchRow, ...]
    oldest_created: float

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.rows]

    @property
    def nbytes(self) -> int:
        return sum(len(r.record) for r in self.rows)

    def split(self) -> tuple[Batch, Batch]:
        half = len(self.rows) // 2
        return (
            Batch(self.datasource_id, self.schema_id, self.rows[:half], self.oldest_created),
            Batch(self.datasource_id, self.schema_id, self.rows[half:], self.oldest_created),
        )


class Buffer:
    """Owns the database file and the writer thread. Start once, close once."""

    def __init__(self, path: Path, config: BufferConfig, clock: Clock | None = None) -> None:
        self.path = path
        self.config = config
        self._clock = clock or SystemClock()
        self._cond = threading.Condition()
        self._intake: list[_Pending] = []
        self._intake_count = 0
        self._counts: Counter[str] = Counter()
        self._urgent = False
        self._stopping = False
        self._committed_seq = 0
        self._put_seq = 0
        self._thread: threading.Thread | None = None
        self._error: EdgeAgentError | None = None
        self._data_event = threading.Event()
        self._schema_ids = _SchemaIds()
        self.commits = 0
        self.dropped: Counter[str] = Counter()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create or check the database in the caller's thread (errors stop start-up)."""
        if self._thread is not None:
            raise RuntimeError("Buffer.open() called twice")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferError(
                f"cannot create the data directory {self.path.parent}: {exc.strerror}; "
                "create it and make it writable by the agent, or set [agent] data_dir"
            ) from None
        conn = connect(self.path, self.config.sync)
        try:
            create_schema(conn)
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"the buffer database {self.path} is unusable: {exc}") from exc
        finally:
            conn.close()
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was put, then stop the writer. Nothing put before close is lost."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- intake ----------------------------------------------------------------------------

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Queue readings for the next group commit; `on_durable` runs after it commits.

        Blocks while the intake is full (the writer is behind). Returns False if `timeout`
        passed first or the buffer is closing; the readings were then not taken. Raises
        ValueError for a record that is not JSON (NaN, a non-str key...): a caller's bug.
        """
        rows = [(r.datasource_id, signature(r.record), _dumps(r.record)) for r in readings]
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._intake_count >= MAX_INTAKE and not self._stopping:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._stopping:
                return False
            self._intake.append(_Pending(rows, on_durable))
            self._intake_count += len(rows)
            self._put_seq += 1
            if len(self._intake) == 1:
                self._cond.notify_all()
            return True

    def count(self, name: str, n: int = 1) -> None:
        """Add to a persistent counter with the next commit (no write of its own)."""
        with self._cond:
            self._counts[name] += n

    def commit_soon(self) -> None:
        """Commit what is queued now instead of at the end of the interval."""
        with self._cond:
            self._urgent = True
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything put so far is committed."""
        with self._cond:
            target = self._put_seq
            self._urgent = True
            self._cond.notify_all()
            return (
                self._cond.wait_for(
                    lambda: self._committed_seq >= target or self._thread_dead(), timeout
                )
                and not self._thread_dead()
            )

    def wait_for_data(self, timeout: float) -> bool:
        """Block until a commit added readings (or timeout); used by the uploader."""
        signalled = self._data_event.wait(timeout)
        self._data_event.clear()
        return signalled

    @property
    def error(self) -> EdgeAgentError | None:
        return self._error

    @property
    def alive(self) -> bool:
        return not self._thread_dead()

    def _thread_dead(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        conn = connect(self.path, self.config.sync)
        try:
            self._configure_wal(conn)
            while self._commit_next(conn):
                pass
        finally:
            conn.close()
            with self._cond:
                self._cond.notify_all()

    def _configure_wal(self, conn: sqlite3.Connection) -> None:
        reserve = wal_reserve(self.config.max_bytes)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA journal_size_limit={reserve}")
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, reserve // page_size // 4)}")

    def _take(self) -> tuple[list[_Pending], Counter[str], int] | None:
        interval = self.config.commit_interval_ms / 1000
        with self._cond:
            while not self._intake and not self._counts and not self._stopping:
                self._cond.wait()
            if not self._intake and not self._counts:
                return None
            deadline = time.monotonic() + interval
            while not self._stopping and not self._urgent:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken, self._intake = self._intake, []
            counts, self._counts = self._counts, Counter()
            self._urgent = False
            return taken, counts, self._put_seq

    def _commit_next(self, conn: sqlite3.Connection) -> bool:
        got = self._take()
        if got is None:
            return False
        taken, counts, seq = got
        rows = [row for p in taken for row in p.rows]
        try:
            self._commit(conn, rows, counts)
        except sqlite3.Error as exc:
            # Nothing was committed: requeue so the readings are not lost, and back off.
            self._schema_ids.forget()
            self._requeue(taken, counts)
            self._report_error(exc)
            time.sleep(1.0)
            return True
        self._schema_ids.keep()
        self._error = None
        with self._cond:
            self._intake_count -= len(rows)
            self._committed_seq = seq
            self._cond.notify_all()
        self.commits += 1
        if rows:
            self._data_event.set()
        for p in taken:
            if p.on_durable is not None:
                p.on_durable()
        return True

    def _requeue(self, taken: list[_Pending], counts: Counter[str]) -> None:
        with self._cond:
            self._intake[:0] = taken
            self._counts.update(counts)

    def _report_error(self, exc: sqlite3.Error) -> None:
        first = self._error is None
        self._error = BufferError(f"cannot write to the buffer {self.path}: {exc}")
        if first:
            log.error(
                "buffer: %s; readings stay queued in memory and the write is retried", self._error
            )

    def _commit(self, conn: sqlite3.Connection, rows: list[Row], counts: Counter[str]) -> None:
        now = self._clock.wall()
        budget = self.config.max_bytes - wal_reserve(self.config.max_bytes)
        with transaction(conn):
            if self.config.when_full == "drop_newest" and used_bytes(conn) >= budget:
                drops = Counter(f"dropped.buffer_full.{ds}" for ds, _, _ in rows)
                counts.update(drops)
                self._note_drops(drops, "the buffer is full (when_full = drop_newest)")
                rows = []
            ids = self._schema_ids
            conn.executemany(
                "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES (?,?,?,?)",
                [(ds, ids.get(conn, sig), now, text) for ds, sig, text in rows],
            )
            if self.config.when_full != "drop_newest":
                self._drop_oldest(conn, budget, counts)
            bump(conn, counts)

    def _drop_oldest(self, conn: sqlite3.Connection, budget: int, counts: Counter[str]) -> None:
        excess = used_bytes(conn) - budget
        if excess <= 0:
            return
        rows = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        if not rows:
            return
        # Free a little more than the excess (pages are shared by rows) so that we do not
        # drop a handful of rows at every commit once full.
        per_row = max(1.0, used_bytes(conn) / rows)
        n = min(rows, int((excess + budget // 50) / per_row) + 1)
        dropped = conn.execute(
            "SELECT datasource_id, count(*) FROM "
            "(SELECT datasource_id FROM readings ORDER BY id LIMIT ?) GROUP BY datasource_id",
            (n,),
        ).fetchall()
        conn.execute(
            "DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)", (n,)
        )
        drop_counts = Counter({f"dropped.buffer_full.{ds}": c for ds, c in dropped})
        counts.update(drop_counts)
        self._note_drops(drop_counts, "the buffer is full (when_full = drop_oldest)")

    def _note_drops(self, counts: Counter[str], why: str) -> None:
        total = sum(n for k, n in counts.items() if k.startswith("dropped."))
        if not total:
            return
        first = not self.dropped
        self.dropped.update({k: n for k, n in counts.items() if k.startswith("dropped.")})
        if first or sum(self.dropped.values()) % 10_000 < total:
            log.warning(
                "buffer: dropped %d readings because %s (%d so far); the uplink has been down "
                "too long for max_bytes = %d: raise [buffer] max_bytes or fix the uplink",
                total,
                why,
                sum(self.dropped.values()),
                self.config.max_bytes,
            )


class _SchemaIds:
    """Signature -> schema id for the writer, inserting new signatures as they appear.

    Ids learnt inside a transaction are kept only once it commits (`keep`), so a rollback
    never leaves an id in memory that the database does not have.
    """

    def __init__(self) -> None:
        self._known: dict[str, int] = {}
        self._new: dict[str, int] = {}

    def get(self, conn: sqlite3.Connection, sig: str) -> int:
        found = self._known.get(sig) or self._new.get(sig)
        if found is not None:
            return found
        row = conn.execute("SELECT id FROM schemas WHERE signature = ?", (sig,)).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO schemas(signature) VALUES (?) RETURNING id", (sig,)
            ).fetchone()
        self._new[sig] = int(row[0])
        return self._new[sig]

    def keep(self) -> None:
        self._known.update(self._new)
        self._new.clear()

    def forget(self) -> None:
        self._new.clear()


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass
class BufferStats:
    pending: dict[str, int] = field(default_factory=dict)
    pending_bytes: int = 0
    oldest_created: float | None = None
    dead_letters: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0


class BufferSession:
    """One thread's view of the buffer: batches out, settlements in, inspection."""

    def __init__(self, path: Path, sync: str = "full") -> None:
        if not path.exists():
            raise BufferError(f"no buffer database at {path}; has the agent run with this config?")
        self.path = path
        self.conn = connect(path, sync)

    def close(self) -> None:
        self.conn.close()

    def next_batch(
        self, max_records: int, max_bytes: int, exclude: frozenset[str] = frozenset()
    ) -> Batch | None:
        """The oldest pending reading's data source and schema, and the readings after it."""
        marks = ",".join("?" * len(exclude))
        head = self.conn.execute(
            f"SELECT id, datasource_id, schema_id, created FROM readings "
            f"WHERE datasource_id NOT IN ({marks}) ORDER BY id LIMIT 1",
            tuple(exclude),
        ).fetchone()
        if head is None:
            return None
        first_id, ds, schema_id, created = head
        rows: list[BatchRow] = []
        size = 0
        cur = self.conn.execute(
            "SELECT id, record FROM readings WHERE datasource_id = ? AND schema_id = ? AND id >= ? "
            "ORDER BY id LIMIT ?",
            (ds, schema_id, first_id, max_records),
        )
        for rid, record in cur:
            # Keep under the byte limit, but always send at least one record: a single
            # oversized record is the server's to refuse (413) and then dead-lettered.
            if rows and size + len(record) + 1 > max_bytes:
                break
            rows.append(BatchRow(rid, record))
            size += len(record) + 1
        cur.close()
        return Batch(ds, schema_id, tuple(rows), created)

    def ack(self, batch: Batch, extra_counts: dict[str, int] | None = None) -> None:
        """The batch was delivered: delete it."""
        with transaction(self.conn):
            self.conn.execute(
                "DELETE FROM readings WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(batch.ids),),
            )
            bump(
                self.conn,
                {"uploaded." + batch.datasource_id: len(batch.rows), **(extra_counts or {})},
            )

    def dead_letter(self, batch: Batch, status: int | None, reason: str, attempts: int) -> None:
        """The server refused these records for good: keep them aside with its reason."""
        now = time.time()
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO dead_letters(datasource_id, record, status, reason, failed_at, "
                "attempts, origin) VALUES (?,?,?,?,?,?, 'upload')",
                [
                    (batch.datasource_id, r.record, status, reason, now, attempts)
                    for r in batch.rows
                ],
            )
            self.conn.execute(
                "DELETE FROM readings WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(batch.ids),),
            )
            bump(self.conn, {"dead_letters." + batch.datasource_id: len(batch.rows)})

    def stats(self) -> BufferStats:
        st = BufferStats()
        for ds, n, nbytes in self.conn.execute(
            "SELECT datasource_id, count(*), sum(length(record)) "
            "FROM readings GROUP BY datasource_id"
        ):
            st.pending[ds] = n
            st.pending_bytes += nbytes
        row = self.conn.execute("SELECT created FROM readings ORDER BY id LIMIT 1").fetchone()
        st.oldest_created = row[0] if row else None
        st.dead_letters = self.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        st.counters = dict(self.conn.execute("SELECT name, value FROM counters ORDER BY name"))
        st.file_bytes = sum(
            p.stat().st_size
            for p in (self.path, self.path.with_name(self.path.name + "-wal"))
            if p.exists()
        )
        return st

    def dead_letters(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first, with the record parsed back into an object."""
        cur = self.conn.execute(
            "SELECT id, datasource_id, record, status, reason, failed_at, attempts "
            "FROM dead_letters ORDER BY id DESC LIMIT ?",
            (-1 if limit is None else limit,),
        )
        return [
            {
                "id": rid,
                "datasource_id": ds,
                "record": json.loads(record),
                "status": status,
                "reason": reason,
                "failed_at": utc_stamp(failed_at),
                "attempts": attempts,
            }
            for rid, ds, record, status, reason, failed_at, attempts in cur
        ]

    def pending_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM readings").fetchone()[0])
