"""The `[[sources]]` keys of a serial source: the port, its framing, polling and parsing.

Framing (`bytesize`, `parity`, `stopbits`, flow control, `rs485`) is shared with the Modbus
RTU source through `SerialFraming`. A source with `request` polls: it writes the request
every `poll_interval_s` and reads one line back; without it, it reads pushed lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent.errors import ConfigError
from edge_agent.parsers import LineFormat, make_line_parser
from edge_agent.sources.base import SourceConfig
from edge_agent.tables import check_range

Parity = Literal["N", "E", "O", "M", "S"]
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "\\": "\\", "0": "\0"}


@dataclass(frozen=True, kw_only=True)
class SerialFraming:
    """How bytes travel on a serial line; the keys a serial and a Modbus RTU source share."""

    port: str | None = None
    baudrate: int = 9600
    bytesize: int = 8
    parity: Parity = "N"
    stopbits: float = 1.0
    rtscts: bool = False
    xonxoff: bool = False
    rs485: bool = False

    def check_framing(self, where: str, table: Mapping[str, Any]) -> None:
        if not self.port:
            raise ConfigError(f'{where} port: missing; e.g. port = "/dev/serial/by-id/usb-..."')
        check_range(self.baudrate, 50, 4_000_000, f"{where} baudrate")
        check_range(self.bytesize, 5, 8, f"{where} bytesize")
        if self.stopbits not in (1.0, 1.5, 2.0):
            raise ConfigError(f"{where} stopbits: expected 1, 1.5 or 2, got {self.stopbits:g}")
        if self.rtscts and self.xonxoff:
            raise ConfigError(f"{where}: set only one of rtscts (hardware) or xonxoff (software)")
        if self.rs485 and self.rtscts:
            raise ConfigError(
                f"{where} rs485: RS-485 mode drives RTS for the direction; it cannot be used "
                "with rtscts flow control"
            )

    def framing_text(self) -> str:
        """`9600 baud 8E1`, as a technician reads a device's label."""
        stop = f"{self.stopbits:g}"
        text = f"{self.baudrate} baud {self.bytesize}{self.parity}{stop}"
        flow = [n for n, on in (("RTS/CTS", self.rtscts), ("XON/XOFF", self.xonxoff)) if on]
        if flow:
            text += f" flow {'+'.join(flow)}"
        return text + (" RS-485" if self.rs485 else "")


@dataclass(frozen=True, kw_only=True)
class SerialConfig(SerialFraming, SourceConfig):
    columns: tuple[str, ...] = ()
    delimiter: str = ","
    pattern: str | None = None
    metric: str = "value"
    max_line_bytes: int = 4096
    encoding: str = "utf-8"
    silence_timeout_s: float | None = None
    reopen_backoff_max_s: float = 30.0
    # polled mode
    request: str | None = None
    poll_interval_s: float = 1.0
    response_timeout_s: float = 1.0

    def polled(self) -> bool:
        return self.request is not None

    def check(self, where: str, table: Mapping[str, Any]) -> None:
        self.check_framing(where, table)
        check_range(self.max_line_bytes, 16, 1_048_576, f"{where} max_line_bytes")
        if self.silence_timeout_s is not None:
            check_range(self.silence_timeout_s, 1.0, 86_400.0, f"{where} silence_timeout_s")
        check_range(self.reopen_backoff_max_s, 0.1, 3600.0, f"{where} reopen_backoff_max_s")
        if self.format == "csv" and not self.columns:
            raise ConfigError(f'{where} columns: format "csv" needs columns = ["name", ...]')
        try:
            make_line_parser(self.line_format())
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ConfigError(f"{where} encoding: unknown encoding {self.encoding!r}") from None
        self._check_polling(where, table)

    def _check_polling(self, where: str, table: Mapping[str, Any]) -> None:
        if self.request is None:
            for key in ("poll_interval_s", "response_timeout_s"):
                if key in table:
                    raise ConfigError(
                        f'{where} {key}: only a polled source takes it; set request = "R\\r\\n" '
                        "(what the device must be sent) or remove the key"
                    )
            return
        try:
            request = self.request_bytes()
        except ValueError as exc:
            raise ConfigError(f"{where} request: {exc}") from None
        if not request:
            raise ConfigError(
                f"{where} request: must not be empty (leave it out to read pushed lines)"
            )
        check_range(self.poll_interval_s, 0.05, 86_400.0, f"{where} poll_interval_s")
        check_range(self.response_timeout_s, 0.01, 600.0, f"{where} response_timeout_s")
        if "response_timeout_s" in table and self.response_timeout_s > self.poll_interval_s:
            raise ConfigError(
                f"{where} response_timeout_s: {self.response_timeout_s:g} s is longer than "
                f"poll_interval_s ({self.poll_interval_s:g} s); a poll must end before the next"
            )
        if self.silence_timeout_s is not None:
            raise ConfigError(
                f"{where} silence_timeout_s: a polled source counts unanswered polls instead; "
                "remove silence_timeout_s"
            )

    @property
    def answer_timeout_s(self) -> float:
        """How long a poll waits for its answer: `response_timeout_s`, within the interval."""
        return min(self.response_timeout_s, self.poll_interval_s)

    def line_format(self) -> LineFormat:
        """The parser settings of this source."""
        return LineFormat(
            kind=self.format,
            columns=self.columns,
            delimiter=self.delimiter,
            pattern=self.pattern,
            metric=self.metric,
        )

    def request_bytes(self) -> bytes:
        """`request` with `\\r`, `\\n`, `\\t`, `\\\\`, `\\0` and `\\xNN` turned into bytes."""
        assert self.request is not None
        return parse_escapes(self.request)

    def describe(self) -> str:
        what = f"serial {self.port} at {self.framing_text()}"
        if self.request is not None:
            what += f", polled with {self.request!r} every {self.poll_interval_s:g} s"
        return what

    def serial_port(self) -> tuple[str, str] | None:
        return None if self.port is None else (self.port, f"serial:{self.name}")


def parse_escapes(text: str) -> bytes:
    """Bytes of a request written with backslash escapes; ValueError names a bad one."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code.startswith("x") and len(code) == 3:
            return chr(int(code[1:], 16))
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        raise ValueError(
            f"unknown escape \\{code}; use \\r, \\n, \\t, \\\\, \\0 or \\xNN (two hex digits)"
        )

    decoded = _ESCAPE_RE.sub(one, text)
    try:
        return decoded.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("use \\xNN for bytes that are not ASCII") from None
