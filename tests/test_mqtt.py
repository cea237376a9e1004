"""The MQTT source against a real Mosquitto, with the agent in process or as a real process.

Publishers publish at QoS 1 and wait for the broker's PUBACK, so a message counts as published
only once the broker owns it; from there the agent must get it to the sandbox, whatever happens
to the agent, the broker or the uplink. The broker's debug log (log_type all) shows what it
sent to the agent and which acknowledgements came back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent import Agent
from edge_agent.buffer import BufferSession
from edge_agent.clock import utc_stamp
from edge_agent.config import Secret, load_config
from edge_agent.errors import ConfigError, ParseError
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.sources.mqtt.protocol import LinkSettings, Open
from edge_agent.sources.mqtt.source import MqttSource, device_stamp
from edge_agent.testing.harness import Mosquitto, Publisher
from tests.helpers import AgentProcess, wait_until, write_config

DS = "67891"
LAB_DS = "67890"
SOAK_MESSAGES = int(os.environ.get("EDGE_AGENT_SOAK_MESSAGES", "3000"))


# --- plumbing ------------------------------------------------------------------------------


@pytest.fixture
def broker(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that logs every packet, so tests can see what it sent and what came back."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    b = Mosquitto(workdir, mosquitto.binary, extra_conf="log_type all\n")
    b.start()
    yield b
    b.stop()


def broker_log_count(b: Mosquitto, text: str) -> int:
    if not b.log_path.exists():
        return 0
    return b.log_path.read_text(errors="replace").count(text)


def wait_subscribed(b: Mosquitto, client_id: str, times: int = 1) -> None:
    wait_until(
        lambda: broker_log_count(b, f"Sending SUBACK to {client_id}\n") >= times,
        15,
        f"{client_id} subscribed",
    )


def mqtt_source(b: Mosquitto | RawBroker, **extra: Any) -> dict[str, Any]:
    return {
        "name": "plant",
        "type": "mqtt",
        "broker": b.url,
        "topics": ["sensors/+/+"],
        "topic_fields": "sensors/{device}/{metric}",
        "format": "json",
        "shape": "wide",
        "datasource_id": DS,
        **extra,
    }


def client_id(name: str = "plant", device: str = "gw-test") -> str:
    return f"edge-agent-{device}-{name}"


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    p = Publisher(broker)
    yield p
    p.close()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def mqtt_log() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("edge_agent.sources.mqtt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def seqs(sandbox: Sandbox, datasource: str = DS) -> list[int]:
    return [int(r["seq"]) for r in sandbox.records(datasource)]


def source(agent: Agent, name: str = "plant") -> MqttSource:
    found = agent.sources[name]
    assert isinstance(found, MqttSource)
    return found


# --- end to end: crashes, broker restarts, uplink outages -----------------------------------


def test_kill_9_twice_while_publishing_loses_nothing(
    tmp_path: Path,
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    agents: list[AgentProcess],
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[mqtt_source(broker)],
    )
    log = tmp_path / "agent.log"
    agents.append(AgentProcess(config, log).start())
    wait_subscribed(broker, client_id())

    def publish_all() -> None:
        for seq in range(SOAK_MESSAGES):
            publisher.publish(f"sensors/dev{seq % 7}/seq", json.dumps({"seq": seq}))
            if seq % 20 == 0:
                time.sleep(0.01)  # pacing, so the kills land while messages flow

    thread = threading.Thread(target=publish_all)
    thread.start()
    try:
        uploaded = 0
        for kill in (1, 2):
            mark = SOAK_MESSAGES * kill // 3

            def published(m: int = mark) -> bool:
                return publisher.acked() >= m

            wait_until(published, 60, f"{mark} messages published")
            # Kill a running agent in the middle of its work, not one still starting.
            wait_until(
                lambda: agents[-1].log_text().count("mqtt plant: connected to") == len(agents),
                30,
                "the agent connected",
            )

            def uploading(n: int = uploaded) -> bool:
                return len(sandbox.records(DS)) > n

            wait_until(uploading, 30, "this agent uploading")
            killed = agents[-1]
            assert killed.proc is not None and link_processes(killed.proc.pid)
            killed.kill9()
            # Its MQTT link dies with it, or it would hold the session's client id.

            def link_gone(pid: int = killed.proc.pid) -> bool:
                return not link_processes(pid)

            wait_until(link_gone, 10, "the link gone")
            uploaded = len(sandbox.records(DS))
            agents.append(AgentProcess(config, log).start())
    finally:
        thread.join()
    publisher.wait_acked()
    wait_until(
        lambda: set(seqs(sandbox)) >= set(range(SOAK_MESSAGES)), 60, "every seq in the sandbox"
    )
    assert agents[-1].terminate() == 0
    # Each restart resumed the session instead of starting a new one.
    assert agents[-1].log_text().count("(resumed session") == 2


@pytest.mark.parametrize(("version", "window"), [("3.1.1", 20), ("5", 7), (None, 1000)])
def test_messages_are_acknowledged_only_after_their_commit(
    tmp_path: Path,
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    agents: list[AgentProcess],
    version: str | None,
    window: int,
) -> None:
    # 3.1.1: Mosquitto's own window (max_inflight_messages = 20); 5: our Receive Maximum;
    # None: the defaults, which speak MQTT 5 with a Receive Maximum of 1000.
    keys = {} if version is None else {"mqtt_version": version, "inflight_window": window}
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[mqtt_source(broker, **keys)],
    )
    log = tmp_path / "agent.log"
    agents.append(AgentProcess(config, log).start())
    cid = client_id()
    wait_subscribed(broker, cid)
    protocol = "p2" if version == "3.1.1" else "p5"  # Mosquitto names 3.1.1 p2
    assert broker_log_count(broker, f"as {cid} ({protocol}, c0") == 1
    total = window + 100
    # Hold the database's write lock: the agent's writer cannot commit anything.
    lock = sqlite3.connect(tmp_path / "data" / "buffer.db", timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    for seq in range(total):
        publisher.publish("sensors/dev1/seq", json.dumps({"seq": seq}))
    publisher.wait_acked()
    sent = f"Sending PUBLISH to {cid} "
    wait_until(lambda: broker_log_count(broker, sent) >= window, 15, "a full window delivered")
    agents[-1].kill9()
    assert broker_log_count(broker, sent) == window  # the broker waited for acknowledgements
    assert broker_log_count(broker, f"Received PUBACK from {cid} ") == 0
    lock.rollback()
    lock.close()
    # What the dead agent had received was never acknowledged, so the broker sends it again.
    agents.append(AgentProcess(config, log).start())
    wait_until(lambda: set(seqs(sandbox)) == set(range(total)), 30, f"all {total} in the sandbox")
    assert agents[-1].terminate() == 0
    assert broker_log_count(broker, f"Received PUBACK from {cid} ") >= total


def test_broker_restart_while_publishing_loses_nothing(
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(mqtt_source(broker))
    wait_subscribed(broker, client_id())
    total = 600
    for seq in range(total):
        if seq == total // 3:
            wait_until(lambda: len(sandbox.records(DS)) > 0, 15, "uploads under way")
            broker.restart()
        publisher.publish(f"sensors/dev{seq % 3}/seq", json.dumps({"seq": seq}))
        if seq % 20 == 0:
            time.sleep(0.01)
    publisher.wait_acked()
    wait_until(lambda: set(seqs(sandbox)) == set(range(total)), 45, "every seq in the sandbox")
    assert source(agent).stats.reconnects >= 1
    assert source(agent).stats.connected


def test_a_killed_mqtt_link_is_started_again_and_nothing_is_lost(
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
    mqtt_log: _Lines,
) -> None:
    agent = make_agent(mqtt_source(broker))
    wait_subscribed(broker, client_id())
    first = source(agent).link_pid
    assert first is not None and link_processes(os.getpid()) == [first]
    total = 600
    for seq in range(total):
        if seq == total // 3:
            wait_until(lambda: len(sandbox.records(DS)) > 0, 15, "uploads under way")
            os.kill(first, signal.SIGKILL)
        publisher.publish(f"sensors/dev{seq % 3}/seq", json.dumps({"seq": seq}))
        if seq % 20 == 0:
            time.sleep(0.01)
    publisher.wait_acked()
    wait_until(lambda: set(seqs(sandbox)) == set(range(total)), 45, "every seq in the sandbox")
    ended = "the MQTT link process ended unexpectedly (killed by SIGKILL)"
    assert any(ended in line for line in mqtt_log.lines), mqtt_log.lines
    second = source(agent).link_pid
    assert second not in (None, first) and link_processes(os.getpid()) == [second]
    assert source(agent).stats.connected
    source(agent).stop()
    assert link_processes(os.getpid()) == [], "a stopped source leaves no link behind"


def link_processes(agent_pid: int) -> list[int]:
    """The MQTT link processes started by the agent process `agent_pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        link = b"edge_agent.sources.mqtt.link" in argv
        if link and argv[-2:-1] == [str(agent_pid).encode()] and state != "Z":
            found.append(int(entry.name))
    return found


def test_uplink_down_messages_wait_committed_and_arrive_once(
    tmp_path: Path,
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
) -> None:
    sandbox.set_faults(Faults(status=503))
    agent = make_agent(mqtt_source(broker))
    cid = client_id()
    wait_subscribed(broker, cid)
    total = 500
    for seq in range(total):
        publisher.publish("sensors/dev1/seq", json.dumps({"seq": seq}))
    publisher.wait_acked()
    session = BufferSession(tmp_path / "data" / "buffer.db")
    try:
        wait_until(lambda: session.pending_count() == total, 30, "all messages in the buffer")
    finally:
        session.close()
    wait_until(
        lambda: broker_log_count(broker, f"Received PUBACK from {cid} ") == total,
        15,
        "every message acknowledged once committed",
    )
    assert sandbox.records(DS) == []
    agent.stop()
    # A new agent on the same buffer: the broker sends nothing again, the buffer drains.
    make_agent(mqtt_source(broker))
    wait_subscribed(broker, cid, times=2)
    sandbox.set_faults(Faults())
    wait_until(lambda: len(sandbox.records(DS)) >= total, 30, "the backlog uploaded")
    assert sorted(seqs(sandbox)) == list(range(total))
    assert broker_log_count(broker, f"Sending PUBLISH to {cid} ") == total


# --- what messages become ------------------------------------------------------------------


def test_topics_payload_formats_and_device_timestamps(
    tmp_path: Path,
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
) -> None:
    plant = mqtt_source(broker, shape="long", topics=["plant/+/+"])
    plant["topic_fields"] = "plant/{device}/{metric}"
    lab = mqtt_source(
        broker,
        name="lab",
        topics=["lab/#"],
        topic_fields="lab/{room}/#",
        timestamp_field="ts",
        mqtt_version="5",
    )
    meters = mqtt_source(
        broker,
        name="meters",
        topics=["meters/+"],
        topic_fields="meters/{meter}",
        format="kv",
        tags={"site": "north"},
    )
    counts = mqtt_source(
        broker, name="counts", topics=["counts/+"], topic_fields="counts/{metric}", format="number"
    )
    before = time.time()
    make_agent(plant, lab, meters, counts)
    for name in ("plant", "lab", "meters", "counts"):
        wait_subscribed(broker, client_id(name))
    publisher.publish("plant/press-1/temperature", "21.5")
    publisher.publish("plant/press-2/temperature", '{"value": 19}')
    publisher.publish("plant/press-1/drive", '{"rpm": 1200, "load": 0.5}')
    publisher.publish("lab/r1/env", '{"ts": "2025-03-01T10:00:00.5+01:00", "t": 20.5, "h": 40}')
    publisher.publish("lab/r2/env", '{"ts": 1740823200123, "t": 1.5, "h": 41}')
    publisher.publish("lab/r2/env", '{"ts": 1740823201, "t": 2.5, "h": 42}')
    publisher.publish("meters/m1", "kwh=12.5 volts=230")
    publisher.publish("counts/bottles", "42")
    publisher.publish("counts/bottles", "43", retain=True)  # delivered live: not retained
    # Unreadable: kept in dead_letters with the topic and the reason.
    publisher.publish("plant/press-1/temperature", "not json")
    publisher.publish("lab/r3/env", '{"ts": "yesterday", "t": 1}')
    publisher.publish("lab/r3/env", '{"ts": "2025-03-01T10:00:00", "t": 1}')
    publisher.wait_acked()
    wait_until(lambda: len(sandbox.records(DS)) >= 10, 15, "all records uploaded")
    records = sandbox.records(DS)
    after = time.time()
    received = [r for r in records if r.get("room") is None]
    for r in received:
        assert utc_stamp(before) <= r.pop("timestamp") <= utc_stamp(after)
    expected_received = [
        {"metric": "temperature", "value": 21.5, "device": "press-1", "device_id": "gw-test"},
        {"metric": "temperature", "value": 19, "device": "press-2", "device_id": "gw-test"},
        {"metric": "rpm", "value": 1200, "device": "press-1", "device_id": "gw-test"},
        {"metric": "load", "value": 0.5, "device": "press-1", "device_id": "gw-test"},
        {"kwh": 12.5, "volts": 230, "meter": "m1", "site": "north", "device_id": "gw-test"},
        {"bottles": 42, "device_id": "gw-test"},
        {"bottles": 43, "device_id": "gw-test"},
    ]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(received, key=key) == sorted(expected_received, key=key)
    device_timed = sorted((r for r in records if "room" in r), key=lambda r: r["timestamp"])
    assert device_timed == [
        {"timestamp": "2025-03-01T09:00:00.500Z", "t": 20.5, "h": 40, "room": "r1"}
        | {"device_id": "gw-test"},
        {"timestamp": "2025-03-01T10:00:00.123Z", "t": 1.5, "h": 41, "room": "r2"}
        | {"device_id": "gw-test"},
        {"timestamp": "2025-03-01T10:00:01.000Z", "t": 2.5, "h": 42, "room": "r2"}
        | {"device_id": "gw-test"},
    ]
    conn = sqlite3.connect(tmp_path / "data" / "buffer.db")
    dead = conn.execute(
        "SELECT datasource_id, record, reason, origin FROM dead_letters ORDER BY id"
    ).fetchall()
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    conn.close()
    by_payload = {
        json.loads(rec)["payload"]: (ds, rec, why, origin) for ds, rec, why, origin in dead
    }
    assert len(dead) == 3
    ds, rec, why, origin = by_payload["not json"]
    assert (ds, origin) == (DS, "mqtt:plant/press-1/temperature")
    assert json.loads(rec)["topic"] == "plant/press-1/temperature"
    assert "not valid JSON" in why
    assert "not ISO 8601" in by_payload['{"ts": "yesterday", "t": 1}'][2]
    assert "no UTC offset" in by_payload['{"ts": "2025-03-01T10:00:00", "t": 1}'][2]
    assert by_payload['{"ts": "yesterday", "t": 1}'][3] == "mqtt:lab/r3/env"
    assert counters["dropped.unparseable.plant"] == 1
    assert counters["dropped.unparseable.lab"] == 2


def test_retained_messages_sent_on_subscribe_are_not_readings(
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
) -> None:
    publisher.publish("sensors/dev1/seq", json.dumps({"seq": -1}), retain=True)
    publisher.wait_acked()
    agent = make_agent(mqtt_source(broker))
    wait_subscribed(broker, client_id())
    publisher.publish("sensors/dev1/seq", json.dumps({"seq": 1}))
    publisher.wait_acked()
    wait_until(lambda: seqs(sandbox) == [1], 15, "the live message uploaded")
    assert source(agent).stats.lines == 1


def test_mqtt5_shared_group_splits_messages_between_gateways(
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
) -> None:
    shared = mqtt_source(broker, mqtt_version="5", shared_group="edge")
    first = make_agent(shared, data="a", device="gw-a")
    second = make_agent(shared, data="b", device="gw-b")
    for device in ("gw-a", "gw-b"):
        wait_subscribed(broker, client_id(device=device))
        assert broker_log_count(broker, f"as {client_id(device=device)} (p5, c0") == 1
    total = 200
    for seq in range(total):
        publisher.publish("sensors/dev1/seq", json.dumps({"seq": seq}))
    publisher.wait_acked()
    wait_until(lambda: len(sandbox.records(DS)) >= total, 30, "every seq uploaded")
    assert sorted(seqs(sandbox)) == list(range(total))
    counts = [source(first).stats.lines, source(second).stats.lines]
    assert sum(counts) == total
    assert min(counts) > 0


# --- failures the operator must see in the log ---------------------------------------------


@pytest.fixture
def secure_broker(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker with user alice (password "right") who may subscribe to sensors/# only."""
    workdir = tmp_path / "secure"
    workdir.mkdir()
    dynsec = workdir / "dynsec.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(dynsec), "alice", "right"],
        check=True,
        capture_output=True,
    )
    doc = json.loads(dynsec.read_text())
    doc["roles"][0]["acls"] = [
        {"acltype": "subscribePattern", "topic": "sensors/#", "allow": True},
        {"acltype": "publishClientReceive", "topic": "#", "allow": True},
    ]
    dynsec.write_text(json.dumps(doc))
    plugin = next(
        p for p in Path("/usr/lib").glob("**/mosquitto_dynamic_security.so") if p.is_file()
    )
    b = Mosquitto(
        workdir,
        mosquitto.binary,
        allow_anonymous=False,
        extra_conf=f"plugin {plugin}\nplugin_opt_config_file {dynsec}\n",
    )
    b.start()
    yield b
    b.stop()


def test_bad_credentials_and_refused_subscriptions_are_logged_plainly(
    tmp_path: Path,
    secure_broker: Mosquitto,
    make_agent: Callable[..., Agent],
    mqtt_log: _Lines,
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("wrong\n")
    right = tmp_path / "right-password"
    right.write_text("right\n")
    agent = make_agent(
        mqtt_source(secure_broker, username="alice", password_file=str(wrong)), data="a"
    )
    refused = "mqtt plant: the broker refused the connection: Not authorized; check username"
    wait_until(lambda: any(refused in line for line in mqtt_log.lines), 15, "refusal logged")
    assert not source(agent).stats.connected
    assert "wrong" not in "\n".join(mqtt_log.lines)
    topics = ["sensors/+/+", "secret/#"]
    for version in ("3.1.1", "5"):
        allowed_and_not = mqtt_source(
            secure_broker,
            name=f"v{version[0]}",
            username="alice",
            password_file=str(right),
            topics=topics,
            mqtt_version=version,
        )
        del allowed_and_not["topic_fields"]
        make_agent(allowed_and_not, data=f"v{version[0]}")
    denied = "the broker refused the subscription to 'secret/#'"
    wait_until(lambda: sum(denied in line for line in mqtt_log.lines) == 2, 15, "refusals logged")
    assert any("Not authorized (code 135)" in line for line in mqtt_log.lines)
    assert not any("sensors/+/+'" in line and "refused" in line for line in mqtt_log.lines)


# --- configuration and device time (no broker) ---------------------------------------------


def _config(tmp_path: Path, env: dict[str, str] | None = None, **src: Any) -> Any:
    path = write_config(
        tmp_path / "c.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=tmp_path / "d",
        sources=[
            {
                "name": "plant",
                "type": "mqtt",
                "broker": "mqtt://127.0.0.1:1883",
                "topics": ["sensors/+/+"],
                "datasource_id": DS,
                **src,
            }
        ],
    )
    return load_config(path, environ=env or {})


def test_config_defaults_and_password_kept_secret(tmp_path: Path) -> None:
    config = _config(tmp_path, {"MQTT_PW": "hunter2"}, username="u", password_env="MQTT_PW")
    src = config.sources[0]
    assert (src.qos, src.mqtt_version, src.keepalive_s) == (1, "auto", 60)
    assert (src.session_expiry_s, src.inflight_window) == (604_800, None)
    assert (src.max_payload_bytes, src.max_values_per_message) == (262_144, 1000)
    assert src.password is not None and src.password.reveal() == "hunter2"
    assert "hunter2" not in repr(config)


def test_the_password_crosses_to_the_link_as_a_secret_that_no_repr_shows() -> None:
    settings = LinkSettings(
        host="127.0.0.1",
        port=1883,
        tls=False,
        ca_file=None,
        client_cert=None,
        client_key=None,
        username="alice",
        password=Secret("hunter2"),
        client_id="edge-agent-gw-plant",
        mqtt_version="5",
        keepalive_s=60,
        session_expiry_s=604_800,
        window=1000,
        qos=1,
        topics=("sensors/#",),
        reconnect_max_s=60,
        max_payload_bytes=262_144,
    )
    ours, theirs = socket.socketpair()
    agent, link = Connection(ours.detach()), Connection(theirs.detach())
    with agent, link:
        agent.send(Open(7, settings))
        match link.recv():
            case Open(7, LinkSettings(password=Secret() as password) as received):
                assert password.reveal() == "hunter2"
                assert received == settings
            case other:
                pytest.fail(f"the link received {type(other).__name__}, not Open")
    assert "username='alice'" in repr(settings)
    for shown in (repr(Open(7, settings)), str(settings), repr(settings.password)):
        assert "hunter2" not in shown


def test_defaults_speak_mqtt_5_with_a_window_of_1000_and_3_1_1_keeps_20(tmp_path: Path) -> None:
    intake: Any = object()
    default = MqttSource(_config(tmp_path).sources[0], "gw-7", intake)
    assert (default.mqtt_version, default.window) == ("5", 1000)
    v311 = MqttSource(_config(tmp_path, mqtt_version="3.1.1").sources[0], "gw-7", intake)
    assert (v311.mqtt_version, v311.window) == ("3.1.1", 20)
    chosen = _config(tmp_path, mqtt_version="3.1.1", inflight_window=1000).sources[0]
    assert MqttSource(chosen, "gw-7", intake).window == 1000
    # With "auto", the MQTT 5 keys are accepted: they apply whenever 5 is spoken.
    auto = _config(tmp_path, session_expiry_s=60, shared_group="edge").sources[0]
    assert (auto.mqtt_version, auto.session_expiry_s, auto.shared_group) == ("auto", 60, "edge")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"broker": "http://h:1883"}, "expected mqtt://host"),
        ({"broker": "mqtt://u:p@h"}, "not in the URL"),
        ({"broker": "mqtt://h:99999"}, "bad port"),
        ({"topics": []}, "topics: missing"),
        ({"topics": ["a/b+"]}, "is not a topic filter"),
        ({"topics": ["a/#/b"]}, "is not a topic filter"),
        ({"topics": ["$share/g/a"]}, "shared_group"),
        ({"qos": 3}, "qos: expected a value from 0 to 2"),
        ({"format": "csv"}, "'json', 'number' or 'kv'"),
        ({"topic_fields": "sensors/{device"}, "is not a field"),
        ({"topic_fields": "sensors/{timestamp}/x"}, "would replace"),
        ({"topic_fields": "s/{a}/{a}"}, "appears twice"),
        ({"topic_fields": "s/{site}", "tags": {"site": "n"}}, "also a tag"),
        ({"shared_group": "edge", "mqtt_version": "3.1.1"}, "shared_group: needs MQTT 5: set"),
        ({"session_expiry_s": 60, "mqtt_version": "3.1.1"}, 'needs mqtt_version = "5" or'),
        ({"mqtt_version": "4"}, "expected one of 'auto' | '3.1.1' | '5'"),
        ({"inflight_window": 0}, "inflight_window: expected a value from 1 to"),
        ({"password_env": "X", "username": "u"}, "X is not set"),
        ({"password_file": "/nonexistent/pw", "username": "u"}, "cannot read"),
        ({"password_env": "X"}, "a password needs a username"),
        ({"ca_file": "/etc/hostname"}, "need an mqtts://"),
        ({"port": "/dev/ttyUSB0"}, "only serial and modbus sources take this key"),
        ({"password": "x"}, "unknown key 'password'"),
        ({"timestamp_field": "ts", "format": "number"}, "has no fields"),
        ({"max_payload_bytes": 10}, "max_payload_bytes: expected a value from 64 to"),
        ({"max_values_per_message": 0}, "max_values_per_message: expected a value from 1 to"),
    ],
)
def test_config_errors_say_what_to_fix(
    tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        _config(tmp_path, **settings)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("raw", "stamp"),
    [
        ("2025-03-01T10:00:00Z", "2025-03-01T10:00:00.000Z"),
        ("2025-03-01T10:00:00.123456+02:00", "2025-03-01T08:00:00.123Z"),
        (1740823200, "2025-03-01T10:00:00.000Z"),
        (1740823200.5, "2025-03-01T10:00:00.500Z"),
        (1740823200123, "2025-03-01T10:00:00.123Z"),
        ("1740823200", "2025-03-01T10:00:00.000Z"),
    ],
)
def test_device_timestamps_are_normalised(raw: Any, stamp: str) -> None:
    assert device_stamp(raw) == stamp


@pytest.mark.parametrize("raw", ["2025-03-01T10:00:00", "soon", True, 12, 1e30, "nan"])
def test_bad_device_timestamps_are_refused(raw: Any) -> None:
    with pytest.raises(ParseError):
        device_stamp(raw)


@given(st.integers(min_value=946_684_800_000, max_value=4_102_444_799_999))
def test_epoch_milliseconds_and_their_iso_form_agree(millis: int) -> None:
    seconds = datetime.fromtimestamp(millis // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    stamp = device_stamp(millis)
    assert stamp == f"{seconds}.{millis % 1000:03d}Z"
    assert device_stamp(stamp) == stamp
    assert device_stamp(str(millis)) == stamp
    assert device_stamp(millis / 1000) == stamp
    assert device_stamp(millis // 1000) == f"{seconds}.000Z"


def test_client_id_default_is_stable_and_settable(tmp_path: Path) -> None:
    config = _config(tmp_path)
    intake: Any = object()
    assert MqttSource(config.sources[0], "gw-7", intake).client_id == "edge-agent-gw-7-plant"
    config = _config(tmp_path, client_id="custom")
    assert MqttSource(config.sources[0], "gw-7", intake).client_id == "custom"


def test_a_broker_that_is_down_at_start_is_retried(
    tmp_path: Path,
    sandbox: Sandbox,
    mosquitto: Mosquitto,
    make_agent: Callable[..., Agent],
    mqtt_log: _Lines,
) -> None:
    mosquitto.stop()
    agent = make_agent(mqtt_source(mosquitto))
    wait_until(
        lambda: any("cannot reach the broker" in line for line in mqtt_log.lines), 15, "logged"
    )
    mosquitto.start()
    wait_until(lambda: source(agent).stats.connected, 15, "connected once the broker is up")


# --- hostile brokers and payloads ----------------------------------------------------------


class RawBroker:
    """Just enough of an MQTT server (3.1.1 and 5) to send what Mosquitto refuses to forward,
    or to refuse MQTT 5 as a 3.1.1-only broker does (Mosquitto cannot be told to).

    It answers CONNECT and SUBSCRIBE on every connection (each in a thread of its own), then
    sends `messages` as QoS 1 PUBLISHes (packet ids 1, 2, ...; again, marked DUP, on each new
    connection, as a broker does with what was not acknowledged) and records the packet ids
    acknowledged, and each CONNECT's client id and protocol level (4: 3.1.1, 5: MQTT 5).
    """

    def __init__(
        self,
        messages: list[tuple[bytes, bytes, bool]],
        v5_properties: bytes = b"\x00",
        refuse_v5: bytes | None = None,
    ) -> None:
        """`messages`: (topic bytes, payload, retain); `v5_properties`: the PUBLISH properties
        sent to an MQTT 5 client (their length first); `refuse_v5`: the CONNACK that answers
        an MQTT 5 CONNECT, before the connection is closed (None: MQTT 5 is accepted)."""
        self.messages = messages
        self.v5_properties = v5_properties
        self.refuse_v5 = refuse_v5
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._acked: set[int] = set()
        self._connects: list[tuple[str, int]] = []
        self.connections = 0
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, name="raw-broker", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def acked(self) -> set[int]:
        with self._lock:
            return set(self._acked)

    def connects(self, client: str | None = None) -> list[int]:
        """The protocol level of each CONNECT so far (of `client` only, if given)."""
        with self._lock:
            return [level for cid, level in self._connects if client in (None, cid)]

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        for thread in self._threads:
            thread.join(5)
        self._server.close()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            dup = self.connections > 1
            thread = threading.Thread(target=self._connection, args=(conn, dup), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _connection(self, conn: socket.socket, dup: bool) -> None:
        with conn, contextlib.suppress(OSError, EOFError):
            self._session(conn, dup)

    def _session(self, conn: socket.socket, dup: bool) -> None:
        conn.settimeout(0.2)
        _, connect = self._read(conn)
        v5 = connect[6] == 5  # after the protocol name b"\x00\x04MQTT": the level
        with self._lock:
            self._connects.append((_connect_client_id(connect), connect[6]))
        if v5 and self.refuse_v5 is not None:
            conn.sendall(self.refuse_v5)
            return  # a server that refuses a CONNECT closes the connection
        conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
        while not self._stopped.is_set():
            kind, body = self._read(conn)
            if kind == 0x80:  # SUBSCRIBE: grant QoS 1, then publish
                grant = b"\x00\x01" if v5 else b"\x01"
                conn.sendall(_packet(0x90, body[:2] + grant))
                for mid, (topic, payload, retain) in enumerate(self.messages, 1):
                    flags = 0x02 | (0x08 if dup else 0) | (0x01 if retain else 0)
                    head = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")
                    props = self.v5_properties if v5 else b""
                    conn.sendall(_packet(0x30 | flags, head + props + payload))
            elif kind == 0x40:  # PUBACK
                with self._lock:
                    self._acked.add(int.from_bytes(body[:2], "big"))
            elif kind == 0xC0:  # PINGREQ
                conn.sendall(b"\xd0\x00")
            elif kind == 0xE0:  # DISCONNECT
                return

    def _read(self, conn: socket.socket) -> tuple[int, bytes]:
        """One packet: its type (high nibble of the first byte) and its body."""
        first = self._exactly(conn, 1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exactly(conn, 1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first & 0xF0, self._exactly(conn, length)

    def _exactly(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = conn.recv(n - len(data))
            except TimeoutError:
                if self._stopped.is_set():
                    raise EOFError from None
                continue
            if not chunk:
                raise EOFError
            data += chunk
        return data


def _connect_client_id(connect: bytes) -> str:
    """The client id of a CONNECT body: after protocol name, level, flags and keepalive (and
    with MQTT 5 the properties, their length a variable byte integer)."""
    at = 10
    if connect[6] == 5:
        length, shift = 0, 0
        while True:
            byte = connect[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        at += length
    size = int.from_bytes(connect[at : at + 2], "big")
    return connect[at + 2 : at + 2 + size].decode()


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return bytes([first]) + encoded + body


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_a_topic_that_is_not_utf8_is_dead_lettered_and_acknowledged(
    tmp_path: Path, sandbox: Sandbox, make_agent: Callable[..., Agent], version: str
) -> None:
    raw = RawBroker(
        [
            (b"sensors/\xff\xfe/temp\x1b[2J", b"21.5", False),  # not UTF-8, and an ESC
            (b"sensors/\xc3/temp", b"1", True),  # retained (skipped), not UTF-8 either
            (b"sensors/press-1/temp", b"22.5", False),
        ]
    )
    try:
        agent = make_agent(mqtt_source(raw, mqtt_version=version, shape="long"))
        wait_until(lambda: raw.acked() == {1, 2, 3}, 20, "a PUBACK for every message")
        wait_until(lambda: sandbox.records(DS), 15, "the good message uploaded")
        assert raw.connections == 1  # the link never died
        assert source(agent).stats.parse_errors == 1
    finally:
        raw.stop()
    record = sandbox.records(DS)[0]
    assert (record["metric"], record["value"], record["device"]) == ("temp", 22.5, "press-1")
    conn = sqlite3.connect(tmp_path / "data" / "buffer.db")
    dead = conn.execute("SELECT record, reason, origin FROM dead_letters").fetchall()
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    conn.close()
    assert len(dead) == 1
    rec, reason, origin = dead[0]
    assert json.loads(rec)["topic"] == "sensors/\\xff\\xfe/temp\x1b[2J"
    assert json.loads(rec)["payload"] == "21.5"
    assert "not UTF-8" in reason
    assert origin == "mqtt:sensors/\\xff\\xfe/temp\x1b[2J"
    assert counters["dropped.unparseable.plant"] == 1


def test_a_packet_paho_cannot_decode_makes_the_link_reconnect_and_say_why(
    make_agent: Callable[..., Agent], mqtt_log: _Lines
) -> None:
    # A Content Type property (3) that is not UTF-8: a malformed packet, which paho answers by
    # dropping the connection (it cannot know which message it was, so it cannot acknowledge).
    raw = RawBroker([(b"sensors/a/t", b"1", False)], v5_properties=b"\x05\x03\x00\x02\xff\xfe")
    try:
        agent = make_agent(mqtt_source(raw, mqtt_version="5"))
        said = (
            "mqtt plant: lost the connection to the broker (Protocol error); the broker sent a "
            "packet that is not valid MQTT (e.g. a property that is not UTF-8), which comes "
            "again at every reconnect: check the broker and the publisher"
        )
        wait_until(lambda: raw.connections >= 3, 15, "reconnects")
        assert any(line.startswith(said) for line in mqtt_log.lines)
        assert source(agent).stats.reconnects >= 2
        assert not any("link process ended" in line for line in mqtt_log.lines)
    finally:
        raw.stop()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_huge_and_hostile_payloads_are_dead_lettered_within_bounded_memory(
    tmp_path: Path, broker: Mosquitto, publisher: Publisher, agents: list[AgentProcess]
) -> None:
    """Everything is acknowledged; agent and MQTT link each stay under 80 MiB resident."""
    config = write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",  # nothing uploads: all stays here
        data_dir=tmp_path / "data",
        sources=[mqtt_source(broker, shape="long", mqtt_version="5", inflight_window=1000)],
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    wait_subscribed(broker, client_id())
    huge = b'{"blob": "' + b"x" * (5 << 20) + b'"}'
    many_keys = json.dumps({f"k{i}": i for i in range(200_000)}).encode()
    too_many = json.dumps({f"k{i}": i for i in range(1001)}).encode()  # 12 KB: under the size cap
    deep = b'{"a":' * 40_000 + b"1" + b"}" * 40_000  # 240 KB: under the size cap
    wide = json.dumps({"note": "y" * 200_000}).encode()  # 200 KB, one value
    full = json.dumps({f"k{i}": i for i in range(1000)}).encode()  # exactly the values cap
    for _ in range(10):
        publisher.publish("sensors/dev/blob", huge)
    publisher.publish("sensors/dev/keys", many_keys)
    publisher.publish("sensors/dev/keys", too_many)
    publisher.publish("sensors/dev/deep", deep)
    for i in range(300):  # 60 MB in all: what the window lets in flight is bounded in bytes
        publisher.publish("sensors/dev/wide", wide)
        if i % 3 == 0:
            publisher.publish("sensors/dev/full", full)
    publisher.wait_acked(120)
    sent = 13 + 300 + 100
    wait_until(
        lambda: broker_log_count(broker, f"Received PUBACK from {client_id()}") >= sent,
        120,
        "the agent acknowledged every message",
    )
    assert agent.proc is not None
    [link] = link_processes(agent.proc.pid)
    agent_mib, link_mib = peak_rss_mib(agent.proc.pid), peak_rss_mib(link)
    assert agent.terminate() == 0
    assert agent_mib < 80, f"agent peaked at {agent_mib:.0f} MiB"
    assert link_mib < 80, f"MQTT link peaked at {link_mib:.0f} MiB"
    conn = sqlite3.connect(tmp_path / "data" / "buffer.db")
    dead = conn.execute("SELECT record, reason FROM dead_letters ORDER BY id").fetchall()
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    pending = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    conn.close()
    assert pending == 100 * 1000 + 300  # every "full" value, every "wide" note
    reasons = [reason for _, reason in dead]
    assert len(dead) == 13
    assert sum("over max_payload_bytes (262,144)" in r for r in reasons) == 11
    assert sum("1,001 values, more than max_values_per_message (1,000)" in r for r in reasons) == 1
    assert sum("nested" in r for r in reasons) == 1
    blob = json.loads(dead[0][0])
    assert blob["payload_bytes"] == len(huge)
    assert blob["payload"] == huge[:1024].decode()  # a prefix, not the 5 MB
    assert counters["dropped.oversize.plant"] == 12
    assert counters["dropped.unparseable.plant"] == 1
    log = agent.log_text()
    assert log.count("oversize message on 'sensors/dev/blob'") == 1  # once per incident


# --- MQTT 5 by default, 3.1.1 for a broker that refuses it ---------------------------------

# What a broker that does not speak MQTT 5 answers a CONNECT for it with, before it closes the
# connection: a 3.1.1 CONNACK "unacceptable protocol version" (Mosquitto before 1.6), or an
# MQTT 5 CONNACK with reason code 0x84 "Unsupported Protocol Version".
REFUSALS = {"3.1.1-connack-0x01": b"\x20\x02\x00\x01", "5-connack-0x84": b"\x20\x03\x00\x84\x00"}
ONE_MESSAGE = [(b"sensors/a/seq", b'{"seq": 1}', False)]


@pytest.mark.parametrize("refusal", list(REFUSALS.values()), ids=list(REFUSALS))
def test_auto_falls_back_to_3_1_1_for_good_when_the_broker_refuses_5_and_says_so_once(
    sandbox: Sandbox, make_agent: Callable[..., Agent], mqtt_log: _Lines, refusal: bytes
) -> None:
    raw = RawBroker(ONE_MESSAGE, refuse_v5=refusal)
    try:
        agent = make_agent(
            mqtt_source(raw, tags={"line": "1"}), mqtt_source(raw, name="lab", tags={"line": "2"})
        )
        wait_until(lambda: len(sandbox.records(DS)) >= 2, 20, "a record from each source")
        assert sorted(r["line"] for r in sandbox.records(DS)) == ["1", "2"]
        for name in ("plant", "lab"):
            levels = raw.connects(client_id(name))
            assert levels[0] == 5, levels  # asked for MQTT 5 first
            assert set(levels[levels.index(4) :]) == {4}, levels  # then 3.1.1 for good
            assert source(agent, name).mqtt_version == "3.1.1"
        said = [line for line in mqtt_log.lines if "refuses MQTT 5" in line]
        assert len(said) == 1, said  # once for the broker, not once per source
        assert f"the broker at 127.0.0.1:{raw.port} refuses MQTT 5 (Unsupported protocol" in said[0]
        assert "one commit with its fsync per 20 messages" in said[0]
        agent.stop()
        # A source started later in this process asks that broker for 3.1.1 straight away.
        later = make_agent(mqtt_source(raw, name="later"), data="later")
        wait_until(lambda: source(later, "later").stats.connected, 15, "the later source connected")
        assert raw.connects(client_id("later")) == [4]
        assert sum("refuses MQTT 5" in line for line in mqtt_log.lines) == 1
    finally:
        raw.stop()


def test_explicit_versions_and_shared_groups_never_fall_back(
    make_agent: Callable[..., Agent], mqtt_log: _Lines
) -> None:
    raw = RawBroker(ONE_MESSAGE, refuse_v5=REFUSALS["3.1.1-connack-0x01"])
    try:
        agent = make_agent(
            mqtt_source(raw, name="five", mqtt_version="5"),
            mqtt_source(raw, name="three", mqtt_version="3.1.1"),
            mqtt_source(raw, name="shared", shared_group="edge"),  # "auto"
        )
        wait_until(
            lambda: min(len(raw.connects(client_id(n))) for n in ("five", "shared")) >= 2,
            20,
            "the MQTT 5 sources to try again",
        )
        wait_until(lambda: source(agent, "three").stats.connected, 15, "3.1.1 connected")
        assert set(raw.connects(client_id("five"))) == {5}
        assert set(raw.connects(client_id("shared"))) == {5}
        assert raw.connects(client_id("three")) == [4]
        assert not source(agent, "five").stats.connected
        assert not source(agent, "shared").stats.connected
        assert not any("refuses MQTT 5" in line for line in mqtt_log.lines)
        refused = "the broker refused the connection: Unsupported protocol version; "
        five = f"mqtt five: {refused}try the other mqtt_version"
        shared = f"mqtt shared: {refused}shared_group needs MQTT 5 (shared subscriptions)"
        assert any(line.startswith(five) for line in mqtt_log.lines), mqtt_log.lines
        assert any(line.startswith(shared) for line in mqtt_log.lines), mqtt_log.lines
    finally:
        raw.stop()


# --- one MQTT link process for all MQTT sources --------------------------------------------


def test_mqtt_sources_share_one_link_whose_kill_9_loses_nothing_for_any(
    broker: Mosquitto,
    sandbox: Sandbox,
    publisher: Publisher,
    make_agent: Callable[..., Agent],
    mqtt_log: _Lines,
) -> None:
    lab = mqtt_source(broker, name="lab", topics=["lab/+/+"], topic_fields="lab/{device}/{metric}")
    lab["datasource_id"] = LAB_DS
    idle = mqtt_source(broker, name="idle", topics=["idle/#"])
    del idle["topic_fields"]
    names = ("plant", "lab", "idle")
    agent = make_agent(mqtt_source(broker), lab, idle)
    for name in names:
        wait_subscribed(broker, client_id(name))
    [first] = link_processes(os.getpid())
    assert {source(agent, name).link_pid for name in names} == {first}
    total = 600
    for seq in range(total):
        if seq == total // 3:
            wait_until(lambda: sandbox.records(DS) and sandbox.records(LAB_DS), 15, "uploads")
            os.kill(first, signal.SIGKILL)
        publisher.publish(f"sensors/dev{seq % 3}/seq", json.dumps({"seq": seq}))
        publisher.publish(f"lab/dev{seq % 3}/seq", json.dumps({"seq": seq}))
        if seq % 20 == 0:
            time.sleep(0.01)
    publisher.wait_acked()
    wait_until(
        lambda: set(seqs(sandbox)) == set(seqs(sandbox, LAB_DS)) == set(range(total)),
        45,
        "every seq of both sources in the sandbox",
    )
    for name in names:  # each source saw the link end, and came back on the new one
        ended = f"mqtt {name}: the MQTT link process ended unexpectedly (killed by SIGKILL)"
        assert any(line.startswith(ended) for line in mqtt_log.lines), name
    [second] = link_processes(os.getpid())
    assert second != first
    wait_until(lambda: all(source(agent, n).stats.connected for n in names), 15, "all reconnected")
    assert {source(agent, name).link_pid for name in names} == {second}
    for name in names[:2]:
        source(agent, name).stop()
    assert link_processes(os.getpid()) == [second], "the link stays while a source needs it"
    source(agent, "idle").stop()
    assert link_processes(os.getpid()) == [], "the last source to stop ends the link"
