"""Rank a snapshot's processes as victims for one guard: kernel badness plus the policy's rules (pure).

Each process is a :class:`Candidate` with its badness terms and the rules that matched, or an
:class:`Exclusion` with the reason; a :class:`Ranking` holds them best first for the decision
core (uoomd/decision.py) and the reports (uoomd/report.py). Which rules match is uoomd/rules.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from uoomd import kernel
from uoomd.plan import GuardPlan, Plan, RulePlan
from uoomd.readings import Pid, ProcessInfo, ProcessKey, Snapshot
from uoomd.rules import MatchKey, Verdicts, check_details, matching_rules


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
    # True: never to be signalled (out of scope, protected, -1000, uoomd itself, ...). False: merely
    # not worth choosing (below min_badness): a victim in flight that shrank there is still ours.
    forbidden: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class RankInputs:
    """Everything besides the process itself that score_process() depends on: two rankings
    with equal inputs give the same verdict for the same ProcessInfo object."""

    plan: Plan
    guard: GuardPlan
    totalpages: int
    system_totalpages: int
    page_size: int
    spared: tuple[tuple[Pid, str], ...]
    members: frozenset[Pid] | None

    def same_as(self, other: RankInputs) -> bool:
        # The plan and guard by identity: a reload builds new ones, and a deep comparison
        # of compiled rules would cost more than it saves.
        return (
            self.plan is other.plan
            and self.guard is other.guard
            and self.totalpages == other.totalpages
            and self.system_totalpages == other.system_totalpages
            and self.page_size == other.page_size
            and self.spared == other.spared
            and self.members == other.members
        )


# Everything rule_matches() reads: (name, cmdline, exe, cgroup, user, uid).


@dataclass(frozen=True, slots=True, kw_only=True)
class Ranking:
    guard: str
    candidates: tuple[Candidate, ...]  # eligible, best victim first
    excluded: tuple[Exclusion, ...]
    taken_at: float  # the snapshot's monotonic time
    inputs: RankInputs | None = None  # what rank() scored with; lets the next rank() reuse verdicts
    # Which of the guard's rules each of this snapshot's processes matched, by match_key():
    # the next rank() with the same plan and guard matches none of them again (Verdicts).
    # Bookkeeping, not part of what a ranking says (so rankings compare equal without it).
    verdicts: Mapping[MatchKey, tuple[RulePlan, ...]] = field(default_factory=dict, compare=False, repr=False)
    rules_matched: int = field(default=0, compare=False)  # processes this rank() matched (others: verdicts reused)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def is_exact(self, candidate: Candidate) -> bool:
        """Whether every term of the candidate's badness was read in this ranking's scan.

        rss and oom_score_adj always are; swap and page tables come from /proc/PID/status,
        which an incremental scan (ProcScanner) carries over for a process whose stat line
        did not change. Such a candidate is approximate: its swap and pgtables terms are
        from an earlier scan of the same process (ProcessInfo.status_read_at).
        """
        read_at = candidate.process.status_read_at
        return read_at is None or read_at >= self.taken_at

    @property
    def exact_count(self) -> int:
        return sum(1 for c in self.candidates if self.is_exact(c))

    def top(self, n: int, excluding: frozenset[ProcessKey] = frozenset()) -> tuple[Candidate, ...]:
        """The first ``n`` candidates not in ``excluding``, best first.

        Walks from the top and stops after ``n``: a crossing asks for the best and the
        runner-up of 2,000 candidates, and filtering them all built a ProcessKey per
        candidate (~5 ms per crossing, bench/profile_crossing.py)."""
        out: list[Candidate] = []
        for candidate in self.candidates:
            if len(out) >= n:
                break
            if excluding and candidate.key in excluding:
                continue
            out.append(candidate)
        return tuple(out)

    def group_of(
        self, victim: Candidate, *, pgid: int | None = None, cgroup: str | None = None
    ) -> tuple[ProcessKey, ...]:
        """The candidates that share the victim's process group (``pgid``) or cgroup, victim first.

        A candidate is in the guard's scope and covered by no protect rule, so this is the set a
        process-group or cgroup victim may signal: a member outside the scope or protected is
        never among them."""
        keys = [victim.key]
        for candidate in self.candidates:
            proc = candidate.process
            if proc.pid == victim.process.pid:
                continue
            same_group = pgid is not None and proc.pgid == pgid
            same_cgroup = cgroup is not None and proc.cgroup is not None and _within(proc.cgroup, cgroup)
            if same_group or same_cgroup:
                keys.append(candidate.key)
        return tuple(keys)

    def without(self, keys: frozenset[ProcessKey]) -> Ranking:
        """The same ranking minus some processes (gone, stuck, already signalled)."""
        return Ranking(
            guard=self.guard,
            candidates=tuple(c for c in self.candidates if c.key not in keys),
            excluded=self.excluded,
            taken_at=self.taken_at,
            inputs=self.inputs,
            verdicts=self.verdicts,
        )


def _within(path: str, top: str) -> bool:
    """Whether cgroup ``path`` is ``top`` or below it (cgroup.kill takes the subtree)."""
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/")


# Exclusion reasons, also shown by `uoomd candidates --json`.
REASON_KTHREAD = "kernel thread"
REASON_INIT = "init"
REASON_NO_MM = "no mm"
REASON_ADJ_MIN = "oom_score_adj -1000"
REASON_SELF = "self"
REASON_PARENT = "uoomd's parent"
REASON_SCOPE = "outside the guard's scope"


def effective_adj(own_adj: int, rules: Iterable[RulePlan], *, ignore_positive_adj: bool) -> int:
    """The process's own oom_score_adj (a positive one counted as 0 when the guard says so),
    plus every matching rule's ``adjust``, clamped to the kernel's [-1000, 1000]."""
    adj = 0 if ignore_positive_adj and own_adj > 0 else own_adj
    adj += sum(rule.adjust for rule in rules)
    return max(kernel.OOM_SCORE_ADJ_MIN, min(kernel.OOM_SCORE_ADJ_MAX, adj))


def rss_pages(process: ProcessInfo, page_size: int) -> int:
    """get_mm_rss(): the stat counter when read (what the kernel uses), else status' exact sum."""
    if process.mm_rss_pages is not None:
        return process.mm_rss_pages
    return process.rss_bytes // page_size


def badness_for(process: ProcessInfo, *, adj: int, totalpages: int, page_size: int) -> Badness:
    """mm/oom_kill.c oom_badness() term by term, for an eligible process."""
    return Badness(
        rss_pages=rss_pages(process, page_size),
        swap_pages=process.swap_bytes // page_size,
        pgtables_pages=process.pgtables_bytes // page_size,
        adj=adj,
        adj_points=kernel.adj_points(adj, totalpages),
        totalpages=totalpages,
    )


def kernel_badness(process: ProcessInfo, *, totalpages: int, page_size: int) -> int:
    """oom_badness() with the process's own oom_score_adj: LONG_MIN when the kernel skips it."""
    return kernel.oom_badness(
        pid=process.pid,
        kthread=process.kthread,
        has_mm=process.has_mm,
        adj=process.oom_score_adj,
        rss_pages=rss_pages(process, page_size),
        swap_pages=process.swap_bytes // page_size,
        pgtables_bytes=process.pgtables_bytes,
        page_size=page_size,
        totalpages=totalpages,
    )


def fork_order(process: ProcessInfo) -> tuple[int, int]:
    """The position in the kernel's task list (for_each_process()): fork order.
    Start time in clock ticks, then PID within one tick (PIDs wrap only after pid_max forks)."""
    return (process.starttime_ticks, process.pid)


def uoomd_pids(snapshot: Snapshot) -> dict[Pid, str]:
    """uoomd itself and its parent (a shell or supervisor waiting on it), with reasons."""
    pids: dict[Pid, str] = {snapshot.self_pid: REASON_SELF}
    for process in snapshot.processes:
        if process.pid == snapshot.self_pid:
            if process.ppid > 0:
                pids.setdefault(process.ppid, REASON_PARENT)
            break
    return pids


def score_process(
    process: ProcessInfo,
    plan: Plan,
    guard: GuardPlan,
    totalpages: int,
    *,
    page_size: int,
    system_totalpages: int,
    spared: dict[Pid, str] | None = None,
    members: frozenset[Pid] | None = None,
    guard_rules: tuple[RulePlan, ...] | None = None,
    verdicts: Verdicts | None = None,
) -> Candidate | Exclusion:
    """One process for one guard: a Candidate, or an Exclusion with its reason.

    ``spared`` maps PIDs that are never victims (uoomd and its parent) to a reason;
    ``members`` restricts a cgroup-scoped guard (None: every process); ``verdicts``
    answers which rules match (it must hold the guard's rules), else they are matched here.
    """
    if process.kthread:
        return Exclusion(process=process, reason=REASON_KTHREAD)
    if process.pid == 1:
        return Exclusion(process=process, reason=REASON_INIT)
    if not process.has_mm:
        # Exiting or a zombie: nothing to free, but not forbidden either (an in-flight victim
        # that is dying has not "left": it is about to be seen as exited).
        return Exclusion(process=process, reason=REASON_NO_MM, forbidden=False)
    if spared and process.pid in spared:
        return Exclusion(process=process, reason=spared[process.pid])
    if members is not None and process.pid not in members:
        return Exclusion(process=process, reason=REASON_SCOPE)
    if verdicts is not None:
        rules = verdicts.rules_of(process)
    else:
        if guard_rules is None:
            guard_rules = plan.rules_for(guard.name)
        rules = matching_rules(guard_rules, process) if guard_rules else ()
    labels = tuple(rule.label for rule in rules)
    if process.oom_score_adj == kernel.OOM_SCORE_ADJ_MIN:
        # The admin's or the program's own "never kill me": kernel semantics, no rule overrides it.
        return Exclusion(process=process, reason=REASON_ADJ_MIN, rules=labels)
    protecting = [rule for rule in rules if rule.protect]
    if protecting:
        return Exclusion(process=process, reason=f"protected by rule {protecting[0].label!r}", rules=labels)
    adj = effective_adj(process.oom_score_adj, rules, ignore_positive_adj=guard.ignore_positive_adj)
    if adj == kernel.OOM_SCORE_ADJ_MIN:
        # oom_badness() skips OOM_SCORE_ADJ_MIN; rules that push a process there do the same.
        return Exclusion(process=process, reason="effective oom_score_adj -1000 after rules", rules=labels)
    badness = badness_for(process, adj=adj, totalpages=totalpages, page_size=page_size)
    if badness.points < guard.min_badness:
        return Exclusion(
            process=process,
            reason=f"badness {badness.points} below min_badness {guard.min_badness}",
            rules=labels,
            forbidden=False,
        )
    kernel_points = kernel_badness(process, totalpages=totalpages, page_size=page_size)
    system_badness = (
        kernel_points
        if system_totalpages == totalpages
        else kernel_badness(process, totalpages=system_totalpages, page_size=page_size)
    )
    return Candidate(
        process=process,
        badness=badness,
        kernel_points=kernel_points,
        oom_score=kernel.proc_oom_score(system_badness, system_totalpages),
        effective_adj=adj,
        rules=labels,
    )


def victim_order(candidate: Candidate) -> tuple[int, int, int]:
    # Highest points first; among equals the kernel keeps the LAST in fork order
    # (oom_evaluate_task() replaces on equal points), so later-forked first.
    # Badness.points and fork_order() spelled out: this runs for every candidate of every scan.
    b = candidate.badness
    process = candidate.process
    return (
        -(b.rss_pages + b.swap_pages + b.pgtables_pages + b.adj_points),
        -process.starttime_ticks,
        -process.pid,
    )


def rank(
    snapshot: Snapshot,
    plan: Plan,
    guard: GuardPlan,
    *,
    totalpages: int,
    members: frozenset[Pid] | None = None,
    previous: Ranking | None = None,
) -> Ranking:
    """Rank every process of a snapshot for one guard, best victim first (pure).

    With no rules and no min_badness, ``best`` is the kernel's own choice
    (select_bad_process()) for the same totalpages.

    ``previous``: an earlier ranking for the same guard. Where it was made with the same
    inputs, the verdict of every ProcessInfo object it holds is reused (an incremental
    scan hands back the very same object for a process that did not change); the result
    equals ``rank()`` without ``previous``.
    """
    check_details(snapshot.details, plan)
    spared = uoomd_pids(snapshot)
    system_totalpages = kernel.system_totalpages(
        total_ram_bytes=snapshot.total_ram_bytes,
        total_swap_bytes=snapshot.total_swap_bytes,
        page_size=snapshot.page_size,
    )
    inputs = RankInputs(
        plan=plan,
        guard=guard,
        totalpages=totalpages,
        system_totalpages=system_totalpages,
        page_size=snapshot.page_size,
        spared=tuple(sorted(spared.items())),
        members=members,
    )
    known: dict[int, Candidate | Exclusion] = {}
    if previous is not None and previous.inputs is not None and previous.inputs.same_as(inputs):
        # Keyed by id(): the previous ranking keeps those objects alive, and `is` confirms.
        known = {id(r.process): r for r in previous.candidates}
        known.update((id(r.process), r) for r in previous.excluded)
    guard_rules = plan.rules_for(guard.name)
    same_rules = (
        previous is not None
        and previous.inputs is not None
        and previous.inputs.plan is plan
        and previous.inputs.guard is guard
    )
    verdicts = Verdicts(guard_rules, previous.verdicts if previous is not None and same_rules else {})
    candidates: list[Candidate] = []
    excluded: list[Exclusion] = []
    for process in snapshot.processes:
        result = known.get(id(process))
        if result is None or result.process is not process:
            result = score_process(
                process,
                plan,
                guard,
                totalpages,
                page_size=snapshot.page_size,
                system_totalpages=system_totalpages,
                spared=spared,
                members=members,
                guard_rules=guard_rules,
                verdicts=verdicts if guard_rules else None,
            )
        elif guard_rules:
            verdicts.keep(process)
        if isinstance(result, Candidate):
            candidates.append(result)
        else:
            excluded.append(result)
    candidates.sort(key=victim_order)
    return Ranking(
        guard=guard.name,
        candidates=tuple(candidates),
        excluded=tuple(excluded),
        taken_at=snapshot.taken_at,
        inputs=inputs,
        verdicts=verdicts.found,
        rules_matched=verdicts.matched,
    )


def kernel_choice(snapshot: Snapshot, *, totalpages: int, members: frozenset[Pid] | None = None) -> ProcessInfo | None:
    """The process the kernel's OOM killer would pick now (no rules, no uoomd exceptions)."""
    ordered = sorted(
        (p for p in snapshot.processes if members is None or p.pid in members),
        key=fork_order,
    )
    chosen = kernel.select_bad_process(
        (p, kernel_badness(p, totalpages=totalpages, page_size=snapshot.page_size)) for p in ordered
    )
    return chosen[0] if chosen is not None else None
