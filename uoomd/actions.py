"""The decision core's requests as frozen values: what to do (actions), what to tell (notices), what to log (records).

As h11 keeps its events apart from its state machine, these are apart from ``decision.py``
(which makes them) and from ``executor.py`` (which carries them out): tests assert on them,
dry-run is just another executor, and every consumer matches on the real types.
"""

from __future__ import annotations

from dataclasses import dataclass

from uoomd.plan import VictimKind
from uoomd.readings import ProcessKey


@dataclass(frozen=True, slots=True, kw_only=True)
class SendSignal:
    """Signal a victim. ``victim_kind`` says how: the process alone, or each process of
    ``group`` (its process group ``pgid`` or its ``cgroup``, inside the scope), every one
    through its own verified pidfd."""

    guard: str
    target: ProcessKey
    signal: int
    victim_kind: VictimKind
    pgid: int
    cgroup: str | None
    dry_run: bool
    # For a process-group or cgroup victim: the processes it may signal, the target first:
    # the group's members in the guard's scope that no protect rule covers (Ranking.group_of).
    # Nothing outside it is ever signalled (never killpg(), which reaches every member).
    group: tuple[ProcessKey, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseMemory:
    """process_mrelease() the SIGKILLed target: reap its memory before it finishes exiting.

    The kernel refuses a process that is not already dying (mm/oom_kill.c
    process_mrelease(), Linux 6.18, -EINVAL unless task_will_free_mem()), so this only
    ever follows a SIGKILL (earlyoom#354)."""

    guard: str
    target: ProcessKey


@dataclass(frozen=True, slots=True, kw_only=True)
class KillCgroup:
    """Write 1 to the victim's ``cgroup.kill`` (or the executor's fallback where it does not exist)."""

    guard: str
    path: str
    dry_run: bool
    # The members that may be killed (see SendSignal.group): cgroup.kill only when the
    # cgroup holds nothing else, else each of these through its pidfd.
    group: tuple[ProcessKey, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHook:
    """Run a hook of ``plan.hooks`` (after_kill, before_kill) with the facts as UOOMD_* environment
    variables, never through a shell."""

    guard: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    timeout_s: float | None = None  # None: the executor's (hooks.timeout); before_kill has its own


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A structured log event: a snake_case name and its facts as key/values. Not an action: the
    daemon logs it, in its place among the actions it explains."""

    event: str
    fields: tuple[tuple[str, object], ...]

    def get(self, key: str) -> object:
        for name, value in self.fields:
            if name == key:
                return value
        raise KeyError(key)

    def as_dict(self) -> dict[str, object]:
        return dict(self.fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class Notify:
    """Tell the desktop's users that a victim was signalled, once ``after`` was delivered.

    The daemon's to carry out, not an executor's: a notice is a child of the loop, reaped by it,
    and it reports a signal, so the daemon sends it only when ``after`` came back SENT (a victim
    that had exited, or a dry run, gets none). Its text is made from ``record``, the victim_chosen."""

    guard: str
    after: SendSignal | KillCgroup
    record: Record


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifyWarning:
    """Tell the likely victim's owner (``uid``) that memory is low and the victim will be stopped
    if this goes on. Its text is made from ``record``, the warning (memory_warn, psi_warn)."""

    guard: str
    uid: int
    record: Record


Action = SendSignal | ReleaseMemory | KillCgroup | RunHook
"""What an executor carries out (``uoomd/executor.py``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HoldForHook:
    """Start ``hook`` (before_kill), and carry out ``then`` (the SIGTERM, its notice, what follows it)
    once the hook exits or after ``hook.timeout_s``, whichever is first; at once when the guard's
    next signal comes first (the kill level meanwhile). The loop never waits (uoomd/beforekill.py)."""

    guard: str
    hook: RunHook
    then: tuple[Action | Notify, ...]


Output = Action | Notify | NotifyWarning | HoldForHook | Record
"""What :func:`uoomd.decision.step` returns, in the order it happens: a decision's record first,
then its signal (held behind a before_kill hook: HoldForHook), the notice of that signal, then
the release and the hook."""
