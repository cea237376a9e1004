"""The status document as text: what `edge-agent status` prints, and the one STATUS= line
`systemctl status` shows."""

from __future__ import annotations

import time

from edge_agent.status import human
from edge_agent.status.health import last_upload, verdict
from edge_agent.status.snapshot import (
    BufferPart,
    ErrorPart,
    OfflineStatus,
    SourcePart,
    Status,
    UploaderPart,
)


def render_status_text(doc: Status | OfflineStatus, now: float | None = None) -> str:
    """The status document for `edge-agent status`: health, sources, buffer, uploads."""
    now = time.time() if now is None else now
    if isinstance(doc, OfflineStatus):
        return _offline_text(doc)
    snap = doc.snapshot
    agent = snap.agent
    lines = [
        f"edge-agent {agent.version} on {agent.device_id or 'no device id'}, "
        f"up {human.duration(agent.uptime_s)} (config {agent.config})",
        f"health: {verdict(doc, now)}" if doc.health.healthy else "health: UNHEALTHY",
        *(f"  - {reason}" for reason in doc.health.reasons),
        "sources:",
        *_source_lines(snap.sources, now),
        *_buffer_lines(snap.buffer),
        *_upload_lines(snap.uploader, now),
        *([f"  backlog: {human.backlog(snap.drain)}"] if snap.drain else []),
        *([f"  byte budget: {human.budget(snap.budget)}"] if snap.budget else []),
        f"clock: {human.clock(snap.clock)}",
        *_error_lines(snap.errors, now),
    ]
    return "\n".join(lines) + "\n"


def render_status_line(doc: Status, now: float) -> str:
    """The one line `systemctl status` shows (sd_notify STATUS=): the verdict, what waits in
    the buffer, and the last upload."""
    buffer = doc.snapshot.buffer
    waiting = human.plural(buffer.pending_total, "reading") + " waiting"
    if buffer.pending_total and buffer.oldest_age_s is not None:
        waiting += f", oldest {human.duration(buffer.oldest_age_s)}"
    plain = doc.health.healthy and not doc.health.concerns
    head = "Healthy" if plain else verdict(doc, now)
    return f"{head}; {waiting}; {last_upload(doc.snapshot, now)}"


def _offline_text(doc: OfflineStatus) -> str:
    """What the buffer alone can tell: no live facts, so no health verdict either."""
    lines = [
        f"edge-agent (config {doc.config}): no answer from a running agent",
        *(f"  - {reason}" for reason in doc.reasons),
        "health: unknown; what the buffer says:",
    ]
    # The buffer could not be read (the reasons say why): its figures read as zeros.
    buffer = doc.buffer if doc.buffer is not None else BufferPart.from_json({})
    uploaded = sum(n for k, n in buffer.counters.items() if k.startswith("uploaded."))
    lines += _buffer_lines(buffer)
    lines.append(f"uploaded so far (all runs): {human.count(uploaded)} records")
    return "\n".join(lines) + "\n"


def _source_lines(sources: tuple[SourcePart, ...], now: float) -> list[str]:
    if not sources:
        return ["  (none configured)"]
    lines = []
    for s in sources:
        line = (
            f"  {s.name} ({s.type}): "
            f"{'connected' if s.connected else 'NOT CONNECTED'}, "
            f"{human.plural(s.readings, 'reading')}, "
            f"{human.plural(s.parse_errors, 'parse error')}, "
            f"{human.plural(s.reconnects, 'reconnect')}, last data "
            + (f"{human.duration(now - s.last_data)} ago" if s.last_data else "never")
        )
        if s.last_error:
            line += f"; last error: {s.last_error}"
        lines.append(line)
    return lines


def _buffer_lines(buffer: BufferPart) -> list[str]:
    percent = 100.0 * buffer.file_bytes / buffer.max_bytes if buffer.max_bytes else 0.0
    oldest = buffer.oldest_age_s
    line = (
        f"buffer: {human.plural(buffer.pending_total, 'reading')} waiting "
        f"({human.size(buffer.pending_bytes)})"
        + (f", oldest {human.duration(oldest)}" if oldest is not None else "")
        + f"; {human.size(buffer.file_bytes)} of {human.size(buffer.max_bytes)} on disk "
        f"({percent:.1f} %); {human.plural(buffer.dead_letters, 'dead letter')}"
    )
    drops = human.drops(buffer.counters)
    if not drops:
        return [line]
    listed = ", ".join(f"{r} {name} {human.count(n)}" for r, name, n in drops)
    return [line, "  dropped: " + listed]


def _upload_lines(uploader: UploaderPart, now: float) -> list[str]:
    by_status = " ".join(f"{s}:{n}" for s, n in sorted(uploader.requests.items())) or "none"
    retries = human.plural(uploader.retries, "retry", "retries")
    lines = [
        f"uploads: {human.plural(uploader.records_uploaded, 'record')}, "
        f"requests {by_status}, {retries}; "
        f"last success {human.when(uploader.last_success, now)}"
    ]
    if uploader.uplink is not None and uploader.uplink.summary:
        lines.append(f"  uplink: {uploader.uplink.summary}")
    if uploader.failing_for_s is not None:
        lines.append(f"  failing for {human.duration(uploader.failing_for_s)}")
    if uploader.last_error:
        lines.append(f"  last error: {uploader.last_error}")
    if uploader.suspects or uploader.records_set_aside:
        lines.append(f"  the server fails on records alone: {human.isolated(uploader)}")
    for scope, why in sorted(uploader.paused.items()):
        lines.append(f"  paused for {human.scope(scope)}: {why}")
    return lines


def _error_lines(errors: tuple[ErrorPart, ...], now: float) -> list[str]:
    if not errors:
        return []
    return ["recent errors (newest last):"] + [
        f"  {human.when(e.time, now)} {e.component}: {e.message}" for e in errors[-5:]
    ]
