"""Opening a serial port with its framing: pyserial's errors become `SourceError` here, once.

Shared by the serial source and the Modbus RTU source's bus, which both open a device by path
with the framing keys of `SerialFraming`.
"""

from __future__ import annotations

import serial
import serial.rs485

from edge_agent.errors import SourceError
from edge_agent.sources.serial.config import SerialFraming

_BYTESIZES = {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}
_STOPBITS = {
    1.0: serial.STOPBITS_ONE,
    1.5: serial.STOPBITS_ONE_POINT_FIVE,
    2.0: serial.STOPBITS_TWO,
}


def open_port(framing: SerialFraming, timeout: float) -> serial.Serial:
    """The port, open, exclusive, with the configured framing; SourceError says what failed."""
    try:
        port = serial.Serial(
            framing.port,
            framing.baudrate,
            bytesize=_BYTESIZES[framing.bytesize],
            parity=framing.parity,
            stopbits=_STOPBITS[framing.stopbits],
            rtscts=framing.rtscts,
            xonxoff=framing.xonxoff,
            timeout=timeout,
            write_timeout=max(1.0, timeout),
            exclusive=True,
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        raise SourceError(f"cannot open {framing.port}: {exc}") from None
    if framing.rs485:
        try:
            port.rs485_mode = serial.rs485.RS485Settings()
        except (serial.SerialException, OSError, ValueError) as exc:
            port.close()
            raise SourceError(
                f"cannot switch {framing.port} to RS-485 mode ({exc}); the adapter's driver "
                "does not support it: most USB RS-485 adapters switch direction by themselves, "
                "so try rs485 = false"
            ) from None
    return port
