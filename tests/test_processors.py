"""Processors with real parts: a pty sensor, the sandbox endpoint, `edge-agent run`, kill -9.

Scripted inputs run through an agent in this process whose clock the test moves (so every
timestamp, and so every window, is known); the crash test runs `edge-agent run` on the real
clock and checks each window against the raw readings committed with it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.clock import BUILD_EPOCH, utc_stamp
from edge_agent.config import load_config
from edge_agent.processors.durable import GRACE_S
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.testing.harness import Mosquitto, Publisher, run_cli
from tests.fakes import FakeClock
from tests.helpers import (
    DATASOURCE,
    AgentProcess,
    serial_source,
    wait_until,
    write_config,
)
from tests.test_mqtt import (  # the MQTT tests' plumbing, reused
    DS,
    broker,  # noqa: F401 - a fixture: a Mosquitto that logs every packet
    broker_log_count,
    client_id,
    mqtt_source,
)

# A minute boundary, well after the build epoch (a clock before it is not trusted).
T0 = (BUILD_EPOCH // 86400 + 30) * 86400.0


@pytest.fixture
def sensor(tmp_path: Path) -> Iterator[PtySensor]:
    s = PtySensor(tmp_path / "usb-sensor")
    s.plug()
    yield s
    s.unplug()


class Rig:
    """An agent in this process reading `sensor`, on a clock the test moves."""

    def __init__(self, tmp_path: Path, sandbox: Sandbox, sensor: PtySensor) -> None:
        self.tmp_path = tmp_path
        self.sandbox = sandbox
        self.sensor = sensor
        self.clock = FakeClock(T0)
        self.agent: Agent | None = None

    def write(self, **source: Any) -> Path:
        return write_config(
            self.tmp_path / "agent.toml",
            url=self.sandbox.url,
            data_dir=self.tmp_path / "data",
            sources=[serial_source(self.sensor.link, **source)],
            # The test's clock is not the sandbox's: its Date must not correct this one.
            agent={"time_from_uplink": False},
        )

    def start(self, **source: Any) -> Agent:
        config = self.write(**source)
        self.agent = Agent(
            load_config(config), clock=self.clock, guard_options={"ntp_synced": lambda: None}
        )
        self.agent.start()
        wait_until(lambda: self.agent is not None and self.agent.sources["weather"].stats.connected)
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def feed(self, script: list[tuple[float, str]]) -> None:
        """Write each line when the clock reads T0 + its time, once the last was read."""
        assert self.agent is not None
        stats = self.agent.sources["weather"].stats
        for at, line in script:
            self.clock.advance(T0 + at - self.clock.wall())
            before = stats.lines
            assert self.sensor.write_line(line)

            def read(b: int = before) -> bool:
                return stats.lines > b

            wait_until(read, what=f"the agent to read {line!r}")

    def settle(self, until: float, expected: int) -> list[dict[str, Any]]:
        """Move the clock to T0 + `until` (past every window), wait for `expected` records."""
        assert self.agent is not None
        self.clock.advance(T0 + until - self.clock.wall())
        self.agent.buffer.commit_soon()  # the writer wakes to the clock the test moved
        wait_until(
            lambda: len(self.sandbox.records(DATASOURCE)) >= expected,
            what=f"{expected} records at the sandbox",
        )
        assert self.agent.buffer.flush()
        wait_until(lambda: pending(self.tmp_path) == 0, what="the buffer to drain")
        return [without_device(r) for r in self.sandbox.records(DATASOURCE)]


@pytest.fixture
def rig(tmp_path: Path, sandbox: Sandbox, sensor: PtySensor) -> Iterator[Rig]:
    r = Rig(tmp_path, sandbox, sensor)
    yield r
    r.stop()


def pending(tmp_path: Path) -> int:
    conn = sqlite3.connect(tmp_path / "data" / "buffer.db", timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
    finally:
        conn.close()


def without_device(record: dict[str, Any]) -> dict[str, Any]:
    assert record.pop("device_id") == "gw-test"
    return record


def at(seconds: float) -> str:
    return utc_stamp(T0 + seconds)


def long(seconds: float, metric: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"timestamp": at(seconds), "metric": metric, "value": value, **extra}


def window(start: float, metric: str, figures: dict[str, Any], window_s: int = 60) -> list[Any]:
    return [long(start, f"{metric}_{s}", v, window_s=window_s) for s, v in figures.items()]


def ordered(records: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in records)


# -- scripted inputs -------------------------------------------------------------------------


def test_aggregate_long_sends_each_window_once_and_empty_windows_nothing(rig: Rig) -> None:
    rig.start(
        shape="long",
        processors=[{"type": "aggregate", "metrics": ["vib*"], "window_s": 60}],
    )
    rig.feed(
        [
            (0.5, "vibration=1 temp=20"),
            (10, "vibration=3"),
            (59.999, "vibration=2"),
            (61, "vibration=7.5"),  # the only value of its window
            # 120-180: no value, so no record
            (185, "vibration=4 temp=21"),
        ]
    )
    got = rig.settle(until=240 + GRACE_S + 1, expected=2 + 3 * 5)
    want = [
        long(0.5, "temp", 20),
        long(185, "temp", 21),
        *window(0, "vibration", {"mean": 2.0, "min": 1, "max": 3, "count": 3, "last": 2}),
        *window(60, "vibration", {"mean": 7.5, "min": 7.5, "max": 7.5, "count": 1, "last": 7.5}),
        *window(180, "vibration", {"mean": 4.0, "min": 4, "max": 4, "count": 1, "last": 4}),
    ]
    assert ordered(got) == ordered(want)


def test_wide_records_are_renamed_scaled_filtered_and_aggregated(rig: Rig) -> None:
    rig.start(
        shape="wide",
        processors=[
            {"type": "rename", "from": "temp_c", "to": "temperature"},
            {"type": "scale", "metric": "pressure", "scale": 0.001, "offset": 0.5},
            {"type": "drop", "metrics": ["debug_*"]},
            {"type": "aggregate", "metrics": ["vibration"], "stats": ["mean", "max", "count"]},
        ],
    )
    rig.feed(
        [
            (1, "vibration=1 temp_c=20 pressure=101000 debug_x=5"),
            (2, "vibration=5 debug_y=1"),  # nothing left to send raw
            (30, "vibration=3 temp_c=21"),
        ]
    )
    got = rig.settle(until=60 + GRACE_S + 1, expected=3)
    want = [
        {"timestamp": at(1), "temperature": 20, "pressure": 101.5},
        {"timestamp": at(30), "temperature": 21},
        {
            "timestamp": at(0),
            "vibration_mean": 3.0,
            "vibration_max": 5,
            "vibration_count": 3,
            "window_s": 60,
        },
    ]
    assert ordered(got) == ordered(want)


def test_keep_and_scale_errors_are_counted_not_fatal(rig: Rig, tmp_path: Path) -> None:
    rig.start(
        shape="long",
        processors=[
            {"type": "drop", "keep": ["level", "state"]},
            {"type": "scale", "metric": "state", "scale": 2.0},
        ],
    )
    rig.feed([(1, "level=3 state=open other=1"), (2, "level=4 state=2")])
    got = rig.settle(until=3, expected=4)
    want = [long(1, "level", 3), long(1, "state", "open"), long(2, "level", 4)]
    want.append(long(2, "state", 4.0))
    assert ordered(got) == ordered(want)
    conn = sqlite3.connect(tmp_path / "data" / "buffer.db")
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    conn.close()
    assert counters["processors.errors.weather"] == 1  # "open" is not a number
    assert counters["processors.filtered.weather"] == 1  # other=1


def test_deadband_sends_moves_and_heartbeats_and_remembers_across_a_restart(rig: Rig) -> None:
    deadband = {"type": "deadband", "metric": "level", "delta": 0.5, "heartbeat_s": 10}
    rig.start(shape="long", processors=[deadband])
    rig.feed(
        [
            (0, "level=10.0"),  # the first: sent
            (1, "level=10.3"),  # moved 0.3
            (2, "level=10.6"),  # moved 0.6 from 10.0: sent
            (3, "level=10.2"),  # moved 0.4 from 10.6
            (13, "level=10.2"),  # 11 s since the last sent: heartbeat
        ]
    )
    rig.settle(until=13.5, expected=3)
    rig.stop()
    rig.start(shape="long", processors=[deadband])
    rig.feed([(14, "level=10.3"), (14.5, "level=11.0")])
    got = rig.settle(until=15, expected=4)
    sent = [long(0, "level", 10.0), long(2, "level", 10.6), long(13, "level", 10.2)]
    sent.append(long(14.5, "level", 11.0))
    assert ordered(got) == ordered(sent)


def test_a_reload_changes_processors_in_place_and_deadband_goes_on_from_its_state(
    rig: Rig,
) -> None:
    rig.start(shape="long", processors=[{"type": "deadband", "metric": "level", "delta": 0.5}])
    rig.feed([(0, "level=10"), (1, "level=11")])  # both sent
    rig.settle(until=2, expected=2)
    rig.write(
        shape="long",
        processors=[
            {"type": "deadband", "metric": "level", "delta": 5},
            {"type": "rename", "from": "level", "to": "height"},
        ],
    )
    assert rig.agent is not None and rig.agent.reload()
    rig.feed([(3, "level=14"), (4, "level=17")])  # 3 from 11: no; 6 from 11: sent
    got = rig.settle(until=5, expected=3)
    want = [long(0, "level", 10), long(1, "level", 11), long(4, "height", 17)]
    assert ordered(got) == ordered(want)


# -- crashes ---------------------------------------------------------------------------------


def test_kill_9_during_an_open_window_sends_each_window_once_with_every_value(
    tmp_path: Path, sandbox: Sandbox, sensor: PtySensor
) -> None:
    """Each line has `seq` (sent raw) and `v` (aggregated): both are committed together, so
    each window's count must equal the raw readings of its time, whatever the crash lost."""
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[
            serial_source(
                sensor.link,
                shape="long",
                processors=[
                    {
                        "type": "aggregate",
                        "metrics": ["v"],
                        "window_s": 4,
                        "stats": ["count", "sum"],
                    }
                ],
            )
        ],
        endpoint={"record_id_field": "rid"},
    )
    seq = 0

    def write_for(seconds: float) -> None:
        nonlocal seq
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sensor.write_line(f"seq={seq} v=1")
            seq += 1
            time.sleep(0.02)

    agents: list[AgentProcess] = []
    try:
        for run in range(3):
            agent = AgentProcess(config, tmp_path / "agent.log").start()
            agents.append(agent)

            def opened(a: AgentProcess = agent, n: int = run) -> bool:
                return a.log_text().count("serial weather: reading") > n

            wait_until(opened, what="the port open")
            if run == 2:
                break
            # Into the middle of a window, then the crash while it is open.
            write_for(2.0 + (4 - time.time() % 4) % 4)
            agent.kill9()
        write_for(3.0)
        last = time.time()
        wait_until(
            lambda: _windows(sandbox) and max(_windows(sandbox)) >= last - 4 - 4,
            timeout=30,
            what="the last windows to be sent",
        )
        assert agent.terminate() == 0
    finally:
        for a in agents:
            a.ensure_dead()
    raw = _raw_seqs_by_window(sandbox, 4)
    windows = _windows(sandbox)
    assert len(windows) >= 3
    for start, figures in windows.items():
        if start + 4 > last:
            continue  # still open when the agent stopped
        assert figures == {"count": len(raw[start]), "sum": float(len(raw[start]))}, start
    assert sum(len(v) for v in raw.values()) > 0


def _windows(sandbox: Sandbox) -> dict[float, dict[str, Any]]:
    """Window start -> {stat: value}; asserts no window was sent twice with other figures
    (a resend of the same record after a lost answer has the same id)."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in sandbox.records(DATASOURCE):
        if "window_s" in r:
            assert by_id.setdefault(r["rid"], r) == r
    seen: dict[float, dict[str, Any]] = defaultdict(dict)
    for r in by_id.values():
        stat = r["metric"].removeprefix("v_")
        start = _epoch(r["timestamp"])
        assert stat not in seen[start], f"window {r['timestamp']} sent twice"
        seen[start][stat] = r["value"]
    return dict(seen)


def _raw_seqs_by_window(sandbox: Sandbox, window_s: int) -> dict[float, set[int]]:
    out: dict[float, set[int]] = defaultdict(set)
    for r in sandbox.records(DATASOURCE):
        if r.get("metric") == "seq":
            t = _epoch(r["timestamp"])
            out[t - t % window_s].add(int(r["value"]))
    return out


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processor", "words"),
    [
        ({"type": "aggregat", "metrics": ["v"]}, ["type", "did you mean 'aggregate'"]),
        ({"type": "deadband", "metric": "v", "delta": 1, "heartbeat": 5}, ["'heartbeat_s'"]),
        ({"type": "aggregate", "metrics": ["v"], "stats": ["avg"]}, ["stats", "'avg'"]),
        ({"type": "aggregate", "metrics": ["v"], "window_s": 0}, ["window_s"]),
        ({"type": "drop", "metrics": ["a"], "keep": ["b"]}, ["either metrics", "or keep"]),
        ({"type": "rename", "from": "a"}, ["missing required key 'to'"]),
        ({"type": "scale", "metric": "p", "scale": "x"}, ["scale", "expected a number"]),
    ],
)
def test_bad_processor_config_exits_2_naming_the_key(
    tmp_path: Path, processor: dict[str, Any], words: list[str]
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/insert",
        data_dir=tmp_path / "data",
        sources=[serial_source(tmp_path / "no-port", processors=[processor])],
    )
    proc = run_cli("run", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert "processors #1" in proc.stderr
    for word in words:
        assert word in proc.stderr
    assert not (tmp_path / "data" / "buffer.db").exists()


# -- MQTT ------------------------------------------------------------------------------------


def test_a_strict_brokers_window_of_20_never_waits_for_an_aggregate_window(
    tmp_path: Path,
    sandbox: Sandbox,
    broker: Mosquitto,  # noqa: F811 - the fixture imported above
) -> None:
    """Values go into a day-long window; each message is acknowledged once its value is
    committed there, so 300 messages through a window of 20 all come back acknowledged
    while the window is still open. Each device (a topic field) has its own series."""
    source = mqtt_source(
        broker,
        topic_fields="sensors/{device}/+",
        mqtt_version="3.1.1",
        inflight_window=20,
        processors=[
            {"type": "aggregate", "metrics": ["vibration"], "window_s": 86400, "stats": ["count"]}
        ],
    )
    config = write_config(
        tmp_path / "agent.toml", url=sandbox.url, data_dir=tmp_path / "data", sources=[source]
    )
    agent = Agent(load_config(config))
    agent.start()
    publisher = Publisher(broker)
    try:
        wait_until(lambda: agent.sources["plant"].stats.connected, what="the MQTT source")
        for i in range(300):
            publisher.publish(f"sensors/{'ab'[i % 2]}/x", json.dumps({"vibration": i}))
        acks = f"Received PUBACK from {client_id()} "
        wait_until(lambda: broker_log_count(broker, acks) >= 300, 60, "the agent's PUBACKs")
        sent = Counter(r["device"] for r in sandbox.records(DS) if "vibration_count" in r)
        conn = sqlite3.connect(tmp_path / "data" / "buffer.db", timeout=30)
        try:
            rows = conn.execute("SELECT series, n FROM windows").fetchall()
        finally:
            conn.close()
        for series, n in rows:
            sent[json.loads(series)["device"]] += n
        assert sent == {"a": 150, "b": 150}
    finally:
        publisher.close()
        agent.stop()
