"""A Modbus slave for tests, the demo and the bench, run as its own process.

    python -m edge_agent.testing.modbus_slave --rtu /tmp/meter-link [--unit 1 --unit 2]
    python -m edge_agent.testing.modbus_slave --tcp 0 [--meter] [--limit 1000]

RTU: the slave makes a pseudo-terminal and points `--rtu PATH` at its device (the way
/dev/serial/by-id links work), so the agent opens it by path like a USB adapter. TCP: it
listens on 127.0.0.1 (port 0: a free one). It prints `ready <path or port>` when it answers.

It answers reads of holding and input registers, coils and discrete inputs (function codes
1-4) for its unit ids and ignores other units, as a bus does. Values change while polled:
holding register 0 counts the requests the unit answered, and `--meter` simulates an
Eastron SDM120 energy meter (float32 input registers). Addresses from `--limit` up are
illegal (exception 2). The framing (CRC, MBAP) is written here from the specification, not
with the library the agent uses, so a test of the agent is not the library talking to itself.

Commands on stdin, one per line, each answered with one line on stdout:

    set KIND ADDRESS TYPE WORD_ORDER VALUE   store a value (as registers.encode lays it out)
    silent SECONDS     ignore requests for a while (a dead or unpowered device)
    garble N           spoil the next N answers (a wrong CRC on RTU, a bad PDU on TCP)
    exception CODE N   answer the next N requests with exception CODE
    delay SECONDS      answer every request that much later (0: at once)
    quiet SECONDS      count a request that comes sooner than this after an unanswered one
                       (stats "overlaps": two masters, or two sources, on the wire at once)
    unplug SECONDS     close the pty (or the listener and connections), back after SECONDS
    reset              TCP: reset every client connection now
    stats              one JSON line: requests per unit, bad frames, faults served
    quit

End of input on stdin stops the slave too, so it never outlives the test that started it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.sources.modbus.registers import encode

_KINDS = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
_SPACE = 65_536


def crc16(frame: bytes) -> int:
    """Modbus RTU CRC-16 (polynomial 0xA001, start 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(frame: bytes) -> bytes:
    crc = crc16(frame)
    return frame + bytes((crc & 0xFF, crc >> 8))


# The SDM120's input registers (float32, high word first): address, name, value at time t.
_METER: tuple[tuple[int, str, Callable[[float], float]], ...] = (
    (0, "voltage", lambda t: 230.0 + 2.0 * math.sin(t / 7.0)),
    (6, "current", lambda t: 4.0 + 1.5 * math.sin(t / 5.0)),
    (12, "active_power", lambda t: 920.0 + 345.0 * math.sin(t / 5.0)),
    (30, "power_factor", lambda t: 0.95 + 0.02 * math.sin(t / 11.0)),
    (70, "frequency", lambda t: 50.0 + 0.05 * math.sin(t / 3.0)),
)
_ENERGY_ADDRESS = 342  # total active energy, kWh
# The simulated meter's map, (name, input register address), for configurations (the demo's).
METER_MAP: tuple[tuple[str, int], ...] = (
    *((name, address) for address, name, _ in _METER),
    ("energy_kwh", _ENERGY_ADDRESS),
)


@dataclass
class Unit:
    """One device's memory: registers and bits by kind."""

    words: dict[str, list[int]] = field(
        default_factory=lambda: {"holding": [0] * _SPACE, "input": [0] * _SPACE}
    )
    bits: dict[str, bytearray] = field(
        default_factory=lambda: {"coil": bytearray(_SPACE), "discrete": bytearray(_SPACE)}
    )


class Slave:
    """The device logic: requests (PDUs) in, answers out, with the faults asked for."""

    def __init__(self, units: Sequence[int], limit: int, meter: bool) -> None:
        self.lock = threading.Lock()
        self.units = {u: Unit() for u in units}
        self.limit = limit
        self.meter = meter
        self.started = time.monotonic()
        self.energy_kwh = 1234.5
        self.silent_until = 0.0
        self.garble = 0
        self.exception: tuple[int, int] = (0, 0)  # code, answers left
        self.delay = 0.0
        # A master waits for an answer until its timeout before it sends again: a request
        # within `quiet` seconds of one left unanswered means two requests shared the wire.
        self.quiet = 0.0
        self.unanswered_at = -math.inf
        self.stats: dict[str, Any] = {
            "requests": {},  # answered, by unit
            "ignored": {},  # not answered (another unit, or silent), by unit
            "bad_frames": 0,  # RTU request frames with a wrong CRC
            "overlaps": 0,
            "served_faults": {},
        }

    def answer(self, unit: int, pdu: bytes) -> bytes | None:
        """The answer PDU for `unit`, or None for silence."""
        with self.lock:
            now = time.monotonic()
            if now - self.unanswered_at < self.quiet:
                self.stats["overlaps"] += 1
            key = str(unit)
            if unit not in self.units or now < self.silent_until:
                self.stats["ignored"][key] = self.stats["ignored"].get(key, 0) + 1
                self.unanswered_at = now
                return None
            self.stats["requests"][key] = self.stats["requests"].get(key, 0) + 1
            fc = pdu[0]
            code, left = self.exception
            if left:
                self.exception = (code, left - 1)
                self._served("exception")
                return bytes((fc | 0x80, code))
            return self._read(self.units[unit], pdu)

    def take_garble(self) -> bool:
        with self.lock:
            if self.garble:
                self.garble -= 1
                self._served("garble")
                return True
            return False

    def _served(self, what: str) -> None:
        faults = self.stats["served_faults"]
        faults[what] = faults.get(what, 0) + 1

    def _read(self, unit: Unit, pdu: bytes) -> bytes:
        fc = pdu[0]
        if fc not in _KINDS or len(pdu) != 5:
            return bytes((fc | 0x80, 1))
        address, count = struct.unpack(">HH", pdu[1:5])
        kind = _KINDS[fc]
        most = 2000 if fc <= 2 else 125
        if not 1 <= count <= most:
            return bytes((fc | 0x80, 3))
        if address + count > self.limit:
            return bytes((fc | 0x80, 2))
        self._tick(unit)
        if fc <= 2:
            bits = unit.bits[kind][address : address + count]
            packed = bytearray((count + 7) // 8)
            for i, bit in enumerate(bits):
                if bit:
                    packed[i // 8] |= 1 << (i % 8)
            return bytes((fc, len(packed))) + bytes(packed)
        words = unit.words[kind][address : address + count]
        return bytes((fc, 2 * count)) + struct.pack(f">{count}H", *words)

    def _tick(self, unit: Unit) -> None:
        holding = unit.words["holding"]
        holding[0] = (holding[0] + 1) & 0xFFFF
        if self.meter:
            t = time.monotonic() - self.started
            self.energy_kwh += 0.001
            inputs = unit.words["input"]
            for address, _, value in _METER:
                inputs[address : address + 2] = encode("float32", "big", value(t))
            energy = encode("float32", "big", self.energy_kwh)
            inputs[_ENERGY_ADDRESS : _ENERGY_ADDRESS + 2] = energy

    def set_value(self, kind: str, address: int, data_type: str, order: str, text: str) -> None:
        value: float | bool = text.lower() == "true" if data_type == "bool" else float(text)
        if data_type not in ("bool", "float32", "float64"):
            value = int(text)
        with self.lock:
            for unit in self.units.values():
                if kind in unit.bits:
                    unit.bits[kind][address] = 1 if value else 0
                else:
                    words = encode(data_type, order, value)  # type: ignore[arg-type]
                    unit.words[kind][address : address + len(words)] = words


class RtuPort:
    """The slave's end of a pty pair, behind a stable link path."""

    def __init__(self, link: Path, slave: Slave) -> None:
        self.link = link
        self.slave = slave
        self._master: int | None = None
        self._peer: int | None = None
        self._buffer = b""
        self._back_at: float | None = None

    def plug(self) -> None:
        master, peer = os.openpty()
        tty.setraw(peer)  # held open, so the pty lives on when the agent closes its end
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(peer))
        tmp.replace(self.link)
        self._master, self._peer, self._buffer = master, peer, b""

    def unplug(self, seconds: float) -> None:
        for fd in (self._master, self._peer):
            if fd is not None:
                os.close(fd)
        self._master = self._peer = None
        self.link.unlink(missing_ok=True)
        self._back_at = time.monotonic() + seconds

    def serve_once(self) -> None:
        if self._master is None:
            if self._back_at is not None and time.monotonic() >= self._back_at:
                self._back_at = None
                self.plug()
            else:
                time.sleep(0.02)
            return
        ready, _, _ = select.select([self._master], [], [], 0.05)
        if not ready:
            return
        try:
            self._buffer += os.read(self._master, 4096)
        except OSError:
            return  # nobody has the other end open
        self._frames()

    def _frames(self) -> None:
        # Every request we answer is 8 bytes: unit, function, address, count, CRC.
        while len(self._buffer) >= 8:
            frame = self._buffer[:8]
            if crc16(frame[:6]) != int.from_bytes(frame[6:], "little"):
                with self.slave.lock:
                    self.slave.stats["bad_frames"] += 1
                self._buffer = self._buffer[1:]  # hunt for the next frame
                continue
            self._buffer = self._buffer[8:]
            answer = self.slave.answer(frame[0], frame[1:6])
            if answer is not None:
                self._send(with_crc(bytes((frame[0],)) + answer))

    def _send(self, frame: bytes) -> None:
        if self.slave.delay:
            time.sleep(self.slave.delay)
        if self.slave.take_garble():
            frame = frame[:-1] + bytes((frame[-1] ^ 0xFF,))
        if self._master is not None:
            os.write(self._master, frame)


class TcpPort:
    """A Modbus TCP listener on 127.0.0.1; each connection is served in its own thread."""

    def __init__(self, port: int, slave: Slave) -> None:
        self.slave = slave
        self.port = port
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self._back_at: float | None = None

    def plug(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._listener = listener

    def unplug(self, seconds: float) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.reset()
        self._back_at = time.monotonic() + seconds

    def reset(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for conn in clients:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def serve_once(self) -> None:
        if self._listener is None:
            if self._back_at is not None and time.monotonic() >= self._back_at:
                self._back_at = None
                self.plug()
            else:
                time.sleep(0.02)
            return
        ready, _, _ = select.select([self._listener], [], [], 0.05)
        if ready:
            conn, _ = self._listener.accept()
            with self._lock:
                self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                header = _recv_exactly(conn, 7)
                tid, _, length, unit = struct.unpack(">HHHB", header)
                pdu = _recv_exactly(conn, length - 1)
                answer = self.slave.answer(unit, pdu)
                if answer is None:
                    continue
                if self.slave.delay:
                    time.sleep(self.slave.delay)
                if self.slave.take_garble():
                    answer = b"\x00" + answer[1:]  # no such function: the PDU cannot be read
                conn.sendall(struct.pack(">HHHB", tid, 0, len(answer) + 1, unit) + answer)
        except OSError:
            conn.close()


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _command(line: str, slave: Slave, port: RtuPort | TcpPort) -> str:
    words = line.split()
    if not words:
        return "error: empty command"
    match words[0], words[1:]:
        case "set", [kind, address, data_type, order, value]:
            slave.set_value(kind, int(address), data_type, order, value)
        case "silent", [seconds]:
            with slave.lock:
                slave.silent_until = time.monotonic() + float(seconds)
        case "garble", [count]:
            with slave.lock:
                slave.garble = int(count)
        case "exception", [code, count]:
            with slave.lock:
                slave.exception = (int(code), int(count))
        case "delay", [seconds]:
            slave.delay = float(seconds)
        case "quiet", [seconds]:
            with slave.lock:
                slave.quiet = float(seconds)
        case "unplug", [seconds]:
            port.unplug(float(seconds))
        case "reset", [] if isinstance(port, TcpPort):
            port.reset()
        case "stats", []:
            with slave.lock:
                return json.dumps(slave.stats)
        case _:
            return f"error: unknown command {line!r}"
    return "ok"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modbus_slave", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rtu", type=Path, metavar="PATH", help="make a pty behind this link")
    where.add_argument("--tcp", type=int, metavar="PORT", help="listen on 127.0.0.1:PORT")
    parser.add_argument("--unit", type=int, action="append", help="unit ids to answer (1)")
    parser.add_argument("--meter", action="store_true", help="simulate an SDM120 meter")
    parser.add_argument("--limit", type=int, default=_SPACE, help="first illegal address")
    args = parser.parse_args(argv)
    slave = Slave(args.unit or [1], args.limit, args.meter)
    port: RtuPort | TcpPort = RtuPort(args.rtu, slave) if args.rtu else TcpPort(args.tcp, slave)
    port.plug()
    commands: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    threading.Thread(target=_read_stdin, args=(commands,), daemon=True).start()
    address = args.rtu if isinstance(port, RtuPort) else port.port
    print(f"ready {address}", flush=True)
    while True:
        try:
            line = commands.get_nowait()
        except queue.Empty:
            port.serve_once()
            continue
        if line is None or line.strip() == "quit":  # stdin closed: whoever started us is gone
            return 0
        print(_command(line, slave, port), flush=True)


def _read_stdin(commands: queue.SimpleQueue[str | None]) -> None:
    for line in sys.stdin:
        commands.put(line)
    commands.put(None)


class SlaveProcess:
    """The slave as a child process, for tests, the demo and the bench."""

    def __init__(
        self,
        *,
        rtu: Path | None = None,
        tcp: bool = False,
        units: Sequence[int] = (1,),
        meter: bool = False,
        limit: int | None = None,
    ) -> None:
        args = ["--rtu", str(rtu)] if rtu is not None else ["--tcp", "0"]
        if rtu is None and not tcp:
            raise ValueError("give rtu=PATH or tcp=True")
        for unit in units:
            args += ["--unit", str(unit)]
        if meter:
            args.append("--meter")
        if limit is not None:
            args += ["--limit", str(limit)]
        self.args = [sys.executable, "-m", "edge_agent.testing.modbus_slave", *args]
        self.link = rtu
        self.tcp_port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 15.0) -> SlaveProcess:
        # A session of its own: Ctrl-C in the demo's terminal is the demo's to handle; the
        # slave ends when its stdin does (see `stop`), also when its parent is killed.
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        line = self._line(timeout)
        if not line.startswith("ready "):
            raise RuntimeError(f"the Modbus slave did not start: {line!r}")
        if self.link is None:
            self.tcp_port = int(line.split()[1])
        return self

    def command(self, line: str, timeout: float = 15.0) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self._line(timeout)
        if answer.startswith("error"):
            raise RuntimeError(f"Modbus slave: {line!r}: {answer}")
        return answer

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.command("stats"))
        return result

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.link is not None:
            self.link.unlink(missing_ok=True)

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"no answer from the Modbus slave (exit {self.proc.poll()})")
        return line.strip()


if __name__ == "__main__":
    sys.exit(main())
