"""The MQTT link: a child process that runs the paho clients of all the agent's MQTT sources.

    python -m edge_agent.sources.mqtt.link FD PID     (started by the agent's LinkHub, hub.py)

paho decodes every packet in Python. In the agent's process it would share one interpreter
lock with the parsing, the buffer and the uploader, and the bridge would reach about three
quarters of what paho alone manages (measured with MQTT 5). Here paho has a process to itself:
each source has a channel in it, a paho client with its own broker, client id, session and
window, which takes messages, forwards them in batches to the agent over one socket pair (FD),
and sends the PUBACKs the agent asks for, after the readings made from the messages have
committed. Everything else (parsing, logging, counting, deciding) stays in the agent. One
process for all sources: each more source costs a paho client and its thread, not the ~25 MiB
of another interpreter with paho imported.

Messages on the socket pair: the typed commands and events of protocol.py, one channel each.

The link dies with the agent (PR_SET_PDEATHSIG, and the socket closing): a message it took
and the agent never committed is not acknowledged, so the broker sends it again. It ignores
SIGINT and SIGTERM, which a terminal or systemd sends to the whole group: the agent stops it.
A bug in one client's callback ends the whole process: every source sees the link end, and
each broker sends again what its session holds unacknowledged.

At most `window` messages, and INFLIGHT_BYTES of their payloads, are taken and not yet
acknowledged on a channel (QoS 0 ones count too); its broker gets no more until
acknowledgements free room, so TCP slows a broker that ignores the window. With MQTT 5 the
window is announced as Receive Maximum.

Whatever the broker sends, the link forwards it and does not die of it: a topic that is not
UTF-8 is forwarded as bytes, and a payload over `max_payload_bytes` as its first KEPT_BYTES and
its size, so that neither process holds more than one such payload (paho reads each packet
whole). The agent dead-letters both, and the link acknowledges them like any other message.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, assert_never

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.sources.mqtt.protocol import (
    Ack,
    Closed,
    Command,
    Connected,
    ConnectFailed,
    Disconnected,
    Event,
    Exit,
    Flushed,
    Granted,
    LinkSettings,
    Message,
    Messages,
    Open,
    Retained,
    SetupFailed,
    Stop,
    Subscribed,
    Taken,
)

log = logging.getLogger("edge_agent.mqtt_link")

BATCH = 256  # messages forwarded at a time (fewer when the window is smaller)
GATHER_S = 0.025  # after a message, how long before a partial batch is forwarded anyway
FORWARD_BYTES = 1 << 20  # payload bytes that make a batch be forwarded at once
# Payload bytes taken and not yet acknowledged, at most (one message is always let through):
# without it, a window of 1000 messages of max_payload_bytes (256 KiB) would be 256 MiB.
INFLIGHT_BYTES = 8 << 20
KEPT_BYTES = 1024  # of a payload over max_payload_bytes: what the agent dead-letters
_PR_SET_PDEATHSIG = 1


def new_client(settings: LinkSettings) -> mqtt.Client:
    """The paho client for `settings`; raises ssl.SSLError, OSError or ValueError for bad TLS
    files (the agent calls this too, at start-up, to report them before the link starts)."""
    v5 = settings.mqtt_version == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=settings.client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=True,
    )
    if settings.username:
        password = settings.password.reveal() if settings.password is not None else None
        client.username_pw_set(settings.username, password)
    if settings.tls:
        client.tls_set(
            ca_certs=settings.ca_file, certfile=settings.client_cert, keyfile=settings.client_key
        )
    client.reconnect_delay_set(1, max(1, settings.reconnect_max_s))
    return client


class _AckWindow:
    """Messages taken from the broker and not yet acknowledged, on the current connection.

    Each connection is a new generation: a message is acknowledged only on the connection that
    delivered it, because after a reconnect the broker sends it again and may give its packet
    id to another message, which a late acknowledgement would then confirm before its commit.
    """

    def __init__(self, limit: int, limit_bytes: int = INFLIGHT_BYTES) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.unacked = 0
        self.unacked_bytes = 0
        self.generation = 0
        self.closed = False
        self._waiting = False

    @property
    def full(self) -> bool:
        return self.unacked >= self.limit or self.unacked_bytes >= self.limit_bytes

    def new_connection(self) -> None:
        with self._cond:
            self.generation += 1
            self.unacked = 0
            self.unacked_bytes = 0
            self._cond.notify_all()

    def _has_room(self, size: int) -> bool:
        if self.unacked >= self.limit:
            return False
        return not self.unacked or self.unacked_bytes + size <= self.limit_bytes

    def take(self, size: int) -> int | None:
        """Wait for room for one more message of `size` payload bytes; its generation, or None
        once closed."""
        with self._lock:  # the common case, on the plain lock: room is free
            if self._has_room(size) and not self.closed:
                self.unacked += 1
                self.unacked_bytes += size
                return self.generation
        with self._cond:
            while not self._has_room(size) and not self.closed:
                self._waiting = True
                self._cond.wait()
            if self.closed:
                return None
            self.unacked += 1
            self.unacked_bytes += size
            return self.generation

    def acknowledge(self, client: mqtt.Client, taken: list[Taken]) -> None:
        with self._cond:
            current = self.generation
            freed = freed_bytes = 0
            for generation, mid, qos, size in taken:
                if generation == current:
                    if qos:
                        client.ack(mid, qos)
                    freed += 1
                    freed_bytes += size
            if freed:
                self.unacked -= freed
                self.unacked_bytes -= freed_bytes
                if self._waiting or self.unacked == 0:
                    self._waiting = False
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.unacked == 0, timeout)


def _fatal(callback: Callable[..., None]) -> Callable[..., None]:
    """A callback whose exception ends the link: paho's thread would die with it and leave the
    process connected but deaf. The agent sees the link end and starts a new one."""

    @functools.wraps(callback)
    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("unexpected error in %s; the agent starts a new link", callback.__name__)
            os._exit(3)

    return guarded


class _Wire:
    """The one socket pair to the agent, shared by every channel: one message at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, event: Event) -> None:
        with self.lock:
            self.conn.send(event)


class Link:
    """One paho client (one source's channel), forwarding on the shared wire."""

    def __init__(self, wire: _Wire, channel: int, settings: LinkSettings) -> None:
        self._wire = wire
        self.channel = channel
        self._settings = settings
        self._window = _AckWindow(settings.window)
        self._lock = threading.Lock()  # guards _out
        self._out: list[Message] = []
        self._out_bytes = 0
        self._arrived = threading.Event()
        self._retained_noted = False
        self._subscriptions: dict[int, list[str]] = {}
        self._stopped = threading.Event()
        self._stopping = False
        self.client = new_client(settings)
        c = self.client
        c.on_connect = _fatal(self._on_connect)
        c.on_connect_fail = _fatal(self._on_connect_fail)
        c.on_disconnect = _fatal(self._on_disconnect)
        c.on_subscribe = _fatal(self._on_subscribe)
        c.on_message = _fatal(self._on_message)

    def start(self) -> None:
        s = self._settings
        if s.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s
            props.ReceiveMaximum = s.window
            self.client.connect_async(
                s.host, s.port, s.keepalive_s, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(s.host, s.port, s.keepalive_s)
        self.client.loop_start()
        threading.Thread(
            target=self._forward_stragglers, name=f"stragglers-{self.channel}", daemon=True
        ).start()

    # -- commands from the agent (the main thread) ------------------------------------------

    def acknowledge(self, taken: list[Taken]) -> None:
        self._window.acknowledge(self.client, taken)

    def stop(self, drain_s: float, on_closed: Callable[[], None]) -> None:
        """Stop in a thread of its own: the main thread goes on serving the other channels
        (and this one's acknowledgements)."""
        if self._stopping:
            return
        self._stopping = True
        threading.Thread(
            target=self._stop, args=(drain_s, on_closed), name=f"stop-{self.channel}", daemon=True
        ).start()

    def _stop(self, drain_s: float, on_closed: Callable[[], None]) -> None:
        """Take no more, forward what was taken, let the agent acknowledge it, disconnect.

        A message paho's thread took just before the window closed still reaches the agent
        (the straggler thread forwards it until _stopped)."""
        self._window.close()
        self._forward()
        self._wire.send(Flushed(self.channel))
        self._window.wait_empty(drain_s)
        self._stopped.set()
        self._forward()
        self.client.disconnect()
        self.client.loop_stop()
        on_closed()
        self._wire.send(Closed(self.channel))

    # -- forwarding -------------------------------------------------------------------------

    def _forward(self) -> None:
        # Swap and send under the wire's lock, so batches leave in the order they were taken
        # (and their PUBACKs, later, in the order of the PUBLISHes).
        with self._wire.lock:
            with self._lock:
                out, self._out = self._out, []
                self._out_bytes = 0
            if out:
                self._wire.conn.send(Messages(self.channel, out))

    def _forward_stragglers(self) -> None:
        while not self._stopped.is_set():
            if not self._arrived.wait(1.0):
                continue
            time.sleep(GATHER_S)
            self._arrived.clear()
            self._forward()

    # -- paho callbacks (paho's network thread) ---------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = _topic(message)
        if message.retain:
            # Sent because we subscribed, not because a sensor just published: an old value
            # that would get today's timestamp, and is sent again at every reconnect.
            if not self._retained_noted:
                self._retained_noted = True
                self._wire.send(Retained(self.channel, topic_text(topic)))
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        payload = bytes(message.payload)
        size = len(payload)
        if size > self._settings.max_payload_bytes:
            payload = payload[:KEPT_BYTES]  # dead-lettered: the prefix shows what it was
        window = self._window
        generation = window.take(len(payload))
        if generation is None:
            return  # stopping: not acknowledged, the broker keeps it for the next session
        item: Message = (topic, payload, size, time.time(), generation, message.mid, message.qos)
        with self._lock:
            self._out.append(item)
            self._out_bytes += len(payload)
            n = len(self._out)
            forward = n >= BATCH or self._out_bytes >= FORWARD_BYTES
        if n == 1:
            self._arrived.set()
        if forward or window.full:
            self._forward()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._window.new_connection()
        self._wire.send(
            Connected(self.channel, reason.is_failure, reason.getName(), flags.session_present)
        )
        if reason.is_failure:
            return
        topics = list(self._settings.topics)
        result, mid = client.subscribe([(t, self._settings.qos) for t in topics])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subscriptions[mid] = topics

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._wire.send(ConnectFailed(self.channel))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._window.new_connection()
        if not self._stopped.is_set():
            self._wire.send(Disconnected(self.channel, reason.getName()))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        topics = self._subscriptions.pop(mid, [])
        results = [
            Granted(topic, reason.is_failure, reason.getName(), int(reason.value))
            for topic, reason in zip(topics, reasons, strict=False)
        ]
        self._wire.send(Subscribed(self.channel, results))


def _forget(links: dict[int, Link], channel: int) -> None:
    links.pop(channel, None)


def serve(conn: Connection) -> None:
    """Open, acknowledge and stop channels as the agent says, until it says exit or is gone."""
    wire = _Wire(conn)
    links: dict[int, Link] = {}
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            return  # the agent is gone: what it did not acknowledge comes again
        if not isinstance(command, Command):
            raise ValueError(f"unknown command from the agent: {type(command).__name__}")
        match command:
            case Ack(channel, taken):
                link = links.get(channel)
                if link is not None:
                    link.acknowledge(taken)
            case Open(channel, settings):
                try:
                    link = Link(wire, channel, settings)
                except (ssl.SSLError, OSError, ValueError) as exc:
                    text = f"cannot set up TLS ({exc}); check ca_file, client_cert and client_key"
                    wire.send(SetupFailed(channel, text))
                    continue
                links[channel] = link
                link.start()
            case Stop(channel, drain_s):
                link = links.get(channel)
                if link is not None:
                    link.stop(drain_s, functools.partial(_forget, links, channel))
            case Exit():
                return
            case _:
                assert_never(command)


def _topic(message: mqtt.MQTTMessage) -> str | bytes:
    """The message's topic, or its bytes when they are not UTF-8 (MQTT requires UTF-8, but a
    broker may forward such a topic; paho raises when asked for it as text)."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return bytes(message._topic)  # paho keeps the raw topic here and has no public name


def topic_text(topic: str | bytes) -> str:
    r"""A topic as text, with any bytes that are not UTF-8 written as \xff."""
    return topic if isinstance(topic, str) else topic.decode("utf-8", "backslashreplace")


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closing socket ends the link instead
        pass
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(0)


def main(argv: list[str]) -> int:
    fd = int(argv[0])
    parent = int(argv[1])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="edge-agent mqtt link: %(message)s")
    serve(Connection(socket.socket(fileno=fd).detach()))
    return 0


if __name__ == "__main__":
    # Run the module under its own name, not as a copy in __main__: one module per name, as
    # the classes of protocol.py that the agent pickles expect.
    from edge_agent.sources.mqtt import link

    sys.exit(link.main(sys.argv[1:]))
