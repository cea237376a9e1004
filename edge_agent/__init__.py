"""Madevo Edge Agent: sensor readings from serial ports and MQTT to the Madevo insert API.

Readings are stamped in UTC, kept durably in SQLite while the uplink is down, and drained
in batches. See README.md for operation, and its "How it works" section for the
architecture.
"""

__version__ = "0.1.0"
