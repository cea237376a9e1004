"""Bench row (b) of issue 14: bytes on the wire per hour for a 10 Hz sensor, raw against
`aggregate` with a 60 s window, plain JSON and gzip.

    python scripts/bench_processors.py [--minutes 60] [--json FILE]

An hour of a simulated 10 Hz sensor goes through the agent's own parts: its records
(`RecordBuilder`), the source's processors (`ProcessingIntake`), the buffer (whose writer
closes the windows) and the uploader, to the raw-socket sink of scripts/bench.py, which counts
every byte of each request (request line, headers and body). The clock is simulated, so an
hour takes seconds; the uploader runs on its own schedule:

- live: the uplink is up; every `flush_interval_s` (2 s, the default) of simulated time the
  uploader sends what is pending, as it would (a request per flush with raw readings, a
  request per window with aggregates);
- backlog: the uplink was down for the hour; it then drains in batches of 500.

Prints one markdown table (the form scripts/bench.py reads).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import SinkStats, _sink_serve  # the sink of scripts/bench.py, beside this file

from edge_agent.agent import AgentIntake
from edge_agent.buffer import Buffer, BufferSession
from edge_agent.clock import ClockGuard, utc_stamp
from edge_agent.config import BufferConfig, EndpointConfig, Secret
from edge_agent.processors.aggregate import AggregateConfig
from edge_agent.processors.base import Place
from edge_agent.processors.chain import ProcessingIntake
from edge_agent.processors.durable import GRACE_S
from edge_agent.processors.registry import make_processors
from edge_agent.records import RecordBuilder
from edge_agent.uploader import Uploader

DATASOURCE = "67890"
RATE_HZ = 10
FLUSH_S = 2.0
START = 1_800_000_000.0  # a minute boundary in 2027


class SimClock:
    """Wall and monotonic time that move only when told (the bench drives an hour)."""

    def __init__(self, wall: float) -> None:
        self._lock = threading.Lock()
        self._wall = wall

    def wall(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._wall - START

    def set(self, wall: float) -> None:
        with self._lock:
            self._wall = wall


def vibration(i: int) -> float:
    """A sensor's value: a slow wave plus noise, so gzip is not flattered by repeats."""
    return round(0.5 + 0.3 * math.sin(i / 37) + (i * 7919 % 1499) / 15_000, 4)


def start_sink() -> tuple[str, SinkStats]:
    stats = SinkStats()
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_sink_serve, args=(conn, stats), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    port = server.getsockname()[1]
    return f"http://127.0.0.1:{port}/restapi/datasource/insert", stats


def run(
    work: Path, url: str, stats: SinkStats, *, aggregate: bool, gzip: bool, live: bool, hours: float
) -> dict[str, Any]:
    clock = SimClock(START)
    path = work / f"{'agg' if aggregate else 'raw'}-{'gz' if gzip else 'plain'}-{live}.db"
    buffer = Buffer(path, BufferConfig(max_bytes=1 << 30, commit_interval_ms=20), clock)
    buffer.open()
    guard = ClockGuard(clock, trust_clock=True)
    downstream = AgentIntake(buffer, None, clock, guard)
    place = Place("vib", "long", frozenset({"device_id"}))
    configs = (AggregateConfig(metrics=("vibration",), window_s=60),) if aggregate else ()
    intake = ProcessingIntake(downstream, make_processors(configs, place, buffer.read_state))
    builder = RecordBuilder(DATASOURCE, "long", {}, "gw-001")
    endpoint = EndpointConfig(url=url, max_batch_records=500, gzip=gzip, flush_interval_s=0.01)
    uploader = Uploader(endpoint, Secret("bench-token"), buffer)
    session = BufferSession(path)
    before = stats.snapshot()
    readings = int(hours * 3600 * RATE_HZ)
    per_flush = int(FLUSH_S * RATE_HZ)
    if live:
        uploader.start()
    for i in range(readings):
        at = START + i / RATE_HZ
        clock.set(at)
        intake.put(builder.build({"vibration": vibration(i)}, utc_stamp(at)))
        if live and (i + 1) % per_flush == 0:
            drain(buffer, session)
    clock.set(START + readings / RATE_HZ + 60 + GRACE_S + 1)  # the last window closes
    buffer.commit_soon()
    until(lambda: count(session, "windows") == 0)
    if not live:
        uploader.start()
    drain(buffer, session)
    uploader.stop()
    buffer.close()
    session.close()
    after = stats.snapshot()
    return {k: after[k] - before[k] for k in after} | {"readings": readings}


def drain(buffer: Buffer, session: BufferSession) -> None:
    """Wait until what was put is committed and uploaded."""
    buffer.flush()
    until(lambda: count(session, "readings") == 0)


def count(session: BufferSession, table: str) -> int:
    return int(session.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def until(predicate: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the agent did not catch up in time")
        time.sleep(0.002)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_processors.py")
    parser.add_argument("--minutes", type=float, default=60.0, help="simulated time (60)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    hours = args.minutes / 60
    url, stats = start_sink()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edge-bench-proc-") as tmp:
        for live in (True, False):
            for gzip in (False, True):
                for aggregate in (False, True):
                    name = f"{'live' if live else 'backlog'}-{'gzip' if gzip else 'plain'}"
                    fig = run(
                        Path(tmp),
                        url,
                        stats,
                        aggregate=aggregate,
                        gzip=gzip,
                        live=live,
                        hours=hours,
                    )
                    figures[f"{name}-{'aggregate' if aggregate else 'raw'}"] = fig
    print("| measurement | agent | baseline (same run) | ratio | target | result |")
    print("|---|---|---|---|---|---|")
    for phase in ("live", "backlog"):
        for encoding in ("plain", "gzip"):
            raw, agg = figures[f"{phase}-{encoding}-raw"], figures[f"{phase}-{encoding}-aggregate"]
            how = (
                f"uplink up, a request per {FLUSH_S:g} s flush"
                if phase == "live"
                else "after an hour's outage, batches of 500"
            )
            print(
                f"| bytes on the wire per hour, 10 Hz sensor, {how}, {encoding} JSON | "
                f"aggregate 60 s (5 stats): {per_hour(agg, hours)} in {agg['requests']} "
                f"requests | raw: {per_hour(raw, hours)} in {raw['requests']} requests | "
                f"{agg['wire_bytes'] / raw['wire_bytes']:.4f}× |  |  |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": args.minutes, **figures}, indent=1))
    return 0


def per_hour(fig: dict[str, Any], hours: float) -> str:
    return f"{fig['wire_bytes'] / hours:,.0f} B"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
