"""The health rules: which facts of a snapshot make the agent unhealthy, in plain sentences,
and the one-sentence verdict the page's banner, the terminal and systemd show."""

from __future__ import annotations

from collections.abc import Iterable

from edge_agent.status import human
from edge_agent.status.snapshot import Health, Snapshot, Status


def health(snapshot: Snapshot, unhealthy_after_s: float) -> tuple[bool, list[str]]:
    """(healthy, reasons): each reason is one sentence saying what is wrong and what it means."""
    reasons = [
        *_source_reasons(snapshot),
        *_upload_reasons(snapshot, unhealthy_after_s),
        *_clock_reasons(snapshot),
    ]
    return not reasons, reasons


def _source_reasons(snapshot: Snapshot) -> Iterable[str]:
    for source in snapshot.sources:
        if source.connected:
            continue
        kind = source.type
        name = f"{kind} source {source.name}" if kind else f"source {source.name}"
        if source.last_error:
            yield f"{name} is not connected: {source.last_error}"
        else:
            yield f"{name} is not connected (no error reported yet)"


def _upload_reasons(snapshot: Snapshot, unhealthy_after_s: float) -> Iterable[str]:
    uploader = snapshot.uploader
    failing = uploader.failing_for_s
    if failing is not None and failing > unhealthy_after_s:
        last = uploader.last_error or "no error text"
        yield (
            f"uploads have been failing for {human.duration(failing)} (last error: {last}); "
            "readings are kept in the buffer and retried"
        )
    for scope, why in sorted(uploader.paused.items()):
        if scope == "*":
            yield f"uploads are stopped for every data source: {why}"
        else:
            yield f"uploads to data source {scope} are paused: {why}"


def _clock_reasons(snapshot: Snapshot) -> Iterable[str]:
    clock = snapshot.clock
    if not clock.trusted and not clock.confirming:
        state = clock.state or "unknown"
        yield (
            f"the system clock is not trusted (state: {state}), so new readings cannot be "
            "stamped reliably; check that NTP can reach a time server"
        )


def concerns(snapshot: Snapshot, unhealthy_after_s: float) -> list[str]:
    """What is going wrong but has not made the agent unhealthy yet, one phrase each: a
    healthy verdict must not read as "all is well" while every upload fails."""
    failing = snapshot.uploader.failing_for_s
    if failing is None or failing > unhealthy_after_s:
        return []
    return [
        f"uploads failing for {human.duration(failing)}, "
        f"unhealthy after {human.duration(unhealthy_after_s)}"
    ]


def status_document(snapshot: Snapshot, unhealthy_after_s: float) -> Status:
    """The snapshot plus its health: what /status.json serves and every renderer reads."""
    healthy, reasons = health(snapshot, unhealthy_after_s)
    found = concerns(snapshot, unhealthy_after_s) if healthy else []
    return Status(snapshot, Health(healthy, tuple(reasons), tuple(found)))


def verdict(doc: Status, now: float) -> str:
    """One sentence of what is true of a status document, for the page's banner, the
    terminal and systemd: "Healthy so far: uploads failing for 17 s, unhealthy after 5 min"."""
    verdict_ = doc.health
    if not verdict_.healthy:
        reasons = verdict_.reasons or ("no reason given",)
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return f"Unhealthy: {reasons[0]}{more}"
    if verdict_.concerns:
        return "Healthy so far: " + "; ".join(verdict_.concerns)
    sources = doc.snapshot.sources
    read = (
        f"{human.plural(len(sources), 'source')} connected" if sources else "no sources configured"
    )
    return f"Healthy: {read}, {last_upload(doc.snapshot, now)}"


def last_upload(snapshot: Snapshot, now: float) -> str:
    last = snapshot.uploader.last_success
    return f"last upload {human.duration(now - last)} ago" if last is not None else "no upload yet"
