"""Whether the uplink is up, and how the agent finds out that it is back.

Two kinds of failed upload call for different waits. When the server answered (5xx, 429,
408, a stall once an answer began), the uploader backs off exponentially with full jitter:
that spares the API. When nothing answered (refused, DNS failure, network unreachable,
connect timeout, a TLS handshake that failed), the link is down and backing off only delays
the moment the agent notices its return. So while the link is down the uploader sends no
batch; it probes instead, every `reconnect_probe_s` (±20 % so a fleet that lost the same
router does not probe in step), with a TCP connect and, for https, a TLS handshake to the
endpoint's host or to the proxy that carries its requests. A probe sends no readings and no
token. The moment a default route appears or changes in `/proc/net/route` (the router came
back, a modem dialled in), the next probe is due at once.

    Uplink       the state machine: up, down (since, next probe) or server refusing (until);
                 driven by the uploader's thread, read by the status page's
    UplinkView   what the status page, /metrics and `status --json` show
    RouteWatch   the default routes of /proc/net/route, to notice a network change
    Target       where a probe dials: the endpoint, or its proxy
    probe        one TCP connect (and TLS handshake): None when it got through, else why not

Time comes from an injected `Clock` and jitter from an injected `random.Random`, so tests
drive the schedule without sleeping.
"""

from __future__ import annotations

import enum
import os
import random
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edge_agent.clock import Clock, SystemClock, readable_utc
from edge_agent.config import EndpointConfig
from edge_agent.logs import printable

ROUTE_FILE = Path("/proc/net/route")
# How often the routes are read while the link is down: a read of a few hundred bytes of
# procfs, cheap enough to notice a returning router within a second rather than a period.
ROUTE_CHECK_S = 1.0
# Probes are spread over ±20 % of the period: gateways that lost the same router come back
# together, and would otherwise probe (and then upload) in step.
PROBE_JITTER = 0.2
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}


class State(enum.Enum):
    UP = "up"  # the last request was answered, or none failed yet
    DOWN = "down"  # nothing answered: probing
    REFUSING = "refusing"  # the server answered with a failure: backing off


@dataclass(frozen=True)
class UplinkView:
    """The uplink's state for the status page, /metrics and `status --json`."""

    state: str  # a State value
    since: float | None  # wall clock: down or refusing since
    next_probe_in_s: float | None  # while down
    backing_off_until: float | None  # wall clock, while the server refuses
    summary: str  # the state in words, e.g. "down since …, next probe in 7 s"


@dataclass(frozen=True)
class _Phase:
    """One consistent state, replaced whole (the status thread reads it unlocked)."""

    state: State
    since_wall: float | None = None
    next_probe: float | None = None  # monotonic, while down
    until: float | None = None  # monotonic, while refusing


class Uplink:
    """The uplink's state. The uploader's thread changes it; any thread may `view` it."""

    def __init__(
        self,
        probe_every_s: float,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        routes: RouteWatch | None = None,
    ) -> None:
        self.probe_every_s = probe_every_s
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._routes = routes if routes is not None else RouteWatch()
        self._routes_read = -ROUTE_CHECK_S  # monotonic time of the last read
        self._lock = threading.Lock()
        self._phase = _Phase(State.UP)

    @property
    def down(self) -> bool:
        return self._phase.state is State.DOWN

    def probe_delay(self) -> float:
        """Seconds from one probe to the next: the period, jittered by ±20 %."""
        spread = PROBE_JITTER * self.probe_every_s
        return self.probe_every_s + self._rng.uniform(-spread, spread)

    # -- what happened ----------------------------------------------------------------------

    def answered(self) -> None:
        """The server answered (delivered, or a refusal that is not a retry): it is up."""
        self._set(_Phase(State.UP))

    def refusing(self, delay_s: float) -> None:
        """The server answered with a failure; the uploader waits `delay_s` before retrying."""
        now = self._clock.monotonic()
        since = self._phase.since_wall if self._phase.state is State.REFUSING else None
        self._set(
            _Phase(State.REFUSING, since or self._clock.wall(), until=now + max(0.0, delay_s))
        )

    def unreachable(self) -> None:
        """Nothing answered: down from now (or since it went down), first probe one period on.

        The failed request tested exactly what a probe would, so probing at once would
        learn nothing new, unless the routes change first.
        """
        if self._phase.state is State.DOWN:
            return
        self._routes.changed()  # the routes as they are now are not news
        self._set(
            _Phase(
                State.DOWN,
                self._clock.wall(),
                next_probe=self._clock.monotonic() + self.probe_delay(),
            )
        )

    def probe_failed(self) -> None:
        phase = self._phase
        next_probe = self._clock.monotonic() + self.probe_delay()
        self._set(_Phase(State.DOWN, phase.since_wall, next_probe=next_probe))

    def probe_succeeded(self) -> float:
        """The link is back; returns how long it was down (seconds)."""
        since = self._phase.since_wall
        self._set(_Phase(State.UP))
        return 0.0 if since is None else max(0.0, self._clock.wall() - since)

    def reset(self, probe_every_s: float) -> None:
        """New endpoint settings: up again (the next batch tries them at once)."""
        self.probe_every_s = probe_every_s
        self._set(_Phase(State.UP))

    # -- the schedule -----------------------------------------------------------------------

    def until_probe(self) -> float:
        """Seconds until the next probe is due (0: now); a new default route makes it due.

        Only meaningful while down; the routes are read at most every ROUTE_CHECK_S.
        """
        phase = self._phase
        if phase.state is not State.DOWN or phase.next_probe is None:
            return 0.0
        now = self._clock.monotonic()
        if now - self._routes_read >= ROUTE_CHECK_S:
            self._routes_read = now
            if self._routes.changed():
                self._set(_Phase(State.DOWN, phase.since_wall, next_probe=now))
                return 0.0
        return max(0.0, phase.next_probe - now)

    # -- reporting ---------------------------------------------------------------------------

    def view(self) -> UplinkView:
        with self._lock:
            phase = self._phase
        now, wall = self._clock.monotonic(), self._clock.wall()
        match phase.state:
            case State.DOWN:
                left = max(0.0, (phase.next_probe or now) - now)
                when = f"next probe in {_seconds(left)}" if left > 0 else "probing now"
                text = f"down since {readable_utc(phase.since_wall or wall)}, {when}"
                return UplinkView("down", phase.since_wall, left, None, text)
            case State.REFUSING:
                left = max(0.0, (phase.until or now) - now)
                until = wall + left
                text = (
                    f"server refusing: backing off until {readable_utc(until)} "
                    f"(in {_seconds(left)})"
                    if left > 0
                    else "server refusing: retrying now"
                )
                return UplinkView("refusing", phase.since_wall, None, until, text)
            case _:
                return UplinkView("up", None, None, None, "up")

    def _set(self, phase: _Phase) -> None:
        with self._lock:
            self._phase = phase


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


# -- routes ---------------------------------------------------------------------------------


def default_routes(text: str) -> frozenset[tuple[str, str]]:
    """(interface, gateway) of each default route in the text of /proc/net/route.

    Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask …; a default route has
    destination and mask 0 and the RTF_UP flag (1).
    """
    found = set()
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        iface, dest, gateway, flags, mask = cols[0], cols[1], cols[2], cols[3], cols[7]
        try:
            up = int(flags, 16) & 1
        except ValueError:
            continue
        if up and dest == "00000000" and mask == "00000000":
            found.add((iface, gateway))
    return frozenset(found)


class RouteWatch:
    """Notices a default route that appears or changes (not one that goes away)."""

    def __init__(self, path: Path = ROUTE_FILE) -> None:
        self._path = path
        self._last = self._read()

    def changed(self) -> bool:
        now = self._read()
        news = bool(now) and now != self._last
        self._last = now
        return news

    def _read(self) -> frozenset[tuple[str, str]]:
        try:
            return default_routes(self._path.read_text(errors="replace"))
        except OSError:  # not Linux, or no procfs in this container: nothing to watch
            return frozenset()


# -- the probe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a probe dials. Never holds a proxy's user name or password."""

    host: str
    port: int
    tls: bool  # a TLS handshake follows the connect
    via_proxy: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'proxy ' if self.via_proxy else ''}{host}:{self.port}"


def target_for(ep: EndpointConfig, trust_env: bool) -> Target:
    """The endpoint's host, or the proxy its requests go through (config, then environment).

    Through a proxy, the proxy is what the gateway must reach; a TLS handshake with the
    endpoint would need a CONNECT through it, which is the request's business.
    """
    url = urllib.parse.urlsplit(ep.url)
    from_env = _env_proxy(url) if trust_env else None
    proxy = ep.proxy or (from_env[0] if from_env else None)
    if proxy:
        if "://" not in proxy:
            proxy = "http://" + proxy
        url = urllib.parse.urlsplit(proxy)
    scheme = url.scheme.lower()
    try:
        port = url.port or _DEFAULT_PORTS.get(scheme, 80)
    except ValueError:  # not a number: the request fails on it too, and says so
        port = _DEFAULT_PORTS.get(scheme, 80)
    return Target(url.hostname or "", port, scheme == "https", bool(proxy))


def proxy_note(ep: EndpointConfig, trust_env: bool) -> str:
    """ " (through the proxy HOST:PORT from HTTPS_PROXY)" when requests go through a proxy,
    else "": for error messages, which must say what the gateway actually dialled. Never
    the proxy's user name or password."""
    target = target_for(ep, trust_env)
    if not target.via_proxy:
        return ""
    if ep.proxy:
        where = "[endpoint] proxy"
    else:
        found = _env_proxy(urllib.parse.urlsplit(ep.url))
        where = found[1] if found else "the environment"
    return f" (through the {target} from {where})"


def _env_proxy(url: urllib.parse.SplitResult) -> tuple[str, str] | None:
    """The proxy HTTP(S)_PROXY or ALL_PROXY names for this URL, and the variable's name,
    unless NO_PROXY exempts it (the variables httpx follows when no transport is handed in)."""
    proxies = urllib.request.getproxies_environment()
    key = url.scheme.lower() if proxies.get(url.scheme.lower()) else "all"
    proxy = proxies.get(key)
    if not proxy or _no_proxy(url.hostname or "", proxies.get("no", "")):
        return None
    names = [n for n in (f"{key}_proxy", f"{key.upper()}_PROXY") if os.environ.get(n)]
    return proxy, (names[0] if names else f"{key.upper()}_PROXY")  # lower case wins


def _no_proxy(host: str, no_proxy: str) -> bool:
    """Whether NO_PROXY exempts `host`: `*`, the host itself, or a domain it is in."""
    host = host.lower()
    for entry in no_proxy.lower().split(","):
        name = entry.strip().lstrip(".")
        if name == "*":
            return True
        if name.startswith("["):  # [::1] or [::1]:8080
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:  # host:port
            name = name.partition(":")[0]
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def probe(target: Target, timeout_s: float, tls: ssl.SSLContext | bool) -> str | None:
    """Connect (and shake hands for TLS), then hang up: None when it worked, else why not.

    Nothing is sent but the TLS handshake: no request, no token. `tls` is the endpoint's
    context (its CA file, client certificate), or False when certificates are not checked.
    """
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout_s) as sock:
            if target.tls:
                ctx = tls if isinstance(tls, ssl.SSLContext) else _unchecked()
                with ctx.wrap_socket(sock, server_hostname=target.host):
                    pass
    except OSError as exc:  # refused, unreachable, DNS (gaierror), timeout, ssl.SSLError
        return printable(f"{type(exc).__name__}: {exc}", 300)
    return None


def _unchecked() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
