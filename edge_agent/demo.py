"""`edge-agent demo`: the whole pipeline on one machine, with no hardware and no network.

A simulated weather station writes lines to a pseudo-terminal, and a simulated energy meter
(an Eastron SDM120, the Modbus slave of edge_agent.testing) answers Modbus RTU requests on
another; the real agent opens both by path with its serial and Modbus sources, buffers in
SQLite and uploads to a sandbox of the insert API on a free local port. `--outage` takes the
sandbox down for a while so the buffer fills and drains. At the end it accounts for every
line the sensor wrote and every poll of the meter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import Agent
from edge_agent.buffer import BufferSession
from edge_agent.config import load_config
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.testing.modbus_slave import METER_MAP, SlaveProcess

TOKEN = "demo-token"
DATASOURCE = "67890"
MQTT_DATASOURCE = "67891"
METER_DATASOURCE = "67892"
DATASOURCES = (DATASOURCE, MQTT_DATASOURCE, METER_DATASOURCE)
METER_EVERY_S = 5  # a line with the meter's last values that reached the sandbox
DEFAULT_MQTT = "mqtt://127.0.0.1:1883"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds to run; 0 runs until Ctrl-C (default 30)")  # fmt: skip
    parser.add_argument("--outage", type=float, default=0.0, metavar="SECONDS",
                        help="take the sandbox down this long, 5 s after the start")  # fmt: skip
    parser.add_argument("--rate", type=float, default=5.0, help="sensor lines per second")
    parser.add_argument("--dir", type=Path, help="keep the demo's files here (default: temp)")
    parser.add_argument("--mqtt", metavar="URL", default=None,
                        help=f"also bridge this MQTT broker (default: {DEFAULT_MQTT} if it "
                        "answers)")  # fmt: skip
    parser.add_argument("--no-mqtt", action="store_true", help="do not bridge MQTT")


def _config_text(data_dir: Path, port: Path, url: str, token_file: Path) -> str:
    return f"""\
# Written by `edge-agent demo`. A real gateway's file looks the same, see configs/.
[agent]
data_dir = "{data_dir}"
device_id = "demo-gw"

[endpoint]
url = "{url}"
token_file = "{token_file}"
max_batch_records = 100
flush_interval_s = 1.0
timeout_s = 5.0
backoff_base_s = 0.5
backoff_max_s = 4.0
reconnect_probe_s = 2.0

[buffer]
commit_interval_ms = 200

[[sources]]
name = "weather"
type = "serial"
port = "{port}"
baudrate = 9600
format = "kv"
shape = "wide"
datasource_id = "{DATASOURCE}"
tags = {{ site = "demo" }}
"""


def _meter_source_text(port: Path) -> str:
    registers = "".join(
        f"""
[[sources.registers]]
name = "{name}"
address = {address}
kind = "input"
type = "float32"
"""
        for name, address in METER_MAP
    )
    return f"""
# A simulated Eastron SDM120 energy meter on Modbus RTU (see the README's worked example).
[[sources]]
name = "meter"
type = "modbus"
transport = "rtu"
port = "{port}"
baudrate = 2400
unit_id = 1
poll_interval_s = 1.0
shape = "wide"
datasource_id = "{METER_DATASOURCE}"
{registers}"""


def _mqtt_source_text(broker: str, prefix: str) -> str:
    return f"""
[[sources]]
name = "plant"
type = "mqtt"
broker = "{broker}"
topics = ["{prefix}/+/+"]
topic_fields = "{prefix}/{{device}}/{{channel}}"
qos = 1
client_id = "edge-agent-demo-{prefix.rsplit("/", 1)[-1]}"
format = "json"
shape = "wide"
datasource_id = "{MQTT_DATASOURCE}"
"""


def broker_answers(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return False
    return True


class MqttPublisher:
    """Publishes `{"seq": n, "pressure": x}` at QoS 1 and counts what the broker acknowledged."""

    def __init__(self, broker: str, topic: str, rate_hz: float) -> None:
        parts = urlsplit(broker)
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self._client.loop_start()
        self._topic = topic
        self._period = 1.0 / rate_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-mqtt", daemon=True)
        self.acked = 0

    def start(self) -> MqttPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.loop_stop()
        self._client.disconnect()

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(self._period):
            payload = json.dumps({"seq": seq, "pressure": round(4.0 + (seq % 11) * 0.05, 2)})
            info = self._client.publish(self._topic, payload, qos=1)
            try:
                info.wait_for_publish(timeout=5)
            except RuntimeError:
                continue  # not connected: the broker never had it
            if info.is_published():
                self.acked = seq = seq + 1


def run(args: argparse.Namespace) -> int:
    if args.duration < 0 or args.outage < 0 or args.rate <= 0:
        print("edge-agent demo: --duration and --outage must be >= 0, --rate > 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as tmp:
        return _Demo(args.dir or Path(tmp), args).run()


class _Demo:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.args = args
        self.stop = threading.Event()
        self.sandbox_db = work / "sandbox.db"
        self.sandbox = Sandbox(tokens=[TOKEN], datasources=DATASOURCES, db_path=self.sandbox_db)
        self.sandbox.start()
        self.port = self.sandbox.port
        self.sensor = PtySensor(work / "ttyDEMO-weather", rate_hz=args.rate)
        self.meter = SlaveProcess(rtu=work / "ttyDEMO-meter", meter=True)
        self.meter_shown_at = -METER_EVERY_S  # the tick its values were last shown
        token_file = work / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)  # as installed: a token others can read earns a warning
        self.config_path = work / "demo.toml"
        text = _config_text(work / "data", self.sensor.link, self.sandbox.url, token_file)
        assert self.meter.link is not None
        text += _meter_source_text(self.meter.link)
        self.broker = None if args.no_mqtt else (args.mqtt or DEFAULT_MQTT)
        if self.broker is not None and not broker_answers(self.broker):
            say(
                f"no MQTT broker answers on {self.broker}: bridging serial only "
                "(install mosquitto, or pass --mqtt URL, to see the MQTT bridge too)"
            )
            self.broker = None
        self.mqtt_topic = f"edge-agent-demo/{os.getpid()}"
        if self.broker is not None:
            text += _mqtt_source_text(self.broker, self.mqtt_topic)
        self.config_path.write_text(text)
        self.publisher: MqttPublisher | None = None

    def run(self) -> int:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        # One line per request would bury the demo's own lines.
        logging.getLogger("edge_agent.sandbox").setLevel(logging.WARNING)
        say(f"sandbox insert API on {self.sandbox.url} (data sources {DATASOURCE}: the serial "
            f"sensor, {MQTT_DATASOURCE}: MQTT, {METER_DATASOURCE}: the Modbus meter)")  # fmt: skip
        say(f"simulated sensor on {self.sensor.link} -> agent config {self.config_path}")
        # Plug in first and write only once the port is open: opening a serial port
        # discards what was waiting in it, as with a real device.
        self.sensor.plug()
        self.meter.start()
        say(f"simulated energy meter (Modbus RTU, unit 1) on {self.meter.link}, polled every 1 s")
        agent = Agent(load_config(self.config_path))
        agent.start()
        try:
            self._wait_connected(agent)
            self.sensor.start()
            if self.broker is not None:
                say(f"bridging MQTT from {self.broker}, topics {self.mqtt_topic}/+/+")
                self.publisher = MqttPublisher(
                    self.broker, f"{self.mqtt_topic}/pump-1/telemetry", rate_hz=2.0
                ).start()
            self._watch(agent)
        finally:
            if self.publisher is not None:
                self.publisher.stop()
            self.sensor.stop()
            agent.sources["meter"].stop()  # its last poll is drained too, not left buffered
            self._drain(agent)
            agent.stop()
            self.sensor.unplug()
            self.meter.stop()
            self.sandbox.stop()
        return self._summary(agent)

    def _watch(self, agent: Agent) -> None:
        start = time.monotonic()
        outage = self.args.outage
        down = False
        seconds = 0
        while not self.stop.wait(1.0):
            t = time.monotonic() - start
            if outage and not down and 5.0 <= t < 5.0 + outage:
                self.sandbox.stop()
                down = True
                say(f"-- outage: the sandbox is down for {outage:.0f} s; readings are buffered")
            elif down and t >= 5.0 + outage:
                self.sandbox = self._new_sandbox()
                down = False
                say("-- the sandbox is back; the buffer drains")
            self._progress(agent, t)
            seconds += 1
            if not down and seconds >= self.meter_shown_at + METER_EVERY_S:
                self._meter_arrived(seconds)
            if self.args.duration and t >= self.args.duration:
                break
        if down:
            self.sandbox = self._new_sandbox()

    def _wait_connected(self, agent: Agent) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            s.stats.connected for s in agent.sources.values()
        ):
            time.sleep(0.05)
        time.sleep(0.3)  # let the MQTT subscription settle

    def _new_sandbox(self) -> Sandbox:
        return Sandbox(
            port=self.port, tokens=[TOKEN], datasources=DATASOURCES, db_path=self.sandbox_db
        ).start()

    def _pending(self, agent: Agent) -> int:
        session = BufferSession(agent.config.buffer_path)
        try:
            return session.pending_count()
        finally:
            session.close()

    def _progress(self, agent: Agent, t: float) -> None:
        read = sum(s.stats.readings for s in agent.sources.values())
        up = agent.uploader.stats
        say(
            f"{t:5.0f}s  read {read:5d}  buffered {self._pending(agent):5d}  "
            f"uploaded {up.records_uploaded:5d}  requests {_requests(up.requests)}"
        )

    def _meter_arrived(self, seconds: int) -> None:
        """The meter's last values that reached the sandbox, and how many polls did: as soon
        as the first arrived, then every METER_EVERY_S seconds."""
        received = self.sandbox.records(METER_DATASOURCE)
        if received:
            self.meter_shown_at = seconds
            polls = f"{len(received)} poll{'s' if len(received) != 1 else ''}"
            say(f"        meter: {_meter_values(received[-1])}  ({polls} received)")

    def _drain(self, agent: Agent) -> None:
        agent.buffer.flush()
        deadline = time.monotonic() + 20
        while self._pending(agent) and time.monotonic() < deadline:
            time.sleep(0.3)

    def _summary(self, agent: Agent) -> int:
        # A fresh sandbox on the same file reads what every incarnation of it stored.
        with Sandbox(datasources=[DATASOURCE], db_path=self.sandbox_db) as received:
            serial = received.records(DATASOURCE)
            bridged = received.records(MQTT_DATASOURCE)
            metered = received.records(METER_DATASOURCE)
        say("")
        say(f"sensor wrote {self.sensor.written} lines; the agent read "
            f"{agent.sources['weather'].stats.lines}")  # fmt: skip
        missing = _account("serial", "lines", self.sensor.written, serial)
        if self.publisher is not None:
            say(f"MQTT: the broker acknowledged {self.publisher.acked} published messages")
            missing += _account("MQTT", "messages", self.publisher.acked, bridged)
        missing += _account_meter(agent.sources["meter"].stats.readings, metered)
        requests = agent.uploader.stats.requests
        say(f"upload requests: {_requests(requests)}; retried after failures: "
            f"{agent.uploader.stats.retries}")  # fmt: skip
        sample = serial[-1:] or [{}]
        say(f"last serial record: {json.dumps(sample[0])}")
        if bridged:
            say(f"last MQTT record:   {json.dumps(bridged[-1])}")
        if metered:
            say(f"last meter record:  {json.dumps(metered[-1])}")
        if missing:
            return 1
        what = "line, message" if self.publisher is not None else "line"
        say(f"nothing missing: every {what} and meter poll reached the endpoint")
        return 0


def _account(what: str, unit: str, sent: int, records: list[dict[str, object]]) -> int:
    seqs = {int(str(r["seq"])) for r in records}
    say(f"sandbox received {len(records)} {what} records ({len(records) - len(seqs)} "
        f"duplicates), {len(seqs)} distinct {unit}")  # fmt: skip
    missing = sorted(set(range(sent)) - seqs)
    if missing:
        say(f"MISSING {len(missing)} {what} {unit}: {missing[:20]}")
    return len(missing)


def _account_meter(polls: int, records: list[dict[str, object]]) -> int:
    """The meter's records are wide, one per poll: a poll's timestamp is its identity."""
    stamps = {str(r["timestamp"]) for r in records}
    say(f"Modbus: the agent polled the meter {polls} times; the sandbox received "
        f"{len(records)} meter records ({len(records) - len(stamps)} duplicates)")  # fmt: skip
    missing = max(0, polls - len(stamps))
    if missing:
        say(f"MISSING {missing} meter polls")
    return missing


def _meter_values(record: dict[str, object]) -> str:
    """`230.4 V  4.12 A  950 W  pf 0.95  50.01 Hz  1234.568 kWh` from a meter record."""
    fields = (
        ("voltage", "{:.1f} V"),
        ("current", "{:.2f} A"),
        ("active_power", "{:.0f} W"),
        ("power_factor", "pf {:.2f}"),
        ("frequency", "{:.2f} Hz"),
        ("energy_kwh", "{:.3f} kWh"),
    )
    return "  ".join(form.format(record[name]) for name, form in fields if name in record)


def _requests(by_status: dict[str, int]) -> str:
    """`200 x7, failed x3`: answers by status; "failed" means no answer (connection error)."""
    names = {"error": "failed"}
    return ", ".join(f"{names.get(k, k)} x{n}" for k, n in sorted(by_status.items())) or "none"


def say(message: str) -> None:
    print(message, flush=True)
