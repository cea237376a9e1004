"""One small base for the agent's two stdlib HTTP servers: the status endpoint and the sandbox.

QuietServer    ThreadingHTTPServer that binds without a DNS lookup, takes IPv6 hosts,
               and logs a failed request at debug level instead of printing a traceback
QuietHandler   HTTP/1.0 (each connection closes after its answer, so stop() cuts clients
               off), a read timeout, and http.server's access log sent to debug
bind_failure   an OSError at bind in words an operator can act on
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        log: logging.Logger,
        what: str,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.log = log
        self.what = what  # "status", "sandbox": how log lines start
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up with getfqdn, which can hang for seconds
        # on a gateway without DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is normal (and injected by the sandbox).
        self.log.debug("%s: request from %s failed", self.what, client_address, exc_info=True)


class QuietHandler(BaseHTTPRequestHandler):
    server: QuietServer
    # HTTP/1.0 closes every connection after its answer, so stop() really cuts clients off
    # instead of leaving pooled keep-alive connections served by old threads.
    protocol_version = "HTTP/1.0"
    timeout = 10  # a client that connects and sends nothing cannot pin a thread

    def log_message(self, fmt: str, *args: Any) -> None:
        # Our own log lines replace http.server's access log on stderr.
        self.server.log.debug("%s: %s " + fmt, self.server.what, self.address_string(), *args)


def bind_failure(exc: OSError) -> str:
    """Why a server could not listen, for a message that names the address."""
    why = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({why})"
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another agent or program listens there)"
    return why
