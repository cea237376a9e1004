"""Live-first drain and priorities (drain.py): lanes chosen over a real buffer, then the whole
uploader against the sandbox as a real HTTP server that goes down and comes back.

A `FakeClock` stands in for the wall clock of the buffer and the uploader alike: readings
become backlog by moving it, not by waiting. Nothing here asserts on timing: only on what
arrived, and in which order, while the backlog was still draining.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.buffer import Batch, Buffer, BufferSession
from edge_agent.clock import utc_stamp
from edge_agent.config import BufferConfig, EndpointConfig, Secret, load_config, priorities
from edge_agent.drain import HIGH_RUN, DrainPolicy, DrainView, RateMeter, drain_view
from edge_agent.errors import ConfigError
from edge_agent.records import Reading
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.store import HIGH, LOW, connect, counted_totals, kept_totals
from edge_agent.uploader import Uploader
from tests.fakes import FakeClock
from tests.helpers import DATASOURCE, TOKEN, serial_source, wait_until, write_config

HIGH_DS = "67891"
T0 = 1_800_000_000.0  # the records' own timestamps


def reading(seq: int, ds: str = DATASOURCE, pad: str = "") -> Reading:
    record: dict[str, Any] = {"timestamp": utc_stamp(T0 + seq), "metric": "m", "value": seq}
    record["seq"] = seq
    if pad:
        record["pad"] = pad
    return Reading(ds, record)


def put(buffer: Buffer, readings: list[Reading]) -> None:
    assert buffer.put(readings)
    assert buffer.flush()


@pytest.fixture
def clock() -> FakeClock:
    """The buffer's clock, an hour behind the system's: the uploader measures ages on the
    system's clock, and `advance(3600)` brings this one up to it."""
    return FakeClock(float(int(time.time()) - 3600))


@pytest.fixture
def buffer(tmp_path: Path, clock: FakeClock) -> Iterator[Buffer]:
    buf = Buffer(tmp_path / "buffer.db", BufferConfig(commit_interval_ms=10), clock)
    buf.open()
    yield buf
    buf.close()


@pytest.fixture
def session(buffer: Buffer) -> Iterator[BufferSession]:
    s = BufferSession(buffer.path)
    yield s
    s.close()


def endpoint(url: str = "http://127.0.0.1:9/insert", **keys: Any) -> EndpointConfig:
    settings: dict[str, Any] = {
        "url": url,
        "token_file": "unused",
        "max_batch_records": 10,
        "flush_interval_s": 0.0,  # the fake clock does not move by itself: never wait to fill
        "live_window_s": 60.0,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.2,
        "reconnect_probe_s": 0.1,
        **keys,
    }
    return EndpointConfig(**settings)


def seqs(batch: Batch) -> list[int]:
    return [json.loads(r.record)["seq"] for r in batch.rows]


def drain_lanes(
    session: BufferSession, ep: EndpointConfig, clock: FakeClock, rounds: int
) -> list[tuple[str, list[int]]]:
    """Pick and deliver (ack) `rounds` batches; what each was and held."""
    policy = DrainPolicy()
    out = []
    for _ in range(rounds):
        pick = policy.pick(session, ep, 1_000_000, clock.wall())
        if pick.batch is None:
            break
        out.append((pick.batch.lane, seqs(pick.batch)))
        session.ack(pick.batch)
    return out


# -- lanes over a real buffer ------------------------------------------------------------------


def test_live_readings_go_first_and_the_backlog_takes_its_share_oldest_first(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    put(buffer, [reading(i) for i in range(40)])
    clock.advance(600)  # ten minutes later: those are the backlog
    put(buffer, [reading(i) for i in range(1000, 1030)])
    lanes = drain_lanes(session, endpoint(), clock, 100)
    assert [lane for lane, _ in lanes] == ["live", "backlog"] * 3 + ["backlog"] * 1
    live = [s for lane, batch in lanes if lane == "live" for s in batch]
    backlog = [s for lane, batch in lanes if lane == "backlog" for s in batch]
    assert live == list(range(1000, 1030))
    assert backlog == list(range(40))  # oldest first within the backlog

    # A larger share: the backlog takes three of every four requests while both wait.
    put(buffer, [reading(i) for i in range(40)])
    clock.advance(600)
    put(buffer, [reading(i) for i in range(1000, 1030)])
    lanes = drain_lanes(session, endpoint(backlog_share=0.75), clock, 100)
    assert [lane for lane, _ in lanes][:4] == ["live", "backlog", "backlog", "backlog"]
    assert [lane for lane, _ in lanes].count("backlog") == 4


def test_oldest_first_sends_strictly_oldest_first_and_labels_by_age(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    put(buffer, [reading(i) for i in range(40)])
    clock.advance(600)
    put(buffer, [reading(i) for i in range(1000, 1030)])
    lanes = drain_lanes(session, endpoint(drain="oldest_first"), clock, 100)
    assert [s for _, batch in lanes for s in batch] == [*range(40), *range(1000, 1030)]
    assert [lane for lane, _ in lanes] == ["backlog"] * 4 + ["live"] * 3


def test_high_goes_before_everything_and_low_only_when_nothing_else_is_ready(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    buffer.set_priorities({HIGH_DS: HIGH, "low-ds": LOW})
    put(buffer, [reading(i, "low-ds") for i in range(5)])
    put(buffer, [reading(i) for i in range(20)])
    clock.advance(600)
    put(buffer, [reading(i, HIGH_DS) for i in range(100, 115)])
    lanes = drain_lanes(session, endpoint(), clock, 100)
    assert lanes == [
        ("high", list(range(100, 110))),
        ("high", list(range(110, 115))),
        ("backlog", list(range(10))),
        ("backlog", list(range(10, 20))),
        ("low", list(range(5))),
    ]

    # A normal batch waiting to fill (young, not full) is not "ready": low goes meanwhile,
    # and a young high reading never waits.
    ep = endpoint(flush_interval_s=5.0)
    put(buffer, [reading(i, "low-ds") for i in range(3)])
    clock.advance(600)
    put(buffer, [reading(50)])
    pick = DrainPolicy().pick(session, ep, 1_000_000, clock.wall())
    assert pick.batch is not None and pick.batch.lane == "low"
    session.ack(pick.batch)
    pick = DrainPolicy().pick(session, ep, 1_000_000, clock.wall())
    assert pick.batch is None and pick.waiting and 0 < pick.wait_s <= 5.0
    put(buffer, [reading(7, HIGH_DS)])
    pick = DrainPolicy().pick(session, ep, 1_000_000, clock.wall())
    assert pick.batch is not None and (pick.batch.lane, seqs(pick.batch)) == ("high", [7])


def test_a_chatty_high_source_takes_four_of_five_requests_and_the_others_still_arrive(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    buffer.set_priorities({HIGH_DS: HIGH, "low-ds": LOW})
    put(buffer, [reading(i) for i in range(20)])
    put(buffer, [reading(i, "low-ds") for i in range(10)])
    clock.advance(600)
    policy, ep = DrainPolicy(), endpoint()
    lanes: list[tuple[str, list[int]]] = []
    for r in range(15):  # a full batch of alarms is pending before every request
        put(buffer, [reading(1000 + 10 * r + i, HIGH_DS) for i in range(10)])
        pick = policy.pick(session, ep, 1_000_000, clock.wall())
        assert pick.batch is not None
        lanes.append((pick.batch.lane, seqs(pick.batch)))
        session.ack(pick.batch)
    assert [lane for lane, _ in lanes] == (["high"] * HIGH_RUN + ["backlog"]) * 2 + [
        "high"
    ] * HIGH_RUN + ["low"]  # low gets the turn once nothing normal is ready
    assert [s for lane, b in lanes if lane == "backlog" for s in b] == list(range(20))
    assert [s for lane, b in lanes if lane == "low" for s in b] == list(range(10))
    high = [s for lane, b in lanes if lane == "high" for s in b]
    assert high == list(range(1000, 1000 + len(high)))  # alarms still in order
    # Nothing else is ready: high goes on past its run, to the last alarm.
    put(buffer, [reading(2000 + i, HIGH_DS) for i in range(60)])  # 30 + 60 pending
    for _ in range(9):
        pick = policy.pick(session, ep, 1_000_000, clock.wall())
        assert pick.batch is not None and pick.batch.lane == "high"
        session.ack(pick.batch)
    assert policy.pick(session, ep, 1_000_000, clock.wall()).batch is None


def test_held_readings_keep_their_priority_when_the_clock_is_trusted_again(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    buffer.set_priorities({HIGH_DS: HIGH})
    buffer.distrust_clock()
    put(buffer, [reading(i, HIGH_DS).with_mono(clock.monotonic()) for i in range(3)])
    put(buffer, [reading(9).with_mono(clock.monotonic())])
    held = session.conn.execute("SELECT priority FROM held ORDER BY id").fetchall()
    assert held == [(HIGH,)] * 3 + [(1,)]
    buffer.fix_times(clock.wall() - clock.monotonic(), "time_quality")
    assert buffer.flush()
    wait_until(lambda: session.pending_count() == 4, what="the held readings to move")
    rows = session.conn.execute("SELECT datasource_id, priority FROM readings ORDER BY id")
    assert rows.fetchall() == [(HIGH_DS, HIGH)] * 3 + [(DATASOURCE, 1)]


def test_paused_data_sources_and_skipped_readings_stay_out_of_every_lane(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    buffer.set_priorities({HIGH_DS: HIGH})
    put(buffer, [reading(i, HIGH_DS) for i in range(3)])
    put(buffer, [reading(i) for i in range(3)])
    first = session.conn.execute(
        "SELECT min(id) FROM readings WHERE datasource_id = ?", (DATASOURCE,)
    ).fetchone()[0]
    pick = DrainPolicy().pick(
        session, endpoint(), 1 << 20, clock.wall(), frozenset({HIGH_DS}), frozenset({first})
    )
    assert pick.batch is not None
    assert (pick.batch.datasource_id, seqs(pick.batch)) == (DATASOURCE, [1, 2])


def full_buffer(tmp_path: Path, clock: FakeClock) -> Buffer:
    """An open 1 MiB drop_oldest buffer with a high and a low data source (and normal)."""
    buf = Buffer(
        tmp_path / "buffer.db",
        BufferConfig(max_bytes=1_048_576, when_full="drop_oldest", commit_interval_ms=10),
        clock,
    )
    buf.set_priorities({HIGH_DS: HIGH, "low-ds": LOW})
    buf.open()
    return buf


def test_drop_oldest_drops_low_before_normal_before_high(tmp_path: Path, clock: FakeClock) -> None:
    buf = full_buffer(tmp_path, clock)
    pad = "x" * 200
    try:
        # High first, then low, then normal: age alone would drop the high ones first.
        for ds, count in ((HIGH_DS, 1000), ("low-ds", 1000), (DATASOURCE, 3000)):
            for start in range(0, count, 100):
                put(buf, [reading(i, ds, pad) for i in range(start, start + 100)])
                clock.advance(1)
    finally:
        buf.close()
    dropped = {ds: buf.dropped[f"dropped.buffer_full.{ds}"] for ds in ("low-ds", DATASOURCE)}
    assert dropped["low-ds"] == 1000, dropped  # every low one went before any normal one
    assert 0 < dropped[DATASOURCE] < 3000, dropped
    assert buf.dropped[f"dropped.buffer_full.{HIGH_DS}"] == 0
    s = BufferSession(buf.path)
    try:
        left = [
            json.loads(r)["seq"]
            for (r,) in s.conn.execute(
                "SELECT record FROM readings WHERE datasource_id = ? ORDER BY id", (DATASOURCE,)
            )
        ]
        assert left == list(range(left[0], 3000))  # the oldest normal ones went
        assert kept_totals(s.conn) == counted_totals(s.conn)
    finally:
        s.close()


def test_a_buffer_from_before_priorities_opens_with_its_readings_kept_as_normal(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "buffer.db"
    buf = Buffer(path, BufferConfig(commit_interval_ms=10), clock)
    buf.open()
    put(buf, [reading(i) for i in range(30)])
    buf.close()
    # Make it the file the previous agent wrote: no priority column, no drain index.
    conn = connect(path)
    conn.execute("DROP INDEX readings_drain")
    conn.execute("ALTER TABLE readings DROP COLUMN priority")
    conn.execute("ALTER TABLE held DROP COLUMN priority")
    conn.close()

    buf = Buffer(path, BufferConfig(commit_interval_ms=10), clock)
    buf.set_priorities({HIGH_DS: HIGH})
    buf.open()
    try:
        put(buf, [reading(500, HIGH_DS)])
        s = BufferSession(path)
        try:
            rows = s.conn.execute("SELECT datasource_id, priority FROM readings").fetchall()
            assert sorted(rows) == sorted([(DATASOURCE, 1)] * 30 + [(HIGH_DS, 0)])
            assert kept_totals(s.conn) == counted_totals(s.conn)
            plan = [
                r[3]
                for r in s.conn.execute(
                    "EXPLAIN QUERY PLAN SELECT id FROM readings WHERE priority = 1 "
                    "AND created < 5 ORDER BY created, id LIMIT 1"
                )
            ]
            assert "readings_drain" in plan[0], plan
            lanes = drain_lanes(s, endpoint(), clock, 10)
            assert lanes[0] == ("high", [500])
            assert [x for _, b in lanes[1:] for x in b] == list(range(30))
        finally:
            s.close()
    finally:
        buf.close()


def test_the_lane_queries_walk_the_drain_index_without_a_scan_or_a_sort(
    session: BufferSession,
) -> None:
    queries = [
        (
            "SELECT id FROM readings INDEXED BY readings_drain WHERE priority = ?1 "
            "AND created >= ?2 AND created < ?3 ORDER BY created, id LIMIT 1",
            (1, 0.0, 1e300),
        ),
        (
            "SELECT count(*) FROM readings INDEXED BY readings_drain "
            "WHERE priority IN (0, 1, 2) AND created >= ?",
            (5.0,),
        ),
        ("SELECT id FROM readings WHERE priority = ? ORDER BY created, id", (2,)),
    ]
    for sql, args in queries:
        plan = " | ".join(r[3] for r in session.conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "readings_drain" in plan and "TEMP B-TREE" not in plan, plan
        assert "SCAN readings" not in plan, plan


# -- what the operator is shown ------------------------------------------------------------------


def test_drain_view_counts_the_backlog_its_age_and_the_time_to_drain_it(
    buffer: Buffer, session: BufferSession, clock: FakeClock
) -> None:
    assert drain_view(session, 60.0, None, clock.wall()) == DrainView(0, None, None, 0.0)
    put(buffer, [reading(i) for i in range(40)])
    clock.advance(300)
    put(buffer, [reading(i) for i in range(1000, 1010)])
    view = drain_view(session, 60.0, 8.0, clock.wall())
    assert view == DrainView(40, 300.0, 8.0, 5.0)
    assert drain_view(session, 60.0, None, clock.wall()).eta_s is None  # nothing measured yet
    assert view.as_dict()["backlog_eta_s"] == 5.0

    meter = RateMeter(window_s=60.0)
    assert meter.rate(0.0) is None
    meter.add(100, 10.0)
    meter.add(200, 40.0)
    assert meter.rate(40.0) == pytest.approx(300 / 30)  # since the first delivery
    assert meter.rate(99.0) == pytest.approx(200 / 60)  # the first one left the window
    assert meter.rate(200.0) == 0.0


# -- the whole uploader against the sandbox, down and back -------------------------------------


class Outage:
    """A buffer, an uploader on the fake clock, and the sandbox: down, then back."""

    def __init__(self, tmp_path: Path, clock: FakeClock, buffer: Buffer, ep_keys: Any) -> None:
        first = Sandbox(tokens=[TOKEN], datasources=[DATASOURCE, HIGH_DS]).start()
        self.port = first.port
        first.stop()
        self.tmp_path, self.clock, self.buffer = tmp_path, clock, buffer
        self.uploader = Uploader(
            endpoint(f"http://127.0.0.1:{self.port}/restapi/datasource/insert", **ep_keys),
            Secret(TOKEN),
            buffer,
            clock=clock,
        )
        self.uploader.start()
        self.sandbox: Sandbox | None = None

    def back(self, faults: Faults) -> Sandbox:
        self.sandbox = Sandbox(
            port=self.port,
            tokens=[TOKEN],
            datasources=[DATASOURCE, HIGH_DS],
            db_path=self.tmp_path / "sbx.db",
            faults=faults,
        ).start()
        return self.sandbox

    def close(self) -> None:
        self.uploader.stop()
        if self.sandbox is not None:
            self.sandbox.stop()


@pytest.fixture
def outage(tmp_path: Path, clock: FakeClock, buffer: Buffer) -> Iterator[Any]:
    made: list[Outage] = []

    def make(**ep_keys: Any) -> Outage:
        made.append(Outage(tmp_path, clock, buffer, ep_keys))
        return made[-1]

    yield make
    for o in made:
        o.close()


def received(sandbox: Sandbox, ds: str | None = DATASOURCE) -> list[int]:
    return [int(r["seq"]) for r in sandbox.records(ds)]


def test_after_an_outage_fresh_readings_arrive_while_the_backlog_still_drains(
    outage: Any, buffer: Buffer, clock: FakeClock
) -> None:
    run = outage()
    backlog = list(range(600))
    put(buffer, [reading(i) for i in backlog])
    wait_until(lambda: run.uploader.uplink.down, what="the uploader to find the link down")
    clock.advance(3600)  # now: an hour-long outage, all of that is backlog
    sandbox = run.back(Faults(latency_ms=20))  # slow enough that the backlog takes a while
    wait_until(lambda: received(sandbox), timeout=30, what="the first batch after the return")
    fresh = list(range(10_000, 10_025))
    put(buffer, [reading(i) for i in fresh])
    wait_until(lambda: set(fresh) <= set(received(sandbox)), timeout=30, what="fresh readings")
    got = received(sandbox)
    assert len([s for s in got if s < 10_000]) < len(backlog), "the backlog was already through"
    wait_until(lambda: len(received(sandbox)) >= 625, timeout=60, what="the whole backlog")
    got = received(sandbox)
    assert sorted(got) == sorted(backlog + fresh)  # every reading arrived, once
    assert [s for s in got if s < 10_000] == backlog  # oldest first within the backlog
    assert [s for s in got if s >= 10_000] == fresh
    # Backlog readings only, not the fresh; counted once the last answer is settled (acked),
    # which may be a moment after the sandbox stored it.
    wait_until(lambda: run.uploader.backlog_delivered >= 600, what="the backlog counted")
    assert run.uploader.backlog_delivered == 600
    assert run.uploader.backlog_rate() > 0


def test_oldest_first_after_an_outage_sends_strictly_oldest_first(
    outage: Any, buffer: Buffer, clock: FakeClock
) -> None:
    run = outage(drain="oldest_first")
    put(buffer, [reading(i) for i in range(300)])
    wait_until(lambda: run.uploader.uplink.down, what="the uploader to find the link down")
    clock.advance(3600)
    sandbox = run.back(Faults(latency_ms=10))
    wait_until(lambda: received(sandbox), timeout=30, what="the first batch after the return")
    put(buffer, [reading(i) for i in range(10_000, 10_025)])
    wait_until(lambda: len(received(sandbox)) >= 325, timeout=60, what="everything")
    assert received(sandbox) == [*range(300), *range(10_000, 10_025)]


def test_a_high_priority_source_overtakes_a_normal_backlog(
    outage: Any, buffer: Buffer, clock: FakeClock
) -> None:
    buffer.set_priorities({HIGH_DS: HIGH})
    run = outage(drain="oldest_first")  # not live-first: the priority alone does it
    put(buffer, [reading(i) for i in range(600)])
    wait_until(lambda: run.uploader.uplink.down, what="the uploader to find the link down")
    clock.advance(3600)
    sandbox = run.back(Faults(latency_ms=20))
    wait_until(lambda: received(sandbox), timeout=30, what="the first batch after the return")
    alarms = list(range(20_000, 20_020))
    put(buffer, [reading(i, HIGH_DS) for i in alarms])
    wait_until(lambda: received(sandbox, HIGH_DS) == alarms, timeout=30, what="the alarms")
    assert len(received(sandbox)) < 600, "the normal backlog was already through"
    wait_until(lambda: len(received(sandbox)) >= 600, timeout=60, what="the normal backlog")
    order = received(sandbox, None)
    first = order.index(alarms[0])
    assert order[first : first + len(alarms)] == alarms  # together, nothing in between
    assert [s for s in order if s < 20_000] == list(range(600))


def test_sqlite_keeps_priority_as_a_column_an_older_agent_can_ignore(
    buffer: Buffer, session: BufferSession
) -> None:
    """An older agent inserts without naming the column: its readings are normal."""
    conn = sqlite3.connect(buffer.path)
    try:
        conn.execute(
            "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES (?, 1, ?, ?)",
            (DATASOURCE, T0, json.dumps({"seq": 1})),
        )
        conn.commit()
    finally:
        conn.close()
    row = session.conn.execute("SELECT priority FROM readings").fetchone()
    assert row == (1,)


# -- configuration ---------------------------------------------------------------------------


def config_with(tmp_path: Path, sources: list[dict[str, Any]], **ep: Any) -> Path:
    return write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/insert",
        data_dir=tmp_path / "data",
        sources=sources,
        endpoint=ep,
    )


def test_drain_and_priority_keys_default_and_refuse_bad_values_by_name(tmp_path: Path) -> None:
    port = tmp_path / "tty"
    config = load_config(config_with(tmp_path, [serial_source(port)]))
    assert (config.endpoint.drain, config.endpoint.live_window_s) == ("live_first", 60.0)
    assert config.endpoint.backlog_share == 0.5
    assert config.sources[0].priority == "normal"
    assert priorities(config) == {DATASOURCE: 1}
    alarm = serial_source(port, name="alarm", datasource_id=HIGH_DS, priority="high")
    config = load_config(config_with(tmp_path, [serial_source(port), alarm]))
    assert priorities(config) == {DATASOURCE: 1, HIGH_DS: HIGH}

    bad: list[tuple[list[dict[str, Any]], dict[str, Any], str]] = [
        ([serial_source(port)], {"drain": "newest_first"}, "[endpoint] drain: expected one of"),
        ([serial_source(port)], {"backlog_share": 0.0}, "[endpoint] backlog_share"),
        ([serial_source(port)], {"live_window_s": 0.5}, "[endpoint] live_window_s"),
        ([serial_source(port, priority="urgent")], {}, "priority: expected one of"),
        (
            [serial_source(port), serial_source(port, name="other", priority="low")],
            {},
            "(other) priority: sources 'weather' (normal) and 'other' (low) send to the same",
        ),
    ]
    for sources, ep, expected in bad:
        with pytest.raises(ConfigError) as info:
            load_config(config_with(tmp_path, sources, **ep))
        assert expected in str(info.value), str(info.value)


def test_drop_oldest_under_a_steady_overflow_keeps_every_high_and_normal_reading(
    tmp_path: Path, clock: FakeClock
) -> None:
    # Found by an outside attack: a commit that did not fit after one round of dropping was
    # cut, dropping new high and normal readings while low ones stayed buffered.
    buf = full_buffer(tmp_path, clock)
    pad = "x" * 200
    try:
        for n in range(200):  # 20,000 low readings into 1 MiB: low takes every drop
            put(
                buf,
                [reading(n * 100 + i, "low-ds", pad) for i in range(100)]
                + [reading(n * 2 + i, DATASOURCE, pad) for i in range(2)]
                + [reading(n + i, HIGH_DS, pad) for i in range(1)],
            )
            clock.advance(0.1)
    finally:
        buf.close()
    assert buf.dropped[f"dropped.buffer_full.{HIGH_DS}"] == 0
    assert buf.dropped[f"dropped.buffer_full.{DATASOURCE}"] == 0
    assert buf.dropped["dropped.buffer_full.low-ds"] > 10_000
    s = BufferSession(buf.path)
    try:
        for ds, count in ((HIGH_DS, 200), (DATASOURCE, 400)):
            seqs = [
                json.loads(r)["seq"]
                for (r,) in s.conn.execute(
                    "SELECT record FROM readings WHERE datasource_id = ? ORDER BY id", (ds,)
                )
            ]
            assert seqs == list(range(count)), ds
    finally:
        s.close()
