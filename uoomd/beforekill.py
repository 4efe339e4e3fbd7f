"""Hold a chosen victim's SIGTERM behind its before_kill hook until the hook exits or times out (pure bookkeeping).

The decision core returns a :class:`uoomd.actions.HoldForHook`: the hook to start, and what to
carry out once it is done (the SIGTERM, its desktop notice, the after_kill hook). The carrier
starts the hook and parks the rest here; at every tick it asks what is due:

- the hook exited (its result came back from the executor, matched by its pid): released;
- ``before_kill_timeout`` passed: released, whatever the hook is doing (the executor kills it);
- the guard's next signal comes first (the kill level was reached, or the term timeout): released
  at once, before that signal, so nothing waits at the kill level;
- the victim is no longer in flight (it exited on its own, left the scope, a reload dropped
  its guard): dropped, never sent.

Nothing here sleeps or reads a clock: ``now`` is the daemon's, so the loop never waits for a hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from uoomd.actions import Action, HoldForHook, Notify, SendSignal
from uoomd.readings import ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome


class Release(StrEnum):
    """Why a held SIGTERM went: the reason field of ``signal_released``."""

    HOOK_EXITED = "hook_exited"
    HOOK_TIMEOUT = "hook_timeout"
    HOOK_NOT_STARTED = "hook_not_started"  # it could not start (missing, refused): nothing to wait for
    NEXT_SIGNAL = "next_signal"  # the guard escalates (kill level, term timeout): the SIGTERM goes first


@dataclass(frozen=True, slots=True, kw_only=True)
class Held:
    """One SIGTERM waiting for its hook."""

    guard: str
    target: ProcessKey
    then: tuple[Action | Notify, ...]
    hook_pid: int | None
    held_at: float
    deadline: float
    tick_at: float  # the clock before the deciding tick's readings: a signal's latency is measured from it


class Holds:
    """The SIGTERMs held behind their before_kill hooks, one per guard at most."""

    def __init__(self) -> None:
        self._held: list[Held] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, item: HoldForHook, started: ActionResult, *, now: float, tick_at: float) -> Held | None:
        """Park ``item.then`` behind the hook ``started`` says is running; None (release now) when it is not."""
        if started.outcome is not Outcome.STARTED or started.pid is None:
            return None
        signal_act = next((a for a in item.then if isinstance(a, SendSignal)), None)
        assert signal_act is not None, "a HoldForHook holds a SendSignal"
        timeout_s = item.hook.timeout_s if item.hook.timeout_s is not None else 0.0
        held = Held(
            guard=item.guard,
            target=signal_act.target,
            then=item.then,
            hook_pid=started.pid,
            held_at=now,
            deadline=now + timeout_s,
            tick_at=tick_at,
        )
        self._held.append(held)
        return held

    def take_guard(self, guard: str) -> list[Held]:
        """The guard's next signal is about to go: what it holds goes first."""
        return self._take(lambda h: h.guard == guard)

    def take_finished(self, results: tuple[ActionResult, ...]) -> list[tuple[Held, Release]]:
        """Those whose hook is among these finished results (matched by pid), and why each goes: a
        hook the executor killed at its timeout is reaped a poll later, and timed out all the same."""
        done = {r.pid: r.outcome for r in results if r.kind is ActionKind.HOOK and r.pid is not None}
        return [
            (h, Release.HOOK_TIMEOUT if done[h.hook_pid] is Outcome.TIMED_OUT else Release.HOOK_EXITED)
            for h in self._take(lambda h: h.hook_pid in done)
            if h.hook_pid is not None
        ]

    def take_due(self, now: float) -> list[Held]:
        """Those whose hook has had its time."""
        return self._take(lambda h: now >= h.deadline)

    def take_unless(self, in_flight: frozenset[ProcessKey]) -> list[Held]:
        """Those whose victim the core no longer holds in flight: to drop, never to send."""
        return self._take(lambda h: h.target not in in_flight)

    def take_all(self) -> list[Held]:
        return self._take(lambda _h: True)

    def next_deadline(self) -> float | None:
        """When the loop must wake to release one (None: nothing held)."""
        return min((h.deadline for h in self._held), default=None)

    def _take(self, chosen: Callable[[Held], bool]) -> list[Held]:
        taken = [h for h in self._held if chosen(h)]
        if taken:
            self._held = [h for h in self._held if not chosen(h)]
        return taken
