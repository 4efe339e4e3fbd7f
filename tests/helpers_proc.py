"""Builders for processes, plans and snapshots, and the recorded /proc trees (tests only)."""

from __future__ import annotations

import os
import re
from typing import Any

from uoomd.plan import Amount, DaemonPlan, EscalationPlan, GuardPlan, MatchPlan, Plan, RulePlan, Scope, ScopeKind
from uoomd.readings import Pid, ProcessInfo, Snapshot, Uid

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "proc")
IDLE = os.path.join(FIXTURES, "idle")
CHILDREN = os.path.join(FIXTURES, "children")
PAGE = 4096
GIB = 1 << 30


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


def make_guard(name: str = "system", **overrides: Any) -> GuardPlan:
    fields: dict[str, Any] = {
        "name": name,
        "scope": Scope(kind=ScopeKind.SYSTEM),
        "mem_available_term": Amount(fraction=0.1),
        "mem_available_kill": Amount(fraction=0.05),
        "swap_free_term": Amount(fraction=0.1),
        "swap_free_kill": Amount(fraction=0.05),
    }
    fields.update(overrides)
    return GuardPlan(**fields)


def make_rule(
    index: int, *, protect: bool = False, adjust: int = 0, guards: tuple[str, ...] = (), **match: Any
) -> RulePlan:
    compiled: dict[str, Any] = {
        k: re.compile(v) if k in ("name", "cmdline", "exe", "cgroup") else v for k, v in match.items()
    }
    return RulePlan(
        index=index, label=f"rule[{index}]", match=MatchPlan(**compiled), protect=protect, adjust=adjust, guards=guards
    )


def make_plan(*rules: RulePlan, guards: tuple[GuardPlan, ...] | None = None) -> Plan:
    return Plan(
        source="<test>",
        daemon=DaemonPlan(),
        escalation=EscalationPlan(),
        guards=guards if guards is not None else (make_guard(),),
        rules=rules,
    )


def make_snapshot(*processes: ProcessInfo, self_pid: int = 999_999, details: frozenset[str] = frozenset()) -> Snapshot:
    return Snapshot(
        processes=processes,
        taken_at=0.0,
        page_size=PAGE,
        total_ram_bytes=4 * GIB,
        total_swap_bytes=0,
        self_pid=Pid(self_pid),
        details=details,
    )


def recorded_oom_score(root: str, pid: int) -> int:
    with open(os.path.join(root, str(pid), "oom_score")) as f:
        return int(f.read())


def recorded_children(root: str) -> list[int]:
    with open(os.path.join(root, "RECORDED")) as f:
        for line in f:
            if line.startswith("children:"):
                return [int(tok) for tok in line.split()[1:]]
    return []
