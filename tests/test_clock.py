"""Clock trust: UTC stamps, an RTC-less boot at 1970, jumps, and the kernel's NTP status."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.clock import BUILD_EPOCH, ClockGuard, kernel_ntp_synced, utc_stamp
from tests.fakes import FakeClock

REAL_NOW = BUILD_EPOCH + 30 * 86400


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_utc_stamp_is_iso_8601_utc_with_milliseconds(t: float) -> None:
    text = utc_stamp(t)
    assert len(text) == 24 and text.endswith("Z") and text[10] == "T"
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert 0 <= t - parsed.timestamp() < 0.001 + 1e-6 * abs(t) / 1e6


def test_known_stamp() -> None:
    assert utc_stamp(1735732800.1234) == "2025-01-01T12:00:00.123Z"


def test_trusted_clock_stamps_without_hold() -> None:
    guard = ClockGuard(FakeClock(REAL_NOW), ntp_synced=lambda: None)
    assert guard.trusted and guard.reason is None
    assert guard.stamp().mono is None


def test_boot_at_1970_is_untrusted_until_the_clock_is_set() -> None:
    clock = FakeClock(wall=5.0)
    guard = ClockGuard(clock, ntp_synced=lambda: False)
    assert not guard.trusted
    assert "earlier than" in (guard.reason or "")
    stamp = guard.stamp()
    assert stamp.mono == clock.monotonic() and stamp.text.startswith("1970-01-01")
    clock.advance(3)
    assert guard.check() is False
    clock.jump(REAL_NOW)  # NTP sets the clock
    assert guard.check() is False  # a jump: wait until it has been steady
    clock.advance(11)
    assert guard.check() is True and guard.trusted
    # The offset now maps the held reading's monotonic time to true wall time.
    assert abs((stamp.mono + guard.offset) - (REAL_NOW + 5.0)) < 0.001


def test_wall_before_the_newest_stored_time_is_untrusted() -> None:
    guard = ClockGuard(FakeClock(REAL_NOW), newest_known=REAL_NOW + 3600, ntp_synced=lambda: None)
    assert not guard.trusted


def test_require_ntp_sync_holds_until_the_kernel_says_synced() -> None:
    synced = [False]
    clock = FakeClock(REAL_NOW)
    guard = ClockGuard(clock, require_ntp_sync=True, ntp_synced=lambda: synced[0])
    assert not guard.trusted and "NTP" in (guard.reason or "")
    synced[0] = True
    assert guard.check() is True


def test_jump_backwards_while_running_holds_then_settles() -> None:
    clock = FakeClock(REAL_NOW)
    guard = ClockGuard(clock, ntp_synced=lambda: None, settle_s=10)
    clock.advance(1)
    assert guard.check() is False and guard.trusted
    clock.jump(-1800)
    guard.check()
    assert not guard.trusted and guard.jumps == 1
    assert guard.stamp().mono is not None
    clock.advance(10.5)
    assert guard.check() is True and guard.trusted


def test_trust_clock_switches_it_all_off() -> None:
    clock = FakeClock(wall=5.0)
    guard = ClockGuard(clock, trust_clock=True)
    assert guard.trusted and guard.stamp().mono is None
    clock.jump(REAL_NOW)
    assert guard.check() is False and guard.trusted


def test_kernel_status_is_a_bool_or_unknown() -> None:
    assert kernel_ntp_synced() in (True, False, None)
