"""The source contract: what every source offers the agent, and what the agent offers it.

A source reads from one device or broker in its own thread and hands readings to `Intake`.
It knows nothing about batching, retries or HTTP. It survives its device going away: it
logs once, backs off, reopens. A stopped source cannot be started again.

Each source type is a plugin, a folder under `sources/` (see `registry.py`): its config class
derives from `SourceConfig` here (the keys every source shares), and its source follows the
`Source` protocol. The agent and the config loader know sources only through these two.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol, Self

from edge_agent.errors import ConfigError
from edge_agent.parsers import LineKind
from edge_agent.processors.base import ProcessorConfig
from edge_agent.processors.registry import build_processors
from edge_agent.records import Reading
from edge_agent.tables import build

Shape = Literal["long", "wide"]
Priority = Literal["high", "normal", "low"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """The keys every `[[sources]]` table has; each type's config class adds its own.

    `from_table` builds and checks one table; a type adds its checks in `check` and its
    secrets in `with_secrets`, and says in one line what it reads in `describe`.
    """

    # False for a type that decodes by its own settings (Modbus registers), not by `format`.
    TAKES_FORMAT: ClassVar[bool] = True

    name: str
    type: str
    datasource_id: str
    format: LineKind = "json"
    shape: Shape = "long"
    tags: Mapping[str, str] = field(default_factory=dict)
    # Sent before normal readings whenever pending ("high"), or only when nothing else
    # waits ("low"); "drop_oldest" drops low before normal before high (drain.py).
    priority: Priority = "normal"
    processors: tuple[ProcessorConfig, ...] = ()  # [[sources.processors]], in order

    @classmethod
    def from_table(cls, table: Mapping[str, Any], file: str, section: str) -> Self:
        plain = {k: v for k, v in table.items() if k != "processors"}
        source = build(cls, plain, file, section)
        if "processors" in table:
            source = replace(
                source, processors=build_processors(table["processors"], file, section)
            )
        label = f"{file}: {section}"
        if not _NAME_RE.match(source.name):
            raise ConfigError(
                f"{label} name: use letters, digits, '.', '_' or '-' (at most 64), "
                f"got {source.name!r}"
            )
        if not source.datasource_id.strip():
            raise ConfigError(f"{label} datasource_id: must not be empty")
        source.check(label, table)
        return source

    def check(self, where: str, table: Mapping[str, Any]) -> None:
        """The type's own checks; `where` names the file and the table for messages."""

    @classmethod
    def check_together(cls, configs: Sequence[SourceConfig], file: str) -> None:
        """Checks across all sources of this type in one file (a shared bus, say)."""

    @classmethod
    def nested_keys(cls) -> dict[str, list[str]]:
        """Keys of tables nested in this type's `[[sources]]` (`sources.registers`...)."""
        return {}

    def label_keys(self) -> frozenset[str]:
        """Keys of this source's records that say where a value comes from (tags, the
        device id), not values: processors leave them alone and tell series apart by them."""
        return frozenset(self.tags) | {"device_id"}

    def with_secrets(self, environ: Mapping[str, str], where: str) -> Self:
        """This config with its passwords read (from the environment or their files)."""
        return self

    def describe(self) -> str:
        """What the source reads, in a few words, for `edge-agent check`."""
        return self.type

    def details(self) -> list[str]:
        """Further lines for `edge-agent check`, one per item (a Modbus source's requests)."""
        return []

    def exposure_warnings(self) -> list[str]:
        """Allowed settings that expose a password of this source, one line each."""
        return []

    def slip_warnings(self) -> list[str]:
        """Allowed settings that are probably a slip (a Modbus register number given as an
        address...), one line each: `check` says them, the agent logs them once at start."""
        return []

    def polled(self) -> bool:
        """True when the source asks its device for each reading (one poll is a sample of
        what it reads, for `run --once`); False when the device or broker pushes."""
        return False

    def for_dry_run(self, device_id: str | None) -> Self:
        """This config as `run --once` uses it beside a running agent: nothing the agent
        holds (a broker session, a client id) may be taken over or changed."""
        return self

    def serial_port(self) -> tuple[str, str] | None:
        """The local serial device this source opens, and who may share it: sources that
        name the same sharing group may use one port together (a Modbus bus), others not."""
        return None


class Intake(Protocol):
    """Where sources put readings (the agent's side of the contract)."""

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
    ) -> bool:
        """Queue readings for the buffer; `on_durable` runs once they are committed.

        `device_time`: the timestamps came from the device, not from our clock, so an
        untrusted clock must not hold or rewrite them. Returns False when the agent is
        stopping and the readings were not taken.
        """
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add to a persistent counter (e.g. `dropped.unparseable.<source>`)."""
        ...

    def commit_soon(self) -> None:
        """Commit what is queued now rather than at the end of the commit interval."""
        ...

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        """Keep input that could not be read in `dead_letters`, with the next commit.

        `record_text` must be JSON text; `on_durable` runs once it is committed. Returns False
        when the agent is stopping and nothing was kept.
        """
        ...


@dataclass
class SourceStats:
    connected: bool = False
    lines: int = 0  # lines or messages received
    readings: int = 0  # readings emitted
    parse_errors: int = 0
    reconnects: int = 0
    timeouts: int = 0  # polls or requests the device did not answer in time
    missed_polls: int = 0  # polls that could not start on time (the previous one ran late)
    last_error: str | None = None
    last_data: float | None = None  # wall clock of the last line or message


class Source(Protocol):
    name: str
    stats: SourceStats
    heartbeat: float

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def update(self, config: SourceConfig, device_id: str | None) -> bool:
        """Take a reloaded config in place where the device settings allow; False when the
        source must be restarted for it (the agent then stops it and starts a new one)."""
        ...

    @property
    def alive(self) -> bool: ...


class ThreadedSource:
    """Start/stop plumbing shared by sources that read in one thread of their own."""

    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = SourceStats()
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._refuse_restart()
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def _refuse_restart(self) -> None:
        """A source starts once: call before taking any resource in `start`."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError(f"source {self.name} was already started")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError
