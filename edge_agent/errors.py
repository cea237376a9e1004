"""The agent's one exception tree, grouped by what the agent does about each error.

    EdgeAgentError             anything else the agent raises on purpose (an export file, the
    │                          status page, a stopped writer): a command prints it and exits 1
    ├── ConfigError            bad configuration: stop at start-up (exit 2), keep the old one
    │                          on reload
    ├── ForeignStatusError     another program answers on the status address (`status`)
    ├── SourceError            a sensor or broker failed: the source logs, backs off, reopens
    │   └── ParseError         one line or payload could not be read: count it, go on
    │       └── OversizeError  a message over a configured cap: dead-letter a prefix, go on
    └── BufferStoreError       the SQLite buffer cannot be used (damaged past a new file,
        │                      written by a newer agent, a lock file that cannot be made):
        │                      stop at start-up, the writer retries while running
        ├── BufferAccessError  its files cannot be reached (permissions, read-only mount,
        │                      lock, full disk): never moved aside; exit 2 at start,
        │                      retried while running
        └── BufferInUseError   another process owns the buffer: refuse, touch nothing (exit 2)

What the upload API answers is not an exception: the uploader turns each answer into a
verdict (uploader.py) and decides from it. A buffer that is full drops readings by its
`when_full` policy and counts them; nothing is raised.

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


class BufferStoreError(EdgeAgentError):
    """The buffer database failed (damaged, written by a newer agent, a lock file unusable)."""


class BufferAccessError(BufferStoreError):
    """The buffer's files cannot be opened, read or written, but are not damaged."""


class BufferInUseError(BufferStoreError):
    """Another process holds the buffer's lock (see lock.py); the message names it."""
