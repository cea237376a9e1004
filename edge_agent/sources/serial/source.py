"""The serial source: lines from a port opened by path, parsed and stamped in UTC.

Bytes become lines in `LineFramer` (bounded memory, garbage counted), lines become values in
the configured parser, values become readings in `RecordBuilder`. pyserial's exceptions are
translated here: a port that cannot be opened or disappears (USB unplugged) is logged once
per outage and reopened with backoff; `silence_timeout_s` reopens a port gone quiet.
"""

from __future__ import annotations

import logging
import time

import serial

from edge_agent.clock import Clock, SystemClock, utc_stamp
from edge_agent.config import SourceConfig, line_format
from edge_agent.errors import ParseError, SourceError
from edge_agent.logs import RateLimitedLog
from edge_agent.parsers import LineFramer, make_line_parser
from edge_agent.records import Reading, RecordBuilder
from edge_agent.sources.base import Intake, ThreadedSource

log = logging.getLogger("edge_agent.sources.serial")

_READ_TIMEOUT_S = 0.2
_FIRST_BACKOFF_S = 0.5


class SerialSource(ThreadedSource):
    def __init__(
        self,
        config: SourceConfig,
        device_id: str | None,
        intake: Intake,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config.name)
        self.config = config
        self._intake = intake
        self._clock = clock or SystemClock()
        self._framer = LineFramer(config.max_line_bytes, config.encoding)
        self._parse = make_line_parser(line_format(config))
        self._builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self._bad_line_log = RateLimitedLog(log)
        self._framer_seen = 0

    def update(self, config: SourceConfig, device_id: str | None) -> bool:
        """Take a reloaded config without reopening the port, when only parsing changed.

        Reopening would discard what waits in the port (pyserial flushes its input on open),
        and a serial device cannot send it again. False: the port itself changed; restart.
        """
        port_keys = ("port", "baudrate", "encoding", "max_line_bytes")
        if any(getattr(config, k) != getattr(self.config, k) for k in port_keys):
            return False
        parse = make_line_parser(line_format(config))
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
        try:
            port = serial.Serial(
                self.config.port, self.config.baudrate, timeout=_READ_TIMEOUT_S, exclusive=True
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SourceError(f"cannot open {self.config.port}: {exc}") from None
        if self.stats.last_error is not None:
            self.stats.reconnects += 1
            log.info("%s: %s is back; reading again", self.label, self.config.port)
        else:
            log.info("%s: reading %s at %d baud", self.label, port.port, port.baudrate)
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

    def _handle(self, data: bytes) -> None:
        lines = self._framer.feed(data)
        self._report_framing()
        if not lines:
            return
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
