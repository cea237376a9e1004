"""Readings and the records they become.

A source turns one line or message into named values; a `RecordBuilder` turns those values
into `Reading`s, each holding the JSON object that will be sent for one data source. The
`long` shape makes one record per value (`metric`, `value`); `wide` makes one record per
reading with a key per value. Tags and the device id are added to every record; they win
over a value of the same name, so a sensor cannot overwrite them.

This module also owns a record's stored form: its JSON text (`RECORD_ENCODER`) and its
`signature` (keys and JSON types, which decide what shares a batch). The buffer computes both
for every reading it takes; in the long shape the builder knows them in advance (the keys of
a source's records never change, and only the value's JSON type varies), so it hands them
along on the `Reading` and the buffer skips that work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any, Literal

Value = int | float | str | bool

# The JSON text of a record as stored and sent: compact, UTF-8, and no NaN or Infinity,
# which the API refuses (a ValueError here is a caller's bug: parsers never produce them).
RECORD_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Reading:
    """One record for one data source, with its stored form.

    `text` is the record's JSON as stored and sent (`RECORD_ENCODER`), `signature` its keys and
    JSON types (`signature()`), which decide what shares a batch. Both are computed here from
    `record` unless the maker passes them (they must then be exactly these); a maker that knows
    them can leave out `record`, which is then decoded from `text` only if someone asks for it.
    The long-shape builder does that: a dict per value costs more than the rest of a message.
    Raises ValueError for a record that is not JSON (NaN, a non-str key...): a caller's bug.

    Treat a Reading as immutable; make a new one to change it (`with_mono`, `with_field`).
    """

    __slots__ = ("_record", "datasource_id", "mono", "signature", "text")

    def __init__(
        self,
        datasource_id: str,
        record: dict[str, Any] | None = None,
        mono: float | None = None,
        signature: str | None = None,
        text: str | None = None,
    ) -> None:
        if record is None:
            if signature is None or text is None:
                raise TypeError("a Reading needs its record, or its signature and text")
        else:
            if text is None:
                text = RECORD_ENCODER.encode(record)
            if signature is None:
                signature = _signature(record)
        self.datasource_id = datasource_id
        self._record = record
        # Monotonic time of the reading when the wall clock was not trusted as it was stamped:
        # the buffer holds it and corrects the timestamp once the clock is trusted.
        self.mono = mono
        self.signature: str = signature
        self.text: str = text

    @property
    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = json.loads(self.text)
        return self._record

    def with_mono(self, mono: float | None) -> Reading:
        return Reading(self.datasource_id, self._record, mono, self.signature, self.text)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reading):
            return NotImplemented
        return (self.datasource_id, self.text, self.mono) == (
            other.datasource_id,
            other.text,
            other.mono,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Reading({self.datasource_id!r}, {self.text}, mono={self.mono!r})"


def signature(record: Mapping[str, Any]) -> str:
    """Keys and JSON value types of a record: two records share a batch only if these match."""
    return ",".join(f"{k}:{json_type(v)}" for k, v in sorted(record.items()))


def json_type(value: Any) -> str:
    """One letter for a value's JSON type, as used in signatures (int and float are both n)."""
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int | float):
        return "n"
    if isinstance(value, str):
        return "s"
    if value is None:
        return "z"
    return "o" if isinstance(value, dict) else "a"


_signature = signature  # Reading's parameter of the same name hides it there


def with_field(reading: Reading, name: str, value: str, mono: float | None) -> Reading:
    """`reading` with one more string field at the end of its record, and `mono` set.

    Keeps the precomputed text and signature valid without encoding the record again. A
    record that already has the field keeps its place for it, so that case is recomputed.
    """
    record = {**reading.record, name: value}
    if name in reading.record:
        return Reading(reading.datasource_id, record, mono)
    text = f"{reading.text[:-1]},{encode_basestring(name)}:{encode_basestring(value)}}}"
    return Reading(reading.datasource_id, record, mono, signature(record), text)


class RecordBuilder:
    """Values and a timestamp -> readings of one data source, in the configured shape.

    `fields` (MQTT topic levels) are added after the tags, and win over them.
    """

    def __init__(
        self,
        datasource_id: str,
        shape: Literal["long", "wide"],
        tags: Mapping[str, str],
        device_id: str | None,
    ) -> None:
        self.datasource_id = datasource_id
        self.shape = shape
        self._tags = dict(tags)
        if device_id is not None:
            self._tags.setdefault("device_id", device_id)
        # A tag or field named like one of the long shape's own keys replaces it in place,
        # which the assembled text below does not reproduce: such records are encoded whole.
        self._plain = _LONG_KEYS.isdisjoint(self._tags)
        self._taken = _LONG_KEYS | self._tags.keys()
        self._tag_text = _members(self._tags)
        # (field names, JSON type of the value) -> signature of a long record.
        self._signatures: dict[tuple[tuple[str, ...], str], str] = {}
        self._quoted: dict[str, str] = {}  # metric name -> its JSON string

    def build(
        self,
        values: Mapping[str, Value],
        timestamp: str,
        fields: Mapping[str, str] | None = None,
    ) -> list[Reading]:
        fields = fields or {}
        if self.shape == "wide":
            record: dict[str, Any] = {"timestamp": timestamp, **values, **self._tags}
            record["timestamp"] = timestamp
            record.update(fields)
            return [Reading(self.datasource_id, record)]
        if self._plain and self._taken.isdisjoint(fields):
            return self._build_long(values, timestamp, fields)
        return [
            Reading(
                self.datasource_id,
                {"timestamp": timestamp, "metric": name, "value": value, **self._tags, **fields},
            )
            for name, value in values.items()
        ]

    def _build_long(
        self, values: Mapping[str, Value], timestamp: str, fields: Mapping[str, str]
    ) -> list[Reading]:
        """Long records as text assembled from parts (only the value is encoded), without a
        dict each: the Reading decodes its text only if someone asks for the record."""
        head = '{"timestamp":' + encode_basestring(timestamp) + ',"metric":'
        tail = self._tag_text + _members(fields) + "}" if fields else self._tag_text + "}"
        names = tuple(fields)
        quoted = self._quoted
        signatures = self._signatures
        datasource_id = self.datasource_id
        readings = []
        for name, value in values.items():
            if type(value) is int:  # the common case, inline
                value_text, kind = int.__repr__(value), "n"
            else:
                value_text, kind = _scalar(value)
            name_text = quoted.get(name)
            if name_text is None:
                name_text = quoted[name] = encode_basestring(name)
                if len(quoted) > 10_000:  # names from payloads: keep the cache bounded
                    quoted.clear()
            text = f'{head}{name_text},"value":{value_text}{tail}'
            sig = signatures.get((names, kind))
            if sig is None:
                sig = signatures[names, kind] = signature(json.loads(text))
            readings.append(Reading(datasource_id, None, None, sig, text))
        return readings


_LONG_KEYS = frozenset({"timestamp", "metric", "value"})
_INF = float("inf")


def _members(pairs: Mapping[str, str]) -> str:
    """`,"k":"v"` for each pair, as RECORD_ENCODER writes them inside an object."""
    return "".join(f",{encode_basestring(k)}:{encode_basestring(v)}" for k, v in pairs.items())


def _scalar(value: Any) -> tuple[str, str]:
    """A value's JSON text (exactly as RECORD_ENCODER writes it) and its `json_type`."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value), "s"
    if kind is float:
        if value != value or value in (_INF, -_INF):
            return RECORD_ENCODER.encode(value), "n"  # raises ValueError, as for the record
        return float.__repr__(value), "n"
    if kind is int:
        return int.__repr__(value), "n"
    if kind is bool:
        return ("true" if value else "false"), "b"
    return RECORD_ENCODER.encode(value), json_type(value)
