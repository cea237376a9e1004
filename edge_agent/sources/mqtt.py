"""The MQTT source: messages from a broker become readings, acknowledged once they are durable.

    MqttSource      lifecycle: one paho client with its network thread, watched by our thread
    _AckWindow      QoS 1 messages taken and not yet acknowledged; blocks when the window is full
    MessageReader   topic fields + payload + device time -> readings (no network, no threads)
    SecondStamps    utc_stamp for a stream of receive times, the seconds formatted once
    device_stamp    a device timestamp (ISO 8601, epoch s or ms) -> the agent's UTC stamp

End-to-end acknowledgement: paho runs with `manual_ack`; a QoS 1 message is acknowledged to
the broker only from the buffer's `on_durable` callback, after the readings made from it have
committed. The session is persistent (clean_session false, or a Session Expiry Interval with
MQTT 5), so the broker keeps what arrives while the agent is down and sends again whatever was
not acknowledged. QoS 2 subscriptions are made at QoS 1: paho answers a QoS 2 PUBLISH with
PUBREC on receipt and keeps no state on disk, so a crash before the commit would lose the
message; QoS 1 gives at-least-once end to end, which is what the uploader gives anyway.

Flow control: at most `inflight_window` messages are unacknowledged. When the window is full
the source asks the buffer to commit at once (the broker sends nothing more until it gets
acknowledgements, so waiting for the commit interval would only idle), and the paho callback
blocks until acknowledgements free room, so TCP slows a broker that does not honour the window.
With MQTT 5 the window is announced to the broker as Receive Maximum.

paho's result and reason codes are translated into `SourceError` messages here, once.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.clock import Clock, SystemClock, utc_stamp
from edge_agent.config import SourceConfig, broker_address, topic_field_levels
from edge_agent.errors import ParseError, SourceError
from edge_agent.logs import RateLimitedLog
from edge_agent.parsers import PayloadKind, Value, coerce, parse_payload
from edge_agent.records import Reading, RecordBuilder
from edge_agent.sources.base import Intake, ThreadedSource

log = logging.getLogger("edge_agent.sources.mqtt")

_SUPERVISE_S = 1.0
_BATCH = 256  # messages read into readings at a time (fewer when the window is smaller)
_GATHER_S = 0.025  # after a message, how long before our thread reads what paho's left
_DRAIN_S = 2.0  # on stop, how long to wait for the last messages to commit and be acknowledged
_FIRST_BACKOFF_S = 1.0
_DEAD_LETTER_CHARS = 1024  # of a bad payload kept in dead_letters: enough to see what was wrong
# Device times outside 2000..2100 come from a clock that never synced, or a wrong unit.
_EPOCH_MIN = 946_684_800.0
_EPOCH_MAX = 4_102_444_800.0
_EPOCH_MS_FROM = 1e11  # a larger epoch number is in milliseconds (1e11 s is the year 5138)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_PAYLOAD_KINDS: dict[str, PayloadKind] = {"json": "json", "number": "number", "kv": "kv"}

_CONNECT_HINTS = {
    "Not authorized": "check username and the password in password_env/password_file, "
    "and that the broker knows this user",
    "Bad user name or password": "check username and the password in password_env/password_file",
    "Client identifier not valid": "set a client_id the broker accepts",
    "Unsupported protocol version": 'try the other mqtt_version ("3.1.1" or "5")',
    "Server unavailable": "the broker is starting or overloaded",
    "Server busy": "the broker is starting or overloaded",
    "Banned": "the broker banned this client; ask its operator",
}


# A message as paho's thread takes it: the message, its receive time, and the connection
# generation and client that acknowledge it.
_Message = tuple[mqtt.MQTTMessage, float, int, mqtt.Client]
_Taken = tuple[int, mqtt.Client, int, int]  # generation, client, mid, qos


class _Inbox:
    """Messages taken by paho's thread and not yet read into readings.

    paho's thread reads them itself, a batch at a time, when `batch` have gathered or the ack
    window is full: handing every message to another thread would cost a thread switch each,
    more than reading it. The source's thread reads what is left once messages pause. One
    reader at a time, in arrival order.
    """

    def __init__(self, batch: int) -> None:
        self._lock = threading.Lock()  # guards _items
        self._reading = threading.Lock()  # one reader at a time, so batches stay in order
        self._items: list[_Message] = []
        self._batch = batch
        self.arrived = threading.Event()  # set when a message lands in an empty inbox

    def put(self, item: _Message) -> bool:
        """Add a message; True when a batch has gathered for the caller to read."""
        with self._lock:
            items = self._items
            items.append(item)
            n = len(items)
        if n == 1:
            self.arrived.set()
        return n >= self._batch

    def read(self, reader: Callable[[list[_Message]], None]) -> None:
        """Hand what has gathered to `reader`, unless another thread is reading it."""
        with self._reading:
            with self._lock:
                items, self._items = self._items, []
            if items:
                reader(items)

    def discard(self) -> None:
        """Forget what has gathered (not acknowledged: the broker sends it again)."""
        with self._lock:
            self._items = []


class _AckWindow:
    """Messages taken from the broker whose readings are not yet committed, on one client.

    QoS 0 messages count too (so memory stays bounded whatever the QoS) but are never
    acknowledged. Each connection is a new generation: a message is acknowledged only on the
    connection that delivered it, because after a reconnect the broker sends it again and may
    give its packet id to another message, which a late acknowledgement would then confirm
    before its commit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._unacked = 0
        self._generation = 0
        self._closed = False

    def new_connection(self) -> None:
        with self._cond:
            self._generation += 1
            self._unacked = 0
            self._cond.notify_all()

    def take(self) -> int | None:
        """Wait for room for one more message; returns its generation, or None once closed."""
        with self._lock:  # the common case, on a plain lock: room is free
            if self._unacked < self.limit and not self._closed:
                self._unacked += 1
                return self._generation
        with self._cond:
            while self._unacked >= self.limit and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._unacked += 1
            return self._generation

    def give_back_all(self, taken: list[_Taken]) -> None:
        """Taken messages that were not handed on (the agent is stopping): free their room."""
        with self._cond:
            self._free(sum(1 for t in taken if t[0] == self._generation))

    def acknowledge(self, taken: list[_Taken]) -> None:
        """Acknowledge messages whose readings committed, those of the current connection.

        Runs in the buffer's writer thread, once per commit: it only queues the PUBACKs,
        which paho's network thread sends.
        """
        with self._cond:
            current = self._generation
            freed = 0
            for generation, client, mid, qos in taken:
                if generation == current:
                    if qos:
                        client.ack(mid, qos)
                    freed += 1
            self._free(freed)

    def _free(self, n: int) -> None:
        if n:
            before = self._unacked
            self._unacked -= n
            # Only `take` on a full window and `wait_empty` wait: wake them only when it matters.
            if before >= self.limit or self._unacked == 0:
                self._cond.notify_all()

    @property
    def unacked(self) -> int:
        return self._unacked

    @property
    def full(self) -> bool:
        return self._unacked >= self.limit

    def close(self) -> None:
        """Take no more messages (the broker keeps them for the next session)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._unacked == 0, timeout)


class MessageReader:
    """Turns one message (topic and payload) into readings; raises ParseError."""

    def __init__(self, config: SourceConfig, device_id: str | None) -> None:
        self._template = config.topic_fields.split("/") if config.topic_fields else None
        self._names = topic_field_levels(config.topic_fields) if config.topic_fields else ()
        self._format = _PAYLOAD_KINDS[config.format]  # config allows only these for mqtt
        self._metric = config.metric
        self._timestamp_field = config.timestamp_field
        self._builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self.uses_topic = self._template is not None  # read() ignores the topic otherwise
        self._stamps = SecondStamps()

    def read(self, topic: str, payload: bytes | bytearray, received: float) -> list[Reading]:
        fields = self.topic_fields(topic)
        topic_metric = fields.pop("metric", None)
        values = parse_payload(payload, self._format, topic_metric or self._metric)
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


class SecondStamps:
    """`utc_stamp`, with the date and time of day reused while the second stays the same.

    Messages come thousands a second: formatting the whole stamp for each one is a tenth of
    the agent's work per message.
    """

    def __init__(self) -> None:
        self._last: tuple[int, str] = (0, utc_stamp(0)[:-4])  # 'YYYY-MM-DDTHH:MM:SS.'
        self._last_stamp: tuple[int, str] = (0, utc_stamp(0))

    def __call__(self, epoch_seconds: float) -> str:
        millis = int(epoch_seconds * 1000)  # as utc_stamp rounds
        last_millis, stamp = self._last_stamp
        if millis == last_millis:  # thousands a second: many share a millisecond
            return stamp
        second, ms = divmod(millis, 1000)
        last_second, head = self._last
        if second != last_second:
            head = utc_stamp(second)[:-4]
            self._last = (second, head)  # one tuple: a reader never sees a torn pair
        stamp = f"{head}{ms:03d}Z"
        self._last_stamp = (millis, stamp)
        return stamp


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


class MqttSource(ThreadedSource):
    """Subscribes to the configured topics and hands readings to the intake.

    paho's network thread runs the callbacks; our own thread starts the client, beats the
    heartbeat, and restarts the client with backoff if a callback fails unexpectedly.
    """

    def __init__(
        self,
        config: SourceConfig,
        device_id: str | None,
        intake: Intake,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config.name)
        assert config.broker is not None  # config requires it for mqtt sources
        self.config = config
        self._intake = intake
        self._clock = clock or SystemClock()
        self._wall = self._clock.wall
        self._reader = MessageReader(config, device_id)
        self._host, self._port, self._tls = broker_address(config.broker)
        self.client_id = config.client_id or _default_client_id(device_id, config.name)
        self._qos = min(config.qos, 1)
        self._bad_message_log = RateLimitedLog(log)
        self._failure: BaseException | None = None
        self._ever_connected = False
        self._retained_noted = False
        self._subscriptions: dict[int, list[str]] = {}
        self._client: mqtt.Client | None = None
        self._window = _AckWindow(config.inflight_window)
        self._inbox = _Inbox(_BATCH)

    @property
    def label(self) -> str:
        return f"mqtt {self.name}"

    @property
    def unacked(self) -> int:
        """Messages taken from the broker whose readings are not yet committed."""
        return self._window.unacked

    def start(self) -> None:
        """Set up the client (TLS files are read here: errors stop start-up), then connect."""
        self._client = self._new_client()
        if self.config.qos == 2:
            log.info(
                "%s: subscribing at QoS 1 instead of 2: the broker is acknowledged only after "
                "the buffer commits, which QoS 1 allows and paho's QoS 2 does not",
                self.label,
            )
        super().start()

    # -- the supervising thread --------------------------------------------------------------

    def _run(self) -> None:
        client = self._client
        backoff = _FIRST_BACKOFF_S
        while client is not None:
            self._connect(client)
            failure = self._supervise()
            self._close(client, drain=failure is None)
            if failure is None:
                break
            log.error("%s: restarting the MQTT client in %.0f s", self.label, backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.config.reopen_backoff_max_s)
            client = self._restarted_client()
        self.stats.connected = False

    def _restarted_client(self) -> mqtt.Client | None:
        """A new client, retried with backoff while it cannot be made; None once stopped."""
        backoff = _FIRST_BACKOFF_S
        while not self._stop.is_set():
            try:
                return self._new_client()
            except SourceError as exc:
                self._note_down(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.reopen_backoff_max_s)
        return None

    def _connect(self, client: mqtt.Client) -> None:
        self._failure = None
        self._window = _AckWindow(self.config.inflight_window)
        if self.config.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s
            props.ReceiveMaximum = self.config.inflight_window
            client.connect_async(
                self._host,
                self._port,
                self.config.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            client.connect_async(self._host, self._port, self.config.keepalive_s)
        client.loop_start()

    def _supervise(self) -> BaseException | None:
        """Beat the heartbeat and read what paho's thread leaves in the inbox, until stopped
        (None) or a callback or the reading failed (its exception)."""
        inbox = self._inbox
        while True:
            self.heartbeat = time.monotonic()
            if self._failure is not None:
                return self._failure
            if self._stop.is_set():
                return None
            if not inbox.arrived.wait(_SUPERVISE_S):
                continue
            # Messages came: paho's thread reads them as batches gather; read the rest of a
            # burst after a moment.
            if self._stop.wait(_GATHER_S):
                continue
            inbox.arrived.clear()
            try:
                inbox.read(self._read_batch)
            except Exception as exc:
                # A bug, not bad input. Restart the client: what was not acknowledged
                # comes again.
                log.exception("%s: unexpected error reading messages", self.label)
                return exc

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.arrived.set()
        super().stop(timeout)

    def _close(self, client: mqtt.Client, drain: bool) -> None:
        window = self._window
        window.close()
        if drain and self.stats.connected:
            # Let what was taken commit and be acknowledged, so it is not sent to us again.
            self._inbox.read(self._read_batch)
            self._intake.commit_soon()
            window.wait_empty(_DRAIN_S)
        client.disconnect()
        client.loop_stop()
        self._inbox.discard()
        # paho closes its wake-up socket pair only when the client is collected; without the
        # cycle through our callbacks that happens as soon as the last reference goes.
        client.on_connect = client.on_connect_fail = client.on_disconnect = None
        client.on_subscribe = client.on_message = None
        self._client = None

    def _new_client(self) -> mqtt.Client:
        cfg = self.config
        v5 = cfg.mqtt_version == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if cfg.username:
            password = cfg.password.reveal() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        if self._tls:
            try:
                client.tls_set(
                    ca_certs=cfg.ca_file, certfile=cfg.client_cert, keyfile=cfg.client_key
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise SourceError(
                    f"{self.label}: cannot set up TLS ({exc}); check ca_file, client_cert "
                    "and client_key"
                ) from None
        client.reconnect_delay_set(1, max(1, round(cfg.reopen_backoff_max_s)))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # -- paho callbacks (paho's network thread) ---------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._window.new_connection()
        if reason.is_failure:
            name = reason.getName()
            hint = _CONNECT_HINTS.get(name, "see the broker's log")
            self._note_down(SourceError(f"the broker refused the connection: {name}; {hint}"))
            return
        if self._ever_connected:
            self.stats.reconnects += 1
        if self._ever_connected and not flags.session_present:
            log.warning(
                "%s: the broker had no session for %s: messages published while the agent was "
                "away are lost unless the broker kept the session (persistence, expiry)",
                self.label,
                self.client_id,
            )
        self._ever_connected = True
        self.stats.connected = True
        self.stats.last_error = None
        log.info(
            "%s: connected to %s:%d as %s (%s session, MQTT %s); subscribing to %s",
            self.label,
            self._host,
            self._port,
            self.client_id,
            "resumed" if flags.session_present else "new",
            self.config.mqtt_version,
            ", ".join(self._topics()),
        )
        topics = self._topics()
        result, mid = client.subscribe([(t, self._qos) for t in topics])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subscriptions[mid] = topics

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._note_down(
            SourceError(
                f"cannot reach the broker at {self._host}:{self._port} (refused, unreachable "
                "or TLS handshake failed)"
            )
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._window.new_connection()
        if self._stop.is_set() or not self.stats.connected:
            self.stats.connected = False
            return
        name = reason.getName()
        hint = ""
        if name == "Session taken over":
            hint = f"; another client connected as {self.client_id}: give each its own client_id"
        self._note_down(SourceError(f"lost the connection to the broker ({name}){hint}"))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        topics = self._subscriptions.pop(mid, [])
        for topic, reason in zip(topics, reasons, strict=False):
            if reason.is_failure:
                error = SourceError(
                    f"the broker refused the subscription to {topic!r}: {reason.getName()} "
                    f"(code {reason.value}); check the broker's ACL for "
                    f"{self.config.username or 'this client'}"
                )
                self.stats.last_error = str(error)
                log.error("%s: %s", self.label, error)
            elif reason.value < self._qos:
                log.warning(
                    "%s: the broker granted QoS %d for %r: messages can be lost on the way",
                    self.label,
                    reason.value,
                    topic,
                )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Take a message into the inbox; read the inbox when a batch has gathered."""
        try:
            if message.retain:
                self._skip_retained(client, message)
                return
            window = self._window
            generation = window.take()
            if generation is None:
                return  # stopping: not acknowledged, the broker keeps it for the next session
            if self._inbox.put((message, self._wall(), generation, client)) or window.full:
                # Read here, in paho's thread: the broker sends nothing more once the
                # window is full, so this is also when to commit.
                self._inbox.read(self._read_batch)
        except Exception as exc:
            # A bug: paho's thread would die with it. Restart the client; the unacknowledged
            # message comes again.
            log.exception("%s: unexpected error handling a message", self.label)
            self._failure = exc
            client.disconnect()

    def _skip_retained(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        # Sent because we subscribed, not because a sensor just published: an old value
        # that would get today's timestamp, and is sent again at every reconnect.
        if not self._retained_noted:
            self._retained_noted = True
            log.info(
                "%s: skipping retained messages (old values the broker sends on subscribe, "
                "e.g. on %r); live messages are read as they come",
                self.label,
                message.topic,
            )
        if message.qos > 0:
            client.ack(message.mid, message.qos)

    # -- messages (our thread) --------------------------------------------------------------

    def _read_batch(self, batch: list[_Message]) -> None:
        """Read messages into readings and hand them on in one put, acknowledged together
        once committed; each unreadable one goes to dead_letters on its own."""
        read = self._reader.read
        uses_topic = self._reader.uses_topic
        readings: list[Reading] = []
        taken: list[_Taken] = []
        for message, received, generation, client in batch:
            # paho decodes the topic each time it is asked: only when it is used.
            topic = message.topic if uses_topic else ""
            try:
                readings += read(topic, message.payload, received)
            except ParseError as exc:
                self._dead_letter(message, str(exc), generation, client)
                continue
            taken.append((generation, client, message.mid, message.qos))
        stats = self.stats
        stats.lines += len(batch)
        stats.readings += len(readings)
        stats.last_data = batch[-1][1]
        if not readings:
            return
        window = self._window
        # QoS 0 messages are not acknowledged, but their room in the window frees on commit.
        on_durable = partial(window.acknowledge, taken)
        device_time = self.config.timestamp_field is not None
        if not self._intake.put(readings, on_durable, device_time):
            window.give_back_all(taken)
        elif window.full:
            # The broker sends nothing more until it gets acknowledgements: commit now.
            self._intake.commit_soon()

    def _dead_letter(
        self, message: mqtt.MQTTMessage, reason: str, generation: int, client: mqtt.Client
    ) -> None:
        topic = message.topic
        self.stats.parse_errors += 1
        self._intake.count(f"dropped.unparseable.{self.name}")
        self._bad_message_log(
            logging.WARNING,
            f"{self.label}: unparseable message on {topic!r} ({reason}); kept in dead_letters",
        )
        text = bytes(message.payload).decode("utf-8", "backslashreplace")
        record = json.dumps({"topic": topic, "payload": text[:_DEAD_LETTER_CHARS]})
        taken = [(generation, client, message.mid, message.qos)]
        on_durable = partial(self._window.acknowledge, taken)
        kept = self._intake.put_dead_letter(
            self.config.datasource_id, record, reason, f"mqtt:{topic}", on_durable
        )
        if not kept:
            self._window.give_back_all(taken)

    # -- helpers ----------------------------------------------------------------------------

    def _topics(self) -> list[str]:
        group = self.config.shared_group
        if group is None:
            return list(self.config.topics)
        return [f"$share/{group}/{t}" for t in self.config.topics]

    def _note_down(self, error: SourceError) -> None:
        """Log a failure once per outage (and again if the reason changes)."""
        reason = str(error)
        self.stats.connected = False
        if reason != self.stats.last_error:
            log.error(
                "%s: %s; retrying with backoff up to %.0f s",
                self.label,
                reason,
                self.config.reopen_backoff_max_s,
            )
        self.stats.last_error = reason


def _default_client_id(device_id: str | None, name: str) -> str:
    # Stable across restarts, or the broker would not find the session it kept for us.
    return f"edge-agent-{device_id or socket.gethostname()}-{name}"
