"""The contract every source type keeps, run against each registered type with real parts.

A rig plays the device of one type: a pty for serial (pushed and polled), a private Mosquitto
for MQTT, the Modbus slave process for Modbus. Every registered type must have a rig here, so
a new type cannot skip the contract: it starts and stops, survives its device going away,
counts and logs bad input without stopping, takes a reload, and stamps readings in UTC when
they are read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtyResponder, PtySensor
from edge_agent.sources.registry import source_types
from edge_agent.testing.harness import Mosquitto, Publisher
from edge_agent.testing.modbus_slave import SlaveProcess
from tests.helpers import DATASOURCE, wait_until
from tests.test_mqtt import client_id, wait_subscribed

NAME = "dut"


class Rig(Protocol):
    """A device of one source type that a test can drive."""

    def table(self) -> dict[str, Any]:
        """The `[[sources]]` table (name NAME, wide shape, DATASOURCE) reading this device."""
        ...

    def ready(self, agent: Agent) -> None:
        """Wait until the device can be read (subscribed, port open)."""
        ...

    def good(self, seq: int) -> None:
        """Make the device produce a reading whose field `seq` is `seq`."""
        ...

    def bad(self) -> None:
        """Make the device produce input that cannot become readings."""
        ...

    def unplug(self) -> None: ...

    def plug(self) -> None: ...


class SerialRig:
    def __init__(self, tmp_path: Path) -> None:
        self.sensor = PtySensor(tmp_path / "serial-by-id-usb-dut", rate_hz=1)
        self.sensor.plug()

    def table(self) -> dict[str, Any]:
        return {"type": "serial", "port": str(self.sensor.link), "format": "kv"}

    def ready(self, agent: Agent) -> None:
        wait_until(lambda: agent.sources[NAME].stats.connected, what="port open")

    def good(self, seq: int) -> None:
        self.sensor.write_line(f"seq={seq}")

    def bad(self) -> None:
        self.sensor.write_line("=== not a reading ===")

    def unplug(self) -> None:
        self.sensor.unplug()

    def plug(self) -> None:
        self.sensor.plug()

    def close(self) -> None:
        self.sensor.unplug()


class PolledSerialRig:
    """An instrument that answers `R` with the last value set, or with garbage when told."""

    def __init__(self, tmp_path: Path) -> None:
        self.link = tmp_path / "serial-by-id-usb-polled"
        self.reply = "seq=0"
        self.device: PtyResponder | None = None
        self.plug()

    def _answer(self, request: bytes) -> str | None:
        return self.reply if request == b"R\n" else None

    def table(self) -> dict[str, Any]:
        return {
            "type": "serial",
            "port": str(self.link),
            "format": "kv",
            "request": "R\\n",
            "poll_interval_s": 0.1,
        }

    def ready(self, agent: Agent) -> None:
        wait_until(lambda: agent.sources[NAME].stats.connected, what="port open")

    def good(self, seq: int) -> None:
        self.reply = f"seq={seq}"

    def bad(self) -> None:
        self.reply = "=== not a reading ==="

    def unplug(self) -> None:
        if self.device is not None:
            self.device.stop()
            self.device = None

    def plug(self) -> None:
        self.device = PtyResponder(self.link, self._answer).start()

    def close(self) -> None:
        self.unplug()


class MqttRig:
    def __init__(self, plain: Mosquitto, workdir: Path) -> None:
        # A broker that logs every packet, so the rig sees when the source has subscribed.
        workdir.mkdir()
        self.broker = Mosquitto(workdir, plain.binary, extra_conf="log_type all\n")
        self.broker.start()
        self.publisher = Publisher(self.broker)
        self.subscriptions = 0

    def table(self) -> dict[str, Any]:
        return {
            "type": "mqtt",
            "broker": self.broker.url,
            "topics": ["contract/#"],
            "format": "json",
            "mqtt_version": "5",
        }

    def ready(self, agent: Agent) -> None:
        self.subscriptions += 1
        wait_subscribed(self.broker, client_id(NAME), self.subscriptions)

    def good(self, seq: int) -> None:
        self.publisher.publish("contract/dev", json.dumps({"seq": seq}))

    def bad(self) -> None:
        self.publisher.publish("contract/dev", b"{not json")

    def unplug(self) -> None:
        self.broker.stop()

    def plug(self) -> None:
        self.broker.start()

    def close(self) -> None:
        self.publisher.close()
        self.broker.stop()


class ModbusRig:
    """The Modbus slave process on a pty (RTU): `seq` is a holding register, `level` a float."""

    def __init__(self, tmp_path: Path) -> None:
        self.slave = SlaveProcess(rtu=tmp_path / "serial-by-id-usb-meter").start()
        self.slave.command("set input 0 float32 big 1.5")

    def table(self) -> dict[str, Any]:
        return {
            "type": "modbus",
            "transport": "rtu",
            "port": str(self.slave.link),
            "poll_interval_s": 0.1,
            "timeout_s": 0.3,
            "registers": [
                {"name": "seq", "address": 10, "type": "uint16"},
                {"name": "level", "address": 0, "kind": "input", "type": "float32"},
            ],
        }

    def ready(self, agent: Agent) -> None:
        wait_until(lambda: agent.sources[NAME].stats.connected, what="port open")

    def good(self, seq: int) -> None:
        self.slave.command(f"set holding 10 uint16 big {seq}")

    def bad(self) -> None:
        self.slave.command("set input 0 float32 big nan")  # a value that cannot be sent

    def unplug(self) -> None:
        self.slave.command("unplug 2")  # the slave's end closes, and comes back after 2 s

    def plug(self) -> None:
        pass

    def close(self) -> None:
        self.slave.stop()


# Each registered type, and the variants of it worth holding to the contract.
RIGS: dict[str, list[str]] = {
    "serial": ["serial", "serial-polled"],
    "mqtt": ["mqtt"],
    "modbus": ["modbus"],
}


@pytest.fixture(params=[variant for variants in RIGS.values() for variant in variants])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    made: SerialRig | PolledSerialRig | MqttRig | ModbusRig
    if request.param == "serial":
        made = SerialRig(tmp_path)
    elif request.param == "modbus":
        made = ModbusRig(tmp_path)
    elif request.param == "serial-polled":
        made = PolledSerialRig(tmp_path)
    else:
        made = MqttRig(request.getfixturevalue("mosquitto"), tmp_path / "broker")
    yield made
    made.close()


@pytest.fixture
def run_agent(make_agent: Callable[..., Agent]) -> Callable[..., Agent]:
    def run(rig: Rig, **extra: Any) -> Agent:
        table = {"name": NAME, "datasource_id": DATASOURCE, "shape": "wide", **rig.table()}
        agent = make_agent({**table, **extra}, config="agent.toml")
        rig.ready(agent)
        return agent

    return run


def arrived(sandbox: Sandbox, seq: int) -> list[dict[str, Any]]:
    return [r for r in sandbox.records(DATASOURCE) if r.get("seq") == seq]


def epoch(stamp: str) -> float:
    assert stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_every_registered_source_type_has_a_rig() -> None:
    assert set(source_types()) <= set(RIGS), "add a rig for the new type to this contract"


def test_a_source_reads_stamps_in_utc_when_read_and_stops_for_good(
    rig: Rig, run_agent: Callable[..., Agent], sandbox: Sandbox
) -> None:
    agent = run_agent(rig)
    before = time.time()
    rig.good(1)
    (record, *_) = wait_until(lambda: arrived(sandbox, 1), what="the reading")
    after = time.time()
    assert before - 0.001 <= epoch(str(record["timestamp"])) <= after
    source = agent.sources[NAME]
    assert source.stats.readings >= 1 and source.alive
    source.stop()
    assert not source.alive
    with pytest.raises(RuntimeError):
        source.start()


def test_a_device_that_goes_away_and_comes_back_is_read_again(
    rig: Rig, run_agent: Callable[..., Agent], sandbox: Sandbox
) -> None:
    agent = run_agent(rig)
    stats = agent.sources[NAME].stats
    rig.good(1)
    wait_until(lambda: arrived(sandbox, 1), what="a reading before the unplug")
    rig.unplug()
    wait_until(lambda: not stats.connected, 20, "the source to notice the device went away")
    rig.plug()
    wait_until(lambda: stats.connected, 30, "the source to reopen the device")
    rig.ready(agent)
    rig.good(2)
    wait_until(lambda: arrived(sandbox, 2), 20, "a reading after the device came back")
    assert agent.sources[NAME].alive


def test_bad_input_is_counted_and_logged_and_the_source_reads_on(
    rig: Rig,
    run_agent: Callable[..., Agent],
    sandbox: Sandbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    agent = run_agent(rig)
    stats = agent.sources[NAME].stats
    rig.bad()
    wait_until(lambda: stats.parse_errors >= 1, what="the bad input counted")
    wait_until(lambda: any(NAME in r.getMessage() for r in caplog.records), what="a log line")
    rig.good(3)
    wait_until(lambda: arrived(sandbox, 3), what="a good reading after the bad input")
    assert agent.sources[NAME].alive


def test_a_reload_applies_the_new_settings(
    rig: Rig, run_agent: Callable[..., Agent], sandbox: Sandbox, tmp_path: Path
) -> None:
    agent = run_agent(rig, tags={"site": "before"})
    rig.good(4)
    (first, *_) = wait_until(lambda: arrived(sandbox, 4), what="a reading before the reload")
    assert first["site"] == "before"
    config = tmp_path / "agent.toml"
    config.write_text(config.read_text().replace('"before"', '"after"'))
    assert agent.reload()
    rig.ready(agent)
    rig.good(5)
    records = wait_until(lambda: arrived(sandbox, 5), 20, what="a reading after the reload")
    assert {r["site"] for r in records} == {"after"}


def test_every_source_type_ships_a_sample_config_that_loads(tmp_path: Path) -> None:
    import edge_agent.sources as package

    token = tmp_path / "token"
    token.write_text("t\n")
    head = (
        f'[agent]\ndata_dir = "{tmp_path}"\n[endpoint]\n'
        f'url = "http://127.0.0.1:9/restapi/datasource/insert"\ntoken_file = "{token}"\n'
    )
    for name in source_types():
        sample = Path(package.__path__[0]) / name / "sample.toml"
        path = tmp_path / f"{name}.toml"
        path.write_text(head + sample.read_text())
        config = load_config(path)
        assert config.sources and {s.type for s in config.sources} == {name}
