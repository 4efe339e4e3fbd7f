"""When does a guard's memory reach its kill level at the rate it falls now? The mem_available_eta predicate (pure).

A guard with ``mem_available_eta`` keeps, in its state, the readings of the last
LOOKBACK_S. At each reading the fall rate is measured over that lookback (the oldest kept
reading is its base), and memory is projected to run out when

    (room - floor) / fall <= eta     and     fall >= min_fall

where ``room`` is MemAvailable plus SwapFree (where there is swap) and ``floor`` the kill
level of both: the guard acts on both, and the kernel swaps out once RAM is short, so the
two run out as one pool (uoomd/pacing.py adds them the same way). The projection must then
hold at every reading for ``sustain``: one reading that says otherwise (the fall stopped or
slowed below min_fall, memory came back, or the projection slipped past HOLD_FACTOR x eta)
starts the wait anew. So a big allocation that stops is
forgiven once its fall leaves the lookback, at most LOOKBACK_S after it stopped, and acts
only if it lasted about ``sustain`` in all; a steady run-out acts ``sustain`` after the
projection first says ``eta``, i.e. about ``eta - sustain`` before the kill level.

The trade-off (the README's "Act on the trend"): a shorter sustain or a longer eta acts
sooner and forgives fewer one-off allocations; a higher min_fall ignores slow leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from uoomd.plan import EtaPlan, GuardPlan
from uoomd.readings import MemoryReading

# The fall rate is measured over at least this much time: one 10 ms poll moves by a page
# fault's worth of noise, a quarter second of a runaway allocator by tens of MiB.
LOOKBACK_S = 0.25
MAX_SAMPLES = 64  # a poll every 4 ms fills the lookback; PSI wake-ups may poll faster
# A gap longer than this between two readings (the daemon skipped steps far from every
# level) is no trend: the history starts again.
MAX_GAP_S = 2.0
# Once the projection is within eta, a reading that projects up to this many times eta does not
# start the wait anew: a runaway allocator's rate jitters (a hog of ~110 MiB/s in a loaded
# 512 MiB cgroup here stalled ~0.1 s every second, and its projection crossed 4 s back and forth,
# tests/fixtures/traces/runout_cgroup.jsonl). A stop still ends it: the fall leaves min_fall.
HOLD_FACTOR = 1.5


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    at: float
    room_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Trend:
    """A guard's recent readings and what they project."""

    samples: tuple[Sample, ...] = ()  # oldest first; samples[0] is the base of the fall rate
    since: float | None = None  # since when the projection has said "within eta" at every reading
    fall_bytes_per_s: float = 0.0
    eta_s: float | None = None  # seconds to the kill level at that fall; None: not falling at min_fall


def room_and_floor(reading: MemoryReading, guard: GuardPlan) -> tuple[int, int]:
    """(what is left, where the guard's kill level is) for RAM and swap as one pool."""
    room = reading.available_bytes
    floor = guard.mem_available_kill.resolve_bytes(reading.total_bytes)
    if reading.swap_total_bytes > 0:
        room += reading.swap_free_bytes
        floor += guard.swap_free_kill.resolve_bytes(reading.swap_total_bytes)
    return room, floor


def update_trend(trend: Trend, reading: MemoryReading, guard: GuardPlan, eta: EtaPlan, now: float) -> Trend:
    """The trend after one more reading (pure)."""
    room, floor = room_and_floor(reading, guard)
    samples = trend.samples
    since = trend.since
    if samples and (now - samples[-1].at > MAX_GAP_S or now <= samples[-1].at):
        samples, since = (), None  # a gap, or time that did not move: no trend to speak of
    samples = (*samples, Sample(at=now, room_bytes=room))
    # Keep the newest sample at least LOOKBACK_S old as the base; drop everything older.
    base = 0
    for i, sample in enumerate(samples):
        if sample.at <= now - LOOKBACK_S:
            base = i
    samples = samples[base:]
    if len(samples) > MAX_SAMPLES:
        samples = (samples[0], *samples[-(MAX_SAMPLES - 1) :])
    first = samples[0]
    span_s = now - first.at
    if span_s < LOOKBACK_S / 2:
        # Too short a history for a rate (the first readings after a gap): no projection yet.
        return Trend(samples=samples, since=None)
    fall = (first.room_bytes - room) / span_s
    min_fall = max(1, eta.min_fall.resolve_bytes(reading.total_bytes))
    if fall < min_fall or room <= floor:
        # Not falling fast enough; or already at the kill level, which acts by itself.
        return Trend(samples=samples, since=None, fall_bytes_per_s=fall)
    eta_s = (room - floor) / fall
    within = eta_s <= eta.eta_s * (HOLD_FACTOR if since is not None else 1.0)
    return Trend(
        samples=samples,
        since=(since if since is not None else now) if within else None,
        fall_bytes_per_s=fall,
        eta_s=eta_s,
    )


def reached(trend: Trend, eta: EtaPlan, now: float) -> bool:
    """The projection has said "the kill level within eta" at every reading for ``sustain``."""
    return trend.since is not None and now - trend.since >= eta.sustain_s
