"""The status document as Prometheus text (exposition format 0.0.4): names prefixed
`edge_agent_`, plus the usual `process_*` metrics of the serving process, read from /proc."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge_agent.status import human
from edge_agent.status.snapshot import (
    BudgetPart,
    BufferPart,
    DrainPart,
    SourcePart,
    Status,
    UploaderPart,
)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Drop counters are named dropped.<reason>.<name>. Sources count what they could not read per
# source name; everything else (buffer_full, max_age, write_failed, by_operator) is counted by
# the buffer per data source id. The metrics keep one label per meaning: `source` is always a
# source name, `datasource` always a data source id.
_DROPS_BY_SOURCE = frozenset({"unparseable", "oversize"})
_UPLINK_STATES = ("up", "down", "refusing")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Exposition:
    """Prometheus text format 0.0.4, one family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float | None]],
        prefix: str = "edge_agent_",
    ) -> None:
        full = prefix + name
        escaped_help = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {full} {escaped_help}", f"# TYPE {full} {kind}"]
        for labels, value in samples:
            if value is None:
                continue
            label_text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            label_part = "{" + label_text + "}" if label_text else ""
            self.lines.append(f"{full}{label_part} {_metric_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(doc: Status, process: ProcessStats | None = None) -> str:
    """The status document as Prometheus text (exposition format 0.0.4), and the serving
    process's own `process_*` metrics when given."""
    out = _Exposition()
    _agent_metrics(out, doc)
    _source_metrics(out, doc.snapshot.sources)
    _buffer_metrics(out, doc.snapshot.buffer)
    _upload_metrics(out, doc.snapshot.uploader)
    if doc.snapshot.drain is not None:
        _drain_metrics(out, doc.snapshot.drain)
    if doc.snapshot.budget is not None:
        _budget_metrics(out, doc.snapshot.budget)
    if process is not None:
        _process_metrics(out, process)
    return out.text()


@dataclass(frozen=True)
class ProcessStats:
    """What Prometheus client libraries export as `process_*`, read from /proc/self."""

    resident_memory_bytes: int
    virtual_memory_bytes: int
    cpu_seconds: float
    open_fds: int
    max_fds: int | None
    start_time_seconds: float

    @classmethod
    def read(cls, proc: str = "/proc/self") -> ProcessStats:
        ticks = os.sysconf("SC_CLK_TCK")
        with open(f"{proc}/stat") as f:
            # The command name in parentheses may hold spaces: count fields after it.
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 of proc(5): utime 14, stime 15, starttime 22, vsize 23, rss 24.
        utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
        return cls(
            resident_memory_bytes=int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
            virtual_memory_bytes=int(fields[20]),
            cpu_seconds=(utime + stime) / ticks,
            open_fds=len(os.listdir(f"{proc}/fd")),
            max_fds=_max_fds(proc),
            start_time_seconds=_boot_time() + start / ticks,
        )


def _max_fds(proc: str) -> int | None:
    with open(f"{proc}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return int(soft) if soft.isdigit() else None
    return None


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def _process_metrics(out: _Exposition, p: ProcessStats) -> None:
    families: list[tuple[str, str, str, float | None]] = [
        ("cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
         p.cpu_seconds),
        ("resident_memory_bytes", "gauge", "Resident memory size in bytes.",
         p.resident_memory_bytes),
        ("virtual_memory_bytes", "gauge", "Virtual memory size in bytes.",
         p.virtual_memory_bytes),
        ("open_fds", "gauge", "Number of open file descriptors.", p.open_fds),
        ("max_fds", "gauge", "Maximum number of open file descriptors.", p.max_fds),
        ("start_time_seconds", "gauge",
         "Start time of the process since unix epoch in seconds.", p.start_time_seconds),
    ]  # fmt: skip
    for name, kind, help_text, value in families:
        out.family(name, kind, help_text, [({}, value)], prefix="process_")


def _agent_metrics(out: _Exposition, doc: Status) -> None:
    agent, clock = doc.snapshot.agent, doc.snapshot.clock
    info = {"version": agent.version, "device_id": agent.device_id or ""}
    out.family(
        "info", "gauge", "Always 1; the labels name the agent version and device.", [(info, 1)]
    )
    out.family(
        "uptime_seconds", "gauge", "Seconds since the agent started.", [({}, agent.uptime_s)]
    )
    out.family("healthy", "gauge", "1 if /healthz answers ok, else 0.", [({}, doc.health.healthy)])
    out.family(
        "clock_trusted",
        "gauge",
        "1 if readings get reliable times (the system clock, or the endpoint's), else 0.",
        [({}, clock.trusted)],
    )
    out.family(
        "clock_offset_seconds",
        "gauge",
        "How far the system clock is ahead of the endpoint's time (its Date), when known.",
        [({}, clock.offset_s)],
    )


# (metric, type, help, value): one sample per source, labelled source=<name>.
_SOURCE_FAMILIES: list[tuple[str, str, str, Callable[[SourcePart], float | None]]] = [
    ("source_connected", "gauge", "1 if the source has its device or broker open.",
     lambda s: s.connected),
    ("source_lines_total", "counter", "Lines or messages the source received.", lambda s: s.lines),
    ("source_readings_total", "counter", "Readings the source produced.", lambda s: s.readings),
    ("source_parse_errors_total", "counter",
     "Lines or messages the source could not parse (dropped and counted).",
     lambda s: s.parse_errors),
    ("source_reconnects_total", "counter",
     "Times the source reopened its device or reconnected to its broker.",
     lambda s: s.reconnects),
    ("source_last_data_timestamp_seconds", "gauge",
     "Unix time of the last line or message the source received.", lambda s: s.last_data),
]  # fmt: skip

# (metric, type, help, value): one unlabelled sample each.
_BUFFER_SCALARS: list[tuple[str, str, str, Callable[[BufferPart], float]]] = [
    ("buffer_pending_bytes", "gauge", "Bytes of records waiting in the buffer.",
     lambda b: b.pending_bytes),
    ("buffer_oldest_pending_age_seconds", "gauge",
     "Age of the oldest reading waiting for upload (0 when none waits).",
     lambda b: 0.0 if b.oldest_age_s is None else b.oldest_age_s),
    ("buffer_file_bytes", "gauge", "Size of the buffer database and its WAL on disk.",
     lambda b: b.file_bytes),
    ("buffer_max_bytes", "gauge", "The configured limit of the buffer on disk.",
     lambda b: b.max_bytes),
    ("dead_letters", "gauge",
     "Records the server refused, kept in dead_letters (edge-agent buffer dead-letters).",
     lambda b: b.dead_letters),
]  # fmt: skip
_UPLOAD_SCALARS: list[tuple[str, str, str, Callable[[UploaderPart], float]]] = [
    ("uploaded_records_total", "counter",
     "Records the server accepted (2xx) since the agent started.", lambda u: u.records_uploaded),
    ("upload_retries_total", "counter", "Batches sent again after a transient failure.",
     lambda u: u.retries),
    ("upload_last_success_timestamp_seconds", "gauge",
     "Unix time of the last successful upload (0 before the first).",
     lambda u: 0.0 if u.last_success is None else u.last_success),
    ("upload_failing_seconds", "gauge",
     "Seconds since uploads started failing (0 while they succeed).",
     lambda u: 0.0 if u.failing_for_s is None else u.failing_for_s),
]  # fmt: skip


def _drain_metrics(out: _Exposition, drain: DrainPart) -> None:
    out.family(
        "backlog_readings",
        "gauge",
        "Pending readings accepted before the live window (live_window_s): the backlog.",
        [({}, drain.backlog_readings)],
    )
    out.family(
        "backlog_oldest_age_seconds",
        "gauge",
        "Age of the oldest backlog reading (absent while there is no backlog).",
        [({}, drain.oldest_backlog_age_s)],
    )
    out.family(
        "backlog_drain_seconds",
        "gauge",
        "Estimated time to deliver the backlog at the rate it drained lately (absent while "
        "nothing was measured or it does not move).",
        [({}, drain.eta_s)],
    )


def _budget_metrics(out: _Exposition, budget: BudgetPart) -> None:
    out.family(
        "uplink_bytes_today",
        "gauge",
        "Bytes on the wire this UTC day (requests after gzip with headers, and answers).",
        [({}, budget.used)],
    )
    out.family(
        "uplink_bytes_per_day_limit",
        "gauge",
        "The daily byte budget, max_bytes_per_day (absent without a limit).",
        [({}, budget.limit)],
    )
    out.family(
        "uplink_budget_waiting",
        "gauge",
        "1 while readings are held back for the daily byte budget.",
        [({}, budget.waiting)],
    )


def _source_metrics(out: _Exposition, sources: tuple[SourcePart, ...]) -> None:
    for name, kind, help_text, read in _SOURCE_FAMILIES:
        out.family(name, kind, help_text, [({"source": s.name}, read(s)) for s in sources])


def _buffer_metrics(out: _Exposition, buffer: BufferPart) -> None:
    out.family(
        "buffer_pending_readings",
        "gauge",
        "Readings waiting in the buffer for upload, per data source.",
        [({"datasource": ds}, n) for ds, n in sorted(buffer.pending.items())],
    )
    for name, kind, help_text, read in _BUFFER_SCALARS:
        out.family(name, kind, help_text, [({}, read(buffer))])
    drops = human.drops(buffer.counters)
    out.family(
        "dropped_readings_total",
        "counter",
        "Readings dropped from the buffer, per data source, by reason: buffer_full, max_age, "
        "write_failed (the disk refused them), by_operator (edge-agent buffer drop).",
        [({"reason": r, "datasource": n}, c) for r, n, c in drops if r not in _DROPS_BY_SOURCE],
    )
    out.family(
        "source_dropped_total",
        "counter",
        "Lines or messages a source could not turn into readings, per source, by reason: "
        "unparseable, oversize (MQTT payloads over the caps, kept in dead letters).",
        [({"reason": r, "source": n}, c) for r, n, c in drops if r in _DROPS_BY_SOURCE],
    )


def _upload_metrics(out: _Exposition, uploader: UploaderPart) -> None:
    for name, kind, help_text, read in _UPLOAD_SCALARS:
        out.family(name, kind, help_text, [({}, read(uploader))])
    out.family(
        "upload_requests_total",
        "counter",
        'Insert requests by HTTP status; status="error" when no answer came or none could be '
        'sent, "stalled" when the answer was not complete within timeout_s.',
        [({"status": s}, n) for s, n in sorted(uploader.requests.items())],
    )
    state = uploader.uplink.state if uploader.uplink is not None else None
    out.family(
        "uplink_state",
        "gauge",
        'The uplink, 1 for its state: "up", "down" (nothing answers: probing every '
        'reconnect_probe_s) or "refusing" (the server answers with failures: backing off).',
        [({"state": s}, s == state) for s in _UPLINK_STATES] if state else [],
    )
    out.family(
        "uploads_paused",
        "gauge",
        'Paused uploads, 1 per scope: a data source refused with 403, or "*" when the token '
        "is refused (401) and nothing is uploaded.",
        [({"scope": scope}, 1) for scope in sorted(uploader.paused)],
    )
