"""The buffer's owner lock: one agent per buffer.

`edge-agent run` holds an exclusive `flock` on `buffer.db.lock`, beside the database, from
before it opens the buffer until its process ends. The kernel releases it when the process
ends, kill -9 included, so there is never a stale lock to clean up. A second agent on the same
data_dir would run a second uploader on the same readings, and the uploader, as the buffer's
only consumer, keeps no claim state: both would send the same batches. So it refuses to start.

A lock file can be deleted by hand while the agent runs (a tidy-up, `rm *.lock`); a second
agent would then make a new one and lock that. So the holder also takes an `flock` on the data
directory itself, which cannot be deleted while the buffer is in it, and every agent and
operator command takes both: either one held by another process is a refusal. The holder
checks its lock file's inode every few seconds and makes the file again (with its PID) when it
was deleted, so `status` and the operator's tools find it there again.

The lock file is opened without following a symbolic link (`O_NOFOLLOW`) and must be a regular
file with one name: the agent writes its PID into it, and a link planted there must not make
it truncate another file.

Operator commands that are not safe beside a running agent (`buffer move`, `buffer drop`)
take the same locks without waiting and hold them while they work; the others need none. The
refusal names the holder from /proc (its PID, its command line, whether systemd runs it), so
the operator knows what to stop.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import shlex
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import BufferAccessError, BufferInUseError, BufferStoreError
from edge_agent.store import access_problem

LOCK_SUFFIX = ".lock"
# How often the holder checks that its lock file is still the one it locked.
WATCH_INTERVAL_S = 5.0
_PROC = Path("/proc")
# Never follow a link to the lock file, never block opening a FIFO planted there.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
log = logging.getLogger("edge_agent.lock")


def lock_path(buffer_path: Path) -> Path:
    return buffer_path.with_name(buffer_path.name + LOCK_SUFFIX)


class BufferLock:
    """Held locks: on the lock file and on the data directory. They last as long as the
    process, or until `release`."""

    def __init__(self, path: Path, fd: int, dir_fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._dir_fd: int | None = dir_fd
        self._mutex = threading.Lock()
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._reported: tuple[int, int] | None = None  # a lock file it could not take over

    def watch(self, interval: float = WATCH_INTERVAL_S) -> None:
        """Check the lock file every `interval` seconds until `release` (see `check`)."""
        self._watcher = threading.Thread(
            target=self._watch, args=(interval,), name="lock-watch", daemon=True
        )
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            self.check()

    def check(self) -> None:
        """Make the lock file again when it was deleted, so that `status` and the operator's
        tools find the agent there; the data directory's lock kept others out meanwhile."""
        with self._mutex:
            if self._fd is None:
                return
            held = os.fstat(self._fd)
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                now = None
            except OSError:
                return  # cannot tell (a permission changed): the directory lock still holds
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return
            self._take_over(now)

    def _take_over(self, now: os.stat_result | None) -> None:
        """Lock the file now at `path` (made anew if missing) and write our PID into it."""
        try:
            fd = _open(self.path, create=True)
        except BufferStoreError as exc:
            self._report(now, str(exc))
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._report(now, "another process holds it")
            return
        _note_pid(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._reported = fd, None
        log.warning(
            "lock: the lock file %s was %s while the agent runs; took it again, with the "
            "agent's PID. No second agent could start meanwhile: the agent also locks the data "
            "directory. Leave the buffer's files in place while the agent runs",
            self.path, "deleted" if now is None else "replaced",
        )  # fmt: skip

    def _report(self, now: os.stat_result | None, why: str) -> None:
        ident = (now.st_dev, now.st_ino) if now is not None else (0, 0)
        if self._reported == ident:
            return  # once per incident
        self._reported = ident
        log.error(
            "lock: the lock file %s changed while the agent runs and cannot be taken again: "
            "%s. No second agent can start meanwhile: the agent also locks the data directory",
            self.path, why,
        )  # fmt: skip

    def release(self) -> None:
        self._stopped.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        with self._mutex:
            for fd in (self._fd, self._dir_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._dir_fd = None


def hold(buffer_path: Path, doing: str, *, create: bool = False) -> BufferLock:
    """Take the buffer's locks without waiting, for `doing` ("run", "buffer move"...).

    Raises BufferInUseError naming the holder when another process has one of them,
    BufferStoreError when the lock file cannot be opened or is not a regular file. `create` makes
    the data directory if it is missing (`run` does; an operator command on a buffer that does
    not exist has nothing to lock).
    """
    path = lock_path(buffer_path)
    dir_fd = _open_dir(buffer_path, create)
    fd: int | None = None
    try:
        # The directory first: a process refused there has not even made a lock file.
        _lock_or_refuse(dir_fd, path, buffer_path, doing)
        fd = _open(path, create)
        _lock_or_refuse(fd, path, buffer_path, doing)
        _note_pid(fd)
    except BufferStoreError:
        for opened in (fd, dir_fd):
            if opened is not None:
                os.close(opened)
        raise
    return BufferLock(path, fd, dir_fd)


def _lock_or_refuse(fd: int, path: Path, buffer_path: Path, doing: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = find_holder(path, fd)
        raise BufferInUseError(refusal(holder, buffer_path, doing)) from None


def _open_dir(buffer_path: Path, create: bool) -> int:
    directory = buffer_path.parent
    try:
        if create:  # `run`: the agent must write here anyway
            directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BufferStoreError(
            f"no buffer database at {directory}; has the agent run with this config?"
        ) from None
    except OSError as exc:
        if create:
            problem = access_problem(buffer_path, exc, "open the buffer database")
            raise BufferAccessError(problem) from None
        raise BufferStoreError(
            f"cannot open the data directory {directory} to lock it: {exc.strerror} (user "
            f"{_user()}); run this as the agent's user (e.g. `sudo -u edge-agent ...`) or as root"
        ) from None


def running_holder(buffer_path: Path) -> Holder | None:
    """The process holding the buffer's lock (a running agent), or None; takes no lock.

    Read from /proc/locks rather than by trying the lock: even a moment's hold by `status`
    could make an agent starting at that instant refuse to run.
    """
    path = lock_path(buffer_path)
    for where, flags in ((path, os.O_RDONLY | _OPEN_FLAGS), (path.parent, os.O_RDONLY)):
        try:
            fd = os.open(where, flags)
        except OSError:
            continue  # none: no agent has run on this buffer (or it cannot be read)
        try:
            if _pid_from_proc_locks(fd) is not None:
                return find_holder(path, fd)
        finally:
            os.close(fd)
    return None


def _open(path: Path, create: bool) -> int:
    fd = _open_file(path, create)
    problem = _not_a_lock_file(path, os.fstat(fd))
    if problem is not None:
        os.close(fd)
        raise BufferStoreError(problem)
    return fd


def _open_file(path: Path, create: bool) -> int:
    if not create:
        return _open_existing(path)
    # `run`: the agent must write here anyway; say who it runs as and who owns what.
    buffer_path = path.with_name(path.name.removesuffix(LOCK_SUFFIX))
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BufferStoreError(_symlink_problem(path)) from None
        problem = access_problem(buffer_path, exc, "open the buffer database")
        raise BufferAccessError(problem) from None


def _open_existing(path: Path) -> int:
    user = _user()
    try:
        # Readable by all, so that an operator can see which PID holds it.
        return os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    except PermissionError:
        pass
    except FileNotFoundError:
        raise BufferStoreError(
            f"no buffer database at {path.parent}; has the agent run with this config?"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BufferStoreError(_symlink_problem(path)) from None
        raise BufferStoreError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        # flock needs no write access: another user (root made it, say) may still lock it.
        return os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as exc:
        raise BufferStoreError(
            f"cannot open the lock file {path}: {exc.strerror} (user {user}); run this as "
            "the agent's user (e.g. `sudo -u edge-agent ...`) or as root"
        ) from None


def _symlink_problem(path: Path) -> str:
    try:
        to = f" (to {os.readlink(path)})"
    except OSError:
        to = ""
    return (
        f"the lock file {path} is a symbolic link{to}: the agent writes its PID into its lock "
        f"file and never follows a link there. Remove the link (`rm {path}`; the agent makes "
        "a new lock file) and start it again. Nothing was changed"
    )


def _not_a_lock_file(path: Path, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return (
            f"the lock file {path} is not a regular file (a FIFO, device, socket or "
            f"directory): remove it (`rm {path}`, or `rmdir` for a directory; the agent makes "
            "a new lock file) and start it again. Nothing was changed"
        )
    if st.st_nlink > 1:
        return (
            f"the lock file {path} has {st.st_nlink} names (hard links): the agent writes its "
            f"PID into it, which would change the other files too. Remove it (`rm {path}`; "
            "the agent makes a new lock file) and start it again. Nothing was changed"
        )
    return None


def _note_pid(fd: int) -> None:
    """Write our PID into the lock file: a second way, after /proc/locks, to find us."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EINVAL, errno.EACCES):
            raise BufferStoreError(f"cannot write to the lock file: {exc.strerror}") from None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


# -- who holds it -------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """The process that holds the lock, as far as /proc tells."""

    pid: int | None
    argv: tuple[str, ...] = ()
    unit: str | None = None  # the systemd service whose cgroup it is in
    maybe_service: bool = False  # its parent is PID 1, or systemd's INVOCATION_ID is set

    @property
    def is_operator(self) -> bool:
        """An `edge-agent buffer ...` command rather than an agent."""
        return "buffer" in self.argv

    def how(self) -> str:
        command = f" (`{shlex.join(self.argv)}`)" if self.argv else ""
        if self.unit:
            return f"the systemd service {self.unit}{command}"
        if self.maybe_service:
            return f"probably the edge-agent service{command}"
        return f"started by hand{command}"

    def stop_hint(self) -> str:
        if self.unit:
            return f"`systemctl stop {self.unit.removesuffix('.service')}`"
        if self.maybe_service:
            return "`systemctl stop edge-agent`"
        if self.pid is not None:
            return f"Ctrl-C where it runs, or `kill {self.pid}`"
        return "find it with `fuser -v` on the lock file"


def find_holder(path: Path, fd: int) -> Holder:
    pid = _pid_from_proc_locks(fd) or _pid_from_file(path)
    if pid is None:
        return Holder(None)
    ppid = _parent(pid)
    return Holder(
        pid,
        argv=_argv(pid),
        unit=_unit(pid),
        maybe_service=ppid == 1 or _has_invocation_id(pid),
    )


def refusal(holder: Holder, buffer_path: Path, doing: str) -> str:
    who = "a process whose PID cannot be read" if holder.pid is None else f"PID {holder.pid}"
    where = f"{who}, {holder.how()}"
    if holder.is_operator:
        return (
            f"{doing}: an `edge-agent buffer` command is working on the buffer {buffer_path} "
            f"({where}); wait for it to finish and try again. Nothing was changed"
        )
    if doing == "run":
        return (
            f"another agent already runs on the buffer {buffer_path}: {where}. Two agents on "
            f"one buffer would send the same readings twice: stop it first "
            f"({holder.stop_hint()}), or give this configuration another data_dir. To see "
            "what the sensors send without stopping it, `edge-agent run --once --config FILE` "
            "reads them for a few seconds and prints the records, touching no buffer (a serial "
            "port the running agent holds is busy, though); `edge-agent check --config FILE` "
            "checks a configuration. Nothing was changed"
        )
    return (
        f"`edge-agent {doing}` needs the agent stopped, and it runs on the buffer "
        f"{buffer_path}: {where}. Stop it ({holder.stop_hint()}), run this again, then start "
        "the agent again. Nothing was changed"
    )


def _pid_from_proc_locks(fd: int) -> int | None:
    """/proc/locks lines read `1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF`."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        text = (_PROC / "locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            return int(fields[4]) if fields[4].isdigit() and fields[4] != "0" else None
    return None


def _pid_from_file(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _argv(pid: int) -> tuple[str, ...]:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def _parent(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces: the fields after it are plain.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def _unit(pid: int) -> str | None:
    """`edge-agent.service` from a cgroup path like `0::/system.slice/edge-agent.service`."""
    try:
        text = (_PROC / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        last = line.rsplit("/", 1)[-1]
        if last.endswith(".service") and not last.startswith("user@"):
            return last
    return None


def _has_invocation_id(pid: int) -> bool:
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:  # another user's process: only its parent tells
        return False
    return any(v.startswith(b"INVOCATION_ID=") for v in environ.split(b"\0"))
