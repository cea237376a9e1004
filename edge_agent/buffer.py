"""The SQLite buffer: every accepted reading lives here until it is delivered or dead-lettered.

Tables (see store.py for the schema and its versions):
    readings      pending readings, oldest first (rowid order), with their data source and
                  record schema, so a batch is one data source and one schema
    held          readings stamped while the clock was not trusted: not sent until their
                  timestamps are corrected
    schemas       record signatures (sorted keys and JSON types) -> small integer ids
    dead_letters  records the server refused (or input a source could not read), with why
    counters      persistent counts: dropped readings by reason and data source, and more

Writes of new readings go through one writer thread (`Buffer`) that gathers everything put
within `commit_interval_ms` into one transaction: one fsync per interval however many
readings arrive. A reading is accepted when that transaction commits; `put`'s `on_durable`
callback fires then (the MQTT source acknowledges the broker there). Readers and settlers
(the uploader, the `buffer` commands) use their own `BufferSession`, one connection each;
WAL mode lets them work while the writer commits. The writer also checkpoints the WAL on
its own schedule and applies `max_age`.

Size: the database file never grows past `max_bytes` less a reserve for the WAL by more than
one commit, nor while free disk space is under `min_free_bytes`; `when_full` decides which
readings go, and each one is counted.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from edge_agent.clock import Clock, SystemClock, boot_id, utc_stamp
from edge_agent.config import BufferConfig
from edge_agent.errors import BufferError, EdgeAgentError
from edge_agent.records import RECORD_ENCODER, Reading
from edge_agent.records import signature as signature  # part of this module's interface
from edge_agent.store import (
    bump,
    connect,
    file_bytes,
    get_meta,
    open_checked,
    set_meta,
    transaction,
    used_bytes,
)

log = logging.getLogger("edge_agent.buffer")

# How many uncommitted readings may wait for the writer before `put` blocks: bounds memory
# when the disk is slow, and slows the sources (TCP flow control for MQTT) instead.
MAX_INTAKE = 50_000
# The writer checkpoints the WAL this often, or sooner when it passes half its reserve.
CHECKPOINT_INTERVAL_S = 60.0
# Housekeeping (max_age, the last known wall time) runs at most this often.
MAINTENANCE_INTERVAL_S = 30.0
# SQLite's `strftime` gives 'YYYY-MM-DDTHH:MM:SS.SSS': our stamp format less the 'Z'.
_RESTAMP = "strftime('%Y-%m-%dT%H:%M:%fZ', ?, 'unixepoch')"
_ENCODER = RECORD_ENCODER


def wal_reserve(max_bytes: int) -> int:
    """Part of `max_bytes` kept for the WAL file; the database gets the rest."""
    return min(max_bytes // 4, 32 * 1024 * 1024)


@dataclass
class _Pending:
    rows: list[Reading]
    on_durable: Callable[[], None] | None
    # A dead letter from a source: (datasource_id, record JSON, reason, origin).
    dead_letter: tuple[str, str, str, str] | None = None
    # The source can wait for room (MQTT: the broker keeps the message); others are dropped.
    can_wait: bool = False


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


@dataclass
class TimeFix:
    """Correct held readings: this boot's by `offset`, earlier boots' by estimate, flagged."""

    offset: float
    flag_field: str


class Buffer:
    """Owns the database file and the writer thread. Open once, close once."""

    def __init__(
        self,
        path: Path,
        config: BufferConfig,
        clock: Clock | None = None,
        *,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
    ) -> None:
        self.path = path
        self.config = config
        self._clock = clock or SystemClock()
        self._checkpoint_interval_s = checkpoint_interval_s
        self._maintenance_interval_s = maintenance_interval_s
        self._boot = boot_id()
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
        self._time_fix: TimeFix | None = None
        # Wall minus monotonic while the clock is trusted (the agent says when it is not).
        self._offset: float | None = self._clock.wall() - self._clock.monotonic()
        self._last_checkpoint = time.monotonic()
        self._last_maintenance = 0.0
        self.commits = 0
        self.checkpoints = 0
        self.full = False
        self.moved_aside: Path | None = None
        self.dropped: Counter[str] = Counter()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create, check or recover the database in the caller's thread, start the writer.

        Errors here stop start-up. A damaged file is moved aside (see store.open_checked).
        """
        if self._thread is not None:
            raise RuntimeError("Buffer.open() called twice")
        self.moved_aside = open_checked(self.path, self.config.sync)
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was put, then stop the writer. Nothing put before close is lost."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def newest_known_time(self) -> float | None:
        """The latest wall time this buffer has seen, for the clock's sanity check."""
        conn = connect(self.path, self.config.sync)
        try:
            row = conn.execute("SELECT max(created) FROM readings").fetchone()
            stored = get_meta(conn, "last_wall")
        finally:
            conn.close()
        times = [t for t in (row[0], float(stored) if stored else None) if t is not None]
        return max(times) if times else None

    # -- intake ----------------------------------------------------------------------------

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        timeout: float | None = None,
        can_wait: bool = False,
    ) -> bool:
        """Queue readings for the next group commit; `on_durable` runs after it commits.

        Blocks while the intake is full (the writer is behind). Returns False if `timeout`
        passed first or the buffer is closing; the readings were then not taken. With
        `can_wait`, a full buffer under `when_full = "block"` holds them back (and delays
        `on_durable`) instead of dropping them.
        """
        rows = list(readings)  # each knows its text and signature
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._intake_count >= MAX_INTAKE and not self._stopping:
                if self._error is not None and not can_wait:
                    # The disk refuses writes: count these as dropped rather than block a
                    # serial port, whose device would overflow its buffer uncounted.
                    self._counts.update(f"dropped.write_failed.{r.datasource_id}" for r in rows)
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._stopping:
                return False
            self._intake.append(_Pending(rows, on_durable, can_wait=can_wait))
            self._intake_count += len(rows)
            self._put_seq += 1
            if len(self._intake) == 1:
                self._cond.notify_all()
            return True

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        """Keep input a source could not read in `dead_letters`, with the next group commit.

        `record_text` is JSON text (it is read back as JSON); `origin` says where it came from,
        e.g. "mqtt:<topic>". `on_durable` runs after the commit. Returns False if closing.
        """
        pending = _Pending([], on_durable, (datasource_id, record_text, reason, origin))
        with self._cond:
            if self._stopping:
                return False
            self._intake.append(pending)
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

    def distrust_clock(self) -> None:
        """The clock is not trusted: readings stamped now are held, max_age pauses."""
        with self._cond:
            self._offset = None

    def fix_times(self, offset: float, flag_field: str) -> None:
        """The clock is trusted now: correct the held readings with the next commit."""
        with self._cond:
            self._offset = offset
            self._time_fix = TimeFix(offset, flag_field)
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
        """The writer: commit until closed. An unexpected error is logged with its traceback
        and the writer starts over on a new connection; what was queued stays queued."""
        backoff = 1.0
        while True:
            try:
                conn = connect(self.path, self.config.sync)
            except BufferError as exc:
                self._report(exc)
                if self._wait_or_stop(backoff):
                    break
                backoff = min(backoff * 2, 30.0)
                continue
            try:
                self._configure_wal(conn)
                while self._commit_next(conn):
                    self._maintain(conn)
                self._checkpoint(conn)
                break
            except Exception:
                log.exception("buffer: unexpected error in the writer; starting it over")
                if self._wait_or_stop(backoff):
                    break
            finally:
                conn.close()
        with self._cond:
            self._cond.notify_all()

    def _configure_wal(self, conn: sqlite3.Connection) -> None:
        """The writer checkpoints when the WAL holds 3/4 of its reserve (counted in frames by
        SQLite, not by file size), and on a timer; other connections never do. Rare
        checkpoints mean fewer fsyncs and fewer SD writes: a page changed by many commits is
        copied to the database once."""
        reserve = wal_reserve(self.config.max_bytes)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA journal_size_limit={reserve}")
        conn.execute(f"PRAGMA wal_autocheckpoint={max(64, reserve * 3 // 4 // page_size)}")

    def _wait_or_stop(self, seconds: float) -> bool:
        """Wait before a retry; True if closing with nothing left to write (give up)."""
        with self._cond:
            self._cond.wait(seconds)
            return self._stopping and not self._has_work()

    def _take(self) -> tuple[list[_Pending], Counter[str], TimeFix | None, int] | None:
        """What to commit next; waits up to the commit interval to gather more.

        Returns an empty take every few seconds when idle, so housekeeping still runs.
        None once stopping with nothing left.
        """
        interval = self.config.commit_interval_ms / 1000
        with self._cond:
            if not self._has_work():
                if self._stopping:
                    return None
                self._cond.wait(min(5.0, self._maintenance_interval_s))
            if self._has_work():
                deadline = time.monotonic() + interval
                while not self._stopping and not self._urgent:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            taken, self._intake = self._intake, []
            counts, self._counts = self._counts, Counter()
            fix, self._time_fix = self._time_fix, None
            self._urgent = False
            return taken, counts, fix, self._put_seq

    def _has_work(self) -> bool:
        return bool(self._intake or self._counts or self._time_fix)

    def _commit_next(self, conn: sqlite3.Connection) -> bool:
        got = self._take()
        if got is None:
            return False
        taken, counts, fix, seq = got
        if not taken and not counts and fix is None:
            return True
        waiting = self._hold_back(conn, taken)
        committing = [p for p in taken if p not in waiting]
        rows = [row for p in committing for row in p.rows]
        dead = [p.dead_letter for p in committing if p.dead_letter is not None]
        try:
            self._commit(conn, rows, counts, dead, fix)
        except sqlite3.Error as exc:
            # Nothing was committed: requeue so the readings are not lost, and back off.
            self._schema_ids.forget()
            self._requeue(taken, counts, fix)
            self._report_error(exc)
            time.sleep(1.0)
            return True
        self._schema_ids.keep()
        if self._error is not None:
            log.info("buffer: writing works again; intake resumed")
        self._error = None
        self._requeue(waiting, Counter(), None)
        with self._cond:
            self._intake_count -= len(rows)
            if not waiting:
                self._committed_seq = seq
            self._cond.notify_all()
        self.commits += 1
        if rows or fix:
            self._data_event.set()
        for p in committing:
            if p.on_durable is not None:
                p.on_durable()
        if waiting:
            # Room comes back only when the uploader deletes: look again in a moment.
            self._data_event.wait(0.5)
        return True

    def _hold_back(self, conn: sqlite3.Connection, taken: list[_Pending]) -> list[_Pending]:
        """Under `when_full = "block"`, what waits for room instead of being committed."""
        if self.config.when_full != "block" or not self._is_full(conn):
            return []
        return [p for p in taken if p.can_wait and p.rows]

    def _requeue(self, taken: list[_Pending], counts: Counter[str], fix: TimeFix | None) -> None:
        with self._cond:
            self._intake[:0] = taken
            self._counts.update(counts)
            if fix is not None and self._time_fix is None:
                self._time_fix = fix

    def _report_error(self, exc: sqlite3.Error) -> None:
        self._report(BufferError(f"cannot write to the buffer {self.path}: {exc}"))

    def _report(self, error: BufferError) -> None:
        first = self._error is None
        self._error = error
        if first:
            log.error(
                "buffer: %s; readings wait in memory (serial readings are dropped and counted "
                "once %d wait) and the write is retried every second; free disk space if the "
                "disk is full",
                self._error,
                MAX_INTAKE,
            )

    def _budget(self, conn: sqlite3.Connection) -> int:
        """Bytes the database file may use now: its share of max_bytes, or no growth at all
        while free disk space is under the floor."""
        budget = self.config.max_bytes - wal_reserve(self.config.max_bytes)
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return budget
        if st.f_bavail * st.f_frsize < self.config.min_free_bytes:
            budget = min(budget, file_bytes(conn))
        return budget

    def _is_full(self, conn: sqlite3.Connection) -> bool:
        return used_bytes(conn) >= self._budget(conn)

    def _commit(
        self,
        conn: sqlite3.Connection,
        rows: list[Reading],
        counts: Counter[str],
        dead: Sequence[tuple[str, str, str, str]],
        fix: TimeFix | None,
    ) -> None:
        now = self._clock.wall()
        with transaction(conn):
            budget = self._budget(conn)
            if self.config.when_full != "drop_oldest" and rows and used_bytes(conn) >= budget:
                drops = Counter(f"dropped.buffer_full.{r.datasource_id}" for r in rows)
                counts.update(drops)
                self._note_drops(drops, f"the buffer is full (when_full = {self.config.when_full})")
                rows = []
            self.full = used_bytes(conn) >= budget
            if fix is not None:
                self._release_held(conn, fix, now)
            self._insert(conn, rows, now)
            if self.config.when_full == "drop_oldest":
                self._drop_oldest(conn, budget, counts)
            if dead:
                conn.executemany(
                    "INSERT INTO dead_letters(datasource_id, record, status, reason, failed_at, "
                    "attempts, origin) VALUES (?, ?, NULL, ?, ?, 0, ?)",
                    [(ds, text, reason, now, origin) for ds, text, reason, origin in dead],
                )
            bump(conn, counts)

    def _insert(self, conn: sqlite3.Connection, rows: list[Reading], now: float) -> None:
        ids = self._schema_ids.lookup(conn, {r.signature for r in rows})
        offset = self._offset
        if all(r.mono is None for r in rows):  # the usual case: a trusted clock
            trusted, untrusted = rows, []
        else:
            trusted = [r for r in rows if r.mono is None]
            untrusted = [r for r in rows if r.mono is not None]
        insert_rows(
            conn,
            "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES ",
            [(r.datasource_id, ids[r.signature], now, r.text) for r in trusted],
        )
        if not untrusted:
            return
        if offset is not None:
            # Stamped before the clock was trusted, committed after: correct them now.
            conn.executemany(
                "INSERT INTO readings(datasource_id, schema_id, created, record) "
                f"VALUES (?, ?, ?, json_set(?, '$.timestamp', {_RESTAMP}))",
                [
                    (r.datasource_id, ids[r.signature], now, r.text, mono + offset)
                    for r in untrusted
                    if (mono := r.mono) is not None
                ],
            )
            return
        insert_rows(
            conn,
            "INSERT INTO held(datasource_id, schema_id, created, record, mono, boot) VALUES ",
            [
                (r.datasource_id, ids[r.signature], now, r.text, r.mono, self._boot)
                for r in untrusted
            ],
        )

    def _release_held(self, conn: sqlite3.Connection, fix: TimeFix, now: float) -> None:
        """Move held readings to the queue with corrected timestamps, oldest boot first.

        This boot's: monotonic time plus the trusted offset. Earlier boots' offsets are
        lost with them: estimate each as ending just before the next boot began, and flag
        the records so nobody mistakes the estimate for a measurement.
        """
        boots = conn.execute(
            "SELECT boot, max(mono), min(mono) FROM held GROUP BY boot ORDER BY max(id) DESC"
        ).fetchall()
        end = now - self._clock.monotonic()  # wall time when this boot began
        moves: list[tuple[str, float, str | None]] = []
        for boot, max_mono, min_mono in boots:
            if boot == self._boot:
                moves.append((boot, fix.offset, None))
                continue
            moves.append((boot, end - max_mono, fix.flag_field))
            end = end - (max_mono - min_mono) - 1.0
        counted: Counter[str] = Counter()
        for boot, offset, flag in reversed(moves):
            # json_set with the flag's path as NULL would drop nothing but also add nothing:
            # an exact correction sets the timestamp alone.
            conn.execute(
                "INSERT INTO readings(datasource_id, schema_id, created, record) "
                "SELECT datasource_id, schema_id, mono + ?1, "
                "CASE WHEN ?2 IS NULL THEN json_set(record, '$.timestamp', "
                "strftime('%Y-%m-%dT%H:%M:%fZ', mono + ?1, 'unixepoch')) "
                "ELSE json_set(record, '$.timestamp', "
                "strftime('%Y-%m-%dT%H:%M:%fZ', mono + ?1, 'unixepoch'), ?2, 'estimated') END "
                "FROM held WHERE boot = ?3 ORDER BY id",
                (offset, f"$.{flag}" if flag else None, boot),
            )
            for ds, n in conn.execute(
                "SELECT datasource_id, count(*) FROM held WHERE boot = ? GROUP BY 1", (boot,)
            ):
                counted[f"time_fixed.{'estimated' if flag else 'exact'}.{ds}"] += n
            conn.execute("DELETE FROM held WHERE boot = ?", (boot,))
        bump(conn, counted)
        if counted:
            log.info(
                "buffer: the clock is trusted now; corrected the timestamps of %d held readings "
                '(%d from earlier boots estimated and flagged %s = "estimated")',
                sum(counted.values()),
                sum(n for k, n in counted.items() if ".estimated." in k),
                fix.flag_field,
            )

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
        self._drop_first(conn, n, "buffer_full", counts)
        self._note_drops(counts, "the buffer is full (when_full = drop_oldest)")

    def _drop_first(
        self, conn: sqlite3.Connection, n: int, reason: str, counts: Counter[str]
    ) -> None:
        dropped = conn.execute(
            "SELECT datasource_id, count(*) FROM "
            "(SELECT datasource_id FROM readings ORDER BY id LIMIT ?) GROUP BY datasource_id",
            (n,),
        ).fetchall()
        conn.execute(
            "DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)", (n,)
        )
        counts.update({f"dropped.{reason}.{ds}": c for ds, c in dropped})

    def _note_drops(self, counts: Counter[str], why: str) -> None:
        new = {k: n for k, n in counts.items() if k.startswith("dropped.") and n}
        total = sum(new.values())
        if not total:
            return
        first = not self.dropped
        self.dropped.update(new)
        if first or sum(self.dropped.values()) % 10_000 < total:
            log.warning(
                "buffer: dropped %d readings because %s (%d so far); raise [buffer] max_bytes "
                "or max_age, free disk space, or fix the uplink",
                total,
                why,
                sum(self.dropped.values()),
            )

    # -- housekeeping ----------------------------------------------------------------------

    def _maintain(self, conn: sqlite3.Connection) -> None:
        """Checkpoint the WAL on a timer too (so an idle WAL is folded in); apply max_age;
        remember the wall time."""
        now = time.monotonic()
        if now - self._last_checkpoint >= self._checkpoint_interval_s:
            self._checkpoint(conn)
        if now - self._last_maintenance < self._maintenance_interval_s:
            return
        self._last_maintenance = now
        try:
            self._expire_and_note_time(conn)
        except sqlite3.Error as exc:
            self._report_error(exc)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        self._last_checkpoint = time.monotonic()
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("buffer: WAL checkpoint failed (%s); it is tried again later", exc)
            return
        self.checkpoints += 1

    def _expire_and_note_time(self, conn: sqlite3.Connection) -> None:
        wall = self._clock.wall()
        max_age = self.config.max_age_s
        counts: Counter[str] = Counter()
        with transaction(conn):
            if max_age is not None and self._offset_trusted():
                old = conn.execute(
                    "SELECT count(*) FROM readings WHERE id <= "
                    "(SELECT max(id) FROM readings WHERE created < ?)",
                    (wall - max_age,),
                ).fetchone()[0]
                if old:
                    self._drop_first(conn, old, "max_age", counts)
                    bump(conn, counts)
            set_meta(conn, "last_wall", repr(wall))
        self._note_drops(counts, f"they are older than max_age = {self.config.max_age}")

    def _offset_trusted(self) -> bool:
        # Ages are measured on the wall clock: never expire anything by a clock that is
        # known to be wrong (it would throw away a month of readings after a bad boot).
        return self._offset is not None


_ROWS_PER_INSERT = 128  # rows per multi-row INSERT: ~35 % less CPU than one INSERT per row


def insert_rows(conn: sqlite3.Connection, head: str, rows: list[tuple[Any, ...]]) -> None:
    """`head` ("INSERT INTO t(a, b) VALUES ") for each row, in order, with multi-row INSERTs.

    One statement per row would also take and give back Python's lock for every row; here the
    writer holds it once per _ROWS_PER_INSERT rows.
    """
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ",".join("?" * width) + ")"
    whole = len(rows) - len(rows) % _ROWS_PER_INSERT
    if whole:
        sql = head + ",".join([one] * _ROWS_PER_INSERT)
        for start in range(0, whole, _ROWS_PER_INSERT):
            conn.execute(sql, list(chain.from_iterable(rows[start : start + _ROWS_PER_INSERT])))
    if whole < len(rows):
        conn.executemany(head + one, rows[whole:])


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

    def lookup(self, conn: sqlite3.Connection, sigs: set[str]) -> dict[str, int]:
        """Signature -> schema id for each of `sigs` (new ones are inserted)."""
        return {sig: self.get(conn, sig) for sig in sigs}

    def keep(self) -> None:
        self._known.update(self._new)
        self._new.clear()

    def forget(self) -> None:
        self._new.clear()


@dataclass
class BufferStats:
    pending: dict[str, int] = field(default_factory=dict)
    pending_bytes: int = 0
    oldest_created: float | None = None
    dead_letters: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    held: int = 0  # readings waiting for a trusted clock

    def as_dict(self, max_bytes: int, now: float) -> dict[str, Any]:
        """The buffer's part of the status document (and of `buffer stats --json`)."""
        return {
            "pending": self.pending,
            "pending_total": sum(self.pending.values()),
            "pending_bytes": self.pending_bytes,
            "held": self.held,
            "oldest_age_s": None
            if self.oldest_created is None
            else max(0.0, now - self.oldest_created),
            "file_bytes": self.file_bytes,
            "max_bytes": max_bytes,
            "dead_letters": self.dead_letters,
            "counters": self.counters,
        }


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
        st.held = self.conn.execute("SELECT count(*) FROM held").fetchone()[0]
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

    def export_lines(self) -> Iterator[str]:
        """Pending and held readings as JSON lines `{"datasource_id": ..., "record": {...}}`.

        One read transaction, so a reading moved from `held` to `readings` meanwhile is
        exported once.
        """
        self.conn.execute("BEGIN")
        try:
            for table in ("readings", "held"):
                cur = self.conn.execute(f"SELECT datasource_id, record FROM {table} ORDER BY id")
                for ds, record in cur:
                    yield '{"datasource_id":' + json.dumps(ds) + ',"record":' + record + "}"
        finally:
            self.conn.execute("COMMIT")

    def import_room(self, config: BufferConfig) -> int:
        """Bytes the buffer takes before it is full, reckoned as the writer reckons it."""
        return max(0, _session_budget(self.conn, self.path, config) - used_bytes(self.conn))

    def import_lines(self, readings: Iterable[Exported], config: BufferConfig) -> Imported:
        """Queue exported readings, in order, while they fit; stop at the first that does not.

        Commits in chunks, each a fraction of the WAL reserve, so that neither the WAL nor the
        running agent's writer (which waits for each chunk) suffers from a large file. Each
        chunk is checked against the budget inside its transaction, where nobody else can
        write: no reading is queued past `max_bytes`, so the agent never drops what was
        just imported to make room. What did not fit is counted in the result, not queued.
        """
        done = Imported()
        reserve = wal_reserve(config.max_bytes)
        self.conn.execute(f"PRAGMA journal_size_limit={reserve}")
        schema_ids: dict[str, int] = {}
        chunks = _chunks(iter(readings), max(64 * 1024, reserve // 8))
        for chunk in chunks:
            with transaction(self.conn):
                taken = self._insert_fitting(chunk, config, schema_ids)
                bump(self.conn, Counter(f"imported.{r.datasource_id}" for r in chunk[:taken]))
            # Without a running agent nobody else checkpoints: fold each chunk in, so that
            # the WAL stays near one chunk instead of growing by the whole file.
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            done.add(chunk[:taken])
            if taken < len(chunk):
                done.refuse(chunk[taken:])
                for rest in chunks:  # read on, only to report them
                    done.refuse(rest)
                break
        return done

    def _insert_fitting(
        self, chunk: list[Exported], config: BufferConfig, schema_ids: dict[str, int]
    ) -> int:
        """Insert what of `chunk` fits the budget (call in a transaction); how many did."""
        budget = _session_budget(self.conn, self.path, config)
        now = time.time()
        rows = [
            (r.datasource_id, self._cached_schema_id(r, schema_ids), now, r.record) for r in chunk
        ]
        head = "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES "
        self.conn.execute("SAVEPOINT import_chunk")
        insert_rows(self.conn, head, rows)
        if used_bytes(self.conn) <= budget:
            self.conn.execute("RELEASE import_chunk")
            return len(rows)
        # It does not all fit: find exactly how much does, one reading at a time.
        self.conn.execute("ROLLBACK TO import_chunk")
        taken = 0
        for row in rows:
            self.conn.execute("SAVEPOINT import_row")
            insert_rows(self.conn, head, [row])
            if used_bytes(self.conn) > budget:
                self.conn.execute("ROLLBACK TO import_row")
                self.conn.execute("RELEASE import_row")
                break
            self.conn.execute("RELEASE import_row")
            taken += 1
        self.conn.execute("RELEASE import_chunk")
        return taken

    def _cached_schema_id(self, reading: Exported, cache: dict[str, int]) -> int:
        found = cache.get(reading.signature)
        if found is None:
            self.conn.execute(
                "INSERT OR IGNORE INTO schemas(signature) VALUES (?)", (reading.signature,)
            )
            row = self.conn.execute(
                "SELECT id FROM schemas WHERE signature = ?", (reading.signature,)
            ).fetchone()
            found = cache[reading.signature] = int(row[0])
        return found

    def move_datasource(self, source: str, target: str) -> int:
        """Send a data source's pending readings to another one (a fixed `datasource_id`)."""
        with transaction(self.conn):
            moved = 0
            for table in ("readings", "held"):
                moved += self.conn.execute(
                    f"UPDATE {table} SET datasource_id = ? WHERE datasource_id = ?",
                    (target, source),
                ).rowcount
            bump(self.conn, {f"moved.{source}.{target}": moved})
        return moved

    def drop_datasource(self, datasource_id: str) -> int:
        """Delete a data source's pending readings for good; counted as dropped by hand."""
        with transaction(self.conn):
            dropped = 0
            for table in ("readings", "held"):
                dropped += self.conn.execute(
                    f"DELETE FROM {table} WHERE datasource_id = ?", (datasource_id,)
                ).rowcount
            bump(self.conn, {f"dropped.by_operator.{datasource_id}": dropped})
        return dropped

    def pending_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM readings").fetchone()[0])

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> Requeued:
        """Move dead letters back into the readings, record unchanged, to be sent again.

        `ids` None means every dead letter that holds a record. They join the end of the
        queue. Their schema id is looked up or added here, in the same table the writer
        uses: ids are never deleted, so the writer's cache of them stays right. With `ids`
        it is all or nothing: an unknown id, or a dead letter that is not a record object
        (input a source could not read), moves none and is reported.
        """
        wanted = None if ids is None else sorted(set(ids))
        with transaction(self.conn):
            found = self.conn.execute(
                "SELECT id, datasource_id, record FROM dead_letters "
                "WHERE ?1 IS NULL OR id IN (SELECT value FROM json_each(?1)) ORDER BY id",
                (None if wanted is None else json.dumps(wanted),),
            ).fetchall()
            missing = sorted(set(wanted or ()) - {rid for rid, _, _ in found})
            movable = [(rid, ds, text) for rid, ds, text in found if _record_object(text)]
            unsendable = [rid for rid, _, text in found if not _record_object(text)]
            if wanted is not None and (missing or unsendable):
                return Requeued(0, missing, unsendable)
            now = time.time()
            self.conn.executemany(
                "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES (?,?,?,?)",
                [(ds, self._schema_id(text), now, text) for _, ds, text in movable],
            )
            self.conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps([rid for rid, _, _ in movable]),),
            )
            bump(self.conn, Counter(f"requeued.{ds}" for _, ds, _ in movable))
        return Requeued(len(movable), missing, unsendable)

    def _schema_id(self, record_text: str) -> int:
        sig = signature(json.loads(record_text))
        self.conn.execute("INSERT OR IGNORE INTO schemas(signature) VALUES (?)", (sig,))
        row = self.conn.execute("SELECT id FROM schemas WHERE signature = ?", (sig,)).fetchone()
        return int(row[0])

    def purge_dead_letters(self, older_than_s: float) -> int:
        """Delete dead letters that failed `older_than_s` ago or earlier; counted per source."""
        cutoff = time.time() - older_than_s
        with transaction(self.conn):
            gone = self.conn.execute(
                "SELECT datasource_id, count(*) FROM dead_letters WHERE failed_at <= ? "
                "GROUP BY datasource_id",
                (cutoff,),
            ).fetchall()
            self.conn.execute("DELETE FROM dead_letters WHERE failed_at <= ?", (cutoff,))
            bump(self.conn, {f"dead_letters_purged.{ds}": n for ds, n in gone})
        return sum(n for _, n in gone)


@dataclass(frozen=True)
class Requeued:
    """What `requeue_dead_letters` did: how many moved, and the ids it could not move."""

    moved: int
    missing: list[int]  # asked for, but no such dead letter
    unsendable: list[int]  # not a record object (input a source could not read)


def _record_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# -- the export format -----------------------------------------------------------------------

# A line of an export file longer than this is refused: bounds what import holds in memory.
MAX_EXPORT_LINE = 4 * 1024 * 1024
# Rows per import transaction at most (bytes are bounded too, by the WAL reserve).
_IMPORT_CHUNK_ROWS = 5_000


@dataclass(frozen=True)
class Exported:
    """One reading of an export file: one line of `buffer export`."""

    line: int
    datasource_id: str
    record: str  # the record's JSON text, as the buffer stores it
    signature: str

    @property
    def estimated_bytes(self) -> int:
        """Its room in the database, rounded up: the record, the data source in the row and
        in the batch index, the row's overhead (a 119-byte record takes 168, measured)."""
        return (len(self.record.encode()) + 2 * len(self.datasource_id.encode()) + 48) * 21 // 20


def parse_exported(line: int, raw: bytes) -> Exported:
    """One line of `buffer export` (without its line break); ValueError says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start + 1} of the line)") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply to be a record") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("datasource_id"), str)
        or not doc["datasource_id"].strip()
        or not isinstance(doc.get("record"), dict)
    ):
        raise ValueError('expected {"datasource_id": "...", "record": {...}}')
    try:
        record, sig = _ENCODER.encode(doc["record"]), signature(doc["record"])
    except RecursionError:
        raise ValueError("nested too deeply to be a record") from None
    return Exported(line, doc["datasource_id"], record, sig)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number, and the API refuses it")


@dataclass
class Imported:
    """What `import_lines` did: readings queued and not queued, by line."""

    queued: Counter[str] = field(default_factory=Counter)  # by data source
    queued_lines: tuple[int, int] | None = None  # first and last line queued
    not_queued: int = 0
    not_queued_lines: tuple[int, int] | None = None

    def add(self, readings: list[Exported]) -> None:
        if readings:
            self.queued.update(r.datasource_id for r in readings)
            first = readings[0].line if self.queued_lines is None else self.queued_lines[0]
            self.queued_lines = (first, readings[-1].line)

    def refuse(self, readings: list[Exported]) -> None:
        if readings:
            self.not_queued += len(readings)
            first = readings[0].line if self.not_queued_lines is None else self.not_queued_lines[0]
            self.not_queued_lines = (first, readings[-1].line)


def _chunks(readings: Iterator[Exported], max_bytes: int) -> Iterator[list[Exported]]:
    chunk: list[Exported] = []
    size = 0
    for r in readings:
        chunk.append(r)
        size += len(r.record)
        if size >= max_bytes or len(chunk) >= _IMPORT_CHUNK_ROWS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _session_budget(conn: sqlite3.Connection, path: Path, config: BufferConfig) -> int:
    """The writer's budget (`Buffer._budget`) for a session: `max_bytes` less the WAL
    reserve, and no growth while free disk space is under `min_free_bytes`."""
    budget = config.max_bytes - wal_reserve(config.max_bytes)
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return budget
    if st.f_bavail * st.f_frsize < config.min_free_bytes:
        budget = min(budget, file_bytes(conn))
    return budget
