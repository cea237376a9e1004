"""The SQLite buffer: group commit, batches by data source and schema, settlement, bounds."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.buffer import Buffer, BufferSession, signature
from edge_agent.config import BufferConfig, WhenFull
from edge_agent.records import Reading


def reading(seq: int, ds: str = "67890", **extra: object) -> Reading:
    return Reading(ds, {"timestamp": "2025-01-01T00:00:00.000Z", "seq": seq, **extra})


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    buf = Buffer(tmp_path / "buffer.db", BufferConfig(commit_interval_ms=20))
    buf.open()
    yield buf
    buf.close()


def open_session(buf: Buffer) -> BufferSession:
    return BufferSession(buf.path)


def test_signature_groups_numbers_and_separates_types() -> None:
    assert signature({"a": 1, "b": "x"}) == signature({"b": "y", "a": 2.5})
    assert signature({"a": 1}) != signature({"a": "1"})
    assert signature({"a": 1}) != signature({"a": 1, "b": 1})


def test_put_is_durable_after_flush_and_callback_runs_after_commit(buffer: Buffer) -> None:
    durable = threading.Event()
    assert buffer.put([reading(i) for i in range(10)], on_durable=durable.set)
    assert buffer.flush()
    assert durable.is_set()
    session = open_session(buffer)
    assert session.pending_count() == 10
    session.close()


def test_group_commit_gathers_many_puts_into_few_commits(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.db", BufferConfig(commit_interval_ms=200))
    buf.open()
    for i in range(2000):
        buf.put([reading(i)])
    assert buf.flush()
    buf.close()
    # 2000 puts within a few intervals: a handful of transactions, not 2000.
    assert buf.commits < 20
    session = BufferSession(buf.path)
    assert session.pending_count() == 2000
    session.close()


def test_batches_are_oldest_first_one_datasource_and_schema(buffer: Buffer) -> None:
    buffer.put([reading(0), reading(1, ds="67891"), reading(2), reading(3, extra="s")])
    buffer.put([reading(4), reading(5, ds="67891")])
    assert buffer.flush()
    session = open_session(buffer)
    batch = session.next_batch(100, 1_000_000)
    assert batch is not None
    assert batch.datasource_id == "67890"
    assert [r.record.count('"seq"') for r in batch.rows] == [1, 1, 1]
    assert ['"seq":0' in batch.rows[0].record, '"seq":4' in batch.rows[-1].record] == [True, True]
    session.ack(batch)
    nxt = session.next_batch(100, 1_000_000)
    assert nxt is not None and nxt.datasource_id == "67891" and len(nxt.rows) == 2
    session.ack(nxt)
    last = session.next_batch(100, 1_000_000)
    assert last is not None and len(last.rows) == 1 and '"extra":"s"' in last.rows[0].record
    session.ack(last)
    assert session.next_batch(100, 1_000_000) is None
    assert session.stats().counters == {"uploaded.67890": 4, "uploaded.67891": 2}
    session.close()


@pytest.mark.parametrize("count", [1, 127, 128, 129, 300, 1000])
def test_every_reading_of_a_large_put_is_stored_once_in_order(buffer: Buffer, count: int) -> None:
    # Rows go in as multi-row INSERTs of 128 and the remainder one by one: every split
    # keeps each reading once, with its own record and schema, in the order put.
    wide = [reading(i, ds="67891", name=f"r{i}") for i in range(0, count, 3)]
    buffer.put([reading(i) if i % 3 else wide[i // 3] for i in range(count)])
    assert buffer.flush()
    session = open_session(buffer)
    seen: list[str] = []
    while (batch := session.next_batch(10_000, 100_000_000)) is not None:
        seen += [r.record for r in batch.rows]
        session.ack(batch)
    session.close()
    expected = [
        (reading(i) if i % 3 else wide[i // 3]).record for i in range(count)
    ]  # 67891 first (its reading 0 is the oldest), then 67890; each in the order put
    as_json = [json.dumps(r, separators=(",", ":")) for r in expected]
    assert seen == [t for t in as_json if "name" in t] + [t for t in as_json if "name" not in t]


def test_batch_limits_and_exclusion(buffer: Buffer) -> None:
    buffer.put([reading(i, pad="x" * 100) for i in range(50)] + [reading(99, ds="67891")])
    assert buffer.flush()
    session = open_session(buffer)
    by_count = session.next_batch(7, 1_000_000)
    assert by_count is not None and len(by_count.rows) == 7
    by_bytes = session.next_batch(100, 1000)
    assert by_bytes is not None and 1 <= len(by_bytes.rows) < 10 and by_bytes.nbytes <= 1000
    tiny = session.next_batch(100, 10)  # one oversized record still goes, for the server to judge
    assert tiny is not None and len(tiny.rows) == 1
    other = session.next_batch(100, 1_000_000, exclude=frozenset({"67890"}))
    assert other is not None and other.datasource_id == "67891"
    session.close()


def test_dead_letter_keeps_record_status_and_reason(buffer: Buffer) -> None:
    buffer.put([reading(1), reading(2)])
    assert buffer.flush()
    session = open_session(buffer)
    batch = session.next_batch(1, 1_000_000)
    assert batch is not None
    session.dead_letter(batch, 400, "data[0].seq: bad", attempts=3)
    (dead,) = session.dead_letters()
    assert dead["record"]["seq"] == 1
    assert (dead["status"], dead["reason"], dead["attempts"]) == (400, "data[0].seq: bad", 3)
    assert dead["failed_at"].endswith("Z")
    assert session.pending_count() == 1
    session.close()


def test_closed_buffer_refuses_puts(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.db", BufferConfig())
    buf.open()
    buf.close()
    assert buf.put([reading(1)]) is False


def test_rows_survive_reopen(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.db", BufferConfig(commit_interval_ms=10))
    buf.open()
    buf.put([reading(i) for i in range(5)])
    buf.close()
    again = Buffer(tmp_path / "b.db", BufferConfig())
    again.open()
    session = BufferSession(again.path)
    assert session.pending_count() == 5
    session.close()
    again.close()


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_max_bytes_is_kept_and_every_drop_counted(tmp_path: Path, policy: WhenFull) -> None:
    max_bytes = 2 * 1024 * 1024
    buf = Buffer(
        tmp_path / "b.db",
        BufferConfig(max_bytes=max_bytes, when_full=policy, commit_interval_ms=5),
    )
    buf.open()
    total = 40_000  # about 5x what fits
    for start in range(0, total, 500):
        buf.put([reading(i, pad="y" * 60) for i in range(start, start + 500)])
        buf.flush()
        size = sum(p.stat().st_size for p in tmp_path.glob("b.db*") if not p.name.endswith("shm"))
        # One commit of slack: 500 readings of ~120 bytes each.
        assert size <= max_bytes + 500 * 200, size
    buf.close()
    session = BufferSession(tmp_path / "b.db")
    kept = session.pending_count()
    dropped = session.stats().counters.get("dropped.buffer_full.67890", 0)
    assert dropped > 0
    assert kept + dropped == total
    batch = session.next_batch(100_000, 1 << 30)
    assert batch is not None
    seqs = [int(r.record.split('"seq":')[1].split(",")[0]) for r in batch.rows]
    if policy == "drop_oldest":
        assert seqs == list(range(total - kept, total))  # the newest survive
    else:
        assert seqs == list(range(kept))  # the oldest survive
    session.close()
