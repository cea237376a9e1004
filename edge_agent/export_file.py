"""The files `buffer export` writes and `buffer import` reads (JSON lines).

Writing never goes onto the buffer's own files (the database, its WAL, shared memory and lock
files, links resolved), nor over an existing file unless asked, and always through a
temporary file in the same directory that is renamed at the end: a failed export leaves no
half-written file, and the file it would have replaced as it was.

Reading goes line by line with a bound on each line, so a file of any size takes bounded
memory; each line is checked on its own (`buffer.parse_exported`) and a bad one is reported
with its number. While `Interruption` is installed, Ctrl-C or SIGTERM end the reading at the
next line instead of killing the process: the import then commits what it read and reports
exactly what was queued and from which line to go on.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, TextIO

from edge_agent.buffer import MAX_EXPORT_LINE, Exported, parse_exported
from edge_agent.credentials import file_kind
from edge_agent.errors import EdgeAgentError
from edge_agent.lock import LOCK_SUFFIX

# The files SQLite and the agent keep beside a buffer database.
_OWN_SUFFIXES = ("", "-wal", "-shm", "-journal", LOCK_SUFFIX)
# Bad lines listed one by one at most; the rest are counted.
MAX_LISTED = 20


# -- writing ------------------------------------------------------------------------------


def output_problem(target: Path, buffers: Iterable[Path], force: bool) -> str | None:
    """Why `target` must not be written, or None. `buffers`: databases whose files it may
    not be, however it is spelled (links, `..`, hard links)."""
    real = target.resolve()
    for db in buffers:
        for suffix in _OWN_SUFFIXES:
            own = db.with_name(db.name + suffix)
            if real == own.resolve() or _same_file(real, own):
                return (
                    f"{target} is the buffer's own file {own}: writing there would destroy "
                    "the buffer; give a file outside it (--force does not change this)"
                )
    dangling = _dangling_link(target)
    if dangling is not None:
        return dangling
    if real.is_dir():
        return f"{target} is a directory; give a file name"
    kind = _special_kind(real)
    if kind is not None:
        return (
            f"{target} is {kind}, not a regular file: give the name of a regular file "
            "(or leave out -o to write to standard output); --force does not change this"
        )
    if not real.parent.is_dir():
        return f"{real.parent} does not exist; create it or give another file"
    if real.exists() and not force:
        return f"{target} exists; give another file, or add --force to replace it"
    return None


def _dangling_link(target: Path) -> str | None:
    """A link (or a chain of them) that leads nowhere would be written through, creating a
    file where the link points: refuse it rather than guess."""
    if not target.is_symlink() or target.exists():
        return None
    return (
        f"{target} is a symbolic link to {os.readlink(target)}, which does not exist: give "
        "the real path, or remove the link"
    )


def _special_kind(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file (never opened: a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def write_atomically(target: Path, lines: Iterable[str], replace: bool) -> int:
    """Write `lines` to `target` through a temporary file; returns how many were written.

    Without `replace`, a file that appeared at `target` meanwhile is kept and this fails.
    """
    real = target.resolve()
    fd, tmp_name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            n = write_lines(out, lines)
            out.flush()
            os.fsync(out.fileno())
        _publish(tmp, real, replace)
    except OSError as exc:
        raise EdgeAgentError(
            f"cannot write {target}: {exc.strerror or exc}; nothing was written there"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(real.parent)
    return n


def write_lines(out: TextIO, lines: Iterable[str]) -> int:
    n = 0
    for line in lines:
        out.write(line + "\n")
        n += 1
    return n


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if the target exists: never replaces by accident
    except FileExistsError:
        raise EdgeAgentError(
            f"{target} appeared while exporting; it was kept. Add --force to replace it"
        ) from None
    except OSError as exc:
        # A USB stick's FAT file system has no hard links: check, then rename.
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if target.exists():
            raise EdgeAgentError(
                f"{target} appeared while exporting; it was kept. Add --force to replace it"
            ) from None
        os.rename(tmp, target)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the data itself is synced
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------


def read_exported(path: Path) -> Iterator[Exported | tuple[int, str]]:
    """Each non-blank line of an export file: a reading, or (line number, what is wrong)."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise EdgeAgentError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        number = 0
        while True:
            try:
                raw = f.readline(MAX_EXPORT_LINE + 1)
            except OSError as exc:
                raise EdgeAgentError(f"cannot read {path}: {exc.strerror}") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_EXPORT_LINE and not raw.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield number, f"longer than {MAX_EXPORT_LINE:,} bytes"
                continue
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield parse_exported(number, raw)
            except ValueError as exc:
                yield number, str(exc)


def _skip_rest_of_line(f: BinaryIO) -> None:
    while True:
        chunk = f.readline(MAX_EXPORT_LINE)
        if not chunk or chunk.endswith(b"\n"):
            return


class Interruption:
    """SIGINT and SIGTERM, while installed (`with`), are noted instead of ending the process;
    `survey` and `Readings` stop at the next line once one came."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interruption:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return "" if self.signum is None else signal.Signals(self.signum).name


@dataclass
class Survey:
    """A first pass over an export file, before anything is imported."""

    readings: int = 0
    estimated_bytes: int = 0
    by_datasource: Counter[str] = field(default_factory=Counter)
    bad: list[tuple[int, str]] = field(default_factory=list)  # the first MAX_LISTED
    bad_count: int = 0
    interrupted: bool = False  # a signal came before the end of the file


def survey(path: Path, stop: Interruption | None = None) -> Survey:
    found = Survey()
    for item in read_exported(path):
        if stop is not None and stop.signum is not None:
            found.interrupted = True
            break
        if isinstance(item, Exported):
            found.readings += 1
            found.estimated_bytes += item.estimated_bytes
            found.by_datasource[item.datasource_id] += 1
            continue
        found.bad_count += 1
        if len(found.bad) < MAX_LISTED:
            found.bad.append(item)
    return found


class Readings:
    """The readings of a file that `survey` found sound, read again. A line that is bad now
    (the file changed meanwhile) ends them: `problem` then says which. So does a signal
    (`stop`): `interrupted` then tells."""

    def __init__(self, path: Path, stop: Interruption | None = None) -> None:
        self.path = path
        self.problem: str | None = None
        self.interrupted = False
        self._stop = stop

    def __iter__(self) -> Iterator[Exported]:
        for item in read_exported(self.path):
            if self._stop is not None and self._stop.signum is not None:
                self.interrupted = True
                return
            if not isinstance(item, Exported):
                self.problem = f"{self.path} changed while importing: line {item[0]}: {item[1]}"
                return
            yield item
