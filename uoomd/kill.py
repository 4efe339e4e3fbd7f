"""Signal a process or its process group's members, or reap its memory, through verified pidfds.

This and uoomd/cgroupkill.py are the only code in uoomd that signals. Every primitive returns an
:class:`ActionResult` (a frozen value the daemon logs as key/values) and never raises for a
condition the machine can produce (a process that vanished, a recycled PID, an old kernel).
Identity is ``(pid, starttime)``: a victim is signalled only through a pidfd whose process was
verified *after* the pidfd was opened. A process-group or cgroup victim reaches only the
processes its action's ``group`` names (issue 11): never killpg(); a cgroup victim's members
are signalled from uoomd/cgroupkill.py, through the primitives here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypedDict

from uoomd.readings import ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome, errno_result, make_result
from uoomd.sources.procfs import read_stat

# --------------------------------------------------------------------------------------------
# pidfds


@dataclass(slots=True, kw_only=True)
class PidFd:
    """An open pidfd whose process was verified to be ``key``; owns the fd until close()."""

    fd: int
    key: ProcessKey
    pgid: int
    kthread: bool

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exited(self) -> bool:
        """True once the process has exited: the kernel makes a pidfd readable (POLLIN) then.

        kernel/pid.c pidfd_poll(), Linux 6.18: readable when the thread group has exited
        (also while it is a zombie not yet reaped by its parent)."""
        if self.fd < 0:
            return True
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def __enter__(self) -> PidFd:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class OpenFailure(StrEnum):
    GONE = "gone"
    RECYCLED = "recycled"


def open_victim_checked(proc_root: str, key: ProcessKey) -> PidFd | OpenFailure:
    """Open a pidfd for ``key`` and verify it is that process; say why not otherwise."""
    # Order matters. A pidfd refers to the process that held the PID when it was opened, for as
    # long as the fd lives: the PID cannot be handed to someone else *behind* an open pidfd. So we
    # open FIRST and only then re-read the start time: if /proc/PID/stat (read after the open)
    # still shows key.starttime_ticks, the process behind the pidfd is the victim, and every later
    # pidfd_send_signal() reaches it or nobody (ESRCH). Checking before opening would leave a
    # window in which the victim exits, the PID is recycled, and we open the newcomer.
    try:
        fd = os.pidfd_open(key.pid)
    except OSError as exc:
        # ESRCH: no such process. EINVAL: the PID is a thread, not a thread-group leader, so it is
        # not a process we ranked (ranking reads /proc/PID, which lists only leaders).
        if exc.errno in (errno.ESRCH, errno.EINVAL):
            return OpenFailure.GONE
        raise
    try:
        ident = read_stat(proc_root, key.pid)
    except BaseException:
        os.close(fd)
        raise
    if ident is None:
        os.close(fd)
        return OpenFailure.GONE
    if ident.starttime_ticks != key.starttime_ticks:
        os.close(fd)
        return OpenFailure.RECYCLED
    return PidFd(fd=fd, key=key, pgid=ident.pgid, kthread=ident.kthread)


def open_victim(proc_root: str, key: ProcessKey) -> PidFd | None:
    """A verified pidfd for ``key``, or None when the process vanished or its PID was recycled."""
    opened = open_victim_checked(proc_root, key)
    return opened if isinstance(opened, PidFd) else None


def refusal_reason(pid: int) -> str | None:
    """Why uoomd must never signal this PID, whatever the policy said (defence in depth)."""
    if pid <= 1:
        return "init" if pid == 1 else "invalid pid"
    if pid == os.getpid():
        return "self"
    if pid == os.getppid():
        return "parent"
    return None


def send_signal(pidfd: PidFd, sig: int) -> ActionResult:
    """pidfd_send_signal(); a vanished process is GONE, a forbidden one REFUSED, never an exception."""
    pid = pidfd.key.pid
    reason = refusal_reason(pid)
    if reason is None and pidfd.kthread:
        reason = "kernel thread"
    if reason is not None:
        return make_result(ActionKind.SIGNAL, Outcome.REFUSED, pid=pid, signal=signame(sig), reason=reason)
    try:
        signal.pidfd_send_signal(pidfd.fd, sig)
    except OSError as exc:
        return errno_result(ActionKind.SIGNAL, exc, pid=pid, signal=signame(sig))
    return make_result(ActionKind.SIGNAL, Outcome.SENT, pid=pid, signal=signame(sig))


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


# --------------------------------------------------------------------------------------------
# process_mrelease(2)

# include/uapi/asm-generic/unistd.h (aarch64, riscv64) and arch/x86/entry/syscalls/syscall_64.tbl:
# both 448 since Linux 5.15. Other machines: not_supported rather than a guessed number.
_MRELEASE_NR = {"x86_64": 448, "aarch64": 448, "riscv64": 448}
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded at import: not while memory is short


def process_mrelease_nr(machine: str | None = None) -> int | None:
    return _MRELEASE_NR.get(machine if machine is not None else os.uname().machine)


def _mrelease(nr: int, fd: int) -> int:
    """0 or the errno of one process_mrelease(fd, 0) call."""
    ret = _LIBC.syscall(ctypes.c_long(nr), ctypes.c_long(fd), ctypes.c_long(0))
    return 0 if ret == 0 else ctypes.get_errno()


def release_memory(pidfd: PidFd) -> ActionResult:
    """process_mrelease(pidfd, 0): reap a dying victim's memory now, not when its exit path gets to it.

    Only meaningful after SIGKILL. mm/oom_kill.c process_mrelease(), Linux 6.18: EINVAL when the
    task is not dying (!task_will_free_mem()), which is what earlyoom#354 saw after SIGTERM;
    ENOSYS on kernels before 5.15 (or without CONFIG_MMU).

    ESRCH comes in two kinds. After the exit it just means gone. But measured on this Linux 6.18
    VM (a C program and tests/hogs.py, 200 MiB-2 GiB victims): a call within some 50 µs of the
    SIGKILL reaped the memory (2 GiB in 88 ms, against ~240 ms for the exit path alone), while a
    later call often returned ESRCH with /proc still showing the victim running its exit, and
    retrying 5 times over 5 ms did not change that. We have not pinned the kernel path down, so
    the result says GONE with the errno, and the executor issues the call right after SIGKILL."""
    pid = pidfd.key.pid
    nr = process_mrelease_nr()
    if nr is None:
        return make_result(
            ActionKind.RELEASE, Outcome.NOT_SUPPORTED, pid=pid, errno="ENOSYS", machine=os.uname().machine
        )
    if pidfd.fd < 0:
        return make_result(ActionKind.RELEASE, Outcome.GONE, pid=pid)
    code = _mrelease(nr, pidfd.fd)
    if code == 0:
        return make_result(ActionKind.RELEASE, Outcome.RELEASED, pid=pid)
    name = errno.errorcode.get(code, str(code))
    if code == errno.ESRCH:
        return make_result(ActionKind.RELEASE, Outcome.GONE, pid=pid, errno=name)
    if code == errno.EINVAL:
        return make_result(ActionKind.RELEASE, Outcome.REFUSED, pid=pid, errno=name, reason="process is not dying")
    if code in (errno.ENOSYS, errno.EPERM):
        # EPERM: a seccomp filter without the call (earlyoom#315 had SIGSYS for the same reason).
        return make_result(ActionKind.RELEASE, Outcome.NOT_SUPPORTED, pid=pid, errno=name)
    return make_result(ActionKind.RELEASE, Outcome.FAILED, pid=pid, errno=name)


# --------------------------------------------------------------------------------------------
# Process groups


def pgid_refusal_reason(pgid: int) -> str | None:
    if pgid <= 1:
        return "init or invalid pgid"
    if pgid == os.getpgid(0):
        return "own process group"
    if pgid == os.getpgid(os.getppid()):
        return "parent's process group"
    return None


def signal_process_group(
    proc_root: str, key: ProcessKey, pgid: int, sig: int, group: Sequence[ProcessKey] = ()
) -> ActionResult:
    """Signal the keys of ``group`` (the victim alone when it is empty) that are still in ``pgid``,
    each through its own verified pidfd, once the pidfd of ``key`` verified the victim is alive and in ``pgid``.

    Never killpg(): it reaches every member of the group, in the guard's scope or not, protected
    or not (issue 11: a shell and a sleeper outside the guarded cgroup were killed)."""
    reason = refusal_reason(key.pid) or pgid_refusal_reason(pgid)
    if reason is not None:
        return make_result(
            ActionKind.SIGNAL, Outcome.REFUSED, pid=key.pid, pgid=pgid, signal=signame(sig), reason=reason
        )
    # The victim first: a recycled PID must not make us signal the group it named.
    opened = open_victim_checked(proc_root, key)
    if not isinstance(opened, PidFd):
        return make_result(ActionKind.SIGNAL, Outcome(opened.value), pid=key.pid, pgid=pgid, signal=signame(sig))
    with opened:
        if opened.kthread:
            return make_result(
                ActionKind.SIGNAL, Outcome.REFUSED, pid=key.pid, pgid=pgid, signal=signame(sig), reason="kernel thread"
            )
        if opened.pgid != pgid:
            return make_result(
                ActionKind.SIGNAL,
                Outcome.REFUSED,
                pid=key.pid,
                pgid=pgid,
                signal=signame(sig),
                reason="pgid changed",
                actual_pgid=opened.pgid,
            )
    # Each member's pgid was re-read from stat after its pidfd was opened (open_victim_checked):
    # a member that moved to another group since the ranking is left alone.
    counts = signal_members(proc_root, group or (key,), sig, lambda: lambda member: member.pgid == pgid)
    return make_result(
        ActionKind.SIGNAL,
        counts.outcome(),
        pid=key.pid,
        pgid=pgid,
        signal=signame(sig),
        method="pidfd",
        **counts.details(),
    )


# --------------------------------------------------------------------------------------------
# Group members: the processes a process-group or cgroup victim may signal, and no others


def open_members(proc_root: str, keys: Iterable[ProcessKey]) -> tuple[list[PidFd], list[Outcome]]:
    """Verified pidfds for those of ``keys`` that still run (each key once), and an outcome for each that does not."""
    opened: list[PidFd] = []
    missing: list[Outcome] = []
    try:
        for key in dict.fromkeys(keys):
            result = open_victim_checked(proc_root, key)
            if isinstance(result, PidFd):
                opened.append(result)
            else:
                missing.append(Outcome(result.value))
    except BaseException:
        close_all(opened)
        raise
    return opened, missing


def close_all(pidfds: Iterable[PidFd]) -> None:
    for pidfd in pidfds:
        pidfd.close()


def signal_members(
    proc_root: str, keys: Iterable[ProcessKey], sig: int, membership: Callable[[], Callable[[PidFd], bool]]
) -> MemberCounts:
    """Signal those of ``keys`` that are still members of the group, each through its verified pidfd.

    As in open_victim_checked: every pidfd is opened (and verified) first, and only then is
    ``membership()`` asked who is still a member, so what it reads is about the processes the
    pidfds hold."""
    opened, outcomes = open_members(proc_root, keys)
    try:
        outcomes += send_to_members(opened, sig, membership())
    finally:
        close_all(opened)
    return MemberCounts.of(outcomes)


def send_to_members(pidfds: Iterable[PidFd], sig: int, is_member: Callable[[PidFd], bool]) -> list[Outcome]:
    """Signal each pidfd whose process is still a member; one that left counts as gone, as if it had exited."""
    return [send_signal(pidfd, sig).outcome if is_member(pidfd) else Outcome.GONE for pidfd in pidfds]


class MemberDetails(TypedDict):
    sent: int
    gone: int
    refused: int
    failed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberCounts:
    """What a group signal came to, member by member: the result's details."""

    sent: int
    gone: int  # exited, PID recycled, or no longer a member: the process meant is not there
    refused: int
    failed: int

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> MemberCounts:
        sent = outcomes.count(Outcome.SENT)
        gone = outcomes.count(Outcome.GONE) + outcomes.count(Outcome.RECYCLED)
        refused = outcomes.count(Outcome.REFUSED)
        return cls(sent=sent, gone=gone, refused=refused, failed=len(outcomes) - sent - gone - refused)

    def details(self) -> MemberDetails:
        return {"sent": self.sent, "gone": self.gone, "refused": self.refused, "failed": self.failed}

    def outcome(self) -> Outcome:
        """SENT when any member got the signal; otherwise the most telling reason why none did."""
        if self.sent:
            return Outcome.SENT
        if self.failed:
            return Outcome.FAILED
        if self.refused:
            return Outcome.REFUSED
        return Outcome.GONE
