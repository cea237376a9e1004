"""Figures in words, shared by the page, the terminal text and the health rules."""

from __future__ import annotations

from collections.abc import Mapping

from edge_agent.clock import brief_utc
from edge_agent.status.snapshot import BudgetPart, ClockPart, DrainPart, UploaderPart


def duration(seconds: float) -> str:
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


def size(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def count(n: int) -> str:
    return f"{n:,}"


def when(wall: float | None, now: float) -> str:
    if wall is None:
        return "never"
    return f"{stamp(wall)} ({duration(now - wall)} ago)"


def stamp(wall: float) -> str:
    """`2025-01-01 12:00:00Z`: clock.py owns the time formats."""
    return brief_utc(wall)


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{count(n)} {word if n == 1 else words or word + 's'}"


def drops(counters: Mapping[str, int]) -> list[tuple[str, str, int]]:
    """(reason, name, count) of every dropped.<reason>.<name> counter."""
    out = []
    for key, value in sorted(counters.items()):
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == "dropped":
            out.append((parts[1], parts[2], int(value)))
    return out


def scope(name: str) -> str:
    """A paused scope: a data source id, or "*" for all of them."""
    return "every data source" if name == "*" else f"data source {name}"


def isolated(uploader: UploaderPart) -> str:
    """Records the server fails on alone with a 5xx (isolation.py): watched, and set aside."""
    watched, set_aside = uploader.suspects, uploader.records_set_aside
    if not watched and not set_aside:
        return "none"
    return (
        f"{plural(watched, 'record')} sent alone, "
        f"{plural(set_aside, 'record')} set aside to dead letters"
    )


def clock(part: ClockPart) -> str:
    trusted = "trusted" if part.trusted else "NOT trusted"
    offset = part.offset_s
    against = f"; {offset:+.1f} s against the endpoint's time" if offset is not None else ""
    return f"{part.state or 'unknown'} ({trusted}{against})"


def backlog(drain: DrainPart) -> str:
    """`12,000 readings older than 60 s, oldest 3 h 2 min; about 4 min to drain at 50/s`."""
    order = "live first" if drain.mode == "live_first" else "oldest first"
    if drain.backlog_readings == 0:
        return f"none ({order})"
    text = f"{plural(drain.backlog_readings, 'reading')} older than {duration(drain.live_window_s)}"
    if drain.oldest_backlog_age_s is not None:
        text += f", oldest {duration(drain.oldest_backlog_age_s)}"
    if drain.eta_s is not None and drain.rate_per_s:
        text += f"; about {duration(drain.eta_s)} to drain at {drain.rate_per_s:,.0f}/s"
    else:
        text += "; not draining now"
    return f"{text} ({order})"


def budget(part: BudgetPart) -> str:
    """`3.1 MiB of 476.8 MiB used today (UTC); resets in 5 h 3 min`."""
    if part.limit is None:
        return f"no limit; {size(part.used)} sent today (UTC)"
    text = f"{size(part.used)} of {size(part.limit)} used today (UTC)"
    if part.spent:
        text += "; SPENT: readings wait"
    elif part.waiting:
        text += "; the backlog waits, the rest is kept for high-priority and live readings"
    return f"{text}; resets in {duration(part.resets_in_s)}"
