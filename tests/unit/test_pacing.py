"""Adaptive poll pacing: sleep long when memory is far from the term level, short when it is near or falling fast."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.builders import make_guard, make_memory, make_psi_trigger
from uoomd.pacing import (
    MEM_FILL_BYTES_PER_S,
    SAFETY_FACTOR,
    SWAP_FILL_BYTES_PER_S,
    next_poll_s,
    warm_ranking_needed,
)
from uoomd.plan import Amount, DaemonPlan, GuardPlan, PsiAction, PsiTriggerPlan

pytestmark = pytest.mark.unit

GiB = 1 << 30
TOTAL = 16 * GiB
TERM = int(TOTAL * 0.10)
DAEMON = DaemonPlan(poll_min_s=0.02, poll_max_s=1.0)


def guard(*, psi: tuple[PsiTriggerPlan, ...] = (), gate: float = 0.20) -> GuardPlan:
    return make_guard(psi_mem_gate=Amount(fraction=gate), psi=psi)


def test_below_the_term_level_polls_as_fast_as_allowed() -> None:
    assert next_poll_s(make_memory(TERM - 1), None, 0.0, guard(), DAEMON) == DAEMON.poll_min_s


def test_far_from_the_term_level_and_steady_polls_at_poll_max() -> None:
    assert next_poll_s(make_memory(12 * GiB), make_memory(12 * GiB), 1.0, guard(), DAEMON) == DAEMON.poll_max_s


def test_near_the_term_level_sleeps_the_worst_case_fill_time() -> None:
    # 1 GiB above the term level at the assumed worst case (4 GiB/s): 0.25 s.
    assert next_poll_s(make_memory(TERM + GiB), None, 0.0, guard(), DAEMON) == pytest.approx(GiB / MEM_FILL_BYTES_PER_S)


def test_fast_observed_fall_shortens_the_sleep_by_the_safety_factor() -> None:
    # 6 GiB above the level (worst case: 1.5 s, capped at 1 s), falling 3 GiB/s: 2 s to go, / 4.
    now, before = make_memory(TERM + 6 * GiB), make_memory(TERM + 9 * GiB)
    assert next_poll_s(now, before, 1.0, guard(), DAEMON) == pytest.approx(2.0 / SAFETY_FACTOR)


def test_rising_memory_does_not_shorten_the_sleep() -> None:
    assert (
        next_poll_s(make_memory(TERM + 8 * GiB), make_memory(TERM + 2 * GiB), 1.0, guard(), DAEMON) == DAEMON.poll_max_s
    )


def test_first_reading_or_zero_interval_uses_the_worst_case_alone() -> None:
    reading = make_memory(TERM + GiB)
    assert next_poll_s(reading, None, 0.0, guard(), DAEMON) == next_poll_s(
        reading, make_memory(0), 0.0, guard(), DAEMON
    )


def test_free_swap_adds_its_own_fill_time() -> None:
    swap = 8 * GiB
    swap_term = int(swap * 0.10)
    no_swap = next_poll_s(make_memory(TERM + GiB // 4), None, 0.0, guard(), DAEMON)
    with_swap = next_poll_s(
        make_memory(TERM + GiB // 4, swap_total_bytes=swap, swap_free_bytes=swap_term + GiB // 4),
        None,
        0.0,
        guard(),
        DAEMON,
    )
    assert with_swap == pytest.approx(no_swap + (GiB // 4) / SWAP_FILL_BYTES_PER_S)


def test_never_below_poll_min() -> None:
    tiny = next_poll_s(make_memory(TERM + 1), make_memory(TERM + 10 * GiB), 0.001, guard(), DAEMON)
    assert tiny == DAEMON.poll_min_s


@given(
    headroom=st.integers(min_value=-TERM, max_value=TOTAL - TERM),
    fall=st.integers(min_value=-8 * GiB, max_value=8 * GiB),
    dt_s=st.floats(min_value=0.0, max_value=5.0),
)
def test_sleep_is_always_within_the_bounds(headroom: int, fall: int, dt_s: float) -> None:
    now = make_memory(TERM + headroom)
    before = make_memory(max(0, TERM + headroom + fall))
    assert DAEMON.poll_min_s <= next_poll_s(now, before, dt_s, guard(), DAEMON) <= DAEMON.poll_max_s


@given(a=st.integers(min_value=0, max_value=TOTAL), b=st.integers(min_value=0, max_value=TOTAL))
def test_closer_to_the_term_level_never_sleeps_longer(a: int, b: int) -> None:
    near, far = sorted((a, b))
    assert next_poll_s(make_memory(near), None, 0.0, guard(), DAEMON) <= next_poll_s(
        make_memory(far), None, 0.0, guard(), DAEMON
    )


@given(slow=st.integers(min_value=0, max_value=4 * GiB), extra=st.integers(min_value=0, max_value=4 * GiB))
def test_faster_fall_never_sleeps_longer(slow: int, extra: int) -> None:
    now = make_memory(TERM + 4 * GiB)
    slow_s = next_poll_s(now, make_memory(TERM + 4 * GiB + slow), 1.0, guard(), DAEMON)
    fast_s = next_poll_s(now, make_memory(TERM + 4 * GiB + slow + extra), 1.0, guard(), DAEMON)
    assert fast_s <= slow_s


def test_warm_ranking_needed_within_twice_the_level_or_a_second_of_worst_case_fill() -> None:
    # The margin is max(term level 1.6 GiB, 1 s at 4 GiB/s) = 4 GiB above the term level.
    assert warm_ranking_needed(make_memory(TERM + 4 * GiB - 1), guard())
    assert not warm_ranking_needed(make_memory(TERM + 4 * GiB), guard())


def test_warm_ranking_margin_is_twice_the_level_on_a_big_machine() -> None:
    big = make_memory(0, total_bytes=512 * GiB)
    level = int(512 * GiB * 0.10)
    assert warm_ranking_needed(replace(big, available_bytes=2 * level - 1), guard())
    assert not warm_ranking_needed(replace(big, available_bytes=2 * level), guard())


def test_warm_ranking_below_the_psi_gate_only_when_a_psi_trigger_can_act() -> None:
    # Gate 60% = 9.6 GiB, well above the level margin (term 1.6 GiB + 4 GiB): 8 GiB is only under the gate.
    under_gate = make_memory(8 * GiB)
    term = make_psi_trigger(PsiAction.TERM, stall_us=1, window_us=1_000_000)
    warn = make_psi_trigger(PsiAction.WARN, stall_us=1, window_us=1_000_000)
    assert warm_ranking_needed(under_gate, guard(psi=(term,), gate=0.6))
    assert not warm_ranking_needed(under_gate, guard(psi=(warn,), gate=0.6))
    assert not warm_ranking_needed(under_gate, guard(gate=0.6))
    assert not warm_ranking_needed(make_memory(10 * GiB), guard(psi=(term,), gate=0.6))
