"""A Modbus source's configuration: the issue's keys, defaults, and errors that name the key."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import ConfigError
from edge_agent.sources.modbus.config import (
    ModbusConfig,
    RegisterConfig,
    check_shared_links,
)
from edge_agent.sources.modbus.registers import describe, plan
from edge_agent.tables import file_keys

ISSUE_EXAMPLE = """
[[sources]]
name = "meter"
type = "modbus"
datasource_id = "67890"
transport = "rtu"
port = "/dev/ttyUSB0"
baudrate = 9600
parity = "E"
unit_id = 1
poll_interval_s = 1.0
timeout_s = 0.5
shape = "long"

[[sources.registers]]
name = "voltage"
address = 0
kind = "holding"
type = "float32"
word_order = "big"
scale = 1.0
offset = 0.0

[[sources.registers]]
name = "energy_wh"
address = 10
kind = "input"
type = "uint32"
"""


def build(table: dict[str, Any]) -> ModbusConfig:
    return ModbusConfig.from_table(table, "agent.toml", "[[sources]] #1")


def rtu(**extra: Any) -> dict[str, Any]:
    return {
        "name": "meter",
        "type": "modbus",
        "datasource_id": "67890",
        "transport": "rtu",
        "port": "/dev/ttyUSB0",
        "registers": [{"name": "voltage", "address": 0, "type": "float32"}],
        **extra,
    }


def tcp(**extra: Any) -> dict[str, Any]:
    table = rtu(transport="tcp", host="192.168.1.20", **extra)
    del table["port"]
    return table


def test_the_issues_example_reads_with_its_defaults() -> None:
    table = tomllib.loads(ISSUE_EXAMPLE)["sources"][0]
    config = build(table)
    assert (config.transport, config.port, config.baudrate, config.parity) == (
        "rtu",
        "/dev/ttyUSB0",
        9600,
        "E",
    )
    assert (config.bytesize, config.stopbits, config.rs485, config.tcp_port) == (8, 1.0, False, 502)
    energy = config.registers[1]
    assert energy == RegisterConfig("energy_wh", 10, "uint32", "input", "big", 1.0, 0.0)
    assert config.framing == "/dev/ttyUSB0 at 9600 8E1"
    assert len(plan(config.registers)) == 2


def test_check_describes_the_wire_the_unit_and_the_requests() -> None:
    config = build(tomllib.loads(ISSUE_EXAMPLE)["sources"][0])
    assert config.describe() == (
        "modbus rtu /dev/ttyUSB0 at 9600 8E1, unit 1, every 1 s (timeout 0.5 s a request), "
        "2 registers in 2 requests a poll"
    )
    assert config.details() == ["holding 0-1: voltage (float32)", "input 10-11: energy_wh (uint32)"]
    assert not config.TAKES_FORMAT and config.polled()


def test_check_names_the_registers_of_each_request_and_how_they_decode() -> None:
    registers = [
        {"name": "temp", "address": 5, "type": "int16", "scale": 0.1, "offset": -40.0},
        {"name": "count", "address": 0, "type": "uint32", "word_order": "little"},
        {"name": "flags", "address": 2, "type": "uint16"},
        {"name": "energy", "address": 0, "kind": "input", "type": "float64", "scale": 1000.0},
        {"name": "relay", "address": 3, "kind": "coil", "type": "bool"},
    ]
    config = build(tcp(unit_id=3, registers=registers, poll_interval_s=5.0))
    assert config.describe() == (
        "modbus tcp 192.168.1.20:502, unit 3, every 5 s (timeout 0.5 s a request), "
        "5 registers in 4 requests a poll"
    )
    assert config.details() == [
        "holding 0-2: count (uint32 low word first), flags (uint16)",
        "holding 5: temp (int16, x 0.1 - 40)",
        "input 0-3: energy (float64, x 1000)",
        "coil 3: relay (bool)",
    ]
    assert describe(config) == config.describe()


def test_the_sample_config_reads() -> None:
    text = resources.files("edge_agent.sources.modbus").joinpath("sample.toml").read_text()
    config = build(tomllib.loads(text)["sources"][0])
    assert config.unit_id == 1 and len(config.registers) == 6


def test_a_tcp_source() -> None:
    config = build(tcp(unit_id=0, tcp_port=1502))
    assert config.framing == "192.168.1.20:1502"
    assert config.link_settings == ("tcp", "192.168.1.20", 1502)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (rtu(baudrat=9600), "#1 (meter): unknown key 'baudrat'; did you mean 'baudrate'"),
        (
            rtu(registers=[{"name": "v", "address": 0, "type": "uint16", "word_ordr": "big"}]),
            "[[sources.registers]] #1 (v): unknown key 'word_ordr'; did you mean 'word_order'",
        ),
        (rtu(parity="X"), "parity: expected one of 'N' | 'E' | 'O' | 'M' | 'S', got 'X'"),
        (rtu(stopbits=3), "stopbits: expected 1, 1.5 or 2, got 3"),
        (rtu(bytesize=9), "bytesize: expected a value from 5 to 8, got 9"),
        (rtu(rs485="yes"), "rs485: expected true or false"),
        (rtu(unit_id=248), "unit_id: expected a value from 0 to 247, got 248"),
        (rtu(unit_id=0), "unit_id: 0 is the broadcast address"),
        (rtu(host="10.0.0.1"), 'host: only transport = "tcp" takes this key'),
        (tcp(baudrate=9600), 'baudrate: only transport = "rtu" takes this key'),
        (rtu(port=None), "port: missing"),
        (tcp(tcp_port=70000), "tcp_port: expected a value from 1 to 65535"),
        (rtu(transport="ascii"), "transport: expected one of 'rtu' | 'tcp', got 'ascii'"),
        (rtu(timeout_s=0), "timeout_s: expected a value from 0.01 to 60"),
        (rtu(poll_interval_s=-1), "poll_interval_s: expected a value"),
        (rtu(format="json"), "format: a Modbus source takes no format"),
        (rtu(registers=[]), "no [[sources.registers]]"),
        (rtu(registers={"name": "v"}), "registers: expected [[sources.registers]] tables"),
        (
            rtu(registers=[{"name": "v", "address": 0, "type": "float32", "kind": "coil"}]),
            'type: a coil is one bit; use type = "bool"',
        ),
        (
            rtu(registers=[{"name": "v", "address": 65535, "type": "uint32"}]),
            "address: expected a value from 0 to 65534, got 65535",
        ),
        (
            rtu(registers=[{"name": "v", "address": 0, "type": "bool", "scale": 2.0}]),
            "scale: a bool value is not scaled",
        ),
        (
            rtu(registers=[{"name": "v", "address": 0, "type": "int16", "scale": float("nan")}]),
            "scale: expected a finite number",
        ),
        (
            rtu(registers=[{"name": "v", "address": 0}]),
            "[[sources.registers]] #1 (v): missing required key 'type'",
        ),
        (rtu(registers=[{"name": "v", "address": 0, "type": "float16"}]), "type: expected one of"),
        (
            rtu(registers=[{"name": "timestamp", "address": 0, "type": "uint16"}]),
            "name: 'timestamp' is a key of every record",
        ),
        (
            rtu(
                registers=[
                    {"name": "v", "address": 0, "type": "uint16"},
                    {"name": "v", "address": 1, "type": "uint16"},
                ]
            ),
            "the name 'v' is used twice",
        ),
        (
            rtu(tags={"site": "x"}, registers=[{"name": "site", "address": 0, "type": "uint16"}]),
            "'site' is also a tag",
        ),
        (rtu(name="my meter"), "name: use letters, digits"),
    ],
)
def test_bad_values_are_refused_naming_file_table_and_key(
    table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(table)
    text = str(caught.value)
    assert text.startswith("agent.toml: [[sources]] #1")
    assert message in text


def test_sources_on_one_port_must_share_its_framing() -> None:
    first = build(rtu(name="a", unit_id=1))
    second = build(rtu(name="b", unit_id=2))
    check_shared_links([first, second], "agent.toml")
    other = build(rtu(name="c", unit_id=3, parity="E"))
    with pytest.raises(ConfigError, match=r"\(c\): /dev/ttyUSB0 is also used by 'a'"):
        check_shared_links([first, other], "agent.toml")


def test_every_key_is_documented_and_every_documented_key_exists() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    readme = text[text.index("## Modbus RTU and TCP") : text.index("## MQTT bridge")]
    accepted = set(file_keys(ModbusConfig)) | set(file_keys(RegisterConfig))
    common = {"name", "type", "datasource_id", "format", "shape", "tags", "priority", "processors"}
    missing = sorted(
        key
        for key in accepted
        if f"| `{key}` |" not in readme and not (key in common and f"`{key}`" in readme)
    )
    assert not missing, f"README.md's Modbus section does not document: {missing}"
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", readme, re.MULTILINE))
    assert documented <= accepted, documented - accepted


def test_only_register_numbers_of_input_and_holding_registers_are_warned_of() -> None:
    def warned(address: int, kind: str = "holding", type_: str = "uint16") -> bool:
        reg = {"name": "v", "address": address, "kind": kind, "type": type_}
        return bool(build(tcp(registers=[reg])).slip_warnings())

    assert warned(40001) and warned(49999) and warned(30001, "input") and warned(40001, "input")
    assert not warned(0) and not warned(29999) and not warned(40000) and not warned(50001)
    assert not warned(40001, "coil", "bool"), "coils and discrete inputs count bits"


def test_a_host_is_a_bare_name_or_address() -> None:
    for host in ("192.168.1.20", "plc.local", "fe80::1", "::1"):
        assert build({**tcp(), "host": host}).host == host
    for host in ("tcp://10.0.0.5", "10.0.0.5:502", "10.0.0.5/24", "plc local"):
        with pytest.raises(ConfigError, match="host: "):
            build({**tcp(), "host": host})
