"""Keep each guard's victim ranking as fresh as the decision core needs it: warm between polls, current at a crossing.

The core says what each guard needs (:func:`uoomd.decision.needs`): nothing, a *warm*
ranking (a rescan at a bounded rate: a full scan of 2,000 processes costs ~26 ms), or one
that is *now* (this poll chooses a victim). A ranking is made now without a full scan:

- processes born since the scan are found: for a cgroup scope its member list (one small
  read) against the scan's, for the machine the PIDs in /proc (one readdir); each is read
  and scored;
- processes that left (exited, or moved out of the cgroup) are dropped;
- the processes that may have overtaken the best one are re-read. Since the scan the scope's
  used memory (RAM + swap) grew by ``growth``; no process can have grown by more than that
  plus what the dropped ones freed (and a small slack for the ones that shrank), so only a
  candidate whose stale points plus that bound reach the best fresh points can be the victim
  now. Re-read best first, the bound tightens as soon as the grower is read.

A process born between two refreshes is then seen at the crossing (issue 11: an idle
30 MiB process took the first SIGTERM in 5 of 6 tries while a new hog went to the kernel).
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from uoomd import kernel
from uoomd.decision import Need
from uoomd.logs import OnError
from uoomd.plan import GuardPlan, Plan, ScopeKind
from uoomd.readings import GuardReading, MemoryReading, Pid, ProcessInfo, ProcessKey, Snapshot
from uoomd.scoring import Candidate, Exclusion, Ranking, rank, score_process, uoomd_pids, victim_order
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources import procfs
from uoomd.sources.scanner import ProcScanner

# The warm ranking may cost at most this share of one core: a rescan that took
# 50 ms is not repeated within 50 ms / SCAN_CPU_SHARE.
SCAN_CPU_SHARE = 0.1
WARM_REFRESH_MIN_S = 0.5
# A crossing that would re-read more processes than this (new or contenders) rescans instead:
# past ~150 single reads (~40 us each) the incremental scan is cheaper.
REFRESH_MAX_READS = 150
# The victim chosen at a crossing is within this much of the best candidate: a stale candidate
# that could at most beat the best by less is not re-read. Without it, 2,000 processes of a few
# MiB each, on a machine whose use moves by a few MiB between polls, were all "contenders"
# (bench/profile_crossing.py). It also covers what processes that shrank let others grow by.
TOLERANCE_BYTES = 8 << 20


def used_bytes(memory: MemoryReading) -> int:
    """RAM and swap in use in a scope: what a growing process takes from."""
    return (memory.total_bytes - memory.available_bytes) + (memory.swap_total_bytes - memory.swap_free_bytes)


Reread = Callable[[Candidate], "Candidate | Exclusion | None"]  # None: the process is gone


@dataclass(frozen=True, slots=True, kw_only=True)
class Refreshed:
    """A stale ranking's candidates made current (see :func:`refresh_candidates`)."""

    candidates: tuple[Candidate, ...]  # best first
    excluded: tuple[Exclusion, ...]  # re-read and no longer eligible
    reread: int  # how many were re-read


def refresh_candidates(
    stale: Iterable[Candidate],
    *,
    fresh: Iterable[Candidate],
    bound_pages: int,
    reread: Reread,
    max_reads: int,
    unusable: frozenset[ProcessKey] = frozenset(),
    tolerance_pages: int = 0,
) -> Refreshed | None:
    """Re-read the stale candidates (best first) that can still be the best one now; keep the rest.

    ``fresh``: candidates read just now (processes born since the ranking). ``bound_pages``:
    how much any process can have grown since the ranking. A stale candidate whose points plus
    the bound stay below the best fresh points cannot be the victim now, and neither can any
    after it (they have fewer points): they are kept as they were. A re-read process that is
    gone frees what it held, which raises the bound. None when more than ``max_reads``
    re-reads would be needed: a full scan is cheaper then. ``unusable`` (in flight, stuck)
    cannot be chosen: kept as they are, and they never raise the bar for the others.
    ``tolerance_pages``: a candidate that could beat the best by no more than this is not re-read.

    Pure, given ``reread``: the daemon passes a /proc reader, tests a table."""
    candidates = list(fresh)
    excluded: list[Exclusion] = []
    best = max((c.badness.points for c in candidates), default=None)
    ordered = list(stale)
    kept_from = len(ordered)
    reads = 0
    skipped: list[Candidate] = []
    for i, candidate in enumerate(ordered):
        if best is not None and candidate.badness.points + bound_pages <= best + tolerance_pages:
            kept_from = i
            break
        if unusable and candidate.key in unusable:
            skipped.append(candidate)
            continue
        if reads >= max_reads:
            return None
        reads += 1
        result = reread(candidate)
        if result is None:
            bound_pages += candidate.badness.rss_pages + candidate.badness.swap_pages
        elif isinstance(result, Candidate):
            candidates.append(result)
            best = result.badness.points if best is None else max(best, result.badness.points)
        else:
            excluded.append(result)
    merged = ordered[kept_from:]
    for candidate in sorted([*candidates, *skipped], key=victim_order):
        bisect.insort(merged, candidate, key=victim_order)
    return Refreshed(candidates=tuple(merged), excluded=tuple(excluded), reread=reads)


@dataclass(slots=True)
class _Basis:
    """What a guard's ranking was made from."""

    totalpages: int
    system_totalpages: int  # what /proc/PID/oom_score is computed with
    used_bytes: int
    members: frozenset[Pid] | None


@dataclass(slots=True)
class RefreshStats:
    """What the last now-refresh did, for the debug log and tests."""

    new: int = 0
    dropped: int = 0
    reread: int = 0
    rescanned: bool = False


@dataclass(slots=True)
class WarmRanking:
    """The rankings kept warm between ticks, and the scanner that holds their /proc fds."""

    proc_root: str
    on_error: OnError
    scanner: ProcScanner = field(init=False)
    rankings: dict[str, Ranking] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    scanned_at: float = float("-inf")
    scan_cost_s: float = 0.0
    rescanned: bool = False  # the last provide() made a full scan: its snapshot is fresh
    stats: RefreshStats = field(default_factory=RefreshStats)
    _basis: dict[str, _Basis] = field(default_factory=dict)
    _pids: frozenset[int] = frozenset()  # the snapshot's PIDs
    _spared: dict[Pid, str] = field(default_factory=dict)  # uoomd and its parent, per snapshot
    _last_pid: int | None = None  # /proc/loadavg's last PID before the scan: newer PIDs are new

    def __post_init__(self) -> None:
        self.scanner = ProcScanner(self.proc_root)

    # -- the API the loop uses

    def provide(
        self,
        plan: Plan,
        wanted: Mapping[str, Need],
        readings: Iterable[GuardReading],
        now: float,
        unusable: frozenset[ProcessKey] = frozenset(),
    ) -> dict[str, Ranking]:
        """The rankings the core asked for (``decision.needs``); the guards that need none get none.
        ``unusable``: processes the core will not choose (State.unchoosable())."""
        self.rescanned = False
        self.stats = RefreshStats()
        active = [r for r in readings if wanted.get(r.guard, Need.NONE) is not Need.NONE]
        if not active:
            self.drop()
            return {}
        refresh_after = max(WARM_REFRESH_MIN_S, self.scan_cost_s / SCAN_CPU_SHARE)
        missing = any(r.guard not in self.rankings for r in active)
        if missing or now - self.scanned_at >= refresh_after:
            self.rescan(plan, active, now)
        out: dict[str, Ranking] = {}
        for reading in active:
            if wanted[reading.guard] is Need.NOW and not self.rescanned:
                self._refresh_now(plan, plan.guard(reading.guard), reading, now, unusable)
            ranking = self.rankings.get(reading.guard)
            if ranking is not None:
                out[reading.guard] = ranking
        return out

    def ineligible(self, plan: Plan, in_flight: Iterable[tuple[str, ProcessKey]]) -> frozenset[ProcessKey]:
        """In-flight victims, still alive, that may no longer be signalled: re-read and re-scored
        for their guard, they left its scope, exec'd into a protected program, or went to -1000."""
        out: set[ProcessKey] = set()
        for guard_name, key in in_flight:
            try:
                guard = plan.guard(guard_name)
            except KeyError:
                continue
            basis = self._basis.get(guard_name)
            if self.snapshot is None or basis is None:
                continue  # no ranking to judge by: the escalation goes on as decided
            info = procfs.read_process(self.proc_root, key.pid, plan.needed_details())
            if info is None or info.starttime_ticks != key.starttime_ticks:
                continue  # gone: the core sees it through alive
            result = self._score(plan, guard, info, snapshot=self.snapshot, basis=basis, members=self._members(guard))
            if isinstance(result, Exclusion) and result.forbidden:
                out.add(key)
        return frozenset(out)

    def forget(self, key: ProcessKey) -> None:
        """A victim found gone or recycled at signal time: never choose it from this ranking again."""
        self.rankings = {name: r.without(frozenset({key})) for name, r in self.rankings.items()}

    def drop(self) -> None:
        """Far from trouble: keep nothing (a stale ranking must never be acted on), hold no /proc fd."""
        self.rankings = {}
        self.snapshot = None
        self._basis = {}
        self._pids = frozenset()
        self._last_pid = None
        self.scanned_at = float("-inf")
        self.scanner.close()

    def close(self) -> None:
        self.drop()

    @property
    def active(self) -> bool:
        return bool(self.rankings)

    # -- members

    def _members(self, guard: GuardPlan) -> frozenset[Pid] | None:
        if guard.scope.kind is ScopeKind.SYSTEM:
            return None
        assert guard.scope.cgroup_path is not None
        try:
            return frozenset(Pid(p) for p in cgroup_source.read_members(guard.scope.cgroup_path))
        except OSError as exc:
            self.on_error(
                f"members:{guard.name}", event="reading_failed", guard=guard.name, source="members", error=str(exc)
            )
            return frozenset()

    # -- the full scan

    def rescan(self, plan: Plan, readings: list[GuardReading], now: float) -> None:
        started = time.perf_counter()
        members = {r.guard: self._members(plan.guard(r.guard)) for r in readings}
        pids: set[int] | None = set()
        for found in members.values():
            if found is None:
                pids = None
                break
            assert pids is not None
            pids |= found
        # uoomd itself and its parent are read too, so scoring can spare them by name.
        if pids is not None:
            pids |= {os.getpid(), os.getppid()}
        try:
            # The warm top is re-read in full (status too); the rest re-reads only what changed.
            finalists = {c.process.pid for r in self.rankings.values() for c in r.candidates[:8]}
            last_pid = procfs.read_last_pid(self.proc_root) if pids is None else None  # before: none is missed
            snapshot = self.scanner.scan(details=plan.needed_details(), pids=pids, refresh=finalists)
        except (OSError, ValueError) as exc:
            # A scan that fails (meminfo unreadable, EMFILE, ENOMEM) is a fault of this poll, not
            # the end of the daemon: log it, keep no ranking (a stale one is never acted on) and
            # scan again at the next poll that needs it.
            self.on_error("scan", event="reading_failed", source="processes", error=str(exc))
            cost = self.scan_cost_s
            self.drop()
            self.scanned_at, self.scan_cost_s = now, cost
            return
        rankings: dict[str, Ranking] = {}
        basis: dict[str, _Basis] = {}
        system_totalpages = kernel.system_totalpages(
            total_ram_bytes=snapshot.total_ram_bytes,
            total_swap_bytes=snapshot.total_swap_bytes,
            page_size=snapshot.page_size,
        )
        for reading in readings:
            guard = plan.guard(reading.guard)
            totalpages = cgroup_source.read_totalpages(guard.scope, snapshot)
            rankings[guard.name] = rank(
                snapshot,
                plan,
                guard,
                totalpages=totalpages,
                members=members[guard.name],
                previous=self.rankings.get(guard.name),
            )
            basis[guard.name] = _Basis(
                totalpages=totalpages,
                system_totalpages=system_totalpages,
                used_bytes=used_bytes(reading.memory),
                members=members[guard.name],
            )
        self.rankings, self._basis, self.snapshot = rankings, basis, snapshot
        self._pids = frozenset(p.pid for p in snapshot.processes)
        self._spared = uoomd_pids(snapshot)
        self._last_pid = last_pid
        self.scanned_at, self.scan_cost_s = now, time.perf_counter() - started
        self.rescanned = True
        self.stats.rescanned = True

    # -- the crossing

    def _score(
        self,
        plan: Plan,
        guard: GuardPlan,
        info: ProcessInfo,
        *,
        snapshot: Snapshot,
        basis: _Basis,
        members: frozenset[Pid] | None,
    ) -> Candidate | Exclusion:
        """One process re-read now, scored with what the guard's ranking was made with."""
        return score_process(
            info,
            plan,
            guard,
            basis.totalpages,
            page_size=snapshot.page_size,
            system_totalpages=basis.system_totalpages,
            spared=self._spared,
            members=members,
        )

    def _born_since_scan(self) -> frozenset[int] | None:
        """PIDs of processes born since the scan, from the last PID handed out (one small read,
        where a readdir of 2,000 /proc entries costs ~1.5 ms); None when only a listing can tell
        (no /proc/loadavg, the PIDs wrapped, or more were handed out than are worth probing).
        Threads take PIDs too: a probe keeps only thread-group leaders."""
        before = self._last_pid
        if before is None:
            return None
        last = procfs.read_last_pid(self.proc_root)
        if last is None:
            return None
        # Read before the caller lists /proc (if it must): whatever is born after is newer.
        self._last_pid = last
        if last == before:
            return frozenset()
        if not before < last <= before + REFRESH_MAX_READS:
            return None
        return frozenset(
            pid for pid in range(before + 1, last + 1) if procfs.is_thread_group_leader(self.proc_root, pid)
        )

    def _new_pids(
        self, basis: _Basis, members: frozenset[Pid] | None
    ) -> tuple[frozenset[int], frozenset[int] | None] | None:
        """(PIDs new to the guard since its scan, the scope's PIDs now where they were listed).

        New: for a cgroup, not a member at the scan (a process may also have moved in from
        elsewhere); for the machine, born since the scan. The scope's PIDs are None when they
        were not listed (nothing born since, by the last PID handed out). None: /proc unreadable."""
        if members is not None:
            return members - (basis.members or frozenset()), members
        found = self._born_since_scan()
        if found is not None:
            return found, None
        try:
            current = frozenset(procfs.list_pids(self.proc_root))
        except OSError as exc:
            self.on_error("scan", event="reading_failed", source="processes", error=str(exc))
            return None
        return current - self._pids, current

    def _refresh_now(
        self, plan: Plan, guard: GuardPlan, reading: GuardReading, now: float, unusable: frozenset[ProcessKey]
    ) -> None:
        """Make the guard's ranking current without a full scan (see the module docstring)."""
        ranking = self.rankings.get(guard.name)
        basis = self._basis.get(guard.name)
        snapshot = self.snapshot
        if ranking is None or basis is None or snapshot is None:
            return
        members = self._members(guard)
        listed = self._new_pids(basis, members)
        if listed is None:
            return
        new_pids, current = listed
        if len(new_pids) > REFRESH_MAX_READS:
            self.rescan(plan, [reading], now)
            return
        details = plan.needed_details()
        fresh: list[Candidate] = []
        excluded: list[Exclusion] = []
        for pid in sorted(new_pids):
            info = procfs.read_process(self.proc_root, pid, details)
            if info is None:
                continue
            result = self._score(plan, guard, info, snapshot=snapshot, basis=basis, members=members)
            if isinstance(result, Candidate):
                fresh.append(result)
            else:
                excluded.append(result)
        # Left the scope or exited: dropped, and what they held may have gone to a grower.
        staying = list(ranking.candidates)
        freed_pages = 0
        if current is not None:
            staying = [c for c in ranking.candidates if c.process.pid in current]
            freed_pages = sum(
                c.badness.rss_pages + c.badness.swap_pages for c in ranking.candidates if c.process.pid not in current
            )
        growth = max(0, used_bytes(reading.memory) - basis.used_bytes)

        def reread(candidate: Candidate) -> Candidate | Exclusion | None:
            info = procfs.read_process(self.proc_root, candidate.process.pid, details)
            if info is None or info.starttime_ticks != candidate.process.starttime_ticks:
                return None
            return self._score(plan, guard, info, snapshot=snapshot, basis=basis, members=members)

        done = refresh_candidates(
            staying,
            fresh=fresh,
            bound_pages=growth // snapshot.page_size + freed_pages,
            reread=reread,
            max_reads=REFRESH_MAX_READS,
            unusable=unusable,
            tolerance_pages=TOLERANCE_BYTES // snapshot.page_size,
        )
        if done is None:
            self.rescan(plan, [reading], now)
            return
        self.rankings[guard.name] = replace(
            ranking, candidates=done.candidates, excluded=(*ranking.excluded, *excluded, *done.excluded)
        )
        if members is None:
            self._pids = current if current is not None else self._pids | new_pids
        else:
            self._basis[guard.name] = replace(basis, members=members)
        self.stats = RefreshStats(
            new=len(new_pids), dropped=len(ranking.candidates) - len(staying), reread=done.reread, rescanned=False
        )
