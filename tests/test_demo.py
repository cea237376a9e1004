"""`edge-agent demo`, the main job on a fresh machine: it runs and accounts for everything."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import Mosquitto, free_port


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_with_an_outage_and_an_mqtt_broker_loses_nothing(mosquitto: Mosquitto) -> None:
    proc = run_demo("--duration", "9", "--outage", "2", "--mqtt", mosquitto.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "-- outage: the sandbox is down" in out and "-- the sandbox is back" in out
    assert "bridging MQTT from" in out
    assert "nothing missing: every line and message reached the endpoint" in out
    assert "MQTT: the broker acknowledged" in out


def test_demo_says_plainly_when_no_broker_answers() -> None:
    proc = run_demo("--duration", "4", "--mqtt", f"mqtt://127.0.0.1:{free_port()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no MQTT broker answers on" in proc.stdout
    assert "nothing missing" in proc.stdout
