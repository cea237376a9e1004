"""Fixtures with real parts: the sandbox endpoint, pty sensors, a private Mosquitto, Modbus
slave processes, agent processes (the parts themselves: edge_agent.testing.harness)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from edge_agent.agent import Agent
from edge_agent.clock import NTP_SYNCED_ENV
from edge_agent.config import load_config
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.testing.harness import (
    DATASOURCE,
    TOKEN,
    AgentProcess,
    Mosquitto,
    mosquitto_binary,
    serial_source,
    write_config,
)
from edge_agent.testing.modbus_slave import SlaveProcess

# The kernel's NTP state differs between machines (synchronised on most, never in many
# containers), and with it what an agent does at start: confirmed at once, or after one probe
# of the endpoint (time from the uplink). Every agent the tests start, in this process or as
# a child, sees a synchronised clock unless its test says otherwise
# (tests/test_uplink_time.py runs the unsynchronised paths).
os.environ[NTP_SYNCED_ENV] = "yes"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """Under EDGE_AGENT_NO_SKIPS=1 (CI), a skipped test fails: CI must run every test."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("EDGE_AGENT_NO_SKIPS") == "1" and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under EDGE_AGENT_NO_SKIPS=1 (CI): {report.longrepr}"


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sbx = Sandbox(tokens=[TOKEN], datasources=[DATASOURCE, "67891"], db_path=tmp_path / "sbx.db")
    sbx.start()
    yield sbx
    sbx.stop()


@pytest.fixture
def make_agent(tmp_path: Path, sandbox: Sandbox) -> Iterator[Callable[..., Agent]]:
    """Agents run in this process, stopped at the end of the test: each with the given
    sources, its config in `config` (default `<data>.toml`) and its buffer in `<data>/`."""
    running: list[Agent] = []

    def make(
        *sources: dict[str, Any], data: str = "data", device: str = "gw-test", config: str = ""
    ) -> Agent:
        path = write_config(
            tmp_path / (config or f"{data}.toml"),
            url=sandbox.url,
            data_dir=tmp_path / data,
            sources=list(sources),
            agent={"device_id": device},
        )
        agent = Agent(load_config(path))
        agent.start()
        running.append(agent)
        return agent

    yield make
    for agent in running:
        agent.stop()


@pytest.fixture
def serial_agent(make_agent: Callable[..., Agent]) -> Callable[..., Agent]:
    """Agents with one serial source ("weather") on the given port, run in this process."""

    def make(**source: object) -> Agent:
        port = Path(str(source.pop("port")))
        return make_agent(serial_source(port, **source), config="agent.toml")

    return make


@pytest.fixture
def pty_sensor(tmp_path: Path) -> Iterator[PtySensor]:
    sensor = PtySensor(tmp_path / "serial-by-id-usb-weather", rate_hz=50)
    sensor.plug()
    yield sensor
    sensor.stop()
    sensor.unplug()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("EDGE_AGENT_REQUIRE_BROKER") == "1":
            pytest.fail("mosquitto is not installed and EDGE_AGENT_REQUIRE_BROKER=1")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Mosquitto(workdir, binary)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes a test started (append them); any still running are killed."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.ensure_dead()


@pytest.fixture
def slaves() -> Iterator[Callable[..., SlaveProcess]]:
    """Start Modbus slave processes (`SlaveProcess` arguments); all are stopped at the end."""
    started: list[SlaveProcess] = []

    def start(**kwargs: Any) -> SlaveProcess:
        slave = SlaveProcess(**kwargs).start()
        started.append(slave)
        return slave

    yield start
    for slave in started:
        slave.stop()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
