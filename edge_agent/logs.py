"""Logging set-up and the rate limit for repeated error lines.

One line per event on stderr, naming the component (`serial weather: ...`), with anything that
looks like a credential redacted. Under systemd (JOURNAL_STREAM set) the timestamp is left out
because the journal adds its own. `--log-format json` gives one JSON object per line for log
shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from typing import Any

from edge_agent.credentials import redact


class _Redact(logging.Filter):
    """Defence in depth: no log line shows what follows "Bearer" or a URL's password."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = _JsonFormatter()
        formatter.converter = time.gmtime
    elif os.environ.get("JOURNAL_STREAM"):
        formatter = logging.Formatter("%(levelname)s %(message)s")
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_Redact())
    root = logging.getLogger("edge_agent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RateLimitedLog:
    """Logs the first occurrence at once, then at most one summary line per `every` seconds."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self._logger = logger
        self._every = every
        self._last = -every
        self._suppressed = 0

    def __call__(self, level: int, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more like this since the last report)"
        self._logger.log(level, message)
        self._last = now
        self._suppressed = 0


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors for the status page and `edge-agent status`."""

    def __init__(self, keep: int = 20) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(_Redact())
        self._lines: deque[dict[str, Any]] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        component = record.name.rsplit(".", 1)[-1]
        head, sep, rest = message.partition(": ")
        if sep and len(head) <= 40:  # our lines start with their component: keep it once
            component, message = head, rest
        self._lines.append({"time": record.created, "component": component, "message": message})

    def lines(self) -> list[dict[str, Any]]:
        return list(self._lines)


def printable(text: str, limit: int | None = None) -> str:
    """`text` safe for one log line: control and other invisible characters escaped.

    Text from outside (a server's answer, a device) may hold CR, LF or ESC: raw, they forge
    log lines or recolour a terminal. Each such character becomes its Python escape
    (`\\r`, `\\n`, `\\x1b`, `\\u2028`). Longer than `limit` characters, it is cut with "…".
    """
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
