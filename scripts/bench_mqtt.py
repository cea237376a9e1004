#!/usr/bin/env python3
"""Messages per second from a broker into the committed buffer, against a bare subscriber.

    .venv/bin/python scripts/bench_mqtt.py [--messages 200000] [--config defaults --config 5:1000]
                                           [--rounds 2] [--json out.json] [--no-strace]

For each configuration ("defaults", or MQTT version : window), starts a private Mosquitto on a
free port,
makes a persistent session for each subscriber run, pre-publishes N QoS 1 messages into all
of them, then times each subscriber draining its session, one at a time, each in a child
process of its own, alternating bare and agent for --rounds rounds; the table compares the
fastest run of each (all rates are in --json), so that load from elsewhere on a shared
machine during one run does not decide the ratio:

- bare: a paho client that acknowledges right in on_message (manual ack): the ceiling;
- agent: the agent's MqttSource (with its MQTT link process, which runs paho) + Buffer
  (sync "full", commit_interval_ms 200), which acknowledges each message only after the
  commit of its readings (end-to-end ack).

The window is the number of QoS 1 messages in flight to a subscriber: Mosquitto's
max_inflight_messages (3.1.1), the subscribers' Receive Maximum (5), and the agent's
inflight_window. The agent commits as soon as its unacknowledged messages fill the window,
so the window sets how many messages share one fsync. The configurations run by default:

- defaults: every MQTT key of the agent at its default (mqtt_version "auto", which speaks
  MQTT 5 to Mosquitto 2, and its window of 1000 announced as Receive Maximum) on a Mosquitto
  with its default settings (max_inflight_messages 20, which MQTT 5 clients are not held to);
  the bare subscriber speaks what the agent negotiated: MQTT 5, Receive Maximum 1000;
- 3.1.1:20: mqtt_version = "3.1.1" with its default window, Mosquitto's 20 (what "auto"
  falls back to with a broker that refuses MQTT 5);
- 3.1.1:1000: 3.1.1 with the broker's max_inflight_messages raised to 1000 and the agent's
  inflight_window with it.

With a small window the run is a chain of round trips: the broker sends a window's worth,
then waits for acknowledgements, which the agent may send only after a commit with fsync.
The table's "per window" figures show that: the agent's time per window is the bare
subscriber's plus the commit; the ratio cannot reach 0.8 unless the commit takes under a
quarter of the bare subscriber's time per window.

fsyncs: strace slows the traced process even when it traces only fsync and fdatasync (via
seccomp), so the rate is measured untraced. When strace is installed a third session is
drained by the agent under `strace -f -c` (up to 50,000 messages) to count fsyncs per commit;
fsync/s is that times the untraced run's commits per second. Without strace (or with
--no-strace) one fsync per commit is assumed. Memory is each child's VmHWM, read from
/proc/self/status at the end of its run, and the MQTT link's from /proc/PID/status; the
agent's CPU per message is its process and its link together (the link's counted from its
start, so it includes its imports). The target is agent/bare >= 0.8.

stdout holds one markdown table (one row per configuration) and notes; --json also writes
every figure. scripts/bench.py imports `measure` and `summary_rows` and calls them itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.sources.mqtt.config import WINDOW_V5
from edge_agent.testing.harness import Mosquitto, Publisher, mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "bench/line-1/seq"
CLIENTS = {"bare": "bench-bare", "agent": "bench-agent", "traced": "bench-agent-traced"}
TRACED_MESSAGES = 50_000  # enough commits to know the fsyncs per commit
# The agent's default window (Mosquitto's default max_inflight_messages), and a large window
# with either protocol version.
DEFAULT_CONFIGS = ("defaults", "3.1.1:20", "3.1.1:1000")
DEFAULTS = ("auto", 0)  # the "defaults" configuration: no version, no window given
SESSION_EXPIRY_S = 3600
MESSAGES = 200_000  # per subscriber, by default
READINGS_PER_MESSAGE = 2  # {"seq": N, "temperature": 21.5}, long shape


def main() -> int:
    args = _parser().parse_args()
    if args.role:
        result = run_bare(args) if args.role == "bare" else run_agent(args, args.client_id)
        print(json.dumps(result))
        return 0
    binary = mosquitto_binary()
    if binary is None:
        print("bench_mqtt: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    configs = args.config or [_config(c) for c in DEFAULT_CONFIGS]
    results = measure(
        args.messages,
        configs,
        rounds=args.rounds,
        strace=not args.no_strace,
        child_wrap=shlex.split(args.child_wrap),
        mosquitto=binary,
    )
    _report(args.messages, results)
    if args.json is not None:
        args.json.write_text(json.dumps({"messages": args.messages, "runs": results}, indent=2))
    return 0


def _config(text: str) -> tuple[str, int]:
    if text == "defaults":
        return DEFAULTS
    version, _, window = text.partition(":")
    if version not in ("3.1.1", "5") or not window.isdigit() or int(window) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected defaults or VERSION:WINDOW, e.g. 5:1000"
        )
    return version, int(window)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=MESSAGES, help="messages per subscriber")
    p.add_argument(
        "--config",
        action="append",
        type=_config,
        metavar="defaults|VERSION:WINDOW",
        help="defaults: every MQTT key at its default, on a Mosquitto with its default "
        "settings; or an MQTT version (3.1.1 or 5) and window: QoS 1 messages in flight to a "
        "subscriber (Mosquitto's max_inflight_messages, the Receive Maximum, the agent's "
        "inflight_window); "
        f"repeat for several; default {' '.join('--config ' + c for c in DEFAULT_CONFIGS)}",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each subscriber, alternating bare and agent; the fastest of each is "
        "compared (the others are in --json), so a burst of load from elsewhere on a shared "
        "machine does not decide the ratio (default 2)",
    )
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument(
        "--child-wrap",
        default="",
        metavar="COMMAND",
        help="run each subscriber child under this command prefix (shell words; scripts/bench's "
        "Pi-class run confines them to a quarter of a core with it)",
    )
    p.add_argument(
        "--no-strace",
        action="store_true",
        help="count fsyncs from the buffer's commits instead of running the agent under strace",
    )
    # The children's own settings (one configuration each).
    p.add_argument("--window", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument(
        "--mqtt-version", choices=["auto", "3.1.1", "5"], default="3.1.1", help=argparse.SUPPRESS
    )
    p.add_argument("--role", choices=list(CLIENTS), help=argparse.SUPPRESS)
    p.add_argument("--client-id", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


# --- the parent: broker, sessions, pre-publishing, report --------------------------------------


@dataclass(frozen=True)
class Run:
    """One configuration's settings, as the parent passes them to each subscriber child."""

    messages: int
    rounds: int
    child_wrap: tuple[str, ...]
    mqtt_version: str
    window: int


def measure(
    messages: int,
    configs: Sequence[tuple[str, int]] = (),
    *,
    rounds: int = 2,
    strace: bool = True,
    child_wrap: Sequence[str] = (),
    mosquitto: str | None = None,
) -> list[dict[str, Any]]:
    """Every figure of each configuration ((version, window); none given: DEFAULT_CONFIGS),
    one dict a configuration with its "bare" and "agent" runs. `strace`: count fsyncs under
    strace when it is installed; `child_wrap`: a command prefix for each subscriber child."""
    binary = mosquitto or mosquitto_binary()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    tracer = shutil.which("strace") if strace else None
    results = []
    for version, window in configs or [_config(c) for c in DEFAULT_CONFIGS]:
        run = Run(messages, rounds, tuple(child_wrap), version, window)
        bare, agent = _bench_config(binary, run, tracer)
        results.append({"mqtt_version": version, "window": window, "bare": bare, "agent": agent})
    return results


def _bench_config(
    binary: str, args: Run, strace: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One broker with one session per subscriber run; the bare and the agent subscriber's
    runs, alternating, `args.rounds` of each; the fastest of each role is reported."""
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        workdir = Path(tmp)
        # No persistence: saving a million queued messages every few seconds would compete
        # with the subscribers for the CPU; sessions live in the broker's memory for this run.
        inflight = f"max_inflight_messages {args.window}\n" if args.window else ""
        broker = Mosquitto(workdir, binary, persistence=False, extra_conf=inflight).start()
        port = broker.port
        try:
            runs = [(role, n) for n in range(1, args.rounds + 1) for role in ("bare", "agent")]
            if strace is not None:
                runs.append(("traced", 1))
            for role, n in runs:
                _make_session(port, _client_id(role, n), args)
            started = time.monotonic()
            _publish(broker, args.messages)
            publish_s = time.monotonic() - started
            print(
                f"{_label(args.mqtt_version, args.window)}: pre-published "
                f"{args.messages} messages into {len(runs)} sessions in {publish_s:.1f} s",
                file=sys.stderr,
            )
            results: dict[str, list[dict[str, Any]]] = {"bare": [], "agent": [], "traced": []}
            for role, n in runs:
                strace_this = strace if role == "traced" else None
                results[role].append(_child(role, n, port, workdir, args, strace_this))
            bare = max(results["bare"], key=lambda r: float(r["rate"]))
            agent = max(results["agent"], key=lambda r: float(r["rate"]))
            bare["rates"] = [r["rate"] for r in results["bare"]]
            agent["rates"] = [r["rate"] for r in results["agent"]]
            if results["traced"]:
                traced = results["traced"][0]
                agent["fsyncs_per_commit"] = traced["fsyncs"] / max(1, traced["commits"])
                agent["fsync_source"] = "strace"
        finally:
            broker.stop()
    per_commit = agent.get("fsyncs_per_commit", 1.0)
    agent["fsync_rate"] = per_commit * agent["commits"] / agent["seconds"]
    agent["ratio"] = agent["rate"] / bare["rate"]
    return bare, agent


def _label(version: str, window: int) -> str:
    if (version, window) == DEFAULTS:
        return f"defaults (MQTT 5, window {WINDOW_V5}, stock Mosquitto)"
    return f"MQTT {version}, window {window}"


def _spoken(version: str, window: int) -> tuple[str, int]:
    """The version and window a subscriber uses: the defaults are what the agent negotiates
    with Mosquitto 2 (MQTT 5, its default window as Receive Maximum)."""
    return ("5", WINDOW_V5) if (version, window) == DEFAULTS else (version, window)


def _client_id(role: str, n: int) -> str:
    return f"{CLIENTS[role]}-{n}"


def _client(client_id: str, version: str, manual_ack: bool = False) -> mqtt.Client:
    v5 = version == "5"
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=manual_ack,
    )


def _connect(client: mqtt.Client, port: int, version: str, window: int) -> None:
    if version == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = window
        client.connect("127.0.0.1", port, clean_start=False, properties=props)
    else:
        client.connect("127.0.0.1", port)


def _make_session(port: int, client_id: str, args: Run) -> None:
    subscribed = threading.Event()
    version, window = _spoken(args.mqtt_version, args.window)
    client = _client(client_id, version)
    client.on_subscribe = lambda *a: subscribed.set()
    _connect(client, port, version, window)
    client.loop_start()
    client.subscribe(TOPIC, qos=1)
    if not subscribed.wait(10):
        raise SystemExit(f"bench_mqtt: no SUBACK for {client_id}")
    client.disconnect()
    client.loop_stop()


def _publish(broker: Mosquitto, total: int) -> None:
    client = Publisher(broker, "bench-publisher", max_inflight=0)  # our own bound is below
    for seq in range(total):
        client.publish(TOPIC, json.dumps({"seq": seq, "temperature": 21.5}))
        if (seq + 1) % 1000 == 0:  # bounds paho's queue of unacknowledged messages
            client.wait_room(20_000, 60)
    if not client.wait_room(0, 120):
        raise SystemExit(f"bench_mqtt: only {client.acked()} of {total} messages acknowledged")
    client.close()


def _child(
    role: str,
    n: int,
    port: int,
    workdir: Path,
    args: Run,
    strace: str | None = None,
) -> dict[str, Any]:
    messages = min(args.messages, TRACED_MESSAGES) if role == "traced" else args.messages
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--role={role}",
        f"--client-id={_client_id(role, n)}",
        f"--port={port}",
        f"--workdir={workdir}",
        f"--messages={messages}",
        f"--window={args.window}",
        f"--mqtt-version={args.mqtt_version}",
    ]
    summary = workdir / f"strace-{role}-{n}.txt"
    if strace is not None:
        trace = ["-f", "-c", "--seccomp-bpf", "-e", "trace=fsync,fdatasync", "-o", str(summary)]
        command = [strace, *trace, *command]
    command = [*args.child_wrap, *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if strace is not None:
        result["fsyncs"] = _strace_calls(summary.read_text())
    return result


def _strace_calls(summary: str) -> int:
    calls = 0
    for line in summary.splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fsync", "fdatasync"):
            calls += int(fields[3])
    return calls


def summary_rows(results: list[dict[str, Any]], messages: int) -> list[tuple[str, ...]]:
    """One row a configuration: configuration, agent msg/s, bare msg/s, ratio, target,
    details (the columns of the table this script prints, and of scripts/bench's rows)."""
    rows: list[tuple[str, ...]] = []
    for run in results:
        bare, agent = run["bare"], run["agent"]
        window = _spoken(run["mqtt_version"], run["window"])[1]
        details = (
            f"{agent['commits']} commits ({messages / max(1, agent['commits']):.0f} "
            f"messages each), {agent['fsync_rate']:,.0f} fsync/s; per window "
            f"{_per_window_ms(agent, window, messages)} ms vs "
            f"{_per_window_ms(bare, window, messages)} ms; CPU per message "
            f"{agent['cpu_us_per_message']:.0f} µs vs {bare['cpu_us_per_message']:.0f} µs; "
            f"VmHWM agent {agent['vmhwm_kb'] / 1024:.0f} MiB + link "
            f"{agent['link_vmhwm_kb'] / 1024:.0f} MiB, bare {bare['vmhwm_kb'] / 1024:.0f} MiB; "
            f"{agent['seconds']:.1f} s vs {bare['seconds']:.1f} s"
        )
        label = _label(run["mqtt_version"], run["window"])
        ratio = f"{agent['ratio']:.2f}"
        rows.append(
            (label, f"{agent['rate']:,.0f}", f"{bare['rate']:,.0f}", ratio, ">= 0.8", details)
        )
    return rows


def _report(messages: int, results: list[dict[str, Any]]) -> None:
    print(
        f"\n{messages} QoS 1 messages per subscriber; agent: MqttSource (+ link) + Buffer, "
        'sync "full", commit_interval_ms 200, ack after commit; bare: paho, ack in on_message\n'
    )
    print("| configuration | agent msg/s | bare msg/s | ratio agent/bare | target | details |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in summary_rows(results, messages):
        print("| " + " | ".join(row) + " |")
    print()
    for run in results:
        agent = run["agent"]
        verdict = "meets" if agent["ratio"] >= 0.8 else "misses"
        source = agent.get("fsync_source", "assumed: one per commit (no strace)")
        print(
            f"{_label(run['mqtt_version'], run['window'])}: ratio {agent['ratio']:.2f} "
            f"({verdict} the 0.8 target); fsyncs per commit "
            f"{agent.get('fsyncs_per_commit', 1.0):.2f} ({source})"
        )


def _per_window_ms(result: dict[str, Any], window: int, messages: int) -> str:
    """Milliseconds per window's worth of messages."""
    return f"{result['seconds'] / max(1, messages / window) * 1000:.2f}"


# --- the children: one subscriber each ---------------------------------------------------------


def _vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _process_figures(pid: int | None) -> dict[str, float]:
    """CPU seconds so far and VmHWM of another process (the MQTT link), from /proc."""
    if pid is None:
        raise SystemExit("bench_mqtt: the MQTT link process is not running")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return {"cpu_s": cpu_s, "vmhwm_kb": hwm}


def _context_switches() -> int:
    """Voluntary context switches of this process so far (threads handing work over)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    done = threading.Event()
    received = 0

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal received
        client.ack(message.mid, message.qos)
        received += 1
        if received >= args.messages:
            done.set()

    version, window = _spoken(args.mqtt_version, args.window)
    client = _client(args.client_id, version, manual_ack=True)
    client.on_message = on_message
    started = time.monotonic()
    _connect(client, args.port, version, window)
    cpu = time.process_time()
    client.loop_start()
    if not done.wait(600):
        raise SystemExit(f"bench_mqtt: bare subscriber got {received} of {args.messages}")
    seconds = time.monotonic() - started
    cpu = time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return {
        "seconds": seconds,
        "rate": args.messages / seconds,
        "cpu_us_per_message": cpu / args.messages * 1e6,
        "context_switches": _context_switches(),
        "vmhwm_kb": _vmhwm_kb(),
    }


def run_agent(args: argparse.Namespace, client_id: str) -> dict[str, Any]:
    from edge_agent.agent import AgentIntake
    from edge_agent.buffer import Buffer
    from edge_agent.clock import ClockGuard, SystemClock
    from edge_agent.config import BufferConfig
    from edge_agent.sources.mqtt.config import MqttConfig
    from edge_agent.sources.mqtt.source import MqttSource

    buffer = Buffer(
        Path(args.workdir) / client_id / "buffer.db",
        BufferConfig(sync="full", commit_interval_ms=200, max_bytes=1 << 34),
    )
    buffer.open()
    clock = SystemClock()
    intake = _CountingIntake(AgentIntake(buffer, None, clock, ClockGuard(clock)), args.messages)
    # The defaults: no key given but those that name the broker, the topic and the session.
    chosen: dict[str, Any] = {}
    if (args.mqtt_version, args.window) != DEFAULTS:
        chosen = {"mqtt_version": args.mqtt_version, "inflight_window": args.window}
        if args.mqtt_version == "5":
            chosen["session_expiry_s"] = SESSION_EXPIRY_S
    config = MqttConfig(
        name="bench",
        type="mqtt",
        datasource_id="1",
        broker=f"mqtt://127.0.0.1:{args.port}",
        topics=(TOPIC,),
        client_id=client_id,
        **chosen,
    )
    source = MqttSource(config, "bench-gw", intake)
    assert source.window == _spoken(args.mqtt_version, args.window)[1]
    started = time.monotonic()
    cpu = time.process_time()
    source.start()
    if not intake.done.wait(600):
        raise SystemExit(
            f"bench_mqtt: agent committed {intake.durable} readings of "
            f"{args.messages * READINGS_PER_MESSAGE}"
        )
    seconds = time.monotonic() - started
    cpu = time.process_time() - cpu
    link = _process_figures(source.link_pid)
    source.stop()
    buffer.close()
    return {
        "seconds": seconds,
        "rate": args.messages / seconds,
        # The agent's process and its MQTT link process (paho), together.
        "cpu_us_per_message": (cpu + link["cpu_s"]) / args.messages * 1e6,
        "agent_cpu_us_per_message": cpu / args.messages * 1e6,
        "link_cpu_us_per_message": link["cpu_s"] / args.messages * 1e6,
        "context_switches": _context_switches(),
        "vmhwm_kb": _vmhwm_kb(),
        "link_vmhwm_kb": link["vmhwm_kb"],
        "commits": buffer.commits,
    }


class _CountingIntake:
    """The agent's intake, counting messages whose readings committed (their ack is queued).

    Each message makes READINGS_PER_MESSAGE readings (seq and temperature). Every
    `on_durable` runs in the buffer's one writer thread, so the count needs no lock.
    """

    def __init__(self, inner: Any, expected: int) -> None:
        self._inner = inner
        self._expected = expected * READINGS_PER_MESSAGE
        self.durable = 0
        self.done = threading.Event()

    def put(self, readings: Any, on_durable: Any = None, device_time: bool = False) -> bool:
        counted = partial(self._counted, on_durable, len(readings))
        return bool(self._inner.put(readings, counted, device_time))

    def _counted(self, on_durable: Any, n: int) -> None:
        if on_durable is not None:
            on_durable()
        self.durable += n
        if self.durable >= self._expected:
            self.done.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


if __name__ == "__main__":
    sys.exit(main())
