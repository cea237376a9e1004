"""The buffer's running totals (pending readings and bytes per data source and schema, held
rows, dead letters): after every kind of change they equal a full count, `stats()` reads
them instead of the rows, a buffer made before them gets them once, and
`buffer stats --recount` finds and corrects a difference."""

from __future__ import annotations

import itertools
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge_agent.buffer import Buffer, BufferSession, parse_exported
from edge_agent.clock import BUILD_EPOCH
from edge_agent.config import BufferConfig
from edge_agent.records import Reading
from edge_agent.store import (
    _create_v1,
    _migrate_1_to_2,
    connect,
    counted_totals,
    kept_totals,
    open_checked,
    set_meta,
)
from tests.fakes import FakeClock
from tests.helpers import serial_source, wait_until, write_config
from tests.test_operator import cli, fill

DATASOURCES = ("67890", "67891", "ström-1")
MAX_AGE_S = 3600.0


def a_reading(ds: str, seq: int, wide: bool, text: str) -> Reading:
    """Two record schemas, and text that is not ASCII (bytes are not characters)."""
    record: dict[str, Any] = {"timestamp": "2026-11-20T00:00:00.000Z", "seq": seq, "note": text}
    if wide:
        record["humidity"] = 40.5
    return Reading(ds, record)


def totals_agree(db: Path) -> None:
    conn = sqlite3.connect(db, timeout=30)
    try:
        conn.execute("BEGIN")
        kept, counted = kept_totals(conn), counted_totals(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert kept == counted


def stats_agree(db: Path) -> None:
    """`stats()` says what the rows say: readings, bytes and oldest reading per data source."""
    session = BufferSession(db)
    try:
        stats = session.stats()
        rows = session.conn.execute(
            "SELECT datasource_id, count(*), sum(length(CAST(record AS BLOB))), min(id) "
            "FROM readings GROUP BY datasource_id"
        ).fetchall()
        created = "SELECT created FROM readings WHERE id = ?"
        oldest = {ds: session.conn.execute(created, (i,)).fetchone()[0] for ds, _, _, i in rows}
        held = session.conn.execute("SELECT count(*) FROM held").fetchone()[0]
        dead = session.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    finally:
        session.close()
    assert stats.pending == {ds: n for ds, n, _, _ in rows}
    assert {ds: t.bytes for ds, t in stats.datasources.items()} == {ds: b for ds, _, b, _ in rows}
    assert {ds: t.oldest_created for ds, t in stats.datasources.items()} == oldest
    first = min(rows, key=lambda r: r[3], default=None)
    assert stats.oldest_created == (None if first is None else oldest[first[0]])
    assert stats.pending_bytes == sum(b for _, _, b, _ in rows)
    assert (stats.held, stats.dead_letters) == (held, dead)


class TotalsMachine(RuleBasedStateMachine):
    """Every way readings enter and leave the buffer, in any order, on a real database."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="totals-"))
        self.db = self.dir / "buffer.db"
        self.clock = FakeClock(BUILD_EPOCH + 86400)
        self.buffer = Buffer(
            self.db,
            # Small: a flood makes drop_oldest drop (1 MiB leaves ~750 KB for readings).
            BufferConfig(max_bytes=1 << 20, commit_interval_ms=5, max_age=f"{MAX_AGE_S:.0f}s"),
            self.clock,
            maintenance_interval_s=0.05,
        )
        self.buffer.open()
        self.session = BufferSession(self.db)
        self.seq = 0
        self.untrusted = False

    def teardown(self) -> None:
        self.session.close()
        self.buffer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _readings(self, ds: str, n: int, wide: bool, text: str, mono: bool) -> list[Reading]:
        out = []
        for _ in range(n):
            self.seq += 1
            r = a_reading(ds, self.seq, wide, text)
            out.append(r.with_mono(self.clock.monotonic()) if mono else r)
        return out

    @rule(
        ds=st.sampled_from(DATASOURCES),
        n=st.integers(1, 40),
        wide=st.booleans(),
        text=st.text(max_size=8),
    )
    def put(self, ds: str, n: int, wide: bool, text: str) -> None:
        # Stamped while the clock is not trusted, they go to `held`.
        assert self.buffer.put(self._readings(ds, n, wide, text, self.untrusted))
        assert self.buffer.flush()

    @rule(ds=st.sampled_from(DATASOURCES), n=st.integers(200, 400))
    def flood(self, ds: str, n: int) -> None:
        """More than fits: when_full = drop_oldest deletes the oldest in the same commit."""
        assert self.buffer.put(self._readings(ds, n, False, "x" * 2000, False))
        assert self.buffer.flush()

    @rule(ds=st.sampled_from(DATASOURCES), text=st.text(max_size=20))
    def source_dead_letter(self, ds: str, text: str) -> None:
        assert self.buffer.put_dead_letter(ds, json.dumps(text), "not a number", "mqtt:t")
        assert self.buffer.flush()

    @rule(n=st.integers(1, 50))
    def ack(self, n: int) -> None:
        batch = self.session.next_batch(n, 1 << 20)
        if batch is not None:
            self.session.ack(batch)

    @rule(n=st.integers(1, 5))
    def refuse(self, n: int) -> None:
        batch = self.session.next_batch(n, 1 << 20)
        if batch is not None:
            self.session.dead_letter(batch, 400, "bad record", 1)

    @rule()
    def requeue(self) -> None:
        self.session.requeue_dead_letters()

    @rule()
    def purge(self) -> None:
        self.session.purge_dead_letters(0)

    @rule(source=st.sampled_from(DATASOURCES), to=st.sampled_from(DATASOURCES))
    def move(self, source: str, to: str) -> None:
        self.session.move_datasource(source, to)

    @rule(ds=st.sampled_from(DATASOURCES))
    def drop(self, ds: str) -> None:
        self.session.drop_datasource(ds)

    @rule(ds=st.sampled_from(DATASOURCES), n=st.integers(1, 30), text=st.text(max_size=8))
    def import_lines(self, ds: str, n: int, text: str) -> None:
        lines = []
        for i in range(n):
            self.seq += 1
            doc = {"datasource_id": ds, "record": {"seq": self.seq, "note": text}}
            lines.append(parse_exported(i + 1, json.dumps(doc).encode()))
        self.session.import_lines(lines, self.buffer.config)

    @precondition(lambda self: not self.untrusted)
    @rule()
    def distrust_clock(self) -> None:
        self.buffer.distrust_clock()
        self.untrusted = True

    @precondition(lambda self: self.untrusted)
    @rule()
    def trust_clock(self) -> None:
        """Held readings move to the queue, corrected, a part per commit."""
        self.buffer.fix_times(self.clock.wall() - self.clock.monotonic(), "time_quality")
        self.untrusted = False
        wait_until(lambda: self._count("held") == 0, 30, "the held readings to be released")

    @precondition(lambda self: not self.untrusted)
    @rule()
    def expire(self) -> None:
        """max_age: the writer drops what got older than an hour."""
        self.clock.advance(MAX_AGE_S + 1)
        limit = self.clock.wall() - MAX_AGE_S
        wait_until(
            lambda: self._count("readings", f"created < {limit!r}") == 0, 30, "max_age to drop"
        )

    def _count(self, table: str, where: str = "1") -> int:
        row = self.session.conn.execute(f"SELECT count(*) FROM {table} WHERE {where}")
        return int(row.fetchone()[0])

    @invariant()
    def totals_equal_a_full_count(self) -> None:
        totals_agree(self.db)
        stats_agree(self.db)


TotalsMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_totals_equal_a_full_count_after_every_kind_of_change = TotalsMachine.TestCase


def test_stats_reads_the_totals_not_the_readings(tmp_path: Path) -> None:
    """SQLite's virtual machine runs about as many steps for stats() over 20,000 readings as
    over 200: it does not visit them (a count would take a hundred times more)."""
    steps = {}
    for n in (200, 20_000):
        db = tmp_path / f"{n}" / "buffer.db"
        fill(db, n)
        session = BufferSession(db)
        counted = itertools.count()

        def count_step(steps: Iterator[int] = counted) -> int:
            return next(steps) and 0  # 0: go on with the query

        session.conn.set_progress_handler(count_step, 100)
        stats = session.stats()
        session.conn.set_progress_handler(None, 0)
        session.close()
        assert sum(stats.pending.values()) == n
        steps[n] = next(counted)
    assert steps[20_000] <= 2 * steps[200] + 5, steps


def _old_file(db: Path) -> None:
    """A buffer as the agent made it before the totals (schema 2), with rows in every table."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    sdb = sqlite_utils.Database(conn)
    _create_v1(sdb)
    _migrate_1_to_2(sdb)
    set_meta(conn, "schema_version", "2")
    conn.execute("INSERT INTO schemas(id, signature) VALUES (1, 'a'), (2, 'b')")
    rows = [(ds, 1 + i % 2, 1000.0 + i, json.dumps({"seq": i, "t": "°C"}, ensure_ascii=False))
            for i, ds in enumerate(["67890", "67891"] * 50)]  # fmt: skip
    conn.executemany(
        "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES (?,?,?,?)", rows
    )
    conn.execute(
        "INSERT INTO held(datasource_id, schema_id, created, record, mono, boot) "
        "VALUES ('67890', 1, 1.0, '{}', 5.0, 'boot')"
    )
    conn.execute("INSERT INTO dead_letters(datasource_id, record) VALUES ('67890', '{}')")
    conn.close()


def test_a_buffer_made_before_the_totals_is_counted_once_at_open(tmp_path: Path) -> None:
    db = tmp_path / "data" / "buffer.db"
    _old_file(db)
    open_checked(db, "normal")
    totals_agree(db)
    conn = connect(db)
    pending, rows = kept_totals(conn)
    assert sum(n for n, _ in pending.values()) == 100 and rows == {"held": 1, "dead_letters": 1}
    # Opening again counts nothing again (the triggers keep them), and stays right.
    conn.execute("DELETE FROM readings WHERE id <= 10")
    conn.close()
    open_checked(db, "normal")
    totals_agree(db)
    stats_agree(db)


def test_recount_reports_and_corrects_a_difference(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=tmp_path / "data",
        sources=[serial_source(tmp_path / "ttyUSB0")],
    )
    db = tmp_path / "data" / "buffer.db"
    fill(db, 30)
    agree = cli("buffer", "stats", "--config", str(config), "--recount")
    assert agree.returncode == 0, agree.stderr
    assert "recount: 30 readings" in agree.stdout and "the running totals agree" in agree.stdout

    conn = sqlite3.connect(db)
    conn.execute("UPDATE pending_totals SET readings = readings + 7, bytes = bytes - 3")
    conn.execute("UPDATE row_counts SET rows = 4 WHERE name = 'held'")
    conn.commit()
    conn.close()
    wrong = cli("buffer", "stats", "--config", str(config), "--json")
    assert json.loads(wrong.stdout)["pending_total"] == 37  # what the totals say, unchecked

    found = cli("buffer", "stats", "--config", str(config), "--recount")
    assert found.returncode == 1, found.stderr
    assert "the running totals differed" in found.stdout
    assert "kept 37 readings" in found.stdout and "counted 30" in found.stdout
    assert "held: kept 4, counted 0" in found.stdout
    assert "pending: 30 readings" in found.stdout  # the figures shown are the corrected ones
    again = cli("buffer", "stats", "--config", str(config), "--recount", "--json")
    assert again.returncode == 0
    doc = json.loads(again.stdout)
    assert doc["recount"]["differences"] == [] and doc["recount"]["readings"] == 30
    assert doc["datasources"]["67890"]["pending"] == 30
    totals_agree(db)
