"""Talking to systemd: the sd_notify protocol and the decision when to ping the watchdog.

systemd starts the agent with `Type=notify` and `WatchdogSec=`, and passes NOTIFY_SOCKET (a path,
or an abstract socket name written with a leading "@") and WATCHDOG_USEC / WATCHDOG_PID in the
environment. The protocol is one datagram of "KEY=VALUE" lines per message, so this needs no
libsystemd and nothing compiled. Without NOTIFY_SOCKET (a terminal, a test, a container) every
method does nothing.

`Notifier` only sends. `Watchdog` decides: it pings at half the watchdog period while its checks
report no wedged component, and withholds pings while they do, so that systemd restarts an agent
whose threads are alive but stuck (which a crash-only supervisor would never notice).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("edge_agent.systemd")


class Notifier:
    """Sends sd_notify messages to the socket systemd named; never raises on a failed send."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._lock = threading.Lock()
        self._failing = False  # a failure was logged; log again only after a success

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """The notifier systemd asked for: NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.

        The watchdog is ours only when WATCHDOG_PID is unset or is this process (`pid`,
        default os.getpid()): a child that inherited the variables must not ping for us.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        owner = _positive_int(env.get("WATCHDOG_PID"))
        if owner is not None and owner != (os.getpid() if pid is None else pid):
            usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to (the agent runs under systemd)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC); None if none was asked for."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self) -> bool:
        return self.notify("READY=1")

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants MONOTONIC_USEC with RELOADING=1 to order
        # the reload against its own clock; older versions ignore the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """The one-line status `systemctl status` shows; newlines would end the field."""
        return self.notify("STATUS=" + " ".join(text.split()))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def notify(self, *fields: str) -> bool:
        """Send one message; True if it went out. Failures are logged once, never raised."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            self._note_failure(exc)
            return False
        self._note_success()
        return True

    def _note_failure(self, exc: OSError) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first:
            log.warning(
                "systemd: cannot notify %s (%s); the service manager may think the agent is "
                "not ready or hung",
                self._printable_address(),
                exc.strerror or exc,
            )

    def _note_success(self) -> None:
        with self._lock:
            recovered, self._failing = self._failing, False
        if recovered:
            log.info("systemd: notifications reach %s again", self._printable_address())

    def _printable_address(self) -> str:
        address = self._address or b""
        return address.decode(errors="replace").replace("\0", "@", 1)


def _socket_address(name: str) -> bytes:
    # "@name" is Linux's abstract namespace: the kernel address starts with a NUL byte.
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name.encode()


def _positive_int(text: str | None) -> int | None:
    if text is None or not text.strip().isdigit():
        return None
    value = int(text)
    return value if value > 0 else None


def stalled(heartbeats: Mapping[str, float], now: float, max_age: float) -> list[str]:
    """Names whose heartbeat (a time.monotonic() value) is older than `max_age` seconds."""
    return sorted(name for name, beat in heartbeats.items() if now - beat > max_age)


class Watchdog:
    """Pings the systemd watchdog while the agent is healthy, and stops while it is not.

    `checks()` returns the names of wedged components (an empty list when all is well). `tick`
    is called from the main loop, more often than the interval; it asks `checks()` when a ping
    is due and pings only if nothing is wedged. While something is, it asks on every tick, so
    pings resume as soon as the component recovers. If nothing recovers within WatchdogSec,
    systemd kills the agent and restarts it.
    """

    def __init__(
        self,
        notifier: Notifier,
        checks: Callable[[], list[str]],
        interval: float | None = None,
    ) -> None:
        self._notifier = notifier
        self._checks = checks
        self._interval = notifier.watchdog_interval() if interval is None else interval
        self._due: float | None = None  # None: ping at the first tick
        self._withheld: list[str] = []

    @property
    def interval(self) -> float | None:
        """Seconds between pings; None when systemd asked for no watchdog (tick does nothing)."""
        return self._interval

    def tick(self, now: float) -> bool:
        """Ping if one is due and nothing is wedged; True if a ping was sent."""
        if self._interval is None or (self._due is not None and now < self._due):
            return False
        wedged = self._checks()
        if wedged:
            if wedged != self._withheld:
                log.warning(
                    "systemd: not pinging the watchdog: %s stopped making progress; systemd "
                    "restarts the agent unless it recovers",
                    ", ".join(wedged),
                )
            self._withheld = wedged
            return False
        if self._withheld:
            log.info(
                "systemd: %s made progress again; pinging the watchdog again",
                ", ".join(self._withheld),
            )
            self._withheld = []
        self._notifier.watchdog()
        self._due = now + self._interval
        return True
