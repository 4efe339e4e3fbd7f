"""Choose how long to sleep before the next poll, from how near and how fast memory nears the term level (pure).

earlyoom's idea: sleep no longer than a worst-case allocator would need to eat the
headroom above the term level.  We add the observed fall rate: when memory drops
faster than the worst case we assumed, the observed rate wins.
"""

from __future__ import annotations

import math

from uoomd.plan import DaemonPlan, GuardPlan, PsiAction
from uoomd.readings import MemoryReading
from uoomd.trend import LOOKBACK_S, room_and_floor

# Worst-case rates at which a runaway process fills RAM and swap.  RAM: one Python
# process faulting in 1 GiB (b"\x01" * 2**30) peaked at 1.9 GiB/s per core on the
# 2-core Linux 6.18 VM this was written on (python3 /tmp/fillrate.py, 6 runs,
# 381-1899 MiB/s); two cores together filled ~2.5 GiB/s.  4 GiB/s leaves room for faster
# machines.  Swap: bound by the device's write speed; 1 GiB/s is a fast NVMe.
MEM_FILL_BYTES_PER_S = 4 << 30
SWAP_FILL_BYTES_PER_S = 1 << 30

# Poll at least this many times before the observed fall would reach the term level.
SAFETY_FACTOR = 4.0

# The ranking is kept warm within this many seconds of worst-case fill above the term level.
WARM_MARGIN_S = 1.0


def _term_headroom_s_at_worst_case(reading: MemoryReading, guard: GuardPlan) -> float:
    """Seconds a worst-case allocator needs to push available (then swap) under their term levels."""
    term_bytes = guard.mem_available_term.resolve_bytes(reading.total_bytes)
    mem_headroom = max(0, reading.available_bytes - term_bytes)
    seconds = mem_headroom / MEM_FILL_BYTES_PER_S
    if reading.swap_total_bytes > 0:
        # Both levels must be crossed to act, and the kernel swaps out once RAM is short,
        # so the times add up (earlyoom adds them the same way).
        swap_term = guard.swap_free_term.resolve_bytes(reading.swap_total_bytes)
        seconds += max(0, reading.swap_free_bytes - swap_term) / SWAP_FILL_BYTES_PER_S
    return seconds


def next_poll_s(
    reading: MemoryReading, previous: MemoryReading | None, dt_s: float, guard: GuardPlan, daemon: DaemonPlan
) -> float:
    """How long to sleep before the next poll of this guard, between poll_min_s and poll_max_s.

    ``previous`` is the reading ``dt_s`` seconds earlier (None at start).  The result is
    the smaller of: the time a worst-case allocator needs to reach the term level, and
    the time the observed fall of (available + swap free) needs, divided by SAFETY_FACTOR.
    """
    lo, hi = daemon.poll_min_s, max(daemon.poll_min_s, daemon.poll_max_s)
    term_bytes = guard.mem_available_term.resolve_bytes(reading.total_bytes)
    if reading.available_bytes < term_bytes:
        return lo  # at or past the term level: the escalation timers want the finest grain
    sleep_s = _term_headroom_s_at_worst_case(reading, guard)
    if previous is not None and dt_s > 0:
        room_now = reading.available_bytes + reading.swap_free_bytes
        room_before = previous.available_bytes + previous.swap_free_bytes
        fall_bytes_per_s = (room_before - room_now) / dt_s
        if fall_bytes_per_s > 0:
            swap_term = guard.swap_free_term.resolve_bytes(reading.swap_total_bytes)
            headroom = room_now - term_bytes - (swap_term if reading.swap_total_bytes else 0)
            sleep_s = min(sleep_s, max(0.0, headroom) / fall_bytes_per_s / SAFETY_FACTOR)
        if fall_bytes_per_s > 0 and guard.eta is not None:
            # mem_available_eta acts when the kill level is eta away at this fall: poll often
            # enough before that to have the lookback's readings, and through the sustain.
            room, floor = room_and_floor(reading, guard)
            until_s = max(0.0, (room - floor) / fall_bytes_per_s - guard.eta.eta_s)
            sleep_s = min(sleep_s, max(until_s, guard.eta.sustain_s, LOOKBACK_S) / SAFETY_FACTOR)
    if math.isnan(sleep_s):
        return lo
    return min(hi, max(lo, sleep_s))


def warm_ranking_needed(reading: MemoryReading, guard: GuardPlan) -> bool:
    """True when the guard may act soon, so the daemon should keep its ranking fresh.

    Soon: available below twice the term (or kill) level, or within WARM_MARGIN_S of
    worst-case fill of it; or below the PSI memory gate when a PSI trigger can act.
    """
    level = max(
        guard.mem_available_term.resolve_bytes(reading.total_bytes),
        guard.mem_available_kill.resolve_bytes(reading.total_bytes),
    )
    margin = max(level, int(MEM_FILL_BYTES_PER_S * WARM_MARGIN_S))
    if reading.available_bytes < level + margin:
        return True
    acting_psi = any(t.action is not PsiAction.WARN for t in guard.psi)
    return acting_psi and reading.available_bytes < guard.psi_mem_gate.resolve_bytes(reading.total_bytes)


def eta_watch_needed(reading: MemoryReading, guard: GuardPlan) -> bool:
    """Whether a guard's trend (mem_available_eta) must be sampled at this reading: a fall as fast
    as the worst-case allocator could bring the kill level within its eta and sustain. Farther
    away the daemon may skip its step (quiet ticks), and the trend starts afresh (uoomd/trend.py)."""
    if guard.eta is None:
        return False
    room, floor = room_and_floor(reading, guard)
    horizon_s = guard.eta.eta_s + guard.eta.sustain_s + LOOKBACK_S + WARM_MARGIN_S
    return room - floor < MEM_FILL_BYTES_PER_S * horizon_s


def full_tick_needed(reading: MemoryReading, guard: GuardPlan) -> bool:
    """Whether the daemon's poll must step the core: a ranking is kept warm, the trend is watched,
    or memory is below the warn level (the core's memory_warn; swap, if it counts, is its to judge)."""
    warn = guard.mem_available_warn
    below_warn = warn is not None and reading.available_bytes < warn.resolve_bytes(reading.total_bytes)
    return below_warn or warm_ranking_needed(reading, guard) or eta_watch_needed(reading, guard)
