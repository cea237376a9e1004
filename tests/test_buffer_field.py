"""The buffer in the field: migrations, corruption, a full disk, policies, clock, kill -9."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from edge_agent.agent import Agent
from edge_agent.buffer import Buffer, BufferSession
from edge_agent.clock import BUILD_EPOCH
from edge_agent.config import BufferConfig, load_config
from edge_agent.errors import BufferStoreError
from edge_agent.records import Reading
from edge_agent.sandbox import Sandbox
from edge_agent.store import SCHEMA_VERSION, _create_v1, set_meta
from edge_agent.testing.harness import run_cli
from tests.fakes import FakeClock
from tests.helpers import DATASOURCE, AgentProcess, serial_source, wait_until, write_config

ROOT = Path(__file__).resolve().parent.parent
SLOW_COUNT = int(os.environ.get("EDGE_AGENT_SLOW_COUNT", "25"))


def reading(seq: int, ds: str = DATASOURCE) -> Reading:
    return Reading(ds, {"timestamp": "2026-11-20T00:00:00.000Z", "seq": seq})


def seqs_in(db: Path, table: str = "readings") -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [json.loads(r)["seq"] for (r,) in conn.execute(f"SELECT record FROM {table}")]
    finally:
        conn.close()


# -- schema versions -----------------------------------------------------------------------


def test_a_version_1_buffer_is_migrated_in_place_keeping_pending_readings(tmp_path: Path) -> None:
    db_path = tmp_path / "buffer.db"
    conn = sqlite3.connect(db_path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    _create_v1(db)
    set_meta(conn, "schema_version", "1")
    conn.execute("INSERT INTO schemas(id, signature) VALUES (1, 'seq:n,timestamp:s')")
    conn.executemany(
        "INSERT INTO readings(datasource_id, schema_id, created, record) VALUES (?, 1, 0, ?)",
        [
            (DATASOURCE, json.dumps({"timestamp": "2026-01-01T00:00:00.000Z", "seq": i}))
            for i in range(7)
        ],
    )
    conn.close()
    buf = Buffer(db_path, BufferConfig())
    buf.open()
    buf.put([reading(7)])
    buf.close()
    assert seqs_in(db_path) == list(range(8))
    check = sqlite3.connect(db_path)
    version = check.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert int(version) == SCHEMA_VERSION == 2
    assert check.execute("SELECT count(*) FROM held").fetchone()[0] == 0
    check.close()


def test_an_older_agent_refuses_a_newer_buffer(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "buffer.db", BufferConfig())
    buf.open()
    buf.close()
    conn = sqlite3.connect(tmp_path / "buffer.db", isolation_level=None)
    set_meta(conn, "schema_version", "99")
    conn.close()
    with pytest.raises(BufferStoreError, match="written by a newer agent \\(schema 99"):
        Buffer(tmp_path / "buffer.db", BufferConfig()).open()
    assert (tmp_path / "buffer.db").exists()  # kept, not moved aside


# -- corruption ----------------------------------------------------------------------------


def _fill(path: Path, n: int) -> None:
    buf = Buffer(path, BufferConfig())
    buf.open()
    buf.put([reading(i) for i in range(n)])
    buf.close()


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "garbage"])
def test_a_damaged_database_is_moved_aside_and_a_new_one_used(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    db_path = tmp_path / "buffer.db"
    _fill(db_path, 3000)
    data = bytearray(db_path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3 + 100]
    elif damage == "overwrite":
        data[4096 * 2 : 4096 * 4] = os.urandom(4096 * 2)
    else:
        data = bytearray(b"this is not a database at all" * 500)
    db_path.write_bytes(bytes(data))
    buf = Buffer(db_path, BufferConfig())
    buf.open()
    assert buf.moved_aside is not None and buf.moved_aside.exists()
    assert ".corrupt-" in buf.moved_aside.name
    buf.put([reading(1)])
    buf.close()
    assert seqs_in(db_path) == [1]
    assert any("is damaged" in r.getMessage() for r in caplog.records)


def test_the_agent_process_starts_on_a_damaged_buffer(tmp_path: Path, sandbox: Sandbox) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "buffer.db").write_bytes(b"\0garbage" * 4096)
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=data,
        sources=[serial_source(tmp_path / "no-such-port")],
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("agent: started")
        assert "is damaged" in agent.log_text()
        assert list(data.glob("buffer.db.corrupt-*"))
    finally:
        assert agent.terminate() == 0


# -- disk full -----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"this platform forbids mounting a tmpfs: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_intake_without_corruption_and_resumes(small_fs: Path) -> None:
    db_path = small_fs / "buffer.db"
    buf = Buffer(db_path, BufferConfig(max_bytes=64 << 20, min_free_bytes=0, commit_interval_ms=20))
    buf.open()
    filler = small_fs / "filler"
    with filler.open("wb") as fh, contextlib.suppress(OSError):  # fill the disk...
        fh.write(b"\0" * (3 << 20))
    free = shutil.disk_usage(small_fs).free  # ...then leave about 200 KB free
    if free > 300_000:
        filler.unlink()
        filler.write_bytes(b"\0" * (free - 200_000))
    durable = threading.Event()
    for start in range(0, 6000, 500):
        buf.put(
            [Reading(DATASOURCE, {"seq": i, "pad": "z" * 200}) for i in range(start, start + 500)],
            on_durable=durable.set if start == 5500 else None,
        )
    wait_until(lambda: buf.error is not None, timeout=20, what="the write to fail")
    assert "full" in str(buf.error)
    assert not durable.is_set()
    filler.unlink()  # space comes back
    assert buf.flush(timeout=30)
    assert durable.is_set() and buf.error is None
    buf.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 6000
    conn.close()


def test_low_free_space_is_treated_as_a_full_buffer(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    buf = Buffer(
        tmp_path / "b.db",
        BufferConfig(
            min_free_bytes=free + (1 << 30), when_full="drop_newest", commit_interval_ms=5
        ),
    )
    buf.open()
    buf.put([reading(i) for i in range(20_000)])
    assert buf.flush()
    buf.close()
    session = BufferSession(tmp_path / "b.db")
    kept = session.pending_count()
    dropped = session.stats().counters.get(f"dropped.buffer_full.{DATASOURCE}", 0)
    session.close()
    # The file may not grow at all: only what fitted in its first pages was kept.
    assert dropped > 0 and kept + dropped == 20_000


# -- policies ------------------------------------------------------------------------------


def test_block_holds_waiting_sources_and_drops_only_those_that_cannot_wait(
    tmp_path: Path,
) -> None:
    buf = Buffer(
        tmp_path / "b.db",
        BufferConfig(max_bytes=1 << 20, when_full="block", commit_interval_ms=5),
    )
    buf.open()
    acked: list[int] = []
    seq = 0
    while not buf.full:
        buf.put(
            [Reading(DATASOURCE, {"seq": seq, "pad": "p" * 300})],
            functools.partial(acked.append, seq),
            can_wait=True,
        )
        seq += 1
        if seq % 200 == 0:
            buf.flush(timeout=5)
    buf.flush(timeout=5)
    waiting = [Reading(DATASOURCE, {"seq": seq + i, "pad": "p" * 300}) for i in range(50)]
    for r in waiting:
        buf.put([r], functools.partial(acked.append, r.record["seq"]), can_wait=True)
    buf.put([reading(-1)])  # a serial reading: cannot wait, dropped and counted
    time.sleep(0.5)
    assert max(acked) < seq, "nothing may be acknowledged while the buffer is full"
    session = BufferSession(tmp_path / "b.db")
    while (batch := session.next_batch(500, 1 << 30)) is not None and len(acked) < seq + 50:
        session.ack(batch)  # the uploader makes room
        time.sleep(0.05)
    wait_until(lambda: len(acked) == seq + 50, timeout=20, what="the held messages to commit")
    assert sorted(acked) == list(range(seq + 50))
    buf.close()
    assert session.stats().counters.get(f"dropped.buffer_full.{DATASOURCE}") == 1
    session.close()


def test_max_age_drops_old_readings_and_counts_them(tmp_path: Path) -> None:
    clock = FakeClock(BUILD_EPOCH + 86400)
    buf = Buffer(
        tmp_path / "b.db",
        BufferConfig(max_age="1h", commit_interval_ms=5),
        clock,
        maintenance_interval_s=0.05,
    )
    buf.open()
    buf.put([reading(i) for i in range(10)])
    assert buf.flush()
    clock.advance(3601)
    buf.put([reading(i) for i in range(10, 15)])
    assert buf.flush()
    wait_until(lambda: seqs_in(tmp_path / "b.db") == list(range(10, 15)), what="expiry")
    buf.close()
    session = BufferSession(tmp_path / "b.db")
    assert session.stats().counters[f"dropped.max_age.{DATASOURCE}"] == 10
    session.close()


# -- clock ---------------------------------------------------------------------------------


def _clock_agent(tmp_path: Path, sandbox: Sandbox, clock: FakeClock, **agent: object) -> Agent:
    # A fake clock: the sandbox's Date (real time) would contradict it, so the clock is
    # judged from the wall clock alone (time from the uplink: tests/test_uplink_time.py).
    agent.setdefault("time_from_uplink", False)
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(tmp_path / "no-port")],
        agent=dict(agent),
    )
    return Agent(
        load_config(config),
        clock=clock,
        guard_options={"ntp_synced": lambda: None, "settle_s": 5.0},
    )


def test_boot_at_1970_holds_readings_then_sends_them_with_true_times(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    clock = FakeClock(wall=12.0, mono=500.0)
    agent = _clock_agent(tmp_path, sandbox, clock)
    agent.start()
    try:
        assert agent.guard is not None and not agent.guard.trusted
        assert agent.intake is not None
        from edge_agent.clock import utc_stamp

        for i in range(5):
            record = {"timestamp": utc_stamp(clock.wall()), "seq": i}
            agent.intake.put([Reading(DATASOURCE, record)])
            clock.advance(1.0)
        agent.buffer.flush()
        time.sleep(0.5)
        assert sandbox.records(DATASOURCE) == []  # held, never sent with a 1970 date
        true_start = BUILD_EPOCH + 10 * 86400
        clock.jump(true_start - clock.wall() + 5.0)  # NTP sets the clock: 5 s after the start
        agent.tick()
        clock.advance(6.0)
        agent.tick()
        assert agent.guard.trusted
        records = wait_until(
            lambda: len(sandbox.records(DATASOURCE)) == 5 and sandbox.records(DATASOURCE)
        )
        for i, r in enumerate(sorted(records, key=lambda r: r["seq"])):
            from datetime import datetime

            t = datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
            assert abs(t - (true_start + i)) < 0.01, (r, true_start + i)
            assert "time_quality" not in r
    finally:
        agent.stop()


def test_a_jump_backwards_does_not_reorder_or_misstamp(tmp_path: Path, sandbox: Sandbox) -> None:
    start = BUILD_EPOCH + 20 * 86400
    clock = FakeClock(wall=start)
    agent = _clock_agent(tmp_path, sandbox, clock)
    agent.start()
    from datetime import datetime

    from edge_agent.clock import utc_stamp

    def put(seq: int) -> None:
        record = {"timestamp": utc_stamp(clock.wall()), "seq": seq}
        assert agent.intake is not None
        agent.intake.put([Reading(DATASOURCE, record)])

    try:
        for i in range(3):
            put(i)
            clock.advance(1.0)
        clock.jump(-3600.0)  # someone sets the clock back an hour
        agent.tick()
        assert agent.guard is not None and not agent.guard.trusted
        for i in range(3, 6):
            put(i)
            clock.advance(1.0)
        clock.advance(5.0)
        agent.tick()
        assert agent.guard.trusted
        records = wait_until(
            lambda: len(sandbox.records(DATASOURCE)) == 6 and sandbox.records(DATASOURCE)
        )
        assert [r["seq"] for r in records] == list(range(6))
        times = [
            datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
            for r in records
        ]
        assert times[:3] == pytest.approx([start, start + 1, start + 2], abs=0.01)
        # After the jump: the new wall clock, consistently, one second apart.
        assert times[3:] == pytest.approx([start + 3 - 3600 + i for i in range(3)], abs=0.01)
    finally:
        agent.stop()


def test_readings_held_by_an_earlier_boot_are_estimated_and_flagged(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    data = tmp_path / "data"
    buf = Buffer(data / "buffer.db", BufferConfig())
    buf.open()
    buf.close()
    conn = sqlite3.connect(data / "buffer.db", isolation_level=None)
    conn.execute("INSERT INTO schemas(id, signature) VALUES (77, 'seq:n,timestamp:s')")
    conn.executemany(
        "INSERT INTO held(datasource_id, schema_id, created, record, mono, boot) "
        "VALUES (?, 77, 5, ?, ?, 'an-earlier-boot')",
        [
            (DATASOURCE, json.dumps({"timestamp": "1970-01-01T00:00:05.000Z", "seq": i}), 100.0 + i)
            for i in range(3)
        ],
    )
    conn.close()
    clock = FakeClock(wall=BUILD_EPOCH + 30 * 86400, mono=50.0)
    agent = _clock_agent(tmp_path, sandbox, clock)
    agent.start()
    try:
        records = wait_until(
            lambda: len(sandbox.records(DATASOURCE)) == 3 and sandbox.records(DATASOURCE)
        )
        boot_began = clock.wall() - clock.monotonic()
        from datetime import datetime

        for r in records:
            assert r["time_quality"] == "estimated"
            t = datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
            # The earlier boot is taken to have ended just before this one began.
            assert abs(t - (boot_began - (102.0 - (100.0 + r["seq"])))) < 0.01
    finally:
        agent.stop()


# -- inspection ----------------------------------------------------------------------------


def test_export_and_import_carry_readings_to_another_machine(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        write_config(
            d / "agent.toml",
            url="http://127.0.0.1:9/restapi/datasource/insert",
            data_dir=d / "data",
            sources=[serial_source(d / "port")],
        )
    _fill(one / "data" / "buffer.db", 25)
    _fill(two / "data" / "buffer.db", 0)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("buffer", *args)

    exported = cli("export", "--config", str(one / "agent.toml"), "-o", str(tmp_path / "x.jsonl"))
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert len(lines) == 25 and json.loads(lines[0])["record"]["seq"] == 0
    imported = cli("import", "--config", str(two / "agent.toml"), str(tmp_path / "x.jsonl"))
    assert imported.returncode == 0, imported.stderr
    assert seqs_in(two / "data" / "buffer.db") == list(range(25))
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    bad = cli("import", "--config", str(two / "agent.toml"), str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 1 and "line 2: not JSON" in bad.stderr
    assert len(seqs_in(two / "data" / "buffer.db")) == 25  # all or nothing
    stats = cli("stats", "--config", str(two / "agent.toml"), "--json")
    assert json.loads(stats.stdout)["counters"][f"imported.{DATASOURCE}"] == 25


# -- kill -9 during commits and checkpoints -------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from edge_agent.buffer import Buffer
from edge_agent.config import BufferConfig
from edge_agent.records import Reading
start = int(sys.argv[2])
buf = Buffer(Path(sys.argv[1]), BufferConfig(commit_interval_ms=3, max_bytes=1 << 30),
             checkpoint_interval_s=0.02, maintenance_interval_s=0.02)
buf.open()
print("open", flush=True)
seq = start
while True:
    batch = [Reading("67890", {"seq": s, "pad": "k" * 80}) for s in range(seq, seq + 50)]
    last = seq + 49
    buf.put(batch, on_durable=lambda last=last: print(last, flush=True))
    seq += 50
    time.sleep(0.001)
"""


@pytest.mark.slow
def test_kill_9_during_commits_and_checkpoints_never_loses_a_committed_reading(
    tmp_path: Path,
) -> None:
    db = tmp_path / "buffer.db"
    rng = random.Random(7)
    next_seq = 0
    committed_upto = -1
    for _ in range(SLOW_COUNT):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(next_seq)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
        deadline = time.monotonic() + rng.uniform(0.05, 0.6)
        last_seen = committed_upto
        while time.monotonic() < deadline:
            line = proc.stdout.readline().strip()
            if line.isdigit():
                last_seen = max(last_seen, int(line))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for line in proc.stdout.read().split():
            if line.isdigit():
                last_seen = max(last_seen, int(line))
        proc.stdout.close()
        committed_upto = last_seen
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        present = {json.loads(r)["seq"] for (r,) in conn.execute("SELECT record FROM readings")}
        max_present = conn.execute("SELECT max(id) FROM readings").fetchone()[0]
        conn.close()
        assert set(range(committed_upto + 1)) <= present, "a committed reading was lost"
        assert max_present is not None
        next_seq = max(present) + 1
    assert not list(tmp_path.glob("*.corrupt-*")), "a kill -9 must never damage the file"


def test_move_and_drop_fix_readings_stuck_under_a_wrong_datasource(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=tmp_path / "data",
        sources=[serial_source(tmp_path / "port")],
    )
    buf = Buffer(tmp_path / "data" / "buffer.db", BufferConfig())
    buf.open()
    buf.put([reading(i, ds="11111") for i in range(4)] + [reading(9, ds="22222")])
    buf.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("buffer", *args, "--config", str(config))

    moved = cli("move", "--from", "11111", "--to", DATASOURCE)
    assert moved.returncode == 0 and "moved 4 pending readings" in moved.stdout
    refused = cli("drop", "--datasource", "22222")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    dropped = cli("drop", "--datasource", "22222", "--yes")
    assert dropped.returncode == 0 and "dropped 1 pending readings" in dropped.stdout
    session = BufferSession(tmp_path / "data" / "buffer.db")
    st = session.stats()
    session.close()
    assert st.pending == {DATASOURCE: 4}
    assert st.counters["dropped.by_operator.22222"] == 1
