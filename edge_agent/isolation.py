"""Records the server fails on: telling "the server is down" from "it fails on this batch".

A 5xx usually means the server is down for everyone, and the uploader backs off and sends the
same batch again. But a server-side bug set off by one odd value answers 5xx to every request
that holds that record, for ever: retried whole, its batch would stall its data source. This
module owns the bookkeeping that tells the two apart; the uploader asks it after each answer.

- Streak: when the same batch (the same first record) was answered 5xx `SPLIT_AFTER` times in
  a row, it is split in halves. If both halves fail too before any request succeeded, the
  server is down for everyone: the split ends and the uploader backs off as before. Once a
  request succeeded, the server is up and the failure follows the records: a failing half is
  split again, down to single records.
- Suspects: a single record the server failed on alone. It is left out of its data source's
  batches, which go on, and sent alone on its own schedule (doubling from `backoff_base_s`
  up to `poison_min_age_s / 20` or `backoff_max_s`, whichever is less). A failure of it is a
  strike when another request succeeded since its previous failure (its first failure is
  one). At `poison_attempts` strikes, at least `poison_min_age_s` after its first failure, it
  is set aside (dead letters). A server down for everyone gives no strike after the first.
- Answers without a status (a network failure, a stall) are not given here: they never count.

Only the uploader thread calls it. State lives in memory (a restart starts the count again)
and stays bounded: it is forgotten for records that leave the buffer, and cleared past
`MAX_TRACKED` entries.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field

from edge_agent.buffer import Batch
from edge_agent.clock import Clock
from edge_agent.config import EndpointConfig

SPLIT_AFTER = 3
REASON = "the server failed on this record alone"
MAX_TRACKED = 100_000


class Step(enum.Enum):
    """What the uploader does with a part the server answered with a 5xx."""

    BACK_OFF = "back off"  # as for any transient failure: the server may be down
    SPLIT = "split"  # send its halves now
    HOLD = "hold"  # leave it in the buffer: a suspect on its schedule, or a half that waits
    SET_ASIDE = "set aside"  # move it to the dead letters


@dataclass(frozen=True)
class Rules:
    attempts: int
    min_age_s: float
    retry_base_s: float
    retry_max_s: float

    @classmethod
    def of(cls, ep: EndpointConfig) -> Rules:
        return cls(
            ep.poison_attempts,
            ep.poison_min_age_s,
            ep.backoff_base_s,
            ep.backoff_max_s,
        )


@dataclass
class _Suspect:
    first_failed: float  # clock.monotonic()
    tries: int = 0  # 5xx answers to it alone
    strikes: int = 0  # those that came after another request's success
    seen: int = 0  # successes counted at its last failure
    due: float = 0.0  # when it may be sent alone again


@dataclass
class _Bisection:
    head: int  # first record of the batch whose streak started it
    limit: int  # failures in a row past which the server is taken to be down after all
    up: bool = False  # a request of it succeeded: the server is up
    failures: int = 0  # in a row, since the last success
    waiting: list[Batch] = field(default_factory=list)  # a failed half, until its sibling's answer


class Isolation:
    """Per-record 5xx bookkeeping for one uploader."""

    def __init__(self, rules: Rules, clock: Clock) -> None:
        self.rules = rules
        self._clock = clock
        self._streaks: Counter[int] = Counter()  # first record of a batch -> 5xx in a row
        self._streak_began: dict[int, int] = {}  # first record -> successes at its first 5xx
        self._suspects: dict[int, _Suspect] = {}
        self._bisection: _Bisection | None = None
        self._successes = 0

    @property
    def suspects(self) -> int:
        """Records sent alone because the server failed on them alone."""
        return len(self._suspects)

    def skipped(self) -> frozenset[int]:
        """Readings to leave out of batches: the suspects, sent alone."""
        return frozenset(self._suspects)

    def due(self) -> list[int]:
        """Suspects whose turn to be sent alone has come, oldest first."""
        now = self._clock.monotonic()
        return sorted(rid for rid, s in self._suspects.items() if s.due <= now)

    def answered(self, part: Batch, status: int | None, delivered: bool) -> Step | None:
        """Note an answer to `part`; for a 5xx, say what to do with it (None: not ours)."""
        if delivered:
            self._successes += 1
            if self._bisection is not None:
                self._bisection.up = True
                self._bisection.failures = 0
            return None
        if status is None or status < 500:
            return None
        if len(self._streaks) + len(self._suspects) > MAX_TRACKED:
            self._streaks.clear()
            self._streak_began.clear()
            self._suspects.clear()
        single = part.rows[0].id if len(part.rows) == 1 else None
        if single is not None and single in self._suspects:
            return self._strike(single)
        if self._bisection is not None:
            return self._in_bisection(part)
        return self._streak(part)

    def resume(self) -> list[Batch]:
        """A half that failed while its sibling was still to be sent, once the server has
        proven up: sent again, then split at once if it fails again."""
        b = self._bisection
        if b is None or not b.up or not b.waiting:
            return []
        waiting, b.waiting = b.waiting, []
        return waiting

    def end(self) -> None:
        """The uploader's round is over: a split still going on ends with it."""
        self._bisection = None

    def forget(self, ids: list[int]) -> None:
        """These records left the buffer (delivered or dead-lettered)."""
        if not self._streaks and not self._suspects:
            return
        for rid in ids:
            self._streaks.pop(rid, None)
            self._streak_began.pop(rid, None)
            self._suspects.pop(rid, None)

    def _streak(self, part: Batch) -> Step:
        head = part.rows[0].id
        self._streaks[head] += 1
        began = self._streak_began.setdefault(head, self._successes)
        if self._streaks[head] < SPLIT_AFTER:
            return Step.BACK_OFF
        if len(part.rows) == 1:
            # Nothing to split: watch it alone, but only once another request succeeded
            # meanwhile; in an outage every lone reading of a slow source would fail so.
            return self._strike(head) if self._successes > began else Step.BACK_OFF
        # Worst case with one bad record, the server up: a failure per level, then its own.
        depth = math.ceil(math.log2(len(part.rows)))
        self._bisection = _Bisection(head, limit=2 * depth + 2)
        return Step.SPLIT

    def _in_bisection(self, part: Batch) -> Step:
        b = self._bisection
        assert b is not None
        b.failures += 1
        if not b.up:
            if not b.waiting:
                b.waiting.append(part)  # its sibling's answer decides
                return Step.HOLD
            return self._down(b)  # both halves failed: down for everyone
        if b.failures > b.limit:
            return self._down(b)  # it went down while we were splitting
        if len(part.rows) == 1:
            return self._strike(part.rows[0].id)
        return Step.SPLIT

    def _down(self, b: _Bisection) -> Step:
        """Stop splitting; the batch needs a fresh streak before it is split again."""
        self._streaks.pop(b.head, None)
        self._streak_began.pop(b.head, None)
        self._bisection = None
        return Step.BACK_OFF

    def _strike(self, rid: int) -> Step:
        now = self._clock.monotonic()
        suspect = self._suspects.get(rid)
        if suspect is None:
            suspect = self._suspects[rid] = _Suspect(first_failed=now, strikes=1)
        elif self._successes > suspect.seen:
            suspect.strikes += 1
        suspect.tries += 1
        suspect.seen = self._successes
        suspect.due = now + self._retry_in(suspect.tries)
        rules = self.rules
        if suspect.strikes >= rules.attempts and now - suspect.first_failed >= rules.min_age_s:
            return Step.SET_ASIDE  # forgotten once it is in the dead letters
        return Step.HOLD

    def _retry_in(self, tries: int) -> float:
        """Doubling from backoff_base_s, capped so that a suspect is tried about 20 times
        or more over poison_min_age_s: a server that fails at random (half the requests,
        say) fails it at every one of those with a chance of one in a million."""
        r = self.rules
        cap = min(r.retry_max_s, max(r.retry_base_s, r.min_age_s / 20))
        return float(min(cap, r.retry_base_s * 2.0 ** min(tries - 1, 30)))

    def watch(self, rid: int) -> tuple[int, int, float] | None:
        """Failures alone, strikes and seconds since the first failure of a suspect."""
        suspect = self._suspects.get(rid)
        if suspect is None:
            return None
        return suspect.tries, suspect.strikes, self._clock.monotonic() - suspect.first_failed
