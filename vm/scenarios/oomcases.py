"""The memory-pressure cases the machine and cgroup scenarios share, for uoomd and for the peers.

A case starts hogs, waits until every one has ended (or a limit), and records who died: the
hogs (and by which signal), the protected holder service, sshd, the daemon itself, any other
long-lived process, and whether the kernel's own OOM killer fired (/proc/vmstat oom_kill, or
memory.events oom_kill for a cgroup). The verdicts live in the host's tests; this records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestlib import (
    Hog,
    Scenario,
    alive,
    dmesg_oom_lines,
    kernel_oom_kills,
    mark,
    mem_available_bytes,
    show,
    uoomd_events,
    wait_until,
)

# A hog grows 16 MiB at a time, as fast as the emulated CPU lets it (~100-150 MiB/s here):
# far below what real hardware does, which the 5-10x slower daemon has to match.
GROW = ("--mib-per-step", "16", "--interval-ms", "100", "--max-mib", "4000", "--hold")
# uoomd ends every case here within ~20 s; a daemon that does not act leaves the machine
# thrashing until the kernel's OOM killer fires, which took up to 3 minutes (systemd-oomd).
CASE_LIMIT_S = 75.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    name: str
    hogs: tuple[tuple[str, tuple[str, ...]], ...]  # (unit, extra hogs.py arguments)


CASES = {
    "cooperative": Case(name="cooperative", hogs=(("hog-coop", ("--name", "hogcoop")),)),
    "ignore-term": Case(name="ignore-term", hogs=(("hog-stubborn", ("--name", "hogstubborn", "--ignore-term")),)),
    "forking": Case(name="forking", hogs=(("hog-fork", ("--name", "hogfork", "--fork", "4")),)),
    "two-hogs": Case(name="two-hogs", hogs=(("hog-a", ("--name", "hoga")), ("hog-b", ("--name", "hogb")))),
}


def long_lived(min_age_s: float = 10.0) -> dict[int, str]:
    """Processes running for at least ``min_age_s``, by PID: comm (kernel threads left out).
    Younger ones are workers that come and go on their own (udev, userdb, our commands)."""
    ticks = os.sysconf("SC_CLK_TCK")
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if not Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        started_s = int(fields[19]) / ticks  # field 22, starttime (proc_pid_stat(5))
        if uptime_s - started_s >= min_age_s:
            found[int(entry)] = comm
    return found


def memcg_oom_kills(cgroup: str) -> int:
    try:
        text = Path(cgroup, "memory.events").read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return -1


def run_case(
    sc: Scenario,
    case: Case,
    *,
    daemon_unit: str,
    watch: dict[str, int],
    slice_name: str = "",
    cgroup: str = "",
    grow: Sequence[str] = GROW,
    limit_s: float = CASE_LIMIT_S,
) -> dict[str, Any]:
    """Run one case; ``watch`` names the processes that must survive (name -> PID)."""
    before = long_lived()
    oom0 = kernel_oom_kills()
    memcg0 = memcg_oom_kills(cgroup) if cgroup else None
    dmesg0 = len(dmesg_oom_lines())
    daemon_pid = int(show(daemon_unit, "MainPID").get("MainPID", "0"))
    since = mark()
    t0 = time.monotonic()
    hogs = [Hog(sc, unit, *grow, *extra, slice_name=slice_name) for unit, extra in case.hogs]
    hog_pids = {h.pid for h in hogs}
    baseline = lowest = mem_available_bytes()

    def all_ended() -> bool:
        nonlocal lowest
        lowest = min(lowest, mem_available_bytes())
        return all(h.ended() for h in hogs)

    ended = bool(wait_until(all_ended, limit_s, 0.5))
    took = time.monotonic() - t0
    record: dict[str, Any] = {
        "case": case.name,
        "ended": ended,
        "s": round(took, 1),
        "lowest_mem_available_mib": lowest >> 20,
        "hogs": [h.outcome() for h in hogs],
        "hog_children": {h.unit: [h.events(f".{i}") for i in range(4)] for h in hogs},
    }
    for h in hogs:  # a hog still growing after the limit is the daemon's failure: stop it now
        h.stop()
    # Back to where the case started (less 64 MiB of page cache and slack) before the next one.
    wait_until(lambda: mem_available_bytes() > baseline - (64 << 20), 60, 0.5)
    time.sleep(0.5)  # the last exits reaped, before the survivors are counted
    after = long_lived()
    record["kernel_oom_kills"] = kernel_oom_kills() - oom0
    record["dmesg_oom"] = dmesg_oom_lines()[dmesg0:]
    if cgroup:
        record["memcg_oom_kills"] = memcg_oom_kills(cgroup) - (memcg0 or 0)
    record["survivors"] = {name: alive(pid) for name, pid in watch.items()}
    record["watched"] = dict(watch)
    record["daemon_pid_before"] = daemon_pid
    record["daemon_pid_after"] = int(show(daemon_unit, "MainPID").get("MainPID", "0"))
    # Long-lived processes that vanished and were neither hogs nor their children: collateral.
    hog_names = {"hogcoop", "hogstubborn", "hogfork", "hoga", "hogb", "cghog", "cgbystander", "psihog", "svchog"}
    record["vanished"] = sorted(
        f"{pid}:{comm}"
        for pid, comm in before.items()
        if pid not in after and pid not in hog_pids and comm not in hog_names and comm not in ("systemctl", "sleep")
    )
    if daemon_unit == "uoomd.service":
        record["uoomd"] = [
            {
                k: e.get(k)
                for k in ("event", "guard", "pid", "name", "action", "trigger", "outcome", "cgroup", "over_rate_limit")
            }
            for e in uoomd_events(since=since)
            if e["event"] in ("victim_chosen", "victim_escalated", "action_result", "no_candidate", "rate_limited")
        ]
    sc.note(f"case {case.name}: ended {ended} in {took:.1f} s, kernel oom kills {record['kernel_oom_kills']}")
    return record


def hog_died_by(outcome: dict[str, Any]) -> str:
    """How a hog's main process ended, from systemd's view: 'code:N', 'signal:N' or 'running'."""
    if outcome.get("ExecMainCode") == "1":  # CLD_EXITED
        return f"code:{outcome.get('ExecMainStatus')}"
    if outcome.get("ExecMainCode") in ("2", "3"):  # CLD_KILLED, CLD_DUMPED
        return f"signal:{outcome.get('ExecMainStatus')}"
    return "running"
