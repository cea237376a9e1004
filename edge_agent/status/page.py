"""The technician's page: the status document as HTML, with two charts of the last hour.

The markup and the CSS are package resources (page.html, page.css) read with
importlib.resources; this module only fills their fragments. Every value is HTML-escaped
unless it is `Markup` made from a fragment, so text from devices and servers cannot inject.
"""

from __future__ import annotations

import functools
import html
import re
import string
from collections.abc import Iterable
from importlib import resources

from edge_agent.status import human
from edge_agent.status.health import verdict
from edge_agent.status.history import Sample
from edge_agent.status.snapshot import (
    BufferPart,
    ErrorPart,
    Snapshot,
    SourcePart,
    Status,
)

PAGE_REFRESH_S = 10


class Markup(str):
    """Text that is already HTML: filled in as it is."""


@functools.cache
def _fragments() -> dict[str, string.Template]:
    text = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    parts = re.split(r"^<!--@ (\w+) -->\n", text, flags=re.MULTILINE)
    return {
        name: string.Template(body.rstrip("\n"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


@functools.cache
def _css() -> str:
    return resources.files(__package__).joinpath("page.css").read_text(encoding="utf-8")


def fill(fragment: str, /, **values: object) -> Markup:
    """The fragment with its $fields filled, each escaped unless it is Markup."""
    escaped = {k: v if isinstance(v, Markup) else html.escape(str(v)) for k, v in values.items()}
    return Markup(_fragments()[fragment].substitute(escaped))


def _join(parts: Iterable[Markup], separator: str = "") -> Markup:
    return Markup(separator.join(parts))


def render_page(doc: Status, samples: list[Sample], now: float) -> str:
    """The technician's page; `now` is the wall clock for 'x ago', samples the history."""
    snap = doc.snapshot
    body = [
        _header(doc, now),
        _health(doc, now),
        _sources(snap.sources, now),
        _buffer(snap.buffer),
        _uploads(snap, now),
        _charts(samples),
        _errors(snap.errors, now),
    ]
    title = f"Edge agent {snap.agent.device_id or 'no device id'}"
    return fill(
        "page", refresh=PAGE_REFRESH_S, title=title, css=Markup(_css()), body=_join(body, "\n")
    )


def _header(doc: Status, now: float) -> Markup:
    agent = doc.snapshot.agent
    facts = [
        f"version {agent.version}",
        f"config {agent.config}",
        f"up {human.duration(agent.uptime_s)}",
        f"page made {human.stamp(now)}",
    ]
    return fill(
        "header",
        device=agent.device_id or "no device id",
        facts=Markup(" · ".join(html.escape(f) for f in facts)),
    )


def _health(doc: Status, now: float) -> Markup:
    if not doc.health.healthy:
        reasons = _join(fill("item", text=r) for r in doc.health.reasons)
        return fill("unhealthy", reasons=reasons)
    kind = "warn" if doc.health.concerns else "ok"
    return fill("banner", kind=kind, text=verdict(doc, now))


def _sources(sources: tuple[SourcePart, ...], now: float) -> Markup:
    rows = [_source_row(s, now) for s in sources] or [fill("no_sources")]
    return fill("sources", rows=_join(rows))


def _source_row(s: SourcePart, now: float) -> Markup:
    row = fill(
        "source",
        name=s.name,
        type=s.type,
        state_class="up" if s.connected else "down",
        state="connected" if s.connected else "not connected",
        readings=human.count(s.readings),
        parse_errors=human.count(s.parse_errors),
        last_data=human.duration(now - s.last_data) + " ago" if s.last_data else "never",
    )
    if s.last_error:  # a row of its own: long messages wrap instead of squeezing
        row = Markup(row + fill("source_error", error=s.last_error))
    return row


def _buffer(buffer: BufferPart) -> Markup:
    percent = min(100.0, 100.0 * buffer.file_bytes / buffer.max_bytes) if buffer.max_bytes else 0.0
    per_ds = ", ".join(f"{ds}: {human.count(n)}" for ds, n in sorted(buffer.pending.items()))
    oldest = buffer.oldest_age_s
    drops = human.drops(buffer.counters)
    dropped = ", ".join(f"{reason} {name}: {human.count(n)}" for reason, name, n in drops)
    facts = [
        (
            "waiting",
            f"{human.plural(buffer.pending_total, 'reading')} ({human.size(buffer.pending_bytes)})",
        ),
        ("per data source", per_ds or "none"),
        ("oldest waiting", human.duration(oldest) if oldest is not None else "nothing waits"),
        ("dead letters", human.count(buffer.dead_letters)),
        ("dropped", dropped or "none"),
    ]
    return fill(
        "buffer",
        file_bytes=human.size(buffer.file_bytes),
        max_bytes=human.size(buffer.max_bytes),
        percent=f"{percent:.1f}",
        fill="full" if percent >= 90 else "",
        facts=_facts(facts),
    )


def _facts(facts: list[tuple[str, str]]) -> Markup:
    return fill("facts", facts=_join(fill("fact", name=k, value=v) for k, v in facts))


def _uploads(snap: Snapshot, now: float) -> Markup:
    uploader = snap.uploader
    by_status = ", ".join(f"{s}: {human.count(n)}" for s, n in sorted(uploader.requests.items()))
    failing = uploader.failing_for_s
    paused = "; ".join(
        f"{human.scope(scope)}: {why}" for scope, why in sorted(uploader.paused.items())
    )
    uplink = uploader.uplink.summary if uploader.uplink is not None else ""
    facts = [
        ("uploaded", human.plural(uploader.records_uploaded, "record")),
        ("uplink", uplink or "unknown"),
        ("last success", human.when(uploader.last_success, now)),
        ("failing for", human.duration(failing) if failing is not None else "not failing"),
        ("last error", uploader.last_error or "none"),
        ("paused", paused or "no"),
        ("requests", by_status or "none yet"),
        ("retries", human.count(uploader.retries)),
        ("failing on one record", human.isolated(uploader)),
        ("clock", human.clock(snap.clock)),
    ]
    if snap.drain is not None:
        facts.insert(1, ("backlog", human.backlog(snap.drain)))
    if snap.budget is not None:
        facts.insert(2, ("byte budget", human.budget(snap.budget)))
    return fill("uploads", facts=_facts(facts))


def _charts(samples: list[Sample]) -> Markup:
    depth = [(s.t, float(s.pending)) for s in samples]
    rate = [(s.t, s.rate) for s in samples if s.rate is not None]
    charts = svg_chart("Buffered readings", "readings", depth) + svg_chart(
        "Upload rate", "records/s", rate
    )
    return fill("charts", charts=Markup(charts))


def svg_chart(title: str, unit: str, points: list[tuple[float, float]]) -> Markup:
    """An inline SVG line chart of (time, value) points: max value at the top, span below."""
    # A narrow viewBox keeps the 14-unit text readable when a phone scales the chart down.
    width, height, left, right, top, bottom = 400, 170, 6, 394, 30, 140
    frame = {"width": width, "height": height, "left": left, "right": right}
    frame.update(top=top, bottom=bottom)
    if not points:
        plot = fill("no_data", x=width // 2, y=(top + bottom) // 2)
        return fill("chart", title=title, plot=plot, **frame)
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
    plot = fill(
        "plot",
        points=" ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords),
        right=right,
        left=left,
        above_top=top - 4,
        below=bottom + 18,
        peak=_number(peak),
        unit=unit,
        since=f"{human.duration(span)} ago" if span > 0 else "one sample so far",
        zero_x=left + 4,
        zero_y=bottom - 4,
    )
    return fill("chart", title=title, plot=plot, **frame)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:.2f}"


def _errors(errors: tuple[ErrorPart, ...], now: float) -> Markup:
    if not errors:
        return fill("no_errors")
    items = (
        fill("error", when=human.when(e.time, now), component=e.component, message=e.message)
        for e in reversed(errors)
    )
    return fill("errors", items=_join(items))
