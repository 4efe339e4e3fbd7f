"""Tell a thrash from a job that merely swaps: how fast the scope needs its evicted pages back.

A memory stall alone cannot tell them apart. Once RAM is full, pushing cold pages out to
swap stalls allocations in reclaim too, so a PSI trigger fires ~2 s after a job starts to
swap, with most of the swap still free (issue 18, measured in the VM). What makes a thrash
is refaults: pages evicted and then needed again, because the working set does not fit.
The kernel counts them (mm/workingset.c workingset_refault(), Linux 6.18: every fault on a
page whose shadow entry survived eviction adds to workingset_refault_anon/_file, in
/proc/vmstat and in a cgroup's memory.stat), and activates those that would have stayed
resident had its lists been balanced otherwise: a job growing into swap gets part of its hot
set back that way, in a burst the kernel ends itself. The meter counts the others
(sources/vmstat.py); a job whose cold pages went to swap and stay there refaults almost
nothing. lmkd gates its thrashing kill the same way, on file
refaults against the file LRU's size (system/memory/lmkd/lmkd.cpp, thrashing_limit_pct).

The meter lives beside the sources (GuardWatch keeps one per guard, advanced at every
reading, also the light ones the core never steps on) and replay runs the same meter on a
trace's readings: the rate is what the core sees, like the kernel's own PSI averages.
"""

from __future__ import annotations

from dataclasses import dataclass

from uoomd.plan import GuardPlan
from uoomd.readings import GuardReading, MemoryReading

# The rate is taken over at least this long: shorter, a poll every 20 ms would see one
# page fault burst as a thrash; longer, a thrash would wait for its proof (a PSI trigger
# sustained 2 s sees a rate measured over its last 1-2 s).
REFAULT_WINDOW_S = 1.0
# A mark older than this says nothing of now (the daemon reads rarely when memory is
# plentiful: poll_max is 5 s): the rate is measured afresh from the next reading.
REFAULT_STALE_S = 3 * REFAULT_WINDOW_S


@dataclass(frozen=True, slots=True, kw_only=True)
class RefaultMeter:
    """The scope's refaults at the start of the current window, the rate of the last one, and
    since when every window has come at or above the guard's gate."""

    mark_at: float | None = None
    mark_bytes: int = 0
    rate: float | None = None  # bytes refaulted per second over the last whole window; None: not yet known
    above_since: float | None = None  # the start of the run of windows at or above the gate; None: not now


def advance(meter: RefaultMeter, refault_bytes: int | None, now: float, *, gate_bytes_per_s: int) -> RefaultMeter:
    """The meter after a reading of the scope's cumulative refault count (None: unknown)."""
    if refault_bytes is None:
        return RefaultMeter()
    if (
        meter.mark_at is None
        or now < meter.mark_at
        or refault_bytes < meter.mark_bytes  # a counter that went back: the cgroup was recreated
        or now - meter.mark_at > REFAULT_STALE_S
    ):
        return RefaultMeter(mark_at=now, mark_bytes=refault_bytes)
    elapsed = now - meter.mark_at
    if elapsed < REFAULT_WINDOW_S:
        return meter
    rate = (refault_bytes - meter.mark_bytes) / elapsed
    above = gate_bytes_per_s > 0 and rate >= gate_bytes_per_s
    since = (meter.above_since if meter.above_since is not None else meter.mark_at) if above else None
    return RefaultMeter(mark_at=now, mark_bytes=refault_bytes, rate=rate, above_since=since)


def poll_cap_s(guard: GuardPlan, *, sustaining: bool) -> float | None:
    """The longest sleep while a PSI trigger of this guard is being sustained, or None for no cap.

    Far from its levels the daemon sleeps up to poll_max (5 s by default), and a kernel
    trigger wakes it once per window: readings that far apart are stale marks, and a rate
    would never be measured. So a guard whose gate needs the rate reads twice a window."""
    return REFAULT_WINDOW_S / 2 if sustaining and has_refault_gate(guard) else None


def has_refault_gate(guard: GuardPlan) -> bool:
    amount = guard.psi_refault_gate
    return bool(amount.bytes) if amount.bytes is not None else bool(amount.fraction)


def gate_bytes_per_s(guard: GuardPlan, total_bytes: int) -> int:
    """psi_refault_gate in bytes per second: a percent is of the scope's memory total."""
    return guard.psi_refault_gate.resolve_bytes(total_bytes)


def refault_gate_open(guard: GuardPlan, reading: GuardReading, now: float) -> bool:
    """Whether the refaults let a gated PSI trigger act: at or above psi_refault_gate in every
    window of the last psi_refault_sustain.

    No gate (0) is always open. A scope whose refaults cannot be read (an old kernel, a v1
    cgroup without the counters) is open too: the gate can only hold back what it can
    measure. Where they can be read, an unmeasured rate (the first second of a stall) holds
    the trigger back until a whole window is measured. The sustain forgives what the
    activation test lets through: a job growing into swap gets its hot pages back mostly
    activated (8-12 s at up to 1 % of RAM/s in the VM, issue 18), its unactivated refaults
    stayed above 0.1 %/s for 2 s at most, where a thrash refaults for as long as it runs."""
    if not has_refault_gate(guard) or reading.memory.refault_bytes is None:
        return True
    since = reading.refault_above_since
    return since is not None and now - since >= refault_sustain_s(guard, reading.memory)


def refault_sustain_s(guard: GuardPlan, memory: MemoryReading) -> float:
    """How long the refaults must have lasted: psi_refault_sustain, or psi_refault_sustain_all
    where the count is every refault. There a job growing into swap refaults its hot set as
    fast as a thrash, only not for as long (VM, multi-gen LRU: up to 10 s at 0.7-1.8 % of RAM
    a second; a thrash for as long as it runs)."""
    return guard.psi_refault_sustain_all_s if memory.refaults_all else guard.psi_refault_sustain_s
