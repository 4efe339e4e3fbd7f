"""What executing an action came to: a closed set of outcomes and a frozen result the daemon logs as key/values."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """What happened to one action; a closed set the daemon and tests match on."""

    SENT = "sent"  # the signal was delivered (or cgroup.kill written)
    GONE = "gone"  # the process exited before we acted: good, nothing to do
    RECYCLED = "recycled"  # the PID now belongs to another process: nothing was sent
    REFUSED = "refused"  # a safety check (or the kernel, for process_mrelease) said no
    DRY_RUN = "dry_run"  # would have acted; sent nothing
    RELEASED = "released"  # process_mrelease() reaped the victim's memory
    NOT_SUPPORTED = "not_supported"  # the kernel or architecture lacks the call
    FAILED = "failed"  # an unexpected errno, a hook that exited non-zero or could not start
    STARTED = "started"  # a hook was started; its result comes from Executor.poll()
    COMPLETED = "completed"  # a hook exited 0
    TIMED_OUT = "timed_out"  # a hook outlived its timeout; its process group was killed


class ActionKind(StrEnum):
    SIGNAL = "signal"
    RELEASE = "release"
    CGROUP_KILL = "cgroup_kill"
    HOOK = "hook"


Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionResult:
    """The outcome of one action, with its facts as key/values (never formatted into a message)."""

    kind: ActionKind
    outcome: Outcome
    guard: str | None = None
    pid: int | None = None
    details: tuple[tuple[str, Scalar], ...] = ()

    def fields(self) -> dict[str, Scalar]:
        """Everything as one flat mapping, ready for ``log.info("action_executed", **fields)``."""
        out: dict[str, Scalar] = {"action": self.kind.value, "outcome": self.outcome.value}
        if self.guard is not None:
            out["guard"] = self.guard
        if self.pid is not None:
            out["pid"] = self.pid
        out.update(self.details)
        return out

    def detail(self, key: str) -> Scalar:
        return dict(self.details).get(key)


def make_result(
    kind: ActionKind, outcome: Outcome, *, pid: int | None = None, guard: str | None = None, **details: Scalar
) -> ActionResult:
    return ActionResult(kind=kind, outcome=outcome, pid=pid, guard=guard, details=tuple(details.items()))


def errno_result(kind: ActionKind, exc: OSError, *, pid: int | None = None, **details: Scalar) -> ActionResult:
    code = exc.errno or 0
    outcome = Outcome.GONE if code == errno.ESRCH else Outcome.FAILED
    details["errno"] = errno.errorcode.get(code, str(code))
    return ActionResult(kind=kind, outcome=outcome, pid=pid, details=tuple(details.items()))
