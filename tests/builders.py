"""The tests' one set of builders: processes, candidates and rankings, guards, rules and plans,
memory readings, snapshots, PSI triggers, and policy files for a test cgroup.

Each builder fills in what a test does not care about and takes what it does as keywords;
a test names only the facts its assertion depends on. (Fixtures built on these, such as a
throwaway memory cgroup, are in tests/conftest.py; the recorded /proc trees are in
tests/fixtures/proc.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uoomd.plan import (
    Amount,
    DaemonPlan,
    EscalationPlan,
    GuardPlan,
    HooksPlan,
    MatchPlan,
    Plan,
    PsiAction,
    PsiKind,
    PsiTriggerPlan,
    RulePlan,
    Scope,
    ScopeKind,
)
from uoomd.policy.automaton import compile_regex
from uoomd.readings import MemoryReading, Pid, ProcessInfo, ProcessKey, Snapshot, Uid
from uoomd.scoring import Badness, Candidate, Ranking

if TYPE_CHECKING:
    from tests.cgroups import ScratchCgroup

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "proc")
IDLE = os.path.join(FIXTURES, "idle")  # a recorded /proc of an idle machine
CHILDREN = os.path.join(FIXTURES, "children")  # the same with tests/fixtures/record_proc.py's children
PAGE = 4096
GIB = 1 << 30
MIB = 1 << 20
TOTAL_BYTES = 16 * GIB  # make_memory()'s machine


# --- processes and their ranking -------------------------------------------------------------


def make_process(pid: int, **overrides: Any) -> ProcessInfo:
    fields: dict[str, Any] = {
        "pid": Pid(pid),
        "ppid": Pid(1),
        "pgid": pid,
        "starttime_ticks": 1000 + pid,
        "name": f"proc{pid}",
        "state": "S",
        "uid": Uid(1000),
        "kthread": False,
        "has_mm": True,
        "oom_score_adj": 0,
        "rss_anon_bytes": 0,
        "rss_file_bytes": 0,
        "rss_shmem_bytes": 0,
        "swap_bytes": 0,
        "pgtables_bytes": 0,
        "mm_rss_pages": 0,
    }
    fields.update(overrides)
    return ProcessInfo(**fields)


def make_key(pid: int, starttime_ticks: int) -> ProcessKey:
    return ProcessKey(pid=Pid(pid), starttime_ticks=starttime_ticks)


def make_candidate(
    process: ProcessInfo,
    *,
    rss_pages: int,
    swap_pages: int = 0,
    pgtables_pages: int = 0,
    adj: int = 0,
    adj_points: int = 0,
    totalpages: int = 1_000_000,
    kernel_points: int | None = None,
    oom_score: int = 0,
    rules: tuple[str, ...] = (),
) -> Candidate:
    """A candidate with these badness terms; ``kernel_points`` defaults to its points, its
    effective adj is ``adj``."""
    badness = Badness(
        rss_pages=rss_pages,
        swap_pages=swap_pages,
        pgtables_pages=pgtables_pages,
        adj=adj,
        adj_points=adj_points,
        totalpages=totalpages,
    )
    return Candidate(
        process=process,
        badness=badness,
        kernel_points=badness.points if kernel_points is None else kernel_points,
        oom_score=oom_score,
        effective_adj=adj,
        rules=rules,
    )


def make_ranking(guard: str, *candidates: Candidate) -> Ranking:
    return Ranking(guard=guard, candidates=candidates, excluded=(), taken_at=0.0)


def make_snapshot(
    *processes: ProcessInfo,
    self_pid: int = 999_999,
    details: frozenset[str] = frozenset(),
    taken_at: float = 0.0,
    total_ram_bytes: int = 4 * GIB,
) -> Snapshot:
    return Snapshot(
        processes=processes,
        taken_at=taken_at,
        page_size=PAGE,
        total_ram_bytes=total_ram_bytes,
        total_swap_bytes=0,
        self_pid=Pid(self_pid),
        details=details,
    )


# --- readings --------------------------------------------------------------------------------


def make_memory(
    available_bytes: int,
    *,
    total_bytes: int = TOTAL_BYTES,
    swap_total_bytes: int = 0,
    swap_free_bytes: int = 0,
    refault_bytes: int | None = None,
    refaults_all: bool = False,
) -> MemoryReading:
    return MemoryReading(
        total_bytes=total_bytes,
        available_bytes=available_bytes,
        swap_total_bytes=swap_total_bytes,
        swap_free_bytes=swap_free_bytes,
        refault_bytes=refault_bytes,
        refaults_all=refaults_all,
    )


# --- plans -----------------------------------------------------------------------------------


def make_guard(name: str = "system", **overrides: Any) -> GuardPlan:
    """The system scope, term below 10 % available (and swap free), kill below 5 %."""
    fields: dict[str, Any] = {
        "name": name,
        "scope": Scope(kind=ScopeKind.SYSTEM),
        "mem_available_term": Amount(fraction=0.1),
        "mem_available_kill": Amount(fraction=0.05),
        "swap_free_term": Amount(fraction=0.1),
        "swap_free_kill": Amount(fraction=0.05),
    }
    fields.update(overrides)
    # As a policy compiles (policy/compile.py): where every refault counts, the same sustain unless told.
    fields.setdefault("psi_refault_sustain_all_s", fields.get("psi_refault_sustain_s", 0.0))
    return GuardPlan(**fields)


def make_psi_trigger(
    action: PsiAction,
    *,
    kind: PsiKind = PsiKind.FULL,
    stall_us: int = 200_000,
    window_us: int = 2_000_000,
    sustain_s: float = 0.0,
    gated: bool = True,
) -> PsiTriggerPlan:
    return PsiTriggerPlan(
        kind=kind, stall_us=stall_us, window_us=window_us, sustain_s=sustain_s, action=action, gated=gated
    )


def make_rule(
    index: int, *, protect: bool = False, adjust: int = 0, guards: tuple[str, ...] = (), **match: Any
) -> RulePlan:
    compiled: dict[str, Any] = {
        k: compile_regex(v) if k in ("name", "cmdline", "exe", "cgroup") else v for k, v in match.items()
    }
    return RulePlan(
        index=index, label=f"rule[{index}]", match=MatchPlan(**compiled), protect=protect, adjust=adjust, guards=guards
    )


def make_plan(
    *rules: RulePlan,
    guards: tuple[GuardPlan, ...] | None = None,
    daemon: DaemonPlan | None = None,
    escalation: EscalationPlan | None = None,
    hooks: HooksPlan | None = None,
    source: str = "<test>",
) -> Plan:
    return Plan(
        source=source,
        daemon=daemon or DaemonPlan(),
        escalation=escalation or EscalationPlan(),
        guards=guards if guards is not None else (make_guard(),),
        rules=rules,
        hooks=hooks or HooksPlan(),
    )


# --- policy files ----------------------------------------------------------------------------


def cgroup_policy(
    cg: ScratchCgroup,
    tmp_path: Path,
    *,
    name: str = "test",
    term: str = "30%",
    kill: str = "10%",
    term_timeout: str = "2s",
    kill_timeout: str = "3s",
    max_kills: int | None = 20,
    poll_max: str = "200ms",
    dry_run: bool = False,
    daemon_extra: str = "",
    guard_extra: str = "",
    extra: str = "",
) -> str:
    """The TOML of a policy with one guard on ``cg``, its state file in ``tmp_path``, JSON logs.

    ``daemon_extra`` goes inside [daemon] (metrics_file, ...), ``guard_extra`` inside the
    [[guard]] table, ``extra`` after it ([[rule]]s, [hooks]);
    ``max_kills`` None leaves max_kills_per_minute at the policy's default."""
    rate = "" if max_kills is None else f"max_kills_per_minute = {max_kills}\n"
    return f"""
[daemon]
dry_run = {str(dry_run).lower()}
poll_min = "10ms"
poll_max = "{poll_max}"
log_format = "json"
state_file = "{tmp_path}/state.json"
{daemon_extra}
[escalation]
term_timeout = "{term_timeout}"
kill_timeout = "{kill_timeout}"
{rate}
[[guard]]
name = "{name}"
scope = "cgroup:{cg.memory_path}"
mem_available_term = "{term}"
mem_available_kill = "{kill}"
{guard_extra}
{extra}
"""


def recorded_oom_score(root: str, pid: int) -> int:
    with open(os.path.join(root, str(pid), "oom_score")) as f:
        return int(f.read())


def recorded_children(root: str) -> list[int]:
    with open(os.path.join(root, "RECORDED")) as f:
        for line in f:
            if line.startswith("children:"):
                return [int(tok) for tok in line.split()[1:]]
    return []
