"""`edge-agent run`: the agent as a long-running service.

Owns the main loop and what surrounds the agent in production: signals (SIGTERM/SIGINT stop,
SIGHUP reloads), systemd's notify protocol and watchdog, the status endpoint, and the ring of
recent errors shown on it. The loop wakes once a second: it reloads when asked, lets the
agent watch its clock, pings the watchdog only while every component makes progress, tells
systemd a one-line status (readings waiting, the oldest, the last upload) for `systemctl
status`, and stops the agent with a clear message if the buffer writer died.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from edge_agent.agent import Agent, snapshot
from edge_agent.config import DEFAULT_STATUS_LISTEN, Config
from edge_agent.errors import EdgeAgentError
from edge_agent.logs import RecentErrors
from edge_agent.status import StatusServer, render_status_line, status_document
from edge_agent.systemd import Notifier, Watchdog, stalled

log = logging.getLogger("edge_agent.service")

# How often the STATUS= line for `systemctl status` is refreshed (it reads the buffer's stats).
STATUS_LINE_INTERVAL_S = 10.0


class Service:
    def __init__(self, config: Config) -> None:
        self.agent = Agent(config)
        self.notifier = Notifier.from_env()
        self.errors = RecentErrors()
        self.status: StatusServer | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        # A blocking request may legitimately hold the uploader for timeout_s.
        self._max_stall = max(45.0, config.endpoint.timeout_s + 15.0)
        self.watchdog = Watchdog(self.notifier, self._wedged)
        self._status_line_due = 0.0
        self._unhealthy_after_s = config.status.unhealthy_after_s
        self._status_line = ""

    def _wedged(self) -> list[str]:
        beats = {"uploader": self.agent.uploader.heartbeat}
        beats.update({f"source {n}": s.heartbeat for n, s in self.agent.sources.items()})
        names = stalled(beats, time.monotonic(), self._max_stall)
        if not self.agent.buffer.alive:
            names.append("buffer writer")
        return names

    def run(self) -> int:
        logging.getLogger("edge_agent").addHandler(self.errors)
        self._install_signals()
        self.agent.start()
        try:
            self._start_status()
            self.notifier.ready()
            self._tell_status(time.monotonic())
            return self._loop()
        finally:
            self.notifier.stopping()
            if self.status is not None:
                self.status.stop()
            self.agent.stop()

    def _start_status(self) -> None:
        listen = self.agent.config.status.address
        if listen is None:
            return
        server = StatusServer(
            listen,
            lambda: snapshot(self.agent, self.errors.lines()),
            unhealthy_after_s=self.agent.config.status.unhealthy_after_s,
        )
        try:
            self.status = server.start()
        except EdgeAgentError as exc:
            if listen != DEFAULT_STATUS_LISTEN:
                raise  # asked for by name: a start-up error
            # The built-in default is a convenience: readings matter more than the page.
            log.warning(
                "agent: %s; running without the status page: set [status] listen to a free "
                'address, or "off"',
                exc,
            )
            return
        log.info("agent: status page on %s", self.status.url)

    def _tell_status(self, now: float) -> None:
        """Refresh the STATUS= line `systemctl status` shows, every STATUS_LINE_INTERVAL_S."""
        if not self.notifier.enabled or now < self._status_line_due:
            return
        self._status_line_due = now + STATUS_LINE_INTERVAL_S
        try:
            doc = status_document(snapshot(self.agent, []), self._unhealthy_after_s)
            line = render_status_line(doc, time.time())
        except EdgeAgentError as exc:  # the buffer is unreadable: say so, the loop goes on
            line = f"running; cannot read the buffer's stats: {exc}"
        if line != self._status_line:
            self._status_line = line
            self.notifier.status(line)

    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _loop(self) -> int:
        while not self._stop.wait(1.0):
            if self._reload.is_set():
                self._reload.clear()
                self.notifier.reloading()
                self.agent.reload()
                self.notifier.ready()
            self.agent.tick()
            self.watchdog.tick(time.monotonic())
            self._tell_status(time.monotonic())
            problem = self.agent.check_health()
            if problem is not None:
                log.error("agent: stopping: %s", problem)
                return 1
        return 0
