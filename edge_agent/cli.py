"""The `edge-agent` command: run, check, demo, sandbox, buffer ...

Exit status: 0 fine, 1 a runtime failure, 2 a configuration or usage error (with one line
that says what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from edge_agent import __version__, sandbox
from edge_agent.buffer import BufferSession
from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.logs import setup_logging

log = logging.getLogger("edge_agent.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", None) or "info", getattr(args, "log_format", "text"))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except EdgeAgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Reads sensors (serial, MQTT), buffers readings in SQLite and uploads "
        "them to the Madevo Data Ingestion API.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground")
    _config_arg(run)
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file and say what it would do")
    _config_arg(check)
    check.set_defaults(func=cmd_check)

    from edge_agent import demo  # here: demo imports the simulator, which only it needs

    dem = sub.add_parser("demo", help="30-second demo: simulated sensor -> agent -> sandbox")
    demo.add_arguments(dem)
    dem.set_defaults(func=demo.run)

    sbx = sub.add_parser("sandbox", help="a local insert API endpoint for tests and rehearsals")
    sandbox.add_arguments(sbx)
    sbx.set_defaults(func=sandbox.run)

    buf = sub.add_parser("buffer", help="inspect the buffer (works while the agent runs)")
    bsub = buf.add_subparsers(dest="buffer_command", required=True, metavar="SUBCOMMAND")
    stats = bsub.add_parser("stats", help="pending readings, drops, dead letters")
    _config_arg(stats)
    stats.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    stats.set_defaults(func=cmd_buffer_stats)
    dead = bsub.add_parser("dead-letters", help="records the server refused, with its reasons")
    _config_arg(dead)
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--json", action="store_true", help="a JSON array, for scripts")
    dead.set_defaults(func=cmd_dead_letters)
    return parser


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", type=Path, required=True, metavar="FILE", help="the TOML config file"
    )


# -- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    config = load_config(args.config)
    setup_logging(args.log_level or config.agent.log_level, args.log_format)
    agent = Agent(config)
    stop = threading.Event()
    reload = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload.set()
        stop.set()  # wake the loop; it checks `reload` first

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    agent.start()
    try:
        return _main_loop(agent, stop, reload)
    finally:
        agent.stop()


def _main_loop(agent: Any, stop: threading.Event, reload: threading.Event) -> int:
    while True:
        stop.wait(1.0)
        if reload.is_set():
            reload.clear()
            stop.clear()
            agent.reload()
            continue
        if stop.is_set():
            return 0
        problem = agent.check_health()
        if problem is not None:
            log.error("agent: stopping: %s", problem)
            return 1


# -- check -------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(describe(config))
    return 0


def describe(config: Config) -> str:
    ep = config.endpoint
    buf = config.buffer
    token_from = f"environment variable {ep.token_env}" if ep.token_env else ep.token_file
    lines = [
        f"{config.path}: OK",
        f"buffer: {config.buffer_path} (at most {buf.max_bytes:,} bytes, "
        f"when full: {buf.when_full}, commit every {buf.commit_interval_ms} ms, sync {buf.sync})",
        f"upload: POST {ep.url} in batches of up to {ep.max_batch_records} records / "
        f"{ep.max_batch_bytes:,} bytes, token from {token_from} (set)",
    ]
    for s in config.sources:
        what = f"{s.port} at {s.baudrate} baud" if s.type == "serial" else s.type
        lines.append(
            f"source {s.name}: {s.type} {what}, format {s.format}, shape {s.shape} "
            f"-> data source {s.datasource_id}"
        )
    return "\n".join(lines)


# -- buffer ------------------------------------------------------------------------------


def _session(args: argparse.Namespace) -> BufferSession:
    config = load_config(args.config, environ={"_": "_"} | _any_token_env(args.config))
    return BufferSession(config.buffer_path)


def _any_token_env(path: Path) -> dict[str, str]:
    """Inspection commands need no token: satisfy token_env with a placeholder."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    name = raw.get("endpoint", {}).get("token_env")
    return {name: "unused"} if isinstance(name, str) else {}


def cmd_buffer_stats(args: argparse.Namespace) -> int:
    session = _session(args)
    try:
        st = session.stats()
    finally:
        session.close()
    age = None if st.oldest_created is None else max(0.0, time.time() - st.oldest_created)
    doc = {
        "pending": st.pending,
        "pending_total": sum(st.pending.values()),
        "pending_bytes": st.pending_bytes,
        "oldest_age_s": age,
        "file_bytes": st.file_bytes,
        "dead_letters": st.dead_letters,
        "counters": st.counters,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"pending: {doc['pending_total']} readings, {st.pending_bytes:,} bytes of records")
    for ds, n in st.pending.items():
        print(f"  data source {ds}: {n}")
    print("oldest pending: " + ("none" if age is None else f"{age:.0f} s ago"))
    print(f"database file: {st.file_bytes:,} bytes; dead letters: {st.dead_letters}")
    for name, value in st.counters.items():
        print(f"  {name}: {value}")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    session = _session(args)
    try:
        rows = session.dead_letters(args.limit)
    finally:
        session.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no dead letters")
    for r in rows:
        print(
            f"#{r['id']} data source {r['datasource_id']} refused with {r['status']} "
            f"at {r['failed_at']} after {r['attempts']} attempt(s): {r['reason']}\n"
            f"    {json.dumps(r['record'])}"
        )
    return 0
