"""The agent's side of the MQTT link: one link process shared by every MQTT source.

    LinkHub       starts the link process (link.py) when a source opens the first channel,
                  routes what the link sends to each channel, sends commands and
                  acknowledgements to it, and ends it when the last source has stopped
    Channel       one source's paho client in the link: its events in order, its commands
    HUB           the agent's one hub

Each MQTT source costs the link one paho client (its own broker, client id, session and
window), not a process of ~25 MiB. They share its fate: when the link process dies, every open
channel ends with the same reason; each source backs off and opens a new channel (the first
one starts a new process), and each broker sends again what its session holds unacknowledged.

The process is started from a thread of the hub that lives exactly as long as the process
(its reader): PR_SET_PDEATHSIG, which kills the link when the agent dies, fires when the
*thread* that started it ends, and a source's thread may end long before the others.

HUB is one per process because the agent's sources are: the plugin interface gives sources
no shared context to hold it, and one process needs one link.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

from edge_agent.errors import SourceError
from edge_agent.sources.mqtt.protocol import (
    Ack,
    Closed,
    Command,
    Event,
    Exit,
    LinkSettings,
    Open,
    Stop,
    Taken,
)

_LINK_MODULE = "edge_agent.sources.mqtt.link"
_START_S = 10.0  # how long starting the process may take before a source gives up and retries
_EXIT_S = 5.0  # how long the link may take to exit once no channel is left


@dataclass(frozen=True)
class Ended:
    """The link process ended (or never started) while the channel was open; nothing follows."""

    reason: str


@dataclass(frozen=True)
class Wake:
    """Nothing happened: whoever waits on a channel's events looks at its stop flag."""


# What a channel's `events` queue holds: the link's events for it, and the hub's own two.
ChannelEvent = Event | Ended | Wake


class Channel:
    """One source's client in the link. `events` holds what the link sent for it, in order,
    then Ended if the link process dies."""

    def __init__(self, process: _LinkProcess, number: int) -> None:
        self.number = number
        self.pid = process.pid
        self.events: queue.SimpleQueue[ChannelEvent] = queue.SimpleQueue()
        self._process = process
        self._stop_sent = False

    def acknowledge(self, taken: list[Taken]) -> None:
        """Queue acknowledgements (never waits on the link's socket: the buffer's writer
        thread calls this)."""
        self._process.send(Ack(self.number, taken))

    def stop(self, drain_s: float) -> None:
        """Ask the link to flush this client, wait up to `drain_s` for its acknowledgements,
        disconnect it and answer Closed."""
        if not self._stop_sent:
            self._stop_sent = True
            self._process.send(Stop(self.number, float(drain_s)))

    def wake(self) -> None:
        """Wake whoever waits on `events` (the source, when it is told to stop)."""
        self.events.put(Wake())

    def close(self) -> None:
        """Forget this channel; the link drops its client at once if it still runs."""
        self.stop(0.0)
        self._process.forget(self)


class _LinkProcess:
    """One run of the link process: its reader thread (which started it), its sender thread,
    and the channels open in it."""

    def __init__(self, hub: LinkHub) -> None:
        self._hub = hub
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards channels and dead
        self.channels: dict[int, Channel] = {}
        self.dead = False
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._start_error: str | None = None
        self._reader = threading.Thread(target=self._run, name="mqtt-link-reader", daemon=True)

    def start(self) -> None:
        """Start the process (from the reader thread); raises SourceError if it cannot."""
        self._reader.start()
        if not self._started.wait(_START_S):
            self._start_error = "the MQTT link process did not start in time"
        if self._start_error is not None:
            self.dead = True
            raise SourceError(self._start_error)

    def send(self, command: Command) -> None:
        self._outbox.put(command)

    def add(self, channel: Channel) -> bool:
        with self._lock:
            if self.dead:
                return False
            self.channels[channel.number] = channel
            return True

    def forget(self, channel: Channel) -> None:
        with self._lock:
            self.channels.pop(channel.number, None)

    def exit(self) -> None:
        """End the process (no channel is left) and wait until it has."""
        self._outbox.put(Exit())
        self._outbox.put(None)
        self._reader.join(_EXIT_S + 2.0)

    # -- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", _LINK_MODULE, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            self._start_error = f"cannot start the MQTT link process ({exc})"
            return
        finally:
            theirs.close()
            self._started.set()
        self.pid = self.proc.pid
        conn = Connection(ours.detach())
        sender = threading.Thread(
            target=self._send_all, args=(conn,), name="mqtt-link-sender", daemon=True
        )
        sender.start()
        try:
            self._route(conn)
        finally:
            self._end(self.proc)
            self._outbox.put(None)
            conn.close()  # a send still under way fails now
            sender.join(5.0)

    def _route(self, conn: Connection) -> None:
        """Hand each event to its channel until the link closes the socket."""
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                return
            if not isinstance(event, Event):  # a bug in the link: end it, the sources reopen
                raise TypeError(f"the MQTT link sent {type(event).__name__}, not an event")
            with self._lock:
                channel = self.channels.get(event.channel)
                if isinstance(event, Closed):
                    self.channels.pop(event.channel, None)
            if channel is not None:
                channel.events.put(event)

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        """The process ended (or is told to): reap it, tell every channel still open."""
        self._hub.ended(self)
        with self._lock:
            self.dead = True
            channels, self.channels = list(self.channels.values()), {}
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_EXIT_S)  # it closed its end as it died (or exits): let it finish
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reason = _ended(proc.returncode)
        for channel in channels:
            channel.events.put(Ended(reason))

    def _send_all(self, conn: Connection) -> None:
        """Send commands and acknowledgements in the order they were queued; its own thread,
        so neither a source nor the buffer's writer waits on the link's socket."""
        while (item := self._outbox.get()) is not None:
            try:
                conn.send(item)
            except OSError:
                return  # the link is gone: the brokers send those messages again


class LinkHub:
    """The link process shared by the MQTT sources: started on demand, ended with the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._process: _LinkProcess | None = None
        self._numbers = 0

    def join(self) -> None:
        """A source starts: keep the link for it."""
        with self._lock:
            self._users += 1

    def leave(self) -> None:
        """A source has stopped (its channel closed): end the link if it was the last."""
        with self._lock:
            self._users -= 1
            process = self._process if self._users == 0 else None
            if process is not None:
                self._process = None
        if process is not None:
            process.exit()

    def open(self, settings: LinkSettings) -> Channel:
        """A new channel for `settings`, starting the link process if none runs; raises
        SourceError if it cannot start."""
        with self._lock:
            process = self._process
            if process is None or process.dead:
                process = _LinkProcess(self)
                process.start()
                self._process = process
            self._numbers += 1
            channel = Channel(process, self._numbers)
        if not process.add(channel):
            channel.events.put(Ended("it ended as the channel opened"))
            return channel
        process.send(Open(channel.number, settings))
        return channel

    def ended(self, process: _LinkProcess) -> None:
        with self._lock:
            if self._process is process:
                self._process = None


def _ended(returncode: int | None) -> str:
    """How a link process ended, for the log."""
    if returncode is None:
        return "it stopped answering"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


HUB = LinkHub()
