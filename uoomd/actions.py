"""Carry out the decision core's Action values on the machine: the only code in uoomd that signals a process.

Every primitive returns an :class:`ActionResult` (a frozen value the daemon logs as key/values)
and never raises for a condition the machine can produce (a process that vanished, a recycled
PID, an old kernel, a hook that hangs). Identity is ``(pid, starttime)``: a victim is signalled
only through a pidfd whose process was verified *after* the pidfd was opened. A process-group or
cgroup victim reaches only the processes its action's ``group`` names (issue 11): never killpg(),
and cgroup.kill only when the cgroup holds nobody else.

The action types live in ``decision.py``; this module reads them by attribute through the small
Protocols below, so it depends on their shape, not on their module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from uoomd.hooks import HookRunner
from uoomd.plan import VictimKind
from uoomd.readings import Pid, ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome, Scalar, errno_result, make_result

# --------------------------------------------------------------------------------------------
# The shapes of the decision core's actions (uoomd/decision.py), read by attribute.


@runtime_checkable
class SignalAction(Protocol):
    @property
    def guard(self) -> str: ...
    @property
    def target(self) -> ProcessKey: ...
    @property
    def signal(self) -> int: ...
    @property
    def victim_kind(self) -> VictimKind: ...
    @property
    def pgid(self) -> int: ...
    @property
    def cgroup(self) -> str | None: ...
    @property
    def dry_run(self) -> bool: ...
    @property
    def group(self) -> tuple[ProcessKey, ...]: ...


@runtime_checkable
class ReleaseAction(Protocol):
    @property
    def guard(self) -> str: ...
    @property
    def target(self) -> ProcessKey: ...


@runtime_checkable
class CgroupKillAction(Protocol):
    @property
    def guard(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def dry_run(self) -> bool: ...
    @property
    def group(self) -> tuple[ProcessKey, ...]: ...


@runtime_checkable
class HookAction(Protocol):
    @property
    def guard(self) -> str: ...
    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def env(self) -> tuple[tuple[str, str], ...]: ...


@runtime_checkable
class RecordAction(Protocol):
    @property
    def event(self) -> str: ...
    @property
    def fields(self) -> object: ...


Action = SignalAction | ReleaseAction | CgroupKillAction | HookAction | RecordAction


def action_kind(action: object) -> ActionKind:
    """Which kind of action this is, by shape. Order matters: a SendSignal also has a ``target``."""
    if isinstance(action, SignalAction):
        return ActionKind.SIGNAL
    if isinstance(action, CgroupKillAction):
        return ActionKind.CGROUP_KILL
    if isinstance(action, HookAction):
        return ActionKind.HOOK
    if isinstance(action, ReleaseAction):
        return ActionKind.RELEASE
    if isinstance(action, RecordAction):
        return ActionKind.RECORD
    raise TypeError(f"not an action: {type(action).__name__}")


# --------------------------------------------------------------------------------------------
# /proc/PID/stat: the three facts the executor re-checks after opening a pidfd.

PF_KTHREAD = 0x00200000  # include/linux/sched.h, Linux 6.18


@dataclass(frozen=True, slots=True, kw_only=True)
class StatIdentity:
    starttime_ticks: int  # field 22
    pgid: int  # field 5
    kthread: bool  # field 9 (flags) & PF_KTHREAD
    state: str  # field 3


def parse_stat_identity(text: str) -> StatIdentity:
    """Parse /proc/PID/stat. comm may hold spaces and ')' (attacker-controlled): split after the *last* ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]. fs/proc/array.c do_task_stat(), Linux 6.18
    return StatIdentity(
        state=rest[0],
        pgid=int(rest[2]),
        kthread=bool(int(rest[6]) & PF_KTHREAD),
        starttime_ticks=int(rest[19]),
    )


def read_stat_identity(proc_root: str, pid: int) -> StatIdentity | None:
    """None when the process is gone (no file, or it vanished while we read)."""
    try:
        with open(f"{proc_root}/{pid}/stat", encoding="utf-8", errors="surrogateescape") as f:
            return parse_stat_identity(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise


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
        ident = read_stat_identity(proc_root, key.pid)
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
        return make_result(ActionKind.SIGNAL, Outcome.REFUSED, pid=pid, signal=_signame(sig), reason=reason)
    try:
        signal.pidfd_send_signal(pidfd.fd, sig)
    except OSError as exc:
        return errno_result(ActionKind.SIGNAL, exc, pid=pid, signal=_signame(sig))
    return make_result(ActionKind.SIGNAL, Outcome.SENT, pid=pid, signal=_signame(sig))


def _signame(sig: int) -> str:
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
            ActionKind.SIGNAL, Outcome.REFUSED, pid=key.pid, pgid=pgid, signal=_signame(sig), reason=reason
        )
    # The victim first: a recycled PID must not make us signal the group it named.
    opened = open_victim_checked(proc_root, key)
    if not isinstance(opened, PidFd):
        return make_result(ActionKind.SIGNAL, Outcome(opened.value), pid=key.pid, pgid=pgid, signal=_signame(sig))
    with opened:
        if opened.kthread:
            return make_result(
                ActionKind.SIGNAL, Outcome.REFUSED, pid=key.pid, pgid=pgid, signal=_signame(sig), reason="kernel thread"
            )
        if opened.pgid != pgid:
            return make_result(
                ActionKind.SIGNAL,
                Outcome.REFUSED,
                pid=key.pid,
                pgid=pgid,
                signal=_signame(sig),
                reason="pgid changed",
                actual_pgid=opened.pgid,
            )
    members, outcomes = open_members(proc_root, group or (key,))
    try:
        # Each member's pgid was re-read from stat after its pidfd was opened (open_victim_checked):
        # a member that moved to another group since the ranking is left alone.
        outcomes += send_to_members(members, sig, lambda member: member.pgid == pgid)
    finally:
        close_all(members)
    counts = MemberCounts.of(outcomes)
    return make_result(
        ActionKind.SIGNAL,
        counts.outcome(),
        pid=key.pid,
        pgid=pgid,
        signal=_signame(sig),
        method="pidfd",
        sent=counts.sent,
        gone=counts.gone,
        refused=counts.refused,
        failed=counts.failed,
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


def send_to_members(pidfds: Iterable[PidFd], sig: int, is_member: Callable[[PidFd], bool]) -> list[Outcome]:
    """Signal each pidfd whose process is still a member; one that left counts as gone, as if it had exited."""
    return [send_signal(pidfd, sig).outcome if is_member(pidfd) else Outcome.GONE for pidfd in pidfds]


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

    def outcome(self) -> Outcome:
        """SENT when any member got the signal; otherwise the most telling reason why none did."""
        if self.sent:
            return Outcome.SENT
        if self.failed:
            return Outcome.FAILED
        if self.refused:
            return Outcome.REFUSED
        return Outcome.GONE


# --------------------------------------------------------------------------------------------
# Cgroups

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


def read_cgroup_pids(cgroup_dir: str) -> list[int]:
    """PIDs in this cgroup and every cgroup below it (cgroup.kill kills the subtree too)."""
    pids: list[int] = []
    for dirpath, _dirs, files in os.walk(cgroup_dir):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs"), encoding="ascii") as f:
                pids.extend(int(line) for line in f if line.strip())
        except FileNotFoundError:
            continue  # a child cgroup removed while we walked
    return pids


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
        ident = read_stat_identity(proc_root, pid)
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
    pids = read_cgroup_pids(real)
    reason = cgroup_kill_refusal(real, roots, pids, group)
    if reason is not None:
        return make_result(ActionKind.CGROUP_KILL, Outcome.REFUSED, cgroup=real, signal=_signame(sig), reason=reason)
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
    # Same principle as open_victim_checked: open (and verify) every pidfd first, then re-read
    # the member list. A PID still listed after its pidfd was opened is the pidfd's process (a PID
    # names one live process at a time); a key that left the subtree is left alone.
    opened, outcomes = open_members(proc_root, group)
    try:
        listed = set(read_cgroup_pids(cgroup_dir))
        outcomes += send_to_members(opened, sig, lambda member: member.key.pid in listed)
    finally:
        close_all(opened)
    counts = MemberCounts.of(outcomes)
    return make_result(
        ActionKind.CGROUP_KILL,
        counts.outcome(),
        cgroup=cgroup_dir,
        signal=_signame(sig),
        method="pidfd",
        members=members,
        skipped=skipped,
        sent=counts.sent,
        gone=counts.gone,
        refused=counts.refused,
        failed=counts.failed,
    )


# --------------------------------------------------------------------------------------------
# Executors


class Executor(Protocol):
    def execute(self, action: Action) -> ActionResult: ...
    def alive(self, key: ProcessKey) -> bool: ...
    def keep_only(self, keys: frozenset[ProcessKey]) -> None: ...
    def poll(self, now: float | None = None) -> tuple[ActionResult, ...]: ...
    def victim_fds(self) -> tuple[int, ...]: ...
    def hooks_running(self) -> bool: ...
    def close(self) -> None: ...


def _record_details(fields: object) -> tuple[tuple[str, Scalar], ...]:
    items: Iterable[object]
    if isinstance(fields, Mapping):
        items = fields.items()
    elif isinstance(fields, tuple | list):
        items = fields
    else:
        return ()
    out: list[tuple[str, Scalar]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            key, value = item
            scalar = value if isinstance(value, str | int | float | bool) or value is None else str(value)
            out.append((str(key), scalar))
    return tuple(out)


def _record_result(action: RecordAction) -> ActionResult:
    return ActionResult(
        kind=ActionKind.RECORD,
        outcome=Outcome.RECORDED,
        details=(("event", action.event), *_record_details(action.fields)),
    )


class LiveExecutor:
    """Acts on the machine. Keeps the pidfds of signalled victims so alive() is a poll, not a /proc scan."""

    max_tracked = 64  # victims in flight are a handful; a cap keeps a bug from leaking fds

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        cgroup_roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS,
        hook_timeout_s: float = 10.0,
    ) -> None:
        self.proc_root = proc_root
        self.cgroup_roots = cgroup_roots
        self.hooks = HookRunner(hook_timeout_s)
        self._tracked: dict[ProcessKey, PidFd] = {}

    # -- actions

    def execute(self, action: Action) -> ActionResult:
        """Carry out one action. Never raises for the machine's conditions: an errno the primitives
        do not expect (EMFILE, EACCES on /proc, ...) becomes a FAILED result for the log."""
        kind = action_kind(action)
        try:
            result = self._dispatch(action)
        except OSError as exc:
            result = errno_result(kind, exc)  # ESRCH anywhere still reads as "gone"
        guard = getattr(action, "guard", None)
        if guard is not None and result.guard is None:
            result = ActionResult(
                kind=result.kind, outcome=result.outcome, guard=guard, pid=result.pid, details=result.details
            )
        return result

    def _dispatch(self, action: Action) -> ActionResult:
        if isinstance(action, SignalAction):
            return self._signal(action)
        if isinstance(action, CgroupKillAction):
            return self._kill_cgroup(action)
        if isinstance(action, HookAction):
            handle = self.hooks.start(action.argv, action.env, time.monotonic())
            if handle.result is not None:
                return handle.result
            return make_result(ActionKind.HOOK, Outcome.STARTED, pid=handle.pid, argv0=action.argv[0])
        if isinstance(action, ReleaseAction):
            return self._release(action.target)
        return _record_result(action)

    def _signal(self, action: SignalAction) -> ActionResult:
        key, sig = action.target, action.signal
        reason = refusal_reason(key.pid)
        if reason is not None:
            return make_result(ActionKind.SIGNAL, Outcome.REFUSED, pid=key.pid, signal=_signame(sig), reason=reason)
        if action.dry_run:
            opened = open_victim_checked(self.proc_root, key)
            if isinstance(opened, PidFd):
                opened.close()
                return make_result(
                    ActionKind.SIGNAL,
                    Outcome.DRY_RUN,
                    pid=key.pid,
                    signal=_signame(sig),
                    victim=action.victim_kind.value,
                )
            return make_result(ActionKind.SIGNAL, Outcome(opened.value), pid=key.pid, signal=_signame(sig))
        match action.victim_kind:
            case VictimKind.PROCESS:
                pass
            case VictimKind.PROCESS_GROUP:
                result = signal_process_group(self.proc_root, key, action.pgid, sig, action.group)
                if result.outcome is Outcome.SENT:
                    self._track(key)
                return result
            case VictimKind.CGROUP:
                return self._signal_victim_cgroup(action)
        pidfd = self._tracked.get(key)
        if pidfd is None or pidfd.fd < 0:
            opened = open_victim_checked(self.proc_root, key)
            if not isinstance(opened, PidFd):
                return make_result(ActionKind.SIGNAL, Outcome(opened.value), pid=key.pid, signal=_signame(sig))
            pidfd = opened
        result = send_signal(pidfd, sig)
        if result.outcome is Outcome.SENT:
            self._keep(pidfd)
        elif self._tracked.get(key) is not pidfd:
            pidfd.close()
        return result

    def _signal_victim_cgroup(self, action: SignalAction) -> ActionResult:
        # The victim stands for its cgroup: verify the victim first (a recycled PID must not make us
        # kill a cgroup), then signal the cgroup named in the action.
        key = action.target
        opened = open_victim_checked(self.proc_root, key)
        if not isinstance(opened, PidFd):
            return make_result(
                ActionKind.CGROUP_KILL, Outcome(opened.value), pid=key.pid, signal=_signame(action.signal)
            )
        if action.cgroup is None:
            opened.close()
            return make_result(ActionKind.CGROUP_KILL, Outcome.REFUSED, pid=key.pid, reason="no cgroup given")
        cgroup_dir = resolve_cgroup_dir(action.cgroup, self.cgroup_roots)
        if cgroup_dir is None:
            opened.close()
            return make_result(
                ActionKind.CGROUP_KILL, Outcome.REFUSED, pid=key.pid, cgroup=action.cgroup, reason="not a cgroup"
            )
        # An empty group (an older caller) means the victim alone: it must never widen to the cgroup.
        group = action.group or (key,)
        result = signal_cgroup(self.proc_root, cgroup_dir, action.signal, self.cgroup_roots, group=group)
        if result.outcome is Outcome.SENT:
            self._keep(opened)
        else:
            opened.close()
        return ActionResult(kind=result.kind, outcome=result.outcome, pid=key.pid, details=result.details)

    def _kill_cgroup(self, action: CgroupKillAction) -> ActionResult:
        cgroup_dir = resolve_cgroup_dir(action.path, self.cgroup_roots)
        if cgroup_dir is None:
            return make_result(ActionKind.CGROUP_KILL, Outcome.REFUSED, cgroup=action.path, reason="not a cgroup")
        if action.dry_run:
            pids = read_cgroup_pids(cgroup_dir)
            reason = cgroup_kill_refusal(cgroup_dir, self.cgroup_roots, pids, action.group)
            if reason is not None:
                return make_result(ActionKind.CGROUP_KILL, Outcome.REFUSED, cgroup=cgroup_dir, reason=reason)
            skipped = count_outside_group(self.proc_root, pids, action.group)
            return make_result(
                ActionKind.CGROUP_KILL, Outcome.DRY_RUN, cgroup=cgroup_dir, members=len(pids), skipped=skipped
            )
        return signal_cgroup(self.proc_root, cgroup_dir, signal.SIGKILL, self.cgroup_roots, group=action.group)

    def _release(self, key: ProcessKey) -> ActionResult:
        pidfd = self._tracked.get(key)
        if pidfd is not None:
            return release_memory(pidfd)
        opened = open_victim_checked(self.proc_root, key)
        if not isinstance(opened, PidFd):
            return make_result(ActionKind.RELEASE, Outcome(opened.value), pid=key.pid)
        with opened:
            return release_memory(opened)

    # -- victim tracking

    def _track(self, key: ProcessKey) -> None:
        opened = open_victim(self.proc_root, key)
        if opened is not None:
            self._keep(opened)

    def _keep(self, pidfd: PidFd) -> None:
        old = self._tracked.pop(pidfd.key, None)
        if old is not None and old is not pidfd:
            old.close()
        self._tracked[pidfd.key] = pidfd
        while len(self._tracked) > self.max_tracked:
            oldest = next(iter(self._tracked))
            self._tracked.pop(oldest).close()

    def alive(self, key: ProcessKey) -> bool:
        """Whether the process ``key`` still runs. Tracked victims: one poll() on the pidfd."""
        pidfd = self._tracked.get(key)
        if pidfd is None:
            opened = open_victim(self.proc_root, key)
            if opened is None:
                return False
            with opened:
                return not opened.exited()
        if pidfd.exited():
            self._tracked.pop(key).close()
            return False
        return True

    def keep_only(self, keys: frozenset[ProcessKey]) -> None:
        """Close the pidfds of victims no longer in flight (the core dropped them: left the
        scope, stuck, a reload): one leaked per victim otherwise, until max_tracked."""
        for key in [k for k in self._tracked if k not in keys]:
            self._tracked.pop(key).close()

    def tracked(self) -> frozenset[ProcessKey]:
        return frozenset(self._tracked)

    def victim_fds(self) -> tuple[int, ...]:
        """The pidfds of victims in flight: they poll readable when the victim exits, so the loop wakes at once."""
        return tuple(pidfd.fd for pidfd in self._tracked.values())

    def hooks_running(self) -> bool:
        return self.hooks.next_deadline() is not None

    def poll(self, now: float | None = None) -> tuple[ActionResult, ...]:
        """Results of hooks that finished (or were killed) since the last poll."""
        return self.hooks.poll(time.monotonic() if now is None else now)

    def close(self) -> None:
        for pidfd in self._tracked.values():
            pidfd.close()
        self._tracked.clear()


@dataclass(slots=True)
class RecordingExecutor:
    """Records actions and sends nothing: for decision tests and dry-run.

    ``alive()`` answers True for every key until a test calls ``mark_exited(key)``."""

    actions: list[Action] = field(default_factory=list)
    exited: set[ProcessKey] = field(default_factory=set)

    def execute(self, action: Action) -> ActionResult:
        self.actions.append(action)
        kind = action_kind(action)
        if isinstance(action, RecordAction) and kind is ActionKind.RECORD:
            return _record_result(action)
        pid: int | None = None
        if isinstance(action, SignalAction | ReleaseAction):
            pid = action.target.pid
        return make_result(kind, Outcome.DRY_RUN, pid=pid, guard=getattr(action, "guard", None))

    def mark_exited(self, key: ProcessKey) -> None:
        self.exited.add(key)

    def alive(self, key: ProcessKey) -> bool:
        return key not in self.exited

    def keep_only(self, keys: frozenset[ProcessKey]) -> None:
        return None

    def poll(self, now: float | None = None) -> tuple[ActionResult, ...]:
        return ()

    def victim_fds(self) -> tuple[int, ...]:
        return ()

    def hooks_running(self) -> bool:
        return False

    def close(self) -> None:
        return None


_ = Pid  # ProcessKey.pid is a Pid; re-exported for callers building keys
