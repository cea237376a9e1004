"""Benchmarks of the agent, each row measured against a baseline in the same run.

Over 600 lines on purpose: one script prints one table, and its rows share the worker protocol,
the machine description and the table; each row is a parent function and its `_worker`, read
together. Rows with machinery of their own are scripts beside it: bench_mqtt.py and
bench_modbus.py (their `measure()` imported), bench_processors.py (run, its JSON read).

    ./scripts/bench [--quick]
                    [--rows ingest,footprint,drain,serial,mqtt,modbus,health,pi,processors,fresh]
                    [--json FILE]

Prints a description of the machine, the command line and ONE markdown table. The machine is
assumed to be shared and noisy, so no figure stands alone: each is put next to a baseline
measured a moment before or after it, on the same machine, and judged by their ratio.

Every heavy measurement runs in a child process (`bench.py _worker NAME ...`) so that its
resident memory, its /proc/<pid>/io counters, its CPU time and the strace counts belong to it
alone. A worker writes its figures as JSON to the file named by `--out`; a worker that the
parent times from outside prints `READY` on stdout when it is ready.

Rows (targets from the issue in brackets):
    ingest     5,000 readings/s through Buffer.put: fsyncs/s [<= 1 per commit interval],
               bytes written per reading [<= 4x its JSON], WAL peak, achieved rate
    footprint  RSS of the agent idle and with a large backlog [< 60 MB] vs bare imports;
               start-up time vs a bare interpreter
    drain      records/s uploaded to a local sink vs only reading and deleting them [>= 0.5]
    serial     CPU per 1,000 readings from a pty at 115200 baud vs a bare pyserial readline
    mqtt       MQTT QoS 1 ingest vs a bare paho subscriber (scripts/bench_mqtt.py's measure())
    modbus     registers/s and CPU per poll of the Modbus source reading 100 holding registers
               from the test slave over a pty vs a bare pymodbus loop [rate >= 0.8, CPU <= 1.5x]
               (scripts/bench_modbus.py's measure())
    health     /healthz latency and `buffer stats` time with the backlog buffered vs an empty
               buffer [<= 2x]; a full recount; the CPU the running totals' triggers cost
               per reading put and per reading deleted, vs the same buffer without them
    pi         "Pi-class": the agent confined to a quarter of one core (cgroup v2 cpu.max, v1
               cpu.cfs_quota_us or systemd-run, whichever works here) with serial at 115200
               baud, MQTT at 500 msg/s and the uplink draining a backlog [nothing dropped];
               its CPU share and memory; bench_mqtt's ratio in the same confinement
    processors scripts/bench_processors.py: bytes on the wire per hour, 10 Hz, aggregate vs raw
    fresh      (issue 14, a) time from the uplink's return to the first fresh reading delivered
               with the backlog waiting, drain = "live_first" vs "oldest_first" in the same run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.testing.harness import (
    AgentProcess,
    Mosquitto,
    PeakSampler,
    Publisher,
    free_port,
    mosquitto_binary,
    serial_source,
    wait_for,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve()
PY = sys.executable
DATASOURCE = "67890"
DEVICE = "gw-001"
COMMIT_INTERVAL_MS = 200
INGEST_RATE = 5_000
BATCH_RECORDS = 500
DRAIN_REPEATS = 3
BAUD_BYTES_S = 115_200 // 10  # 8N1: ten bits on the wire per byte
BIG_BUFFER = 1 << 30  # max_bytes for the big backlogs, so that nothing is dropped
BARE_IMPORTS = "import sqlite3, httpx, serial, paho.mqtt.client"
ALL_ROWS = (
    "ingest",
    "footprint",
    "drain",
    "serial",
    "mqtt",
    "modbus",
    "health",
    "pi",
    "processors",
    "fresh",
)
HEALTH_REQUESTS = 50
PI_MQTT_RATE = 500  # messages/s
PI_QUOTA = (25_000, 100_000)  # microseconds of CPU per period: a quarter of one core


@dataclass(frozen=True)
class Sizes:
    ingest_s: float  # seconds of ingest at INGEST_RATE
    backlog: int  # readings buffered for footprint and drain
    serial_fast: int  # lines written as fast as the pty takes them
    serial_paced: int  # lines written at 115200 baud
    mqtt_messages: int
    modbus_polls: int  # per round, of each loop
    totals_readings: int  # readings put and deleted to measure the totals' triggers
    pi_seconds: float  # live input of the Pi-class run (which drains `backlog` meanwhile)
    pi_mqtt_messages: int  # per subscriber, for its MQTT ratio
    settle_s: float = 5.0  # how long the agent runs before its memory is read


QUICK = Sizes(
    ingest_s=10,
    backlog=100_000,
    serial_fast=20_000,
    serial_paced=2_500,
    mqtt_messages=5_000,
    modbus_polls=200,
    totals_readings=50_000,
    pi_seconds=20,
    pi_mqtt_messages=5_000,
)
FULL = Sizes(
    ingest_s=60,
    backlog=1_000_000,
    serial_fast=100_000,
    serial_paced=20_000,
    mqtt_messages=50_000,
    modbus_polls=500,
    totals_readings=200_000,
    pi_seconds=60,
    pi_mqtt_messages=20_000,
)
MODBUS_ROUNDS = 3


@dataclass
class Row:
    measurement: str
    agent: str
    baseline: str
    ratio: str = ""
    target: str = ""
    result: str = ""  # PASS, FAIL, or "" for a figure without a target


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


# --- small helpers shared by parent and workers ------------------------------------------


def long_record(stamp: str, i: int) -> dict[str, Any]:
    """A reading shaped like the agent's `long` records."""
    return {
        "timestamp": stamp,
        "metric": "temperature",
        # Spread like a real sensor's, so that gzip is not flattered by repeated values.
        "value": round(18.0 + (i * 7919 % 1499) / 100, 2),
        "device_id": DEVICE,
    }


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def proc_io() -> dict[str, int]:
    """This process's /proc/self/io counters (all its threads)."""
    pairs = (line.split(":") for line in Path("/proc/self/io").read_text().splitlines())
    return {k.strip(): int(v) for k, v in pairs}


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=1))


def worker_args(argv: list[str], *options: tuple[str, type, Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py _worker")
    parser.add_argument("--out", required=True)
    for name, kind, default in options:
        if kind is bool:
            parser.add_argument(name, action="store_true")
        else:
            parser.add_argument(name, type=kind, default=default)
    return parser.parse_args(argv)


# --- workers: ingest ---------------------------------------------------------------------


def file_size(path: Path) -> int:
    """The size of a file that may not exist yet (0)."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_size
    return 0


def worker_ingest(argv: list[str]) -> None:
    """Buffer.put at a steady rate for a while; seconds 0 measures only open and close."""
    a = worker_args(
        argv, ("--dir", str, None), ("--rate", int, INGEST_RATE), ("--seconds", float, 10)
    )
    from edge_agent.buffer import Buffer
    from edge_agent.clock import utc_stamp
    from edge_agent.config import BufferConfig
    from edge_agent.records import Reading

    path = Path(a.dir) / "buffer.db"
    buf = Buffer(path, BufferConfig(commit_interval_ms=COMMIT_INTERVAL_MS, sync="full"))
    buf.open()
    io0 = proc_io()
    produced, slowest_put = 0, 0.0
    wal_path = path.with_name(path.name + "-wal")
    with PeakSampler(lambda: file_size(wal_path), 0.1) as wal:
        t0 = time.monotonic()
        end = t0 + a.seconds
        while (now := time.monotonic()) < end:
            due = int(a.rate * (now - t0)) - produced
            if due > 0:
                stamp = utc_stamp(time.time())
                readings = [
                    Reading(DATASOURCE, long_record(stamp, produced + i)) for i in range(due)
                ]
                before = time.monotonic()
                buf.put(readings)
                slowest_put = max(slowest_put, time.monotonic() - before)
                produced += due
            time.sleep(0.01)
        put_s = time.monotonic() - t0
        buf.flush()
        flush_s = time.monotonic() - t0 - put_s
        commits = buf.commits
        buf.close()
    io1 = proc_io()
    db_bytes = path.stat().st_size
    rows, json_bytes = _stored(path)
    write_json(
        a.out,
        {
            "produced": produced,
            "stored": rows,
            "put_s": put_s,
            "flush_s": flush_s,
            "slowest_put_s": slowest_put,
            "commits": commits,
            "wal_peak": wal.peak,
            "db_bytes": db_bytes,
            "json_bytes": json_bytes,
            "io": {k: io1[k] - io0[k] for k in io1},
        },
    )


def _stored(path: Path) -> tuple[int, int]:
    """Readings in a buffer database and the total size of their JSON texts."""
    conn = sqlite3.connect(path)
    try:
        n, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(record)), 0) FROM readings"
        ).fetchone()
    finally:
        conn.close()
    return int(n), int(size)


class _Shifted:
    """The system's clocks, the wall one moved by `offset_s`."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def wall(self) -> float:
        return time.time() + self.offset_s

    def monotonic(self) -> float:
        return time.monotonic()


def worker_fill(argv: list[str]) -> None:
    """A buffer database holding N readings, filled fast with big puts."""
    a = worker_args(argv, ("--dir", str, None), ("--readings", int, 100_000), ("--age-s", float, 0))
    from edge_agent.buffer import Buffer
    from edge_agent.clock import utc_stamp
    from edge_agent.config import BufferConfig
    from edge_agent.records import Reading

    path = Path(a.dir) / "buffer.db"
    # --age-s: accepted that long ago (an outage's backlog), as the buffer's clock says.
    buf = Buffer(path, BufferConfig(max_bytes=BIG_BUFFER, sync="normal"), _Shifted(-a.age_s))
    buf.open()
    t0 = time.monotonic()
    chunk = 10_000
    base = time.time() - a.age_s - a.readings / INGEST_RATE
    for start in range(0, a.readings, chunk):
        n = min(chunk, a.readings - start)
        # Stamped as if read at INGEST_RATE, each with its own millisecond.
        stamps = (utc_stamp(base + (start + i) / INGEST_RATE) for i in range(n))
        buf.put([Reading(DATASOURCE, long_record(t, start + i)) for i, t in enumerate(stamps)])
    buf.flush(timeout=600)
    buf.close()
    rows, json_bytes = _stored(path)
    write_json(
        a.out,
        {
            "readings": rows,
            "json_bytes": json_bytes,
            "fill_s": time.monotonic() - t0,
            "db_bytes": path.stat().st_size,
        },
    )


# --- workers: footprint ------------------------------------------------------------------


def agent_config(
    data_dir: Path, url: str, sources: list[dict[str, Any]], status_port: int | None = None
) -> Path:
    """A config for the real agent with the production timings (not the fast ones of the
    tests' write_config), a buffer large enough to drop nothing, and the status endpoint
    off unless a port is given."""
    return write_config(
        data_dir / "config.toml",
        url=url,
        data_dir=data_dir,
        sources=sources,
        endpoint={
            "flush_interval_s": 2.0,
            "timeout_s": 10.0,
            "backoff_base_s": 1.0,
            "backoff_max_s": 300.0,
        },
        buffer={"commit_interval_ms": COMMIT_INTERVAL_MS, "max_bytes": BIG_BUFFER},
        agent={"device_id": DEVICE, "log_level": "warning"},
        status=None if status_port is None else {"listen": f"127.0.0.1:{status_port}"},
    )


def worker_footprint(argv: list[str]) -> None:
    """The real agent (one serial source on a simulated pty, an unreachable endpoint)."""
    entered = time.monotonic()
    a = worker_args(argv, ("--dir", str, None), ("--settle", float, 5.0))
    from edge_agent.agent import Agent
    from edge_agent.buffer import BufferSession
    from edge_agent.config import load_config
    from edge_agent.simulator import PtySensor

    imported = time.monotonic()
    data_dir = Path(a.dir)
    sensor = PtySensor(data_dir / "ttyBENCH", rate_hz=5.0)
    sensor.plug()
    config_path = agent_config(
        data_dir,
        f"http://127.0.0.1:{free_port()}/restapi/datasource/insert",
        [serial_source(sensor.link, shape="long")],
    )
    agent = Agent(load_config(config_path))
    before_start = time.monotonic()
    agent.start()
    started = time.monotonic()
    print("READY", flush=True)
    sensor.start()
    time.sleep(a.settle)
    status = proc_status()
    requests = dict(agent.uploader.stats.requests)
    lines = sum(s.stats.lines for s in agent.sources.values())
    agent.stop()
    sensor.stop()
    sensor.unplug()
    with BufferSession(agent.config.buffer_path) as session:
        pending = session.pending_count()
    write_json(
        a.out,
        {
            **status,
            "import_s": imported - entered,
            "agent_start_s": started - before_start,
            "worker_to_ready_s": started - entered,
            "pending": pending,
            "serial_lines": lines,
            "upload_requests": requests,
        },
    )


# --- workers: drain ----------------------------------------------------------------------


class SinkStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.body_bytes = 0
        self.wire_bytes = 0
        self.records = 0  # counted only with --count-records

    def add(self, body: int, wire: int, records: int = 0) -> None:
        with self.lock:
            self.requests += 1
            self.body_bytes += body
            self.wire_bytes += wire
            self.records += records

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "requests": self.requests,
                "body_bytes": self.body_bytes,
                "wire_bytes": self.wire_bytes,
                "records": self.records,
            }


_SINK_OK = b'{"message":"Data successfully inserted"}'


def _records_in(body: bytes, gzipped: bool) -> int:
    import gzip

    return len(json.loads(gzip.decompress(body) if gzipped else body)["data"])


def _sink_serve(conn: socket.socket, stats: SinkStats, count: bool = False) -> None:
    """HTTP/1.1 keep-alive: read Content-Length bodies, answer 200; GET /stats tells counts."""
    with conn, conn.makefile("rb") as rfile:
        while True:
            request = rfile.readline()
            if not request:
                return
            head, length, close, gzipped = len(request), 0, False, False
            while (line := rfile.readline()) not in (b"\r\n", b"\n", b""):
                head += len(line)
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                    close = True
                elif name.strip().lower() == "content-encoding":
                    gzipped = value.strip().lower() == "gzip"
            body = rfile.read(length) if length else b""
            if request.startswith(b"GET /stats"):
                answer = json.dumps(stats.snapshot()).encode()
            else:
                records = _records_in(body, gzipped) if count else 0
                stats.add(len(body), head + 2 + len(body), records)
                answer = _SINK_OK
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(answer)).encode()
                + b"\r\n\r\n"
                + answer
            )
            if close:
                return


def worker_sink(argv: list[str]) -> None:
    """An insert endpoint that accepts and discards; prints `PORT n`, runs until SIGTERM.
    With --count-records it also counts the records of each body (costs it CPU)."""
    a = worker_args(argv, ("--count-records", bool, False), ("--port", int, 0))
    stats = SinkStats()
    server = socket.create_server(("127.0.0.1", a.port))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("PORT", server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        serve = (conn, stats, a.count_records)
        threading.Thread(target=_sink_serve, args=serve, daemon=True).start()


def worker_drain(argv: list[str]) -> None:
    """Empty a filled buffer: through the Uploader to --url, or (--url '') SQLite only."""
    a = worker_args(argv, ("--db", str, None), ("--url", str, ""), ("--gzip", bool, False))
    from edge_agent.buffer import Buffer, BufferSession
    from edge_agent.config import BufferConfig, EndpointConfig, Secret
    from edge_agent.uploader import Uploader

    path = Path(a.db)
    session = BufferSession(path)
    total = session.pending_count()
    buf = Buffer(path, BufferConfig(max_bytes=BIG_BUFFER))
    buf.open()  # the uploader needs it; opening is start-up, not draining
    cpu0, t0 = cpu_seconds(), time.monotonic()
    if a.url:
        endpoint = EndpointConfig(url=a.url, max_batch_records=BATCH_RECORDS, gzip=a.gzip)
        uploader = Uploader(endpoint, Secret("bench-token"), buf)
        uploader.start()
        done = wait_for(lambda: uploader.stats.records_uploaded >= total, timeout=3600, step=0.01)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
        uploaded, requests = uploader.stats.records_uploaded, dict(uploader.stats.requests)
        uploader.stop()
    else:
        uploaded, requests, done = 0, {}, True
        while (batch := session.next_batch(BATCH_RECORDS, 1_000_000)) is not None:
            session.ack(batch)
            uploaded += len(batch.rows)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    buf.close()
    left = session.pending_count()
    session.close()
    write_json(
        a.out,
        {
            "records": uploaded,
            "done": done,
            "left": left,
            "seconds": elapsed,
            "cpu_s": cpu,
            "requests": requests,
        },
    )


# --- workers: freshness after an outage ---------------------------------------------------

FRESH_HZ = 10.0  # the live sensor writing through the outage and after it
FRESH_PROBE_S = 0.5  # reconnect_probe_s: the return is noticed within this (±20 %)
FRESH_REPEATS = 3
FRESH_DS = "fresh"


def worker_fresh(argv: list[str]) -> None:
    """The uplink down with the backlog waiting and a sensor writing at FRESH_HZ; the sink
    comes up on the uploader's port; time until the first reading written after that was
    delivered, then until the whole backlog was.

    After the return the sensor writes to another data source (FRESH_DS), so that the first
    fresh reading's delivery is one counter (`uploaded.<FRESH_DS>`, bumped with the delete):
    row ids cannot tell, SQLite gives a deleted newest row's id to the next one."""
    a = worker_args(argv, ("--db", str, None), ("--drain", str, "live_first"))
    from edge_agent.buffer import Buffer, BufferSession
    from edge_agent.clock import utc_stamp
    from edge_agent.config import BufferConfig, EndpointConfig, Secret
    from edge_agent.records import Reading
    from edge_agent.uploader import Uploader

    path, port = Path(a.db), free_port()
    buf = Buffer(path, BufferConfig(max_bytes=BIG_BUFFER, commit_interval_ms=COMMIT_INTERVAL_MS))
    buf.open()
    endpoint = EndpointConfig(
        url=f"http://127.0.0.1:{port}/restapi/datasource/insert",
        max_batch_records=BATCH_RECORDS,
        drain=a.drain,
        reconnect_probe_s=FRESH_PROBE_S,
    )
    uploader = Uploader(endpoint, Secret("bench-token"), buf)
    uploader.start()
    stop, returned = threading.Event(), threading.Event()

    def sensor() -> None:
        seq = 0
        while not stop.wait(1 / FRESH_HZ):
            ds = FRESH_DS if returned.is_set() else DATASOURCE
            buf.put([Reading(ds, long_record(utc_stamp(time.time()), seq))])
            seq += 1

    writer = threading.Thread(target=sensor, daemon=True)
    writer.start()
    session = BufferSession(path)
    backlog = session.pending_count()
    assert wait_for(lambda: uploader.uplink.down, timeout=60), "the uplink was never down"
    time.sleep(2.0)  # an outage of a few seconds more, with the sensor writing
    sink = subprocess.Popen(
        [PY, str(BENCH), "_worker", "sink", "--port", str(port), "--out", os.devnull],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert sink.stdout is not None
        sink.stdout.readline()  # PORT n: listening
        t0 = time.monotonic()
        returned.set()
        count = "SELECT value FROM counters WHERE name = ?"
        first_s = drained_s = None
        left_then = backlog
        while first_s is None or drained_s is None:  # both watched at once, every 5 ms
            now = time.monotonic() - t0
            # The backlog by the uploader's count: a count in the buffer would slow the drain.
            if drained_s is None and uploader.backlog_delivered >= backlog:
                drained_s = now
            if (
                first_s is None
                and session.conn.execute(count, (f"uploaded.{FRESH_DS}",)).fetchone()
            ):
                first_s, left_then = now, backlog - uploader.backlog_delivered
            if now > 3600:
                raise RuntimeError("the backlog or the fresh readings never arrived")
            time.sleep(0.005)
        done = True
    finally:
        stop.set()
        writer.join()
        uploader.stop()
        sink.terminate()
        sink.wait(10)
    buf.close()
    session.close()
    write_json(
        a.out,
        {
            "drain": a.drain,
            "backlog": backlog,
            "first_fresh_s": first_s,
            "backlog_left_then": left_then,
            "drained_s": drained_s,
            "done": done,
            "requests": dict(uploader.stats.requests),
        },
    )


# --- workers: serial ---------------------------------------------------------------------


def serial_line(seq: int) -> bytes:
    from edge_agent.simulator import kv_line

    return kv_line(seq, time.time()).encode() + b"\r\n"


def worker_pty_write(argv: list[str]) -> None:
    """Write N sensor lines to a pty master: at 115200 baud (--paced) or as fast as it takes."""
    a = worker_args(argv, ("--fd", int, None), ("--lines", int, 1000), ("--paced", bool, False))
    sent, t0 = 0, time.monotonic()
    if a.paced:
        for seq in range(a.lines):
            line = serial_line(seq)
            due = t0 + (sent + len(line)) / BAUD_BYTES_S
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            os.write(a.fd, line)
            sent += len(line)
    else:
        for start in range(0, a.lines, 100):
            chunk = b"".join(serial_line(s) for s in range(start, min(a.lines, start + 100)))
            view = memoryview(chunk)
            while view:
                view = view[os.write(a.fd, view) :]
            sent += len(chunk)
    write_json(a.out, {"bytes": sent, "seconds": time.monotonic() - t0})


def _spawn_writer(master: int, lines: int, paced: bool, out: str) -> subprocess.Popen[bytes]:
    cmd = [
        PY,
        str(BENCH),
        "_worker",
        "pty_write",
        "--out",
        out,
        "--fd",
        str(master),
        "--lines",
        str(lines),
    ]
    return subprocess.Popen([*cmd, *(["--paced"] if paced else [])], pass_fds=(master,))


def worker_serial(argv: list[str]) -> None:
    """Read N lines from a pty: the agent's SerialSource + Buffer, or a bare readline loop.

    The writer is a child process, so its CPU time is not ours (RUSAGE_SELF).
    """
    a = worker_args(
        argv,
        ("--mode", str, "agent"),
        ("--dir", str, None),
        ("--lines", int, 1000),
        ("--paced", bool, False),
    )
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)  # keep our slave fd open: the pty lives while we do
    port = os.ttyname(slave)
    read = _agent_reader(port, Path(a.dir)) if a.mode == "agent" else _bare_reader(port)
    with read as reader:
        cpu0, t0 = cpu_seconds(), time.monotonic()
        writer = _spawn_writer(master, a.lines, a.paced, a.out + ".writer.json")
        got = reader(a.lines, lambda: writer.poll() is not None)
        cpu, elapsed = cpu_seconds() - cpu0, time.monotonic() - t0
        writer.wait()
    written = json.loads(Path(a.out + ".writer.json").read_text())
    write_json(
        a.out, {**got, "cpu_s": cpu, "seconds": elapsed, "writer_seconds": written["seconds"]}
    )


Reader = Callable[[int, Callable[[], bool]], dict[str, int]]


class _agent_reader:
    """The agent's path: SerialSource -> AgentIntake -> Buffer (commit every 200 ms)."""

    def __init__(self, port: str, data_dir: Path) -> None:
        from edge_agent.agent import AgentIntake
        from edge_agent.buffer import Buffer
        from edge_agent.clock import ClockGuard, SystemClock
        from edge_agent.config import BufferConfig
        from edge_agent.sources.serial.config import SerialConfig
        from edge_agent.sources.serial.source import SerialSource

        self.path = data_dir / "buffer.db"
        self.buffer = Buffer(
            self.path, BufferConfig(commit_interval_ms=COMMIT_INTERVAL_MS, max_bytes=BIG_BUFFER)
        )
        config = SerialConfig(
            name="bench",
            type="serial",
            datasource_id=DATASOURCE,
            format="kv",
            shape="long",
            port=port,
            baudrate=115_200,
        )
        clock = SystemClock()
        intake = AgentIntake(self.buffer, None, clock, ClockGuard(clock, trust_clock=True))
        self.source = SerialSource(config, DEVICE, intake)

    def __enter__(self) -> Reader:
        self.buffer.open()
        self.source.start()
        if not wait_for(lambda: self.source.stats.connected, 10, 0.02):
            raise SystemExit(
                f"the serial source did not open its port: {self.source.stats.last_error}"
            )
        return self._read

    def _read(self, lines: int, writer_done: Callable[[], bool]) -> dict[str, int]:
        stats = self.source.stats
        last, last_change = -1, time.monotonic()
        while stats.lines < lines:
            if stats.lines != last:
                last, last_change = stats.lines, time.monotonic()
            elif writer_done() and time.monotonic() - last_change > 3:
                break
            time.sleep(0.05)
        self.buffer.flush()
        return {
            "lines": stats.lines,
            "readings": stats.readings,
            "parse_errors": stats.parse_errors,
        }

    def __exit__(self, *exc: object) -> None:
        self.source.stop()
        self.buffer.close()


class _bare_reader:
    """The baseline: pyserial's readline() in a loop, nothing done with the lines."""

    def __init__(self, port: str) -> None:
        import serial

        self.port = serial.Serial(port, 115_200, timeout=0.2)

    def __enter__(self) -> Reader:
        return self._read

    def _read(self, lines: int, writer_done: Callable[[], bool]) -> dict[str, int]:
        n = 0
        while n < lines:
            if self.port.readline():
                n += 1
            elif writer_done():
                break
        return {"lines": n, "readings": n}

    def __exit__(self, *exc: object) -> None:
        self.port.close()


# --- workers: health and the running totals ----------------------------------------------


def _get(url: str) -> int:
    """GET `url`; its HTTP status (a 503 of an unhealthy agent is an answer too)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as reply:
            reply.read()
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def _timed(call: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


_TRIGGERS = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'pending_totals_%'"


def worker_totals_cpu(argv: list[str]) -> None:
    """CPU per reading put and committed, then read and deleted, in a new buffer; with
    --no-totals the running totals' triggers are dropped first (the cost they add)."""
    a = worker_args(
        argv, ("--dir", str, None), ("--readings", int, 100_000), ("--no-totals", bool, False)
    )
    from edge_agent.buffer import Buffer, BufferSession
    from edge_agent.clock import utc_stamp
    from edge_agent.config import BufferConfig
    from edge_agent.records import Reading

    path = Path(a.dir) / "buffer.db"
    buf = Buffer(path, BufferConfig(max_bytes=BIG_BUFFER, commit_interval_ms=COMMIT_INTERVAL_MS))
    buf.open()
    session = BufferSession(path)
    if a.no_totals:
        for (name,) in session.conn.execute(_TRIGGERS).fetchall():
            session.conn.execute(f"DROP TRIGGER {name}")
    cpu0 = cpu_seconds()
    for start in range(0, a.readings, 1000):
        stamp = utc_stamp(time.time())
        n = min(1000, a.readings - start)
        buf.put([Reading(DATASOURCE, long_record(stamp, start + i)) for i in range(n)])
    buf.flush(timeout=600)
    cpu1 = cpu_seconds()
    deleted = 0
    while (batch := session.next_batch(BATCH_RECORDS, 1_000_000)) is not None:
        session.ack(batch)
        deleted += len(batch.rows)
    cpu2 = cpu_seconds()
    buf.close()
    session.close()
    write_json(
        a.out,
        {"put": a.readings, "deleted": deleted, "put_cpu_s": cpu1 - cpu0, "ack_cpu_s": cpu2 - cpu1},
    )


WORKERS: dict[str, Callable[[list[str]], None]] = {
    "ingest": worker_ingest,
    "fill": worker_fill,
    "footprint": worker_footprint,
    "sink": worker_sink,
    "drain": worker_drain,
    "pty_write": worker_pty_write,
    "serial": worker_serial,
    "totals_cpu": worker_totals_cpu,
    "fresh": worker_fresh,
}


# --- the parent: running workers ---------------------------------------------------------


class Bench:
    """Runs workers in a scratch directory and keeps their logs for a failed run."""

    def __init__(self, work: Path, sizes: Sizes, quick: bool) -> None:
        self.work = work
        self.sizes = sizes
        self.quick = quick
        self._n = 0
        self._backlog: tuple[Path, dict[str, Any]] | None = None
        self._copies: list[Path] = []

    def fresh_dir(self, name: str) -> Path:
        self._n += 1
        path = self.work / f"{self._n:02d}-{name}"
        path.mkdir()
        return path

    def command(self, name: str, *args: str) -> tuple[list[str], Path, Path]:
        self._n += 1
        out = self.work / f"{self._n:02d}-{name}.json"
        log = self.work / f"{self._n:02d}-{name}.log"
        return [PY, str(BENCH), "_worker", name, "--out", str(out), *args], out, log

    def worker(self, name: str, *args: str, wrap: tuple[str, ...] = ()) -> dict[str, Any]:
        cmd, out, log = self.command(name, *args)
        with log.open("wb") as err:
            proc = subprocess.run([*wrap, *cmd], stdout=err, stderr=subprocess.STDOUT, cwd=ROOT)
        return self.result(name, proc.returncode, out, log)

    def timed_worker(self, name: str, *args: str) -> tuple[float, dict[str, Any]]:
        """Run a worker that prints READY; also return the seconds from spawn to READY."""
        cmd, out, log = self.command(name, *args)
        with log.open("wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            ready = time.monotonic() - t0
            proc.stdout.read()
            proc.wait()
        if line.strip() != b"READY":
            ready = float("nan")
        return ready, self.result(name, proc.returncode, out, log)

    def result(self, name: str, returncode: int, out: Path, log: Path) -> dict[str, Any]:
        if returncode != 0 or not out.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(
                f"worker {name} failed (exit status {returncode}); its log ends:\n{tail}"
            )
        data: dict[str, Any] = json.loads(out.read_text())
        return data

    def backlog(self) -> tuple[Path, dict[str, Any]]:
        """A database holding the backlog (filled once per run), and what the fill found."""
        if self._backlog is None:
            d = self.fresh_dir("backlog")
            self._backlog = (
                d / "buffer.db",
                self.worker("fill", "--dir", str(d), "--readings", str(self.sizes.backlog)),
            )
        return self._backlog

    def backlog_copy(self, name: str) -> Path:
        source, _ = self.backlog()
        d = self.fresh_dir(name)
        shutil.copyfile(source, d / "buffer.db")
        self._copies.append(d)
        return d / "buffer.db"

    def drop_copies(self) -> None:
        """Delete the copies of the backlog made so far (a full one is ~150 MB)."""
        for d in self._copies:
            shutil.rmtree(d, ignore_errors=True)
        self._copies.clear()


# --- formatting --------------------------------------------------------------------------


def mb(kib: float) -> str:
    return f"{kib * 1024 / 1e6:.1f} MB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def per_s(n: float) -> str:
    return f"{n:,.0f}/s"


# --- the rows ----------------------------------------------------------------------------


def bench_ingest(b: Bench) -> Report:
    rep = Report()
    strace = shutil.which("strace")
    runs: dict[str, dict[str, Any]] = {}
    for label, seconds in (("setup", 0.0), ("run", b.sizes.ingest_s)):
        d = b.fresh_dir(f"ingest-{label}")
        st = d / "strace.txt"
        args = ("--dir", str(d), "--rate", str(INGEST_RATE), "--seconds", str(seconds))
        wrap = (
            (strace, "-f", "--seccomp-bpf", "-e", "trace=fsync,fdatasync", "-c", "-o", str(st))
            if strace
            else ()
        )
        runs[label] = b.worker("ingest", *args, wrap=wrap)
        runs[label]["syncs"] = parse_strace(st) if strace else None
    run, setup = runs["run"], runs["setup"]
    window = run["put_s"] + run["flush_s"]
    intervals_s = 1000 / COMMIT_INTERVAL_MS
    if strace:
        syncs = sum(run["syncs"].values()) - sum(setup["syncs"].values())
        how = (
            f"fsync+fdatasync counted by `strace -f --seccomp-bpf -c` around the worker, less the "
            f"{sum(setup['syncs'].values())} calls of a run that only opens and closes the buffer "
            f"({run['syncs']})"
        )
    else:
        syncs = run["commits"]
        how = "strace is not installed: syncs counted as Buffer.commits (one fsync each, by design)"
    rep.notes.append(f"1a: {how}; {run['commits']} group commits in {window:.1f} s.")
    sync_rate = syncs / window
    rep.rows.append(
        Row(
            f"1a. fsync+fdatasync per second at {INGEST_RATE:,} readings/s, sync=full, "
            f"commit {COMMIT_INTERVAL_MS} ms, {b.sizes.ingest_s:.0f} s",
            f"{sync_rate:.2f}/s ({syncs} calls)",
            f"{intervals_s:.2f}/s (commit intervals)",
            ratio(sync_rate, intervals_s),
            f"≤ {intervals_s:.0f}/s",
            verdict(sync_rate <= intervals_s),
        )
    )
    rep.rows.extend(_ingest_write_rows(run, rep))
    rep.figures["ingest"] = {
        "run": run,
        "setup": setup,
        "syncs_in_window": syncs,
        "syncs_per_s": sync_rate,
    }
    return rep


def _ingest_write_rows(run: dict[str, Any], rep: Report) -> list[Row]:
    from edge_agent.buffer import wal_reserve
    from edge_agent.config import BufferConfig

    io, stored = run["io"], max(1, run["stored"])
    json_per = run["json_bytes"] / stored
    if io["write_bytes"] > 0:
        written, source = io["write_bytes"] - io["cancelled_write_bytes"], "write_bytes"
    else:
        written, source = io["wchar"], "wchar"
        rep.notes.append(
            "1b: /proc/self/io write_bytes is 0 on this filesystem: used wchar instead (every byte "
            "SQLite passed to write(2): WAL frames plus checkpoint writes to the database)."
        )
    rep.notes.append(
        f"1b: {source} of the worker from after Buffer.open() to after close() (final checkpoint "
        f"included): {written:,} B for {stored:,} readings; wchar {io['wchar']:,} B; database "
        f"at the end {run['db_bytes']:,} B; slowest put {run['slowest_put_s'] * 1000:.1f} ms."
    )
    per_reading = written / stored
    reserve = wal_reserve(BufferConfig().max_bytes)
    achieved = run["produced"] / run["put_s"]
    return [
        Row(
            "1b. bytes written to disk per reading (same run)",
            f"{per_reading:.0f} B ({source})",
            f"{json_per:.0f} B (its JSON)",
            ratio(per_reading, json_per),
            "≤ 4×",
            verdict(per_reading <= 4 * json_per),
        ),
        Row(
            "1c. WAL file peak (sampled every 100 ms)",
            f"{run['wal_peak'] / 1e6:.2f} MB",
            f"{reserve / 1e6:.2f} MB (WAL reserve of max_bytes)",
            ratio(run["wal_peak"], reserve),
        ),
        Row(
            "1d. achieved ingest rate",
            f"{per_s(achieved)} ({run['stored']:,} stored)",
            f"{per_s(INGEST_RATE)} requested",
            ratio(achieved, INGEST_RATE),
        ),
    ]


def parse_strace(path: Path) -> dict[str, int]:
    """Calls per syscall from `strace -c` output."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync") and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return counts


def bare_python(code: str) -> tuple[float, str]:
    """Seconds from spawn to the first line of `python -c code`, and that line."""
    t0 = time.monotonic()
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - t0
    proc.communicate()
    return elapsed, line.strip()


def bench_footprint(b: Bench) -> Report:
    rep = Report()
    status = (
        "import json; print(json.dumps({k: int(v.split()[0]) for k, v in "
        "(ln.split(':') for ln in open('/proc/self/status')) if k in ('VmRSS', 'VmHWM')}))"
    )
    bare = json.loads(bare_python(f"{BARE_IMPORTS}; {status}")[1])
    starts = sorted(bare_python("print('READY')")[0] for _ in range(5))
    bare_start = statistics.median(starts)
    imports_start = statistics.median(bare_python(f"{BARE_IMPORTS}; print(1)")[0] for _ in range(3))
    ready_idle, idle = b.timed_worker(
        "footprint", "--dir", str(b.fresh_dir("footprint-idle")), "--settle", str(b.sizes.settle_s)
    )
    full_db = b.backlog_copy("footprint-backlog")
    _, full = b.timed_worker(
        "footprint", "--dir", str(full_db.parent), "--settle", str(b.sizes.settle_s)
    )
    base = f"{mb(bare['VmRSS'])} (HWM {mb(bare['VmHWM'])})"
    for label, fig in (
        ("2a. RSS, agent idle (empty buffer, pty serial source, uplink down)", idle),
        (f"2b. RSS, agent with {b.sizes.backlog:,} readings buffered, uplink down", full),
    ):
        rep.rows.append(
            Row(
                label + f", after {b.sizes.settle_s:.0f} s",
                f"{mb(fig['VmRSS'])} (HWM {mb(fig['VmHWM'])})",
                f"{base} bare `{BARE_IMPORTS}`",
                ratio(fig["VmRSS"], bare["VmRSS"]),
                "< 60 MB",
                verdict(fig["VmHWM"] * 1024 < 60e6),
            )
        )
    rep.rows.append(
        Row(
            "2c. start-up: spawn to Agent.start() returned",
            f"{ready_idle:.3f} s (imports {idle['import_s']:.3f} s, "
            f"Agent.start {idle['agent_start_s']:.3f} s)",
            f"{bare_start:.3f} s bare `python -c` (median of 5; with the bare imports "
            f"{imports_start:.3f} s)",
            ratio(ready_idle, bare_start),
        )
    )
    rep.notes.append(
        f"2: pending after the runs: idle {idle['pending']:,}, backlog {full['pending']:,} "
        f"(serial lines read: {idle['serial_lines']}, {full['serial_lines']}; upload attempts "
        f"{idle['upload_requests']}, {full['upload_requests']}). The worker imports bench.py "
        "(stdlib only) before the agent, which adds a few ms to 2c."
    )
    rep.figures["footprint"] = {
        "bare": bare,
        "bare_start_s": starts,
        "idle": idle,
        "backlog": full,
        "ready_idle_s": ready_idle,
    }
    return rep


@dataclass
class Sink:
    proc: subprocess.Popen[bytes]
    url: str

    def stats(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(self.url.replace("/restapi/datasource/insert", "/stats")) as r:
            data: dict[str, int] = json.loads(r.read())
        return data


@contextlib.contextmanager
def running_sink(b: Bench, count_records: bool = False) -> Iterator[Sink]:
    cmd, _, log = b.command("sink", *(["--count-records"] if count_records else []))
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        yield Sink(proc, f"http://127.0.0.1:{port}/restapi/datasource/insert")
    finally:
        proc.terminate()
        proc.wait(10)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda f: float(f["rate"]))[len(runs) // 2]


def cpu_per_record(fig: dict[str, Any]) -> str:
    return f"{fig['cpu_s'] / max(1, fig['records']) * 1e6:.1f} µs CPU/record"


def bench_drain(b: Bench) -> Report:
    rep = Report()
    _, filled = b.backlog()
    json_per = filled["json_bytes"] / filled["readings"]
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "plain": [], "gzip": []}
    with running_sink(b) as sink:
        # Interleaved repeats, the median of each kept: the machine is noisy.
        for _ in range(DRAIN_REPEATS):
            runs["sqlite"].append(b.worker("drain", "--db", str(b.backlog_copy("drain-sqlite"))))
            for label, extra in (("plain", ()), ("gzip", ("--gzip",))):
                before = sink.stats()
                db = str(b.backlog_copy(f"drain-{label}"))
                fig = b.worker("drain", "--db", db, "--url", sink.url, *extra)
                after = sink.stats()
                fig["sink"] = {k: after[k] - before[k] for k in after}
                runs[label].append(fig)
            b.drop_copies()
    for figures in runs.values():
        for fig in figures:
            fig["rate"] = fig["records"] / fig["seconds"]
    figs: dict[str, Any] = {k: median_run(v) for k, v in runs.items()}
    base, base_rate = figs["sqlite"], figs["sqlite"]["rate"]
    for label in ("plain", "gzip"):
        fig = figs[label]
        rate = fig["rate"]
        ok = fig["done"] and rate >= 0.5 * base_rate
        rep.rows.append(
            Row(
                f"3{'a' if label == 'plain' else 'b'}. drain {filled['readings']:,} readings, "
                f"batches of {BATCH_RECORDS}, {label} JSON",
                f"{per_s(rate)} ({cpu_per_record(fig)})",
                f"{per_s(base_rate)} next_batch+ack only ({cpu_per_record(base)})",
                ratio(rate, base_rate),
                "≥ 0.5",
                verdict(ok),
            )
        )
    for label in ("plain", "gzip"):
        sink_fig, n = figs[label]["sink"], max(1, figs[label]["records"])
        rep.rows.append(
            Row(
                f"3{'c' if label == 'plain' else 'd'}. request body bytes per record, {label}",
                f"{sink_fig['body_bytes'] / n:.1f} B "
                f"({sink_fig['wire_bytes'] / n:.1f} B with headers)",
                f"{json_per:.1f} B (record JSON)",
                ratio(sink_fig["body_bytes"] / n, json_per),
            )
        )
    rep.notes.append(
        f"3: sink = raw-socket HTTP/1.1 keep-alive server in its own process; requests seen: "
        f"plain {figs['plain']['sink']['requests']}, gzip {figs['gzip']['sink']['requests']}; "
        f"left in the buffer: plain {figs['plain']['left']}, gzip {figs['gzip']['left']}, "
        f"sqlite {base['left']}. CPU is the draining process's (getrusage), sink excluded. "
        f"Median of {DRAIN_REPEATS} interleaved runs; rates/s of each: "
        + "; ".join(f"{k} " + ", ".join(f"{f['rate']:,.0f}" for f in v) for k, v in runs.items())
    )
    rep.figures["drain"] = {"fill": filled, "runs": runs}
    return rep


def bench_fresh(b: Bench) -> Report:
    """(a) of issue 14: how stale the dashboard stays after an outage, per drain policy."""
    rep = Report()
    d = b.fresh_dir("backlog-an-hour-old")
    n = b.sizes.backlog
    filled = b.worker("fill", "--dir", str(d), "--readings", str(n), "--age-s", "3600")
    repeats = 1 if b.quick else FRESH_REPEATS
    runs: dict[str, list[dict[str, Any]]] = {"live_first": [], "oldest_first": []}
    for _ in range(repeats):  # interleaved, the median of each kept
        for drain in runs:
            copy = b.fresh_dir(f"fresh-{drain}") / "buffer.db"
            shutil.copyfile(d / "buffer.db", copy)
            runs[drain].append(b.worker("fresh", "--db", str(copy), "--drain", drain))
            shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)

    def median(drain: str, key: str = "first_fresh_s") -> dict[str, Any]:
        figs = sorted(runs[drain], key=lambda f: float(f[key]))
        return figs[len(figs) // 2]

    live, oldest = median("live_first"), median("oldest_first")
    live_all, oldest_all = median("live_first", "drained_s"), median("oldest_first", "drained_s")
    n = filled["readings"]
    rep.rows.append(
        Row(
            f"3e. time from the uplink's return to the first fresh reading delivered, "
            f"{n:,}-reading backlog an hour old, sensor at {FRESH_HZ:g} Hz",
            f"{live['first_fresh_s']:.2f} s `live_first` ({live['backlog_left_then']:,} of the "
            "backlog still pending then)",
            f"{oldest['first_fresh_s']:.2f} s `oldest_first` "
            f"({oldest['backlog_left_then']:,} pending then)",
            ratio(live["first_fresh_s"], oldest["first_fresh_s"]),
        )
    )
    rep.rows.append(
        Row(
            "3f. same: time from the return until the whole backlog was delivered",
            f"{live_all['drained_s']:.1f} s `live_first`",
            f"{oldest_all['drained_s']:.1f} s `oldest_first`",
            ratio(live_all["drained_s"], oldest_all["drained_s"]),
        )
    )
    rep.notes.append(
        f"3e/3f: the Uploader in a worker process with a backlog filled as if accepted an "
        f"hour ago, production timings (flush_interval_s 2.0, "
        f"batches of {BATCH_RECORDS}) except reconnect_probe_s = {FRESH_PROBE_S}; the sink "
        "starts on the uploader's port = the return; a fresh reading is one the sensor wrote "
        f"after it (to data source {FRESH_DS!r}, so that its delivery is one counter), "
        "delivered when its 2xx deleted it. A live batch that is not full waits "
        "flush_interval_s to fill, which is most of the live_first figure. Median of "
        f"{repeats} interleaved run(s); first fresh / whole backlog (s) of each: "
        + "; ".join(
            f"{k} " + ", ".join(f"{f['first_fresh_s']:.2f} / {f['drained_s']:.1f}" for f in v)
            for k, v in runs.items()
        )
    )
    rep.figures["fresh"] = {"fill": filled, "runs": runs}
    return rep


def bench_serial(b: Bench) -> Report:
    rep = Report()
    figs: dict[str, Any] = {}
    for pace, lines in (("fast", b.sizes.serial_fast), ("paced", b.sizes.serial_paced)):
        flags = ("--paced",) if pace == "paced" else ()
        runs = {}
        for mode in ("agent", "bare"):
            d = b.fresh_dir(f"serial-{mode}-{pace}")
            runs[mode] = b.worker(
                "serial", "--mode", mode, "--dir", str(d), "--lines", str(lines), *flags
            )
        agent, bare = runs["agent"], runs["bare"]
        per_reading = agent["cpu_s"] / max(1, agent["readings"]) * 1e6
        per_line = agent["cpu_s"] / max(1, agent["lines"]) * 1e6
        bare_line = bare["cpu_s"] / max(1, bare["lines"]) * 1e6
        how = (
            "written as fast as the pty takes them"
            if pace == "fast"
            else "writer paced at 115200 baud (11,520 B/s)"
        )
        rep.rows.append(
            Row(
                f"4{'a' if pace == 'fast' else 'b'}. serial CPU per 1,000 readings: "
                f"{lines:,} kv lines (3 readings each) from a pty, {how}",
                f"{per_reading:.1f} ms/1k readings = {per_line:.1f} ms/1k lines "
                f"({agent['lines']:,} lines in {agent['seconds']:.1f} s)",
                f"{bare_line:.1f} ms/1k lines bare readline() "
                f"({bare['lines']:,} lines in {bare['seconds']:.1f} s)",
                ratio(
                    agent["cpu_s"] / max(1, agent["lines"]), bare["cpu_s"] / max(1, bare["lines"])
                ),
            )
        )
        figs[pace] = runs
    rep.notes.append(
        "4: the ratio compares CPU per line of the same stream (agent: SerialSource + "
        "AgentIntake + Buffer commits, measured with getrusage of the reading process; the "
        "writer is another process). pyserial's readline() reads one byte per read(2)."
    )
    rep.figures["serial"] = figs
    return rep


def bench_mqtt(b: Bench) -> Report:
    """scripts/bench_mqtt.py's measure(): MQTT QoS 1 ingest vs a bare paho subscriber."""
    import bench_mqtt as mqtt  # scripts/, beside this file

    rep = Report()
    messages = b.sizes.mqtt_messages if b.quick else mqtt.MESSAGES
    runs = mqtt.measure(messages)
    rep.rows += [Row("5. MQTT: " + row[0], *row[1:]) for row in mqtt.summary_rows(runs, messages)]
    rep.notes.append(f"5: bench_mqtt.measure({messages}): its default configurations.")
    rep.figures["mqtt"] = {"messages": messages, "runs": runs}
    return rep


def bench_modbus(b: Bench) -> Report:
    """scripts/bench_modbus.py's measure(): both loops in this process, alternating rounds."""
    import bench_modbus as modbus  # scripts/, beside this file

    rep = Report()
    result = modbus.measure(b.sizes.modbus_polls, MODBUS_ROUNDS)
    agent, bare = result["agent"], result["bare"]
    what = (
        f"6{{}}. Modbus RTU, {modbus.REGISTERS} holding registers a poll from the test slave "
        f"over a pty, polled back to back ({b.sizes.modbus_polls} polls x {MODBUS_ROUNDS} "
        "rounds, best round of each)"
    )
    rep.rows += [
        Row(
            what.format("a") + ": registers/s",
            f"{agent['registers_per_s']:,.0f} registers/s",
            f"{bare['registers_per_s']:,.0f} registers/s bare pymodbus loop",
            f"{result['rate_ratio']:.2f}",
            ">= 0.8",
            verdict(result["rate_ratio"] >= 0.8),
        ),
        Row(
            what.format("b") + ": CPU per poll",
            f"{agent['cpu_ms_per_poll']:.3f} ms",
            f"{bare['cpu_ms_per_poll']:.3f} ms bare pymodbus loop",
            f"{result['cpu_ratio']:.2f}×",
            "<= 1.5×",
            verdict(result["cpu_ratio"] <= 1.5),
        ),
    ]
    rep.notes.append(
        "6: the agent is ModbusSource (its link, plan, decoders, 100 long-shape readings a "
        "poll) into an intake that only counts; CPU is this process's (the slave is another). "
        "Every round is in the JSON figures."
    )
    rep.figures["modbus"] = result
    return rep


def bench_processors(b: Bench) -> Report:
    """Hook for scripts/bench_processors.py (issue 14 row b: aggregate 60 s against raw)."""
    rep = Report()
    json_out = b.work / "processors.json"
    cmd = [PY, str(ROOT / "scripts" / "bench_processors.py"), "--json", str(json_out)]
    if b.quick:
        cmd += ["--minutes", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    rep.notes.append(f"6: ran `{shlex.join(cmd[1:])}` (exit status {proc.returncode}).")
    if json_out.exists():
        rep.figures["processors"] = json.loads(json_out.read_text())
    rep.rows.extend(markdown_rows(proc.stdout, "6. "))
    if not rep.rows:
        tail = " / ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        rep.rows.append(Row("6. processors", f"no table from bench_processors.py: {tail}", ""))
    return rep


def markdown_rows(text: str, prefix: str) -> list[Row]:
    """The data rows of the first markdown table in `text`, fitted to our columns."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        cells += [""] * (6 - len(cells))
        agent, baseline, ratio_, target = cells[1:5]
        rows.append(Row(prefix + cells[0], agent, baseline, ratio_, target, " ".join(cells[5:])))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _median_p90(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def _cli_seconds(config: Path, *args: str, repeats: int = 5) -> tuple[float, str]:
    """Median wall time of `edge-agent buffer stats ...` (a process, as an operator runs it),
    and the output of the last run."""
    times, out = [], ""
    for _ in range(repeats):
        t0 = time.monotonic()
        proc = subprocess.run(
            [PY, "-m", "edge_agent", "buffer", "stats", "--config", str(config), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        times.append(time.monotonic() - t0)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"buffer stats {' '.join(args)} failed: {proc.stderr.strip()}")
        out = proc.stdout
    return statistics.median(times), out


def _health_run(b: Bench, d: Path) -> dict[str, Any]:
    """`edge-agent run` on the buffer in `d` (uplink down, status endpoint on): /healthz
    answered N times, each on a new connection as a probe makes it; then, with the agent
    still running, BufferSession.stats() N times here; then `buffer stats` as a process."""
    from edge_agent.buffer import BufferSession

    port = free_port()
    config = agent_config(
        d,
        f"http://127.0.0.1:{free_port()}/restapi/datasource/insert",
        [
            {
                "name": "absent",
                "type": "serial",
                "port": str(d / "ttyABSENT"),
                "format": "kv",
                "datasource_id": DATASOURCE,
            }
        ],  # retried every 30 s: costs nothing
        status_port=port,
    )
    agent = AgentProcess(config, d / "agent.log").start()
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        if not wait_for(lambda: _answers(url), 60, 0.1):
            raise RuntimeError(f"the agent's status endpoint did not answer (see {d}/agent.log)")
        codes = [_get(url) for _ in range(5)]  # warm: first connections, the page cache
        healthz = _timed(lambda: codes.append(_get(url)), HEALTH_REQUESTS)
        with BufferSession(d / "buffer.db") as session:
            stats = _timed(session.stats, HEALTH_REQUESTS)
            pending = session.pending_count()
    finally:
        agent.terminate(60)
    cli_s, _ = _cli_seconds(config)
    return {
        "healthz_s": healthz,
        "stats_s": stats,
        "pending": pending,
        "codes": sorted(set(codes)),
        "cli_s": cli_s,
    }


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError):
        _get(url)
        return True
    return False


def bench_health(b: Bench) -> Report:
    rep = Report()
    _, filled = b.backlog()
    n = filled["readings"]
    figs: dict[str, list[dict[str, Any]]] = {"empty": [], "full": []}
    for _ in range(2):  # interleaved: load from elsewhere falls on both alike
        for label in ("empty", "full"):
            db = b.backlog_copy("health-full") if label == "full" else None
            d = db.parent if db is not None else b.fresh_dir("health-empty")
            fig = _health_run(b, d)
            if label == "full" and not figs["full"]:
                fig["recount_s"], fig["recount"] = _cli_seconds(
                    d / "config.toml", "--recount", repeats=1
                )
            figs[label].append(fig)
        b.drop_copies()
    empty, full = (
        {k: [t for f in figs[label] for t in f[k]] for k in ("healthz_s", "stats_s")}
        for label in ("empty", "full")
    )
    cli = {label: statistics.median(f["cli_s"] for f in figs[label]) for label in figs}
    for key, what in (
        (
            "healthz_s",
            "6a. /healthz latency (a new connection each, median of "
            f"{2 * HEALTH_REQUESTS}; p90), {n:,} readings buffered vs none",
        ),
        (
            "stats_s",
            f"6c. BufferSession.stats() in the agent's process (median; p90), {n:,} "
            "readings vs none",
        ),
    ):
        (m_full, p_full), (m_empty, p_empty) = _median_p90(full[key]), _median_p90(empty[key])
        rep.rows.append(
            Row(
                what,
                f"{_ms(m_full)} (p90 {_ms(p_full)})",
                f"{_ms(m_empty)} (p90 {_ms(p_empty)}) empty buffer",
                ratio(m_full, m_empty),
                "≤ 2×",
                verdict(m_full <= 2 * m_empty),
            )
        )
    rep.rows.insert(
        1,
        Row(
            "6b. `edge-agent buffer stats` (process start to exit; the median of 5 runs, "
            f"twice), {n:,} readings vs none",
            f"{cli['full']:.3f} s",
            f"{cli['empty']:.3f} s empty buffer",
            ratio(cli["full"], cli["empty"]),
            "≤ 2×",
            verdict(cli["full"] <= 2 * cli["empty"]),
        ),
    )
    recount = figs["full"][0]
    rep.rows.append(
        Row(
            f"6d. `buffer stats --recount`: a full count of {n:,} readings (what every status "
            "call cost before the running totals)",
            f"{recount['recount_s']:.3f} s",
            f"{cli['full']:.3f} s `buffer stats`",
            ratio(recount["recount_s"], cli["full"]),
        ),
    )
    agree = "the running totals agree" in recount["recount"]
    rep.notes.append(
        f"6: the agent runs with its status endpoint on and the uplink down; `buffer stats` is "
        f"run as a process, so both sides include Python's start-up. /healthz answered "
        f"{figs['full'][0]['codes']} (503: uplink down). The recount at {n:,} readings found "
        + ("the totals agree." if agree else f"a difference: {recount['recount'].strip()}")
    )
    rep.rows += _totals_cpu_rows(b, rep)
    rep.figures["health"] = figs
    return rep


def _totals_cpu_rows(b: Bench, rep: Report) -> list[Row]:
    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    for _ in range(3):
        for label in ("with", "without"):
            flags = ["--no-totals"] if label == "without" else []
            d = b.fresh_dir(f"totals-{label}")
            runs[label].append(
                b.worker(
                    "totals_cpu",
                    "--dir",
                    str(d),
                    "--readings",
                    str(b.sizes.totals_readings),
                    *flags,
                )
            )
            shutil.rmtree(d, ignore_errors=True)
    rows = []
    for key, what in (
        ("put_cpu_s", "put and committed (Reading → Buffer.put → group commit)"),
        ("ack_cpu_s", "read and deleted (next_batch + ack, batches of 500)"),
    ):
        per = {k: statistics.median(f[key] / f["put"] * 1e6 for f in v) for k, v in runs.items()}
        rows.append(
            Row(
                f"6{'e' if key == 'put_cpu_s' else 'f'}. CPU per reading {what}, "
                f"{b.sizes.totals_readings:,} readings",
                f"{per['with']:.2f} µs with the running totals' triggers",
                f"{per['without']:.2f} µs without them",
                ratio(per["with"], per["without"]),
            ),
        )
    rep.notes.append("6e-f: median of 3 interleaved runs each; CPU of the whole process.")
    rep.figures["totals_cpu"] = runs
    return rows


# --- the Pi-class run --------------------------------------------------------------------


@dataclass
class Confinement:
    """How the agent is held to a quarter of one core: a command prefix, and the cgroup
    (when we made one) whose cpu.stat tells how often it was throttled."""

    prefix: list[str]
    how: str
    cgroup: Path | None = None

    def throttling(self) -> dict[str, int]:
        if self.cgroup is None:
            return {}
        pairs = (ln.split() for ln in (self.cgroup / "cpu.stat").read_text().splitlines())
        return {k: int(v) for k, v in pairs}

    def close(self) -> None:
        if self.cgroup is not None:
            for _ in range(50):  # the last process may take a moment to leave
                try:
                    self.cgroup.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


def _join_cgroup(cgroup: Path) -> list[str]:
    return ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"]


def confine_quarter_core() -> Confinement:
    """A cgroup v2 with cpu.max, else a v1 cpu cgroup with cfs_quota_us, else a systemd
    scope with CPUQuota, else nothing (and the row says so)."""
    quota, period = PI_QUOTA
    name = f"edge-bench-{os.getpid()}"
    v2 = Path("/sys/fs/cgroup")
    attempts = []
    if "cpu" in _read(v2 / "cgroup.controllers").split():
        attempts.append((v2 / name, {"cpu.max": f"{quota} {period}"}, "cgroup v2 cpu.max"))
    if (v2 / "cpu" / "cpu.cfs_quota_us").exists():
        files = {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(quota)}
        attempts.append((v2 / "cpu" / name, files, "cgroup v1 cpu.cfs_quota_us"))
    for cgroup, files, what in attempts:
        try:
            cgroup.mkdir()
            for file, value in files.items():
                (cgroup / file).write_text(value)
        except OSError:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
            continue
        settings = ", ".join(f"{k} = {v}" for k, v in files.items())
        return Confinement(_join_cgroup(cgroup), f"{what} ({settings}, at {cgroup})", cgroup)
    scope = ["systemd-run", "--scope", "--quiet", "-p", f"CPUQuota={100 * quota // period}%"]
    if shutil.which("systemd-run") and subprocess.run([*scope, "true"]).returncode == 0:
        return Confinement(scope, f"`{shlex.join(scope)}`")
    return Confinement(
        [],
        "NOT confined: no cgroup was writable here (v2 cpu.max, v1 cpu.cfs_quota_us) and "
        "systemd-run could not start a scope; run as root on a host with cgroups (or a Pi)",
    )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the agent and its MQTT link)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            todo += [int(c) for c in _read(task / "children").split()]
    return out


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        fields = _read(Path(f"/proc/{p}/stat")).rsplit(")", 1)[-1].split()
        if len(fields) > 12:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _vm(pid: int, key: str) -> int:
    for line in _read(Path(f"/proc/{pid}/status")).splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class TreeMemory:
    """Samples the resident memory of a process and its descendants; keeps the peak sum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            rss = sum(_vm(p, "VmRSS") for p in _tree(self.pid))
            self.peak_kib = max(self.peak_kib, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class BacklogWatch:
    """Notes when the sink has received as many records as the backlog held."""

    def __init__(self, sink: Sink, backlog: int) -> None:
        self.done_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sink, backlog), daemon=True)
        self._thread.start()

    def _run(self, sink: Sink, backlog: int) -> None:
        while not self._stop.wait(0.1):
            if sink.stats()["records"] >= backlog:
                self.done_at = time.monotonic()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _status(port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=30) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def _source_stats(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc.get("sources", [])}


def _publish_paced(broker: Mosquitto, topic: str, rate: float, seconds: float) -> dict[str, Any]:
    """QoS 1 messages at `rate`/s for `seconds` (a publisher outside the confinement)."""
    client = Publisher(broker, f"bench-pi-publisher-{os.getpid()}", max_inflight=0)
    total = int(rate * seconds)
    t0 = time.monotonic()
    for seq in range(total):
        if (wait := t0 + seq / rate - time.monotonic()) > 0:
            time.sleep(wait)
        client.publish(topic, json.dumps({"seq": seq, "temperature": 21.5}))
    late = time.monotonic() - t0 - seconds
    if not client.wait_room(0, 60):
        raise RuntimeError("the broker did not acknowledge every published message")
    client.close()
    return {"published": total, "late_s": late}


def bench_pi(b: Bench) -> Report:
    rep = Report()
    conf = confine_quarter_core()
    try:
        live = _pi_live(b, conf)
        rep.rows += _pi_rows(b, conf, live)
        rep.rows += _pi_mqtt_ratio(b, conf, rep)
    finally:
        conf.close()
    rep.notes.append(f"7: confinement: {conf.how}.")
    rep.figures["pi"] = live
    return rep


def _pi_live(b: Bench, conf: Confinement) -> dict[str, Any]:
    """The agent (confined) with a backlog, a pty at 115200 baud and MQTT at 500 msg/s,
    uploading to a local sink; everything else (writer, broker, publisher, sink) outside."""
    import tty

    import bench_mqtt

    _, filled = b.backlog()
    d = b.backlog_copy("pi").parent
    master, slave = os.openpty()
    tty.setraw(slave)
    lines = int(b.sizes.pi_seconds * BAUD_BYTES_S / len(serial_line(0)))
    broker_bin = mosquitto_binary() or "/usr/sbin/mosquitto"
    status_port = free_port()
    broker = Mosquitto(d, broker_bin, persistence=False).start()
    try:
        with running_sink(b, count_records=True) as sink:
            sources: list[dict[str, Any]] = [
                {
                    "name": "serial",
                    "type": "serial",
                    "port": os.ttyname(slave),
                    "format": "kv",
                    "shape": "long",
                    "baudrate": 115_200,
                    "datasource_id": DATASOURCE,
                },
                {
                    "name": "mqtt",
                    "type": "mqtt",
                    "broker": broker.url,
                    "topics": [bench_mqtt.TOPIC],
                    "format": "json",
                    "shape": "long",
                    "datasource_id": "67891",
                },
            ]
            config = agent_config(d, sink.url, sources, status_port)
            agent = AgentProcess(config, b.work / "pi-agent.log", prefix=conf.prefix).start()
            try:
                return _pi_drive(b, conf, agent, status_port, master, lines, broker, sink, filled)
            finally:
                agent.terminate(60)
    finally:
        broker.stop()
        os.close(master)
        os.close(slave)
        b.drop_copies()


def _pi_drive(
    b: Bench,
    conf: Confinement,
    agent: AgentProcess,
    status_port: int,
    master: int,
    lines: int,
    broker: Mosquitto,
    sink: Sink,
    filled: dict[str, Any],
) -> dict[str, Any]:
    import bench_mqtt

    def connected() -> bool:
        with contextlib.suppress(OSError, ValueError):
            found = _source_stats(_status(status_port))
            return len(found) == 2 and all(s["connected"] for s in found.values())
        return False

    if not wait_for(connected, 60, 0.2):
        raise RuntimeError(f"the agent did not connect its sources (see {b.work}/pi-agent.log)")
    memory = TreeMemory(agent.pid)
    backlog = BacklogWatch(sink, filled["readings"])
    pids = _tree(agent.pid)
    cpu0, t0, throttled0 = _cpu_s(pids), time.monotonic(), conf.throttling()
    writer_out = str(b.work / "pi-writer.json")
    writer = _spawn_writer(master, lines, True, writer_out)
    published = _publish_paced(broker, bench_mqtt.TOPIC, PI_MQTT_RATE, b.sizes.pi_seconds)
    writer.wait()
    written = json.loads(Path(writer_out).read_text())

    def all_read() -> bool:
        found = _source_stats(_status(status_port))
        return (found["serial"]["lines"], found["mqtt"]["lines"]) >= (lines, published["published"])

    wait_for(all_read, 60, 0.2)
    live_s, cpu_live = time.monotonic() - t0, _cpu_s(_tree(agent.pid)) - cpu0
    throttled = {k: v - throttled0.get(k, 0) for k, v in conf.throttling().items()}
    found = _source_stats(_status(status_port))
    expected = filled["readings"] + found["serial"]["readings"] + found["mqtt"]["readings"]
    drained = wait_for(lambda: sink.stats()["records"] >= expected, 1800, 0.1)
    drain_s = time.monotonic() - t0
    backlog.stop()
    tree = _tree(agent.pid)
    hwm = {p: _vm(p, "VmHWM") for p in tree}
    doc = _status(status_port)
    memory.stop()
    return {
        "lines": lines,
        "writer": written,
        "published": published,
        "sources": _source_stats(doc),
        "backlog": filled["readings"],
        "expected": expected,
        "delivered": sink.stats()["records"],
        "drained": drained,
        "drain_s": drain_s,
        "backlog_s": None if backlog.done_at is None else backlog.done_at - t0,
        "live_s": live_s,
        "cpu_live_s": cpu_live,
        "throttled": throttled,
        "rss_peak_kib": memory.peak_kib,
        "hwm_kib": {
            "agent": hwm.get(agent.pid, 0),
            "link": sum(v for p, v in hwm.items() if p != agent.pid),
        },
        "dropped": {k: v for k, v in doc["buffer"]["counters"].items() if "dropped" in k},
        "pending": doc["buffer"]["pending_total"],
    }


def _pi_rows(b: Bench, conf: Confinement, live: dict[str, Any]) -> list[Row]:
    confined = "a quarter of one core" if conf.prefix else "NOT confined (see notes)"
    src, pub, writer = live["sources"], live["published"], live["writer"]
    intended = writer["bytes"] / BAUD_BYTES_S
    kept_pace = writer["seconds"] <= intended + 1.0
    lost = live["expected"] - live["delivered"]
    read_all = src["serial"]["lines"] == live["lines"] and src["mqtt"]["lines"] == pub["published"]
    ok = (
        live["drained"]
        and lost == 0
        and not live["dropped"]
        and read_all
        and kept_pace
        and src["serial"]["parse_errors"] == 0
        and src["mqtt"]["parse_errors"] == 0
    )
    rows = [
        Row(
            f"7a. Pi-class ({confined}): serial at 115200 baud ({live['lines']:,} kv lines) and "
            f"MQTT QoS 1 at {PI_MQTT_RATE} msg/s ({pub['published']:,}) for "
            f"{b.sizes.pi_seconds:.0f} s while the uplink drains a backlog of "
            f"{live['backlog']:,} readings: nothing dropped",
            f"{live['delivered']:,} readings delivered of {live['expected']:,} (backlog + "
            f"{src['serial']['readings']:,} serial + {src['mqtt']['readings']:,} MQTT); "
            f"dropped {sum(live['dropped'].values())}; serial writer took "
            f"{writer['seconds']:.1f} s for {intended:.1f} s of line time",
            "every line and message read, every reading delivered, none dropped",
            "",
            "0 dropped",
            verdict(ok),
        ),
    ]
    share = live["cpu_live_s"] / live["live_s"]
    quota = PI_QUOTA[0] / PI_QUOTA[1]
    throttled = live["throttled"]
    periods = (
        f"; throttled in {throttled.get('nr_throttled', 0):,} of "
        f"{throttled.get('nr_periods', 0):,} periods"
        if throttled
        else ""
    )
    rows.append(
        Row(
            f"7b. Pi-class CPU share of the agent and its MQTT link while the input ran "
            f"({live['live_s']:.0f} s)",
            f"{100 * share:.1f} % of one core{periods}",
            f"{100 * quota:.0f} % quota",
            ratio(share, quota),
        )
    )
    rows.append(
        Row(
            "7c. Pi-class memory: agent + MQTT link, peak resident (sampled every 0.25 s)",
            f"{mb(live['rss_peak_kib'])} (VmHWM agent {mb(live['hwm_kib']['agent'])}, link "
            f"{mb(live['hwm_kib']['link'])})",
            "< 60 MB for the agent process (row 2)",
            "",
            "< 60 MB",
            verdict(live["hwm_kib"]["agent"] * 1024 < 60e6),
        )
    )
    backlog_s = live["backlog_s"]
    rows.append(
        Row(
            f"7d. Pi-class drain: the backlog's {live['backlog']:,} readings delivered (the "
            "uploader sends the oldest first), while the live input ran",
            f"in {backlog_s:.1f} s ({live['backlog'] / backlog_s:,.0f} readings/s); everything "
            f"delivered {live['drain_s'] - live['live_s']:.1f} s after the input stopped"
            if backlog_s is not None and live["drained"]
            else f"not drained after {live['drain_s']:.0f} s",
            f"{live['live_s']:.1f} s of live input",
        )
    )
    return rows


def _pi_mqtt_ratio(b: Bench, conf: Confinement, rep: Report) -> list[Row]:
    """bench_mqtt's defaults configuration with both subscribers in the confinement."""
    import bench_mqtt

    messages = b.sizes.pi_mqtt_messages
    runs = bench_mqtt.measure(messages, [bench_mqtt.DEFAULTS], strace=False, child_wrap=conf.prefix)
    rep.notes.append(
        f"7e: bench_mqtt.measure({messages}, defaults, rounds 2, no strace, "
        f"children under `{shlex.join(conf.prefix)}`)."
    )
    rep.figures["pi_mqtt"] = {"messages": messages, "runs": runs}
    prefix = "7e. Pi-class MQTT (both subscribers confined): "
    return [Row(prefix + row[0], *row[1:]) for row in bench_mqtt.summary_rows(runs, messages)]


ROW_FUNCTIONS: dict[str, Callable[[Bench], Report]] = {
    "ingest": bench_ingest,
    "footprint": bench_footprint,
    "drain": bench_drain,
    "serial": bench_serial,
    "mqtt": bench_mqtt,
    "modbus": bench_modbus,
    "health": bench_health,
    "pi": bench_pi,
    "processors": bench_processors,
    "fresh": bench_fresh,
}


# --- machine, table, main ----------------------------------------------------------------


def machine(work: Path) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"^MemTotal:\s*(\d+)", meminfo, re.M)
    return {
        "nproc": f"{len(os.sched_getaffinity(0))} (of {os.cpu_count()})",
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "ram": f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "unknown",
        "python": f"{platform.python_version()} ({PY})",
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "filesystem": f"{filesystem_of(work)} ({work})",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def filesystem_of(path: Path) -> str:
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def table(rows: list[Row]) -> str:
    head = ["measurement", "agent", "baseline (same run)", "ratio", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.measurement, r.agent, r.baseline, r.ratio, r.target or "—", r.result or "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=os.environ.get("EDGE_AGENT_BENCH_ARGV0", "scripts/bench"),
        description="Benchmarks of the agent, each against a baseline measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts (about 2 minutes)")
    parser.add_argument(
        "--rows", default=",".join(ALL_ROWS), help=f"comma-separated, from {','.join(ALL_ROWS)}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--workdir", help="scratch directory (default: a new one under $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ALL_ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ALL_ROWS)}")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        WORKERS[argv[1]](argv[2:])
        return 0
    args = parse_args(argv)
    command = shlex.join([os.environ.get("EDGE_AGENT_BENCH_ARGV0", f"{PY} {BENCH}"), *argv])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work, QUICK if args.quick else FULL, args.quick)
    about = machine(work)
    report, failed = Report(), []
    started = time.monotonic()
    for name in args.rows:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            part = ROW_FUNCTIONS[name](bench)
        except Exception as exc:  # one broken row must not hide the others
            failed.append(name)
            part = Report(
                rows=[Row(f"{name}: ERROR", str(exc).splitlines()[0], "")], notes=[f"{name}: {exc}"]
            )
        report.rows += part.rows
        report.notes += part.notes
        report.figures.update(part.figures)
    about["load average at the end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_report(about, command, report, time.monotonic() - started)
    if args.json:
        payload = {"machine": about, "command": command, "rows": [asdict(r) for r in report.rows]}
        Path(args.json).write_text(
            json.dumps({**payload, "notes": report.notes, "figures": report.figures}, indent=1)
        )
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def print_report(about: dict[str, str], command: str, report: Report, seconds: float) -> None:
    print("## Madevo Edge Agent benchmarks\n")
    for key, value in about.items():
        print(f"- {key}: {value}")
    print(f"- command: `{command}`")
    print(f"- duration: {seconds:.0f} s\n")
    print(table(report.rows))
    if report.notes:
        print("\nNotes:\n")
        for note in report.notes:
            print(f"- {note}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
