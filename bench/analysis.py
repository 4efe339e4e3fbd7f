"""Turn raw benchmark records into numbers (pure): the hog's crossing of the term level, medians, ratios, tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1 << 20

# One hog step as bench/hog.py logs it: monotonic seconds before and after the allocation,
# MiB held after it, MemAvailable (KiB) read right after it.
Step = tuple[float, float, int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reaction:
    """One round of the reaction scenario, from the hog's point of view."""

    crossed_at: float  # monotonic s when MemAvailable went under the term level (interpolated)
    latency_ms: float  # crossing -> SIGTERM handled in the hog
    past_mib: float  # MiB the hog allocated after the crossing, until SIGTERM
    fill_rate_mib_s: float  # the rate the hog really reached, first step to the signal
    falls: int  # times MemAvailable fell under the level before the signal (>1: others freed memory)


def crossings(steps: Sequence[Step], term_bytes: int) -> list[tuple[float, float]]:
    """(time, MiB held) of every fall of MemAvailable under ``term_bytes``.

    Within the step that crossed, memory falls while the step allocates (between its two
    timestamps), so the crossing is interpolated linearly over that window, from the
    previous reading (still above) to this one (below). A reading under the level at the
    very first step has nothing above to start from and counts as no crossing (the level
    was set too close). On a shared machine MemAvailable can come back over the level
    (another process frees memory): the hog then crosses again, and the list has each fall.
    """
    out: list[tuple[float, float]] = []
    for index in range(1, len(steps)):
        t_before, t_after, held_mib, available_kib = steps[index]
        prev_available = steps[index - 1][3] * 1024
        available = available_kib * 1024
        if not (prev_available >= term_bytes > available):
            continue
        prev_held = steps[index - 1][2]
        frac = min(1.0, max(0.0, (prev_available - term_bytes) / (prev_available - available)))
        out.append((t_before + frac * (t_after - t_before), prev_held + frac * (held_mib - prev_held)))
    return out


def crossing(steps: Sequence[Step], term_bytes: int, signal_at: float | None = None) -> tuple[float, float] | None:
    """The crossing a daemon answered: the last fall under the level before the signal (memory
    stayed under it from then on, as far as the hog saw); the first one when the signal came
    before any (a negative latency: the daemon saw a dip between the hog's readings)."""
    found = crossings(steps, term_bytes)
    if not found:
        return None
    if signal_at is None:
        return found[0]
    before = [c for c in found if c[0] <= signal_at]
    return before[-1] if before else found[0]


def reaction(
    steps: Sequence[Step], term_bytes: int, signal_at: float | None, signal_mib: int | None
) -> Reaction | None:
    """The round's numbers, or None when the hog never crossed or was never signalled."""
    found = crossing(steps, term_bytes, signal_at)
    if found is None or signal_at is None or signal_mib is None or not steps:
        return None
    crossed_at, crossed_mib = found
    until = [s for s in steps if s[1] <= signal_at] or list(steps[:1])
    span_s = until[-1][1] - steps[0][0]
    rate = until[-1][2] / span_s if span_s > 0 else float("nan")  # held from 0 at the first step
    return Reaction(
        crossed_at=crossed_at,
        latency_ms=(signal_at - crossed_at) * 1000,
        past_mib=signal_mib - crossed_mib,
        fill_rate_mib_s=rate,
        falls=sum(1 for c in crossings(steps, term_bytes) if c[0] <= signal_at),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Median and range of one measurement over the rounds."""

    median: float
    low: float
    high: float
    n: int

    def cell(self, digits: int = 1) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        return Summary(median=float("nan"), low=float("nan"), high=float("nan"), n=0)
    return Summary(median=statistics.median(values), low=min(values), high=max(values), n=len(values))


def ratio(ours: Summary, peer: Summary) -> str:
    """uoomd's median over the peer's, as ``0.25×``; n/a when either is missing or zero."""
    if ours.n == 0 or peer.n == 0 or peer.median == 0:
        return "n/a"
    return f"{ours.median / peer.median:.2f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
