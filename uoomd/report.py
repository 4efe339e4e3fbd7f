"""The `uoomd candidates` and `uoomd explain` reports: rank the live processes and print tables or JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from uoomd import kernel
from uoomd.errors import ExitCode, NoSuchProcessError, SetupError, UsageError
from uoomd.logs import escape
from uoomd.plan import GuardPlan, Plan, ScopeKind
from uoomd.readings import Pid, ProcessInfo, ProcessKey, Snapshot
from uoomd.rules import matching_rules
from uoomd.scoring import (
    Candidate,
    Exclusion,
    Ranking,
    kernel_badness,
    kernel_choice,
    rank,
    rss_pages,
)
from uoomd.sources.cgroup import read_members, read_totalpages
from uoomd.sources.procfs import read_oom_score, read_snapshot
from uoomd.status import running_daemon
from uoomd.units import format_bytes

# Reports show who a process is: read these even when no rule needs them.
_REPORT_DETAILS = frozenset({"cmdline", "user"})
# The daemon spares itself (scoring.REASON_SELF); a report is another process, and learns the
# daemon's pid and start time from the state file of the policy it was given.
REASON_DAEMON = "the running uoomd daemon"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Scene:
    """One guard's view: the snapshot, its totalpages and members, and the ranking."""

    guard: GuardPlan
    snapshot: Snapshot
    totalpages: int
    system_totalpages: int
    members: frozenset[Pid] | None
    ranking: Ranking


def _pick_guard(plan: Plan, guard_name: str | None) -> GuardPlan:
    if not plan.guards:
        raise SetupError("the policy has no guard", hint="add a [[guard]] table")
    if guard_name is None:
        return plan.guards[0]
    try:
        return plan.guard(guard_name)
    except KeyError:
        names = ", ".join(g.name for g in plan.guards)
        raise UsageError(f"no guard named {guard_name!r}", hint=f"the policy's guards are: {names}") from None


def _scene(plan: Plan, guard: GuardPlan, proc_root: str) -> _Scene:
    members: frozenset[Pid] | None = None
    if guard.scope.kind is ScopeKind.CGROUP:
        assert guard.scope.cgroup_path is not None
        if not os.path.isdir(guard.scope.cgroup_path):
            raise SetupError(
                f"guard {guard.name!r}: cgroup {guard.scope.cgroup_path} does not exist",
                hint="create the cgroup or fix the guard's scope",
            )
        members = frozenset(Pid(p) for p in read_members(guard.scope.cgroup_path))
    try:
        snapshot = read_snapshot(proc_root, details=plan.needed_details() | _REPORT_DETAILS, self_pid=os.getpid())
    except FileNotFoundError as exc:
        raise SetupError(f"cannot read {exc.filename or proc_root}", hint="is /proc mounted?") from None
    system_totalpages = kernel.system_totalpages(
        total_ram_bytes=snapshot.total_ram_bytes,
        total_swap_bytes=snapshot.total_swap_bytes,
        page_size=snapshot.page_size,
    )
    totalpages = read_totalpages(guard.scope, snapshot)
    ranking = rank(snapshot, plan, guard, totalpages=totalpages, members=members)
    daemon = running_daemon(plan.daemon.state_file, proc_root)
    if daemon is not None:
        ranking = spare_daemon(ranking, daemon)
    return _Scene(
        guard=guard,
        snapshot=snapshot,
        totalpages=totalpages,
        system_totalpages=system_totalpages,
        members=members,
        ranking=ranking,
    )


def spare_daemon(ranking: Ranking, daemon: ProcessKey) -> Ranking:
    """``ranking`` with the running daemon excluded as such, whatever else excluded it (pure).

    Matched by pid and start time: a PID that a stale state file names, since handed to
    another process, stays where it ranked."""
    candidates = [c for c in ranking.candidates if c.process.key != daemon]
    excluded: list[Exclusion] = []
    found = len(candidates) < len(ranking.candidates)
    for exclusion in ranking.excluded:
        if exclusion.process.key == daemon:
            excluded.append(replace(exclusion, reason=REASON_DAEMON, forbidden=True))
            found = True
        else:
            excluded.append(exclusion)
    if not found:
        return ranking
    spared = next((c for c in ranking.candidates if c.process.key == daemon), None)
    if spared is not None:
        excluded.append(Exclusion(process=spared.process, reason=REASON_DAEMON, rules=spared.rules))
    return replace(ranking, candidates=tuple(candidates), excluded=tuple(excluded))


def _system_oom_score(process: ProcessInfo, scene: _Scene) -> int:
    badness = kernel_badness(process, totalpages=scene.system_totalpages, page_size=scene.snapshot.page_size)
    return kernel.proc_oom_score(badness, scene.system_totalpages)


def _candidate_row(rank_no: int, c: Candidate) -> dict[str, object]:
    return _row(
        rank_no,
        c.process,
        effective_adj=c.effective_adj,
        badness=c.badness.points,
        kernel_points=c.kernel_points,
        oom_score=c.oom_score,
        reason=None,
        rules=c.rules,
    )


def _exclusion_row(e: Exclusion, scene: _Scene) -> dict[str, object]:
    p = e.process
    points = kernel_badness(p, totalpages=scene.totalpages, page_size=scene.snapshot.page_size)
    known = None if points == kernel.LONG_MIN else points
    return _row(
        None,
        p,
        effective_adj=None,
        badness=known,
        kernel_points=known,
        oom_score=_system_oom_score(p, scene),
        reason=e.reason,
        rules=e.rules,
    )


def _row(
    rank_no: int | None,
    p: ProcessInfo,
    *,
    effective_adj: int | None,
    badness: int | None,
    kernel_points: int | None,
    oom_score: int,
    reason: str | None,
    rules: tuple[str, ...],
) -> dict[str, object]:
    """One row of `candidates --json`: a candidate (ranked), or an excluded process (its reason)."""
    return {
        "rank": rank_no,
        "pid": p.pid,
        "name": p.name,
        "user": p.user,
        "uid": p.uid,
        "cmdline": p.cmdline,
        "rss_bytes": p.rss_bytes,
        "swap_bytes": p.swap_bytes,
        "oom_score_adj": p.oom_score_adj,
        "effective_adj": effective_adj,
        "badness": badness,
        "kernel_points": kernel_points,
        "oom_score": oom_score,
        "protected": reason is not None,
        "reason": reason,
        "rules": list(rules),
    }


def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def run_candidates(
    plan: Plan,
    *,
    guard_name: str | None,
    top: int | None,
    show_all: bool = False,
    as_json: bool,
    proc_root: str,
    out: TextIO,
) -> int:
    """`uoomd candidates`: the ranked victims of one guard, best first; ``show_all``: then the
    excluded processes, each with its reason (kernel threads last)."""
    guard = _pick_guard(plan, guard_name)
    scene = _scene(plan, guard, proc_root)
    candidates = scene.ranking.candidates[:top] if top is not None else scene.ranking.candidates
    excluded = sorted(scene.ranking.excluded, key=lambda e: e.process.kthread) if show_all else []
    if as_json:
        rows = [_candidate_row(i, c) for i, c in enumerate(candidates, 1)]
        rows += [_exclusion_row(e, scene) for e in excluded]
        out.write(json.dumps(rows, indent=2) + "\n")
        return ExitCode.OK
    header = ["#", "PID", "USER", "NAME", "RSS", "SWAP", "ADJ", "EFF_ADJ", "BADNESS", "OOM_SCORE", "RULES"]
    table = [header]
    for i, c in enumerate(candidates, 1):
        p = c.process
        table.append(
            [
                str(i),
                str(p.pid),
                escape(p.user or str(p.uid)),
                escape(p.name),
                format_bytes(p.rss_bytes),
                format_bytes(p.swap_bytes),
                str(p.oom_score_adj),
                str(c.effective_adj),
                str(c.badness.points),
                str(c.oom_score),
                escape(",".join(c.rules)) or "-",
            ]
        )
    out.write(f"# guard {guard.name} ({guard.scope.describe()}), totalpages {scene.totalpages}\n")
    if len(table) == 1:
        out.write("no candidates\n")
    else:
        out.write(_table(table, right={0, 1, 4, 5, 6, 7, 8, 9}))
    if show_all:
        _write_excluded(excluded, out)
        return ExitCode.OK
    reasons: dict[str, int] = {}
    for e in scene.ranking.excluded:
        key = "protected by a rule" if e.reason.startswith("protected by rule") else e.reason
        reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        summary = ", ".join(f"{n} {escape(reason)}" for reason, n in sorted(reasons.items()))
        out.write(f"# excluded: {summary} (--all lists them)\n")
    return ExitCode.OK


def _write_excluded(excluded: list[Exclusion], out: TextIO) -> None:
    """`candidates --all`: the excluded processes after the candidates, each with its reason."""
    if not excluded:
        out.write("# excluded: none\n")
        return
    out.write(f"# excluded: {len(excluded)}\n")
    table = [["PID", "USER", "NAME", "RSS", "ADJ", "REASON"]]
    for e in excluded:
        p = e.process
        table.append(
            [
                str(p.pid),
                escape(p.user or str(p.uid)),
                escape(p.name),
                format_bytes(p.rss_bytes),
                str(p.oom_score_adj),
                escape(e.reason),
            ]
        )
    out.write(_table(table, right={0, 3, 4}))


def run_explain(plan: Plan, *, pid: int, guard_name: str | None, proc_root: str, out: TextIO) -> int:
    """`uoomd explain PID`: the badness terms, the rules that matched, and who would be picked."""
    guard = _pick_guard(plan, guard_name)
    scene = _scene(plan, guard, proc_root)
    process = next((p for p in scene.snapshot.processes if p.pid == pid), None)
    if process is None:
        raise NoSuchProcessError(f"no process {pid}")
    page_size = scene.snapshot.page_size
    w = out.write
    w(f"process {process.pid} ({escape(process.name)}), user {escape(process.user or str(process.uid))}\n")
    if process.cmdline:
        cmdline = escape(process.cmdline)
        w(f"  cmdline: {cmdline[:200]}{'...' if len(cmdline) > 200 else ''}\n")
    w(f"guard {guard.name} ({guard.scope.describe()}): totalpages {scene.totalpages} (pages of {page_size} B)\n")

    _explain_terms(process, scene, w)
    ours = _system_oom_score(process, scene)
    theirs = read_oom_score(proc_root, pid)
    w(f"oom_score: {ours} computed, {theirs if theirs is not None else '?'} from /proc/{pid}/oom_score\n")
    _explain_rules(plan, guard, process, w)
    _explain_picks(process, scene, w)
    return ExitCode.OK


def _explain_terms(process: ProcessInfo, scene: _Scene, w: Callable[[str], object]) -> None:
    page_size = scene.snapshot.page_size
    kernel_points = kernel_badness(process, totalpages=scene.totalpages, page_size=page_size)
    w("oom_badness() terms (mm/oom_kill.c):\n")
    if kernel_points == kernel.LONG_MIN:
        w("  the kernel skips this process (LONG_MIN): ")
        if process.kthread:
            w("kernel thread\n")
        elif process.pid == 1:
            w("init\n")
        elif not process.has_mm:
            w("no mm (zombie or exiting)\n")
        else:
            w("oom_score_adj -1000\n")
    else:
        rss = rss_pages(process, page_size)
        swap = process.swap_bytes // page_size
        pgtables = process.pgtables_bytes // page_size
        per_adj = scene.totalpages // 1000
        adj_pts = kernel.adj_points(process.oom_score_adj, scene.totalpages)
        w(f"  rss pages          {rss:>14}  (get_mm_rss; {format_bytes(process.rss_bytes)} in status)\n")
        w(f"  swap pages         {swap:>14}\n")
        w(f"  page-table pages   {pgtables:>14}\n")
        w(f"  adj points         {adj_pts:>14}  (oom_score_adj {process.oom_score_adj} x {per_adj})\n")
        w(f"  = badness          {kernel_points:>14}\n")


def _explain_rules(plan: Plan, guard: GuardPlan, process: ProcessInfo, w: Callable[[str], object]) -> None:
    rules = matching_rules(plan.rules_for(guard.name), process)
    if rules:
        w("rules that match:\n")
        for rule in rules:
            what = "protect" if rule.protect else f"adjust {rule.adjust:+d}"
            w(f"  {escape(rule.label)}: {what}\n")
    else:
        w("rules that match: none\n")


def _explain_picks(process: ProcessInfo, scene: _Scene, w: Callable[[str], object]) -> None:
    pid = process.pid
    verdict: Candidate | Exclusion | None = None
    position = 0
    for i, c in enumerate(scene.ranking.candidates, 1):
        if c.process.pid == pid:
            verdict, position = c, i
    for e in scene.ranking.excluded:
        if e.process.pid == pid:
            verdict = e
    kernel_pick = kernel_choice(scene.snapshot, totalpages=scene.totalpages, members=scene.members)
    best = scene.ranking.best
    if kernel_pick is not None and kernel_pick.pid == pid:
        w("the kernel would pick it: yes\n")
    else:
        other = f"{kernel_pick.pid} ({escape(kernel_pick.name)})" if kernel_pick else "nothing"
        if kernel_pick is not None and kernel_pick.pid == scene.snapshot.self_pid:
            other += ", this uoomd command itself"
        w(f"the kernel would pick it: no, it would pick {other}\n")
    if isinstance(verdict, Candidate):
        w(f"uoomd: effective oom_score_adj {verdict.effective_adj}, points {verdict.badness.points}, ")
        w(f"rank {position} of {len(scene.ranking.candidates)}\n")
    elif isinstance(verdict, Exclusion):
        w(f"uoomd: excluded: {escape(verdict.reason)}\n")
    if best is not None and best.process.pid == pid:
        w("uoomd would pick it: yes\n")
    else:
        other = f"{best.process.pid} ({escape(best.process.name)})" if best else "nothing"
        w(f"uoomd would pick it: no, it would pick {other}\n")
