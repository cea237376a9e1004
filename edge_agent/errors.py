"""The agent's one exception tree, grouped by what the agent does about each error.

    EdgeAgentError
    ├── ConfigError            bad configuration: stop at start-up, keep the old one on reload
    ├── ForeignStatusError     another program answers on the status address (`status`)
    ├── SourceError            a sensor or broker failed: the source logs, backs off, reopens
    │   └── ParseError         one line or payload could not be read: count it, go on
    │       └── OversizeError  a message over a configured cap: dead-letter a prefix, go on
    ├── BufferError            the SQLite buffer cannot take or give readings
    │   ├── BufferAccessError  its files cannot be reached (permissions, read-only mount,
    │   │                      lock, full disk): never moved aside; exit 2 at start,
    │   │                      retried while running
    │   ├── BufferFullError    intake refused by the `when_full` policy (counted as dropped)
    │   └── BufferInUseError   another process owns the buffer: refuse, touch nothing (exit 2)
    └── UploadError            a request to the insert API did not deliver its batch
        ├── RetryableUploadError   transient (5xx, 408, 429, network): retry with backoff
        └── RejectedUploadError    the server refused (4xx): split, pause or dead-letter

Errors of other libraries (serial.SerialException, paho result codes, httpx.HTTPError,
sqlite3.OperationalError) are translated into these once, where they enter our code.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration file is wrong; the message names the file, the key and the fix."""


class ForeignStatusError(EdgeAgentError):
    """What answers on the status address is not the agent's status endpoint."""


class SourceError(EdgeAgentError):
    """A source could not read from its device or broker."""


class ParseError(SourceError):
    """One line or payload could not be turned into values."""


class OversizeError(ParseError):
    """A message is larger than a cap (max_payload_bytes, max_values_per_message)."""


class BufferError(EdgeAgentError):
    """The buffer database failed."""


class BufferAccessError(BufferError):
    """The buffer's files cannot be opened, read or written, but are not damaged."""


class BufferFullError(BufferError):
    """The buffer is full and its policy refused the readings."""


class BufferInUseError(BufferError):
    """Another process holds the buffer's lock (see lock.py); the message names it."""


class UploadError(EdgeAgentError):
    """A batch was not delivered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableUploadError(UploadError):
    """Transient failure: the same batch is retried after a backoff."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class RejectedUploadError(UploadError):
    """The server refused the request; `status` and the message say why."""
