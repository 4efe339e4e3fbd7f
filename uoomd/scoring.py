"""Rank a snapshot's processes as victims for one guard: kernel badness plus the policy's rules (pure).

CONTRACT (filled in by the scoring work; the types below are what decision.py and report.py use).
"""

from __future__ import annotations

from dataclasses import dataclass

from uoomd.readings import Pid, ProcessInfo, ProcessKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Badness:
    """The kernel's oom_badness() terms for one process, in pages (mm/oom_kill.c)."""

    rss_pages: int
    swap_pages: int
    pgtables_pages: int
    adj: int  # the effective oom_score_adj used
    adj_points: int  # adj * (totalpages // 1000)
    totalpages: int

    @property
    def points(self) -> int:
        return self.rss_pages + self.swap_pages + self.pgtables_pages + self.adj_points


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    process: ProcessInfo
    badness: Badness  # with the effective adj (rules applied)
    kernel_points: int  # oom_badness() with the process's own adj and the guard's totalpages
    oom_score: int  # proc_oom_score(): what /proc/PID/oom_score shows (system totalpages)
    effective_adj: int
    rules: tuple[str, ...]  # labels of the rules that matched

    @property
    def key(self) -> ProcessKey:
        return self.process.key


@dataclass(frozen=True, slots=True, kw_only=True)
class Exclusion:
    process: ProcessInfo
    reason: str  # "kernel thread", "init", "no mm", "oom_score_adj -1000", "protected by rule 'x'", "self", ...
    rules: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Ranking:
    guard: str
    candidates: tuple[Candidate, ...]  # eligible, best victim first
    excluded: tuple[Exclusion, ...]
    taken_at: float  # the snapshot's monotonic time

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def without(self, keys: frozenset[ProcessKey]) -> Ranking:
        """The same ranking minus some processes (gone, stuck, already signalled)."""
        return Ranking(
            guard=self.guard,
            candidates=tuple(c for c in self.candidates if c.key not in keys),
            excluded=self.excluded,
            taken_at=self.taken_at,
        )


_ = Pid  # re-exported for callers
