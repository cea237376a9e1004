"""Soak test: the real agent, real parts, faults from a seed, and a ledger of every reading.

Over 600 lines on purpose: a script read and run whole. The fault schedule, the agent's
supervision, the inputs' writers and the ledger share one run's state; the parts other scripts
and the tests need (ports, broker, agent process, publisher) live in edge_agent/testing.

    ./scripts/soak [--minutes N] [--seed S] [--workdir DIR] [--drain-timeout S]

The agent runs as `python -m edge_agent run --config ...`, the way systemd runs it. Two inputs
feed it, each reading carrying a sequence number unique within its input:

    serial  kv lines on a pseudo-terminal (PtySensor, behind a stable symlink), data source
            SERIAL_DS, tagged src=serial; a steady rate plus bursts
    mqtt    JSON messages published at QoS 1 to a private Mosquitto, counted once PUBACKed,
            data source MQTT_DS, tagged src=mqtt; a steady rate plus bursts

About 1% of the readings of each input carry `poison=1`; the sandbox always refuses those
(`reject_fields`), so they, and only they, must end in the agent's dead letters.

Faults, one at a time, at times drawn from `random.Random(seed)`: kill -9 and restart of the
agent, broker restart, serial unplug and replug, sandbox outage (stopped, later a new one on
the same port and database), 503 bursts, 429 with Retry-After, connections dropped after the
sandbox stored the batch, token rotation (the sandbox first, the token file a bit later), a 413
size limit, and the answers of a hostile network: a captive portal answering 200 text/html
(nothing stored), answers trickled a byte every 2 s (stored, then the agent's `timeout_s` ends
the request and it sends the batch again) and 50 MB answer bodies (stored; a JSON object over
the answer cap is the API's answer, cut: delivered, not sent again). Some endpoint faults also
get a kill -9 halfway through (mid-retry, mid-split). Runs shorter than SHORT_MINUTES play
every kind once in a fixed order, with a kill during the dropped connections and during the
413; longer runs draw shuffled rounds of all kinds with random gaps and durations, and kill
during 40% of the endpoint faults.

Serial accounting: a serial device cannot be acknowledged, so lines written while the agent
is dead or the port is closed, or read but not committed when the agent dies, are lost by
design (README, "What the agent guarantees"). The serial writer therefore pauses around kills
and unplugs: it stops, waits until the agent's buffer (pending, held, dead letters) or the
sandbox holds every line written so far, and resumes once the agent has reopened the port.
Writes refused while the pty is gone would be listed as "not accepted"; with the pauses there
are none. MQTT messages are accepted once the broker PUBACKed them, with no exception.

The ledger at the end (after the faults stop and the backlog drains, or a deadline): every
accepted reading is delivered (duplicates counted, dedupe by sequence number), or in dead
letters (poison only), or counted as dropped by the buffer's configured policy. Anything else
fails the run (exit 1) and names the missing sequence numbers. Arrivals are read from the
sandbox's own SQLite table (`records`, whose id order is arrival order) every POLL_S, which
gives the delivery delays to that granularity. The agent's memory is sampled from
/proc/<pid>/status (VmRSS) every POLL_S, and VmHWM is read before each kill and the final stop.

Everything lives in a work directory (a temporary one unless --workdir is given), kept and
printed when the run fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.buffer import BufferSession
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.simulator import PtySensor, kv_line
from edge_agent.testing.harness import (
    AgentProcess,
    Mosquitto,
    Publisher,
    mosquitto_binary,
    toml_tables,
    wait_for,
)

SERIAL_DS = "67890"
MQTT_DS = "67891"
SERIAL_NAME = "station"
MQTT_NAME = "bridge"
FIRST_TOKEN = "soak-token-0"
# The sandbox refuses these records whatever else it injects: they must end in dead letters.
POISON_RULE = {"poison": "1"}
POISON_RATE = 0.01
SERIAL_HZ = 20.0
MQTT_HZ = 20.0
POLL_S = 0.5
PROGRESS_S = 30.0
SHORT_MINUTES = 5.0
FAULT_KINDS = (
    "kill9",
    "broker_restart",
    "serial_unplug",
    "sandbox_outage",
    "burst_503",
    "throttle_429",
    "drop_after_commit",
    "token_rotation",
    "limit_413",
    "captive_portal",
    "trickle",
    "huge_answer",
)
# Opened-port markers in the agent log: the first open of a process, and a reopen.
SERIAL_OPENED = (f"serial {SERIAL_NAME}: reading ", "is back; reading again")


def log_line(text: str) -> None:
    print(text, flush=True)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


# --------------------------------------------------------------------------- timeline


@dataclass(frozen=True)
class Event:
    at: float  # seconds since the start of the run
    wall: str
    kind: str
    detail: str


class Timeline:
    """Seconds since the start, and the faults injected, printed as they happen."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[Event] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, kind: str, detail: str) -> None:
        wall = datetime.now(UTC).strftime("%H:%M:%S")
        event = Event(self.now(), wall, kind, detail)
        self.events.append(event)
        log_line(f"  t+{event.at:7.1f}s {wall}Z  {kind:<18} {detail}")


# --------------------------------------------------------------------------- real parts


class Endpoint:
    """The sandbox across outages: a stopped one is replaced on the same port and database."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.port = 0
        self.tokens = [FIRST_TOKEN]
        self.sandbox: Sandbox | None = None
        self.by_status: Counter[str] = Counter()  # over every sandbox of the run

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/restapi/datasource/insert"

    def start(self) -> None:
        sandbox = Sandbox(
            port=self.port,
            tokens=self.tokens,
            datasources=[SERIAL_DS, MQTT_DS],
            db_path=self.db_path,
            faults=Faults(reject_fields=POISON_RULE),
        ).start()
        self.port = sandbox.port
        self.sandbox = sandbox

    def stop(self) -> None:
        if self.sandbox is not None:
            self.by_status.update(self.sandbox.stats()["by_status"])
            self.sandbox.stop()
            self.sandbox = None

    def answers(self) -> dict[str, int]:
        """How the sandboxes of the run answered inserts, by status ("dropped": no answer)."""
        total = Counter(self.by_status)
        if self.sandbox is not None:
            total.update(self.sandbox.stats()["by_status"])
        return dict(sorted(total.items()))

    def inject(self, **changes: Any) -> None:
        """Faults on top of the poison rule; no arguments: only the poison rule."""
        assert self.sandbox is not None
        self.sandbox.set_faults(replace(Faults(reject_fields=POISON_RULE), **changes))

    def rotate(self, token: str) -> None:
        assert self.sandbox is not None
        self.tokens = [token]
        self.sandbox.set_tokens(self.tokens)


class AgentRunner(AgentProcess):
    """The agent process; samples its memory; kill -9 and restart."""

    def __init__(self, config: Path, log_path: Path) -> None:
        super().__init__(config, log_path)
        self._lock = threading.Lock()
        self.peak_rss_kib = 0
        self.link_peak_rss_kib = 0  # its MQTT link processes (children), sampled the same way
        self.hwm_kib: list[int] = []  # VmHWM of each process, read just before it ended
        self.pids: list[int] = []

    def start(self) -> AgentRunner:
        with self._lock:
            super().start()
            self.pids.append(self.pid)
        return self

    def serial_opens(self) -> int:
        text = self.log_text()
        return sum(text.count(marker) for marker in SERIAL_OPENED)

    def _status(self, key: str) -> int | None:
        """A VmRSS/VmHWM figure (KiB) of the running process; None once it has gone."""
        if self.proc is None:
            return None
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) if match else None

    def sample(self) -> None:
        with self._lock:
            rss = self._status("VmRSS")
            if rss is not None:
                self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.link_peak_rss_kib = max(self.link_peak_rss_kib, self._children_rss())

    def _children_rss(self) -> int:
        """VmRSS (KiB) of the agent's child processes together: its MQTT links."""
        if self.proc is None:
            return 0
        total = 0
        try:
            tasks = list(Path(f"/proc/{self.proc.pid}/task").iterdir())
            children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        except OSError:
            return 0
        for child in children:
            try:
                text = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
            total += int(match.group(1)) if match else 0
        return total

    def _record_hwm(self) -> int:
        hwm = self._status("VmHWM") or 0
        self.hwm_kib.append(hwm)
        self.peak_rss_kib = max(self.peak_rss_kib, hwm)
        return hwm

    def kill9(self) -> None:
        """SIGKILL, after reading the process's VmHWM."""
        with self._lock:
            self._record_hwm()
            super().kill9()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and the exit status (-9 if it had to be killed)."""
        with self._lock:
            self._record_hwm()
            try:
                return super().terminate(timeout)
            except subprocess.TimeoutExpired:
                self.ensure_dead()
                return -9


# --------------------------------------------------------------------------- inputs


@dataclass
class Input:
    """What one input wrote: sequence number -> monotonic write time, and which were poison."""

    name: str
    datasource_id: str
    written: dict[int, float] = field(default_factory=dict)
    poison: set[int] = field(default_factory=set)
    not_accepted: set[int] = field(default_factory=set)


class SerialWriter:
    """Writes kv lines to the pty at a steady rate plus bursts; pauses on demand."""

    def __init__(self, sensor: PtySensor, rng: random.Random) -> None:
        self.sensor = sensor
        self.rng = rng
        self.input = Input("serial", SERIAL_DS)
        self._lock = threading.Lock()  # guards `input` against readers in other threads
        self._go = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serial-writer", daemon=True)
        self._next = 1

    def start(self) -> None:
        self._go.set()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join()

    def pause(self) -> None:
        """Returns once no line is being written, nor will be until `resume`."""
        self._go.clear()
        self._idle.wait()

    def resume(self) -> None:
        self._idle.clear()
        self._go.set()

    def written(self) -> set[int]:
        with self._lock:
            return set(self.input.written)

    def _run(self) -> None:
        next_burst = time.monotonic() + self.rng.uniform(5, 20)
        while not self._stop.is_set():
            if not self._go.is_set():
                self._idle.set()
                self._go.wait()
                continue
            if time.monotonic() >= next_burst:
                self._burst(self.rng.randint(100, 300))
                next_burst = time.monotonic() + self.rng.uniform(5, 20)
            else:
                self._write_one()
                self._stop.wait(1 / SERIAL_HZ)
        self._idle.set()

    def _burst(self, lines: int) -> None:
        for _ in range(lines):
            if not self._go.is_set() or self._stop.is_set():
                return
            self._write_one()

    def _write_one(self) -> None:
        seq = self._next
        self._next += 1
        poison = self.rng.random() < POISON_RATE
        line = kv_line(seq, time.time()) + (" poison=1" if poison else "")
        at = time.monotonic()
        ok = self.sensor.write_line(line)
        with self._lock:
            if not ok:
                self.input.not_accepted.add(seq)
                return
            self.input.written[seq] = at
            if poison:
                self.input.poison.add(seq)


class MqttPublisher:
    """Publishes JSON at QoS 1 at a steady rate plus bursts; a message counts once PUBACKed."""

    def __init__(self, broker: Mosquitto, rng: random.Random) -> None:
        self.rng = rng
        self.input = Input("mqtt", MQTT_DS)
        self._lock = threading.Lock()
        # seq -> mid until its PUBACK. Not MQTTMessageInfo.is_published(): a message
        # published while disconnected keeps rc NO_CONN (and raises) even once paho has
        # sent it after the reconnect and the broker acknowledged it.
        self._unacked: dict[int, int] = {}
        self._acked_mids: set[int] = set()
        self._acked: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._next = 1
        self.client = Publisher(
            broker, "soak-publisher", reconnect_delay=(1, 2), on_ack=self._on_ack
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        self.client.close()

    def _on_ack(self, mid: int) -> None:
        with self._lock:
            self._acked_mids.add(mid)

    def acked(self) -> set[int]:
        with self._lock:
            # A PUBACK can come before publish() returned the mid: match them here.
            done = [seq for seq, mid in self._unacked.items() if mid in self._acked_mids]
            for seq in done:
                self._acked_mids.discard(self._unacked.pop(seq))
                self._acked.add(seq)
            return set(self._acked)

    def unacked(self) -> int:
        self.acked()
        with self._lock:
            return len(self._unacked)

    def _run(self) -> None:
        next_burst = time.monotonic() + self.rng.uniform(5, 20)
        while not self._stop.is_set():
            if time.monotonic() >= next_burst:
                for _ in range(self.rng.randint(200, 600)):
                    self._publish_one()
                next_burst = time.monotonic() + self.rng.uniform(5, 20)
            else:
                self._publish_one()
                self._stop.wait(1 / MQTT_HZ)

    def _publish_one(self) -> None:
        seq = self._next
        self._next += 1
        payload: dict[str, Any] = {"seq": seq, "level": round(self.rng.uniform(0, 100), 2)}
        poison = self.rng.random() < POISON_RATE
        if poison:
            payload["poison"] = 1
        at = time.monotonic()
        # While the broker is away paho queues the message and sends it on reconnect.
        mid = self.client.publish(f"soak/dev{seq % 5}/data", json.dumps(payload))
        with self._lock:
            self._unacked[seq] = mid
            self.input.written[seq] = at
            if poison:
                self.input.poison.add(seq)


# --------------------------------------------------------------------------- observation


@dataclass
class Arrival:
    first: float  # monotonic time of the poll that first saw it
    count: int
    reading_ids: set[str]


class Arrivals:
    """What the sandbox stored, read incrementally from its table (id order = arrival order)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._conn: sqlite3.Connection | None = None
        self._last_id = 0
        self._lock = threading.Lock()
        self.seen: dict[tuple[str, int], Arrival] = {}
        self.unknown = 0  # records without an integer seq

    def poll(self) -> None:
        with self._lock:
            if self._conn is None:
                if not self.db_path.exists():
                    return
                self._conn = sqlite3.connect(
                    f"file:{self.db_path}?mode=ro", uri=True, timeout=5, check_same_thread=False
                )
            try:
                rows = self._conn.execute(
                    "SELECT id, datasource_id, body FROM records WHERE id > ? ORDER BY id",
                    (self._last_id,),
                ).fetchall()
            except sqlite3.OperationalError:
                return  # the table is not there yet, or the sandbox is writing: next poll
            now = time.monotonic()
            for rid, ds, body in rows:
                self._last_id = rid
                self._add(ds, json.loads(body), now)

    def _add(self, ds: str, record: dict[str, Any], now: float) -> None:
        seq = record.get("seq")
        if not isinstance(seq, int):
            self.unknown += 1
            return
        arrival = self.seen.get((ds, seq))
        if arrival is None:
            arrival = self.seen[(ds, seq)] = Arrival(now, 0, set())
        arrival.count += 1
        arrival.reading_ids.add(str(record.get("reading_id")))

    def delivered(self, ds: str) -> set[int]:
        with self._lock:
            return {seq for (d, seq) in self.seen if d == ds}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_SEQ = "CASE WHEN json_valid(record) THEN json_extract(record, '$.seq') END"


def buffered_seqs(db: Path, ds: str) -> set[int]:
    """Sequence numbers of `ds` the agent's buffer holds: pending, held or dead-lettered."""
    if not db.exists():
        return set()
    with BufferSession(db) as session:
        rows = session.conn.execute(
            f"SELECT {_SEQ} FROM readings WHERE datasource_id = ?1 "
            f"UNION ALL SELECT {_SEQ} FROM held WHERE datasource_id = ?1 "
            f"UNION ALL SELECT {_SEQ} FROM dead_letters WHERE datasource_id = ?1",
            (ds,),
        ).fetchall()
    return {int(seq) for (seq,) in rows if isinstance(seq, int)}


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    minutes: float
    seed: int
    workdir: Path
    keep: bool
    drain_timeout: float

    @property
    def short(self) -> bool:
        return self.minutes < SHORT_MINUTES


class Soak:
    """Owns the parts, injects the faults, and keeps the books."""

    def __init__(self, opts: Options, mosquitto: str) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.timeline = Timeline()
        work = opts.workdir
        (work / "broker").mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(work / "broker", mosquitto)
        self.endpoint = Endpoint(work / "sandbox.db")
        self.sensor = PtySensor(work / "usb-soak-station")
        self.token_file = work / "token"
        self.buffer_db = work / "data" / "buffer.db"
        self.agent = AgentRunner(work / "agent.toml", work / "agent.log")
        self.arrivals = Arrivals(work / "sandbox.db")
        self.serial = SerialWriter(self.sensor, random.Random(opts.seed * 1000 + 1))
        self.publisher: MqttPublisher | None = None
        self._stop_monitor = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="monitor", daemon=True)
        self._token_n = 0

    # -- set-up and tear-down ------------------------------------------------------------

    def write_config(self) -> None:
        self.token_file.write_text(FIRST_TOKEN + "\n")
        endpoint = {
            "url": self.endpoint.url,
            "token_file": str(self.token_file),
            "record_id_field": "reading_id",
            "max_batch_records": 200,
            "flush_interval_s": 0.5,
            "timeout_s": 5.0,
            "backoff_base_s": 0.2,
            "backoff_max_s": 5.0,
        }
        # A buffer far larger than the run needs: nothing is expected to be dropped, and
        # anything dropped is counted by the policy (drop_oldest) and shown in the ledger.
        buffer = {
            "max_bytes": 256 * 1024 * 1024,
            "when_full": "drop_oldest",
            "commit_interval_ms": 200,
            "min_free_bytes": 1024 * 1024,
        }
        serial = {
            "name": SERIAL_NAME,
            "type": "serial",
            "port": str(self.sensor.link),
            "format": "kv",
            "shape": "wide",
            "datasource_id": SERIAL_DS,
            "tags": {"src": "serial"},
            "reopen_backoff_max_s": 1.0,
        }
        bridge = {
            "name": MQTT_NAME,
            "type": "mqtt",
            "broker": self.broker.url,
            "topics": ["soak/+/data"],
            "topic_fields": "soak/{sensor}/data",
            "format": "json",
            "shape": "wide",
            "qos": 1,
            "datasource_id": MQTT_DS,
            "tags": {"src": "mqtt"},
            "keepalive_s": 10,
            "reopen_backoff_max_s": 1.0,
        }
        agent = {"data_dir": str(self.opts.workdir / "data"), "device_id": "gw-soak"}
        self.agent.config.write_text(
            toml_tables(
                [
                    ("[agent]", agent),
                    ("[endpoint]", endpoint),
                    ("[buffer]", buffer),
                    # Off: the default port would be shared with any other agent on the host.
                    ("[status]", {"listen": "off"}),
                    ("[[sources]]", serial),
                    ("[[sources]]", bridge),
                ]
            )
        )

    def start(self) -> None:
        self.broker.start()
        self.endpoint.start()
        self.sensor.plug()
        self.write_config()
        self.agent.start()
        self._wait_agent_ready(1)
        # The agent's persistent session must exist before anything is published, or the
        # broker would not queue messages for it.
        self.publisher = MqttPublisher(self.broker, random.Random(self.opts.seed * 1000 + 2))
        self.publisher.start()
        self.serial.start()
        self._monitor.start()

    def _wait_agent_ready(self, opens: int) -> None:
        if not wait_for(lambda: self.agent.serial_opens() >= opens, 30):
            raise RuntimeError("the agent did not open the serial port; see agent.log")
        connected = f"mqtt {MQTT_NAME}: connected to"
        if not wait_for(lambda: self.agent.log_text().count(connected) >= 1, 30):
            raise RuntimeError("the agent did not connect to the broker; see agent.log")

    def close(self) -> None:
        self._stop_monitor.set()
        if self._monitor.is_alive():
            self._monitor.join()
        self.agent.ensure_dead()
        if self.publisher is not None:
            self.publisher.close()
        self.broker.stop()
        self.endpoint.stop()
        self.sensor.unplug()
        self.arrivals.close()

    # -- the monitor -----------------------------------------------------------------------

    def _watch(self) -> None:
        next_progress = time.monotonic() + PROGRESS_S
        while not self._stop_monitor.wait(POLL_S):
            self.arrivals.poll()
            self.agent.sample()
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_S
                self._progress()

    def _progress(self) -> None:
        assert self.publisher is not None
        log_line(
            f"  t+{self.timeline.now():7.1f}s  progress: serial written "
            f"{len(self.serial.written())}, mqtt acked {len(self.publisher.acked())}, "
            f"delivered {len(self.arrivals.delivered(SERIAL_DS))}"
            f"+{len(self.arrivals.delivered(MQTT_DS))}, agent RSS peak "
            f"{mib(self.agent.peak_rss_kib)}"
        )

    # -- the fault schedule ----------------------------------------------------------------

    def plan(self) -> Iterator[tuple[float, str]]:
        """(gap before it, kind): short runs play each kind once in order, long ones rounds."""
        if self.opts.short:
            for kind in FAULT_KINDS:
                yield 3.0, kind
            return
        while True:
            kinds = list(FAULT_KINDS)
            self.rng.shuffle(kinds)
            for kind in kinds:
                yield self.rng.uniform(5, 40), kind

    def run_faults(self) -> None:
        end = self.opts.minutes * 60
        for gap, kind in self.plan():
            # A short run plays its whole cycle even if it overruns the planned minutes.
            if not self.opts.short and self.timeline.now() + gap > end:
                break
            time.sleep(gap)
            getattr(self, "fault_" + kind)()
        remaining = end - self.timeline.now()
        if remaining > 0:
            time.sleep(remaining)

    def _pick(self, short: float, low: float, high: float) -> float:
        return short if self.opts.short else self.rng.uniform(low, high)

    def _hold_serial(self) -> None:
        """Pause the serial writer until the agent's buffer has every line written so far."""
        self.serial.pause()
        written = self.serial.written()

        def committed() -> bool:
            have = buffered_seqs(self.buffer_db, SERIAL_DS) | self.arrivals.delivered(SERIAL_DS)
            return written <= have

        if not wait_for(committed, 30, 0.2):
            self.timeline.note("WARNING", "serial lines not all committed within 30 s")

    def _release_serial(self, opens_before: int) -> None:
        """Resume writing once the agent has (re)opened the port: opening discards input."""
        if not wait_for(lambda: self.agent.serial_opens() > opens_before, 30):
            self.timeline.note("WARNING", "the agent did not reopen the serial port in 30 s")
        self.serial.resume()

    def fault_kill9(self, during: str = "") -> None:
        self._hold_serial()
        opens = self.agent.serial_opens()
        old = self.agent.proc.pid if self.agent.proc else 0
        self.agent.kill9()
        hwm = self.agent.hwm_kib[-1]
        down = self._pick(1.0, 0.0, 5.0)
        time.sleep(down)
        self.agent.start()
        new = self.agent.proc.pid if self.agent.proc else 0
        detail = f"agent pid {old} killed (VmHWM {mib(hwm)}), down {down:.1f} s, pid {new}"
        self.timeline.note("kill9", detail + (f", during {during}" if during else ""))
        self._release_serial(opens)

    def _kill_during(self, kind: str) -> bool:
        """Whether to kill the agent halfway through an endpoint fault (mid-retry, mid-split)."""
        if self.opts.short:
            return kind in ("drop_after_commit", "limit_413")
        return self.rng.random() < 0.4

    def fault_broker_restart(self) -> None:
        down = self._pick(3.0, 1.0, 10.0)
        self.timeline.note("broker_restart", f"mosquitto stopped for {down:.1f} s")
        self.broker.stop()
        time.sleep(down)
        self.broker.start()

    def fault_serial_unplug(self) -> None:
        self._hold_serial()
        opens = self.agent.serial_opens()
        away = self._pick(2.0, 0.5, 8.0)
        self.timeline.note("serial_unplug", f"pty unplugged for {away:.1f} s")
        self.sensor.unplug()
        time.sleep(away)
        self.sensor.plug()
        self._release_serial(opens)

    def fault_sandbox_outage(self) -> None:
        down = self._pick(5.0, 3.0, 30.0)
        self.timeline.note("sandbox_outage", f"sandbox stopped for {down:.1f} s")
        self.endpoint.stop()
        time.sleep(down)
        self.endpoint.start()

    def _for_a_while(self, kind: str, detail: str, seconds: float, **faults: Any) -> None:
        self.timeline.note(kind, f"{detail} for {seconds:.1f} s")
        self.endpoint.inject(**faults)
        if self._kill_during(kind):
            time.sleep(seconds / 2)
            self.fault_kill9(during=kind)
            seconds /= 2
        time.sleep(seconds)
        self.endpoint.inject()

    def fault_burst_503(self) -> None:
        self._for_a_while("burst_503", "every insert 503", self._pick(4.0, 2.0, 12.0), status=503)

    def fault_throttle_429(self) -> None:
        after = str(int(self._pick(2, 1, 4)))
        self._for_a_while(
            "throttle_429",
            f"every insert 429 with Retry-After {after}",
            self._pick(4.0, 2.0, 10.0),
            status=429,
            retry_after=after,
        )

    def fault_drop_after_commit(self) -> None:
        rate = round(self._pick(0.5, 0.2, 0.8), 2)
        self._for_a_while(
            "drop_after_commit",
            f"{rate:.0%} of stored batches answered by a closed connection",
            self._pick(6.0, 4.0, 15.0),
            drop_after_commit=True,
            drop_after_commit_rate=rate,
            seed=self.rng.randrange(1 << 30),
        )

    def fault_token_rotation(self) -> None:
        self._token_n += 1
        token = f"soak-token-{self._token_n}"
        lag = self._pick(3.0, 1.0, 10.0)
        self.timeline.note(
            "token_rotation", f"sandbox takes only {token}; token file in {lag:.1f} s"
        )
        self.endpoint.rotate(token)
        time.sleep(lag)
        tmp = self.token_file.with_name("token.new")
        tmp.write_text(token + "\n")
        tmp.replace(self.token_file)  # atomic: the agent never reads half a token

    def fault_limit_413(self) -> None:
        # A short 503 first builds a backlog, so the batches that follow are over the limit.
        limit = int(self._pick(1500, 1000, 3000))
        self.endpoint.inject(status=503)
        time.sleep(self._pick(2.0, 1.0, 4.0))
        self._for_a_while(
            "limit_413", f"413 over {limit} bytes", self._pick(6.0, 4.0, 12.0), max_bytes=limit
        )

    def fault_captive_portal(self) -> None:
        self._for_a_while(
            "captive_portal",
            "every insert answered 200 text/html by a login page, nothing stored",
            self._pick(5.0, 3.0, 20.0),
            portal=True,
        )

    def fault_trickle(self) -> None:
        # timeout_s is 5 s: each answer outlives it, so every batch is stored, cut, sent again.
        self._for_a_while(
            "trickle",
            "every answer trickled a byte every 2 s",
            self._pick(8.0, 6.0, 20.0),
            trickle_s=2.0,
        )

    def fault_huge_answer(self) -> None:
        mb = int(self._pick(50, 10, 50))
        self._for_a_while(
            "huge_answer",
            f"every insert answer (200, 400) padded to {mb} MB",
            self._pick(5.0, 3.0, 12.0),
            huge_body_mb=mb,
        )

    # -- the end ---------------------------------------------------------------------------

    def inputs(self) -> list[tuple[Input, set[int]]]:
        """Each input with the sequence numbers it got accepted."""
        assert self.publisher is not None
        serial = self.serial.input
        return [(serial, set(serial.written)), (self.publisher.input, self.publisher.acked())]

    def settled(self) -> bool:
        """Every accepted reading delivered or dead-lettered, and nothing pending."""
        for inp, accepted in self.inputs():
            ds = inp.datasource_id
            if accepted - self.arrivals.delivered(ds) - buffered_seqs(self.buffer_db, ds):
                return False
        session = BufferSession(self.buffer_db)
        try:
            return session.pending_count() == 0
        finally:
            session.close()

    def finish(self) -> tuple[bool, int]:
        """Stop the inputs, drain, stop the agent: (drained in time, agent exit status)."""
        assert self.publisher is not None
        self.serial.stop()
        self.publisher.stop()
        self.timeline.note("end", "inputs stopped; waiting for PUBACKs and the backlog")
        if not wait_for(lambda: self.publisher is not None and self.publisher.unacked() == 0, 60):
            self.timeline.note("WARNING", "some MQTT messages were never PUBACKed")
        drained = wait_for(self.settled, self.opts.drain_timeout, 1.0)
        if drained:
            self.timeline.note("drained", "every accepted reading delivered or dead-lettered")
        else:
            self.timeline.note("DEADLINE", f"not settled after {self.opts.drain_timeout:.0f} s")
        status = self.agent.terminate()
        self._stop_monitor.set()
        self._monitor.join()
        self.arrivals.poll()
        return drained, status


# --------------------------------------------------------------------------- the ledger


@dataclass
class Books:
    """The ledger of one input."""

    inp: Input
    accepted: set[int]
    delivered: set[int]
    dead: dict[int, str]
    dropped: int
    duplicates_same_id: int = 0
    duplicates_new_id: int = 0
    longest_delay: tuple[float, int] = (0.0, 0)
    missing: list[int] = field(default_factory=list)
    wrong_dead: list[int] = field(default_factory=list)
    poison_delivered: list[int] = field(default_factory=list)
    never_written: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        problems = (self.missing, self.wrong_dead, self.poison_delivered, self.never_written)
        return not any(problems)


def dead_letters_by_ds(db: Path) -> dict[str, dict[int, str]]:
    found: dict[str, dict[int, str]] = {SERIAL_DS: {}, MQTT_DS: {}}
    session = BufferSession(db)
    try:
        for letter in session.dead_letters():
            record = letter["record"]
            if isinstance(record, dict) and isinstance(record.get("seq"), int):
                reason = f"{letter['status']}: {letter['reason']}"
                found.setdefault(letter["datasource_id"], {})[record["seq"]] = reason
    finally:
        session.close()
    return found


def dropped_counts(db: Path) -> dict[str, int]:
    session = BufferSession(db)
    try:
        return {k: v for k, v in session.stats().counters.items() if k.startswith("dropped.")}
    finally:
        session.close()


def keep_books(soak: Soak) -> list[Books]:
    dead = dead_letters_by_ds(soak.buffer_db)
    dropped = dropped_counts(soak.buffer_db)
    names = {SERIAL_DS: SERIAL_NAME, MQTT_DS: MQTT_NAME}
    books = []
    for inp, accepted in soak.inputs():
        ds = inp.datasource_id
        # Counted drops name the data source (buffer_full, max_age) or the source (unparseable).
        drops = sum(n for k, n in dropped.items() if k.rsplit(".", 1)[-1] in (ds, names[ds]))
        b = Books(inp, accepted, soak.arrivals.delivered(ds), dead.get(ds, {}), drops)
        settle(b, soak.arrivals)
        books.append(b)
    return books


def settle(b: Books, arrivals: Arrivals) -> None:
    unaccounted = sorted(b.accepted - b.delivered - set(b.dead))
    # Readings a configured policy dropped are counted, not named: the counters can explain
    # the unaccounted ones only if there are no more of them than were counted.
    b.missing = unaccounted if len(unaccounted) > b.dropped else []
    b.wrong_dead = sorted(set(b.dead) - b.inp.poison)
    b.poison_delivered = sorted(b.delivered & b.inp.poison)
    b.never_written = sorted(b.delivered - set(b.inp.written))
    for seq in b.delivered:
        arrival = arrivals.seen[(b.inp.datasource_id, seq)]
        extra = arrival.count - 1
        if extra:
            fresh = len(arrival.reading_ids) - 1
            b.duplicates_new_id += fresh
            b.duplicates_same_id += extra - fresh
        written = b.inp.written.get(seq)
        if written is not None and arrival.first - written > b.longest_delay[0]:
            b.longest_delay = (arrival.first - written, seq)


def agent_log_findings(text: str) -> list[str]:
    """Tracebacks and critical lines: not ledger failures, but worth a look."""
    findings = []
    tracebacks = text.count("Traceback (most recent call last)")
    if tracebacks:
        findings.append(f"{tracebacks} traceback(s) in agent.log")
    findings += [line[:200] for line in text.splitlines() if "CRITICAL" in line]
    return findings[:20]


def report(soak: Soak, books: list[Books], drained: bool, status: int) -> bool:
    log_line("\n== faults injected")
    for e in soak.timeline.events:
        log_line(f"  t+{e.at:7.1f}s {e.wall}Z  {e.kind:<18} {e.detail}")
    counts = Counter(e.kind for e in soak.timeline.events if e.kind in FAULT_KINDS)
    log_line("  per kind: " + ", ".join(f"{k} {counts[k]}" for k in FAULT_KINDS))
    log_line("\n== ledger")
    header = (
        f"  {'input':<7}{'written':>9}{'accepted':>10}{'not acc.':>10}{'delivered':>11}"
        f"{'dup same id':>13}{'dup new id':>12}{'dead':>7}{'poison':>8}{'dropped':>9}"
        f"{'missing':>9}"
    )
    log_line(header)
    for b in books:
        log_line(
            f"  {b.inp.name:<7}{len(b.inp.written):>9}{len(b.accepted):>10}"
            f"{len(b.inp.not_accepted) + len(set(b.inp.written) - b.accepted):>10}"
            f"{len(b.delivered):>11}{b.duplicates_same_id:>13}{b.duplicates_new_id:>12}"
            f"{len(b.dead):>7}{len(b.inp.poison & b.accepted):>8}{b.dropped:>9}"
            f"{len(b.missing):>9}"
        )
    for b in books:
        delay, seq = b.longest_delay
        log_line(f"  {b.inp.name}: longest delivery delay {delay:.1f} s (seq {seq})")
        for label, seqs in (
            ("MISSING", b.missing),
            ("dead-lettered but not poison", b.wrong_dead),
            ("poison delivered", b.poison_delivered),
            ("delivered but never written", b.never_written),
        ):
            if seqs:
                log_line(f"  {b.inp.name}: {label} ({len(seqs)}): {seqs[:50]}")
        reasons = Counter(reason[:80] for reason in b.dead.values())
        for reason, n in reasons.most_common(3):
            log_line(f"  {b.inp.name}: dead letter reason x{n}: {reason}")
    if soak.arrivals.unknown:
        log_line(f"  records without a seq at the sandbox: {soak.arrivals.unknown}")
    total_missing = sum(len(b.missing) for b in books)
    log_line(f"missing: {total_missing}")
    log_line("\n== agent")
    hwm = ", ".join(mib(k) for k in soak.agent.hwm_kib)
    log_line(f"  processes: {len(soak.agent.pids)}; VmHWM at each end: {hwm}")
    log_line(f"  peak memory (VmRSS/VmHWM): {mib(soak.agent.peak_rss_kib)}")
    log_line(f"  peak memory of its MQTT link process (VmRSS): {mib(soak.agent.link_peak_rss_kib)}")
    log_line(f"  exit status on SIGTERM: {status}")
    log_line(f"  sandbox answers: {soak.endpoint.answers()}")
    for finding in agent_log_findings(soak.agent.log_text()):
        log_line(f"  agent log: {finding}")
    ok = drained and status == 0 and all(b.clean for b in books) and not soak.arrivals.unknown
    log_line(f"\nresult: {'PASS' if ok else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="load and faults (default 30)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    p.add_argument("--workdir", type=Path, help="work here and keep it (default: a temp dir)")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="seconds to drain at the end")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None  # the caller's directory: theirs to remove
    return Options(args.minutes, args.seed, workdir.resolve(), keep, args.drain_timeout)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    binary = mosquitto_binary()
    if binary is None:
        print("soak: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    mode = "short: every fault once, in order" if opts.short else "seeded random faults"
    log_line(f"soak: {opts.minutes:g} min, seed {opts.seed} ({mode}); workdir {opts.workdir}")
    # The sandbox runs in this process: its request log goes beside the agent's.
    logging.basicConfig(
        filename=opts.workdir / "sandbox.log",
        level=logging.INFO,
        format="%(asctime)s %(threadName)s %(message)s",
    )
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the agent and the broker are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"soak: signal {signum}"))
    soak = Soak(opts, binary)
    ok = False
    try:
        soak.start()
        soak.timeline.note("start", f"agent pid {soak.agent.pids[-1]}, broker {soak.broker.url}")
        soak.run_faults()
        drained, status = soak.finish()
        ok = report(soak, keep_books(soak), drained, status)
    except Exception:  # the run is over either way; say why and keep the evidence
        traceback.print_exc()
        log_line("result: FAIL (the soak itself failed; see the traceback above)")
    finally:
        soak.close()
    if ok and not opts.keep:
        shutil.rmtree(opts.workdir, ignore_errors=True)
    else:
        log_line(f"workdir kept: {opts.workdir} (agent.log, sandbox.db, data/buffer.db)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
