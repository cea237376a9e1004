"""sd_notify over a real Unix datagram socket, and the watchdog's decisions on a fake clock."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.systemd import Notifier, Watchdog, stalled

MINUTE_USEC = "60000000"


class Systemd:
    """The receiving end of NOTIFY_SOCKET, as systemd binds it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def receive(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    listener = Systemd(str(tmp_path / "notify"))
    yield listener
    listener.sock.close()


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("edge_agent.systemd")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def notifier_for(address: str, **env: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": address, **env})


def test_ready_status_stopping_reach_the_socket(systemd: Systemd, tmp_path: Path) -> None:
    notifier = notifier_for(str(tmp_path / "notify"))
    assert notifier.enabled
    assert notifier.ready()
    assert systemd.receive() == ["READY=1"]
    assert notifier.status("uploading\n3 pending")
    assert systemd.receive() == ["STATUS=uploading 3 pending"]
    assert notifier.stopping()
    assert systemd.receive() == ["STOPPING=1"]


def test_reloading_carries_the_monotonic_time(systemd: Systemd, tmp_path: Path) -> None:
    notifier = notifier_for(str(tmp_path / "notify"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = systemd.receive()
    assert first == "RELOADING=1"
    name, _, value = second.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket_names() -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    listener = Systemd("\0" + name)
    try:
        notifier = notifier_for("@" + name)
        assert notifier.ready()
        assert listener.receive() == ["READY=1"]
    finally:
        listener.sock.close()


def test_without_notify_socket_everything_is_a_no_op(captured: Captured) -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": MINUTE_USEC})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.watchdog_interval() is None
    watchdog = Watchdog(notifier, lambda: ["uploader"])
    assert watchdog.interval is None
    assert not watchdog.tick(0.0)
    assert captured.records == []


def test_watchdog_interval_is_half_of_watchdog_usec(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    assert notifier_for(address, WATCHDOG_USEC=MINUTE_USEC).watchdog_interval() == 30.0
    assert notifier_for(address).watchdog_interval() is None
    assert notifier_for(address, WATCHDOG_USEC="0").watchdog_interval() is None
    assert notifier_for(address, WATCHDOG_USEC="soon").watchdog_interval() is None


def test_watchdog_pid_of_another_process_means_no_watchdog(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": MINUTE_USEC}
    mine = Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval() == 30.0
    parents = Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}, pid=os.getpid() + 1)
    assert parents.watchdog_interval() is None


def test_a_failed_send_returns_false_and_warns_once(tmp_path: Path, captured: Captured) -> None:
    gone = notifier_for(str(tmp_path / "nobody-listens"))
    assert not gone.ready()
    assert not gone.watchdog()
    warnings = captured.lines(logging.WARNING)
    assert len(warnings) == 1
    assert "nobody-listens" in warnings[0]
    assert captured.lines(logging.INFO) == []


def test_watchdog_pings_at_the_interval_while_healthy(systemd: Systemd, tmp_path: Path) -> None:
    notifier = notifier_for(str(tmp_path / "notify"), WATCHDOG_USEC=MINUTE_USEC)
    watchdog = Watchdog(notifier, lambda: [])
    pings = [t for t in range(0, 91) if watchdog.tick(float(t))]
    assert pings == [0, 30, 60, 90]
    for _ in pings:
        assert systemd.receive() == ["WATCHDOG=1"]
    assert systemd.nothing_waiting()


def test_watchdog_withholds_pings_while_a_component_is_wedged(
    systemd: Systemd, tmp_path: Path, captured: Captured
) -> None:
    notifier = notifier_for(str(tmp_path / "notify"), WATCHDOG_USEC=MINUTE_USEC)
    wedged: list[str] = []
    watchdog = Watchdog(notifier, lambda: list(wedged))
    assert watchdog.tick(0.0)
    assert systemd.receive() == ["WATCHDOG=1"]

    wedged.append("uploader")
    assert not any(watchdog.tick(float(t)) for t in range(30, 50))
    assert systemd.nothing_waiting()
    warnings = captured.lines(logging.WARNING)
    assert len(warnings) == 1, "the reason is logged once, not at every tick"
    assert "not pinging the watchdog: uploader" in warnings[0]

    wedged.clear()
    assert watchdog.tick(50.0), "pings resume at once when the component recovers"
    assert systemd.receive() == ["WATCHDOG=1"]
    assert "uploader made progress again" in captured.lines(logging.INFO)[0]
    assert not watchdog.tick(79.0)
    assert watchdog.tick(80.0)
    assert systemd.receive() == ["WATCHDOG=1"]


def test_stalled_names_old_heartbeats() -> None:
    beats = {"uploader": 100.0, "source weather": 40.0, "source soil": 95.0}
    assert stalled(beats, now=110.0, max_age=60.0) == ["source weather"]
    assert stalled(beats, now=110.0, max_age=5.0) == ["source soil", "source weather", "uploader"]
    assert stalled({}, now=110.0, max_age=1.0) == []
