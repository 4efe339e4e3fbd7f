"""Builders for processes, plans and snapshots, and the recorded /proc trees (tests only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from uoomd.plan import Amount, DaemonPlan, EscalationPlan, GuardPlan, MatchPlan, Plan, RulePlan, Scope, ScopeKind
from uoomd.policy.automaton import compile_regex
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
        k: compile_regex(v) if k in ("name", "cmdline", "exe", "cgroup") else v for k, v in match.items()
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


# --- live children for integration tests ---------------------------------------------------

CHILD_SCRIPT = """
import mmap, sys, time
mib, adj, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(adj)
except PermissionError:
    pass  # lowering oom_score_adj needs CAP_SYS_RESOURCE; the test reads back what was set
with open("/proc/self/comm", "w") as f:
    f.write(name)
# Private and anonymous: RssAnon, what the tests assert (a bare mmap(-1) is a shared
# mapping, counted as RssShmem; it passed only where the interpreter's own anon memory
# made up the difference)
buf = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(buf), 4096):
    buf[i] = 1
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(600)
"""

# (MiB, oom_score_adj, name): 1000 MiB in total
HOG_SPECS = (
    (300, -1000, "uoomd-t-min"),
    (250, -500, "uoomd-t-neg"),
    (200, 0, "uoomd-t-zero"),
    (150, 500, "uoomd-t-pos"),
    (100, 1000, "uoomd-t-max"),
)


def start_children(specs: tuple[tuple[int, int, str], ...] = HOG_SPECS) -> list[subprocess.Popen[bytes]]:
    """Start the hogs and wait until each touched its memory; the caller stops them with stop_children()."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        for mib, adj, name in specs:
            children.append(
                subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, str(mib), str(adj), name], stdout=subprocess.PIPE)
            )
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline() != b"ready\n":
                raise RuntimeError(f"child {child.pid} failed to start")
    except BaseException:
        stop_children(children)
        raise
    return children


def stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL our own children, by PID, and reap them."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
