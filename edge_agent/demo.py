"""`edge-agent demo`: the whole pipeline on one machine, with no hardware and no network.

A simulated weather station writes lines to a pseudo-terminal; the real agent opens it by
path with its serial source, buffers in SQLite and uploads to a sandbox of the insert API on
a free local port. `--outage` takes the sandbox down for a while so the buffer fills and
drains. At the end it accounts for every line the sensor wrote.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from edge_agent.agent import Agent
from edge_agent.buffer import BufferSession
from edge_agent.config import load_config
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor

TOKEN = "demo-token"
DATASOURCE = "67890"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds to run; 0 runs until Ctrl-C (default 30)")  # fmt: skip
    parser.add_argument("--outage", type=float, default=0.0, metavar="SECONDS",
                        help="take the sandbox down this long, 5 s after the start")  # fmt: skip
    parser.add_argument("--rate", type=float, default=5.0, help="sensor lines per second")
    parser.add_argument("--dir", type=Path, help="keep the demo's files here (default: temp)")


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
        self.sandbox = Sandbox(tokens=[TOKEN], datasources=[DATASOURCE], db_path=self.sandbox_db)
        self.sandbox.start()
        self.port = self.sandbox.port
        self.sensor = PtySensor(work / "ttyDEMO-weather", rate_hz=args.rate)
        token_file = work / "token"
        token_file.write_text(TOKEN + "\n")
        self.config_path = work / "demo.toml"
        self.config_path.write_text(
            _config_text(work / "data", self.sensor.link, self.sandbox.url, token_file)
        )

    def run(self) -> int:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        say(f"sandbox insert API on {self.sandbox.url}")
        say(f"simulated sensor on {self.sensor.link} -> agent config {self.config_path}")
        # Plug in first and write only once the port is open: opening a serial port
        # discards what was waiting in it, as with a real device.
        self.sensor.plug()
        agent = Agent(load_config(self.config_path))
        agent.start()
        try:
            self._wait_connected(agent)
            self.sensor.start()
            self._watch(agent)
        finally:
            self.sensor.stop()
            self._drain(agent)
            agent.stop()
            self.sensor.unplug()
            self.sandbox.stop()
        return self._summary(agent)

    def _watch(self, agent: Agent) -> None:
        start = time.monotonic()
        outage = self.args.outage
        down = False
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
            if self.args.duration and t >= self.args.duration:
                break
        if down:
            self.sandbox = self._new_sandbox()

    def _wait_connected(self, agent: Agent) -> None:
        deadline = time.monotonic() + 10
        while not agent.sources["weather"].stats.connected and time.monotonic() < deadline:
            time.sleep(0.05)

    def _new_sandbox(self) -> Sandbox:
        return Sandbox(
            port=self.port, tokens=[TOKEN], datasources=[DATASOURCE], db_path=self.sandbox_db
        ).start()

    def _pending(self, agent: Agent) -> int:
        session = BufferSession(agent.config.buffer_path)
        try:
            return session.pending_count()
        finally:
            session.close()

    def _progress(self, agent: Agent, t: float) -> None:
        src = agent.sources["weather"].stats
        up = agent.uploader.stats
        say(
            f"{t:5.0f}s  read {src.readings:5d}  buffered {self._pending(agent):5d}  "
            f"uploaded {up.records_uploaded:5d}  requests {dict(sorted(up.requests.items()))}"
        )

    def _drain(self, agent: Agent) -> None:
        agent.buffer.flush()
        deadline = time.monotonic() + 20
        while self._pending(agent) and time.monotonic() < deadline:
            time.sleep(0.3)

    def _summary(self, agent: Agent) -> int:
        # A fresh sandbox on the same file reads what every incarnation of it stored.
        with Sandbox(datasources=[DATASOURCE], db_path=self.sandbox_db) as received:
            records = received.records(DATASOURCE)
        seqs = {int(r["seq"]) for r in records}
        total = len(records)
        written = self.sensor.written
        missing = sorted(set(range(written)) - seqs)
        say("")
        say(f"sensor wrote {written} lines; the agent read {agent.sources['weather'].stats.lines}")
        say(f"sandbox received {total} records ({total - len(seqs)} duplicates), "
            f"{len(seqs)} distinct lines")  # fmt: skip
        sample = records[-1:] or [{}]
        say(f"last record: {json.dumps(sample[0])}")
        if missing:
            say(f"MISSING {len(missing)} lines: {missing[:20]}")
            return 1
        say("nothing missing: every line the sensor wrote reached the endpoint")
        return 0


def say(message: str) -> None:
    print(message, flush=True)
