"""The serial source through real pseudo-terminals opened by pyserial by path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.buffer import BufferSession
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from tests.helpers import DATASOURCE, wait_until
from tests.helpers import serial_connected as connected


def test_lines_become_records_with_utc_stamps_and_tags(
    serial_agent: Callable[..., Agent], pty_sensor: PtySensor, sandbox: Sandbox
) -> None:
    agent = serial_agent(port=pty_sensor.link, shape="long", tags={"site": "north"})
    wait_until(lambda: connected(agent), what="port open")
    pty_sensor.write_line("temperature=22.5 humidity=40")
    pty_sensor.write_line("status=ok")
    records = wait_until(lambda: len(sandbox.records(DATASOURCE)) == 3 and sandbox.records())
    by_metric = {r["metric"]: r for r in records}
    assert by_metric["temperature"]["value"] == 22.5
    assert by_metric["humidity"]["value"] == 40
    assert by_metric["status"]["value"] == "ok"
    for r in records:
        assert r["site"] == "north" and r["device_id"] == "gw-test"
        assert len(r["timestamp"]) == 24 and r["timestamp"].endswith("Z")


@pytest.mark.parametrize(
    ("source", "line", "expected"),
    [
        ({"format": "json"}, '{"t": 1.5, "meta": {"fw": "2.1"}}', {"t": 1.5, "meta.fw": "2.1"}),
        ({"format": "csv", "columns": ["t", "h"]}, "21.5,40", {"t": 21.5, "h": 40}),
        ({"format": "regex", "pattern": r"T=(?P<t>[-0-9.]+)C"}, "T=-3.5C ok", {"t": -3.5}),
        ({"format": "number", "metric": "level"}, " 17.25 ", {"level": 17.25}),
        ({"format": "kv"}, "t:1,h:2", {"t": 1, "h": 2}),
    ],
)
def test_line_formats(
    serial_agent: Callable[..., Agent],
    pty_sensor: PtySensor,
    sandbox: Sandbox,
    source: dict[str, Any],
    line: str,
    expected: dict[str, Any],
) -> None:
    agent = serial_agent(port=pty_sensor.link, **source)
    wait_until(lambda: connected(agent), what="port open")
    pty_sensor.write_line(line)
    (record,) = wait_until(lambda: sandbox.records(DATASOURCE), what="the record")
    assert {k: record[k] for k in expected} == expected


def test_bad_input_is_counted_and_never_stops_the_source(
    serial_agent: Callable[..., Agent],
    pty_sensor: PtySensor,
    sandbox: Sandbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = serial_agent(port=pty_sensor.link, max_line_bytes=64)
    wait_until(lambda: connected(agent), what="port open")
    pty_sensor.write_line("seq=1")
    pty_sensor.write_line("this is not kv at all")
    pty_sensor.write_line("seq=" + "9" * 200)  # over-long
    with pty_sensor._lock:
        assert pty_sensor._master is not None
        os.write(pty_sensor._master, b"\xff\xfe\x00garbage\xc3\x28\r\n")  # not UTF-8
    pty_sensor.write_line("seq=nan")
    pty_sensor.write_line("seq=2")
    wait_until(lambda: len(sandbox.records(DATASOURCE)) == 2, what="the two good lines")
    assert [r["seq"] for r in sandbox.records(DATASOURCE)] == [1, 2]
    stats = agent.sources["weather"].stats
    assert stats.parse_errors == 4
    assert agent.sources["weather"].alive
    agent.buffer.flush()
    session = BufferSession(agent.config.buffer_path)
    assert session.stats().counters["dropped.unparseable.weather"] == 4
    session.close()


def test_unplug_and_replug_resume_reading(
    serial_agent: Callable[..., Agent], pty_sensor: PtySensor, sandbox: Sandbox
) -> None:
    agent = serial_agent(port=pty_sensor.link)
    wait_until(lambda: connected(agent), what="port open")
    pty_sensor.write_line("seq=1")
    wait_until(lambda: len(sandbox.records(DATASOURCE)) == 1, what="first line")
    pty_sensor.unplug()
    wait_until(lambda: not connected(agent), what="the source to notice the unplug")
    assert "disappeared" in (agent.sources["weather"].stats.last_error or "") or \
        "cannot open" in (agent.sources["weather"].stats.last_error or "")  # fmt: skip
    pty_sensor.plug()
    wait_until(lambda: connected(agent), timeout=15, what="the source to reopen the port")
    pty_sensor.write_line("seq=2")
    wait_until(lambda: len(sandbox.records(DATASOURCE)) == 2, what="line after replug")
    assert agent.sources["weather"].stats.reconnects == 1


def test_missing_port_at_start_is_retried_until_it_appears(
    serial_agent: Callable[..., Agent], tmp_path: Path, sandbox: Sandbox
) -> None:
    sensor = PtySensor(tmp_path / "late-device")
    agent = serial_agent(port=sensor.link)
    wait_until(lambda: agent.sources["weather"].stats.last_error, what="open failure noted")
    assert "cannot open" in (agent.sources["weather"].stats.last_error or "")
    sensor.plug()
    try:
        wait_until(lambda: connected(agent), timeout=15, what="late device opened")
        sensor.write_line("seq=7")
        wait_until(lambda: sandbox.records(DATASOURCE), what="the record")
    finally:
        sensor.unplug()


def test_silent_port_is_reported_and_reopened(
    serial_agent: Callable[..., Agent], pty_sensor: PtySensor, sandbox: Sandbox
) -> None:
    agent = serial_agent(port=pty_sensor.link, silence_timeout_s=1.0)
    wait_until(lambda: connected(agent), what="port open")
    wait_until(
        lambda: "no data" in (agent.sources["weather"].stats.last_error or ""),
        timeout=10,
        what="the silence to be reported",
    )
    wait_until(lambda: connected(agent), timeout=10, what="reopened")
    pty_sensor.write_line("seq=3")
    wait_until(lambda: sandbox.records(DATASOURCE), what="line after reopen")
