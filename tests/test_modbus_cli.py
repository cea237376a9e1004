"""The operator's Modbus commands against a real slave process on a pseudo-terminal:
`modbus read` (one poll, the values printed), `check` (what a poll will send) and
`run --once` (one poll, the records printed), beside a running agent too."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.testing.harness import run_cli
from edge_agent.testing.modbus_slave import SlaveProcess
from tests.helpers import AgentProcess, write_config

METER = [
    {"name": "voltage", "address": 0, "kind": "input", "type": "float32"},
    {"name": "energy_wh", "address": 342, "kind": "input", "type": "float32", "scale": 1000.0},
    {"name": "count", "address": 0, "type": "uint16"},
    {"name": "offset_temp", "address": 10, "type": "int32", "word_order": "little",
     "scale": 0.1, "offset": -40.0},
    {"name": "broken", "address": 100, "kind": "input", "type": "float32"},
]  # fmt: skip


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def rtu_link(slave: SlaveProcess) -> Path:
    """The port of an RTU slave (`meter` is one; a TCP slave has no link)."""
    assert slave.link is not None, "an RTU slave"
    return slave.link


def modbus_source(port: Path | str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "meter",
        "type": "modbus",
        "datasource_id": "67890",
        "transport": "rtu",
        "port": str(port),
        "poll_interval_s": 0.2,
        "timeout_s": 0.3,
        "registers": METER,
        **extra,
    }


def config_with(tmp_path: Path, *sources: dict[str, Any]) -> Path:
    # No token file: none of these commands needs the upload token.
    return write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=tmp_path / "data",
        sources=list(sources),
        token_file=tmp_path / "no-token-here",
    )


@pytest.fixture
def meter(slaves: Callable[..., SlaveProcess], tmp_path: Path) -> SlaveProcess:
    slave = slaves(rtu=tmp_path / "serial-by-id-usb-meter", meter=True)
    slave.command("set holding 10 int32 little 655")
    slave.command("set input 100 float32 big nan")
    return slave


def test_modbus_read_polls_once_and_prints_each_decoded_value(
    tmp_path: Path, meter: SlaveProcess
) -> None:
    config = config_with(tmp_path, modbus_source(rtu_link(meter)))
    proc = edge_agent("modbus", "read", "--config", str(config), "--source", "meter")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    head, *lines = proc.stdout.splitlines()
    assert head.startswith(f"modbus meter: unit 1 on rtu {meter.link} at 9600 8N1 answered in ")
    rows = {line.split()[0]: line for line in lines}
    assert list(rows) == [r["name"] for r in METER]
    voltage = float(rows["voltage"].split()[1])
    assert 220.0 < voltage < 240.0
    assert rows["voltage"].endswith("input 0-1, float32")
    energy = float(rows["energy_wh"].split()[1])
    assert 1_234_000 < energy < 1_240_000  # the meter's kWh, scaled to Wh
    assert rows["energy_wh"].endswith("input 342-343, float32, x 1000")
    assert rows["count"].split()[1] == "1"  # holding 0 counts the requests answered
    assert float(rows["offset_temp"].split()[1]) == pytest.approx(655 * 0.1 - 40.0)
    assert rows["offset_temp"].endswith("holding 10-11, int32 low word first, x 0.1 - 40")
    assert rows["broken"].split()[1] == "nan"
    assert "not a number: left out when the agent runs" in rows["broken"]
    # One poll: one request per group of touching registers, and nothing written to disk.
    assert meter.stats()["requests"] == {"1": 5}
    assert not (tmp_path / "data").exists()


def test_modbus_read_of_a_unit_that_does_not_answer_says_what_to_check(
    tmp_path: Path, meter: SlaveProcess
) -> None:
    config = config_with(tmp_path, modbus_source(rtu_link(meter), unit_id=9))
    proc = edge_agent("modbus", "read", "--config", str(config), "--source", "meter")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "edge-agent: error: modbus meter: unit 9, holding 0 (count): no answer in 0.3 s; check "
        "the unit id, the wiring (A/B swapped?), the baudrate and parity, and that the device "
        "is powered\n"
    )


def test_modbus_read_of_a_missing_port_says_what_to_check(tmp_path: Path) -> None:
    config = config_with(tmp_path, modbus_source(tmp_path / "ttyUSB7"))
    proc = edge_agent("modbus", "read", "--config", str(config), "--source", "meter")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"edge-agent: error: modbus meter: cannot open {tmp_path}")
    assert "check the USB adapter and cable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_modbus_read_beside_the_running_agent_names_the_agent_holding_the_port(
    tmp_path: Path, meter: SlaveProcess, agents: list[AgentProcess]
) -> None:
    config = config_with(tmp_path, modbus_source(rtu_link(meter)))
    (tmp_path / "no-token-here").write_text("test-token\n")
    (tmp_path / "no-token-here").chmod(0o600)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("modbus meter: polling unit 1")
    proc = edge_agent("modbus", "read", "--config", str(config), "--source", "meter")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert agent.proc is not None
    assert f"An agent runs on this configuration (PID {agent.proc.pid}, " in proc.stderr
    assert f"holds {meter.link}, which is busy here: stop it (" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert agent.terminate() == 0
    assert "cannot open" not in agent.log_text(), "the running agent was not disturbed"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("metre", "no source named 'metre' (its Modbus sources: meter, pump)"),
        ("weather", "source 'weather' is a serial source, not a Modbus source (its Modbus "
         "sources: meter, pump); `edge-agent run --once` reads any source"),
    ],
)  # fmt: skip
def test_modbus_read_of_a_source_that_is_not_a_modbus_source_is_a_usage_error(
    tmp_path: Path, name: str, message: str
) -> None:
    weather = {"name": "weather", "type": "serial", "port": "/dev/ttyUSB0",
               "datasource_id": "1", "format": "kv"}  # fmt: skip
    pump = modbus_source("/dev/ttyUSB1", name="pump")
    config = config_with(tmp_path, modbus_source("/dev/ttyUSB1"), weather, pump)
    proc = edge_agent("modbus", "read", "--config", str(config), "--source", name)
    assert proc.returncode == 2
    assert proc.stderr == f"edge-agent: configuration error: {config}: {message}\n"


def test_check_describes_each_modbus_source_and_the_requests_of_a_poll(tmp_path: Path) -> None:
    second = modbus_source(
        "/dev/ttyUSB1",
        name="pump",
        unit_id=2,
        parity="E",
        registers=[{"name": "speed", "address": 3, "type": "uint16"}],
    )
    tcp = {
        "name": "plc",
        "type": "modbus",
        "datasource_id": "67891",
        "transport": "tcp",
        "host": "192.168.1.20",
        "unit_id": 0,
        "shape": "wide",
        "registers": [{"name": "door", "address": 7, "kind": "discrete", "type": "bool"}],
    }
    config = config_with(tmp_path, modbus_source("/dev/ttyUSB1", parity="E"), second, tcp)
    proc = edge_agent("check", "--no-secrets", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index(
        "source meter: modbus rtu /dev/ttyUSB1 at 9600 8E1, unit 1, every 0.2 s (timeout 0.3 s "
        "a request), 5 registers in 5 requests a poll, shape long -> data source 67890"
    )
    assert lines[start + 1 : start + 10] == [
        "  holding 0: count (uint16)",
        "  holding 10-11: offset_temp (int32 low word first, x 0.1 - 40)",
        "  input 0-1: voltage (float32)",
        "  input 100-101: broken (float32)",
        "  input 342-343: energy_wh (float32, x 1000)",
        "source pump: modbus rtu /dev/ttyUSB1 at 9600 8E1, unit 2, every 0.2 s (timeout 0.3 s "
        "a request), 1 register in 1 request a poll, shape long -> data source 67890",
        "  holding 3: speed (uint16)",
        "source plc: modbus tcp 192.168.1.20:502, unit 0, every 1 s (timeout 0.5 s a request), "
        "1 register in 1 request a poll, shape wide -> data source 67891",
        "  discrete 7: door (bool)",
    ]
    assert "format" not in proc.stdout.split("source meter:")[1].split("status page")[0]
    assert "cannot share it" not in proc.stdout  # two units on one bus are fine


def test_run_once_stops_after_one_poll_of_a_modbus_source(
    tmp_path: Path, meter: SlaveProcess
) -> None:
    source = modbus_source(rtu_link(meter), poll_interval_s=1.0, shape="wide")
    config = config_with(tmp_path, source)
    proc = edge_agent("run", "--once", "--config", str(config), "--seconds", "30")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    record = json.loads(line)["record"]
    assert {"voltage", "energy_wh", "count", "offset_temp"} <= set(record)
    assert "broken" not in record  # NaN: counted, not sent
    assert "counted: dropped.unparseable.meter 1" in proc.stderr
    assert meter.stats()["requests"] == {"1": 5}


def test_check_and_the_agent_warn_of_a_register_number_given_as_an_address(
    tmp_path: Path, meter: SlaveProcess, agents: list[AgentProcess]
) -> None:
    registers = [
        {"name": "offset_temp", "address": 40011, "type": "int32", "word_order": "little"},
        {"name": "voltage", "address": 30001, "kind": "input", "type": "float32"},
        {"name": "count", "address": 0, "type": "uint16"},
    ]
    config = config_with(tmp_path, modbus_source(rtu_link(meter), registers=registers))
    (tmp_path / "no-token-here").write_text("a-token\n")
    (tmp_path / "no-token-here").chmod(0o600)
    holding = (
        "register 'offset_temp': address = 40011 looks like a register number (4xxxx = "
        "holding register 11, counted from 1), not an offset. `address` is the zero-based "
        'offset sent on the wire: holding register 40011 is address = 10, kind = "holding"'
    )
    input_ = 'input register 30001 is address = 0, kind = "input"'
    proc = edge_agent("check", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"warning: [[sources]] (meter) {holding}" in proc.stdout, proc.stdout
    assert input_ in proc.stdout and "'count'" not in proc.stdout

    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("agent: started")
    agent.wait_log(holding)
    assert input_ in agent.log_text()
    assert agent.terminate() == 0
    assert agent.log_text().count(holding) == 1, "said once, at start"


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("tcp://10.0.0.5", "host: 'tcp://10.0.0.5' has a scheme (tcp://); give the bare host "
         'name or IP address, e.g. host = "10.0.0.5"'),
        ("modbus://plc.local:1502/", 'has a scheme (modbus://); give the bare host name or IP '
         'address, e.g. host = "plc.local:1502"'),
        ("10.0.0.5:1502", "host: '10.0.0.5:1502' holds a port; write host = \"10.0.0.5\" and "
         "tcp_port = 1502"),
    ],
)  # fmt: skip
def test_a_modbus_host_with_a_scheme_or_a_port_stops_run_and_check_with_exit_2(
    tmp_path: Path, host: str, message: str
) -> None:
    source = modbus_source("unused", transport="tcp", host=host)
    del source["port"]
    config = config_with(tmp_path, source)
    for command in (["check", "--no-secrets"], ["run"]):
        proc = edge_agent(*command, "--config", str(config))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("edge-agent: configuration error: "), proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
