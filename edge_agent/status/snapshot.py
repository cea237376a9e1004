"""The status snapshot: what the agent tells about itself, as typed frozen parts.

`agent.snapshot()` builds a `Snapshot` in one place; the health rules, the history and every
renderer read its attributes, and mypy checks both ends. `to_json()` gives the document that
`/status.json` and `edge-agent status --json` serve (a public interface: its keys stay), and
`from_json()` reads it back where it crosses the network (`edge-agent status` asks a running
agent), checking each value's type against the part's annotation.

    Snapshot       agent, sources, buffer, uploader, clock, errors (+ optional parts)
    Health         the verdict the rules in `health.py` give on a snapshot
    Status         a snapshot with its health: what the server serves and renderers read
    OfflineStatus  what `edge-agent status` can say from the buffer alone

Adding a part (a drain view, a byte budget): a frozen dataclass of plain fields, one line in
`Snapshot` (`drain: DrainPart | None = field(default=None, metadata=OPTIONAL)`), and filling it in
`agent.snapshot()`. An optional part left at None is not in the JSON, so the document of an
agent without it keeps its shape; the JSON reader needs nothing new.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from edge_agent.uplink import UplinkView

if TYPE_CHECKING:
    from edge_agent.buffer import BufferStats

Json = dict[str, Any]
# The metadata of a Snapshot field that may be absent: left out of the JSON while None.
#     drain: DrainPart | None = field(default=None, metadata=OPTIONAL)
OPTIONAL: Mapping[str, bool] = types.MappingProxyType({"optional part": True})


class SnapshotFormatError(ValueError):
    """A status document whose value at `path` is missing or of the wrong type."""


class Part:
    """JSON both ways for a frozen dataclass of plain fields and other parts."""

    def to_json(self) -> Json:
        out: Json = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional part"):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, doc: Any) -> Self:
        """The part from its JSON; a missing key reads as the field's default, else as its
        type's empty value (an older agent did not say); a wrong type raises
        SnapshotFormatError naming where."""
        return typing.cast(Self, _read(cls, doc, cls.__name__))


def _plain(value: Any) -> Any:
    if isinstance(value, Part):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# -- the parts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentPart(Part):
    version: str
    device_id: str | None
    config: str
    # Which buffer this agent owns: `edge-agent status` checks that the agent answering on
    # the status address is the one of its config. None: an agent too old to say.
    buffer: str | None
    uptime_s: float


@dataclass(frozen=True)
class SourcePart(Part):
    name: str
    type: str
    connected: bool
    lines: int  # lines or messages received
    readings: int  # readings emitted
    parse_errors: int
    reconnects: int
    timeouts: int  # polls or requests the device did not answer in time
    missed_polls: int  # polls that could not start on time
    last_error: str | None
    last_data: float | None  # wall clock of the last line or message


@dataclass(frozen=True)
class DatasourcePart(Part):
    """One data source's pending readings."""

    pending: int
    bytes: int
    oldest_age_s: float | None


@dataclass(frozen=True)
class BufferPart(Part):
    pending: dict[str, int]  # data source -> readings waiting
    pending_total: int
    pending_bytes: int
    held: int  # readings waiting for a trusted clock
    oldest_age_s: float | None
    datasources: dict[str, DatasourcePart]
    file_bytes: int
    max_bytes: int
    dead_letters: int
    counters: dict[str, int]  # dropped.<reason>.<name>, uploaded.<ds>, ...

    @classmethod
    def of(cls, stats: BufferStats, max_bytes: int, now: float) -> BufferPart:
        """From the buffer's `BufferStats` at wall time `now`."""
        return cls(
            pending=dict(stats.pending),
            pending_total=sum(stats.pending.values()),
            pending_bytes=stats.pending_bytes,
            held=stats.held,
            oldest_age_s=_age(stats.oldest_created, now),
            datasources={
                ds: DatasourcePart(t.readings, t.bytes, _age(t.oldest_created, now))
                for ds, t in stats.datasources.items()
            },
            file_bytes=stats.file_bytes,
            max_bytes=max_bytes,
            dead_letters=stats.dead_letters,
            counters=dict(stats.counters),
        )


def _age(created: float | None, now: float) -> float | None:
    return None if created is None else max(0.0, now - created)


@dataclass(frozen=True)
class UploaderPart(Part):
    records_uploaded: int
    requests: dict[str, int]  # by HTTP status, "error", "stalled"
    retries: int
    last_success: float | None  # wall clock
    last_error: str | None
    failing_for_s: float | None  # None while uploads succeed
    paused: dict[str, str]  # data source or "*" -> why
    uplink: UplinkView | None  # None: an agent too old to say
    records_set_aside: int  # records the server failed on alone, set aside
    suspects: int  # records sent alone now


@dataclass(frozen=True)
class DrainPart(Part):
    """The backlog: pending readings accepted before the live window (drain.py)."""

    mode: str  # "live_first" or "oldest_first"
    live_window_s: float
    backlog_readings: int
    oldest_backlog_age_s: float | None
    rate_per_s: float | None  # backlog readings delivered per second lately
    eta_s: float | None  # time to drain the backlog at that rate; None: nothing measured


@dataclass(frozen=True)
class BudgetPart(Part):
    """The daily byte budget (budget.py): bytes on the wire this UTC day."""

    limit: int | None  # None: no limit (bytes are counted all the same)
    used: int
    remaining: int | None
    day: str  # the UTC day counted
    resets_in_s: float  # until 00:00 UTC
    waiting: bool  # readings are held back for the budget now
    spent: bool  # nothing more goes out before the next UTC day


@dataclass(frozen=True)
class ClockPart(Part):
    trusted: bool  # readings get reliable times (from the system clock or the endpoint's)
    # Waiting for the first confirmation (one exchange) is no fault of the clock's.
    confirming: bool
    state: str
    jumps: int
    source: str  # "system", "uplink" or "none"
    offset_s: float | None  # how far the system clock is ahead of the endpoint's time
    uplink_error_s: float | None


@dataclass(frozen=True)
class ErrorPart(Part):
    """One of the recent warnings and errors (logs.RecentErrors)."""

    time: float
    component: str
    message: str


@dataclass(frozen=True)
class Snapshot(Part):
    """Everything the status page, /metrics and `edge-agent status` show."""

    agent: AgentPart
    sources: tuple[SourcePart, ...]
    buffer: BufferPart
    uploader: UploaderPart
    clock: ClockPart
    errors: tuple[ErrorPart, ...]
    drain: DrainPart | None = dataclasses.field(default=None, metadata=OPTIONAL)
    budget: BudgetPart | None = dataclasses.field(default=None, metadata=OPTIONAL)


# -- health and the documents ------------------------------------------------------------


@dataclass(frozen=True)
class Health(Part):
    healthy: bool
    reasons: tuple[str, ...]  # what makes it unhealthy, one sentence each
    concerns: tuple[str, ...]  # what goes wrong but has not made it unhealthy yet


@dataclass(frozen=True)
class Status:
    """A snapshot and its health: what /status.json serves and every renderer reads."""

    snapshot: Snapshot
    health: Health

    def to_json(self) -> Json:
        return {**self.snapshot.to_json(), "health": self.health.to_json()}

    @classmethod
    def from_json(cls, doc: Any) -> Status:
        if not isinstance(doc, dict):
            raise SnapshotFormatError(f"the status document is {type(doc).__name__}, not a dict")
        return cls(Snapshot.from_json(doc), Health.from_json(doc.get("health", {})))


@dataclass(frozen=True)
class OfflineStatus:
    """What `edge-agent status` says when no agent answers: the buffer's figures (None when
    the buffer cannot be read) and why there is nothing more."""

    config: str
    device_id: str | None
    reasons: tuple[str, ...]
    buffer: BufferPart | None

    def to_json(self) -> Json:
        doc: Json = {
            "offline": True,
            "agent": {"config": self.config, "device_id": self.device_id},
            "health": {"healthy": False, "reasons": list(self.reasons)},
        }
        if self.buffer is not None:
            doc["buffer"] = self.buffer.to_json()
        return doc


# -- reading JSON ------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _read(tp: Any, value: Any, path: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _read_dataclass(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _read(inner, value, path)
    if origin is dict:
        _expect(isinstance(value, dict), "an object", value, path)
        return {str(k): _read(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        _expect(isinstance(value, list), "a list", value, path)
        return tuple(_read(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        _expect(
            isinstance(value, int | float) and not isinstance(value, bool), "a number", value, path
        )
        return float(value)
    if tp is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", value, path)
        return value
    if tp in (str, bool):
        _expect(isinstance(value, tp), tp.__name__, value, path)
        return value
    return value  # Any


def _expect(ok: bool, what: str, value: Any, path: str) -> None:
    if not ok:
        raise SnapshotFormatError(f"{path} is {json_type(value)}, not {what}")


def json_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _read_dataclass(cls: type, doc: Any, path: str) -> Any:
    _expect(isinstance(doc, dict), "an object", doc, path)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}"
        if f.name in doc:
            values[f.name] = _read(hints[f.name], doc[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            values[f.name] = _empty(hints[f.name], where)
    return cls(**values)


def _empty(tp: Any, path: str) -> Any:
    """What a key an older agent did not send reads as."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _read_dataclass(tp, {}, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        return None
    if origin is dict:
        return {}
    if origin is tuple:
        return ()
    return {int: 0, float: 0.0, str: "", bool: False}.get(tp)
