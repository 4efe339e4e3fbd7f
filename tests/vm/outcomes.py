"""Verdicts on one recorded case (vm/scenarios/oomcases.py), the same for uoomd and the peers.

Who stopped what is read from what each side leaves: the kernel names its kills in dmesg
("Killed process PID"), a hog records the SIGTERM it got, systemd and a forking hog's parent
record how a process ended. A hog that died by a signal the kernel did not send was stopped
by the daemon (nothing else in the guest signals it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_KERNEL_KILL = re.compile(r"Killed process (\d+) \(([^)]*)\)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    stopped_before_kernel: bool  # every hog ended, and the kernel's OOM killer never fired
    right_process: bool | None  # all the daemon stopped were hogs; None: it stopped nothing
    kernel_acted: bool
    protected_died: list[str]  # the holder service (when protected) or sshd, if either died
    others_died: list[str]  # other long-lived processes that vanished ("PID:comm"), by whatever
    detail: str

    def cells(self) -> tuple[str, str, str, str]:
        right = "yes" if self.right_process else "no"
        if self.right_process is None:
            right = "n/a (the kernel acted)" if self.kernel_acted else "n/a (did not act)"
        died = ("yes: " + ", ".join(self.protected_died)) if self.protected_died else "no"
        others = ", ".join(self.others_died) or "none"
        return ("yes" if self.stopped_before_kernel else "no", right, died, others)


def hog_pids(case: dict[str, Any]) -> set[int]:
    """The hogs' main PIDs and the PIDs of the children a forking hog recorded."""
    pids = {int(h["pid"]) for h in case["hogs"]}
    for hog in case["hogs"]:
        pids |= {int(e[2]) for e in hog["events"] if e[0] == "CHILD"}
    return pids


def kernel_killed(case: dict[str, Any]) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for line in case["dmesg_oom"] for m in [_KERNEL_KILL.search(line)] if m}


def stopped_by_daemon(case: dict[str, Any]) -> set[int]:
    """Hog processes that got SIGTERM, or died by a signal the kernel did not send."""
    by_kernel = set(kernel_killed(case))
    stopped: set[int] = set()
    for hog in case["hogs"]:
        pid = int(hog["pid"])
        events = hog["events"]
        unit_pids = {pid} | {int(e[2]) for e in events if e[0] == "CHILD"}
        if unit_pids & by_kernel:
            # After a kernel OOM kill in a unit systemd stops the rest of it (OOMPolicy=stop,
            # the default): its other deaths are systemd's, not the daemon's.
            continue
        if any(e[0] == "SIGTERM" for e in events):
            stopped.add(pid)
        if hog.get("ExecMainCode") in ("2", "3") and pid not in by_kernel:  # CLD_KILLED, CLD_DUMPED
            stopped.add(pid)
        children = case.get("hog_children", {}).get(hog["unit"], [])
        for index, child_events in enumerate(children):
            child = next((int(e[2]) for e in events if e[0] == "CHILD" and e[3] == str(index)), None)
            if child is not None and any(e[0] == "SIGTERM" for e in child_events):
                stopped.add(child)
        for e in events:
            if e[0] == "EXIT" and e[3].startswith("signal:") and int(e[2]) not in by_kernel:
                stopped.add(int(e[2]))
    return stopped


def judge(case: dict[str, Any]) -> Verdict:
    kernel = case["kernel_oom_kills"] > 0 or case.get("memcg_oom_kills", 0) > 0
    stopped = bool(case["ended"]) and not kernel
    survivors: dict[str, bool] = case["survivors"]
    watched = [name for name in survivors if name != "holder" or case.get("holder_protected", True)]
    died = [name for name in watched if not survivors[name]]
    hogs = hog_pids(case)
    by_kernel = kernel_killed(case)
    by_daemon = stopped_by_daemon(case)
    # A watched process gone without a kernel kill naming it: the daemon's doing.
    watched_pids: dict[str, int] = case.get("watched", {})
    collateral = [n for n, alive in survivors.items() if not alive and watched_pids.get(n) not in by_kernel]
    wrong = [v["pid"] for v in case.get("uoomd", []) if v["event"] == "victim_chosen" and v["pid"] not in hogs]
    right: bool | None = None
    if by_daemon or wrong or collateral:
        right = not wrong and not collateral and by_daemon <= hogs
    detail = (
        f"{case['case']}: ended={case['ended']} in {case['s']} s, kernel oom_kill {case['kernel_oom_kills']}"
        f"{', memcg oom_kill ' + str(case['memcg_oom_kills']) if 'memcg_oom_kills' in case else ''}"
        f" {by_kernel}, stopped by the daemon {sorted(by_daemon)}, survivors {survivors}, vanished "
        f"{case['vanished']}, uoomd victims not hogs {wrong}, lowest MemAvailable "
        f"{case['lowest_mem_available_mib']} MiB"
    )
    # Processes named "(...)" are systemd's and udev's short-lived workers: they end on their
    # own; the watched ones have their own column.
    watched_set = set(watched_pids.values())
    others = [
        v
        for v in case["vanished"]
        if not v.split(":", 1)[1].startswith("(") and int(v.split(":", 1)[0]) not in watched_set
    ]
    return Verdict(
        stopped_before_kernel=stopped,
        right_process=right,
        kernel_acted=kernel,
        protected_died=died,
        others_died=others,
        detail=detail,
    )
