"""`edge-agent run --once`: the sources read for real, the records printed, nothing sent or kept.

Real parts: the agent's command as a process, pseudo-terminals opened by path (a pushing sensor
and a polled instrument), the sandbox as the endpoint that must receive nothing, and a running
agent beside the dry run holding the buffer's lock and its serial port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtyResponder, PtySensor
from edge_agent.testing.harness import Mosquitto, Publisher, run_cli
from tests.helpers import DATASOURCE, AgentProcess, serial_source, wait_until, write_config


def dry_run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", "--once", "--config", str(config), *args)


def config_for(tmp_path: Path, sandbox: Sandbox, source: dict[str, object]) -> Path:
    # No token file: the dry run must not need one.
    return write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[source],
        token_file=tmp_path / "no-token-here",
    )


def test_once_prints_what_would_be_sent_and_sends_and_keeps_nothing(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    config = config_for(tmp_path, sandbox, serial_source(pty_sensor.link))
    pty_sensor.start()
    proc = dry_run(config, "--seconds", "1.5")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) >= 10, proc.stdout  # 50 lines/s for 1.5 s, less start-up
    for line in lines:
        assert line["datasource_id"] == DATASOURCE
        assert line["record"]["device_id"] == "gw-test"
        assert line["record"]["timestamp"].endswith("Z")
        assert {"temperature", "seq"} <= set(line["record"])
    assert "nothing was sent or buffered" in proc.stderr
    assert f"weather: {len(lines)} lines or messages -> {len(lines)} records" in proc.stderr
    assert sandbox.stats()["by_status"] == {}, "no request went out"
    assert not (tmp_path / "data").exists(), "no buffer, no lock file, no data_dir"


def test_once_stops_after_one_poll_of_a_polled_instrument(tmp_path: Path, sandbox: Sandbox) -> None:
    device = PtyResponder(tmp_path / "serial-by-id-usb-thermo", lambda r: "t=21.5").start()
    try:
        source = serial_source(device.link, request="R\\r\\n", poll_interval_s=1.0)
        config = config_for(tmp_path, sandbox, source)
        proc = dry_run(config, "--seconds", "30")
    finally:
        device.stop()
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line)["record"] for line in proc.stdout.splitlines()]
    assert [r["t"] for r in records] == [21.5]
    assert len(device.requests) == 1, "one poll, not one a second for --seconds"


def test_once_beside_the_running_agent_says_its_serial_port_is_busy(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(pty_sensor.link)],
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("serial weather: reading")
    pty_sensor.start()
    proc = dry_run(config, "--seconds", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "weather: 0 lines or messages -> 0 records; cannot open" in proc.stderr
    assert proc.stderr.count("\n") <= 6, proc.stderr
    assert agent.proc is not None
    assert f"An agent runs on this configuration (PID {agent.proc.pid}" in proc.stderr
    assert "holds its serial ports, which are busy here" in proc.stderr
    # The running agent was not disturbed: it keeps reading and uploading.
    before = sandbox.stats()["records"]
    deadline = time.monotonic() + 15
    while sandbox.stats()["records"] <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox.stats()["records"] > before
    assert agent.terminate() == 0
    assert "serial weather: cannot open" not in agent.log_text()


def test_the_lock_refusal_suggests_once(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(pty_sensor.link)],
    )
    first = AgentProcess(config, tmp_path / "first.log").start()
    agents.append(first)
    first.wait_log("agent: started")
    second = AgentProcess(config, tmp_path / "second.log").start()
    agents.append(second)
    assert second.proc is not None and second.proc.wait(30) == 2
    assert "`edge-agent run --once --config FILE`" in second.log_text()


def test_once_beside_the_running_agent_reads_mqtt_under_a_client_id_of_its_own(
    tmp_path: Path, sandbox: Sandbox, mosquitto: Mosquitto, agents: list[AgentProcess]
) -> None:
    """The broker would push the agent off if the dry run connected under the agent's id."""
    source = {
        "name": "plant",
        "type": "mqtt",
        "broker": mosquitto.url,
        "topics": ["sensors/+/+"],
        "topic_fields": "sensors/{device}/{metric}",
        "format": "number",
        "datasource_id": DATASOURCE,
        "mqtt_version": "5",
    }
    config = write_config(
        tmp_path / "agent.toml", url=sandbox.url, data_dir=tmp_path / "data", sources=[source]
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("mqtt plant: connected")
    err = tmp_path / "once.err"
    with err.open("w") as stderr:
        once = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--once", "--seconds", "4",
             "--config", str(config)],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    wait_until(lambda: "subscribing to" in err.read_text(), 15, "the dry run subscribed")
    assert "as edge-agent-gw-test-plant-once " in err.read_text()
    publisher = Publisher(mosquitto)
    try:
        for i in range(5):
            publisher.publish(f"sensors/pump-{i}/pressure", str(i))
        publisher.wait_acked()
    finally:
        publisher.close()
    out, _ = once.communicate(timeout=30)
    assert once.returncode == 0, err.read_text()
    printed = sorted(json.loads(line)["record"]["device"] for line in out.splitlines())
    assert printed == [f"pump-{i}" for i in range(5)]
    wait_until(lambda: sandbox.stats()["records"] >= 5, 15, "the agent uploaded them too")
    assert agent.terminate() == 0
    assert "lost the connection" not in agent.log_text()
