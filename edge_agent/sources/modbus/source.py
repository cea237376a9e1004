"""The Modbus source: polls one unit on a monotonic grid and hands its values over as readings.

Each poll sends the requests of the register plan (registers.py) while holding the link's
lock, so sources sharing an RS-485 port never put two requests on the wire at once, and a
poll's values are read together. A poll's readings share one UTC stamp, taken when its first
answer arrived. Polls follow the grid of sources/polling.py, shared with polled serial: a poll
that runs late makes the grid points it overran count as missed (`missed_poll.<source>`),
never a burst of catch-up polls.

Faults never stop the source. A request that got no answer, a garbled answer or an exception
response is counted (`modbus.<fault>.<source>`), logged once per incident with what to check,
and the next poll tries again; a unit that does not answer costs one timeout per poll, not one
per request. A lost port or connection is closed and reopened with backoff, like the serial
source. NaN and infinite values are counted as unparseable and left out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edge_agent.clock import Clock, SystemClock, utc_stamp
from edge_agent.errors import SourceError
from edge_agent.logs import RateLimitedLog
from edge_agent.records import Reading, RecordBuilder, Value
from edge_agent.sources.base import Intake, SourceConfig
from edge_agent.sources.modbus.config import ModbusConfig
from edge_agent.sources.modbus.link import (
    SHARED_LINKS,
    Fault,
    Link,
    LinkPool,
    RequestFailed,
)
from edge_agent.sources.modbus.registers import Decoder, Refused, decoders
from edge_agent.sources.polling import PolledSource

log = logging.getLogger("edge_agent.sources.modbus")

_FIRST_BACKOFF_S = 0.5
_BACKOFF_MAX_S = 30.0

_CHECK = {
    "timeout": "check the unit id, the wiring (A/B swapped?), the baudrate and parity, "
    "and that the device is powered",
    "garbled": "check baudrate, parity and stop bits against the device, termination and "
    "grounding of the bus, and that no other master talks on it",
}


@dataclass
class ModbusStats:
    """Poll and fault counts since start (the persistent counters are in the buffer)."""

    polls: int = 0  # polls that read every request
    garbled: int = 0
    exceptions: int = 0
    disconnects: int = 0


class ModbusSource(PolledSource):
    def __init__(
        self,
        config: ModbusConfig,
        device_id: str | None,
        intake: Intake,
        clock: Clock | None = None,
        links: LinkPool | None = None,
    ) -> None:
        super().__init__(config.name, intake)
        self.config = config
        self.modbus = ModbusStats()  # timeouts and missed polls are in `stats`, as for serial
        self._clock = clock or SystemClock()
        self._links = links or SHARED_LINKS
        self._decoders = decoders(config.registers)
        self._builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self._refused_log = RateLimitedLog(log)
        self._incident: dict[str, int] = {}  # fault key -> failures since it was logged

    @property
    def label(self) -> str:
        return f"modbus {self.name}"

    @property
    def requests_per_poll(self) -> int:
        return len(self._decoders)

    def update(self, config: SourceConfig, device_id: str | None) -> bool:
        """Take a reloaded config in place when the wire is the same; False: restart me."""
        if not isinstance(config, ModbusConfig):
            return False
        if config.link_settings != self.config.link_settings:
            return False
        builder = RecordBuilder(config.datasource_id, config.shape, config.tags, device_id)
        self._decoders, self._builder = decoders(config.registers), builder
        self.config = config
        return True

    def read_once(self) -> dict[str, Value]:
        """One poll outside the thread (`edge-agent modbus read`); SourceError if it fails."""
        link = self._links.acquire(self.config)
        try:
            with link.lock:
                link.open()
                values, _, refused = self._read(link, partial=False)
        finally:
            self._links.release(link)
        for item in refused:
            values[item.name] = item.raw
        return values

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        link = self._links.acquire(self.config)
        try:
            self._run_on(link)
        finally:
            self._links.release(link)
            self.stats.connected = False

    def _run_on(self, link: Link) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                with link.lock:
                    link.open()
            except SourceError as exc:
                self._note_down(str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            backoff = _FIRST_BACKOFF_S
            self._note_up(link)
            try:
                self._poll_on_grid(lambda: self._poll(link))
            except SourceError as exc:
                self.modbus.disconnects += 1
                self._intake.count(f"modbus.disconnect.{self.name}")
                self._note_down(str(exc))
                self._stop.wait(backoff)

    def _poll_interval(self) -> float:
        return self.config.poll_interval_s

    def _poll(self, link: Link) -> None:
        """One poll; raises SourceError when the link is lost."""
        try:
            with link.lock:
                if not link.is_open:  # another source on this link lost it
                    raise SourceError(f"{link.framing} was closed after a fault")
                values, stamp, refused = self._read(link, partial=True)
        except RequestFailed as exc:  # the unit did not answer usably: the rest would wait too
            self._fault(exc.fault, exc.fault, str(exc))
            return
        self.stats.lines += 1
        if stamp is None:
            return
        self._emit(values, stamp, refused)

    def _read(
        self, link: Link, partial: bool
    ) -> tuple[dict[str, Value], float | None, list[Refused]]:
        """Every request of the plan under the held lock: values, stamp, refused values.

        `partial`: an exception response costs only its request's registers (counted and
        logged here); otherwise it is raised like every other fault.
        """
        values: dict[str, Value] = {}
        refused: list[Refused] = []
        stamp: float | None = None
        cfg = self.config
        complete = True
        for decoder in self._decoders:
            req = decoder.request
            try:
                data = link.read(req.kind, req.address, req.count, cfg.unit_id, cfg.timeout_s)
            except RequestFailed as exc:
                if exc.fault != "exception" or not partial:
                    raise RequestFailed(exc.fault, self._explain(exc, decoder), exc.code) from None
                self._fault("exception", f"exception {req.span}", self._explain(exc, decoder))
                complete = False
                continue
            if stamp is None:
                stamp = self._clock.wall()
            if self._incident:
                self._settle(f"exception {req.span}")
            try:
                got, bad = decoder.decode(data)
            except ValueError as exc:  # a well-formed answer of the wrong size
                failed = RequestFailed("garbled", f"short answer: {exc}")
                raise RequestFailed("garbled", self._explain(failed, decoder)) from None
            if values:
                values.update(got)
            else:
                values = got  # one request a poll is common: no copy
            refused.extend(bad)
        if self._incident:
            self._settle("timeout", "garbled")
        if complete:
            self.modbus.polls += 1
        return values, stamp, refused

    def _emit(self, values: dict[str, Value], stamp: float, refused: list[Refused]) -> None:
        self.stats.last_data = stamp
        for item in refused:
            self.stats.parse_errors += 1
            self._intake.count(f"dropped.unparseable.{self.name}")
            self._refused_log(
                logging.WARNING,
                f"{self.label}: {item.name} read {item.raw!r}, which cannot be sent; left out "
                "(check its type, word_order and address against the device's register map)",
            )
        if not values:
            return
        readings: list[Reading] = self._builder.build(values, utc_stamp(stamp))
        self.stats.readings += len(readings)
        self._intake.put(readings)

    # -- faults and incidents ------------------------------------------------------------

    def _explain(self, exc: RequestFailed, decoder: Decoder) -> str:
        req = decoder.request
        names = ", ".join(r.name for r in req.registers)
        what = f"unit {self.config.unit_id}, {req.span} ({names})"
        if exc.fault == "exception":
            hint = (
                "check the addresses against the device's register map (zero-based: "
                "register 40001 is holding address 0, 30001 input address 0) and the kind"
                if exc.code == 2
                else "check the device's documentation for this exception"
            )
        else:
            hint = _CHECK[exc.fault]
        return f"{what}: {exc}; {hint}"

    def _fault(self, fault: Fault, key: str, message: str) -> None:
        if fault == "timeout":
            self.stats.timeouts += 1
        elif fault == "garbled":
            self.modbus.garbled += 1
        else:
            self.modbus.exceptions += 1
        self._intake.count(f"modbus.{fault}.{self.name}")
        self.stats.last_error = message
        seen = self._incident.get(key, 0)
        self._incident[key] = seen + 1
        if seen == 0:
            log.warning("%s: %s", self.label, message)

    def _settle(self, *keys: str) -> None:
        """An answer came: the incidents under `keys` are over."""
        for key in keys:
            count = self._incident.pop(key, 0)
            if count:
                log.info(
                    "%s: unit %d answers again (%s: %d failed)",
                    self.label,
                    self.config.unit_id,
                    key,
                    count,
                )
                self.stats.last_error = None

    def _note_up(self, link: Link) -> None:
        if self.stats.connected:
            return
        if self.stats.last_error is not None:
            self.stats.reconnects += 1
            log.info("%s: %s is back; polling again", self.label, link.framing)
        else:
            log.info(
                "%s: polling unit %d on %s every %g s (%d requests per poll)",
                self.label,
                self.config.unit_id,
                link.framing,
                self.config.poll_interval_s,
                self.requests_per_poll,
            )
        self.stats.connected = True
        self.stats.last_error = None

    def _note_down(self, reason: str) -> None:
        was_up = self.stats.connected or self.stats.last_error is None
        self.stats.connected = False
        if was_up:
            what = (
                "check the network, the address and that the device accepts Modbus TCP on that port"
                if self.config.transport == "tcp"
                else "check the USB adapter and cable, the port path and that the agent's "
                "user is in the dialout group"
            )
            log.error(
                "%s: %s; retrying every %.0f s at most (%s)",
                self.label,
                reason,
                _BACKOFF_MAX_S,
                what,
            )
        self.stats.last_error = reason
