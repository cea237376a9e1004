"""The Modbus source against a slave process: RTU over a pseudo-terminal, TCP on a free port.

The source runs alone with an in-memory intake (the agent does not know the type yet); the
slave (edge_agent.testing.modbus_slave) is its own process, with its own framing code.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import SourceError
from edge_agent.sources.modbus import make_source
from edge_agent.sources.modbus.config import ModbusConfig
from edge_agent.sources.modbus.link import LinkPool
from edge_agent.sources.modbus.source import ModbusSource
from edge_agent.testing.intake import MemoryIntake
from edge_agent.testing.modbus_slave import SlaveProcess
from tests.helpers import wait_until

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# (name, kind, address, type, word order, value the slave holds)
POINTS: list[tuple[str, str, int, str, str, Any]] = [
    ("i16", "holding", 10, "int16", "big", -12345),
    ("u16", "holding", 11, "uint16", "big", 54321),
    ("i32", "holding", 12, "int32", "big", -123456789),
    ("i32_le", "holding", 14, "int32", "little", -123456789),
    ("u32", "holding", 16, "uint32", "big", 4_000_000_000),
    ("u32_le", "holding", 18, "uint32", "little", 4_000_000_000),
    ("i64", "holding", 20, "int64", "big", -(2**62) + 12345),
    ("i64_le", "holding", 24, "int64", "little", -(2**62) + 12345),
    ("u64", "holding", 28, "uint64", "big", 2**64 - 2),
    ("u64_le", "holding", 32, "uint64", "little", 2**64 - 2),
    ("f32", "input", 0, "float32", "big", 230.4),
    ("f32_le", "input", 2, "float32", "little", -0.125),
    ("f64", "input", 4, "float64", "big", 49.98765432101),
    ("f64_le", "input", 8, "float64", "little", -1.5e-300),
    ("flag", "holding", 36, "bool", "big", True),
    ("relay", "coil", 3, "bool", "big", True),
    ("relay_off", "coil", 4, "bool", "big", False),
    ("door", "discrete", 7, "bool", "big", True),
]


class Sources:
    """Modbus sources on a link pool of their own, each with a memory intake."""

    def __init__(self) -> None:
        self.links = LinkPool()
        self.running: list[ModbusSource] = []

    def start(self, slave: SlaveProcess, **table: Any) -> tuple[ModbusSource, MemoryIntake]:
        intake = MemoryIntake()
        source = ModbusSource(config(slave, **table), "gw-test", intake, links=self.links)
        source.start()
        self.running.append(source)
        return source, intake


@pytest.fixture
def sources() -> Iterator[Sources]:
    made = Sources()
    yield made
    for source in made.running:
        source.stop()


def config(slave: SlaveProcess, **table: Any) -> ModbusConfig:
    base: dict[str, Any] = {
        "name": "meter",
        "type": "modbus",
        "datasource_id": "67890",
        "poll_interval_s": 0.1,
        "timeout_s": 0.3,
        "registers": [{"name": "count", "address": 0, "type": "uint16"}],
    }
    if slave.link is not None:
        base.update(transport="rtu", port=str(slave.link))
    else:
        base.update(transport="tcp", host="127.0.0.1", tcp_port=slave.tcp_port)
    base.update(table)
    return ModbusConfig.from_table(base, "agent.toml", "[[sources]] #1")


def rtu_or_tcp(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "rtu":
        return {"rtu": tmp_path / "serial-by-id-usb-meter"}
    return {"tcp": True}


@pytest.fixture(params=["rtu", "tcp"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return rtu_or_tcp(request, tmp_path)


@pytest.fixture
def rtu(tmp_path: Path) -> dict[str, Any]:
    return {"rtu": tmp_path / "serial-by-id-usb-meter"}


def latest(intake: MemoryIntake, metric: str) -> Any:
    values = [r["value"] for r in intake.records() if r["metric"] == metric]
    return values[-1] if values else None


def test_every_type_and_word_order_decodes_to_what_the_slave_holds(
    slaves: Callable[..., SlaveProcess], sources: Sources, where: dict[str, Any]
) -> None:
    slave = slaves(**where)
    for _, kind, address, data_type, order, value in POINTS:
        slave.command(f"set {kind} {address} {data_type} {order} {value!r}")
    registers = [
        {"name": n, "kind": k, "address": a, "type": t, "word_order": o}
        for n, k, a, t, o, _ in POINTS
    ]
    _, intake = sources.start(slave, registers=registers, shape="wide")
    (record, *_) = wait_until(intake.records, what="a poll")
    assert {name: record[name] for name, *_ in POINTS} == {p[0]: p[5] for p in POINTS}
    for name, *_, value in POINTS:
        assert type(record[name]) is type(value), name


def test_scale_and_offset_apply_to_the_raw_value(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    slave = slaves(**rtu)
    slave.command("set holding 5 int16 big -1234")
    slave.command("set input 0 uint32 little 123456")
    registers = [
        {"name": "temperature", "address": 5, "type": "int16", "scale": 0.1, "offset": 273.15},
        {"name": "energy", "address": 0, "kind": "input", "type": "uint32",
         "word_order": "little", "scale": 10.0},
    ]  # fmt: skip
    _, intake = sources.start(slave, registers=registers)
    wait_until(lambda: latest(intake, "energy") is not None, what="a poll")
    assert latest(intake, "temperature") == -1234 * 0.1 + 273.15
    assert latest(intake, "energy") == 123456 * 10.0 + 0.0


def test_values_change_while_polled_and_each_poll_has_one_utc_stamp(
    slaves: Callable[..., SlaveProcess], sources: Sources, where: dict[str, Any]
) -> None:
    slave = slaves(meter=True, **where)
    registers = [
        {"name": "count", "address": 0, "type": "uint16"},
        {"name": "voltage", "address": 0, "kind": "input", "type": "float32"},
        {"name": "energy", "address": 342, "kind": "input", "type": "float32"},
    ]
    source, intake = sources.start(slave, registers=registers, tags={"site": "north"})
    wait_until(lambda: len(intake.readings) >= 15, what="five polls")
    records = intake.records()
    polls: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        assert STAMP.match(record["timestamp"]), record
        assert record["device_id"] == "gw-test" and record["site"] == "north"
        polls.setdefault(record["timestamp"], []).append(record)
    complete = [p for p in polls.values() if len(p) == 3]
    assert len(complete) >= 4
    counts = [r["value"] for r in records if r["metric"] == "count"]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # changes every poll
    assert 220.0 < latest(intake, "voltage") < 240.0
    assert source.requests_per_poll == 3
    assert source.stats.connected and source.stats.last_error is None


def test_the_stamp_is_taken_when_the_answer_arrived(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    slave = slaves(**rtu)
    slave.command("delay 0.4")
    before = time.time()
    _, intake = sources.start(slave, timeout_s=1.0, poll_interval_s=5.0)
    (record,) = wait_until(intake.records, what="a poll")
    stamped = time.mktime(time.strptime(record["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    stamped += int(record["timestamp"][20:23]) / 1000 - time.timezone
    assert stamped >= math.floor((before + 0.4) * 1000) / 1000


def test_a_slow_device_makes_missed_polls_not_a_burst(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    slave = slaves(**rtu)
    slave.command("delay 0.35")
    source, intake = sources.start(slave, timeout_s=1.0, poll_interval_s=0.1)
    wait_until(lambda: source.modbus.polls >= 4, what="four slow polls")
    source.stop()
    # Each poll overran at least three grid points of 0.1 s, which were skipped, not made up.
    assert source.stats.missed_polls >= 3 * source.modbus.polls
    assert intake.counter("missed_poll.meter") == source.stats.missed_polls
    served = sum(slave.stats()["requests"].values())
    assert served <= source.modbus.polls + 1


def test_a_silent_slave_is_counted_logged_once_and_polling_resumes(
    slaves: Callable[..., SlaveProcess],
    sources: Sources,
    where: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "edge_agent")
    slave = slaves(**where)
    source, intake = sources.start(slave, timeout_s=0.2)
    wait_until(lambda: source.modbus.polls >= 2, what="polling")
    slave.command("silent 1.5")
    wait_until(lambda: source.stats.timeouts >= 3, what="three timeouts")
    polls = source.modbus.polls
    wait_until(lambda: source.modbus.polls >= polls + 3, timeout=15, what="polls after")
    assert intake.counter("modbus.timeout.meter") == source.stats.timeouts
    warnings = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "unit 1, holding 0 (count): no answer in 0.2 s; check the unit id" in warnings[0]
    assert any("answers again (timeout: " in r.getMessage() for r in caplog.records)
    assert source.alive and source.stats.connected and source.modbus.disconnects == 0


def test_a_garbled_frame_and_an_exception_are_counted_and_polling_resumes(
    slaves: Callable[..., SlaveProcess],
    sources: Sources,
    where: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    slave = slaves(**where)
    source, intake = sources.start(slave)
    wait_until(lambda: source.modbus.polls >= 2, what="polling")
    slave.command("garble 1")
    wait_until(lambda: source.modbus.garbled == 1, what="the garbled answer")
    slave.command("exception 4 1")
    wait_until(lambda: source.modbus.exceptions == 1, what="the exception response")
    polls = source.modbus.polls
    wait_until(lambda: source.modbus.polls >= polls + 3, what="polls after")
    assert intake.counter("modbus.garbled.meter") == 1
    assert intake.counter("modbus.exception.meter") == 1
    assert source.stats.timeouts == 0 and source.modbus.disconnects == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "garbled answer" in logged and "exception 4 (server device failure)" in logged
    assert slave.stats()["served_faults"] == {"garble": 1, "exception": 1}


def test_an_illegal_address_names_the_register_and_the_others_still_arrive(
    slaves: Callable[..., SlaveProcess],
    sources: Sources,
    rtu: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    slave = slaves(limit=1000, **rtu)
    registers = [
        {"name": "count", "address": 0, "type": "uint16"},
        {"name": "ghost", "address": 2000, "kind": "input", "type": "float32"},
    ]
    source, intake = sources.start(slave, registers=registers)
    wait_until(lambda: len(intake.readings) >= 3, what="the good register, three times")
    assert {r["metric"] for r in intake.records()} == {"count"}
    warnings = [r.getMessage() for r in caplog.records if "exception 2" in r.getMessage()]
    assert len(warnings) == 1  # once per incident, though every poll fails again
    assert "input 2000-2001 (ghost): exception 2 (illegal data address)" in warnings[0]
    assert source.modbus.exceptions >= 3


def test_nan_is_counted_and_not_sent(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    slave = slaves(**rtu)
    slave.command("set input 0 float32 big nan")
    registers = [
        {"name": "count", "address": 0, "type": "uint16"},
        {"name": "broken", "address": 0, "kind": "input", "type": "float32"},
    ]
    source, intake = sources.start(slave, registers=registers)
    wait_until(lambda: len(intake.readings) >= 2, what="two polls")
    assert {r["metric"] for r in intake.records()} == {"count"}
    assert intake.counter("dropped.unparseable.meter") == source.stats.parse_errors >= 2


def test_the_port_vanishes_and_comes_back(
    slaves: Callable[..., SlaveProcess],
    sources: Sources,
    rtu: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    slave = slaves(**rtu)
    source, intake = sources.start(slave)
    wait_until(lambda: source.modbus.polls >= 2, what="polling")
    slave.command("unplug 1.5")
    wait_until(lambda: not source.stats.connected, what="the source to notice")
    assert "stopped working" in (source.stats.last_error or "") or \
        "cannot open" in (source.stats.last_error or "")  # fmt: skip
    wait_until(lambda: source.stats.connected, timeout=15, what="the port reopened")
    count = len(intake.readings)
    wait_until(lambda: len(intake.readings) >= count + 2, what="polls after")
    assert source.stats.reconnects == 1 and source.modbus.disconnects == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "check the USB adapter" in errors[0].getMessage()


def test_tcp_reset_and_refused_are_reconnected(
    slaves: Callable[..., SlaveProcess], sources: Sources
) -> None:
    slave = slaves(tcp=True)
    source, intake = sources.start(slave)
    wait_until(lambda: source.modbus.polls >= 2, what="polling")
    slave.command("reset")
    wait_until(lambda: source.stats.reconnects == 1, timeout=15, what="reconnect after reset")
    slave.command("unplug 2")
    wait_until(lambda: "refused" in (source.stats.last_error or ""), what="the refused connection")
    wait_until(lambda: source.stats.reconnects == 2, timeout=15, what="reconnect after refusal")
    count = len(intake.readings)
    wait_until(lambda: len(intake.readings) >= count + 2, what="polls after")
    assert source.modbus.disconnects == 2


def test_two_units_on_one_bus_take_turns_and_a_dead_one_does_not_starve_the_other(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    slave = slaves(units=[1], **rtu)  # nobody answers as unit 2
    slave.command("quiet 0.25")  # unit 2's requests wait 0.5 s for an answer
    live, live_intake = sources.start(slave, name="live", unit_id=1, poll_interval_s=0.05)
    dead, _ = sources.start(slave, name="dead", unit_id=2, timeout_s=0.5, poll_interval_s=0.05)
    wait_until(lambda: dead.stats.timeouts >= 6, timeout=20, what="six timeouts of unit 2")
    dead_timeouts, live_polls = dead.stats.timeouts, live.modbus.polls
    stats = slave.stats()
    assert stats["overlaps"] == 0 and stats["bad_frames"] == 0  # one request on the wire
    assert stats["ignored"]["2"] >= 6 and stats["requests"]["1"] >= 6
    assert live_polls >= dead_timeouts - 1  # the bus alternates: a poll per dead timeout
    assert live.stats.timeouts == 0 and live.stats.last_error is None
    assert len(live_intake.readings) == live.modbus.polls or live.alive


def test_8e1_framing_opens_the_port_with_those_settings(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    # A pty ignores parity, and pyserial may refuse to set it twice on one: open it once.
    slave = slaves(**rtu)
    source, intake = sources.start(slave, baudrate=19200, bytesize=8, parity="E", stopbits=1)
    wait_until(lambda: len(intake.readings) >= 2, what="polls at 8E1")
    assert source.config.framing.endswith("at 19200 8E1")


def test_update_in_place_unless_the_wire_changed(
    slaves: Callable[..., SlaveProcess], sources: Sources, rtu: dict[str, Any]
) -> None:
    slave = slaves(**rtu)
    source, intake = sources.start(slave)
    wait_until(lambda: intake.readings, what="a poll")
    more = config(slave, registers=[{"name": "renamed", "address": 0, "type": "uint16"}])
    assert source.update(more, "gw-test")
    wait_until(lambda: latest(intake, "renamed") is not None, what="the renamed register")
    assert not source.update(config(slave, baudrate=19200), "gw-test")
    assert not source.update(config(slave, port="/dev/ttyUSB9"), "gw-test")


def test_read_once_returns_the_values_or_says_what_failed(
    slaves: Callable[..., SlaveProcess], where: dict[str, Any]
) -> None:
    slave = slaves(**where)
    slave.command("set holding 7 float64 little 12.5")
    table = {"registers": [{"name": "x", "address": 7, "type": "float64", "word_order": "little"}]}
    source = make_source(config(slave, **table), None, MemoryIntake())  # the registry's way
    assert source.read_once() == {"x": 12.5}
    dead = ModbusSource(config(slave, unit_id=9, **table), None, MemoryIntake(), links=LinkPool())
    with pytest.raises(SourceError, match=r"unit 9, holding 7-10 \(x\): no answer in 0.3 s"):
        dead.read_once()
