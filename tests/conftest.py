"""Fixtures with real parts: the sandbox endpoint, pty sensors, a private Mosquitto, Modbus
slave processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.clock import NTP_SYNCED_ENV
from edge_agent.config import load_config
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.testing.modbus_slave import SlaveProcess
from tests.helpers import DATASOURCE, TOKEN, serial_source, write_config

# The kernel's NTP state differs between machines (synchronised on most, never in many
# containers), and with it what an agent does at start: confirmed at once, or after one probe
# of the endpoint (time from the uplink). Every agent the tests start, in this process or as
# a child, sees a synchronised clock unless its test says otherwise
# (tests/test_uplink_time.py runs the unsynchronised paths).
os.environ[NTP_SYNCED_ENV] = "yes"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under EDGE_AGENT_NO_SKIPS=1 (CI), a skipped test fails: CI must run every test."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("EDGE_AGENT_NO_SKIPS") == "1" and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under EDGE_AGENT_NO_SKIPS=1 (CI): {report.longrepr}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sbx = Sandbox(tokens=[TOKEN], datasources=[DATASOURCE, "67891"], db_path=tmp_path / "sbx.db")
    sbx.start()
    yield sbx
    sbx.stop()


@pytest.fixture
def serial_agent(tmp_path: Path, sandbox: Sandbox) -> Iterator[Callable[..., Agent]]:
    """Agents with one serial source ("weather") on the given port, run in this process."""
    agents: list[Agent] = []

    def make(**source: object) -> Agent:
        port = Path(str(source.pop("port")))
        config = write_config(
            tmp_path / "agent.toml",
            url=sandbox.url,
            data_dir=tmp_path / "data",
            sources=[serial_source(port, **source)],
        )
        agent = Agent(load_config(config))
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def pty_sensor(tmp_path: Path) -> Iterator[PtySensor]:
    sensor = PtySensor(tmp_path / "serial-by-id-usb-weather", rate_hz=50)
    sensor.plug()
    yield sensor
    sensor.stop()
    sensor.unplug()


class Mosquitto:
    """A private broker on a free port; `restart` keeps the port (and its persistence)."""

    def __init__(
        self,
        workdir: Path,
        binary: str,
        *,
        allow_anonymous: bool = True,
        extra_conf: str = "",
    ) -> None:
        """`extra_conf`: more mosquitto.conf lines (a password file, a plugin, log_type all)."""
        self.workdir = workdir
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        # Started as root, mosquitto switches to the `mosquitto` user, which cannot write its
        # log and persistence file in the test's directory: stay root instead.
        as_root = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            as_root + f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"
            f"log_dest file {workdir}/mosquitto.log\n" + extra_conf
        )

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    binary = _mosquitto_binary()
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
