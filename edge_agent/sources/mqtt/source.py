"""The MQTT source: messages from a broker become readings, acknowledged once they are durable.

    MqttSource      lifecycle: a channel (one paho client) in the MQTT link process that all
                    MQTT sources share (hub.py, link.py), read by our thread; the MQTT
                    version ("auto": 5, and 3.1.1 for good with a broker that refuses 5)
    MessageReader   topic fields + payload + device time -> readings (reader.py: no network,
                    no threads)

End-to-end acknowledgement: paho runs with `manual_ack` in the link process; a QoS 1 message
is acknowledged to the broker only once the buffer's `on_durable` callback, after the readings
made from it have committed, has asked the link to. The session is persistent (clean_session
false, or a Session Expiry Interval with MQTT 5), so the broker keeps what arrives while the
agent is down and sends again whatever was not acknowledged. QoS 2 subscriptions are made at
QoS 1: paho answers a QoS 2 PUBLISH with PUBREC on receipt and keeps no state on disk, so a
crash before the commit would lose the message; QoS 1 gives at-least-once end to end, which
is what the uploader gives anyway.

Flow control: at most `inflight_window` messages are unacknowledged. When the window is full
the source asks the buffer to commit at once (the broker sends nothing more until it gets
acknowledgements, so waiting for the commit interval would only idle), and the link's paho
callback blocks until acknowledgements free room, so TCP slows a broker that does not honour
the window. With MQTT 5 the window is announced to the broker as Receive Maximum (1000 by
default); with 3.1.1 the broker's own limit applies (Mosquitto: 20, the default window then).

Hostile input: a message the agent cannot turn into readings (not parseable, a topic that is
not UTF-8, a payload over `max_payload_bytes`, more than `max_values_per_message` values) goes
to dead_letters with the reason, its topic escaped and at most the first KiB of its payload,
and is acknowledged like any other once that commits. The link forwards only the first KiB of
an oversize payload, and readings are handed to the buffer in chunks, so memory is bounded by
the caps, not by what the broker sends.

paho's result and reason codes are translated into `SourceError` messages here, once.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import assert_never

from edge_agent.errors import OversizeError, ParseError, SourceError
from edge_agent.logs import RateLimitedLog
from edge_agent.records import Reading
from edge_agent.sources.base import Intake, SourceConfig, ThreadedSource
from edge_agent.sources.mqtt.config import MqttConfig, broker_address
from edge_agent.sources.mqtt.hub import HUB, Channel, ChannelEvent, Ended, Wake
from edge_agent.sources.mqtt.link import new_client, topic_text
from edge_agent.sources.mqtt.protocol import (
    Closed,
    Connected,
    ConnectFailed,
    Disconnected,
    Flushed,
    Granted,
    LinkSettings,
    Message,
    Messages,
    Retained,
    SetupFailed,
    Subscribed,
    Taken,
)
from edge_agent.sources.mqtt.reader import MessageReader
from edge_agent.sources.mqtt.reader import device_stamp as device_stamp  # tests import it here

log = logging.getLogger("edge_agent.sources.mqtt")

_SUPERVISE_S = 1.0
_LINK_SETTLED_S = 60.0  # a channel that ran this long before it failed reopens after 1 s again
_DRAIN_S = 2.0  # on stop, how long to wait for the last messages to commit and be acknowledged
_FIRST_BACKOFF_S = 1.0
_DEAD_LETTER_CHARS = 1024  # of a bad payload kept in dead_letters: enough to see what was wrong
_LOGGED_TOPIC_CHARS = 200  # a topic can be 64 KiB
# Readings made from one forwarded batch are handed to the buffer in chunks of about this many:
# a batch of 256 messages of 1000 values each would otherwise be 256,000 readings at once.
_PUT_READINGS = 5000
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


class _BrokersWithoutV5:
    """Brokers that refused MQTT 5, by host and port, for the process's life.

    Kept in memory only: a broker upgraded to MQTT 5 is used at full speed from the agent's
    next start, and the cost of asking is one refused CONNECT per start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._brokers: set[tuple[str, int]] = set()

    def __contains__(self, broker: tuple[str, int]) -> bool:
        with self._lock:
            return broker in self._brokers

    def add(self, broker: tuple[str, int]) -> bool:
        """Remember `broker`; True the first time (the time to say so)."""
        with self._lock:
            first = broker not in self._brokers
            self._brokers.add(broker)
            return first


_REFUSED_V5 = _BrokersWithoutV5()
_UNSUPPORTED = "Unsupported protocol version"  # paho's name for the refusal, with 3.1.1 or 5


@dataclass(frozen=True)
class _Reopen:
    """Open the channel again at once, with the MQTT version now chosen (no backoff)."""


_REOPEN = _Reopen()
# What one channel's run or one event from the link leads to: go on (None), open again at
# once, or what went wrong (the source backs off, then opens a new channel).
Outcome = str | _Reopen | None


class MqttSource(ThreadedSource):
    """Subscribes to the configured topics and hands readings to the intake.

    The paho client runs in the MQTT link, a child process shared by all MQTT sources
    (link.py, hub.py); our thread opens a channel in it, reads the messages and events it
    forwards, beats the heartbeat, and opens a new channel with backoff if the link dies.
    Acknowledgements go back from the buffer's writer thread.
    """

    def __init__(
        self,
        config: MqttConfig,
        device_id: str | None,
        intake: Intake,
    ) -> None:
        """Receive times are stamped by the link process with the system clock."""
        super().__init__(config.name)
        assert config.broker is not None  # config requires it for mqtt sources
        self.config = config
        self._intake = intake
        self._reader = MessageReader(config, device_id)
        self._host, self._port, self._tls = broker_address(config.broker)
        self.client_id = config.client_id or _default_client_id(device_id, config.name)
        self._qos = min(config.qos, 1)
        self._settings = self._make_link_settings(self._version())
        self._bad_message_log = RateLimitedLog(log)
        self._oversize_log = RateLimitedLog(log)
        self._ever_connected = False
        # The current channel in the link (acknowledgements for an earlier one are dropped:
        # its messages come again) and the messages it forwarded not yet acknowledged.
        self._ack_cond = threading.Condition()
        self._channel: Channel | None = None
        self._outstanding = 0
        self._joined = False
        self.link_pid: int | None = None  # the running link process, for status and benchmarks

    def update(self, config: SourceConfig, device_id: str | None) -> bool:
        """Always False: a changed MQTT source restarts, its session resumes at the broker,
        which sends again whatever was not acknowledged, so nothing is lost by it."""
        return False

    @property
    def label(self) -> str:
        return f"mqtt {self.name}"

    @property
    def unacked(self) -> int:
        """Messages taken from the broker whose readings are not yet committed."""
        return self._outstanding

    @property
    def mqtt_version(self) -> str:
        """The MQTT version spoken to the broker ("5" or "3.1.1"; "auto" resolved)."""
        return self._settings.mqtt_version

    @property
    def window(self) -> int:
        """Messages in flight at most with the version spoken (see MqttConfig.window)."""
        return self._settings.window

    def start(self) -> None:
        """Check the TLS files (errors stop start-up), then open a channel in the link."""
        self._refuse_restart()
        try:
            new_client(self._settings)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise SourceError(
                f"{self.label}: cannot set up TLS ({exc}); check ca_file, client_cert "
                "and client_key"
            ) from None
        if self.config.qos == 2:
            log.info(
                "%s: subscribing at QoS 1 instead of 2: the broker is acknowledged only after "
                "the buffer commits, which QoS 1 allows and paho's QoS 2 does not",
                self.label,
            )
        HUB.join()
        self._joined = True
        super().start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._ack_cond:
            channel = self._channel
        if channel is not None:
            channel.wake()
        super().stop(timeout)

    def _version(self) -> str:
        """The MQTT version to speak now: "auto" is 5 unless this broker refused it."""
        version = self.config.mqtt_version
        if version != "auto":
            return version
        if self.config.shared_group is None and (self._host, self._port) in _REFUSED_V5:
            return "3.1.1"
        return "5"

    def _make_link_settings(self, version: str) -> LinkSettings:
        cfg = self.config
        group = cfg.shared_group
        topics = cfg.topics if group is None else tuple(f"$share/{group}/{t}" for t in cfg.topics)
        return LinkSettings(
            host=self._host,
            port=self._port,
            tls=self._tls,
            ca_file=cfg.ca_file,
            client_cert=cfg.client_cert,
            client_key=cfg.client_key,
            username=cfg.username,
            password=cfg.password,
            client_id=self.client_id,
            mqtt_version=version,
            keepalive_s=cfg.keepalive_s,
            session_expiry_s=cfg.session_expiry_s,
            window=cfg.window(version),
            qos=self._qos,
            topics=tuple(topics),
            reconnect_max_s=max(1, round(cfg.reopen_backoff_max_s)),
            max_payload_bytes=cfg.max_payload_bytes,
        )

    # -- our thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_channels()
        finally:
            if self._joined:
                self._joined = False
                HUB.leave()

    def _run_channels(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self._stop.is_set():
            started = time.monotonic()
            outcome = self._run_channel()
            self.stats.connected = False
            if outcome is None or self._stop.is_set():
                break
            if isinstance(outcome, _Reopen):
                continue
            if time.monotonic() - started > _LINK_SETTLED_S:
                backoff = _FIRST_BACKOFF_S  # it had been running well: a new incident
            self._note_down(SourceError(outcome))
            log.info("%s: opening the MQTT link again in %.0f s", self.label, backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.config.reopen_backoff_max_s)

    def _run_channel(self) -> Outcome:
        """Run one channel in the link until stopped (None) or it ends (why)."""
        self._settings = self._make_link_settings(self._version())
        try:
            channel = HUB.open(self._settings)
        except SourceError as exc:
            return str(exc)
        with self._ack_cond:
            self._channel = channel
            self._outstanding = 0
        self.link_pid = channel.pid
        try:
            return self._follow(channel)
        except Exception as exc:
            # A bug, not bad input. Open a new channel: what was not acknowledged comes again.
            log.exception("%s: unexpected error reading from the MQTT link", self.label)
            return f"unexpected error: {exc!r}"
        finally:
            with self._ack_cond:
                self._channel = None  # acknowledgements still to come are for a channel gone
            channel.close()
            self.link_pid = None

    def _follow(self, channel: Channel) -> Outcome:
        while True:
            self.heartbeat = time.monotonic()
            if self._stop.is_set():
                self._close_channel(channel)
                return None
            try:
                event = channel.events.get(timeout=_SUPERVISE_S)
            except queue.Empty:
                continue
            outcome = self._handle(event, channel)
            if outcome is not None:
                return outcome

    def _close_channel(self, channel: Channel) -> None:
        """Let what the link took commit and be acknowledged, so it is not sent to us again.

        The link forwards what it took, waits (up to _DRAIN_S) for the acknowledgements, then
        disconnects the client and says Closed: read until then."""
        channel.stop(_DRAIN_S)
        deadline = time.monotonic() + _DRAIN_S + 1.0
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = channel.events.get(timeout=remaining)
            except queue.Empty:
                return
            if isinstance(event, Closed | Ended):
                return
            self._handle(event, channel)
            self._intake.commit_soon()

    def _handle(self, event: ChannelEvent, channel: Channel) -> Outcome:
        """One event from the link; what to do next if this channel cannot go on."""
        match event:
            case Messages(_, batch):
                self._read_batch(batch, channel)
            case Connected(_, failed, reason, session_present):
                return self._on_connect(failed, reason, session_present)
            case ConnectFailed():
                self._note_down(
                    SourceError(
                        f"cannot reach the broker at {self._host}:{self._port} (refused, "
                        "unreachable or TLS handshake failed)"
                    )
                )
            case Disconnected(_, reason):
                self._on_disconnect(reason)
            case Subscribed(_, results):
                self._on_subscribe(results)
            case Retained(_, topic):
                log.info(
                    "%s: skipping retained messages (old values the broker sends on subscribe, "
                    "e.g. on %r); live messages are read as they come",
                    self.label,
                    topic,
                )
            case SetupFailed(_, text):
                return text
            case Ended(reason):
                return f"the MQTT link process ended unexpectedly ({reason})"
            case Flushed() | Closed() | Wake():
                pass  # nothing to do
            case _:
                assert_never(event)
        return None

    # -- events from the link -----------------------------------------------------------------

    def _on_connect(self, failed: bool, name: str, session_present: bool) -> _Reopen | None:
        if failed:
            if name == _UNSUPPORTED and self._may_fall_back():
                self._fall_back(name)
                return _REOPEN
            hint = self._refusal_hint(name)
            self._note_down(SourceError(f"the broker refused the connection: {name}; {hint}"))
            return None
        if self._ever_connected:
            self.stats.reconnects += 1
        if self._ever_connected and not session_present:
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
            "resumed" if session_present else "new",
            self._settings.mqtt_version,
            ", ".join(self._settings.topics),
        )
        return None

    def _may_fall_back(self) -> bool:
        """Whether a refusal of MQTT 5 makes us speak 3.1.1 (only "auto", never with a
        shared_group: shared subscriptions are MQTT 5)."""
        auto = self.config.mqtt_version == "auto"
        return auto and self._settings.mqtt_version == "5" and self.config.shared_group is None

    def _refusal_hint(self, name: str) -> str:
        if name == _UNSUPPORTED and self.config.mqtt_version == "auto":
            return (
                "shared_group needs MQTT 5 (shared subscriptions), so the source does not fall "
                "back to 3.1.1: remove shared_group, or use a broker that speaks MQTT 5"
            )
        return _CONNECT_HINTS.get(name, "see the broker's log")

    def _fall_back(self, name: str) -> None:
        """Speak 3.1.1 to this broker from now on; say so (once per broker), with the cost."""
        if not _REFUSED_V5.add((self._host, self._port)):
            return
        # "About half": scripts/bench_mqtt.py, agent msg/s with 3.1.1 and a window of 20
        # against the defaults (README, Performance).
        log.warning(
            '%s: the broker at %s:%d refuses MQTT 5 (%s); mqtt_version = "auto" speaks MQTT '
            "3.1.1 to it from now on. With 3.1.1 the broker's max_inflight_messages "
            "(Mosquitto: 20) caps the window: one commit with its fsync per %d messages, and "
            "about half the ingest MQTT 5 reaches. For full speed use a broker that speaks "
            'MQTT 5; set mqtt_version = "3.1.1" to stop asking for 5',
            self.label,
            self._host,
            self._port,
            name,
            self.config.window("3.1.1"),
        )

    def _on_disconnect(self, name: str) -> None:
        if self._stop.is_set() or not self.stats.connected:
            self.stats.connected = False
            return
        hint = ""
        if name == "Unspecified error":  # what paho reports for a dropped socket
            name = "closed by the broker or the network"
        if name == "Session taken over":
            hint = f"; another client connected as {self.client_id}: give each its own client_id"
        if name == "Protocol error":
            # paho drops the connection on a malformed packet: it cannot tell which message
            # that was, so the broker sends it again at every reconnect.
            hint = (
                "; the broker sent a packet that is not valid MQTT (e.g. a property that is "
                "not UTF-8), which comes again at every reconnect: check the broker and the "
                "publisher"
            )
        self._note_down(SourceError(f"lost the connection to the broker ({name}){hint}"))

    def _on_subscribe(self, results: list[Granted]) -> None:
        for granted in results:
            if granted.failed:
                error = SourceError(
                    f"the broker refused the subscription to {granted.topic!r}: "
                    f"{granted.reason} (code {granted.code}); check the broker's ACL for "
                    f"{self.config.username or 'this client'}"
                )
                self.stats.last_error = str(error)
                log.error("%s: %s", self.label, error)
            elif granted.code < self._qos:
                log.warning(
                    "%s: the broker granted QoS %d for %r: messages can be lost on the way",
                    self.label,
                    granted.code,
                    granted.topic,
                )

    # -- messages -----------------------------------------------------------------------------

    def _read_batch(self, batch: list[Message], channel: Channel) -> None:
        """Read forwarded messages into readings and hand them on in puts of about
        _PUT_READINGS, each acknowledged once committed; each unreadable message goes to
        dead_letters on its own."""
        with self._ack_cond:
            self._outstanding += len(batch)
        read = self._reader.read
        readings: list[Reading] = []
        taken: list[Taken] = []
        for topic, payload, size, received, generation, mid, qos in batch:
            ack: Taken = (generation, mid, qos, len(payload))
            try:
                readings += read(topic, payload, size, received)
            except ParseError as exc:
                self._dead_letter(topic, payload, size, exc, channel, ack)
                continue
            taken.append(ack)
            if len(readings) >= _PUT_READINGS:
                self._put(readings, taken, channel)
                readings, taken = [], []
        self.stats.lines += len(batch)
        self.stats.last_data = received  # the last message's: the link sends no empty batch
        self.heartbeat = time.monotonic()
        self._put(readings, taken, channel)
        if self._outstanding >= self._settings.window:
            # The broker sends nothing more until it gets acknowledgements: commit now.
            self._intake.commit_soon()

    def _put(self, readings: list[Reading], taken: list[Taken], channel: Channel) -> None:
        """Hand readings to the buffer; the messages they came from are acknowledged once
        they commit."""
        self.stats.readings += len(readings)
        if not readings:
            if taken:  # nothing to commit for them (parsers never give no readings, but still)
                self._acknowledge(channel, taken)
            return
        on_durable = partial(self._acknowledge, channel, taken)
        self._intake.put(readings, on_durable, self.config.timestamp_field is not None)

    def _acknowledge(self, channel: Channel, taken: list[Taken]) -> None:
        """Runs in the buffer's writer thread once the readings committed: queue the messages'
        acknowledgements for the link (unless that channel is gone: the broker sends them
        again)."""
        with self._ack_cond:
            if channel is not self._channel:
                return
            channel.acknowledge(taken)
            self._outstanding -= len(taken)

    def _dead_letter(
        self,
        topic: str | bytes,
        payload: bytes,
        size: int,
        error: ParseError,
        channel: Channel,
        taken: Taken,
    ) -> None:
        """Keep a message that gives no readings in dead_letters (the topic escaped, the first
        KiB of the payload and its size), counted, logged once per incident; it is
        acknowledged once that commits."""
        self.stats.parse_errors += 1
        oversize = isinstance(error, OversizeError)
        kind = "oversize" if oversize else "unparseable"
        self._intake.count(f"dropped.{kind}.{self.name}")
        shown = topic_text(topic)
        rate_limited = self._oversize_log if oversize else self._bad_message_log
        rate_limited(
            logging.WARNING,
            f"{self.label}: {kind} message on {shown[:_LOGGED_TOPIC_CHARS]!r} ({error}); kept "
            "in dead_letters",
        )
        text = bytes(payload[: _DEAD_LETTER_CHARS * 4]).decode("utf-8", "backslashreplace")
        record = json.dumps(
            {"topic": shown, "payload": text[:_DEAD_LETTER_CHARS], "payload_bytes": size}
        )
        self._intake.put_dead_letter(
            self.config.datasource_id,
            record,
            str(error),
            f"mqtt:{shown}",
            partial(self._acknowledge, channel, [taken]),
        )

    # -- helpers ----------------------------------------------------------------------------

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
