"""What one MQTT message says: topic fields, payload and device time become readings.

    MessageReader   topic fields + payload + device time -> readings (no network, no threads)
    device_stamp    a device timestamp (ISO 8601, epoch s or ms) -> the agent's UTC stamp

The source (source.py) hands each message here and sends what cannot be read (ParseError,
OversizeError) to dead_letters with the reason.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from edge_agent.clock import SecondStamps, utc_stamp
from edge_agent.errors import OversizeError, ParseError
from edge_agent.parsers import PayloadKind, Value, coerce, parse_payload
from edge_agent.records import Reading, RecordBuilder
from edge_agent.sources.mqtt.config import MqttConfig, topic_field_levels

# Device times outside 2000..2100 come from a clock that never synced, or a wrong unit.
_EPOCH_MIN = 946_684_800.0
_EPOCH_MAX = 4_102_444_800.0
_EPOCH_MS_FROM = 1e11  # a larger epoch number is in milliseconds (1e11 s is the year 5138)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_PAYLOAD_KINDS: dict[str, PayloadKind] = {"json": "json", "number": "number", "kv": "kv"}


class MessageReader:
    """Turns one message (topic and payload) into readings; raises ParseError."""

    def __init__(self, config: MqttConfig, device_id: str | None) -> None:
        self._template = config.topic_fields.split("/") if config.topic_fields else None
        self._names = topic_field_levels(config.topic_fields) if config.topic_fields else ()
        self._format = _PAYLOAD_KINDS[config.format]  # config allows only these for mqtt
        self._metric = config.metric
        self._timestamp_field = config.timestamp_field
        self._max_payload = config.max_payload_bytes
        self._max_values = config.max_values_per_message
        self._builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self._stamps = SecondStamps()

    def read(
        self, topic: str | bytes, payload: bytes | bytearray, size: int, received: float
    ) -> list[Reading]:
        """Readings from one message whose payload had `size` bytes (`payload` holds only the
        first of them when that is over max_payload_bytes); raises ParseError, OversizeError."""
        if isinstance(topic, bytes):
            raise ParseError(
                "the topic is not UTF-8, which MQTT requires; fix the publisher (and make the "
                "broker refuse such topics)"
            )
        if size > self._max_payload:
            raise OversizeError(
                f"payload of {size:,} bytes is over max_payload_bytes ({self._max_payload:,}); "
                "raise max_payload_bytes if such messages are expected"
            )
        fields = self.topic_fields(topic)
        topic_metric = fields.pop("metric", None)
        values = parse_payload(payload, self._format, topic_metric or self._metric)
        if len(values) > self._max_values:
            raise OversizeError(
                f"payload has {len(values):,} values, more than max_values_per_message "
                f"({self._max_values:,}); raise max_values_per_message if that is expected"
            )
        stamp = self._stamp(values, received)
        if topic_metric is not None and list(values) == ["value"]:
            values = {topic_metric: values["value"]}
        return self._builder.build(values, stamp, fields)

    def topic_fields(self, topic: str) -> dict[str, str]:
        """The named levels of `topic` per `topic_fields`; ParseError if it does not fit."""
        if self._template is None:
            return {}
        levels = topic.split("/")
        fields: dict[str, str] = {}
        for index, (pattern, name) in enumerate(zip(self._template, self._names, strict=True)):
            if pattern == "#":
                return fields
            if index >= len(levels):
                break
            if name is not None:
                if not levels[index]:
                    raise ParseError(f"topic level {index + 1} for {{{name}}} is empty")
                fields[name] = levels[index]
            elif pattern not in ("+", levels[index]):
                break
        else:
            if len(levels) == len(self._template):
                return fields
        raise ParseError(f"topic {topic!r} does not fit topic_fields {'/'.join(self._template)!r}")

    def _stamp(self, values: dict[str, Value], received: float) -> str:
        if self._timestamp_field is None:
            return self._stamps(received)
        raw = values.pop(self._timestamp_field, None)
        if raw is None:
            raise ParseError(f"no {self._timestamp_field!r} field (timestamp_field)")
        if not values:
            raise ParseError("no values besides the timestamp")
        return device_stamp(raw)


def device_stamp(value: Value) -> str:
    """A device's timestamp as the agent's UTC stamp; raises ParseError.

    Accepts ISO 8601 with a UTC offset ("2025-01-01T12:00:00Z", "...+02:00") and epoch
    seconds or milliseconds, as a number or as text. A time without an offset is refused:
    local time would be sent as UTC. The millisecond is kept exactly (no float round trip).
    """
    if isinstance(value, str):
        number = coerce(value)
        if isinstance(number, str):
            return _stamp(_iso_millis(value.strip()), value)
        value = number
    if isinstance(value, bool) or not math.isfinite(value):
        raise ParseError(f"timestamp {value!r} is neither ISO 8601 nor epoch seconds")
    # round: 1740823200.123 s means .123, which a binary float can only approximate.
    millis = round(value if abs(value) >= _EPOCH_MS_FROM else value * 1000)
    return _stamp(millis, value)


def _iso_millis(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ParseError(f"timestamp {text[:40]!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        raise ParseError(
            f"timestamp {text[:40]!r} has no UTC offset; send e.g. 2025-01-01T12:00:00Z"
        )
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _stamp(millis: int, shown: Value) -> str:
    if not _EPOCH_MIN * 1000 <= millis < _EPOCH_MAX * 1000:
        raise ParseError(
            f"timestamp {str(shown)[:40]!r} is outside 2000..2100 (a device clock that never "
            "synced, or epoch seconds sent as something else)"
        )
    # Half a millisecond up, so that utc_stamp's truncation lands on `millis` exactly.
    return utc_stamp((millis + 0.5) / 1000)
