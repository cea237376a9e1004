"""The SQLite buffer: every accepted reading lives here until it is delivered or dead-lettered.

Over 600 lines on purpose, for now: the writer (`Buffer`) and the readers and settlers
(`BufferSession`) share the batch types, the disk budget, row insertion and the schema ids in
both directions, so cutting `BufferSession` out would need a third module for those and still
leave two modules over 600 lines. In order: `DiskBudget`, the batch types, the writer
(`Buffer`), the figures (`BufferStats`, `Recount`), `BufferSession`, then export and import.

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

Size (see `DiskBudget`): the database file, its WAL and its index together stay within
`max_bytes` whatever the input rate. One transaction adds at most `commit_bytes`, so a flood
becomes a run of bounded commits; `when_full` is applied before a commit could overshoot (it
decides which readings go, and each one is counted); the WAL is checkpointed passively at half
its reserve, and truncated (waiting for readers) before it could leave it; freed pages go back
to the file system after a burst (`auto_vacuum = INCREMENTAL`). While free disk space is under
`min_free_bytes`, the file does not grow at all.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from edge_agent.clock import Clock, SystemClock, boot_id, sql_utc_stamp, utc_stamp
from edge_agent.config import BufferConfig
from edge_agent.errors import BufferAccessError, BufferStoreError, EdgeAgentError
from edge_agent.processors.durable import GRACE_S, Carried, Windows, load_state, save_state
from edge_agent.records import RECORD_ENCODER, Reading
from edge_agent.records import signature as signature  # part of this module's interface
from edge_agent.store import (
    BUSY_TIMEOUT_MS,
    HIGH,
    LOW,
    NORMAL,
    Totals,
    access_problem,
    bump,
    connect,
    counted_totals,
    disk_bytes,
    file_bytes,
    forget_empty_totals,
    free_pages,
    get_meta,
    is_corrupt,
    kept_totals,
    open_checked,
    set_meta,
    transaction,
    used_bytes,
    wal_path,
    write_recount,
)

log = logging.getLogger("edge_agent.buffer")

# How many uncommitted readings may wait for the writer before `put` blocks: bounds memory
# when the disk is slow, and slows the sources (TCP flow control for MQTT) instead.
MAX_INTAKE = 50_000
# The writer checkpoints the WAL this often, or sooner when it passes half its reserve.
CHECKPOINT_INTERVAL_S = 60.0
# Housekeeping (max_age, the last known wall time) runs at most this often.
MAINTENANCE_INTERVAL_S = 30.0
_RESTAMP = sql_utc_stamp("?7")
_FIXED = sql_utc_stamp("mono + ?1")  # a held reading's time: its monotonic + the boot's offset
_ENCODER = RECORD_ENCODER


# Bytes SQLite adds to a reading's JSON and data source id (row header, rowid, time, schema,
# index entry): 31-34 measured. `_stored_bytes` is an estimate that the writer corrects by
# what its commits really take (`Buffer._ratio`).
_ROW_OVERHEAD = 40
# Freed pages are given back once they are more than this and a quarter of the file: fewer
# would be taken again by the next commits anyway.
_SHRINK_MIN_BYTES = 256 * 1024
# A shrink runs at most this long before the writer commits again; it runs once no reading
# was committed for _SHRINK_QUIET_S, or under a steady stream once per _SHRINK_PAUSE_S.
_SHRINK_SLICE_S = 0.25
_SHRINK_QUIET_S = 1.0
_SHRINK_PAUSE_S = 5.0


_DROP_ROUNDS = 6  # drop_oldest: rounds of dropping before a commit is cut to fit


def wal_reserve(max_bytes: int) -> int:
    """Part of `max_bytes` kept for the WAL file and its index; the database gets the rest."""
    return min(max_bytes // 4, 32 * 1024 * 1024)


@dataclass(frozen=True)
class DiskBudget:
    """How `max_bytes` is shared between the database file and its WAL (README "Sizing").

    The WAL and its index get `wal_reserve`. One transaction may add at most `commit_bytes` of
    readings (an eighth of the reserve); its WAL frames take up to twice that (the pages it
    fills and those its drops change), and that is all the WAL grows between two looks at it.
    The writer checkpoints passively at half the reserve and truncates the WAL (waiting for
    readers) once its file passes `wal_limit`, which leaves room for one and a half such
    commits and the index. The pages in use in the database stay under `database`, which
    leaves half a commit for estimates that come out low: the database file never grows past
    `max_bytes` less the reserve.
    """

    max_bytes: int

    @property
    def wal_reserve(self) -> int:
        return wal_reserve(self.max_bytes)

    @property
    def commit_bytes(self) -> int:
        return self.wal_reserve // 8

    @property
    def wal_checkpoint_at(self) -> int:
        return self.wal_reserve // 2

    @property
    def wal_limit(self) -> int:
        # The WAL index (-shm) takes 32 KiB per 4096 frames.
        shm = 32 * 1024 * (self.wal_reserve // (4096 * 4096) + 1)
        return self.wal_reserve - 3 * self.commit_bytes - shm

    @property
    def database(self) -> int:
        return self.max_bytes - self.wal_reserve - self.commit_bytes // 2


def _stored_bytes(r: Reading) -> int:
    """About what a reading takes in the database (before the writer's correction)."""
    text = r.text
    size = len(text) if text.isascii() else len(text.encode())
    return size + len(r.datasource_id) + _ROW_OVERHEAD


@dataclass
class _Pending:
    rows: list[Reading]
    on_durable: Callable[[], None] | None
    # A dead letter from a source: (datasource_id, record JSON, reason, origin).
    dead_letter: tuple[str, str, str, str] | None = None
    # The source can wait for room (MQTT: the broker keeps the message); others are dropped.
    can_wait: bool = False
    seq: int = 0  # the put's number: flush() waits for everything up to a number
    nbytes: int = 0  # estimated stored bytes (`_stored_bytes`)
    # What processors commit with the rows (processors/durable.py).
    carried: Carried | None = None

    @property
    def items(self) -> int:
        """Readings and window values: what counts against MAX_INTAKE."""
        return len(self.rows) + (len(self.carried.windows) if self.carried else 0)

    def split(self, room: float, at_least_one: bool) -> tuple[_Pending, _Pending]:
        """Its first rows that fit in `room`, and the rest: the callback and what processors
        carried go with the rest, so they take effect once every row is committed."""
        sizes = [_stored_bytes(r) for r in self.rows]
        n, total = 0, 0
        while n < len(sizes) and (total + sizes[n] <= room or (n == 0 and at_least_one)):
            total += sizes[n]
            n += 1
        head = _Pending(self.rows[:n], None, None, self.can_wait, self.seq, total)
        rest = _Pending(
            self.rows[n:],
            self.on_durable,
            None,
            self.can_wait,
            self.seq,
            self.nbytes - total,
            self.carried,
        )
        return head, rest


@dataclass
class _Plan:
    """What one commit does with what it took."""

    rows: list[Reading] = field(default_factory=list)  # to insert
    dead: list[tuple[str, str, str, str]] = field(default_factory=list)  # to insert
    done: list[_Pending] = field(default_factory=list)  # settled: their callbacks run
    waiting: list[_Pending] = field(default_factory=list)  # held back for room ("block")
    drops: Counter[str] = field(default_factory=Counter)
    refusing: bool = False  # full: refuse until there is room again
    carried: list[Carried] = field(default_factory=list)  # to commit

    def settle(self, pending: _Pending, kept: _Pending) -> None:
        """`pending` is settled; `kept` is what of it is inserted (all, or its first rows)."""
        self.done.append(pending)
        self.rows += kept.rows
        if pending.dead_letter is not None and kept is pending:
            self.dead.append(pending.dead_letter)
        if pending.carried is not None:
            if kept is pending:
                self.carried.append(pending.carried)
            else:
                self.drops.update(
                    f"dropped.buffer_full.{e.key.datasource_id}" for e in pending.carried.windows
                )


# Beyond any time of acceptance: the open ends of a lane's range.
_FOREVER = 1e300


class Head(NamedTuple):
    """The first reading of a batch: where `batch_at` starts."""

    id: int
    datasource_id: str
    schema_id: int
    created: float


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
    # Why it was chosen (drain.py): "high", "live", "backlog" or "low".
    lane: str = "backlog"

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.rows]

    @property
    def nbytes(self) -> int:
        return sum(len(r.record) for r in self.rows)

    def split(self) -> tuple[Batch, Batch]:
        half = len(self.rows) // 2
        return (
            Batch(
                self.datasource_id, self.schema_id, self.rows[:half], self.oldest_created, self.lane
            ),
            Batch(
                self.datasource_id, self.schema_id, self.rows[half:], self.oldest_created, self.lane
            ),
        )


@dataclass
class TimeFix:
    """Correct held readings: this boot's by `offset`, earlier boots' by estimate, flagged.

    `quality`: how this boot's corrected readings are flagged (`uplink` when the offset came
    from the endpoint's Date), None for exact. It takes several commits when many readings
    are held: the writer keeps it until done."""

    offset: float
    flag_field: str
    quality: str | None = None
    # Worked out at the first commit, from every held reading: (boot, offset, quality or None).
    moves: list[tuple[str, float, str | None]] | None = None
    rows_per_commit: int = 0
    counted: Counter[str] = field(default_factory=Counter)  # moved so far, for the log line


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
        self.budget = DiskBudget(config.max_bytes)
        self._cond = threading.Condition()
        self._intake: deque[_Pending] = deque()
        self._intake_count = 0  # rows put and not yet committed (or dropped)
        self._intake_bytes = 0  # estimated bytes of the rows in `_intake`
        # What readings really take in the database over what `_stored_bytes` says: learnt
        # from each commit, up at once and down slowly. Records just over a third or half of
        # a page leave the rest of it empty: up to 2.
        self._ratio = 1.3
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
        self._time_fix_left: TimeFix | None = None  # writer only: held readings left to move
        self._windows = Windows()  # writer only: open aggregate windows
        # Wall minus monotonic while the clock is trusted (the agent says when it is not),
        # or the endpoint's time minus monotonic, with the flag readings stamped by it get.
        self._offset: float | None = self._clock.wall() - self._clock.monotonic()
        self._quality: tuple[str, str] | None = None  # (flag field, value)
        self._last_checkpoint = time.monotonic()
        self._last_maintenance = 0.0
        self._shrinking = False
        self._last_shrink = 0.0
        self._last_rows_at = 0.0  # when the last commit inserted readings
        self._refusing = False  # full under drop_newest or block: refusing until there is room
        # Under "block": what can wait (MQTT) and found no room, oldest first (writer only).
        self._waiting: deque[_Pending] = deque()
        self.commits = 0
        self.checkpoints = 0
        self.shrinks = 0  # incremental vacuum steps that gave pages back
        self.write_failures = 0  # failed attempts to write, over every incident
        self._incident_failures = 0
        self.full = False
        self.moved_aside: Path | None = None
        self.dropped: Counter[str] = Counter()
        # Data source -> priority class (store.HIGH, NORMAL, LOW) from `[[sources]] priority`;
        # replaced whole (never changed in place), so the writer reads it without a lock.
        self._priorities: dict[str, int] = {}

    def set_priorities(self, priorities: Mapping[str, int]) -> None:
        """Priority class by data source for readings committed from now on (normal for a
        data source not named). Readings already pending keep theirs."""
        self._priorities = dict(priorities)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create, check or recover the database in the caller's thread, start the writer.

        Errors here stop start-up. A damaged file is moved aside (see store.open_checked).
        """
        if self._thread is not None:
            raise RuntimeError("Buffer.open() called twice")
        self.moved_aside = open_checked(self.path, self.config.sync)
        conn = connect(self.path, self.config.sync)
        try:
            with transaction(conn):  # for the sessions, which write too (the uploader's acks)
                set_meta(conn, "wal_limit", str(self.budget.wal_limit))
        except sqlite3.Error as exc:
            problem = access_problem(self.path, exc, "write to the buffer database")
            raise BufferAccessError(problem) from exc
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
        carried: Carried | None = None,
    ) -> bool:
        """Queue readings for the next group commit; `on_durable` runs after it commits.

        Blocks while the intake is full (the writer is behind). Returns False if `timeout`
        passed first or the buffer is closing; the readings were then not taken. With
        `can_wait`, a full buffer under `when_full = "block"` holds them back (and delays
        `on_durable`) instead of dropping them. `carried`: what the source's processors
        commit with the readings, in the same transaction.
        """
        rows = list(readings)  # each knows its text and signature
        sizes = [_stored_bytes(r) for r in rows]
        too_large = self.budget.commit_bytes
        if any(n > too_large for n in sizes):
            rows, sizes = self._drop_too_large(rows, sizes, too_large)
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._intake_count >= MAX_INTAKE and not self._stopping:
                if self._error is not None and not can_wait:
                    # The disk refuses writes: count these as dropped rather than block a
                    # serial port, whose device would overflow its buffer uncounted.
                    self._counts.update(f"dropped.write_failed.{r.datasource_id}" for r in rows)
                    if carried is not None:
                        self._counts.update(
                            f"dropped.write_failed.{e.key.datasource_id}" for e in carried.windows
                        )
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._stopping:
                return False
            self._put_seq += 1
            extra = 0 if carried is None else carried.nbytes
            pending = _Pending(rows, on_durable, None, can_wait, self._put_seq, sum(sizes) + extra)
            pending.carried = carried
            self._queue(pending)
            return True

    def _queue(self, pending: _Pending) -> None:
        """Append to the intake; wake the writer for the first pending, or once the intake
        holds a whole commit (it need not wait for the end of the interval then)."""
        cap = self._commit_cap()
        before = self._intake_bytes
        self._intake.append(pending)
        self._intake_count += pending.items
        self._intake_bytes += pending.nbytes
        if len(self._intake) == 1 or before < cap <= self._intake_bytes:
            self._cond.notify_all()

    def _commit_cap(self) -> float:
        """Estimated bytes one commit may take from the intake."""
        return self.budget.commit_bytes / self._ratio

    def _drop_too_large(
        self, rows: list[Reading], sizes: list[int], limit: int
    ) -> tuple[list[Reading], list[int]]:
        """Readings larger than one commit may add cannot be kept within max_bytes: they are
        dropped and counted (raise max_bytes to keep them)."""
        kept = [(r, n) for r, n in zip(rows, sizes, strict=True) if n <= limit]
        drops = Counter(
            f"dropped.buffer_full.{r.datasource_id}"
            for r, n in zip(rows, sizes, strict=True)
            if n > limit
        )
        with self._cond:
            self._counts.update(drops)
            self._note_drops(
                drops,
                f"a reading is larger than one commit may add ({self.budget.commit_bytes} bytes: "
                "max_bytes / 32, or 4 MiB from max_bytes = 128 MiB on)",
            )
        return [r for r, _ in kept], [n for _, n in kept]

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
        size = len(record_text) + len(reason) + len(origin) + len(datasource_id) + _ROW_OVERHEAD
        dead: tuple[str, str, str, str] | None = (datasource_id, record_text, reason, origin)
        if size > self.budget.commit_bytes:
            drop = Counter({f"dropped.buffer_full.{datasource_id}": 1})
            self._note_drops(drop, "a dead letter is larger than one commit may add")
            dead, size = None, 0
        with self._cond:
            if self._stopping:
                return False
            if dead is None:
                self._counts.update(drop)
            self._put_seq += 1
            self._queue(_Pending([], on_durable, dead, False, self._put_seq, size))
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

    def fix_times(self, offset: float, flag_field: str, quality: str | None = None) -> None:
        """The clock is trusted now: correct the held readings with the next commit, and
        readings stamped meanwhile as they come; `quality` flags them (`uplink`)."""
        with self._cond:
            self._offset = offset
            self._quality = None if quality is None else (f"$.{flag_field}", quality)
            self._time_fix = TimeFix(offset, flag_field, quality)
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
        """The writer: commit until closed. A database error is reported once per incident
        and retried with backoff; an unexpected error is logged with its traceback and the
        writer starts over on a new connection. What was queued stays queued."""
        backoff = 1.0
        while True:
            try:
                conn = connect(self.path, self.config.sync)
            except BufferStoreError as exc:
                self._report(exc)
                if self._wait_or_stop(backoff):
                    break
                backoff = min(backoff * 2, 30.0)
                continue
            try:
                self._configure_wal(conn)
                self._windows.load(conn)
                while self._commit_next(conn):
                    self._maintain(conn)
                self._checkpoint(conn)
                break
            except sqlite3.Error as exc:
                self._report_error(exc)
                if self._wait_or_stop(backoff):
                    break
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("buffer: unexpected error in the writer; starting it over")
                if self._wait_or_stop(backoff):
                    break
            finally:
                conn.close()
        with self._cond:
            self._cond.notify_all()

    def _configure_wal(self, conn: sqlite3.Connection) -> None:
        """The writer checkpoints passively when the WAL holds half its reserve (counted in
        frames by SQLite, not by file size), and on a timer; other connections never do.
        Rare checkpoints mean fewer fsyncs and fewer SD writes: a page changed by many
        commits is copied to the database once. `_keep_wal_within` is the hard limit."""
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        frames = self.budget.wal_checkpoint_at // (page_size + 24)
        conn.execute(f"PRAGMA journal_size_limit={self.budget.wal_limit}")
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, frames)}")

    def _wait_or_stop(self, seconds: float) -> bool:
        """Wait before a retry; True if closing with nothing left to write (give up)."""
        with self._cond:
            self._cond.wait(seconds)
            return self._stopping and not self._has_work()

    def _take(self) -> tuple[list[_Pending], Counter[str], TimeFix | None] | None:
        """What to commit next: at most a commit's worth of the intake (`_cut`); waits up to
        the commit interval to gather more, unless a commit's worth is there already.

        Returns an empty take every few seconds when idle (a fifth of a second while giving
        pages back), so housekeeping still runs. None once stopping with nothing left.
        """
        interval = self.config.commit_interval_ms / 1000
        cap = self._commit_cap()
        with self._cond:
            if not self._has_work():
                if self._stopping:
                    return None
                self._cond.wait(self._idle_wait())
            if self._has_work():
                deadline = time.monotonic() + interval
                while not self._stopping and not self._urgent and self._intake_bytes < cap:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            taken = self._cut(cap)
            counts, self._counts = self._counts, Counter()
            fix, self._time_fix = self._time_fix, None
            self._urgent = False
            return taken, counts, fix

    def _idle_wait(self) -> float:
        if self._waiting:
            return 0.5  # room comes back only when the uploader deletes: look again soon
        if self._shrinking:
            return 0.2
        wait = min(5.0, self._maintenance_interval_s)
        due = self._windows.next_end()
        if due is not None and self._offset_trusted():  # wake to send the next window
            wait = min(wait, max(0.05, due + GRACE_S - self._clock.wall()))
        return wait

    def _cut(self, cap: float) -> list[_Pending]:
        """Take pendings from the front of the intake up to `cap` estimated bytes, splitting
        the one that does not fit (at least one reading is taken)."""
        taken: list[_Pending] = []
        size = 0
        while self._intake:
            first = self._intake[0]
            if size + first.nbytes <= cap or (not taken and len(first.rows) <= 1):
                taken.append(self._intake.popleft())
            elif first.rows:
                head, self._intake[0] = first.split(cap - size, at_least_one=not taken)
                if head.rows:
                    taken.append(head)
                self._intake_bytes -= head.nbytes
                break
            else:
                break
            size += first.nbytes
            self._intake_bytes -= first.nbytes
        return taken

    def _has_work(self) -> bool:
        return bool(self._intake or self._counts or self._time_fix)

    def _commit_next(self, conn: sqlite3.Connection) -> bool:
        got = self._take()
        if got is None:
            return False
        taken, counts, fix = got
        idle = not taken and not counts and fix is None and not self._waiting
        if idle and not self._windows_due():
            return True
        try:
            if not self._keep_wal_within(conn):
                raise sqlite3.OperationalError(
                    "the WAL is at its limit and another process keeps it from being "
                    "checkpointed (a long `edge-agent buffer export`?)"
                )
            plan = self._commit(conn, taken, counts, fix)
        except sqlite3.Error as exc:
            # Nothing was committed: requeue so the readings are not lost, and back off.
            self._time_fix_left = None
            self._schema_ids.forget()
            self._requeue(taken, counts, fix)
            self._report_error(exc)
            self._wait_or_stop(1.0)
            return True
        self._schema_ids.keep()
        self._windows.keep()
        self._recovered()
        self._continue_time_fix()
        self._refusing = plan.refusing
        self._waiting = deque(plan.waiting)
        with self._cond:
            self._intake_count -= sum(p.items for p in plan.done)
            firsts = [q[0].seq for q in (self._waiting, self._intake) if q]
            self._committed_seq = min(firsts) - 1 if firsts else self._put_seq
            self._cond.notify_all()
        self.commits += 1
        if plan.rows or fix:
            self._last_rows_at = time.monotonic()
            self._data_event.set()
        for p in plan.done:
            if p.on_durable is not None:
                p.on_durable()
        return True

    def _continue_time_fix(self) -> None:
        """Held readings are left to move: in the next commit, soon (unless a newer fix
        came meanwhile, which starts over from what is left)."""
        fix, self._time_fix_left = self._time_fix_left, None
        if fix is None:
            return
        with self._cond:
            if self._time_fix is None:
                self._time_fix = fix
            self._urgent = True

    def _requeue(self, taken: list[_Pending], counts: Counter[str], fix: TimeFix | None) -> None:
        with self._cond:
            self._intake.extendleft(reversed(taken))
            self._intake_bytes += sum(p.nbytes for p in taken)
            self._counts.update(counts)
            if fix is not None and self._time_fix is None:
                self._time_fix = fix

    def _report_error(self, exc: sqlite3.Error) -> None:
        if is_corrupt(exc):
            text = (
                f"the buffer database {self.path} is damaged ({exc}); restart the agent, "
                "which moves it aside and starts a new one"
            )
        else:
            text = access_problem(self.path, exc, "write to the buffer database")
        self._report(BufferStoreError(text))

    def _report(self, error: BufferStoreError) -> None:
        """Count a failed write; log the first of an incident (until writing works again)."""
        first = self._error is None
        self._error = error
        self.write_failures += 1
        self._incident_failures += 1
        if first:
            log.error(
                "buffer: %s; readings wait in memory (serial readings are dropped and counted "
                "once %d wait) and the write is retried every second",
                self._error,
                MAX_INTAKE,
            )

    def _recovered(self) -> None:
        if self._error is None:
            return
        log.info(
            "buffer: writing works again after %d failed attempts; intake resumed",
            self._incident_failures,
        )
        self.count("buffer.write_failures", self._incident_failures)
        self._error = None
        self._incident_failures = 0

    def _budget(self, conn: sqlite3.Connection) -> int:
        return _session_budget(conn, self.path, self.config)

    def _commit(
        self,
        conn: sqlite3.Connection,
        taken: list[_Pending],
        counts: Counter[str],
        fix: TimeFix | None,
    ) -> _Plan:
        """One transaction: held readings released, `when_full` applied to what was taken
        (and what waits for room) before anything is inserted, then what fits inserted."""
        now = self._clock.wall()
        with transaction(conn):
            if fix is not None and not self._release_held(conn, fix):
                self._time_fix_left = fix
            budget = self._budget(conn)
            plan = self._plan(conn, taken, budget)
            made: Counter[str] = Counter()  # not `counts`: a rollback requeues those
            plan.rows += self._commit_carried(conn, plan, now, made)
            before = used_bytes(conn)
            self._insert(conn, plan.rows, now)
            self._learn(used_bytes(conn) - before, plan.rows)
            if plan.dead:
                conn.executemany(
                    "INSERT INTO dead_letters(datasource_id, record, status, reason, failed_at, "
                    "attempts, origin) VALUES (?, ?, NULL, ?, ?, 0, ?)",
                    [(ds, text, reason, now, origin) for ds, text, reason, origin in plan.dead],
                )
            if self.config.when_full == "drop_oldest" and used_bytes(conn) > budget:
                # The estimate came out low: make up for it now.
                self._drop_oldest(conn, used_bytes(conn) - budget + budget // 50, plan.drops)
            bump(conn, counts + plan.drops + made)
        self.full = bool(plan.drops or plan.waiting)
        self._note_drops(plan.drops, f"the buffer is full (when_full = {self.config.when_full})")
        return plan

    def _commit_carried(
        self, conn: sqlite3.Connection, plan: _Plan, now: float, counts: Counter[str]
    ) -> list[Reading]:
        """What this commit's processors carried (deadband state, values for windows), and
        the windows due now: returns the aggregate readings (and late values) to insert."""
        self._windows.begin()
        save_state(conn, [row for c in plan.carried for row in c.state])
        entries = [e for c in plan.carried for e in c.windows]
        rows = self._windows.apply(conn, entries, counts) if entries else []
        if self._windows_due():
            rows += self._windows.close(conn, self._windows_until(now, plan), counts)
        return rows

    def _windows_due(self) -> bool:
        """An open window ended more than GRACE_S ago, and the clock is trusted."""
        due = self._windows.next_end()
        return due is not None and self._offset_trusted() and due + GRACE_S <= self._clock.wall()

    def _windows_until(self, now: float, plan: _Plan) -> float:
        """Windows that ended by this time may be sent: GRACE_S ago, and before the window
        of any value still waiting to be committed."""
        until = now - GRACE_S
        with self._cond:
            pendings = [*self._intake, *plan.waiting]
            ends = [p.carried.earliest_end() for p in pendings if p.carried is not None]
        hold = min((e for e in ends if e is not None), default=None)
        return until if hold is None else min(until, hold - 0.001)

    def read_state(self, scope: str) -> dict[str, str]:
        """The committed processor state of `scope` (a deadband reads its own at start)."""
        conn = connect(self.path, self.config.sync)
        try:
            return load_state(conn, scope)
        finally:
            conn.close()

    def _plan(self, conn: sqlite3.Connection, taken: list[_Pending], budget: int) -> _Plan:
        """Apply `when_full` before inserting: drop the oldest readings to make room, or keep
        what fits and drop the rest; under "block", what can wait (MQTT) waits for room in
        order, behind what waited before, while what cannot (serial) is kept or dropped."""
        ratio = self._ratio
        plan = _Plan()
        room: float = budget - used_bytes(conn)
        need = sum(p.nbytes for p in taken) * ratio
        if need > room and self.config.when_full == "drop_oldest":
            # Deleting rows frees fewer pages than their bytes (index pages stay partly
            # used): drop more of the oldest until the commit fits, rather than cut the
            # commit, which would drop new readings (of any priority) while older ones stay.
            extra = budget // 50
            for _ in range(_DROP_ROUNDS):
                self._drop_oldest(conn, need - room + extra, plan.drops)
                room = budget - used_bytes(conn)
                if need <= room:
                    break
                extra *= 2
        elif self._refusing and room < self.budget.commit_bytes:  # drop_newest, block
            # Once full, refuse until a commit's worth of room is back (the uploader deleted):
            # no reading slips in between refused ones, and the oldest survive as they were.
            room = 0
        # What waited joins only within a commit's worth (what came now was cut to one).
        allow: float = self.budget.commit_bytes
        blocking = self.config.when_full == "block"
        queued = (
            [*self._waiting, *(p for p in taken if p.can_wait and (p.rows or p.carried))]
            if blocking
            else []
        )
        for p in taken:
            if blocking and p.can_wait and (p.rows or p.carried):
                continue
            fits = p if p.nbytes * ratio <= room else p.split(room / ratio, False)[0]
            plan.drops.update(
                f"dropped.buffer_full.{r.datasource_id}" for r in p.rows[len(fits.rows) :]
            )
            if p.dead_letter is not None and fits is not p:
                plan.drops[f"dropped.buffer_full.{p.dead_letter[0]}"] += 1
            plan.settle(p, fits)
            room -= fits.nbytes * ratio
            allow -= fits.nbytes * ratio
        for i, p in enumerate(queued):
            size = p.nbytes * ratio
            if size > room or size > allow:
                plan.waiting = queued[i:]
                break
            plan.settle(p, p)
            room -= size
            allow -= size
        plan.refusing = self.config.when_full != "drop_oldest" and bool(plan.drops or plan.waiting)
        return plan

    def _learn(self, used: int, rows: list[Reading]) -> None:
        """Correct the estimate of what readings take by what this commit's took (only from
        commits large enough for pages to average out)."""
        estimate = sum(_stored_bytes(r) for r in rows)
        if estimate * self._ratio < 64 * 1024:
            return
        seen = used / estimate
        self._ratio = max(1.0, seen if seen > self._ratio else 0.9 * self._ratio + 0.1 * seen)

    def _insert(self, conn: sqlite3.Connection, rows: list[Reading], now: float) -> None:
        ids = self._schema_ids.lookup(conn, {r.signature for r in rows})
        offset = self._offset
        if all(r.mono is None for r in rows):  # the usual case: a trusted clock
            trusted, untrusted = rows, []
        else:
            trusted = [r for r in rows if r.mono is None]
            untrusted = [r for r in rows if r.mono is not None]
        priorities = self._priorities
        insert_rows(
            conn,
            "INSERT INTO readings(datasource_id, schema_id, created, record, priority) VALUES ",
            [
                (
                    r.datasource_id,
                    ids[r.signature],
                    now,
                    r.text,
                    priorities.get(r.datasource_id, NORMAL),
                )
                for r in trusted
            ],
        )
        if not untrusted:
            return
        if offset is not None:
            # Stamped before the clock was trusted, committed after, or stamped while the
            # endpoint's time stands in for the clock: correct (and flag) them now.
            path, value = self._quality or (None, None)
            conn.executemany(
                "INSERT INTO readings(datasource_id, schema_id, created, record, priority) VALUES "
                f"(?1, ?2, ?3, CASE WHEN ?5 IS NULL THEN json_set(?4, '$.timestamp', {_RESTAMP}) "
                f"ELSE json_set(?4, '$.timestamp', {_RESTAMP}, ?5, ?6) END, ?8)",
                [
                    (
                        r.datasource_id,
                        ids[r.signature],
                        now,
                        r.text,
                        path,
                        value,
                        mono + offset,
                        priorities.get(r.datasource_id, NORMAL),
                    )
                    for r in untrusted
                    if (mono := r.mono) is not None
                ],
            )
            return
        insert_rows(
            conn,
            "INSERT INTO held(datasource_id, schema_id, created, record, mono, boot, priority) "
            "VALUES ",
            [
                (
                    r.datasource_id,
                    ids[r.signature],
                    now,
                    r.text,
                    r.mono,
                    self._boot,
                    priorities.get(r.datasource_id, NORMAL),
                )
                for r in untrusted
            ],
        )

    def _release_held(self, conn: sqlite3.Connection, fix: TimeFix) -> bool:
        """Move held readings to the queue with corrected timestamps, oldest boot first, at
        most half a commit's worth per commit (both copies exist until the commit); True
        once none is left.

        This boot's: monotonic time plus the trusted offset (flagged `uplink` when it came
        from the endpoint). Earlier boots' offsets are lost with them: estimate each as
        ending just before the next boot began (never earlier than the truth), and flag
        the records so nobody mistakes the estimate for a measurement. The estimates are
        made once, from every held reading, before the first part moves.
        """
        if fix.moves is None:
            fix.moves = self._held_moves(conn, fix)
            fix.rows_per_commit = self._held_rows_per_commit(conn)
        limit = fix.rows_per_commit
        counted: Counter[str] = Counter()
        for boot, offset, quality in fix.moves:
            if limit <= 0:
                break
            # json_set with the flag's path as NULL would drop nothing but also add nothing:
            # an exact correction sets the timestamp alone.
            part = "SELECT * FROM held WHERE boot = ?3 ORDER BY id LIMIT ?4"
            conn.execute(
                "INSERT INTO readings(datasource_id, schema_id, created, record, priority) "
                "SELECT datasource_id, schema_id, mono + ?1, "
                f"CASE WHEN ?5 IS NULL THEN json_set(record, '$.timestamp', {_FIXED}) "
                f"ELSE json_set(record, '$.timestamp', {_FIXED}, ?2, ?5) END, priority "
                f"FROM ({part}) ORDER BY id",
                (offset, f"$.{fix.flag_field}", boot, limit, quality),
            )
            for ds, n in conn.execute(
                "SELECT datasource_id, count(*) FROM (SELECT datasource_id FROM held "
                "WHERE boot = ? ORDER BY id LIMIT ?) GROUP BY 1",
                (boot, limit),
            ):
                counted[f"time_fixed.{quality or 'exact'}.{ds}"] += n
            moved = conn.execute(
                "DELETE FROM held WHERE id IN (SELECT id FROM held WHERE boot = ? ORDER BY id "
                "LIMIT ?)",
                (boot, limit),
            ).rowcount
            limit -= moved
        bump(conn, counted)
        fix.counted.update(counted)
        left = conn.execute("SELECT count(*) FROM held").fetchone()[0]
        if not left and fix.counted:
            log.info(
                "buffer: the clock is trusted now; corrected the timestamps of %d held readings "
                '(%d from earlier boots estimated and flagged %s = "estimated"; %d by the '
                'endpoint\'s time, flagged %s = "uplink")',
                sum(fix.counted.values()),
                sum(n for k, n in fix.counted.items() if ".estimated." in k),
                fix.flag_field,
                sum(n for k, n in fix.counted.items() if ".uplink." in k),
                fix.flag_field,
            )
        return not left

    def _held_moves(
        self, conn: sqlite3.Connection, fix: TimeFix
    ) -> list[tuple[str, float, str | None]]:
        """(boot, offset, quality or None) for each boot with held readings, oldest first."""
        boots = conn.execute(
            "SELECT boot, max(mono), min(mono) FROM held GROUP BY boot ORDER BY max(id) DESC"
        ).fetchall()
        end = fix.offset  # true time when this boot began (its monotonic clock's zero)
        moves: list[tuple[str, float, str | None]] = []
        for boot, max_mono, min_mono in boots:
            if boot == self._boot:
                moves.append((boot, fix.offset, fix.quality))
                continue
            moves.append((boot, end - max_mono, "estimated"))
            end = end - (max_mono - min_mono) - 1.0
        return moves[::-1]

    def _held_rows_per_commit(self, conn: sqlite3.Connection) -> int:
        rows, size = conn.execute(
            "SELECT count(*), sum(length(CAST(record AS BLOB)) + length(datasource_id)) FROM held"
        ).fetchone()
        if not rows:
            return 0
        per_row = (size / rows + _ROW_OVERHEAD) * self._ratio
        return max(1, int(self.budget.commit_bytes / 2 / per_row))

    def _drop_oldest(self, conn: sqlite3.Connection, need: float, drops: Counter[str]) -> None:
        """Drop the oldest pending readings that take about `need` bytes (counted): low
        priority before normal before high, oldest first within each (the drain index)."""
        ratio = self._ratio
        freed = 0.0
        ids: list[int] = []
        for priority in (LOW, NORMAL, HIGH):
            cur = conn.execute(
                "SELECT id, length(CAST(record AS BLOB)) + length(datasource_id) FROM readings "
                "WHERE priority = ? ORDER BY created, id",
                (priority,),
            )
            for rid, size in cur:
                freed += (size + _ROW_OVERHEAD) * ratio
                ids.append(rid)
                if freed >= need:
                    break
            cur.close()
            if freed >= need:
                break
        if ids:
            chosen = json.dumps(ids)
            dropped = conn.execute(
                "SELECT datasource_id, count(*) FROM readings "
                "WHERE id IN (SELECT value FROM json_each(?)) GROUP BY datasource_id",
                (chosen,),
            ).fetchall()
            conn.execute(
                "DELETE FROM readings WHERE id IN (SELECT value FROM json_each(?))", (chosen,)
            )
            drops.update({f"dropped.buffer_full.{ds}": c for ds, c in dropped})

    def _drop_upto(
        self, conn: sqlite3.Connection, last_id: int, reason: str, counts: Counter[str]
    ) -> None:
        """Delete the pending readings up to `last_id` (the oldest), counted per data source."""
        dropped = conn.execute(
            "SELECT datasource_id, count(*) FROM readings WHERE id <= ? GROUP BY datasource_id",
            (last_id,),
        ).fetchall()
        conn.execute("DELETE FROM readings WHERE id <= ?", (last_id,))
        counts.update({f"dropped.{reason}.{ds}": c for ds, c in dropped})

    def _note_drops(self, counts: Counter[str], why: str) -> None:
        new = {k: n for k, n in counts.items() if k.startswith("dropped.") and n}
        total = sum(new.values())
        if not total:
            return
        with self._cond:  # sources (too large readings) and the writer both count drops
            first = not self.dropped
            self.dropped.update(new)
            so_far = sum(self.dropped.values())
        if first or so_far % 10_000 < total:
            log.warning(
                "buffer: dropped %d readings because %s (%d so far); raise [buffer] max_bytes "
                "or max_age, free disk space, or fix the uplink",
                total,
                why,
                so_far,
            )

    # -- housekeeping ----------------------------------------------------------------------

    def _maintain(self, conn: sqlite3.Connection) -> None:
        """Keep the WAL within its reserve, give freed pages back, checkpoint on a timer too
        (so an idle WAL is folded in); apply max_age; remember the wall time."""
        try:
            self._keep_wal_within(conn)
            self._give_pages_back(conn)
        except sqlite3.Error as exc:
            self._report_error(exc)
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

    def _keep_wal_within(self, conn: sqlite3.Connection) -> bool:
        """Truncate the WAL once its file passed `wal_limit` (a passive checkpoint could not
        restart it: a reader was in it). Waits up to the busy timeout for readers, and for a
        session's checkpoint (which makes ours return busy at once); False if the WAL is
        still over its limit then, and nothing more may be written."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while _size(wal_path(self.path)) > self.budget.wal_limit:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            self.checkpoints += 1
            self._last_checkpoint = time.monotonic()
            if not busy:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _give_pages_back(self, conn: sqlite3.Connection) -> None:
        """Once free pages are more than a quarter of the file (and `_SHRINK_MIN_BYTES`) and no
        readings wait to be committed, give them all back, a bounded step at a time (each step
        moves pages from the end of the file into the holes, through the WAL); the file
        shrinks at the next checkpoint."""
        now = time.monotonic()
        if self._intake or (
            now - self._last_rows_at < _SHRINK_QUIET_S and now - self._last_shrink < _SHRINK_PAUSE_S
        ):
            # Readings are coming in: they would take the free pages again. Under a steady
            # stream, one step now and then.
            return
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        free = free_pages(conn) * page_size
        if not self._shrinking and free < max(_SHRINK_MIN_BYTES, file_bytes(conn) // 4):
            return
        self._shrinking = True
        self._last_shrink = now
        step = max(16, self.budget.commit_bytes // page_size // 3)
        until = time.monotonic() + _SHRINK_SLICE_S
        while free_pages(conn) and time.monotonic() < until:
            # Through executescript: `execute` steps the pragma once, which frees one page.
            conn.executescript(f"PRAGMA incremental_vacuum({step});")
            self.shrinks += 1
            if not self._keep_wal_within(conn):
                return
        if not free_pages(conn):
            self._shrinking = False
            self._truncate_wal(conn)

    def _truncate_wal(self, conn: sqlite3.Connection) -> None:
        """After a shrink: only a checkpoint cuts the end off the database file, and this one
        empties the WAL too. A reader in the way is not waited for long: the WAL is within its
        reserve anyway, and the next checkpoint cuts the file."""
        conn.execute("PRAGMA busy_timeout=100")
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            self.checkpoints += 1
        finally:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        self._last_checkpoint = time.monotonic()
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            self._report_error(exc)
            return
        self.checkpoints += 1

    def _expire_and_note_time(self, conn: sqlite3.Connection) -> None:
        wall = self._clock.wall()
        max_age = self.config.max_age_s
        counts: Counter[str] = Counter()
        with transaction(conn):
            if max_age is not None and self._offset_trusted():
                last = conn.execute(
                    "SELECT max(id) FROM readings WHERE created < ?", (wall - max_age,)
                ).fetchone()[0]
                if last is not None:
                    self._drop_upto(conn, last, "max_age", counts)
                    bump(conn, counts)
            forget_empty_totals(conn)
            set_meta(conn, "last_wall", repr(wall))
        self._note_drops(counts, f"they are older than max_age = {self.config.max_age}")

    def _offset_trusted(self) -> bool:
        # Ages are measured on the wall clock: never expire anything by a clock that is
        # known to be wrong (it would throw away a month of readings after a bad boot).
        return self._offset is not None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


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


@dataclass(frozen=True)
class DatasourceTotals:
    """One data source's pending readings: how many, their records' bytes, the oldest."""

    readings: int
    bytes: int
    oldest_id: int | None  # its first pending reading, the next to be sent
    oldest_created: float | None

    def merged(self, n: int, nbytes: int, first: tuple[int, float] | None) -> DatasourceTotals:
        """With another schema's readings of the same data source."""
        oldest = (self.oldest_id, self.oldest_created)
        if first is not None and (self.oldest_id is None or first[0] < self.oldest_id):
            oldest = first
        return DatasourceTotals(self.readings + n, self.bytes + nbytes, *oldest)


@dataclass
class BufferStats:
    """The buffer's figures; their JSON (status, `buffer stats --json`) is `BufferPart.of`."""

    pending: dict[str, int] = field(default_factory=dict)
    pending_bytes: int = 0
    oldest_created: float | None = None
    dead_letters: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    held: int = 0  # readings waiting for a trusted clock
    datasources: dict[str, DatasourceTotals] = field(default_factory=dict)

    def add(self, ds: str, n: int, nbytes: int, first: tuple[int, float] | None) -> None:
        """Count one (data source, schema) pair's totals in; `first`: its oldest (id, created)."""
        before = self.datasources.get(ds, DatasourceTotals(0, 0, None, None))
        self.datasources[ds] = now = before.merged(n, nbytes, first)
        self.pending[ds] = now.readings
        self.pending_bytes += nbytes
        oldest = [t for t in self.datasources.values() if t.oldest_id is not None]
        self.oldest_created = (
            min(oldest, key=lambda t: t.oldest_id or 0).oldest_created if oldest else None
        )


@dataclass(frozen=True)
class TotalsDifference:
    """Where a running total and a full count disagreed: (readings, bytes) of each."""

    what: str  # "data source X, schema N", "held", "dead_letters"
    kept: tuple[int, int]
    counted: tuple[int, int]

    def describe(self) -> str:
        if self.what in ("held", "dead_letters"):
            return f"{self.what}: kept {self.kept[0]}, counted {self.counted[0]}"
        return (
            f"{self.what}: kept {self.kept[0]} readings / {self.kept[1]} bytes, counted "
            f"{self.counted[0]} / {self.counted[1]}"
        )


@dataclass(frozen=True)
class Recount:
    """What `buffer stats --recount` found: the full count, and where the totals differed."""

    readings: int
    bytes: int
    rows: dict[str, int]  # held, dead_letters
    differences: list[TotalsDifference]

    @classmethod
    def of(cls, kept: Totals, counted: Totals) -> Recount:
        (kept_pending, kept_rows), (pending, rows) = kept, counted
        differences = [
            TotalsDifference(
                f"data source {ds}, schema {schema}",
                kept_pending.get((ds, schema), (0, 0)),
                pending.get((ds, schema), (0, 0)),
            )
            for ds, schema in sorted(kept_pending.keys() | pending.keys())
            if kept_pending.get((ds, schema), (0, 0)) != pending.get((ds, schema), (0, 0))
        ]
        differences += [
            TotalsDifference(t, (kept_rows.get(t, 0), 0), (n, 0))
            for t, n in rows.items()
            if kept_rows.get(t, 0) != n
        ]
        return cls(
            sum(n for n, _ in pending.values()),
            sum(b for _, b in pending.values()),
            rows,
            differences,
        )


class BufferSession:
    """One thread's view of the buffer: batches out, settlements in, inspection."""

    def __init__(self, path: Path, sync: str = "full") -> None:
        if not path.exists():
            raise BufferStoreError(
                f"no buffer database at {path}; has the agent run with this config?"
            )
        self.path = path
        self.conn = connect(path, sync)
        self._wal_limit: int | None = None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> BufferSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _keep_wal_within(self) -> None:
        """After a write: truncate the WAL once it passed the limit the agent's writer keeps
        (its own checkpoints run only when it commits, and a drain deletes for a long time
        while nothing new arrives). Without a running agent's limit, nothing to keep."""
        if self._wal_limit is None:
            limit = get_meta(self.conn, "wal_limit")
            self._wal_limit = None if limit is None else int(limit)
        if self._wal_limit is not None and _size(wal_path(self.path)) > self._wal_limit:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def next_batch(
        self,
        max_records: int,
        max_bytes: int,
        exclude: frozenset[str] = frozenset(),
        skip: Collection[int] = (),
    ) -> Batch | None:
        """The oldest pending reading's data source and schema, and the readings after it,
        whatever their priority (the uploader chooses by lanes: `lane_head`, drain.py).

        `skip`: readings left out of batches (the uploader sends them alone, isolation.py).
        """
        marks = ",".join("?" * len(exclude))
        skipped = json.dumps(sorted(skip))
        head = self.conn.execute(
            f"SELECT id, datasource_id, schema_id, created FROM readings "
            f"WHERE datasource_id NOT IN ({marks}) "
            f"AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT 1",
            (*exclude, skipped),
        ).fetchone()
        if head is None:
            return None
        return self.batch_at(Head(*head), max_records, max_bytes, skip)

    def lane_head(
        self,
        priority: int,
        since: float | None = None,
        before: float | None = None,
        exclude: frozenset[str] = frozenset(),
        skip: Collection[int] = (),
    ) -> Head | None:
        """The oldest pending reading of a priority class accepted in [since, before), not
        of an excluded data source nor skipped: one walk of the drain index (priority,
        created) that stops at the first match, however many readings wait."""
        row = self.conn.execute(
            "SELECT id, datasource_id, schema_id, created FROM readings INDEXED BY readings_drain "
            "WHERE priority = ?1 AND created >= ?2 AND created < ?3 "
            "AND datasource_id NOT IN (SELECT value FROM json_each(?4)) "
            "AND id NOT IN (SELECT value FROM json_each(?5)) ORDER BY created, id LIMIT 1",
            (
                priority,
                -_FOREVER if since is None else since,
                _FOREVER if before is None else before,
                json.dumps(sorted(exclude)),
                json.dumps(sorted(skip)),
            ),
        ).fetchone()
        return None if row is None else Head(*row)

    def batch_at(
        self,
        head: Head,
        max_records: int,
        max_bytes: int,
        skip: Collection[int] = (),
        lane: str = "backlog",
    ) -> Batch:
        """`head` and the readings of its data source and schema after it, within the
        count and byte limits (one indexed range: readings_batch)."""
        first_id, ds, schema_id, created = head
        skipped = json.dumps(sorted(skip))
        rows: list[BatchRow] = []
        size = 0
        cur = self.conn.execute(
            "SELECT id, record FROM readings WHERE datasource_id = ? AND schema_id = ? AND id >= ? "
            "AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
            (ds, schema_id, first_id, skipped, max_records),
        )
        for rid, record in cur:
            # Keep under the byte limit, but always send at least one record: a single
            # oversized record is the server's to refuse (413) and then dead-lettered.
            if rows and size + len(record) + 1 > max_bytes:
                break
            rows.append(BatchRow(rid, record))
            size += len(record) + 1
        cur.close()
        return Batch(ds, schema_id, tuple(rows), created, lane)

    def backlog(self, before: float) -> tuple[int, float | None]:
        """Pending readings accepted before `before` (the live window's start), and when the
        oldest of them was: the running total less the few live ones, counted on the drain
        index, and one index lookup per priority class."""
        live = self.conn.execute(
            "SELECT count(*) FROM readings INDEXED BY readings_drain "
            "WHERE priority IN (?, ?, ?) AND created >= ?",
            (HIGH, NORMAL, LOW, before),
        ).fetchone()[0]
        oldest = [
            row[0]
            for p in (HIGH, NORMAL, LOW)
            if (
                row := self.conn.execute(
                    "SELECT created FROM readings INDEXED BY readings_drain "
                    "WHERE priority = ? AND created < ? ORDER BY created LIMIT 1",
                    (p, before),
                ).fetchone()
            )
            is not None
        ]
        return max(0, self.pending_count() - live), min(oldest, default=None)

    def pending_reading(self, rid: int) -> Batch | None:
        """One pending reading as a batch of its own; None once it left the buffer."""
        row = self.conn.execute(
            "SELECT datasource_id, schema_id, created, record, priority FROM readings WHERE id = ?",
            (rid,),
        ).fetchone()
        if row is None:
            return None
        ds, schema_id, created, record, priority = row
        lane = {HIGH: "high", LOW: "low"}.get(priority, "backlog")
        return Batch(ds, schema_id, (BatchRow(rid, record),), created, lane)

    def ack(
        self,
        batch: Batch,
        extra_counts: dict[str, int] | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """The batch was delivered: delete it (and store `meta` in the same transaction:
        the uploader's byte count of the day, budget.py)."""
        with transaction(self.conn):
            self.conn.execute(
                "DELETE FROM readings WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(batch.ids),),
            )
            for key, value in (meta or {}).items():
                set_meta(self.conn, key, value)
            bump(
                self.conn,
                {"uploaded." + batch.datasource_id: len(batch.rows), **(extra_counts or {})},
            )
        self._keep_wal_within()

    def read_meta(self, key: str) -> str | None:
        return get_meta(self.conn, key)

    def write_meta(self, key: str, value: str) -> None:
        """One small transaction of its own (the byte budget's count written ahead)."""
        with transaction(self.conn):
            set_meta(self.conn, key, value)

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
        self._keep_wal_within()

    def stats(self) -> BufferStats:
        """The buffer's figures from its running totals, in one read transaction: a few
        index lookups however many readings wait (`recount` checks them)."""
        st = BufferStats()
        self.conn.execute("BEGIN")
        try:
            pending, rows = kept_totals(self.conn)
            for (ds, schema), (n, nbytes) in sorted(pending.items()):
                first = self.conn.execute(
                    "SELECT id, created FROM readings WHERE datasource_id = ? AND schema_id = ? "
                    "ORDER BY id LIMIT 1",
                    (ds, schema),
                ).fetchone()
                st.add(ds, n, nbytes, None if first is None else (first[0], first[1]))
            st.counters = dict(self.conn.execute("SELECT name, value FROM counters ORDER BY name"))
        finally:
            self.conn.execute("COMMIT")
        st.dead_letters = rows["dead_letters"]
        st.held = rows["held"]
        st.file_bytes = disk_bytes(self.path)
        return st

    def recount(self) -> Recount:
        """Count every pending reading, held reading and dead letter, compare with the
        running totals, and put the count in their place where they differ. One write
        transaction: the agent's writer waits for it (about a second per million readings)."""
        with transaction(self.conn):
            kept, counted = kept_totals(self.conn), counted_totals(self.conn)
            result = Recount.of(kept, counted)
            if result.differences:
                write_recount(self.conn)
        if result.differences:
            log.warning(
                "buffer: the running totals differed from a full count (%s); corrected",
                "; ".join(d.describe() for d in result.differences),
            )
        return result

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
        """Readings pending, from the running totals."""
        row = self.conn.execute("SELECT coalesce(sum(readings), 0) FROM pending_totals")
        return int(row.fetchone()[0])

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
    """Bytes the database's pages in use may take now, for the writer and for a session
    alike: its share of `max_bytes` (`DiskBudget.database`), or no growth at all while free
    disk space is under `min_free_bytes`."""
    budget = DiskBudget(config.max_bytes).database
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return budget
    if st.f_bavail * st.f_frsize < config.min_free_bytes:
        budget = min(budget, file_bytes(conn))
    return budget
