"""A simulated serial sensor: writes sensor lines to a pseudo-terminal, like a USB device.

The agent's real serial source opens the pty by path (a stable symlink, the way
/dev/serial/by-id/... links work), so the demo and the tests exercise the same code as a
gateway with hardware. `unplug` closes the pty, as pulling the USB cable does; `plug` makes a
new one behind the same link.
"""

from __future__ import annotations

import math
import os
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path


def kv_line(seq: int, t: float) -> str:
    """A plausible weather-station line carrying a sequence number."""
    temperature = 21.0 + 3.0 * math.sin(t / 60.0) + (seq % 7) * 0.05
    humidity = 45.0 + 5.0 * math.cos(t / 90.0)
    return f"seq={seq} temperature={temperature:.2f} humidity={humidity:.1f}"


class PtySensor:
    """Writes `line_for(seq, time)` at `rate_hz` to a pty reachable at `link`."""

    def __init__(
        self,
        link: Path,
        rate_hz: float = 5.0,
        line_for: Callable[[int, float], str] = kv_line,
    ) -> None:
        self.link = link
        self.rate_hz = rate_hz
        self._line_for = line_for
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0  # lines written while plugged in
        self.lost_unplugged = 0  # lines the sensor produced while unplugged (never sent)

    def plug(self) -> None:
        """Create a pty and point the link at it."""
        master, slave = os.openpty()
        # Raw mode: no echo back to the master (which nobody reads) and no CR/LF rewriting.
        tty.setraw(slave)
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.link)
        with self._lock:
            self._master, self._slave = master, slave

    def unplug(self) -> None:
        """Close the pty: the reader sees the device disappear."""
        with self._lock:
            fds = (self._master, self._slave)
            self._master = self._slave = None
        for fd in fds:
            if fd is not None:
                os.close(fd)
        self.link.unlink(missing_ok=True)

    def write_line(self, line: str) -> bool:
        with self._lock:
            if self._master is None:
                return False
            os.write(self._master, line.encode() + b"\r\n")
            return True

    def start(self) -> PtySensor:
        """Start writing (plugging in first if needed)."""
        if self._master is None:
            self.plug()
        self._thread = threading.Thread(target=self._run, name="pty-sensor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing; the pty stays until `unplug`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += period
            seq = self.written + self.lost_unplugged
            if self.write_line(self._line_for(seq, time.time())):
                self.written += 1
            else:
                self.lost_unplugged += 1


class PtyResponder:
    """A polled instrument on a pty: answers each request line with `answer(request)`.

    `delay_s` holds each answer back (a slow device); `answer` returning None leaves a request
    unanswered (a device that is off or does not understand it). Like `PtySensor`, the pty is
    reached through `link`, and `requests` counts what the device was asked.
    """

    def __init__(
        self,
        link: Path,
        answer: Callable[[bytes], str | None],
        delay_s: float = 0.0,
    ) -> None:
        self.link = link
        self.answer = answer
        self.delay_s = delay_s
        self.requests: list[tuple[float, bytes]] = []  # (wall time, request) as received
        self.answered = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PtyResponder:
        master, slave = os.openpty()
        tty.setraw(slave)
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.link)
        self._master, self._slave = master, slave
        self._thread = threading.Thread(target=self._run, name="pty-responder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None
        self.link.unlink(missing_ok=True)

    def _run(self) -> None:
        import select

        assert self._master is not None
        pending = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                pending += os.read(self._master, 4096)
            except OSError:  # the reader closed its end for a moment (reopen)
                time.sleep(0.05)
                continue
            while b"\n" in pending:
                request, pending = pending.split(b"\n", 1)
                self._respond(request + b"\n")

    def _respond(self, request: bytes) -> None:
        self.requests.append((time.time(), request))
        reply = self.answer(request)
        if reply is None:
            return
        if self.delay_s and self._stop.wait(self.delay_s):
            return
        assert self._master is not None
        os.write(self._master, reply.encode() + b"\r\n")
        self.answered += 1
