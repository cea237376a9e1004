"""The agent: wires the buffer, the uploader and the sources, and owns their lifecycle.

Start order: buffer, uploader, sources (so nothing read waits for a missing consumer).
Stop order: sources first, then commit what they produced, then give the uploader a deadline
for the request in flight, then close the buffer. `reload` applies a new configuration
without losing a reading: changed sources restart, unchanged ones keep running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import httpx

from edge_agent import __version__
from edge_agent.buffer import Buffer, BufferSession
from edge_agent.clock import Clock, ClockGuard, SystemClock
from edge_agent.config import Config, Secret, load_config, priorities, resolve_token
from edge_agent.credentials import exposure_warnings
from edge_agent.drain import drain_view
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.processors.base import Place
from edge_agent.processors.chain import ProcessingIntake
from edge_agent.processors.durable import Carried
from edge_agent.processors.registry import Processor, make_processors
from edge_agent.records import Reading, with_field
from edge_agent.sources.base import Intake, Source, SourceConfig, SourceStats
from edge_agent.sources.registry import source_type
from edge_agent.status.snapshot import (
    AgentPart,
    BudgetPart,
    BufferPart,
    ClockPart,
    DrainPart,
    ErrorPart,
    Snapshot,
    SourcePart,
    UploaderPart,
)
from edge_agent.uplink_time import UplinkTime, uplink_usable
from edge_agent.uploader import Uploader

log = logging.getLogger("edge_agent.agent")


class ReadingIds:
    """Time-ordered unique ids (`record_id_field`): sortable hex of ms, a node and a counter.

    An id is given once, when the reading is accepted, and stored with the record, so it
    stays the same across retries and the server can deduplicate on it.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._node = os.urandom(4).hex()
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = 0

    def next(self) -> str:
        with self._lock:
            ms = int(self._clock.wall() * 1000)
            if ms <= self._last_ms:
                self._seq += 1
                ms = self._last_ms
            else:
                self._seq = 0
                self._last_ms = ms
            return f"{ms:012x}{self._node}{self._seq:06x}"


class AgentIntake:
    """What sources see of the agent: readings go to the buffer, with ids when configured.

    While the clock is not trusted, each reading also carries its monotonic time so the
    buffer can hold it and correct its timestamp later (device-stamped readings excepted).
    """

    def __init__(
        self, buffer: Buffer, record_id_field: str | None, clock: Clock, guard: ClockGuard
    ) -> None:
        self._buffer = buffer
        self.record_id_field = record_id_field
        self._ids = ReadingIds(clock)
        self._guard = guard

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
        carried: Carried | None = None,
    ) -> bool:
        field = self.record_id_field
        # `trusted` is read without the guard's lock: stamp() decides under it whenever the
        # clock may not be trusted, and a trusted clock (the usual case) costs no stamp.
        guard = self._guard
        mono = None if device_time or guard.trusted else guard.stamp().mono
        if field:
            readings = [with_field(r, field, self._ids.next(), mono) for r in readings]
            for entry in carried.windows if carried else ():  # sent raw if it comes late
                entry.raw = with_field(entry.raw, field, self._ids.next(), None)
        elif mono is not None:
            readings = [r.with_mono(mono) for r in readings]
        # A source that acknowledges its input (MQTT) can wait for room; others cannot.
        return self._buffer.put(
            readings, on_durable, can_wait=on_durable is not None, carried=carried
        )

    def clock_trusted(self) -> bool:
        return self._guard.trusted

    def count(self, name: str, n: int = 1) -> None:
        self._buffer.count(name, n)

    def commit_soon(self) -> None:
        self._buffer.commit_soon()

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        return self._buffer.put_dead_letter(datasource_id, record_text, reason, origin, on_durable)


def make_source(
    config: SourceConfig, device_id: str | None, intake: Intake, clock: Clock
) -> Source:
    declared = source_type(config.type)
    if declared is None:  # load_config admits only registered types
        raise ConfigError(f"source {config.name}: type {config.type!r} is not available")
    return declared.make(config, device_id, intake, clock)


class Agent:
    """One running agent. Start once, stop once."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Clock | None = None,
        guard_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.buffer = Buffer(config.buffer_path, config.buffer, self.clock)
        self.buffer.set_priorities(priorities(config))
        self.guard: ClockGuard | None = None
        self.uplink_time: UplinkTime | None = None
        self._time_source: tuple[str, float] | None = None  # what the buffer was told last
        self._clock_lock = threading.Lock()  # the main loop's tick, the uploader's samples
        self.intake: AgentIntake | None = None
        self.uploader = Uploader(
            config.endpoint,
            config.token,
            self.buffer,
            transport=transport,
            token_source=self._read_token,
            clock=self.clock,
        )
        self.sources: dict[str, Source] = {}
        self._processing: dict[str, ProcessingIntake] = {}  # sources with processors
        self.started_at: float | None = None
        self._guard_options = guard_options or {}

    def _read_token(self) -> Secret:
        return resolve_token(self.config.endpoint, os.environ, str(self.config.path))

    def start(self) -> None:
        """Open the buffer, start the uploader, then the sources. Errors stop start-up."""
        self.buffer.open()
        self.uplink_time = self._make_uplink_time()
        self.guard = ClockGuard(
            self.clock,
            trust_clock=self.config.agent.trust_clock,
            require_ntp_sync=self.config.agent.require_ntp_sync,
            newest_known=self.buffer.newest_known_time(),
            uplink=self.uplink_time,
            **self._guard_options,
        )
        self.intake = AgentIntake(
            self.buffer, self.config.endpoint.record_id_field, self.clock, self.guard
        )
        self._apply_clock_state()
        if self.uplink_time is not None:
            self.uplink_time.on_sample = self.tick
        self.uploader.time_source = self.uplink_time
        self.uploader.start()
        for sc in self.config.sources:
            self._start_source(sc)
        self.started_at = time.monotonic()
        log.info(
            "agent: started with %d source(s), buffer %s, uploading to %s",
            len(self.sources),
            self.config.buffer_path,
            self.config.endpoint.url,
        )
        for warning in exposure_warnings(self.config):
            log.warning("agent: %s", warning)
        for src in self.config.sources:
            for warning in src.slip_warnings():
                log.warning("agent: %s", warning)

    def _make_uplink_time(self) -> UplinkTime | None:
        """The endpoint's Date as a time source, unless configured off or not authentic."""
        agent, endpoint = self.config.agent, self.config.endpoint
        if not agent.time_from_uplink or agent.trust_clock or agent.require_ntp_sync:
            return None
        why = uplink_usable(endpoint)
        if why is not None:
            log.warning(
                "agent: the endpoint's time is not used to confirm the clock (time_from_uplink): "
                "%s; the system clock is trusted when it is plausible, as with "
                "time_from_uplink = false (require_ntp_sync = true waits for NTP instead)",
                why,
            )
            return None
        return UplinkTime(self.clock, endpoint.url, self.config.sources[0].datasource_id)

    def _apply_clock_state(self) -> None:
        """Tell the buffer where readings' times come from, when that changed."""
        guard = self.guard
        assert guard is not None
        source = guard.source
        offset = guard.uplink_offset if source == "uplink" else guard.offset
        assert offset is not None
        before = self._time_source
        # The endpoint's offset is refined with every answer; hundredths do not matter.
        if before is not None and before[0] == source and abs(before[1] - offset) < 0.25:
            return
        self._time_source = (source, offset)
        field = self.config.agent.time_quality_field
        if source == "system":
            self.buffer.fix_times(offset, field)
            if before is not None:
                by = f" (confirmed by {guard.confirmed_by})" if guard.confirmed_by else ""
                log.info("agent: the clock is trusted%s; correcting held readings", by)
        elif source == "uplink":
            self.buffer.fix_times(offset, field, "uplink")
            if before is None or before[0] != "uplink":
                self._say_uplink_time(guard)
        else:
            self.buffer.distrust_clock()
            level = (
                logging.INFO if guard.uplink_offset is None and before is None else logging.WARNING
            )
            log.log(
                level,
                "agent: the clock is not trusted (%s); readings are kept with their "
                "monotonic time and held until it is, then their timestamps are corrected",
                guard.reason,
            )

    def _say_uplink_time(self, guard: ClockGuard) -> None:
        log.warning(
            "agent: the system clock is %+.1f s off the time of %s (the Date of its answers, "
            'within %.1f s); readings are stamped with that time and flagged %s = "uplink" '
            "until NTP synchronises the clock (the agent does not set the system clock)",
            guard.wall_error or 0.0,
            self.config.endpoint.url,
            guard.uplink_error or 0.0,
            self.config.agent.time_quality_field,
        )

    def tick(self) -> None:
        """Called about once a second by the main loop, and by the uploader's thread when
        the endpoint told the time: watch the clock."""
        if self.guard is None:
            return
        with self._clock_lock:
            self.guard.check()
            self._apply_clock_state()

    def _start_source(self, sc: SourceConfig) -> None:
        assert self.intake is not None
        intake: Intake = self.intake
        if sc.processors:
            intake = self._processing[sc.name] = ProcessingIntake(self.intake, self._processors(sc))
        source = make_source(sc, self.config.agent.device_id, intake, self.clock)
        source.start()
        self.sources[sc.name] = source

    def _processors(self, sc: SourceConfig) -> list[Processor]:
        """The source's processors; a deadband starts from the state committed last."""
        place = Place(sc.name, sc.shape, sc.label_keys(), self.config.endpoint.record_id_field)
        return make_processors(sc.processors, place, self.buffer.read_state)

    def stop(self) -> None:
        log.info("agent: stopping: sources first, then the buffer commits, then the uploader")
        for source in self.sources.values():
            source.stop()
        if not self.buffer.flush(timeout=30):
            log.error("agent: could not commit the last readings: %s", self.buffer.error)
        self.uploader.stop()
        self.buffer.close()
        log.info("agent: stopped")

    def check_health(self) -> EdgeAgentError | None:
        """A fatal problem the main loop must stop for, or None."""
        if not self.buffer.alive:
            return self.buffer.error or EdgeAgentError("the buffer writer stopped unexpectedly")
        return None

    def reload(self) -> bool:
        """Re-read the config file; a bad file is rejected and the running config stays."""
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("agent: reload rejected, still running the previous configuration: %s", exc)
            return False
        old = self.config
        if new.buffer != old.buffer or new.agent.data_dir != old.agent.data_dir:
            log.warning("agent: [buffer] and data_dir changes take effect at the next restart")
            agent = replace(new.agent, data_dir=old.agent.data_dir)
            new = replace(new, buffer=old.buffer, agent=agent)
        if new.status != old.status:
            log.warning("agent: [status] changes take effect at the next restart")
        clock_keys = ("trust_clock", "require_ntp_sync", "time_from_uplink", "log_level")
        if [getattr(new.agent, k) for k in clock_keys] != [
            getattr(old.agent, k) for k in clock_keys
        ]:
            log.warning(
                "agent: trust_clock, require_ntp_sync, time_from_uplink and log_level take "
                "effect at the next restart"
            )
        self.config = new
        self.buffer.set_priorities(priorities(new))
        if self.intake is not None:
            self.intake.record_id_field = new.endpoint.record_id_field
        self.uploader.reload(new.endpoint, new.token)
        self._reload_sources(old, new)
        log.info("agent: configuration reloaded from %s", new.path)
        return True

    def _reload_sources(self, old: Config, new: Config) -> None:
        before = {s.name: s for s in old.sources}
        after = {s.name: s for s in new.sources}
        same_device = old.agent.device_id == new.agent.device_id
        device_id = new.agent.device_id
        for name, sc in before.items():
            fresh = after.get(name)
            if fresh == sc and same_device:
                continue
            running = self.sources[name]
            # A source's intake is given at its start: gaining or losing processors restarts it.
            if (
                fresh is not None
                and fresh.type == sc.type
                and bool(fresh.processors) == bool(sc.processors)
                and running.update(fresh, device_id)
            ):
                self._reload_processors(fresh)
                log.info("agent: source %s updated in place (its port stays open)", name)
                continue
            self._processing.pop(name, None)
            self.sources.pop(name).stop()
            log.info("agent: source %s stopped for the reload", name)
        for name, sc in after.items():
            if name not in self.sources:
                self._start_source(sc)

    def _reload_processors(self, sc: SourceConfig) -> None:
        """New processors for a source updated in place, from the state committed so far."""
        processing = self._processing.get(sc.name)
        if processing is not None:
            self.buffer.flush()  # a deadband reads its state back: what it sent is in it
            processing.use(self._processors(sc))


def snapshot(agent: Agent, errors: Iterable[Mapping[str, Any]]) -> Snapshot:
    """Everything the status page, /metrics and `edge-agent status` show, built in one place.

    `errors`: the recent warnings and errors (`RecentErrors.lines()`).
    """
    config = agent.config
    now = time.time()  # `created` in the buffer is on the system's wall clock
    with BufferSession(config.buffer_path) as session:
        st = session.stats()
        backlog = drain_view(
            session, config.endpoint.live_window_s, agent.uploader.backlog_rate(), now
        )
    up = agent.uploader.stats
    now_mono = time.monotonic()
    budget = agent.uploader.budget_view()
    return Snapshot(
        agent=AgentPart(
            version=__version__,
            device_id=config.agent.device_id,
            config=str(config.path),
            buffer=str(config.buffer_path.resolve()),
            uptime_s=0.0 if agent.started_at is None else now_mono - agent.started_at,
        ),
        sources=tuple(
            _source_part(agent, name, src.stats)
            for name, src in list(agent.sources.items())  # a reload may change the dict
        ),
        buffer=BufferPart.of(st, config.buffer.max_bytes, agent.clock.wall()),
        uploader=UploaderPart(
            records_uploaded=up.records_uploaded,
            requests=dict(up.requests.copy()),
            retries=up.retries,
            last_success=up.last_success,
            last_error=up.last_error,
            failing_for_s=None if up.failing_since is None else now_mono - up.failing_since,
            paused=dict(up.paused),
            uplink=agent.uploader.uplink.view(),
            records_set_aside=up.records_set_aside,
            suspects=up.suspects,
        ),
        clock=_clock_part(agent.guard, agent.uplink_time),
        errors=tuple(ErrorPart(e["time"], e["component"], e["message"]) for e in errors),
        drain=DrainPart(
            mode=config.endpoint.drain,
            live_window_s=config.endpoint.live_window_s,
            backlog_readings=backlog.backlog_readings,
            oldest_backlog_age_s=backlog.oldest_backlog_age_s,
            rate_per_s=backlog.rate_per_s,
            eta_s=backlog.eta_s,
        ),
        budget=BudgetPart(
            limit=budget.limit,
            used=budget.used,
            remaining=budget.remaining,
            day=budget.day,
            resets_in_s=budget.resets_in(agent.clock.wall()),
            waiting=budget.waiting,
            spent=budget.spent,
        ),
    )


def _source_part(agent: Agent, name: str, stats: SourceStats) -> SourcePart:
    return SourcePart(
        name=name,
        type=_source_type(agent, name),
        connected=stats.connected,
        lines=stats.lines,
        readings=stats.readings,
        parse_errors=stats.parse_errors,
        reconnects=stats.reconnects,
        timeouts=stats.timeouts,
        missed_polls=stats.missed_polls,
        last_error=stats.last_error,
        last_data=stats.last_data,
    )


def _clock_part(guard: ClockGuard | None, uplink: UplinkTime | None) -> ClockPart:
    """`trusted`: readings get reliable times (from the system clock or the endpoint's)."""
    if guard is None:
        return ClockPart(True, False, "ok", 0, "system", None, None)
    source = guard.source
    if source == "system":
        state = "ok" if guard.confirmed_by is None else f"ok, confirmed by {guard.confirmed_by}"
    elif source == "uplink":
        state = (
            f"{guard.reason}: readings are stamped with the endpoint's time (within "
            f"{guard.uplink_error or 0.0:.1f} s)"
        )
    else:
        state = guard.reason or "untrusted"
        if uplink is not None and uplink.last_probe is not None:
            state += f"; {uplink.probes} probe(s) of the endpoint, the last: {uplink.last_probe}"
    return ClockPart(
        trusted=source != "none",
        # Waiting for the first confirmation (one exchange) is no fault of the clock's: an
        # endpoint that cannot be reached shows in the uploads' health instead.
        confirming=source == "none" and guard.confirming,
        state=state,
        jumps=guard.jumps,
        source=source,
        # How far the system clock is ahead of the endpoint's time, when it answered.
        offset_s=guard.wall_error,
        uplink_error_s=guard.uplink_error,
    )


def _source_type(agent: Agent, name: str) -> str:
    for sc in agent.config.sources:
        if sc.name == name:
            return sc.type
    return "unknown"
