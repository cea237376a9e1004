"""The wire to a Modbus network: one serial port or TCP connection, and its lock.

A `Link` owns one pymodbus client whose port or socket we open ourselves (so an open failure
says why, and `rs485` can switch pyserial's RS-485 mode on), and translates pymodbus's
exceptions once, here: the link is lost (`SourceError`: close, reopen with backoff) or one
request failed while the link stays up (`RequestFailed`: no answer, a garbled answer, or an
exception response). pymodbus retries nothing (a dead unit costs one timeout per request) and
never closes or reopens on its own; the source decides.

Sources whose link settings are equal (several unit ids on one RS-485 port, several units
behind one TCP gateway) share one `Link` from `LinkPool`: a port opened exclusively can only
be opened once, and a bus carries one request at a time. Holding `Link.lock` is holding the
wire. The pool is per process because the port is.
"""

from __future__ import annotations

import logging
import math
import socket
import termios
import threading
from typing import Literal

import serial
import serial.rs485
from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from edge_agent.errors import SourceError
from edge_agent.sources.modbus.config import BIT_KINDS, Kind, ModbusConfig

Fault = Literal["timeout", "garbled", "exception"]

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_NEVER = 1 << 30


class RequestFailed(SourceError):
    """One request got no usable answer; the link itself is still up."""

    def __init__(self, fault: Fault, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.fault = fault
        self.code = code


class FairLock:
    """A lock taken in the order it was asked for.

    `threading.Lock` lets the thread that just released it take it again before a waiter
    wakes: a source that polls back to back could then keep the bus from the others.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that holds the lock

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            if self._serving != ticket:
                self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class _RtuClient(ModbusSerialClient):
    """pymodbus's RTU client on a port we open: it never opens one by itself."""

    def connect(self) -> bool:
        return self.socket is not None


class _TcpClient(ModbusTcpClient):
    """pymodbus's TCP client on a socket we connect: it never reconnects by itself."""

    def connect(self) -> bool:
        return self.socket is not None


class Link:
    """One connection; hold `lock` around `open` and every `read`."""

    def __init__(self, config: ModbusConfig) -> None:
        self.settings = config.link_settings
        self.framing = config.framing
        self.lock = FairLock()
        self._config = config
        self._heard = False  # bytes came back during the current request
        self._rtu: _RtuClient | None = None
        self._tcp: _TcpClient | None = None
        if config.transport == "rtu":
            assert config.port is not None  # checked by the config
            self._rtu = _RtuClient(
                config.port,
                framer=FramerType.RTU,
                baudrate=config.baudrate,
                bytesize=config.bytesize,
                parity=config.parity,
                stopbits=math.ceil(config.stopbits),  # pymodbus uses it for timing only
                timeout=config.timeout_s,
                retries=0,
                trace_packet=self._trace,
            )
            self._client: ModbusSerialClient | ModbusTcpClient = self._rtu
        else:
            assert config.host is not None
            self._tcp = _TcpClient(
                config.host,
                port=config.tcp_port,
                timeout=config.timeout_s,
                retries=0,
                trace_packet=self._trace,
            )
            self._client = self._tcp
        # pymodbus would close a TCP connection after a few unanswered requests (one dead unit
        # behind a gateway would cut off the others); losing the link is our decision.
        self._client.set_max_no_responses(_NEVER)

    @property
    def is_open(self) -> bool:
        return self._client.socket is not None

    def open(self) -> None:
        """Open the port or connect; SourceError says why not."""
        if self.is_open:
            return
        if self._rtu is not None:
            self._rtu.socket = self._open_serial(self._rtu.inter_byte_timeout)
        elif self._tcp is not None:
            self._tcp.socket = self._connect_tcp()

    def close(self) -> None:
        sock = self._client.socket
        self._client.socket = None
        if sock is not None:
            sock.close()

    def _open_serial(self, inter_byte_timeout: float) -> serial.Serial:
        cfg = self._config
        port = serial.Serial(
            None,
            cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            timeout=cfg.timeout_s,
            write_timeout=cfg.timeout_s,
            exclusive=True,
        )
        port.port = cfg.port
        # Set before opening: each setting changed on an open port is another tcsetattr,
        # which a pseudo-terminal refuses once parity is on.
        port.inter_byte_timeout = inter_byte_timeout or None
        if cfg.rs485:
            port.rs485_mode = serial.rs485.RS485Settings()
        try:
            port.open()
        except (serial.SerialException, OSError, termios.error) as exc:
            raise SourceError(f"cannot open {cfg.port}: {exc}") from None
        except ValueError as exc:  # pyserial: settings the port's driver refused
            if cfg.rs485:
                raise SourceError(
                    f"cannot set {cfg.port} to RS-485 mode: {exc}; leave rs485 out if the "
                    "adapter switches direction itself"
                ) from None
            raise SourceError(f"cannot set {cfg.port} to {self.framing}: {exc}") from None
        return port

    def _connect_tcp(self) -> socket.socket:
        cfg = self._config
        try:
            return socket.create_connection((cfg.host, cfg.tcp_port), timeout=cfg.timeout_s)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise SourceError(f"cannot connect to {cfg.host}:{cfg.tcp_port}: {reason}") from None

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending and data:
            self._heard = True
        return data

    def read(
        self, kind: Kind, address: int, count: int, unit: int, timeout: float
    ) -> list[int] | list[bool]:
        """Read `count` registers or bits; the caller holds `lock`."""
        client = self._client
        client.comm_params.timeout_connect = timeout  # per source: several share the client
        self._heard = False
        try:
            response = self._send(kind, address, count, unit)
        except (ConnectionException, OSError) as exc:
            self.close()
            raise SourceError(self._lost(exc)) from None
        except ModbusIOException as exc:
            if not self.is_open:
                raise SourceError(self._lost(exc)) from None
            if self._heard:
                raise RequestFailed("garbled", "garbled answer (bad CRC or frame)") from None
            raise RequestFailed("timeout", f"no answer in {timeout:g} s") from None
        except ModbusException as exc:
            raise RequestFailed("garbled", f"an answer that is not Modbus ({exc})") from None
        if response.isError():
            code = response.exception_code
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise RequestFailed("exception", f"exception {code} ({name})", code)
        if kind in BIT_KINDS:
            return list(response.bits[:count])
        return list(response.registers)

    def _send(self, kind: Kind, address: int, count: int, unit: int) -> ModbusPDU:
        c = self._client
        if kind == "holding":
            return c.read_holding_registers(address, count=count, device_id=unit)
        if kind == "input":
            return c.read_input_registers(address, count=count, device_id=unit)
        if kind == "coil":
            return c.read_coils(address, count=count, device_id=unit)
        return c.read_discrete_inputs(address, count=count, device_id=unit)

    def _lost(self, exc: Exception) -> str:
        if self._config.transport == "tcp":
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "closed"
            return f"the connection to {self.framing} was lost ({reason})"
        return f"{self._config.port} stopped working (unplugged?)"


class LinkPool:
    """Links by their settings, shared by the sources that use them, closed after the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[tuple[object, ...], tuple[Link, int]] = {}

    def acquire(self, config: ModbusConfig) -> Link:
        with self._lock:
            link, users = self._links.get(config.link_settings, (None, 0))
            if link is None:
                link = Link(config)
            self._links[config.link_settings] = (link, users + 1)
            return link

    def release(self, link: Link) -> None:
        with self._lock:
            current, users = self._links.get(link.settings, (None, 0))
            if current is not link:
                return
            if users > 1:
                self._links[link.settings] = (link, users - 1)
                return
            del self._links[link.settings]
        with link.lock:
            link.close()


# pymodbus logs an error line for every unanswered request; the source counts those and
# logs once per incident, with what to check, so pymodbus's own lines would only repeat it.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

SHARED_LINKS = LinkPool()
