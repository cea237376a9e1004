"""The agent as a real process: kill -9 while uploading, uplink outage, clean stop."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.sandbox import Faults, Sandbox
from edge_agent.simulator import PtySensor
from tests.helpers import DATASOURCE, TOKEN, AgentProcess, serial_source, wait_until, write_config


def seq_line(seq: int, t: float) -> str:
    return f"seq={seq} temperature={20 + seq % 10}.5"


@pytest.fixture
def sensor(tmp_path: Path) -> Iterator[PtySensor]:
    s = PtySensor(tmp_path / "usb-weather", rate_hz=100, line_for=seq_line)
    s.plug()
    yield s
    s.stop()
    s.unplug()


def pending_seqs(db: Path) -> set[int]:
    if not db.exists():
        return set()
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("SELECT record FROM readings").fetchall()
    finally:
        conn.close()
    return {json.loads(r[0])["seq"] for r in rows}


def received_seqs(sandbox: Sandbox) -> list[int]:
    return [int(r["seq"]) for r in sandbox.records(DATASOURCE)]


def write_lines(sensor: PtySensor, start: int, count: int) -> int:
    for seq in range(start, start + count):
        assert sensor.write_line(seq_line(seq, 0))
        time.sleep(0.002)
    return start + count


def test_kill_9_while_uploading_loses_nothing(
    tmp_path: Path, sandbox: Sandbox, sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    # A slow endpoint and small batches keep requests in flight when the kill lands.
    sandbox.set_faults(Faults(latency_ms=150))
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(sensor.link)],
        endpoint={"max_batch_records": 10},
    )
    db = tmp_path / "data" / "buffer.db"
    written = 0
    for round_ in range(3):
        agent = AgentProcess(config, tmp_path / "agent.log").start()
        agents.append(agent)

        def opened(a: AgentProcess = agent, n: int = round_) -> bool:
            return a.log_text().count("serial weather: reading") >= n + 1

        wait_until(opened, what="the port to be opened")
        first = written
        written = write_lines(sensor, written, 200)

        # Serial lines are accepted once committed: wait for that, then kill mid-upload.
        def committed(lo: int = first, hi: int = written) -> bool:
            return set(range(lo, hi)) <= pending_seqs(db) | set(received_seqs(sandbox))

        wait_until(committed, timeout=20, what="all lines committed")
        assert pending_seqs(db), "the kill should land while readings wait for upload"
        agent.kill9()
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    sandbox.set_faults(Faults())
    wait_until(lambda: not pending_seqs(db), timeout=60, what="the backlog to drain")
    got = received_seqs(sandbox)
    assert set(got) == set(range(written)), sorted(set(range(written)) - set(got))[:20]
    assert agent.terminate() == 0


def test_outage_everything_arrives_afterwards_in_order(
    tmp_path: Path, sandbox: Sandbox, sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(sensor.link)],
        endpoint={"max_batch_records": 50},
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("serial weather: reading")
    written = write_lines(sensor, 0, 100)
    wait_until(lambda: len(received_seqs(sandbox)) == 100, what="the first lines")
    port, db_path = sandbox.port, tmp_path / "sbx.db"
    sandbox.stop()
    written = write_lines(sensor, written, 300)
    agent.wait_log("readings are kept, retrying")
    back = Sandbox(port=port, tokens=[TOKEN], datasources=[DATASOURCE], db_path=db_path).start()
    try:
        wait_until(lambda: len(set(received_seqs(back))) >= written, timeout=30, what="drain")
        got = received_seqs(back)
        assert set(got) == set(range(written))
        assert got == sorted(got), "readings of one data source must arrive oldest first"
    finally:
        back.stop()
    assert agent.terminate() == 0
    assert "uploads succeed again" in agent.log_text()


def test_sigterm_commits_what_was_read_and_exits_0(
    tmp_path: Path, sandbox: Sandbox, sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    sandbox.set_faults(Faults(status=503))  # nothing leaves: all must be in the buffer
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(sensor.link)],
        buffer={"commit_interval_ms": 1000},  # a long window: the stop must commit it
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("serial weather: reading")
    write_lines(sensor, 0, 50)
    time.sleep(0.3)  # let the source read them (they are then in the open commit window)
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None and agent.proc.wait(30) == 0
    assert pending_seqs(tmp_path / "data" / "buffer.db") == set(range(50))
    assert "agent: stopped" in agent.log_text()
