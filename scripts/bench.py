"""Benchmarks of the agent, each row measured against a baseline in the same run.

    ./scripts/bench [--quick] [--rows ingest,footprint,drain,serial,mqtt] [--json FILE]

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
    mqtt       scripts/bench_mqtt.py, when it exists
    processors scripts/bench_processors.py: bytes on the wire per hour, 10 Hz, aggregate vs raw
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
ALL_ROWS = ("ingest", "footprint", "drain", "serial", "mqtt", "processors")


@dataclass(frozen=True)
class Sizes:
    ingest_s: float  # seconds of ingest at INGEST_RATE
    backlog: int  # readings buffered for footprint and drain
    serial_fast: int  # lines written as fast as the pty takes them
    serial_paced: int  # lines written at 115200 baud
    mqtt_messages: int
    settle_s: float = 5.0  # how long the agent runs before its memory is read


QUICK = Sizes(
    ingest_s=10, backlog=100_000, serial_fast=20_000, serial_paced=2_500, mqtt_messages=5_000
)
FULL = Sizes(
    ingest_s=60, backlog=1_000_000, serial_fast=100_000, serial_paced=20_000, mqtt_messages=50_000
)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


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


class FileSizePeak:
    """Samples a file's size every 100 ms in a thread and keeps the largest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FileSizePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(FileNotFoundError):
                self.peak = max(self.peak, self.path.stat().st_size)


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
    with FileSizePeak(path.with_name(path.name + "-wal")) as wal:
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


def worker_fill(argv: list[str]) -> None:
    """A buffer database holding N readings, filled fast with big puts."""
    a = worker_args(argv, ("--dir", str, None), ("--readings", int, 100_000))
    from edge_agent.buffer import Buffer
    from edge_agent.clock import utc_stamp
    from edge_agent.config import BufferConfig
    from edge_agent.records import Reading

    path = Path(a.dir) / "buffer.db"
    buf = Buffer(path, BufferConfig(max_bytes=BIG_BUFFER, sync="normal"))
    buf.open()
    t0 = time.monotonic()
    chunk = 10_000
    base = time.time() - a.readings / INGEST_RATE
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


def worker_footprint(argv: list[str]) -> None:
    """The real agent (one serial source on a simulated pty, an unreachable endpoint)."""
    entered = time.monotonic()
    a = worker_args(argv, ("--dir", str, None), ("--settle", float, 5.0))
    sys.path.insert(0, str(ROOT))
    from edge_agent.agent import Agent
    from edge_agent.buffer import BufferSession
    from edge_agent.config import load_config
    from edge_agent.simulator import PtySensor
    from tests.helpers import serial_source, write_config

    imported = time.monotonic()
    data_dir = Path(a.dir)
    sensor = PtySensor(data_dir / "ttyBENCH", rate_hz=5.0)
    sensor.plug()
    config_path = write_config(
        data_dir / "config.toml",
        url=f"http://127.0.0.1:{free_port()}/restapi/datasource/insert",
        data_dir=data_dir,
        sources=[serial_source(sensor.link, shape="long")],
        # The production defaults, not the fast test timings of write_config.
        endpoint={
            "flush_interval_s": 2.0,
            "timeout_s": 10.0,
            "backoff_base_s": 1.0,
            "backoff_max_s": 300.0,
        },
        buffer={"commit_interval_ms": COMMIT_INTERVAL_MS, "max_bytes": BIG_BUFFER},
        agent={"device_id": DEVICE, "log_level": "warning"},
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
    session = BufferSession(agent.config.buffer_path)
    pending = session.pending_count()
    session.close()
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

    def add(self, body: int, wire: int) -> None:
        with self.lock:
            self.requests += 1
            self.body_bytes += body
            self.wire_bytes += wire

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "requests": self.requests,
                "body_bytes": self.body_bytes,
                "wire_bytes": self.wire_bytes,
            }


_SINK_OK = b'{"message":"Data successfully inserted"}'


def _sink_serve(conn: socket.socket, stats: SinkStats) -> None:
    """HTTP/1.1 keep-alive: read Content-Length bodies, answer 200; GET /stats tells counts."""
    with conn, conn.makefile("rb") as rfile:
        while True:
            request = rfile.readline()
            if not request:
                return
            head, length, close = len(request), 0, False
            while (line := rfile.readline()) not in (b"\r\n", b"\n", b""):
                head += len(line)
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                    close = True
            body = rfile.read(length) if length else b""
            if request.startswith(b"GET /stats"):
                answer = json.dumps(stats.snapshot()).encode()
            else:
                stats.add(len(body), head + 2 + len(body))
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
    """An insert endpoint that accepts and discards; prints `PORT n`, runs until SIGTERM."""
    worker_args(argv)
    stats = SinkStats()
    server = socket.create_server(("127.0.0.1", 0))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("PORT", server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_sink_serve, args=(conn, stats), daemon=True).start()


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
        if not wait_for(lambda: self.source.stats.connected, 10):
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


WORKERS: dict[str, Callable[[list[str]], None]] = {
    "ingest": worker_ingest,
    "fill": worker_fill,
    "footprint": worker_footprint,
    "sink": worker_sink,
    "drain": worker_drain,
    "pty_write": worker_pty_write,
    "serial": worker_serial,
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
def running_sink(b: Bench) -> Iterator[Sink]:
    cmd, _, log = b.command("sink")
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
    """Hook for scripts/bench_mqtt.py (MQTT QoS 1 ingest vs a bare paho subscriber)."""
    rep = Report()
    script = ROOT / "scripts" / "bench_mqtt.py"
    if not script.exists():
        rep.rows.append(
            Row(
                "5. MQTT QoS 1 ingest vs a bare paho subscriber",
                "not measured: scripts/bench_mqtt.py does not exist yet",
                "(hook: bench_mqtt() in scripts/bench.py)",
            )
        )
        return rep
    usage = subprocess.run(
        [PY, str(script), "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    cmd = [PY, str(script)]
    if b.quick and "--messages" in usage:
        cmd += ["--messages", str(b.sizes.mqtt_messages)]
    json_out = b.work / "mqtt.json"
    if "--json" in usage:
        cmd += ["--json", str(json_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    rep.notes.append(f"5: ran `{shlex.join(cmd[1:])}` (exit status {proc.returncode}).")
    if json_out.exists():
        rep.figures["mqtt"] = json.loads(json_out.read_text())
    rep.rows.extend(markdown_rows(proc.stdout, "5. MQTT: "))
    if not rep.rows:
        tail = " / ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        rep.rows.append(Row("5. MQTT QoS 1 ingest", f"no table from bench_mqtt.py: {tail}", ""))
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


ROW_FUNCTIONS: dict[str, Callable[[Bench], Report]] = {
    "ingest": bench_ingest,
    "footprint": bench_footprint,
    "drain": bench_drain,
    "serial": bench_serial,
    "mqtt": bench_mqtt,
    "processors": bench_processors,
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
    sys.path.insert(0, str(ROOT))
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
