"""Carry out Action values: on the machine (LiveExecutor, through uoomd/kill.py), or only on record (RecordingExecutor).

Dispatch is a ``match`` on the action types of ``uoomd/actions.py``, ending in
``assert_never``: a new action is a type error until every executor handles it.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, replace
from typing import Protocol, assert_never

from uoomd.actions import Action, KillCgroup, ReleaseMemory, RunHook, SendSignal
from uoomd.cgroupkill import (
    DEFAULT_CGROUP_ROOTS,
    cgroup_kill_refusal,
    count_outside_group,
    resolve_cgroup_dir,
    signal_cgroup,
)
from uoomd.hooks import HookRunner
from uoomd.kill import (
    PidFd,
    open_victim,
    open_victim_checked,
    refusal_reason,
    release_memory,
    send_signal,
    signal_process_group,
    signame,
)
from uoomd.plan import VictimKind
from uoomd.readings import ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome, errno_result, make_result
from uoomd.sources.cgroup import read_members


def action_kind(action: Action) -> ActionKind:
    """The kind of result an action gives."""
    match action:
        case SendSignal():
            return ActionKind.SIGNAL
        case KillCgroup():
            return ActionKind.CGROUP_KILL
        case RunHook():
            return ActionKind.HOOK
        case ReleaseMemory():
            return ActionKind.RELEASE
        case _:
            assert_never(action)


class Executor(Protocol):
    """What the daemon needs of an executor: act, say whether a victim still runs, reap hooks, close."""

    def execute(self, action: Action) -> ActionResult: ...
    def alive(self, key: ProcessKey) -> bool: ...
    def keep_only(self, keys: frozenset[ProcessKey]) -> None: ...
    def poll(self, now: float | None = None) -> tuple[ActionResult, ...]: ...
    def victim_fds(self) -> tuple[int, ...]: ...
    def hooks_running(self) -> bool: ...
    def close(self) -> None: ...


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
        return result if result.guard is not None else replace(result, guard=action.guard)

    def _dispatch(self, action: Action) -> ActionResult:
        match action:
            case SendSignal():
                return self._signal(action)
            case KillCgroup():
                return self._kill_cgroup(action)
            case RunHook():
                handle = self.hooks.start(action.argv, action.env, time.monotonic(), action.timeout_s)
                if handle.result is not None:
                    return handle.result
                return make_result(ActionKind.HOOK, Outcome.STARTED, pid=handle.pid, argv0=action.argv[0])
            case ReleaseMemory():
                return self._release(action.target)
            case _:
                assert_never(action)

    def _signal(self, action: SendSignal) -> ActionResult:
        key, sig = action.target, action.signal
        reason = refusal_reason(key.pid)
        if reason is not None:
            return make_result(ActionKind.SIGNAL, Outcome.REFUSED, pid=key.pid, signal=signame(sig), reason=reason)
        if action.dry_run:
            opened = open_victim_checked(self.proc_root, key)
            if isinstance(opened, PidFd):
                opened.close()
                return make_result(
                    ActionKind.SIGNAL,
                    Outcome.DRY_RUN,
                    pid=key.pid,
                    signal=signame(sig),
                    victim=action.victim_kind.value,
                )
            return make_result(ActionKind.SIGNAL, Outcome(opened.value), pid=key.pid, signal=signame(sig))
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
            case _:
                assert_never(action.victim_kind)
        pidfd = self._tracked.get(key)
        if pidfd is None or pidfd.fd < 0:
            opened = open_victim_checked(self.proc_root, key)
            if not isinstance(opened, PidFd):
                return make_result(ActionKind.SIGNAL, Outcome(opened.value), pid=key.pid, signal=signame(sig))
            pidfd = opened
        result = send_signal(pidfd, sig)
        if result.outcome is Outcome.SENT:
            self._keep(pidfd)
        elif self._tracked.get(key) is not pidfd:
            pidfd.close()
        return result

    def _signal_victim_cgroup(self, action: SendSignal) -> ActionResult:
        # The victim stands for its cgroup: verify the victim first (a recycled PID must not make us
        # kill a cgroup), then signal the cgroup named in the action.
        key = action.target
        opened = open_victim_checked(self.proc_root, key)
        if not isinstance(opened, PidFd):
            return make_result(
                ActionKind.CGROUP_KILL, Outcome(opened.value), pid=key.pid, signal=signame(action.signal)
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

    def _kill_cgroup(self, action: KillCgroup) -> ActionResult:
        cgroup_dir = resolve_cgroup_dir(action.path, self.cgroup_roots)
        if cgroup_dir is None:
            return make_result(ActionKind.CGROUP_KILL, Outcome.REFUSED, cgroup=action.path, reason="not a cgroup")
        if action.dry_run:
            pids = read_members(cgroup_dir)
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

    Every action is answered with ``answer`` (a test of what follows a delivered signal sets
    SENT); ``alive()`` answers True for every key until a test calls ``mark_exited(key)``."""

    actions: list[Action] = field(default_factory=list)
    exited: set[ProcessKey] = field(default_factory=set)
    answer: Outcome = Outcome.DRY_RUN

    def execute(self, action: Action) -> ActionResult:
        self.actions.append(action)
        pid = action.target.pid if isinstance(action, SendSignal | ReleaseMemory) else None
        if isinstance(action, SendSignal):  # named as the live executor names it
            return make_result(
                action_kind(action), self.answer, pid=pid, guard=action.guard, signal=signame(action.signal)
            )
        return make_result(action_kind(action), self.answer, pid=pid, guard=action.guard)

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
