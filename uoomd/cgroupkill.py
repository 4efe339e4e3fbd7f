"""Signal a cgroup victim's group: cgroup.kill when the subtree holds nobody else, else each member by its pidfd.

A cgroup is written to only strictly below the cgroup roots, never the root cgroup or one
holding uoomd or init; the signal reaches only the processes the action's ``group`` names
(issue 11). The pidfd primitives are uoomd/kill.py's.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterable, Sequence

from uoomd.kill import PidFd, signal_members, signame
from uoomd.readings import Pid, ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome, errno_result, make_result
from uoomd.sources.cgroup import read_members
from uoomd.sources.procfs import read_stat

DEFAULT_CGROUP_ROOTS = ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def resolve_cgroup_dir(path: str, cgroup_roots: Iterable[str]) -> str | None:
    """The cgroup directory ``path`` names, strictly below one of ``cgroup_roots``; None otherwise.

    ``path`` may be a directory (``/sys/fs/cgroup/memory/app``) or a hierarchy path as in
    /proc/PID/cgroup (``/app``). Anything resolving outside the roots is refused: we write there."""
    for root in cgroup_roots:
        real_root = os.path.realpath(root)
        for candidate in (path, real_root + "/" + path.lstrip("/")):
            real = os.path.realpath(candidate)
            if real.startswith(real_root + "/") and os.path.isfile(os.path.join(real, "cgroup.procs")):
                return real
    return None


def cgroup_refusal_reason(cgroup_dir: str, cgroup_roots: Iterable[str], pids: Iterable[int]) -> str | None:
    real = os.path.realpath(cgroup_dir)
    if real in {os.path.realpath(r) for r in cgroup_roots} or os.path.ismount(real):
        return "root cgroup"
    members = set(pids)
    if os.getpid() in members:
        return "contains uoomd"
    if 1 in members:
        return "contains init"
    return None


def cgroup_kill_refusal(
    cgroup_dir: str, cgroup_roots: Iterable[str], pids: Iterable[int], group: Sequence[ProcessKey]
) -> str | None:
    """Why a cgroup must not be signalled: the checks above, and a group with nobody to signal,
    which must never widen to the whole cgroup."""
    return cgroup_refusal_reason(cgroup_dir, cgroup_roots, pids) or (None if group else "no eligible members")


def count_outside_group(proc_root: str, pids: Iterable[int], group: Iterable[ProcessKey]) -> int:
    """How many of the processes listed in a cgroup are not keys of ``group``: those a signal bound to
    the group leaves alone. A group's PID now held by another process counts as outside; one gone, not at all."""
    keys = set(group)
    outside = 0
    for pid in set(pids):
        ident = read_stat(proc_root, pid)
        if ident is not None and ProcessKey(pid=Pid(pid), starttime_ticks=ident.starttime_ticks) not in keys:
            outside += 1
    return outside


def signal_cgroup(
    proc_root: str, cgroup_dir: str, sig: int, cgroup_roots: Iterable[str], *, group: Sequence[ProcessKey]
) -> ActionResult:
    """Signal the processes of a cgroup subtree that are keys of ``group``, and no other.

    cgroup.kill (cgroup v2, Linux 5.14+) only for SIGKILL, and only when every process in the
    subtree is a key of the group: the kernel applies it to the whole subtree, new forks included
    (kernel/cgroup/cgroup.c cgroup_kill()), so it cannot spare a protected or out-of-scope member
    (issue 11). Otherwise (cgroup v1, another signal, someone to spare) each key through its pidfd."""
    roots = tuple(cgroup_roots)
    real = os.path.realpath(cgroup_dir)
    pids = read_members(real)
    reason = cgroup_kill_refusal(real, roots, pids, group)
    if reason is not None:
        return make_result(ActionKind.CGROUP_KILL, Outcome.REFUSED, cgroup=real, signal=signame(sig), reason=reason)
    skipped = count_outside_group(proc_root, pids, group)
    # A process that enters the subtree between this count and the write dies too. A fork of a
    # member inherits its cgroup, and catching those is what cgroup.kill is for; the pidfd path
    # would let a fork bomb outrun it.
    if sig == signal.SIGKILL and skipped == 0 and os.path.isfile(os.path.join(real, "cgroup.kill")):
        return write_cgroup_kill(real, members=len(pids))
    return signal_cgroup_members(proc_root, real, group, sig, members=len(pids), skipped=skipped)


def write_cgroup_kill(cgroup_dir: str, *, members: int) -> ActionResult:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.kill"), "w", encoding="ascii") as f:
            f.write("1")
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the cgroup was removed: its members are gone
            return make_result(ActionKind.CGROUP_KILL, Outcome.GONE, cgroup=cgroup_dir, signal="SIGKILL")
        return errno_result(ActionKind.CGROUP_KILL, exc, cgroup=cgroup_dir, signal="SIGKILL")
    return make_result(
        ActionKind.CGROUP_KILL,
        Outcome.SENT,
        cgroup=cgroup_dir,
        signal="SIGKILL",
        method="cgroup.kill",
        members=members,
        skipped=0,
    )


def signal_cgroup_members(
    proc_root: str, cgroup_dir: str, group: Sequence[ProcessKey], sig: int, *, members: int, skipped: int
) -> ActionResult:
    """Signal each key of ``group`` that is still in the cgroup subtree, through its own verified pidfd."""

    # A PID still listed after its pidfd was opened is the pidfd's process (a PID names one live
    # process at a time); a key that left the subtree is left alone.
    def still_listed() -> Callable[[PidFd], bool]:
        listed = read_members(cgroup_dir)
        return lambda member: member.key.pid in listed

    counts = signal_members(proc_root, group, sig, still_listed)
    return make_result(
        ActionKind.CGROUP_KILL,
        counts.outcome(),
        cgroup=cgroup_dir,
        signal=signame(sig),
        method="pidfd",
        members=members,
        skipped=skipped,
        **counts.details(),
    )
