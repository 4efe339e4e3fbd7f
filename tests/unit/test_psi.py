"""PSI text parsing, the unprivileged rounding rule, and the computed stall window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uoomd.readings import PressureReading
from uoomd.sources.psi import (
    PressureError,
    PsiTrigger,
    PsiWindow,
    TriggerMode,
    parse_pressure,
    round_for_unprivileged,
    stall_total_us,
)

pytestmark = pytest.mark.unit

# /sys/fs/cgroup/unified/<test cgroup>/memory.pressure on the development machine while a
# child thrashed the page cache inside a 64 MiB memory cgroup.
REAL_PRESSURE = (
    "some avg10=1.70 avg60=0.54 avg300=0.12 total=507189\nfull avg10=1.51 avg60=0.51 avg300=0.12 total=502054\n"
)
# Before Linux 5.13 /proc/pressure/cpu had no "full" line; memory always had one, but a
# reader must not depend on it.
SOME_ONLY = "some avg10=0.00 avg60=0.00 avg300=0.00 total=12\n"


def test_real_pressure_file_is_parsed() -> None:
    reading = parse_pressure(REAL_PRESSURE)
    assert reading.some_avg10 == pytest.approx(1.70)
    assert reading.some_avg300 == pytest.approx(0.12)
    assert reading.some_total_us == 507189
    assert reading.full_avg60 == pytest.approx(0.51)
    assert reading.full_total_us == 502054
    assert stall_total_us(reading, "some") == 507189
    assert stall_total_us(reading, "full") == 502054


def test_missing_full_line_reads_as_zero() -> None:
    reading = parse_pressure(SOME_ONLY)
    assert reading.some_total_us == 12
    assert (reading.full_avg10, reading.full_total_us) == (0.0, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no 'some' line"),
        ("full avg10=0.00 avg60=0.00 avg300=0.00 total=1\n", "no 'some' line"),
        ("some avg10=0.00 avg60=0.00 total=1\n", "lacks avg300"),
        ("some avg10=x avg60=0.00 avg300=0.00 total=1\n", "non-number"),
        ("some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n", "out of range"),
        ("some avg10=100.01 avg60=0.00 avg300=0.00 total=1\n", "out of range"),
        ("half avg10=0.00 avg60=0.00 avg300=0.00 total=1\n", "unexpected line"),
        ("some avg10 avg60=0.00 avg300=0.00 total=1\n", "cannot read"),
    ],
)
def test_malformed_pressure_text_is_refused(text: str, message: str) -> None:
    with pytest.raises(PressureError, match=message):
        parse_pressure(text)


@pytest.mark.parametrize(
    ("asked", "armed"),
    [
        ((150_000, 1_000_000), (300_000, 2_000_000)),
        ((50_000, 2_000_000), (50_000, 2_000_000)),
        ((100_000, 500_000), (400_000, 2_000_000)),
        ((1_000_000, 3_000_000), (1_333_333, 4_000_000)),
        ((5_000_000, 20_000_000), (2_500_000, 10_000_000)),
        ((1, 10_000_000), (1, 10_000_000)),
        ((2_000_000, 1_000_000), (2_000_000, 2_000_000)),
    ],
    ids=["1s-to-2s", "already-valid", "500ms", "3s-to-4s", "above-10s-max", "tiny-stall", "stall-above-window"],
)
def test_rounding_keeps_the_stall_ratio_on_a_2s_multiple(asked: tuple[int, int], armed: tuple[int, int]) -> None:
    assert round_for_unprivileged(*asked) == armed


@settings(deadline=None)  # pure arithmetic: a deadline only measures how busy the machine is
@given(st.integers(1, 30_000_000), st.integers(1, 30_000_000))
def test_rounded_trigger_always_satisfies_the_kernel_rules(stall_us: int, window_us: int) -> None:
    stall, window = round_for_unprivileged(stall_us, window_us)
    # kernel/sched/psi.c psi_trigger_create(), Linux 6.18, without CAP_SYS_RESOURCE
    assert window % 2_000_000 == 0
    assert 2_000_000 <= window <= 10_000_000
    assert 1 <= stall <= window


def test_rounding_refuses_nonpositive_values() -> None:
    with pytest.raises(ValueError, match="positive"):
        round_for_unprivileged(0, 2_000_000)


def test_window_reports_stall_once_growth_reaches_threshold() -> None:
    window = PsiWindow(stall_us=100_000, window_us=2_000_000)
    assert not window.update(0.0, 1_000)
    assert not window.update(0.5, 60_000)
    assert window.update(1.0, 101_000)  # 100 ms of stall within 1 s


def test_window_forgets_growth_older_than_the_window() -> None:
    window = PsiWindow(stall_us=100_000, window_us=2_000_000)
    window.update(0.0, 0)
    window.update(1.0, 90_000)
    assert not window.update(3.5, 150_000)  # base is the 1.0 s sample: 60 ms in the last 2 s
    assert window.growth_us() == 60_000


def test_window_restarts_when_the_counter_goes_backwards() -> None:
    window = PsiWindow(stall_us=100_000, window_us=2_000_000)
    window.update(0.0, 5_000_000)
    assert not window.update(1.0, 10)  # the file was re-created: no phantom growth
    assert window.update(1.5, 200_000)


def test_window_refuses_nonpositive_parameters() -> None:
    with pytest.raises(ValueError, match="positive"):
        PsiWindow(stall_us=0, window_us=1)


_samples = st.lists(st.tuples(st.floats(0.0, 5.0, allow_nan=False), st.integers(0, 400_000)), min_size=1, max_size=40)


@given(
    stall_us=st.integers(1, 2_000_000),
    window_us=st.integers(100_000, 10_000_000),
    start=st.integers(0, 10**12),
    steps=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=40),
)
def test_window_never_reports_a_counter_that_does_not_grow(
    stall_us: int, window_us: int, start: int, steps: list[float]
) -> None:
    window = PsiWindow(stall_us=stall_us, window_us=window_us)
    now = 0.0
    for step in steps:
        now += step
        assert not window.update(now, start)


@given(stall_us=st.integers(1, 2_000_000), window_us=st.integers(100_000, 10_000_000), samples=_samples)
def test_window_always_reports_growth_of_stall_within_one_window(
    stall_us: int, window_us: int, samples: list[tuple[float, int]]
) -> None:
    window = PsiWindow(stall_us=stall_us, window_us=window_us)
    seen: list[tuple[float, int]] = []
    now, total = 0.0, 0
    for dt, growth in samples:
        now += dt
        total += growth
        fired = window.update(now, total)
        seen.append((now, total))
        # The oracle: some earlier sample at most one window back from which the counter grew enough.
        expected = any(now - t <= window_us / 1e6 and total - v >= stall_us for t, v in seen)
        if expected:
            assert fired
        # And it never reports more than the counter grew since the first sample it may look at.
        if fired:
            assert total - seen[0][1] >= stall_us


def _reading(some_total_us: int, full_total_us: int = 0) -> PressureReading:
    return PressureReading(
        some_avg10=0.0,
        some_avg60=0.0,
        some_avg300=0.0,
        some_total_us=some_total_us,
        full_avg10=0.0,
        full_avg60=0.0,
        full_avg300=0.0,
        full_total_us=full_total_us,
    )


def _polled(kind: str = "some") -> PsiTrigger:
    assert kind in ("some", "full")
    return PsiTrigger.polled(
        "/proc/pressure/memory",
        kind="some" if kind == "some" else "full",
        stall_us=100_000,
        window_us=2_000_000,
        reason="test",
        now=0.0,
        initial=_reading(0),
    )


def test_polled_trigger_fires_at_most_once_per_window_like_the_kernel() -> None:
    trigger = _polled()
    assert trigger.mode is TriggerMode.POLLED
    assert not trigger.pollable
    assert trigger.fired(0.5, _reading(150_000))
    assert not trigger.fired(1.0, _reading(300_000))  # still stalling, same window
    assert not trigger.fired(2.4, _reading(450_000))
    assert trigger.fired(2.6, _reading(600_000))  # a window after the first event


def test_polled_trigger_watches_its_own_kind() -> None:
    trigger = _polled("full")
    assert not trigger.fired(0.5, _reading(some_total_us=500_000, full_total_us=10))
    assert trigger.fired(1.0, _reading(some_total_us=900_000, full_total_us=200_000))


def test_polled_trigger_without_reading_reports_nothing() -> None:
    assert not _polled().fired(5.0, None)


def test_polled_trigger_has_no_fd_to_poll() -> None:
    with pytest.raises(ValueError, match="no file descriptor"):
        _polled().fileno()
