"""The status endpoint: health, Prometheus metrics, a page for the technician on site.

This module owns everything that tells an operator how the agent is doing. The agent hands it a
`snapshot()` function returning a plain dict (agent, sources, buffer, uploader, clock, errors);
this module judges health from it, keeps an hour of history, and renders it four ways:

    GET /             an HTML page (refreshes itself every 10 s; no JavaScript, no CDN)
    GET /healthz      200 {"status": "ok"} or 503 {"status": "unhealthy", "reasons": [...]}
    GET /metrics      Prometheus text format 0.0.4: names prefixed `edge_agent_`, plus the
                      usual `process_*` metrics of the agent's process, read from /proc
    GET /status.json  the snapshot plus {"health": {"healthy": ..., "reasons": [...]}}

    health            the rules: which facts make the agent unhealthy, in plain sentences
    History           buffer depth and upload rate, one sample per interval over the last hour
    StatusServer      stdlib ThreadingHTTPServer plus a sampler thread; start once, stop once
    render_*          the document as metrics text, HTML page, terminal text or the one
                      STATUS= line systemd shows
    fetch_status      what `edge-agent status` calls to read a running agent's /status.json

A failing snapshot never takes the server down: the request answers 500 and the traceback is
logged once until the snapshot works again (Prometheus and the page poll, so logging every
failure would flood the journal).
"""

from __future__ import annotations

import errno
import html
import json
import logging
import math
import os
import re
import socket
import socketserver
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from edge_agent.errors import EdgeAgentError, ForeignStatusError

log = logging.getLogger("edge_agent.status")

Snapshot = dict[str, Any]

SAMPLE_INTERVAL_S = 10.0
HISTORY_WINDOW_S = 3600.0
PAGE_REFRESH_S = 10
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SERVER_NAME = "edge-agent"  # the start of the status server's Server header
MAX_STATUS_BYTES = 4 * 1024 * 1024  # what `fetch_status` reads of an answer at most

# Drop counters are named dropped.<reason>.<name>. Sources count what they could not read per
# source name; everything else (buffer_full, max_age, write_failed, by_operator) is counted by
# the buffer per data source id. The metrics keep one label per meaning: `source` is always a
# source name, `datasource` always a data source id.
_DROPS_BY_SOURCE = frozenset({"unparseable", "oversize"})


def _part(doc: Snapshot, key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _sources(doc: Snapshot) -> list[dict[str, Any]]:
    value = doc.get("sources")
    return [s for s in value if isinstance(s, dict)] if isinstance(value, list) else []


# -- health ------------------------------------------------------------------------------


def health(snapshot: Snapshot, unhealthy_after_s: float) -> tuple[bool, list[str]]:
    """(healthy, reasons): each reason is one sentence saying what is wrong and what it means."""
    reasons = [
        *_source_reasons(snapshot),
        *_upload_reasons(snapshot, unhealthy_after_s),
        *_clock_reasons(snapshot),
    ]
    return not reasons, reasons


def _source_reasons(snapshot: Snapshot) -> Iterable[str]:
    for source in _sources(snapshot):
        if source.get("connected"):
            continue
        kind = source.get("type")
        name = f"{kind} source {source.get('name')}" if kind else f"source {source.get('name')}"
        error = source.get("last_error")
        if error:
            yield f"{name} is not connected: {error}"
        else:
            yield f"{name} is not connected (no error reported yet)"


def _upload_reasons(snapshot: Snapshot, unhealthy_after_s: float) -> Iterable[str]:
    uploader = _part(snapshot, "uploader")
    failing = uploader.get("failing_for_s")
    if failing is not None and failing > unhealthy_after_s:
        last = uploader.get("last_error") or "no error text"
        yield (
            f"uploads have been failing for {_duration(failing)} (last error: {last}); "
            "readings are kept in the buffer and retried"
        )
    paused = uploader.get("paused")
    if not isinstance(paused, dict):
        return
    for scope, why in sorted(paused.items()):
        if scope == "*":
            yield f"uploads are stopped for every data source: {why}"
        else:
            yield f"uploads to data source {scope} are paused: {why}"


def _clock_reasons(snapshot: Snapshot) -> Iterable[str]:
    clock = _part(snapshot, "clock")
    if clock and not clock.get("trusted", True) and not clock.get("confirming"):
        state = clock.get("state") or "unknown"
        yield (
            f"the system clock is not trusted (state: {state}), so new readings cannot be "
            "stamped reliably; check that NTP can reach a time server"
        )


def concerns(snapshot: Snapshot, unhealthy_after_s: float) -> list[str]:
    """What is going wrong but has not made the agent unhealthy yet, one phrase each: a
    healthy verdict must not read as "all is well" while every upload fails."""
    failing = _part(snapshot, "uploader").get("failing_for_s")
    if failing is None or failing > unhealthy_after_s:
        return []
    return [
        f"uploads failing for {_duration(failing)}, unhealthy after {_duration(unhealthy_after_s)}"
    ]


def status_document(snapshot: Snapshot, unhealthy_after_s: float) -> Snapshot:
    """The snapshot plus its health: what /status.json serves and every renderer reads."""
    healthy, reasons = health(snapshot, unhealthy_after_s)
    part = {
        "healthy": healthy,
        "reasons": reasons,
        "concerns": concerns(snapshot, unhealthy_after_s) if healthy else [],
    }
    return {**snapshot, "health": part}


# -- history -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic seconds
    pending: int  # readings in the buffer
    uploaded: int  # records_uploaded so far
    rate: float | None  # records/s since the previous sample; None for the first


class History:
    """Buffer depth and upload rate, one sample per `interval_s` over the last `window_s`.

    Thread-safe: the sampler thread adds while request threads read.
    """

    def __init__(
        self, interval_s: float = SAMPLE_INTERVAL_S, window_s: float = HISTORY_WINDOW_S
    ) -> None:
        if not interval_s > 0 or not window_s >= interval_s:
            raise ValueError(
                f"history needs 0 < interval_s <= window_s, got {interval_s} and {window_s}"
            )
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=math.ceil(window_s / interval_s))
        self._lock = threading.Lock()

    def sample(self, snapshot: Snapshot, now: float) -> Sample:
        """Record the snapshot's buffer depth and upload count at `now` (monotonic seconds)."""
        pending = int(_part(snapshot, "buffer").get("pending_total") or 0)
        uploaded = int(_part(snapshot, "uploader").get("records_uploaded") or 0)
        with self._lock:
            rate = self._rate(uploaded, now)
            while self._samples and self._samples[0].t <= now - self.window_s:
                self._samples.popleft()
            sample = Sample(now, pending, uploaded, rate)
            self._samples.append(sample)
        return sample

    def _rate(self, uploaded: int, now: float) -> float | None:
        if not self._samples or now <= self._samples[-1].t:
            return None
        previous = self._samples[-1]
        delta = uploaded - previous.uploaded
        if delta < 0:  # the counter restarted from zero (a new uploader)
            delta = uploaded
        return delta / (now - previous.t)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)


# -- formatting shared by the page and the terminal ------------------------------------


def _duration(seconds: float) -> str:
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min"
    minutes = int(s // 60)
    if s < 2 * 86400:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // 1440} d {minutes % 1440 // 60} h"


def _bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _when(wall: float | None, now: float) -> str:
    if wall is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(wall))
    return f"{stamp} ({_duration(now - wall)} ago)"


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{_count(n)} {word if n == 1 else words or word + 's'}"


def _drops(counters: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(reason, name, count) of every dropped.<reason>.<name> counter."""
    out = []
    for key, value in sorted(counters.items()):
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == "dropped":
            out.append((parts[1], parts[2], int(value)))
    return out


# -- metrics -----------------------------------------------------------------------------


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


def render_metrics(doc: Snapshot, process: ProcessStats | None = None) -> str:
    """The status document as Prometheus text (exposition format 0.0.4), and the serving
    process's own `process_*` metrics when given."""
    out = _Exposition()
    _agent_metrics(out, doc)
    _source_metrics(out, _sources(doc))
    _buffer_metrics(out, _part(doc, "buffer"))
    _upload_metrics(out, _part(doc, "uploader"))
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


def _agent_metrics(out: _Exposition, doc: Snapshot) -> None:
    agent = _part(doc, "agent")
    info = {"version": str(agent.get("version", "")), "device_id": agent.get("device_id") or ""}
    out.family(
        "info", "gauge", "Always 1; the labels name the agent version and device.", [(info, 1)]
    )
    out.family(
        "uptime_seconds", "gauge", "Seconds since the agent started.", [({}, agent.get("uptime_s"))]
    )
    healthy = bool(_part(doc, "health").get("healthy"))
    out.family("healthy", "gauge", "1 if /healthz answers ok, else 0.", [({}, healthy)])
    clock = _part(doc, "clock")
    out.family(
        "clock_trusted",
        "gauge",
        "1 if readings get reliable times (the system clock, or the endpoint's), else 0.",
        [({}, bool(clock.get("trusted", True)))],
    )
    offset = clock.get("offset_s")
    out.family(
        "clock_offset_seconds",
        "gauge",
        "How far the system clock is ahead of the endpoint's time (its Date), when known.",
        [({}, offset if isinstance(offset, int | float) else None)],
    )


# (metric, type, help, key): one sample per source, labelled source=<name>.
_SOURCE_FAMILIES = [
    ("source_connected", "gauge", "1 if the source has its device or broker open.", "connected"),
    ("source_lines_total", "counter", "Lines or messages the source received.", "lines"),
    ("source_readings_total", "counter", "Readings the source produced.", "readings"),
    ("source_parse_errors_total", "counter",
     "Lines or messages the source could not parse (dropped and counted).", "parse_errors"),
    ("source_reconnects_total", "counter",
     "Times the source reopened its device or reconnected to its broker.", "reconnects"),
    ("source_last_data_timestamp_seconds", "gauge",
     "Unix time of the last line or message the source received.", "last_data"),
]  # fmt: skip

# (metric, type, help, key, value when None): one unlabelled sample each.
_BUFFER_SCALARS = [
    ("buffer_pending_bytes", "gauge", "Bytes of records waiting in the buffer.",
     "pending_bytes", None),
    ("buffer_oldest_pending_age_seconds", "gauge",
     "Age of the oldest reading waiting for upload (0 when none waits).", "oldest_age_s", 0.0),
    ("buffer_file_bytes", "gauge", "Size of the buffer database and its WAL on disk.",
     "file_bytes", None),
    ("buffer_max_bytes", "gauge", "The configured limit of the buffer on disk.",
     "max_bytes", None),
    ("dead_letters", "gauge",
     "Records the server refused, kept in dead_letters (edge-agent buffer dead-letters).",
     "dead_letters", None),
]  # fmt: skip
_UPLOAD_SCALARS = [
    ("uploaded_records_total", "counter",
     "Records the server accepted (2xx) since the agent started.", "records_uploaded", None),
    ("upload_retries_total", "counter", "Batches sent again after a transient failure.",
     "retries", None),
    ("upload_last_success_timestamp_seconds", "gauge",
     "Unix time of the last successful upload (0 before the first).", "last_success", 0.0),
    ("upload_failing_seconds", "gauge",
     "Seconds since uploads started failing (0 while they succeed).", "failing_for_s", 0.0),
]  # fmt: skip


def _scalars(
    out: _Exposition, families: list[tuple[str, str, str, str, float | None]], part: dict[str, Any]
) -> None:
    for name, kind, help_text, key, default in families:
        value = part.get(key)
        out.family(name, kind, help_text, [({}, default if value is None else value)])


def _source_metrics(out: _Exposition, sources: list[dict[str, Any]]) -> None:
    for name, kind, help_text, key in _SOURCE_FAMILIES:
        samples = [({"source": str(s.get("name"))}, s.get(key)) for s in sources]
        out.family(name, kind, help_text, samples)


def _buffer_metrics(out: _Exposition, buffer: dict[str, Any]) -> None:
    pending = buffer.get("pending") or {}
    out.family(
        "buffer_pending_readings",
        "gauge",
        "Readings waiting in the buffer for upload, per data source.",
        [({"datasource": str(ds)}, n) for ds, n in sorted(pending.items())],
    )
    _scalars(out, _BUFFER_SCALARS, buffer)
    drops = _drops(_part(buffer, "counters"))
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


def _upload_metrics(out: _Exposition, uploader: dict[str, Any]) -> None:
    _scalars(out, _UPLOAD_SCALARS, uploader)
    requests = uploader.get("requests") or {}
    out.family(
        "upload_requests_total",
        "counter",
        'Insert requests by HTTP status; status="error" when no answer came or none could be '
        'sent, "stalled" when the answer was not complete within timeout_s.',
        [({"status": str(s)}, n) for s, n in sorted(requests.items())],
    )
    state = _part(uploader, "uplink").get("state")
    out.family(
        "uplink_state",
        "gauge",
        'The uplink, 1 for its state: "up", "down" (nothing answers: probing every '
        'reconnect_probe_s) or "refusing" (the server answers with failures: backing off).',
        [({"state": s}, s == state) for s in _UPLINK_STATES] if state else [],
    )
    paused = uploader.get("paused") or {}
    out.family(
        "uploads_paused",
        "gauge",
        'Paused uploads, 1 per scope: a data source refused with 403, or "*" when the token '
        "is refused (401) and nothing is uploaded.",
        [({"scope": str(scope)}, 1) for scope in sorted(paused)],
    )


_UPLINK_STATES = ("up", "down", "refusing")


# -- the HTML page -----------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;
background:#f6f8fa;font-size:15px;line-height:1.4}
main{max-width:960px;margin:0 auto;padding:12px}
h1{font-size:1.3em;margin:4px 0}h2{font-size:1.1em;margin:0 0 8px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px 12px;
margin:10px 0}
.meta{color:#59636e;font-size:.9em}
.banner{padding:10px 12px;border-radius:6px;font-weight:600;color:#fff}
.ok{background:#1a7f37}.bad{background:#cf222e}.warn{background:#9a6700}
.banner ul{margin:6px 0 0;padding-left:20px;font-weight:400}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eaeef2;vertical-align:top}
.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37;font-weight:600}.down{color:#cf222e;font-weight:600}
.err{color:#cf222e;overflow-wrap:anywhere;word-break:break-word}
ul{margin:0;padding-left:18px}li{margin:0 0 6px}
.bar{background:#eaeef2;border-radius:4px;height:14px;overflow:hidden;margin:4px 0}
.bar div{background:#0969da;height:100%}
.bar div.full{background:#cf222e}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}
dt{color:#59636e}dd{margin:0;overflow-wrap:anywhere}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:10px}
svg{width:100%;height:auto;background:#fff}
"""


def render_page(doc: Snapshot, samples: list[Sample], now: float) -> str:
    """The technician's page; `now` is the wall clock for 'x ago', samples the history."""
    agent = _part(doc, "agent")
    device = agent.get("device_id") or "no device id"
    title = f"Edge agent {device}"
    body = [
        _page_header(agent, now),
        _page_health(doc, now),
        _page_sources(_sources(doc), now),
        _page_buffer(_part(doc, "buffer")),
        _page_uploads(_part(doc, "uploader"), _part(doc, "clock"), now),
        _page_charts(samples),
        _page_errors(doc.get("errors"), now),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta http-equiv="refresh" content="{PAGE_REFRESH_S}">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>",
            "<body><main>",
            *body,
            "</main></body></html>",
        ]
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page_header(agent: dict[str, Any], now: float) -> str:
    device = agent.get("device_id") or "no device id"
    uptime = agent.get("uptime_s")
    facts = [
        f"version {agent.get('version', '?')}",
        f"config {agent.get('config', '?')}",
        f"up {_duration(uptime)}" if uptime is not None else "starting",
        f"page made {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(now))}",
    ]
    return (
        f"<header><h1>Edge agent {_e(device)}</h1>"
        f'<div class="meta">{" · ".join(_e(f) for f in facts)}</div></header>'
    )


def _page_health(doc: Snapshot, now: float) -> str:
    health_part = _part(doc, "health")
    if not health_part.get("healthy"):
        items = "".join(f"<li>{_e(r)}</li>" for r in health_part.get("reasons") or [])
        return f'<section class="banner bad">Unhealthy<ul>{items}</ul></section>'
    return f'<section class="banner {_verdict_class(doc)}">{_e(verdict(doc, now))}</section>'


def _verdict_class(doc: Snapshot) -> str:
    return "warn" if _part(doc, "health").get("concerns") else "ok"


def verdict(doc: Snapshot, now: float) -> str:
    """One sentence of what is true of a status document, for the page's banner, the
    terminal and systemd: "Healthy so far: uploads failing for 17 s, unhealthy after 5 min"."""
    health_part = _part(doc, "health")
    if not health_part.get("healthy"):
        reasons = health_part.get("reasons") or ["no reason given"]
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return f"Unhealthy: {reasons[0]}{more}"
    found = health_part.get("concerns") or []
    if found:
        return "Healthy so far: " + "; ".join(found)
    sources = _sources(doc)
    read = f"{_plural(len(sources), 'source')} connected" if sources else "no sources configured"
    last = _part(doc, "uploader").get("last_success")
    upload = f"last upload {_duration(now - last)} ago" if last is not None else "no upload yet"
    return f"Healthy: {read}, {upload}"


def _page_sources(sources: list[dict[str, Any]], now: float) -> str:
    rows = [_source_row(s, now) for s in sources] or ["<tr><td colspan=4>no sources</td></tr>"]
    return (
        '<section><h2>Sources</h2><div class="scroll"><table>'
        "<tr><th>source</th><th class=n>readings</th><th class=n>parse errors</th>"
        "<th>last data</th></tr>" + "".join(rows) + "</table></div></section>"
    )


def _source_row(s: dict[str, Any], now: float) -> str:
    if s.get("connected"):
        state = '<span class="up">connected</span>'
    else:
        state = '<span class="down">not connected</span>'
    last_data = s.get("last_data")
    row = (
        f"<tr><td>{_e(s.get('name'))} <span class=meta>{_e(s.get('type', ''))}</span><br>"
        f"{state}</td><td class=n>{_e(_count(s.get('readings', 0)))}</td>"
        f"<td class=n>{_e(_count(s.get('parse_errors', 0)))}</td>"
        f"<td>{_e(_duration(now - last_data) + ' ago' if last_data else 'never')}</td></tr>"
    )
    if s.get("last_error"):  # a row of its own: long messages wrap instead of squeezing
        row += f"<tr><td colspan=4 class=err>last error: {_e(s['last_error'])}</td></tr>"
    return row


def _page_buffer(buffer: dict[str, Any]) -> str:
    file_bytes = int(buffer.get("file_bytes") or 0)
    max_bytes = int(buffer.get("max_bytes") or 0)
    percent = min(100.0, 100.0 * file_bytes / max_bytes) if max_bytes else 0.0
    full = " class=full" if percent >= 90 else ""
    pending = buffer.get("pending") or {}
    per_ds = ", ".join(f"{ds}: {_count(n)}" for ds, n in sorted(pending.items())) or "none"
    oldest = buffer.get("oldest_age_s")
    drops = _drops(_part(buffer, "counters"))
    dropped = ", ".join(f"{reason} {name}: {_count(n)}" for reason, name, n in drops) or "none"
    facts = [
        (
            "waiting",
            f"{_plural(int(buffer.get('pending_total') or 0), 'reading')} "
            f"({_bytes(buffer.get('pending_bytes') or 0)})",
        ),
        ("per data source", per_ds),
        ("oldest waiting", _duration(oldest) if oldest is not None else "nothing waits"),
        ("dead letters", _count(buffer.get("dead_letters", 0))),
        ("dropped", dropped),
    ]
    return (
        f"<section><h2>Buffer</h2><div>{_e(_bytes(file_bytes))} of {_e(_bytes(max_bytes))} "
        f"on disk ({percent:.1f} %)</div>"
        f'<div class="bar" title="{percent:.1f} %"><div{full} style="width:{percent:.1f}%">'
        f"</div></div>{_dl(facts)}</section>"
    )


def _dl(facts: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"


def _page_uploads(uploader: dict[str, Any], clock: dict[str, Any], now: float) -> str:
    requests = uploader.get("requests") or {}
    by_status = ", ".join(f"{s}: {_count(n)}" for s, n in sorted(requests.items())) or "none yet"
    failing = uploader.get("failing_for_s")
    paused = uploader.get("paused") or {}
    paused_text = "; ".join(
        f"{'every data source' if scope == '*' else 'data source ' + str(scope)}: {why}"
        for scope, why in sorted(paused.items())
    )
    facts = [
        ("uploaded", _plural(int(uploader.get("records_uploaded") or 0), "record")),
        ("uplink", _part(uploader, "uplink").get("summary") or "unknown"),
        ("last success", _when(uploader.get("last_success"), now)),
        ("failing for", _duration(failing) if failing is not None else "not failing"),
        ("last error", uploader.get("last_error") or "none"),
        ("paused", paused_text or "no"),
        ("requests", by_status),
        ("retries", _count(uploader.get("retries", 0))),
        ("failing on one record", _isolated_text(uploader)),
        ("clock", _clock_text(clock)),
    ]
    return f"<section><h2>Uploads</h2>{_dl(facts)}</section>"


def _isolated_text(uploader: dict[str, Any]) -> str:
    """Records the server fails on alone with a 5xx (isolation.py): watched, and set aside."""
    watched = int(uploader.get("suspects") or 0)
    set_aside = int(uploader.get("records_set_aside") or 0)
    if not watched and not set_aside:
        return "none"
    return (
        f"{_plural(watched, 'record')} sent alone, "
        f"{_plural(set_aside, 'record')} set aside to dead letters"
    )


def _clock_text(clock: dict[str, Any]) -> str:
    if not clock:
        return "unknown"
    trusted = "trusted" if clock.get("trusted", True) else "NOT trusted"
    offset = clock.get("offset_s")
    against = (
        f"; {offset:+.1f} s against the endpoint's time" if isinstance(offset, int | float) else ""
    )
    return f"{clock.get('state') or 'unknown'} ({trusted}{against})"


def _page_charts(samples: list[Sample]) -> str:
    depth = [(s.t, float(s.pending)) for s in samples]
    rate = [(s.t, s.rate) for s in samples if s.rate is not None]
    return (
        '<section><h2>Last hour</h2><div class="charts">'
        + svg_chart("Buffered readings", "readings", depth)
        + svg_chart("Upload rate", "records/s", rate)
        + "</div></section>"
    )


def svg_chart(title: str, unit: str, points: list[tuple[float, float]]) -> str:
    """An inline SVG line chart of (time, value) points: max value at the top, span below."""
    # A narrow viewBox keeps the 14-unit text readable when a phone scales the chart down.
    width, height, left, right, top, bottom = 400, 170, 6, 394, 30, 140
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="14">',
        f'<text x="{left}" y="18" font-weight="bold">{_e(title)}</text>',
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#8c959f"/>',
        f'<line x1="{left}" y1="{top}" x2="{right}" y2="{top}" stroke="#d0d7de" '
        'stroke-dasharray="4 4"/>',
    ]
    if not points:
        parts.append(
            f'<text x="{width // 2}" y="{(top + bottom) // 2}" text-anchor="middle" '
            'fill="#59636e">no data yet</text>'
        )
        return "".join([*parts, "</svg>"])
    first, last = points[0][0], points[-1][0]
    span = last - first
    peak = max(v for _, v in points)
    scale = peak if peak > 0 else 1.0

    def x(t: float) -> float:
        return left + (right - left) * ((t - first) / span if span > 0 else 1.0)

    def y(v: float) -> float:
        return bottom - (bottom - top) * v / scale

    coords = [(x(t), y(v)) for t, v in points]
    if len(coords) == 1:  # one sample: a flat line across, so it shows
        coords = [(left, coords[0][1]), (right, coords[0][1])]
    since = f"{_duration(span)} ago" if span > 0 else "one sample so far"
    polyline = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
    parts += [
        f'<polyline points="{polyline}" fill="none" stroke="#0969da" stroke-width="2"/>',
        f'<text x="{right}" y="{top - 4}" text-anchor="end" fill="#59636e">'
        f"max {_e(_number(peak))} {_e(unit)}</text>",
        f'<text x="{left}" y="{bottom + 18}" fill="#59636e">{_e(since)}</text>',
        f'<text x="{right}" y="{bottom + 18}" text-anchor="end" fill="#59636e">now</text>',
        f'<text x="{left + 4}" y="{bottom - 4}" fill="#8c959f">0</text>',
    ]
    return "".join([*parts, "</svg>"])


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:.2f}"


def _page_errors(errors: Any, now: float) -> str:
    items = [
        f"<li><span class=meta>{_e(_when(e.get('time'), now))} · {_e(e.get('component', ''))}"
        f"</span><br><span class=err>{_e(e.get('message', ''))}</span></li>"
        for e in reversed(errors if isinstance(errors, list) else [])
        if isinstance(e, dict)
    ]
    if not items:
        return "<section><h2>Recent errors</h2><p>none</p></section>"
    return f"<section><h2>Recent errors, newest first</h2><ul>{''.join(items)}</ul></section>"


# -- the terminal ------------------------------------------------------------------------


def render_status_text(doc: Snapshot, now: float | None = None) -> str:
    """The status document for `edge-agent status`: health, sources, buffer, uploads."""
    now = time.time() if now is None else now
    agent = _part(doc, "agent")
    health_part = _part(doc, "health")
    if doc.get("offline"):
        return _offline_text(doc, agent, health_part)
    uptime = agent.get("uptime_s")
    lines = [
        f"edge-agent {agent.get('version', '?')} on {agent.get('device_id') or 'no device id'}, "
        f"up {_duration(uptime) if uptime is not None else '?'} "
        f"(config {agent.get('config', '?')})",
        f"health: {verdict(doc, now)}" if health_part.get("healthy") else "health: UNHEALTHY",
        *(f"  - {reason}" for reason in health_part.get("reasons") or []),
        "sources:",
        *_source_lines(_sources(doc), now),
        *_buffer_lines(_part(doc, "buffer")),
        *_upload_lines(_part(doc, "uploader"), now),
        f"clock: {_clock_text(_part(doc, 'clock'))}",
        *_error_lines(doc.get("errors"), now),
    ]
    return "\n".join(lines) + "\n"


def render_status_line(doc: Snapshot, now: float) -> str:
    """The one line `systemctl status` shows (sd_notify STATUS=): the verdict, what waits in
    the buffer, and the last upload."""
    buffer = _part(doc, "buffer")
    pending = int(buffer.get("pending_total") or 0)
    oldest = buffer.get("oldest_age_s")
    waiting = _plural(pending, "reading") + " waiting"
    if pending and oldest is not None:
        waiting += f", oldest {_duration(oldest)}"
    last = _part(doc, "uploader").get("last_success")
    upload = f"last upload {_duration(now - last)} ago" if last is not None else "no upload yet"
    health_part = _part(doc, "health")
    plain = health_part.get("healthy") and not health_part.get("concerns")
    head = "Healthy" if plain else verdict(doc, now)
    return f"{head}; {waiting}; {upload}"


def _offline_text(doc: Snapshot, agent: dict[str, Any], health_part: dict[str, Any]) -> str:
    """What the buffer alone can tell: no live facts, so no health verdict either."""
    counters = _part(doc, "buffer").get("counters") or {}
    uploaded = sum(n for k, n in counters.items() if k.startswith("uploaded."))
    lines = [
        f"edge-agent (config {agent.get('config', '?')}): no answer from a running agent",
        *(f"  - {reason}" for reason in health_part.get("reasons") or []),
        "health: unknown; what the buffer says:",
        *_buffer_lines(_part(doc, "buffer")),
        f"uploaded so far (all runs): {_count(uploaded)} records",
    ]
    return "\n".join(lines) + "\n"


def _source_lines(sources: list[dict[str, Any]], now: float) -> list[str]:
    if not sources:
        return ["  (none configured)"]
    lines = []
    for s in sources:
        last_data = s.get("last_data")
        line = (
            f"  {s.get('name')} ({s.get('type', '?')}): "
            f"{'connected' if s.get('connected') else 'NOT CONNECTED'}, "
            f"{_plural(int(s.get('readings') or 0), 'reading')}, "
            f"{_plural(int(s.get('parse_errors') or 0), 'parse error')}, "
            f"{_plural(int(s.get('reconnects') or 0), 'reconnect')}, last data "
            + (f"{_duration(now - last_data)} ago" if last_data else "never")
        )
        if s.get("last_error"):
            line += f"; last error: {s['last_error']}"
        lines.append(line)
    return lines


def _buffer_lines(buffer: dict[str, Any]) -> list[str]:
    file_bytes = int(buffer.get("file_bytes") or 0)
    max_bytes = int(buffer.get("max_bytes") or 0)
    percent = 100.0 * file_bytes / max_bytes if max_bytes else 0.0
    oldest = buffer.get("oldest_age_s")
    line = (
        f"buffer: {_plural(int(buffer.get('pending_total') or 0), 'reading')} waiting "
        f"({_bytes(buffer.get('pending_bytes') or 0)})"
        + (f", oldest {_duration(oldest)}" if oldest is not None else "")
        + f"; {_bytes(file_bytes)} of {_bytes(max_bytes)} on disk ({percent:.1f} %); "
        f"{_plural(int(buffer.get('dead_letters') or 0), 'dead letter')}"
    )
    drops = _drops(_part(buffer, "counters"))
    if not drops:
        return [line]
    return [line, "  dropped: " + ", ".join(f"{r} {name} {_count(n)}" for r, name, n in drops)]


def _upload_lines(uploader: dict[str, Any], now: float) -> list[str]:
    requests = uploader.get("requests") or {}
    by_status = " ".join(f"{s}:{n}" for s, n in sorted(requests.items())) or "none"
    lines = [
        f"uploads: {_plural(int(uploader.get('records_uploaded') or 0), 'record')}, "
        f"requests {by_status}, {_plural(int(uploader.get('retries') or 0), 'retry', 'retries')}; "
        f"last success {_when(uploader.get('last_success'), now)}"
    ]
    uplink = _part(uploader, "uplink").get("summary")
    if uplink:
        lines.append(f"  uplink: {uplink}")
    if uploader.get("failing_for_s") is not None:
        lines.append(f"  failing for {_duration(uploader['failing_for_s'])}")
    if uploader.get("last_error"):
        lines.append(f"  last error: {uploader['last_error']}")
    if uploader.get("suspects") or uploader.get("records_set_aside"):
        lines.append(f"  the server fails on records alone: {_isolated_text(uploader)}")
    for scope, why in sorted((uploader.get("paused") or {}).items()):
        target = "every data source" if scope == "*" else f"data source {scope}"
        lines.append(f"  paused for {target}: {why}")
    return lines


def _error_lines(errors: Any, now: float) -> list[str]:
    recent = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    if not recent:
        return []
    return ["recent errors (newest last):"] + [
        f"  {_when(e.get('time'), now)} {e.get('component', '?')}: {e.get('message', '')}"
        for e in recent[-5:]
    ]


# -- the server --------------------------------------------------------------------------

_LISTEN = re.compile(r"(?P<host>\[[^\]\s]+\]|[^\s:\[\]]*):(?P<port>[0-9]{1,5})")


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:9108') -> (host, port); ValueError says what is expected."""
    match = _LISTEN.fullmatch(listen.strip()) if isinstance(listen, str) else None
    example = "host:port, e.g. 127.0.0.1:9108 (this machine only) or 0.0.0.0:9108 (every network)"
    if match is None:
        raise ValueError(f"status listen address {listen!r} is not {example}")
    host, port = match["host"].strip("[]"), int(match["port"])
    if not host:
        raise ValueError(f"status listen address {listen!r} has no host; expected {example}")
    if port > 65535:
        raise ValueError(
            f"status listen address {listen!r}: port {port} is out of range 0-65535 "
            "(0 picks a free port)"
        )
    return host, port


@dataclass(frozen=True)
class _Answer:
    status: int
    content_type: str
    body: bytes


def _json_answer(status: int, doc: Any) -> _Answer:
    text = json.dumps(doc, ensure_ascii=False, default=str)
    return _Answer(status, "application/json", text.encode())


def _text_answer(status: int, text: str) -> _Answer:
    return _Answer(status, "text/plain; charset=utf-8", text.encode())


class StatusServer:
    """Serves /, /healthz, /metrics and /status.json. Lifecycle: new -> start() -> stop()."""

    def __init__(
        self,
        listen: str,
        snapshot: Callable[[], Snapshot],
        unhealthy_after_s: float = 300.0,
        history: History | None = None,
    ) -> None:
        self.listen = listen
        self._address = parse_listen(listen)
        self._snapshot = snapshot
        self.unhealthy_after_s = unhealthy_after_s
        self.history = history if history is not None else History()
        self._stop = threading.Event()
        self._state = "new"
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._failure_lock = threading.Lock()
        self._failure: str | None = None  # the failure already logged, until snapshots work

    # lifecycle

    def start(self) -> StatusServer:
        if self._state != "new":
            raise RuntimeError(f"this StatusServer is {self._state}; make a new one")
        self._server = _bind(self._address, self.listen, self)
        self._threads = [
            threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},  # stop() waits up to one poll interval
                name=f"status:{self.port}",
                daemon=True,
            ),
            threading.Thread(target=self._sample_loop, name="status-sampler", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._state = "running"
        log.info("status: serving %s (/, /healthz, /metrics, /status.json)", self.url)
        return self

    def stop(self) -> None:
        if self._state == "running":
            assert self._server is not None
            self._stop.set()
            self._server.shutdown()
            self._server.server_close()
            for thread in self._threads:
                thread.join()
        self._state = "stopped"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the status server has no port until start()")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._address[0]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"  # a client cannot dial the wildcard address
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    # work

    def answer(self, path: str) -> _Answer:
        """The answer to GET `path`; never raises (a failure is a 500 that says why)."""
        render = _ROUTES.get(path)
        if render is None:
            return _text_answer(404, f"no page {path}; try /, /healthz, /metrics or /status.json\n")
        try:
            doc = status_document(self._take_snapshot(), self.unhealthy_after_s)
            answer = render(self, doc)
        except Exception as exc:  # the boundary: answer 500 rather than drop the connection
            self._note_failure(exc)
            return _text_answer(
                500, f"the agent could not report its status: {type(exc).__name__}: {exc}\n"
            )
        self._note_success()
        return answer

    def _take_snapshot(self) -> Snapshot:
        doc = self._snapshot()
        if not isinstance(doc, dict):
            raise TypeError(f"snapshot() returned {type(doc).__name__}, not a dict")
        return doc

    def _note_failure(self, exc: Exception) -> None:
        key = f"{type(exc).__name__}: {exc}"
        with self._failure_lock:
            if key == self._failure:
                return
            self._failure = key
        log.error(
            "status: cannot build the agent's status (%s); answering 500 until it works again",
            key,
            exc_info=exc,
        )

    def _note_success(self) -> None:
        with self._failure_lock:
            recovered, self._failure = self._failure is not None, None
        if recovered:
            log.info("status: the agent's status can be built again")

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                snapshot = self._take_snapshot()
            except Exception as exc:  # logged once; the next interval tries again
                self._note_failure(exc)
            else:
                self.history.sample(snapshot, time.monotonic())
            self._stop.wait(self.history.interval_s)

    def _page(self, doc: Snapshot) -> _Answer:
        page = render_page(doc, self.history.samples(), time.time())
        return _Answer(200, "text/html; charset=utf-8", page.encode())

    def _healthz(self, doc: Snapshot) -> _Answer:
        health_part = doc["health"]
        if health_part["healthy"]:
            return _json_answer(200, {"status": "ok"})
        return _json_answer(503, {"status": "unhealthy", "reasons": health_part["reasons"]})

    def _metrics(self, doc: Snapshot) -> _Answer:
        text = render_metrics(doc, ProcessStats.read())
        return _Answer(200, METRICS_CONTENT_TYPE, text.encode())

    def _status_json(self, doc: Snapshot) -> _Answer:
        return _json_answer(200, doc)


_ROUTES: dict[str, Callable[[StatusServer, Snapshot], _Answer]] = {
    "/": StatusServer._page,
    "/healthz": StatusServer._healthz,
    "/metrics": StatusServer._metrics,
    "/status.json": StatusServer._status_json,
}


def _bind(address: tuple[str, int], listen: str, status: StatusServer) -> _Server:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        return _Server(address, status, family)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            why = f"cannot resolve the host ({why})"
        elif exc.errno == errno.EADDRINUSE:
            why = "the address is already in use (another agent or program listens there)"
        raise EdgeAgentError(f"status page: cannot listen on {listen}: {why}") from exc


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], status: StatusServer, family: int) -> None:
        self.address_family = family
        self.status = status
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up with getfqdn, which can hang for seconds
        # on a gateway without DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("status: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = SERVER_NAME  # `fetch_status` tells the agent from another program by it
    timeout = 10  # a client that connects and sends nothing cannot pin a thread

    def do_GET(self) -> None:
        self._reply(with_body=True)

    def do_HEAD(self) -> None:
        self._reply(with_body=False)

    def _reply(self, with_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        answer = self.server.status.answer(path)
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status: %s " + format, self.address_string(), *args)


# -- the client --------------------------------------------------------------------------


def status_json_url(url: str) -> str:
    """Where a running agent's /status.json is, from its status URL or listen address."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
    path = parts.path.rstrip("/")
    if not path.endswith("/status.json"):
        path += "/status.json"
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


def fetch_status(url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """A running agent's status document, or None if nothing listens at `url`.

    Another program answering there (not the agent's `Server` header and not its document)
    raises ForeignStatusError; other failures (a timeout, a 500) raise EdgeAgentError saying
    what happened. At most MAX_STATUS_BYTES of the answer are read.
    """
    target = status_json_url(url)
    try:
        # trust_env=False: the agent is local, a proxy from the environment must not relay it.
        with httpx.stream("GET", target, timeout=timeout, trust_env=False) as response:
            body = _read_capped(response, MAX_STATUS_BYTES)
    except httpx.ConnectError:
        return None
    except httpx.TimeoutException:
        raise EdgeAgentError(
            f"the status page {target} did not answer within {timeout:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise EdgeAgentError(f"cannot read the status page {target}: {exc}") from exc
    ours = response.headers.get("Server", "").startswith(SERVER_NAME)
    doc = _json_dict(body)
    if response.status_code == 200 and doc is not None and _is_agent_status(doc):
        return doc
    if ours and response.status_code != 200:
        text = body[:300].decode("utf-8", "replace")
        raise EdgeAgentError(f"the status page {target} answered {response.status_code}: {text}")
    kind = response.headers.get("Content-Type") or "no content type"
    first = json.dumps(body[:60].decode("utf-8", "replace"))
    raise ForeignStatusError(
        f"another program answers on {target} ({response.status_code}, {kind}, first bytes "
        f"{first}): it is not the agent's status endpoint"
    )


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            break  # not a status document of ours; closing drops the rest
    return bytes(body)


def _json_dict(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_agent_status(doc: dict[str, Any]) -> bool:
    """Shaped like the document `status_document` makes (also an agent too old to send its
    Server header): the renderers can read it."""
    agent, health_part = doc.get("agent"), doc.get("health")
    return (
        isinstance(agent, dict)
        and isinstance(health_part, dict)
        and isinstance(health_part.get("healthy"), bool)
        and isinstance(health_part.get("reasons", []), list)
    )
