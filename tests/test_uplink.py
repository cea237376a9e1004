"""The uplink's state machine and probe: schedule and jitter on a fake clock, routes from a
file in /proc/net/route's format, the probe against real sockets (a listener, a closed port,
a TLS server)."""

from __future__ import annotations

import itertools
import random
import socket
import ssl
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import EndpointConfig
from edge_agent.testing.harness import free_port
from edge_agent.uplink import (
    PROBE_JITTER,
    ROUTE_CHECK_S,
    RouteWatch,
    Target,
    Uplink,
    default_routes,
    probe,
    proxy_note,
    target_for,
)
from tests.fakes import FakeClock

WALL = 1_800_000_000.0  # 2027-01-15T08:00:00Z
HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
LAN = "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"


def default_via(iface: str, gateway: str, flags: str = "0003") -> str:
    return f"{iface}\t00000000\t{gateway}\t{flags}\t0\t0\t0\t00000000\t0\t0\t0\n"


def uplink(
    tmp_path: Path, routes: str = HEADER + LAN, seed: int = 1, every: float = 10.0
) -> tuple[Uplink, FakeClock, Path]:
    route_file = tmp_path / "route"
    route_file.write_text(routes)
    clock = FakeClock(WALL)
    up = Uplink(every, clock=clock, rng=random.Random(seed), routes=RouteWatch(route_file))
    return up, clock, route_file


# --------------------------------------------------------------------------- schedule


def test_probes_are_spread_over_plus_minus_20_percent_of_the_period(tmp_path: Path) -> None:
    up, _, _ = uplink(tmp_path)
    delays = [up.probe_delay() for _ in range(2000)]
    low, high = 10.0 * (1 - PROBE_JITTER), 10.0 * (1 + PROBE_JITTER)
    assert all(low <= d <= high for d in delays)
    # Spread over the whole band, not bunched in the middle or at one end.
    assert min(delays) < low + 0.2 and max(delays) > high - 0.2
    assert abs(statistics.mean(delays) - 10.0) < 0.2


def test_a_fleet_that_lost_the_same_router_does_not_probe_in_step(tmp_path: Path) -> None:
    """Ten gateways go down at the same moment; their probes drift apart, not together."""
    fleet = []
    for seed in range(10):
        up, clock, _ = uplink(tmp_path, seed=seed)
        up.unreachable()
        fleet.append((up, clock))
    times = []
    for up, clock in fleet:
        probes, t = [], 0.0
        for _ in range(5):
            wait = up.until_probe()
            clock.advance(wait)
            t += wait
            probes.append(t)
            up.probe_failed()
        times.append(probes)
    firsts = sorted(p[0] for p in times)
    assert len({round(t, 3) for t in firsts}) == 10
    assert firsts[-1] - firsts[0] > 1.0  # spread over seconds, within the ±2 s band
    assert all(8.0 <= t <= 12.0 for t in firsts)
    for probes in times:  # each gateway keeps its own pace, period after period
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert all(8.0 <= g <= 12.0 for g in gaps)


def test_down_waits_a_period_then_probes_until_one_gets_through(tmp_path: Path) -> None:
    up, clock, _ = uplink(tmp_path)
    assert up.view().summary == "up" and not up.down
    up.unreachable()
    assert up.down
    first = up.until_probe()
    assert 8.0 <= first <= 12.0
    view = up.view()
    assert view.state == "down" and view.since == WALL
    assert view.summary == f"down since 2027-01-15 08:00:00 UTC, next probe in {first:.1f} s"
    clock.advance(first)
    assert up.until_probe() == 0.0
    assert up.view().summary.endswith("probing now")
    up.probe_failed()
    assert 8.0 <= up.until_probe() <= 12.0
    assert up.view().since == WALL  # still the same outage
    clock.advance(30.0)
    assert up.probe_succeeded() == pytest.approx(first + 30.0)
    assert not up.down and up.view().summary == "up"


def test_a_new_default_route_makes_the_probe_due_at_once(tmp_path: Path) -> None:
    up, clock, route_file = uplink(tmp_path, HEADER + default_via("wwan0", "0101A8C0") + LAN)
    up.unreachable()
    clock.advance(ROUTE_CHECK_S)
    assert up.until_probe() > 5.0  # the route it went down with is no news
    route_file.write_text(HEADER + LAN)  # the route goes away: nothing to probe through
    clock.advance(ROUTE_CHECK_S)
    assert up.until_probe() > 5.0
    route_file.write_text(HEADER + default_via("wwan0", "0201A8C0") + LAN)  # a new gateway
    assert up.until_probe() > 0.0, "read at most once a second"
    clock.advance(ROUTE_CHECK_S)
    assert up.until_probe() == 0.0
    up.probe_failed()
    clock.advance(ROUTE_CHECK_S)
    assert up.until_probe() > 5.0  # the same route again is no news


def test_default_routes_are_read_from_proc_net_route_format() -> None:
    text = (
        HEADER
        + default_via("eth0", "010200C0")
        + default_via("wlan0", "0101A8C0", flags="0002")  # not up
        + LAN
        + "garbage\n"
    )
    assert default_routes(text) == {("eth0", "010200C0")}
    assert default_routes(HEADER + LAN) == frozenset()


def test_without_proc_net_route_nothing_changes(tmp_path: Path) -> None:
    watch = RouteWatch(tmp_path / "missing")
    assert not watch.changed()


def test_a_refusing_server_says_until_when(tmp_path: Path) -> None:
    up, clock, _ = uplink(tmp_path)
    up.refusing(40.0)
    view = up.view()
    assert view.state == "refusing" and view.backing_off_until == WALL + 40.0
    assert view.summary == "server refusing: backing off until 2027-01-15 08:00:40 UTC (in 40 s)"
    clock.advance(40.0)
    assert up.view().summary == "server refusing: retrying now"
    up.refusing(10.0)
    assert up.view().since == WALL  # the same episode
    up.answered()
    assert up.view().state == "up"


# --------------------------------------------------------------------------- where to probe


def ep(
    url: str = "https://api.example.com/restapi/datasource/insert", proxy: str | None = None
) -> EndpointConfig:
    return EndpointConfig(url=url, token_file="t", proxy=proxy)


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_the_probe_dials_the_endpoint_or_its_proxy(no_proxy_env: pytest.MonkeyPatch) -> None:
    assert target_for(ep(), True) == Target("api.example.com", 443, True, False)
    assert target_for(ep("http://10.0.0.5:8080/insert"), True) == Target(
        "10.0.0.5", 8080, False, False
    )
    # A configured proxy, with its user and password left out of the target.
    via = target_for(ep(proxy="http://user:secret@proxy.lan:3128"), True)
    assert via == Target("proxy.lan", 3128, False, True)
    assert str(via) == "proxy proxy.lan:3128" and "secret" not in repr(via)
    no_proxy_env.setenv("HTTPS_PROXY", "http://envproxy.lan:8888")
    assert target_for(ep(), True) == Target("envproxy.lan", 8888, False, True)
    assert target_for(ep(), False).host == "api.example.com"  # a transport decides alone
    no_proxy_env.setenv("NO_PROXY", "localhost, .example.com")
    assert target_for(ep(), True).host == "api.example.com"


def test_errors_name_the_proxy_and_where_it_was_set_never_its_password(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    assert proxy_note(ep(), True) == ""
    configured = proxy_note(ep(proxy="http://user:secret@proxy.lan:3128"), True)
    assert configured == " (through the proxy proxy.lan:3128 from [endpoint] proxy)"
    no_proxy_env.setenv("https_proxy", "http://user:secret@envproxy.lan:8888")
    assert proxy_note(ep(), True) == " (through the proxy envproxy.lan:8888 from https_proxy)"
    no_proxy_env.delenv("https_proxy")
    no_proxy_env.setenv("ALL_PROXY", "http://allproxy.lan:9000")
    assert proxy_note(ep(), True) == " (through the proxy allproxy.lan:9000 from ALL_PROXY)"
    assert proxy_note(ep(), False) == "", "a transport handed in decides alone"
    no_proxy_env.setenv("NO_PROXY", "api.example.com")
    assert proxy_note(ep(), True) == ""


# --------------------------------------------------------------------------- the probe


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_a_probe_gets_through_to_a_listener_and_sends_nothing(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert probe(Target("127.0.0.1", port, False, False), 2.0, False) is None
    conn, _ = listener.accept()
    conn.settimeout(2.0)
    assert conn.recv(100) == b""  # hung up without a byte: no request, no token
    conn.close()


def test_a_probe_to_a_closed_port_says_why() -> None:
    why = probe(Target("127.0.0.1", free_port(), False, False), 2.0, False)
    assert why is not None and "ConnectionRefusedError" in why


def test_a_tls_probe_shakes_hands_and_checks_the_certificate(
    tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            conn, _ = sock.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass  # the untrusting client hangs up mid-handshake

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        target = Target("127.0.0.1", port, True, False)
        untrusted = probe(target, 2.0, ssl.create_default_context())
        assert untrusted is not None and "CERTIFICATE_VERIFY_FAILED" in untrusted
        assert probe(target, 2.0, ssl.create_default_context(cafile=str(cert))) is None
        assert probe(target, 2.0, False) is None  # verify_tls = false
    finally:
        stop.set()
        with socket.create_connection(("127.0.0.1", port)):
            pass  # wake accept()
        thread.join(5.0)
        sock.close()
