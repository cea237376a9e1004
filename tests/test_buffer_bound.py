"""The disk bound under bursts: every file under data_dir, sampled from outside the writer,
stays within max_bytes + 10 % whatever the input rate, and the file shrinks after a burst."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils

from edge_agent.buffer import Buffer, BufferSession, DiskBudget
from edge_agent.config import BufferConfig, WhenFull
from edge_agent.records import Reading
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.simulator import PtySensor, kv_line
from edge_agent.store import _create_v1, _migrate_1_to_2, set_meta
from edge_agent.testing.harness import Mosquitto, PeakSampler, Publisher
from tests.helpers import (
    DATASOURCE,
    AgentProcess,
    counters,
    serial_source,
    wait_until,
    write_config,
)
from tests.test_mqtt import DS, client_id, mqtt_source, wait_subscribed

# Seconds of serial flood: 3 in CI; EDGE_AGENT_SLOW_COUNT=300 makes it a minute, by hand.
FLOOD_S = max(3.0, int(os.environ.get("EDGE_AGENT_SLOW_COUNT", "0")) / 5)
SLACK = 1.10  # the figure to hold: max_bytes + 10 %


def on_disk(data_dir: Path) -> int:
    """Every file under data_dir, as `du` would add them (files may vanish meanwhile)."""
    total = 0
    for p in data_dir.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if p.is_file():
                total += p.stat().st_size
    return total


def long_reading(seq: int, pad: int = 60) -> Reading:
    return Reading(
        DATASOURCE,
        {"timestamp": "2026-11-20T00:00:00.000Z", "metric": "t", "seq": seq, "pad": "y" * pad},
    )


def pending(data_dir: Path) -> int:
    session = BufferSession(data_dir / "buffer.db")
    try:
        return session.pending_count()
    finally:
        session.close()


# -- bursts of puts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "max_bytes"),
    [
        ("drop_oldest", 2_000_000),
        ("drop_newest", 2_000_000),
        ("block", 2_000_000),
        ("drop_oldest", 1_048_576),  # the smallest max_bytes the configuration takes
    ],
)
def test_a_burst_of_80000_readings_stays_within_max_bytes_and_every_drop_is_counted(
    tmp_path: Path, policy: WhenFull, max_bytes: int
) -> None:
    data = tmp_path / "data"
    buf = Buffer(data / "buffer.db", BufferConfig(max_bytes=max_bytes, when_full=policy))
    buf.open()
    total = 80_000
    with PeakSampler(lambda: on_disk(data), 0.05) as sampler:
        for start in range(0, total, 1000):
            # Serial readings (cannot wait): under "block" they are dropped like drop_newest.
            buf.put([long_reading(i) for i in range(start, start + 1000)])
        assert buf.flush(timeout=120)
    buf.close()
    assert sampler.samples > 0
    assert sampler.peak <= max_bytes * SLACK, f"{sampler.peak:,} bytes on disk"
    assert on_disk(data) <= max_bytes
    session = BufferSession(data / "buffer.db")
    kept = session.pending_count()
    dropped = session.stats().counters[f"dropped.buffer_full.{DATASOURCE}"]
    session.close()
    assert kept + dropped == total
    assert kept > (max_bytes // 2) // 200  # it is still used: about 9,000 fit in 2 MB


def test_a_burst_while_the_uploader_drains_stays_within_max_bytes_and_the_file_shrinks_after(
    tmp_path: Path,
) -> None:
    max_bytes = 2_000_000
    data = tmp_path / "data"
    buf = Buffer(data / "buffer.db", BufferConfig(max_bytes=max_bytes))
    buf.open()
    stop = threading.Event()
    delivered: set[int] = set()

    def drain() -> None:  # what the uploader does, without HTTP
        session = BufferSession(data / "buffer.db")
        while not stop.is_set():
            batch = session.next_batch(500, 1 << 20)
            if batch is None:
                time.sleep(0.01)
                continue
            session.ack(batch)
            delivered.update(json.loads(r.record)["seq"] for r in batch.rows)
            time.sleep(0.002)  # a request's round trip
        session.close()

    thread = threading.Thread(target=drain, daemon=True)
    with PeakSampler(lambda: on_disk(data), 0.05) as sampler:
        thread.start()
        for start in range(0, 80_000, 1000):
            buf.put([long_reading(i) for i in range(start, start + 1000)])
        assert buf.flush(timeout=120)
        wait_until(lambda: pending(data) == 0, 60, "the drain to finish")
        stop.set()
        thread.join()
    assert sampler.peak <= max_bytes * SLACK, f"{sampler.peak:,} bytes on disk"
    assert delivered
    # Everything was delivered or dropped: the file gives its pages back.
    wait_until(lambda: on_disk(data) < max_bytes // 8, 30, "the file to shrink")
    assert buf.shrinks > 0
    buf.close()
    stats = counters(data / "buffer.db")
    assert not [name for name in stats if name.startswith("dropped.write_failed")]
    # Each reading was delivered or dropped (a batch in flight can be both: dropped from the
    # buffer while the uploader was sending it).
    assert len(delivered) + stats[f"dropped.buffer_full.{DATASOURCE}"] >= 80_000


def test_large_readings_stay_within_max_bytes_and_one_too_large_for_a_commit_is_counted(
    tmp_path: Path,
) -> None:
    # MQTT-sized payloads: 150 KB readings into an 8 MB buffer, 1000 of them at once (a full
    # inflight window), and one reading larger than a commit may add.
    max_bytes = 8_000_000
    data = tmp_path / "data"
    buf = Buffer(data / "buffer.db", BufferConfig(max_bytes=max_bytes))
    buf.open()
    acked = threading.Event()
    with PeakSampler(lambda: on_disk(data), 0.05) as sampler:
        for start in range(0, 1000, 100):
            buf.put([long_reading(i, pad=150_000) for i in range(start, start + 100)])
        too_large = DiskBudget(max_bytes).commit_bytes + 1
        buf.put([long_reading(-1, pad=too_large)], on_durable=acked.set, can_wait=True)
        dead_acked = threading.Event()
        text = json.dumps("z" * too_large)  # what a source could not read, kept as text
        buf.put_dead_letter(DATASOURCE, text, "not JSON", "mqtt:t", on_durable=dead_acked.set)
        assert buf.flush(timeout=120)
    buf.close()
    assert sampler.peak <= max_bytes * SLACK, f"{sampler.peak:,} bytes on disk"
    assert acked.is_set() and dead_acked.is_set()  # settled: counted as dropped
    session = BufferSession(data / "buffer.db")
    kept = session.pending_count()
    stats = session.stats()
    dropped = stats.counters[f"dropped.buffer_full.{DATASOURCE}"]
    session.close()
    assert stats.dead_letters == 0
    assert kept + dropped == 1002
    assert 0 < kept < 1000


def test_readings_held_for_an_untrusted_clock_are_released_within_max_bytes(
    tmp_path: Path,
) -> None:
    # A gateway without a clock for days: the held readings fill the buffer; once the clock
    # is trusted they move to the queue a part per commit, never two copies of them all.
    max_bytes = 2_000_000
    data = tmp_path / "data"
    buf = Buffer(data / "buffer.db", BufferConfig(max_bytes=max_bytes, commit_interval_ms=5))
    buf.open()
    buf.distrust_clock()
    for start in range(0, 6000, 500):
        buf.put([long_reading(i).with_mono(100.0 + i) for i in range(start, start + 500)])
    assert buf.flush()
    held_bytes = on_disk(data)
    with PeakSampler(lambda: on_disk(data), 0.05) as sampler:
        buf.fix_times(1_700_000_000.0, "time_quality")
        wait_until(lambda: pending(data) == 6000, 30, "the held readings to be released")
    buf.close()
    assert sampler.peak <= max_bytes * SLACK, f"{sampler.peak:,} bytes on disk"
    assert held_bytes > max_bytes // 2  # the release had something to double
    conn = sqlite3.connect(data / "buffer.db")
    seqs = [json.loads(r)["seq"] for (r,) in conn.execute("SELECT record FROM readings")]
    stamps = [json.loads(r)["timestamp"] for (r,) in conn.execute("SELECT record FROM readings")]
    assert conn.execute("SELECT count(*) FROM held").fetchone()[0] == 0
    conn.close()
    assert seqs == list(range(6000))  # in order, every one
    assert stamps[0] == "2023-11-14T22:15:00.000Z"  # 1_700_000_000 + 100 s: corrected


# -- the agent under a serial flood ------------------------------------------------------------


def _flood(sensor: PtySensor, until: float) -> int:
    """Write kv lines to the pty as fast as it takes them; returns how many."""
    seq = 0
    while time.monotonic() < until:
        chunk = "".join(kv_line(s, 0.0) + "\r\n" for s in range(seq, seq + 500)).encode()
        with sensor._lock:  # the sensor's own write path, 500 lines at a time
            assert sensor._master is not None
            os.write(sensor._master, chunk)
        seq += 500
    return seq


def test_an_agent_flooded_through_a_pty_stays_within_max_bytes_then_delivers_and_shrinks(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    max_bytes = 2_000_000
    data = tmp_path / "data"
    sensor = PtySensor(tmp_path / "serial-flood")
    sensor.plug()
    sandbox.set_faults(Faults(status=503))  # the uplink is down: the buffer fills and overflows
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=data,
        sources=[serial_source(sensor.link)],
        buffer={"max_bytes": max_bytes, "commit_interval_ms": 200},
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("agent: started")
        with PeakSampler(
            lambda: on_disk(data)
        ) as sampler:  # from outside the agent's process, every 0.2 s
            lines = _flood(sensor, time.monotonic() + FLOOD_S)
            wait_until(lambda: "dropped" in agent.log_text(), 30, "the buffer to overflow and drop")
            time.sleep(1.0)  # the last commits
        assert sampler.peak <= max_bytes * SLACK, f"{sampler.peak:,} bytes on disk"
        assert lines > 20_000  # many times what 2 MB hold
        sandbox.set_faults(Faults())  # the uplink is back: everything kept is delivered
        wait_until(lambda: pending(data) == 0, 60, "the backlog to be delivered")
        wait_until(lambda: on_disk(data) < max_bytes // 8, 30, "the file to shrink")
        assert "Traceback" not in agent.log_text()
    finally:
        assert agent.terminate() == 0
        sensor.unplug()
    got = {r["seq"] for r in sandbox.records(DATASOURCE)}
    dropped = counters(data / "buffer.db")[f"dropped.buffer_full.{DATASOURCE}"]
    # drop_oldest kept the newest readings, every one of them, up to the last line written.
    assert got == set(range(min(got), lines)), "a kept reading is missing"
    assert dropped >= 10_000 and len(got) > 1000


# -- the agent under an MQTT burst ------------------------------------------------------------


def test_an_mqtt_burst_of_large_messages_with_a_window_of_1000_stays_within_max_bytes(
    tmp_path: Path, mosquitto: Mosquitto, sandbox: Sandbox
) -> None:
    # 300 messages of 150 KB (45 MB) at QoS 1 into an 8 MB buffer, with up to 1000 of them
    # in flight: a window's worth would be 150 MB in one commit without the bound.
    max_bytes = 8_000_000
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(workdir, mosquitto.binary, extra_conf="log_type all\n")
    broker.start()
    data = tmp_path / "data"
    sandbox.set_faults(Faults(status=503))  # nothing leaves: the buffer overflows
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=data,
        sources=[mqtt_source(broker, mqtt_version="5", inflight_window=1000)],
        buffer={"max_bytes": max_bytes},
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    publisher = None
    try:
        wait_subscribed(broker, client_id())
        publisher = Publisher(broker)
        with PeakSampler(lambda: on_disk(data)) as sampler:
            for seq in range(300):
                payload = json.dumps({"seq": seq, "pad": "p" * 150_000})
                publisher.publish(f"sensors/dev{seq % 3}/burst", payload)
            publisher.wait_acked(60)

            def settled() -> bool:
                stats = counters(data / "buffer.db")
                return pending(data) + stats.get(f"dropped.buffer_full.{DS}", 0) == 300

            wait_until(settled, 60, "every message committed or dropped")
        assert sampler.peak <= max_bytes * SLACK, f"{sampler.peak:,} bytes on disk"
        assert 0 < pending(data) < 60  # about 40 fit in 8 MB
    finally:
        if publisher is not None:
            publisher.close()
        assert agent.terminate() == 0
        broker.stop()


# -- the rebuild for incremental vacuum ---------------------------------------------------------


def _old_agent_buffer(path: Path, n: int) -> None:
    """A schema-2 file as agents before auto_vacuum made it: readings, held, dead letters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    db = sqlite_utils.Database(conn)
    _create_v1(db)
    _migrate_1_to_2(db)
    set_meta(conn, "schema_version", "2")
    conn.execute("INSERT INTO schemas(id, signature) VALUES (1, 'pad:s,seq:n,timestamp:s')")
    conn.executemany(
        "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES (?, 1, 5, ?)",
        [(DATASOURCE, json.dumps({"seq": i, "pad": "z" * 80})) for i in range(n)],
    )
    conn.execute("DELETE FROM readings WHERE id <= ?", (n // 2,))  # a half-empty file
    conn.execute(
        "INSERT INTO held(datasource_id, schema_id, created, record, mono, boot) "
        "VALUES (?, 1, 5, '{\"seq\": -1}', 12.5, 'boot-1')",
        (DATASOURCE,),
    )
    conn.execute(
        "INSERT INTO dead_letters(datasource_id, record, status, reason, failed_at, attempts, "
        "origin) VALUES (?, '{\"seq\": -2}', 400, 'bad', 7, 1, 'upload')",
        (DATASOURCE,),
    )
    conn.execute("INSERT INTO counters(name, value) VALUES ('uploaded.67890', 42)")
    conn.close()


def _dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row, by the columns an older agent knew (a newer one adds `priority`)."""
    conn = sqlite3.connect(path)
    try:
        dump = {}
        for t in ("readings", "held", "dead_letters", "counters", "schemas"):
            names = [r[1] for r in conn.execute(f"PRAGMA table_info({t})") if r[1] != "priority"]
            dump[t] = conn.execute(f"SELECT {', '.join(names)} FROM {t} ORDER BY 1").fetchall()
        return dump
    finally:
        conn.close()


def test_a_buffer_made_by_an_older_agent_is_rebuilt_once_keeping_every_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.buffer")
    db = tmp_path / "data" / "buffer.db"
    _old_agent_buffer(db, 20_000)
    before = _dump(db)
    size_before = on_disk(db.parent)
    buf = Buffer(db, BufferConfig())
    buf.open()
    buf.close()
    assert _dump(db) == before  # every reading, held reading, dead letter and counter
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == (
        "2"
    )
    conn.close()
    assert on_disk(db.parent) < size_before  # the free half is gone
    assert sorted(p.name for p in db.parent.iterdir()) == ["buffer.db"]
    assert any("rebuilt" in r.getMessage() for r in caplog.records)
    caplog.clear()
    again = Buffer(db, BufferConfig())  # once only
    again.open()
    again.close()
    assert not any("rebuil" in r.getMessage() for r in caplog.records)


def test_a_new_buffer_gives_pages_back(tmp_path: Path) -> None:
    db = tmp_path / "data" / "buffer.db"
    buf = Buffer(db, BufferConfig(commit_interval_ms=5), maintenance_interval_s=0.2)
    buf.open()
    for start in range(0, 20_000, 1000):
        buf.put([long_reading(i) for i in range(start, start + 1000)])
    assert buf.flush()
    grown = on_disk(db.parent)
    session = BufferSession(db)
    while (batch := session.next_batch(1000, 1 << 30)) is not None:
        session.ack(batch)
    session.close()
    wait_until(lambda: on_disk(db.parent) < grown // 4, 30, "the file to shrink")
    # The writer's maintenance gives free pages back a step at a time: wait for it to finish.
    wait_until(lambda: _free_pages(db) < 16, 30, "the free pages given back")
    buf.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] < 16
    conn.close()


def _free_pages(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    finally:
        conn.close()
