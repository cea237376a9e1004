"""The `edge-agent` command: run, check, demo, sandbox, status, buffer ...

Over 600 lines on purpose: one argparse tree with every subcommand's options and help, so
`--help` and the exit codes are written in one place. Each `cmd_*` is short and hands the work
to the module that owns it (imported lazily where that module is heavy); what is left here is
argument handling and printing.

Exit status (EXIT_CODES, printed by --help): 0 fine, 1 a runtime failure, 2 a configuration
or usage error (with one line that says what to fix); `status` adds 3 (the agent is not
running) and 4 (it runs, but its status cannot be read).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__, lock
from edge_agent.buffer import BufferSession, BufferStats, Imported, Recount
from edge_agent.clock import utc_stamp
from edge_agent.config import Config, load_config, parse_duration, resolve_token
from edge_agent.credentials import exposure_warnings
from edge_agent.errors import (
    BufferAccessError,
    BufferInUseError,
    BufferStoreError,
    ConfigError,
    EdgeAgentError,
    ForeignStatusError,
)
from edge_agent.logs import setup_logging

if TYPE_CHECKING:
    from edge_agent.status import OfflineStatus, Status

log = logging.getLogger("edge_agent.cli")

EXIT_CODES = """exit status:
  0  success (status: the agent is healthy)
  1  a runtime failure (status: the agent is unhealthy; run --once: a source gave nothing;
     modbus read: the device did not answer, or its port is busy;
     buffer stats --recount: the running totals differed from the count, now corrected)
  2  a configuration or usage error, or the buffer is in use by another agent
  3  status: the agent is not running (only the buffer's figures are shown)
  4  status: the agent runs, but its status endpoint is off or does not answer
  130  interrupted (Ctrl-C)"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", None) or "info", getattr(args, "log_format", "text"))
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `edge-agent buffer stats | head`: the reader left; not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except BufferInUseError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except BufferAccessError as exc:  # the data directory, not the agent, needs fixing
        print(f"edge-agent: error: {exc}", file=sys.stderr)
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
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"edge-agent {__version__}",
        help="print the version and exit",
    )  # fmt: skip
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_LazyParser
    )

    run = _command(sub, "run", "run the agent in the foreground")
    _config_arg(run)
    run.add_argument(
        "--log-format", choices=["text", "json"], default="text",
        help="text (default): one line per event; json: one JSON object per line",
    )  # fmt: skip
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"],
        help="overrides [agent] log_level",
    )  # fmt: skip
    run.add_argument(
        "--once", action="store_true",
        help="dry run: read the sources for --seconds (a polled source: one poll), print "
        "the records as JSON lines, send nothing, touch no buffer; works beside the running "
        "service, but a serial port it holds is busy",
    )  # fmt: skip
    run.add_argument(
        "--seconds", type=_seconds, default=5.0, metavar="N",
        help="with --once: how long to read (default 5)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)

    check = _command(sub, "check", "validate a config file and say what it would do")
    _config_arg(check)
    check.add_argument(
        "--no-secrets", action="store_true",
        help="a missing or unreadable token or password is a warning, not an error "
        "(exit 0): for a config checked before its secrets are installed",
    )  # fmt: skip
    check.set_defaults(func=cmd_check)

    # The demo and the sandbox (with the simulator and the test slave) are imported only when
    # their command runs or shows its help: `run` never loads them.
    dem = _command(sub, "demo", "30-second demo: simulated sensor -> agent -> sandbox")
    dem.arguments_from = "edge_agent.demo"
    sbx = _command(sub, "sandbox", "a local insert API endpoint for tests and rehearsals")
    sbx.arguments_from = "edge_agent.sandbox"

    status = _command(
        sub, "status", "is the agent healthy? (exit 0 healthy, 1 unhealthy, 3 not running, "
        "4 status endpoint off or not answering)",
    )  # fmt: skip
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="the status document as JSON")
    status.set_defaults(func=cmd_status)

    mod = _command(sub, "modbus", "talk to a configured Modbus device (see each subcommand)")
    msub = mod.add_subparsers(dest="modbus_command", required=True, metavar="SUBCOMMAND")
    mread = _command(
        msub, "read", "poll a Modbus source once and print its decoded values (a first test "
        "on site); sends nothing, touches no buffer",
    )  # fmt: skip
    _config_arg(mread)
    mread.add_argument(
        "--source", required=True, metavar="NAME", help='the name of a type = "modbus" source'
    )
    mread.set_defaults(func=cmd_modbus_read)

    buf = _command(sub, "buffer", "inspect and manage the buffer (see each subcommand)")
    bsub = buf.add_subparsers(dest="buffer_command", required=True, metavar="SUBCOMMAND")
    stats = _command(bsub, "stats", "pending readings, drops, dead letters")
    _config_arg(stats)
    stats.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    stats.add_argument(
        "--recount",
        action="store_true",
        help="count every reading instead of reading the running totals, say where they "
        "differed and correct them (exit 1 if they did; safe beside a running agent, whose "
        "writes wait for it: about a second per million readings)",
    )
    stats.set_defaults(func=cmd_buffer_stats)
    dead = _command(bsub, "dead-letters", "records the server refused, with its reasons")
    _config_arg(dead)
    dead.add_argument("--limit", type=int, default=50, help="show at most this many (default 50)")
    dead.add_argument("--json", action="store_true", help="a JSON array, for scripts")
    dead.set_defaults(func=cmd_dead_letters)
    requeue = _command(
        bsub, "requeue", "send dead letters again, once what the server refused is fixed"
    )
    _config_arg(requeue)
    requeue.add_argument("--all", action="store_true", help="every dead letter")
    requeue.add_argument(
        "ids",
        nargs="*",
        type=_dead_letter_id,
        metavar="ID",
        help="dead letter ids (see dead-letters)",
    )
    requeue.set_defaults(func=cmd_requeue)
    purge = _command(bsub, "purge-dead-letters", "delete old dead letters for good")
    _config_arg(purge)
    purge.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="AGE",
        help="those that failed at least this long ago: 30s, 15m, 12h, 7d",
    )
    purge.set_defaults(func=cmd_purge_dead_letters)
    move = _command(bsub, "move", "send a data source's pending readings to another")
    _config_arg(move)
    move.add_argument(
        "--from", dest="source", required=True, metavar="ID", help="the wrong data source id"
    )
    move.add_argument("--to", dest="target", required=True, metavar="ID", help="the right one")
    move.set_defaults(func=cmd_move)
    drop = _command(bsub, "drop", "delete a data source's pending readings (counted)")
    _config_arg(drop)
    drop.add_argument(
        "--datasource", required=True, metavar="ID", help="whose pending readings to delete"
    )
    drop.add_argument("--yes", action="store_true", help="really delete them")
    drop.set_defaults(func=cmd_drop)
    export = _command(bsub, "export", "write pending readings as JSON lines")
    _config_arg(export)
    export.add_argument(
        "--format", choices=["jsonl"], default="jsonl",
        help='JSON lines {"datasource_id": ..., "record": {...}} (the only format)',
    )  # fmt: skip
    export.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    export.add_argument("--force", action="store_true", help="replace the output file if it exists")
    export.add_argument(
        "--db", type=Path, help="read this buffer file instead (e.g. one moved aside)"
    )
    export.set_defaults(func=cmd_export)
    imp = _command(bsub, "import", "queue readings from an exported JSON lines file")
    _config_arg(imp)
    imp.add_argument("file", type=Path, help="a file written by `buffer export`")
    imp.add_argument(
        "--when-full",
        choices=["refuse", "drop_newest"],
        default="refuse",
        help="refuse (default): import nothing unless the whole file fits within max_bytes; "
        "drop_newest: queue the first lines that fit and report the rest, not queued",
    )
    imp.set_defaults(func=cmd_import)
    return parser


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser; with `arguments_from` set, that module's `add_arguments` and
    `run` are imported and added only when the subcommand is parsed or its help shown."""

    arguments_from = ""

    def _load(self) -> None:
        if self.arguments_from:
            module = importlib.import_module(self.arguments_from)
            self.arguments_from = ""
            module.add_arguments(self)
            self.set_defaults(func=module.run)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def _command(sub: Any, name: str, help_text: str) -> _LazyParser:
    """A subcommand whose --help ends with the exit codes."""
    parser: _LazyParser = sub.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds from 0.1 to 3600, e.g. 10")
    return value


def _dead_letter_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dead letter id (a positive integer)")
    return int(text)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", type=Path, required=True, metavar="FILE", help="the TOML config file"
    )


# -- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    if args.once:
        return cmd_run_once(args)
    from edge_agent.service import Service  # here: `check` and `buffer` need none of it

    config = load_config(args.config)
    setup_logging(args.log_level or config.agent.log_level, args.log_format)
    try:
        # One agent per buffer, held until this process ends (see lock.py).
        owner = lock.hold(config.buffer_path, "run", create=True)
    except BufferInUseError:
        raise
    except BufferStoreError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2  # a start-up error
    owner.watch()  # makes the lock file again if it is deleted while the agent runs
    try:
        return Service(config).run()
    finally:
        owner.release()


def cmd_run_once(args: argparse.Namespace) -> int:
    """The dry run: no upload token, no buffer, no lock (see dry_run.py)."""
    from edge_agent.dry_run import run_once

    config = load_config(args.config, secrets=False)
    setup_logging(args.log_level or config.agent.log_level, args.log_format)
    where = str(config.path)
    sources = tuple(s.with_secrets(os.environ, where) for s in config.sources)
    return run_once(dataclasses.replace(config, sources=sources), args.seconds)


# -- modbus ------------------------------------------------------------------------------


def cmd_modbus_read(args: argparse.Namespace) -> int:
    from edge_agent.sources.modbus.command import read  # here: it loads pymodbus

    return read(args.config, args.source)


# -- status ------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """From the running agent's status endpoint, else from the buffer database alone.

    Exit status: 0 healthy, 1 unhealthy, 3 the agent is not running, 4 it runs but its
    status cannot be read (the endpoint is off, or does not answer).
    """
    from edge_agent.status import fetch_status

    config = _inspection_config(args.config)
    address = config.status.address
    foreign: str | None = None
    why: str | None = None
    try:
        doc = fetch_status(address) if address else None
    except ForeignStatusError as exc:
        doc, foreign = None, str(exc)
    if doc is not None and not _same_buffer(doc, config):
        other = doc.snapshot.agent.config or "another configuration"
        doc, why = None, f"the agent answering on {address} runs {other}, not this configuration"
    else:
        why = foreign
    if doc is not None:
        _print_status(doc, args.json)
        return 0 if doc.health.healthy else 1
    holder = lock.running_holder(config.buffer_path)
    if holder is None:
        reason = "the agent is not running (no process holds its buffer)"
        if foreign:
            reason += (
                f"; when it starts, it cannot serve its status on {address} while that program "
                "holds it: stop that program or set [status] listen to a free port"
            )
        code = 3
    elif address is None:
        reason = (
            f"the agent runs (PID {holder.pid}), but its status endpoint is off ([status] "
            'listen = "off"): only the buffer can be read; set listen to see its health'
        )
        code = 4
    elif foreign:
        reason = (
            f"the agent runs (PID {holder.pid}), but another program holds {address}: stop "
            "that program, or set [status] listen to a free port and restart the agent"
        )
        code = 4
    else:
        reason = (
            f"the agent runs (PID {holder.pid}), but nothing answers on {address}: it may "
            "be starting, or run with an older configuration (restart it to apply [status])"
        )
        code = 4
    offline = _offline_status(config, [r for r in (why, reason) if r])
    _print_status(offline, args.json)
    return code


def _same_buffer(doc: Status, config: Config) -> bool:
    """Whether the agent that answered owns this configuration's buffer (another agent may
    listen on the default port). An agent too old to say is taken at its word."""
    theirs = doc.snapshot.agent.buffer
    return theirs is None or Path(theirs) == config.buffer_path.resolve()


def _print_status(doc: Status | OfflineStatus, as_json: bool) -> None:
    from edge_agent.status import render_status_text

    if as_json:
        print(json.dumps(doc.to_json(), indent=2))
    else:
        sys.stdout.write(render_status_text(doc))


def _offline_status(config: Config, reasons: list[str]) -> OfflineStatus:
    from edge_agent.status import BufferPart, OfflineStatus

    where = str(config.path)
    try:
        session = BufferSession(config.buffer_path)
    except EdgeAgentError as exc:
        return OfflineStatus(where, config.agent.device_id, (*reasons, str(exc)), None)
    with session:
        st = session.stats()
    buffer = BufferPart.of(st, config.buffer.max_bytes, time.time())
    return OfflineStatus(where, config.agent.device_id, tuple(reasons), buffer)


# -- check -------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Validate everything, then the secrets one by one, so that a missing token does not
    hide a mistake elsewhere. Exit 2 if the agent would not start; with --no-secrets, a
    secret that cannot be read is a warning (exit 0)."""
    config = load_config(args.config, secrets=False)
    problems = _secret_problems(config)
    print(describe(config, token_ok=not problems))
    if args.no_secrets:
        for problem in problems:
            print(f"warning: secret not available: {problem}")
        return 0
    if problems:
        print(
            f"the agent would not start: {len(problems)} secret(s) missing or unreadable (on "
            "stderr); everything else is valid. `check --no-secrets` checks without them"
        )
    for problem in problems:
        print(f"edge-agent: configuration error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _secret_problems(config: Config) -> list[str]:
    """What keeps the token or a source's password from being read, one line each (never
    the secret itself)."""
    where = str(config.path)
    problems = []
    try:
        resolve_token(config.endpoint, os.environ, where)
    except ConfigError as exc:
        problems.append(str(exc))
    for source in config.sources:
        try:
            source.with_secrets(os.environ, where)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def describe(config: Config, token_ok: bool = True) -> str:
    ep = config.endpoint
    buf = config.buffer
    token_from = f"environment variable {ep.token_env}" if ep.token_env else ep.token_file
    lines = [
        f"{config.path}: OK" if token_ok else f"{config.path}: valid, but see the secrets below",
        f"buffer: {config.buffer_path} (at most {buf.max_bytes:,} bytes, "
        f"when full: {buf.when_full}, commit every {buf.commit_interval_ms} ms, sync {buf.sync})",
        f"upload: POST {ep.url} in batches of up to {ep.max_batch_records} records / "
        f"{ep.max_batch_bytes:,} bytes, token from {token_from}",
    ]
    for s in config.sources:
        decoded = f", format {s.format}" if s.TAKES_FORMAT else ""
        lines.append(
            f"source {s.name}: {s.describe()}{decoded}, shape {s.shape} "
            f"-> data source {s.datasource_id}"
        )
        lines += [f"  {detail}" for detail in s.details()]
    address = config.status.address
    if address:
        lines.append(f"status page: http://{address}/ (and /healthz, /metrics)")
    else:
        lines.append('status page: off ([status] listen = "off")')
    lines += [f"warning: {w}" for w in _warnings(config)]
    return "\n".join(lines)


def _warnings(config: Config) -> list[str]:
    """Things that are allowed but probably wrong; `check` says them, `run` goes ahead
    (and logs the ones that expose a credential once, at start)."""
    out = exposure_warnings(config)
    out += [w for s in config.sources for w in s.slip_warnings()]
    if not config.endpoint.url.rstrip("/").endswith("/restapi/datasource/insert"):
        out.append(
            f"[endpoint] url {config.endpoint.url} does not end in /restapi/datasource/insert"
        )
    users: dict[str, set[str]] = {}
    for s in config.sources:
        if (use := s.serial_port()) is not None:
            users.setdefault(use[0], set()).add(use[1])
    for port, groups in sorted(users.items()):
        if len(groups) > 1:
            out.append(
                f"{port} is used by {len(groups)} sources that cannot share it; one can open it"
            )
        if not Path(port).exists():
            out.append(f"{port} does not exist now (unplugged?); the agent retries until it does")
    return out


# -- buffer ------------------------------------------------------------------------------


def _inspection_config(path: Path) -> Config:
    return load_config(path, secrets=False)


def _session(args: argparse.Namespace) -> BufferSession:
    return BufferSession(_inspection_config(args.config).buffer_path)


@contextlib.contextmanager
def _agent_stopped(args: argparse.Namespace, doing: str) -> Iterator[BufferSession]:
    """A session for a command that is not safe beside a running agent: it holds the agent's
    lock while it works, and refuses (BufferInUseError, naming the agent) if it cannot."""
    path = _inspection_config(args.config).buffer_path
    owner = lock.hold(path, doing)
    try:
        with BufferSession(path) as session:
            yield session
    finally:
        owner.release()


def cmd_buffer_stats(args: argparse.Namespace) -> int:
    from edge_agent.status import BufferPart

    config = _inspection_config(args.config)
    with BufferSession(config.buffer_path) as session:
        recount = session.recount() if args.recount else None
        st = session.stats()
    doc = BufferPart.of(st, config.buffer.max_bytes, time.time()).to_json()
    if recount is not None:
        doc["recount"] = {
            "readings": recount.readings,
            "bytes": recount.bytes,
            **recount.rows,
            "differences": [dataclasses.asdict(d) for d in recount.differences],
        }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_buffer_stats(doc, st, config.buffer.max_bytes)
        if recount is not None:
            _print_recount(recount)
    return 1 if recount is not None and recount.differences else 0


def _print_buffer_stats(doc: dict[str, Any], st: BufferStats, max_bytes: int) -> None:
    age = doc["oldest_age_s"]
    print(f"pending: {doc['pending_total']} readings, {st.pending_bytes:,} bytes of records")
    for ds, part in doc["datasources"].items():
        oldest = part["oldest_age_s"]
        print(f"  data source {ds}: {part['pending']} ({part['bytes']:,} bytes"
              + ("" if oldest is None else f", oldest {oldest:.0f} s ago") + ")")  # fmt: skip
    print("oldest pending: " + ("none" if age is None else f"{age:.0f} s ago"))
    print(f"database file: {st.file_bytes:,} of at most {max_bytes:,} bytes; "
          f"dead letters: {st.dead_letters}; held for a trusted clock: {st.held}")  # fmt: skip
    for name, value in st.counters.items():
        print(f"  {name}: {value}")


def _print_recount(recount: Recount) -> None:
    counted = (
        f"{recount.readings} readings ({recount.bytes:,} bytes), {recount.rows['held']} held, "
        f"{recount.rows['dead_letters']} dead letters"
    )
    if not recount.differences:
        print(f"recount: {counted}; the running totals agree")
        return
    print(f"recount: {counted}; the running totals differed, and now hold the count:")
    for d in recount.differences:
        print(f"  {d.describe()}")


def cmd_dead_letters(args: argparse.Namespace) -> int:
    with _session(args) as session:
        rows = session.dead_letters(args.limit)
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


def cmd_requeue(args: argparse.Namespace) -> int:
    if bool(args.all) == bool(args.ids):
        print(
            "edge-agent buffer requeue: error: give dead letter IDs or --all (one of the two)",
            file=sys.stderr,
        )
        return 2
    with _session(args) as session:
        done = session.requeue_dead_letters(None if args.all else args.ids)
    unsendable = ", ".join(str(i) for i in done.unsendable)
    if done.missing or (done.unsendable and not args.all):
        if done.missing:
            ids = ", ".join(str(i) for i in done.missing)
            print(f"edge-agent: error: no dead letter with id {ids}", file=sys.stderr)
        if done.unsendable:
            print(
                f"edge-agent: error: dead letter(s) {unsendable} hold input a source could not "
                "read, not records; they cannot be sent (purge them instead)",
                file=sys.stderr,
            )
        print("nothing requeued", file=sys.stderr)
        return 1
    print(f"requeued {done.moved} dead letter(s); the agent sends them again")
    if done.unsendable:
        print(f"left {len(done.unsendable)} that hold unreadable source input: {unsendable}")
    return 0


def cmd_purge_dead_letters(args: argparse.Namespace) -> int:
    with _session(args) as session:
        purged = session.purge_dead_letters(args.older_than)
    cutoff = utc_stamp(time.time() - args.older_than)
    print(f"purged {purged} dead letter(s) that failed at {cutoff} or earlier")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edge_agent.export_file import output_problem, write_atomically, write_lines

    config = _inspection_config(args.config)
    path = args.db or config.buffer_path
    if args.output is not None:
        problem = output_problem(args.output, [config.buffer_path, path], args.force)
        if problem is not None:
            print(f"edge-agent buffer export: error: {problem}", file=sys.stderr)
            return 2
    with BufferSession(path) as session:
        if args.output is None:
            n = write_lines(sys.stdout, session.export_lines())
        else:
            n = write_atomically(args.output, session.export_lines(), replace=args.force)
    print(f"exported {n} readings (pending and held) from {path}", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Check the whole file first, then queue what fits; say exactly what was not queued."""
    from edge_agent.export_file import Interruption, Readings, survey

    config = _inspection_config(args.config)
    # Ctrl-C, SIGTERM: commit what was read, then report
    with BufferSession(config.buffer_path) as session, Interruption() as stop:
        found = survey(args.file, stop)
        if found.interrupted:
            print(
                f"edge-agent: interrupted ({stop.name}) while checking {args.file}; "
                "nothing was imported: run the same command again",
                file=sys.stderr,
            )
            return 128 + (stop.signum or 0)
        if found.bad_count:
            return _bad_lines(args.file, found.bad, found.bad_count)
        room = session.import_room(config.buffer)
        if args.when_full == "refuse" and found.estimated_bytes > room:
            return _does_not_fit(args.file, found.readings, found.estimated_bytes, room, config)
        readings = Readings(args.file, stop)
        done = session.import_lines(readings, config.buffer)
    if readings.interrupted:
        return _import_interrupted(args.file, done, stop.name, stop.signum or 0)
    return _import_report(args.file, done, readings.problem, args.when_full)


def _import_interrupted(path: Path, done: Imported, name: str, signum: int) -> int:
    """What committed before the signal, and the command that queues the rest."""
    queued = sum(done.queued.values())
    where = "" if done.queued_lines is None else " (lines {}-{})".format(*done.queued_lines)
    print(f"queued {queued} readings from {path}{where} before the interruption")
    for ds, n in sorted(done.queued.items()):
        print(f"  data source {ds}: {n}")
    resume = 1 if done.queued_lines is None else done.queued_lines[1] + 1
    print(
        f"edge-agent: interrupted ({name}): the readings from line {resume} on were not "
        f"queued. To queue them: `tail -n +{resume} {path} > rest.jsonl`, then "
        "`edge-agent buffer import` rest.jsonl (importing the whole file again would queue "
        f"the first {queued} twice)",
        file=sys.stderr,
    )
    return 128 + signum


def _bad_lines(path: Path, bad: list[tuple[int, str]], count: int) -> int:
    for number, problem in bad:
        print(f"edge-agent: error: {path} line {number}: {problem}", file=sys.stderr)
    if count > len(bad):
        print(f"edge-agent: error: ... and {count - len(bad)} more bad lines", file=sys.stderr)
    print(
        f"nothing was imported: {count} line(s) of {path} are not readings written by "
        "`buffer export`; fix or delete them and import the file again",
        file=sys.stderr,
    )
    return 1


def _does_not_fit(path: Path, readings: int, need: int, room: int, config: Config) -> int:
    print(
        f"edge-agent: error: {path} holds {readings:,} readings, about {need:,} bytes in the "
        f"buffer, and the buffer has room for {room:,} more bytes ([buffer] max_bytes = "
        f"{config.buffer.max_bytes:,}); nothing was imported. Let the agent upload the "
        "backlog first, raise max_bytes (and restart the agent), or queue the first lines "
        "that fit with --when-full drop_newest",
        file=sys.stderr,
    )
    return 1


def _import_report(path: Path, done: Imported, problem: str | None, when_full: str) -> int:
    queued = sum(done.queued.values())
    where = "" if done.queued_lines is None else " (lines {}-{})".format(*done.queued_lines)
    print(f"queued {queued} readings from {path}{where}; the agent uploads them")
    for ds, n in sorted(done.queued.items()):
        print(f"  data source {ds}: {n}")
    if problem is not None:
        print(f"edge-agent: error: {problem}; the readings after it were not queued",
              file=sys.stderr)  # fmt: skip
        return 1
    if done.not_queued_lines is None:
        return 0
    first, last = done.not_queued_lines
    print(
        f"not queued: {done.not_queued} readings (lines {first}-{last}): the buffer is full. "
        f"Import them once the agent has uploaded the backlog: "
        f"`tail -n +{first} {path} > rest.jsonl`, then import rest.jsonl",
        file=sys.stderr,
    )
    return 0 if when_full == "drop_newest" else 1


def cmd_move(args: argparse.Namespace) -> int:
    with _agent_stopped(args, "buffer move") as session:
        n = session.move_datasource(args.source, args.target)
    print(f"moved {n} pending readings from data source {args.source} to {args.target}")
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"this deletes every pending reading of data source {args.datasource} for good; "
            "add --yes to do it (or `buffer export` them first)",
            file=sys.stderr,
        )
        return 2
    with _agent_stopped(args, "buffer drop") as session:
        n = session.drop_datasource(args.datasource)
    print(f"dropped {n} pending readings of data source {args.datasource} (counted as "
          f"dropped.by_operator.{args.datasource})")  # fmt: skip
    return 0
