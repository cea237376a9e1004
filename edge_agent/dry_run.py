"""`edge-agent run --once`: read the sources for a few seconds and print what would be sent.

The first thing a technician runs on site, like `telegraf --test`. It opens the configured
sources with their real code, reads for `--seconds` (a polled source: until its first poll is
answered or times out), and prints each record as a JSON line on stdout, in the form `buffer
export` writes (`{"datasource_id": ..., "record": {...}}`). It sends nothing, needs no upload
token, and touches no buffer: no file under data_dir is written and the buffer's lock is not
taken, so it works beside the running service. What the service holds stays its own: a serial
port it has open is busy here (reported as such), and an MQTT source connects with a client id
of its own (`<client id>-once`), never taking over the service's session.

Exit status 0 when every source produced at least one record, 1 when one did not (the summary
on stderr says which, and why).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TextIO

from edge_agent import lock
from edge_agent.clock import SystemClock
from edge_agent.config import Config
from edge_agent.errors import ConfigError
from edge_agent.records import Reading
from edge_agent.sources.base import Source, SourceConfig
from edge_agent.sources.registry import source_type

log = logging.getLogger("edge_agent.once")


class PrintIntake:
    """The agent's side of the source contract, printing instead of buffering."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.dead_letters: list[str] = []

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
    ) -> bool:
        with self._lock:
            for r in readings:
                ds = json.dumps(r.datasource_id)
                self._out.write('{"datasource_id":' + ds + ',"record":' + r.text + "}\n")
            self._out.flush()
        if on_durable is not None:
            on_durable()  # an MQTT message is acknowledged in the dry run's own session
        return True

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def commit_soon(self) -> None:
        pass

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        with self._lock:
            self.dead_letters.append(f"{origin}: {reason}")
        if on_durable is not None:
            on_durable()
        return True


def run_once(config: Config, seconds: float, out: TextIO = sys.stdout) -> int:
    """Read every source of `config` for `seconds` (or one poll) and print its records."""
    intake = PrintIntake(out)
    sources = _make_sources(config, intake)
    started = time.monotonic()
    for source in sources.values():
        source.start()
    try:
        _wait(config, sources, started + seconds)
    finally:
        for source in sources.values():
            source.stop()
    return _report(config, sources, intake, time.monotonic() - started)


def _make_sources(config: Config, intake: PrintIntake) -> dict[str, Source]:
    clock = SystemClock()
    made = {}
    for sc in config.sources:
        declared = source_type(sc.type)
        if declared is None:  # load_config admits only registered types
            raise ConfigError(f"source {sc.name}: type {sc.type!r} is not available")
        made[sc.name] = declared.make(
            sc.for_dry_run(config.agent.device_id), config.agent.device_id, intake, clock
        )
    return made


def _wait(config: Config, sources: dict[str, Source], deadline: float) -> None:
    polled = {sc.name for sc in config.sources if sc.polled()}
    everything_polled = polled == set(sources)
    while time.monotonic() < deadline:
        if everything_polled and all(_polled_once(sources[n]) for n in polled):
            return
        time.sleep(0.05)


def _polled_once(source: Source) -> bool:
    return source.stats.lines + source.stats.timeouts > 0


def _report(config: Config, sources: dict[str, Source], intake: PrintIntake, took: float) -> int:
    def say(text: str) -> None:
        print(text, file=sys.stderr)

    say(f"edge-agent run --once: read for {took:.1f} s; nothing was sent or buffered")
    silent = []
    for sc in config.sources:
        stats = sources[sc.name].stats
        n = stats.readings
        line = f"  {sc.name}: {stats.lines} lines or messages -> {n} records"
        if stats.parse_errors or stats.timeouts:
            line += f", {stats.parse_errors} unparseable, {stats.timeouts} polls unanswered"
        if not n:
            silent.append(sc)
            line += f"; {stats.last_error or 'nothing arrived'}"
        say(line)
    for name, n in sorted(intake.counters.items()):
        say(f"  counted: {name} {n}")
    for problem in intake.dead_letters:
        say(f"  would be a dead letter: {problem}")
    if silent:
        say(_hint(config, silent))
        return 1
    return 0


def _hint(config: Config, silent: list[SourceConfig]) -> str:
    names = ", ".join(sc.name for sc in silent)
    holder = lock.running_holder(config.buffer_path)
    if holder is not None and any(sc.serial_port() for sc in silent):
        return (
            f"no records from {names}. An agent runs on this configuration (PID {holder.pid}, "
            f"{holder.how()}) and holds its serial ports, which are busy here: stop it "
            f"({holder.stop_hint()}) to read them with --once, or watch its status page"
        )
    return (
        f"no records from {names}: check the wiring and the source's settings, or read "
        "longer with --seconds"
    )
