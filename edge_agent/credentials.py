"""Credentials: what a token or password may hold, how to hide one, and how they are exposed.

The upload token goes into an HTTP header. A token file with a line break inside, a stray
space or a byte that is not ASCII makes httpx refuse the header with an error whose text
quotes the whole `Bearer ...` value, so the token must be checked before it is ever used:
`token_problem` and `password_problem` say what is wrong without quoting the secret. `redact`
is the second line of defence for any text that reaches a log line or a status document.
`exposure_warnings` lists settings that are allowed but let a secret travel or lie in the
open (plain http to another machine, `verify_tls = false`, a file other users can read).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from edge_agent.config import Config

# "Bearer" and everything after it (the placeholder of a help text excepted): an exception's
# text may quote an Authorization header, and nothing after the scheme is ever safe to show.
_BEARER_RE = re.compile(r"(?i)\bbearer\b(?!\s*<token>)[\s\S]*")
_URL_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]*@")


def redact(text: str) -> str:
    """`text` without what follows "Bearer" and without user:password@ in URLs."""
    text = _URL_USERINFO_RE.sub(r"\1[redacted]@", text)
    return _BEARER_RE.sub("Bearer [redacted]", text)


def strip_line_end(data: str) -> str:
    """The text without one final line break, as editors and `echo` leave it."""
    if data.endswith("\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith("\n") else data


def token_problem(token: str) -> str | None:
    """Why `token` (its final line break removed) cannot be a bearer token, or None.

    One line of printable ASCII without spaces: what an HTTP header can carry as it is.
    The answer names a position, never a character of the token.
    """
    if not token:
        return "is empty; put the token on one line"
    lines = _line_count(token)
    if lines > 1:
        return (
            f"holds {lines} lines (a line break inside the token, or blank lines after it); "
            "put the token alone on one line"
        )
    for index, char in enumerate(token, start=1):
        if char in " \t":
            return (
                f"has a space or tab at character {index}; a token has none: remove it "
                "(e.g. write it with `printf '%s\\n' TOKEN > FILE`)"
            )
        if not "!" <= char <= "~":
            return (
                f"has a character that is not printable ASCII at character {index} (a control "
                "character or a non-ASCII letter); copy the token again as the API issued it"
            )
    return None


def password_problem(password: str) -> str | None:
    """Why `password` (its final line break removed) cannot be sent to a broker, or None.

    MQTT passwords are UTF-8 and may hold spaces and letters of any script, but a line break
    or a control character is always a slip (two lines in the file, a pasted escape).
    """
    if not password:
        return "is empty"
    lines = _line_count(password)
    if lines > 1:
        return (
            f"holds {lines} lines (a line break inside the password, or blank lines after "
            "it); put the password alone on one line"
        )
    for index, char in enumerate(password, start=1):
        if unicodedata.category(char) in ("Cc", "Cs"):
            return (
                f"has a control character at character {index}; write the password again without it"
            )
    return None


def _line_count(text: str) -> int:
    return len(text.splitlines()) + (1 if text.endswith(("\n", "\r")) else 0)


def decode_secret_file(data: bytes) -> str:
    """The text of a token or password file; ValueError names the first byte that is not
    UTF-8 by its offset (never its value, which is part of the secret)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"is not UTF-8 text (byte {exc.start + 1} of the file); write it again as plain text"
        ) from None


SECRET_FILE_LIMIT = 64 * 1024  # a token or password file holds one line
CONFIG_FILE_LIMIT = 4 * 1024 * 1024


class NotASmallFile(ValueError):
    """The file is not a regular file, or larger than the caller allows; the text says which
    (never what it holds)."""


def read_small_file(path: str | Path, limit: int) -> bytes:
    """The bytes of `path` (links followed) if it is a regular file of at most `limit` bytes.

    A token_file pointed at /dev/zero, /dev/urandom, a FIFO or a 1 GB file must neither hang
    nor fill memory: the kind and size are checked on the open file before reading, and the
    read stops one byte past `limit` in case it grew meanwhile. Raises NotASmallFile, or
    OSError when it cannot be opened or read.
    """
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotASmallFile(f"is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise NotASmallFile(f"is {st.st_size:,} bytes, more than the {_size(limit)} allowed")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise NotASmallFile(f"grew past {_size(limit)} while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (`a FIFO (named pipe)`)."""
    for check, kind in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if check(mode):
            return kind
    return "a special file"


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n // 1024} KiB"


def has_url_credentials(url: str) -> bool:
    """True when `url` carries user:password@ (or user@) before its host."""
    parts = urlsplit(url)
    return parts.username is not None or parts.password is not None or "@" in parts.netloc


def is_loopback(host: str | None) -> bool:
    """True for this machine's own addresses (localhost, 127.0.0.0/8, ::1)."""
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(config: Config) -> list[str]:
    """Allowed settings that expose the token or a broker password, one line each."""
    out = []
    ep = config.endpoint
    parts = urlsplit(ep.url)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        out.append(
            f"[endpoint] url: http:// to {parts.hostname} sends the token in plain text over "
            "the network, where anyone on the path can read it; use https://"
        )
    if not ep.verify_tls and parts.scheme == "https":
        out.append(
            "[endpoint] verify_tls = false: the server's certificate is not checked, so "
            "anyone on the path can pose as the API and take the token; set ca_file to "
            "trust a private CA instead"
        )
    if ep.token_file is not None:
        out += readable_by_others("[endpoint] token_file", ep.token_file)
    for src in config.sources:
        out += src.exposure_warnings()
    return out


def readable_by_others(label: str, path: str) -> list[str]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []  # loading the config already said why it cannot be read
    if not mode & 0o077:
        return []
    return [
        f"{label}: {path} can be read or changed by other users (mode "
        f"{stat.S_IMODE(mode):04o}); "
        f"restrict it to the agent's user: chmod 600 {Path(path)}"
    ]
