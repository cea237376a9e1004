"""What the agent and the MQTT link say to each other over their socket pair.

Both ends send these frozen dataclasses through multiprocessing.connection (pickled) and read
them with `match`, so mypy checks each side against the other. All but Exit name a channel
(an int the agent chose; it never names two clients in one link process's life).

    agent -> link   Open(channel, settings)       a new paho client for one source
                    Ack(channel, [Taken, ...])    acknowledge these messages to the broker
                    Stop(channel, drain_s)        take no more, flush, wait up to drain_s for
                                                  acknowledgements, disconnect, then Closed
                    Exit()                        no channel left: the process ends
    link -> agent   Messages(channel, [Message, ...])
                    Connected(channel, failed, reason, session_present)
                    ConnectFailed(channel)
                    Disconnected(channel, reason)
                    Subscribed(channel, [Granted, ...])
                    Retained(channel, topic)      the first retained message skipped
                    Flushed(channel)              after Stop: what was taken has been sent
                                                  (a straggler may follow)
                    Closed(channel)               after Stop: once all is acknowledged or the
                                                  drain time is over; nothing follows
                    SetupFailed(channel, text)    the client could not be made (TLS files)

A forwarded message and its acknowledgement stay typed tuples (Message, Taken), not classes:
tens of thousands cross each second, and pickling plus unpickling one costs 0.17 us as a
tuple, 1.1 us as a NamedTuple and 7.4 us as a dataclass (256 to a batch, Python 3.11). mypy
checks their shape where they are made and where they are unpacked.

The broker password crosses in LinkSettings as a Secret: pickled with its value (the link
needs it), shown nowhere (its repr is "Secret('***')", and LinkSettings leaves it out of its
own). Classes are pickled by module and name, so both processes must import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.config import Secret

# A message as forwarded: topic (its bytes if they are not UTF-8), payload (its first
# KEPT_BYTES if it is over max_payload_bytes), the payload's size, receive time (wall clock),
# and what acknowledges it: connection generation, packet id, QoS.
Message = tuple[str | bytes, bytes, int, float, int, int, int]
# What the agent sends back to acknowledge a message: generation, mid, QoS, and the payload
# bytes forwarded (which the window counts).
Taken = tuple[int, int, int, int]


@dataclass(frozen=True)
class LinkSettings:
    """One source's paho client: its broker, identity, session and window."""

    host: str
    port: int
    tls: bool
    ca_file: str | None
    client_cert: str | None
    client_key: str | None
    username: str | None
    password: Secret | None = field(repr=False)  # never in a log line
    client_id: str
    mqtt_version: str  # "3.1.1" or "5"
    keepalive_s: int
    session_expiry_s: int
    window: int
    qos: int
    topics: tuple[str, ...]
    reconnect_max_s: int
    max_payload_bytes: int


# -- agent -> link --------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    channel: int
    settings: LinkSettings


@dataclass(frozen=True)
class Ack:
    channel: int
    taken: list[Taken]


@dataclass(frozen=True)
class Stop:
    channel: int
    drain_s: float


@dataclass(frozen=True)
class Exit:
    pass


Command = Open | Ack | Stop | Exit


# -- link -> agent --------------------------------------------------------------------------


@dataclass(frozen=True)
class Messages:
    channel: int
    messages: list[Message]


@dataclass(frozen=True)
class Connected:
    channel: int
    failed: bool
    reason: str  # paho's name for the reason code ("Success", "Not authorized", ...)
    session_present: bool


@dataclass(frozen=True)
class ConnectFailed:
    channel: int


@dataclass(frozen=True)
class Disconnected:
    channel: int
    reason: str


@dataclass(frozen=True)
class Granted:
    """The broker's answer to one topic of a SUBSCRIBE: the QoS granted, or a refusal."""

    topic: str
    failed: bool
    reason: str
    code: int  # the QoS granted, or the refusal's reason code


@dataclass(frozen=True)
class Subscribed:
    channel: int
    results: list[Granted]


@dataclass(frozen=True)
class Retained:
    channel: int
    topic: str


@dataclass(frozen=True)
class Flushed:
    channel: int


@dataclass(frozen=True)
class Closed:
    channel: int


@dataclass(frozen=True)
class SetupFailed:
    channel: int
    text: str  # what to fix (the TLS files), never a secret


Event = (
    Messages
    | Connected
    | ConnectFailed
    | Disconnected
    | Subscribed
    | Retained
    | Flushed
    | Closed
    | SetupFailed
)
