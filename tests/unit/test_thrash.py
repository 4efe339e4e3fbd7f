"""The refault meter and gate (uoomd/thrash.py) and the counters' parsing (uoomd/sources/vmstat.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.builders import make_guard, make_memory
from uoomd.plan import Amount
from uoomd.readings import GuardReading
from uoomd.sources.vmstat import parse_vmstat_refaults, refault_pages
from uoomd.thrash import (
    REFAULT_STALE_S,
    REFAULT_WINDOW_S,
    RefaultMeter,
    advance,
    has_refault_gate,
    poll_cap_s,
    refault_gate_open,
)

pytestmark = pytest.mark.unit

MiB = 1 << 20


def test_the_rate_is_measured_over_a_whole_window() -> None:
    m = advance(RefaultMeter(), 100 * MiB, 10.0, gate_bytes_per_s=0)
    assert m.rate is None
    m = advance(m, 150 * MiB, 10.5, gate_bytes_per_s=0)  # half a window: not yet
    assert m.rate is None
    m = advance(m, 200 * MiB, 10.0 + REFAULT_WINDOW_S, gate_bytes_per_s=0)
    assert m.rate == pytest.approx(100 * MiB / REFAULT_WINDOW_S)
    m = advance(
        m, 200 * MiB, 10.2 + REFAULT_WINDOW_S, gate_bytes_per_s=0
    )  # within the next window: the last rate stands
    assert m.rate == pytest.approx(100 * MiB / REFAULT_WINDOW_S)


def test_a_stale_mark_starts_afresh() -> None:
    # The daemon reads every 5 s when memory is plentiful: a thrash that began a second ago
    # must not be averaged over those quiet seconds.
    m = advance(RefaultMeter(), 0, 0.0, gate_bytes_per_s=0)
    m = advance(m, 50 * MiB, REFAULT_STALE_S + 0.1, gate_bytes_per_s=0)
    assert m.rate is None
    assert m.mark_bytes == 50 * MiB


def test_a_counter_that_goes_back_starts_afresh() -> None:
    m = advance(
        advance(RefaultMeter(), 900 * MiB, 0.0, gate_bytes_per_s=0), 10 * MiB, 1.5, gate_bytes_per_s=0
    )  # the cgroup was recreated
    assert (m.rate, m.mark_bytes) == (None, 10 * MiB)


def test_an_unknown_count_forgets_the_meter() -> None:
    m = advance(advance(RefaultMeter(), 0, 0.0, gate_bytes_per_s=0), MiB, 1.0, gate_bytes_per_s=0)
    assert advance(m, None, 2.0, gate_bytes_per_s=0) == RefaultMeter()


@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(0, 1 << 30)), max_size=40))
def test_the_rate_is_never_negative_and_never_above_what_came_in(steps: list[tuple[float, int]]) -> None:
    m, now, count = RefaultMeter(), 0.0, 0
    for dt, added in steps:
        now, count = now + dt, count + added
        m = advance(m, count, now, gate_bytes_per_s=0)
        assert m.rate is None or 0 <= m.rate <= count / REFAULT_WINDOW_S


def _reading(refault_bytes: int | None, *, rate: float | None, since: float | None) -> GuardReading:
    memory = make_memory(1 << 29, total_bytes=1 << 30, refault_bytes=refault_bytes)
    return GuardReading(guard="system", memory=memory, refault_rate=rate, refault_above_since=since)


def test_the_gate_needs_the_rate_at_or_above_it_for_its_whole_sustain() -> None:
    off = make_guard()
    assert not has_refault_gate(off)
    assert refault_gate_open(off, _reading(0, rate=None, since=None), 10.0)
    gated = make_guard(psi_refault_gate=Amount(fraction=0.001), psi_refault_sustain_s=10.0)
    assert has_refault_gate(gated)
    assert not refault_gate_open(gated, _reading(0, rate=None, since=None), 10.0)  # not measured yet
    assert not refault_gate_open(gated, _reading(0, rate=2 * MiB, since=1.0), 10.0)  # 9 s: a burst, so far
    assert refault_gate_open(gated, _reading(0, rate=2 * MiB, since=0.0), 10.0)
    assert refault_gate_open(gated, _reading(None, rate=None, since=None), 10.0)  # cannot measure: open


def test_the_run_above_the_gate_starts_with_its_first_window_and_ends_with_a_window_below() -> None:
    gate = 10 * MiB
    m = advance(RefaultMeter(), 0, 0.0, gate_bytes_per_s=gate)
    m = advance(m, 20 * MiB, 1.0, gate_bytes_per_s=gate)
    assert m.above_since == 0.0  # refaults came at 20 MiB/s from the window's start
    m = advance(m, 40 * MiB, 2.0, gate_bytes_per_s=gate)
    assert m.above_since == 0.0
    m = advance(m, 45 * MiB, 3.0, gate_bytes_per_s=gate)  # 5 MiB/s: the run is over
    assert m.above_since is None
    m = advance(m, 60 * MiB, 4.0, gate_bytes_per_s=gate)
    assert m.above_since == 3.0
    assert advance(m, 60 * MiB, 4.0 + REFAULT_STALE_S + 1, gate_bytes_per_s=gate).above_since is None


def test_vmstat_and_memory_stat_counters() -> None:
    text = "nr_free_pages 100\nworkingset_refault_anon 7\nworkingset_refault_file 35\nworkingset_activate_anon 1\n"
    assert parse_vmstat_refaults(text) == 42
    assert parse_vmstat_refaults("workingset_refault 12\n") == 12  # before Linux 5.9: one counter
    assert parse_vmstat_refaults("nr_free_pages 100\n") is None
    assert parse_vmstat_refaults("workingset_refault_anon x\nworkingset_refault_file 3\n") == 3
    v1 = {"workingset_refault_file": 5, "total_workingset_refault_anon": 2, "total_workingset_refault_file": 9}
    assert refault_pages(v1, "total_") == 11
    assert refault_pages({"cache": 1}) is None


def test_a_sustained_trigger_of_a_gated_guard_caps_the_sleep_at_half_a_window() -> None:
    gated = make_guard(psi_refault_gate=Amount(fraction=0.005))
    assert poll_cap_s(gated, sustaining=True) == REFAULT_WINDOW_S / 2
    assert poll_cap_s(gated, sustaining=False) is None
    assert poll_cap_s(make_guard(), sustaining=True) is None  # no gate: nothing to measure
