"""An hour of history for the page's charts: buffer depth and upload rate, sampled."""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from edge_agent.status.snapshot import Snapshot

SAMPLE_INTERVAL_S = 10.0
HISTORY_WINDOW_S = 3600.0


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic seconds
    pending: int  # readings in the buffer
    uploaded: int  # records_uploaded so far
    rate: float | None  # records/s since the previous sample; None for the first


class History:
    """Buffer depth and upload rate, one sample per `interval_s` over the last `window_s`.

    Thread-safe: the sampler thread adds while request threads read.
    """

    def __init__(
        self, interval_s: float = SAMPLE_INTERVAL_S, window_s: float = HISTORY_WINDOW_S
    ) -> None:
        if not interval_s > 0 or not window_s >= interval_s:
            raise ValueError(
                f"history needs 0 < interval_s <= window_s, got {interval_s} and {window_s}"
            )
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=math.ceil(window_s / interval_s))
        self._lock = threading.Lock()

    def sample(self, snapshot: Snapshot, now: float) -> Sample:
        """Record the snapshot's buffer depth and upload count at `now` (monotonic seconds)."""
        pending = snapshot.buffer.pending_total
        uploaded = snapshot.uploader.records_uploaded
        with self._lock:
            rate = self._rate(uploaded, now)
            while self._samples and self._samples[0].t <= now - self.window_s:
                self._samples.popleft()
            sample = Sample(now, pending, uploaded, rate)
            self._samples.append(sample)
        return sample

    def _rate(self, uploaded: int, now: float) -> float | None:
        if not self._samples or now <= self._samples[-1].t:
            return None
        previous = self._samples[-1]
        delta = uploaded - previous.uploaded
        if delta < 0:  # the counter restarted from zero (a new uploader)
            delta = uploaded
        return delta / (now - previous.t)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)
