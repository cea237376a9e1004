"""The serial source: lines from a port opened by path, parsed and stamped in UTC.

Bytes become lines in `LineFramer` (bounded memory, garbage counted), lines become values in
the configured parser, values become readings in `RecordBuilder`. pyserial's exceptions are
translated here: a port that cannot be opened or disappears (USB unplugged) is logged once
per outage and reopened with backoff; `silence_timeout_s` reopens a port gone quiet.

A polled source (`request` set) writes its request on the grid of sources/polling.py (shared
with Modbus) and reads one line back within `response_timeout_s`. A poll that overran the next
grid point makes it count as missed, never made up with a burst; an unanswered one is counted
and logged once per incident.
"""

from __future__ import annotations

import logging
import termios
import time

import serial

from edge_agent.clock import Clock, SystemClock, utc_stamp
from edge_agent.errors import ParseError, SourceError
from edge_agent.logs import RateLimitedLog
from edge_agent.parsers import LineFramer, make_line_parser
from edge_agent.records import Reading, RecordBuilder
from edge_agent.sources.base import Intake, SourceConfig
from edge_agent.sources.polling import PolledSource
from edge_agent.sources.serial.config import SerialConfig
from edge_agent.sources.serial.port import open_port

log = logging.getLogger("edge_agent.sources.serial")

_READ_TIMEOUT_S = 0.2
_FIRST_BACKOFF_S = 0.5
# Settings that need the port reopened when they change.
_PORT_KEYS = ("port", "baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff", "rs485")


class SerialSource(PolledSource):
    def __init__(
        self,
        config: SerialConfig,
        device_id: str | None,
        intake: Intake,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config.name, intake)
        self.config = config
        self._clock = clock or SystemClock()
        self._framer = LineFramer(config.max_line_bytes, config.encoding)
        self._parse = make_line_parser(config.line_format())
        self._builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self._bad_line_log = RateLimitedLog(log)
        self._framer_seen = 0
        self._unanswered = 0  # polls in a row without an answer

    def update(self, config: SourceConfig, device_id: str | None) -> bool:
        """Take a reloaded config without reopening the port, when only parsing changed.

        Reopening would discard what waits in the port (pyserial flushes its input on open),
        and a serial device cannot send it again. False: the port itself changed; restart.
        A polled source takes a new request or schedule in place, at its next poll.
        """
        if not isinstance(config, SerialConfig):
            return False
        port_keys = (*_PORT_KEYS, "encoding", "max_line_bytes")
        if any(getattr(config, k) != getattr(self.config, k) for k in port_keys):
            return False
        if (config.request is None) != (self.config.request is None):
            return False  # from pushed lines to polling or back: another loop
        parse = make_line_parser(config.line_format())
        builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self._parse, self._builder, self.config = parse, builder, config
        return True

    @property
    def label(self) -> str:
        return f"serial {self.name}"

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                port = self._open()
            except SourceError as exc:
                self._note_down(str(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.reopen_backoff_max_s)
                continue
            backoff = _FIRST_BACKOFF_S
            try:
                self._read_until_lost(port)
            except SourceError as exc:
                self._note_down(str(exc), backoff)
                self._stop.wait(backoff)
            finally:
                port.close()
                self._framer.reset()
        self.stats.connected = False

    def _open(self) -> serial.Serial:
        timeout = _READ_TIMEOUT_S
        if self.config.request is not None:
            timeout = min(timeout, self.config.answer_timeout_s / 4)
        port = open_port(self.config, timeout)
        if self.stats.last_error is not None:
            self.stats.reconnects += 1
            log.info("%s: %s is back; reading again", self.label, self.config.port)
        else:
            log.info("%s: reading %s at %s", self.label, port.port, self.config.framing_text())
        self.stats.connected = True
        self.stats.last_error = None
        return port

    def _note_down(self, reason: str, backoff: float) -> None:
        was_up = self.stats.connected or self.stats.last_error is None
        self.stats.connected = False
        if was_up:
            log.error(
                "%s: %s; retrying every %.0f s at most (check the cable, the port path and "
                "that the agent's user is in the dialout group)",
                self.label,
                reason,
                self.config.reopen_backoff_max_s,
            )
        self.stats.last_error = reason

    def _read_until_lost(self, port: serial.Serial) -> None:
        if self.config.request is not None:
            self._poll_on_grid(lambda: self._poll_once(port))
            return
        silence = self.config.silence_timeout_s
        last_data = time.monotonic()
        while not self._stop.is_set():
            self.heartbeat = now = time.monotonic()
            try:
                data = port.read(max(1, port.in_waiting))
            except (serial.SerialException, OSError) as exc:
                raise SourceError(f"{self.config.port} disappeared ({exc})") from None
            if data:
                last_data = now
                self._handle(data)
            elif silence is not None and now - last_data > silence:
                raise SourceError(f"no data from {self.config.port} for {silence:.0f} s; reopening")

    # -- polled ---------------------------------------------------------------------------

    def _poll_interval(self) -> float:
        return self.config.poll_interval_s

    def _poll_once(self, port: serial.Serial) -> None:
        """Write the request and read one line back, or count the poll as unanswered."""
        # Bytes of a late answer to the previous poll would be taken for this one's.
        self._framer.reset()
        try:
            port.reset_input_buffer()
            port.write(self.config.request_bytes())
        except (serial.SerialException, OSError, termios.error) as exc:  # tcflush: termios
            raise SourceError(f"{self.config.port} disappeared ({exc})") from None
        deadline = time.monotonic() + self.config.answer_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                data = port.read(max(1, port.in_waiting))
            except (serial.SerialException, OSError) as exc:
                raise SourceError(f"{self.config.port} disappeared ({exc})") from None
            if data and self._handle(data):
                self._answered()
                return
        if not self._stop.is_set():
            self._not_answered()

    def _answered(self) -> None:
        if self._unanswered:
            log.info(
                "%s: %s answers again after %d unanswered poll(s)",
                self.label,
                self.config.port,
                self._unanswered,
            )
        self._unanswered = 0

    def _not_answered(self) -> None:
        self.stats.timeouts += 1
        self._unanswered += 1
        if self._unanswered == 1:
            log.warning(
                "%s: no answer from %s to %r within %g s (counted; said again when it answers); "
                "check the wiring, baudrate and framing, and that the device takes this request",
                self.label,
                self.config.port,
                self.config.request,
                self.config.answer_timeout_s,
            )

    # -- lines ----------------------------------------------------------------------------

    def _handle(self, data: bytes) -> bool:
        """Frame, parse and put what `data` completes; True when it completed a line."""
        lines = self._framer.feed(data)
        self._report_framing()
        if not lines:
            return False
        stamp = utc_stamp(self._clock.wall())
        self.stats.last_data = self._clock.wall()
        readings: list[Reading] = []
        for line in lines:
            self.stats.lines += 1
            try:
                values = self._parse(line)
            except ParseError as exc:
                self._bad_input(f"unparseable line ({exc})")
                continue
            readings.extend(self._builder.build(values, stamp))
        if readings:
            self.stats.readings += len(readings)
            self._intake.put(readings)
        return True

    def _report_framing(self) -> None:
        fs = self._framer.stats
        bad = fs.overlong + fs.undecodable + fs.partial_dropped
        if bad > self._framer_seen:
            new = bad - self._framer_seen
            self._framer_seen = bad
            self._bad_input(
                f"{new} line(s) dropped: over {self.config.max_line_bytes} bytes, not "
                f"{self.config.encoding}, or cut off (so far: overlong {fs.overlong}, "
                f"undecodable {fs.undecodable}, partial {fs.partial_dropped}); "
                "check baudrate and format",
                count=new,
            )

    def _bad_input(self, message: str, count: int = 1) -> None:
        self.stats.parse_errors += count
        self._intake.count(f"dropped.unparseable.{self.name}", count)
        self._bad_line_log(logging.WARNING, f"{self.label}: {message}")
