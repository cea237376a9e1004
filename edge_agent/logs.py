"""Logging set-up and the rate limit for repeated error lines.

One line per event on stderr, naming the component (`serial weather: ...`), with anything that
looks like a credential redacted. When stderr is the journal (systemd sets JOURNAL_STREAM to its
device and inode), each line starts with its sd-daemon priority (`<3>` error, `<4>` warning,
`<6>` info, `<7>` debug), so `journalctl -p warning` finds warnings, and the timestamp is left
out because the journal adds its own. `--log-format json` gives one JSON object per line for log
shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
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


# sd-daemon(3) priorities, which journald reads from the start of a line on its stream.
_JOURNAL_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    """`<4>WARNING message`: the priority prefix for journald, no timestamp of our own.

    A traceback's lines follow in the same write: journald keeps a multi-line write as one
    entry only if its lines are not split, so they are prefixed too, at the record's level.
    """

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is the journal's stream: JOURNAL_STREAM names its `device:inode`.

    Comparing, rather than trusting the variable, matters because children inherit it: a
    command started from the service with its stderr redirected must not get prefixes.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # stderr closed or replaced by something without a fd
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = _JsonFormatter()
        formatter.converter = time.gmtime
    elif stderr_is_journal():
        formatter = _JournalFormatter()
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
    """Logs the first line of a kind at once, then at most one per `every` seconds.

    Lines are of one kind unless a `key` tells kinds apart (a data source and a status, a
    verdict): each key has its own pace. With `tally` (the default), the next line after a
    quiet spell says how many were held back; without it, lines keep their text exactly.
    """

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 60.0,
        *,
        tally: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._every = every
        self._tally = tally
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def __call__(
        self,
        level: int,
        message: str,
        *,
        key: Hashable = None,
        force: bool = False,
        exc_info: BaseException | None = None,
    ) -> None:
        """Log `message` unless a line under `key` was logged less than `every` seconds ago
        (`force`: log it anyway, and count it as logged now)."""
        if not force and not self._due(key):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = self._clock()
        suppressed = self._suppressed.pop(key, 0)
        if suppressed and self._tally:
            message += f" ({suppressed} more like this since the last report)"
        self._logger.log(level, message, exc_info=exc_info)

    def hold(self, key: Hashable = None) -> None:
        """Count a line under `key` as logged now: the next one waits `every` seconds."""
        self._last[key] = self._clock()

    def forget(self, where: Callable[[Hashable], bool] | None = None) -> None:
        """The next line under each key for which `where` holds (every key without it) is a
        new incident, logged at once."""
        for key in [k for k in self._last if where is None or where(k)]:
            del self._last[key]
            self._suppressed.pop(key, None)

    def _due(self, key: Hashable) -> bool:
        last = self._last.get(key)
        return last is None or self._clock() - last >= self._every


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
