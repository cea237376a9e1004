"""`edge-agent demo`, the main job on a fresh machine: it runs and accounts for everything."""

from __future__ import annotations

import json
import re
import subprocess

from edge_agent.testing.harness import Mosquitto, free_port, run_cli


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("demo", *args, timeout=120)


def test_demo_with_an_outage_and_an_mqtt_broker_loses_nothing(mosquitto: Mosquitto) -> None:
    proc = run_demo("--duration", "9", "--outage", "2", "--mqtt", mosquitto.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "-- outage: the sandbox is down" in out and "-- the sandbox is back" in out
    assert "bridging MQTT from" in out
    assert "nothing missing: every line, message and meter poll reached the endpoint" in out
    assert "MQTT: the broker acknowledged" in out
    assert_the_meter_readings_arrived(out)


def test_demo_says_plainly_when_no_broker_answers() -> None:
    proc = run_demo("--duration", "4", "--mqtt", f"mqtt://127.0.0.1:{free_port()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no MQTT broker answers on" in proc.stdout
    assert "nothing missing: every line and meter poll reached the endpoint" in proc.stdout


def assert_the_meter_readings_arrived(out: str) -> None:
    """The simulated Modbus meter's values are shown as they reach the sandbox, then counted."""
    assert re.search(r"simulated energy meter \(Modbus RTU, unit 1\) on \S+ttyDEMO-meter", out)
    shown = re.findall(
        r"^ +meter: (\d+\.\d) V .* (\d+\.\d{3}) kWh +\((\d+) polls? received\)$", out, re.M
    )
    assert shown, out
    for volts, _, _ in shown:
        assert 220.0 < float(volts) < 240.0
    polls = re.search(r"^Modbus: the agent polled the meter (\d+) times; the sandbox received "
                      r"(\d+) meter records \(0 duplicates\)$", out, re.M)  # fmt: skip
    assert polls and int(polls[1]) == int(polls[2]) >= int(shown[-1][2]) > 0, out
    last = json.loads(out.split("last meter record:  ")[1].splitlines()[0])
    assert set(last) >= {"timestamp", "voltage", "current", "active_power", "energy_kwh"}
    # Each line stays short enough to read in a terminal, however the values fall.
    assert max(len(line) for line in out.splitlines() if "meter:" in line) <= 100
