"""Carry out one step's outputs in their order: records logged, actions executed, a notice sent once its signal was,
a SIGTERM held behind its before_kill hook (uoomd/beforekill.py) released when the hook is done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, assert_never

from uoomd.actions import (
    Action,
    HoldForHook,
    KillCgroup,
    Notify,
    NotifyWarning,
    Output,
    Record,
    ReleaseMemory,
    RunHook,
    SendSignal,
)
from uoomd.beforekill import Held, Holds, Release
from uoomd.executor import Executor
from uoomd.logs import Log
from uoomd.readings import ProcessKey
from uoomd.results import ActionResult, Outcome
from uoomd.statusboard import Recent


class Notices(Protocol):
    """What the loop needs of its desktop notices (uoomd/desktop.py DesktopNotices, or a test's)."""

    @property
    def running(self) -> int: ...
    def notify(self, summary: str, body: str, *, now: float, uid: int | None = None) -> None: ...
    def poll(self, now: float) -> None: ...
    def close(self) -> None: ...


class Carrier:
    """The daemon's hands: executes what decision.step() returned, logs it, and lists it in ``recent``."""

    def __init__(
        self,
        *,
        executor: Executor,
        log: Log,
        recent: Recent,
        clock: Callable[[], float],
        forget: Callable[[ProcessKey], None],
    ) -> None:
        """``forget``: drop a victim that is not there to signal from the warm ranking."""
        self.executor = executor
        self.log = log
        self.recent = recent
        self.clock = clock
        self.forget = forget
        self.desktop: Notices | None = None  # created at the first notice
        self.holds = Holds()

    def carry_out(self, outputs: list[Output] | tuple[Action | Notify, ...], *, tick_at: float) -> None:
        """In order: log each record, execute each action, send each notice whose signal was delivered,
        hold a SIGTERM behind its before_kill hook. ``tick_at``: the clock before this tick's readings,
        which a signal's log measures from."""
        delivered: dict[Action, Outcome] = {}
        for item in outputs:
            match item:
                case Record():
                    self.log_record(item)
                case Notify():
                    if delivered.get(item.after) is Outcome.SENT:
                        self._notice_desktop(item.record)
                case NotifyWarning():
                    self._warn_desktop(item)
                case HoldForHook():
                    self._hold(item, tick_at)
                case SendSignal() | KillCgroup():
                    # The guard's next signal (the kill level, the term timeout): its held SIGTERM goes first.
                    for held in self.holds.take_guard(item.guard):
                        self._release(held, Release.NEXT_SIGNAL)
                    delivered[item] = self._execute(item, tick_at)
                case ReleaseMemory() | RunHook():
                    delivered[item] = self._execute(item, tick_at)
                case _:
                    assert_never(item)

    def poll(self, now: float, *, in_flight: frozenset[ProcessKey]) -> None:
        """Once a tick: log what the executor's hooks came to, release the SIGTERMs whose before_kill
        hook is done or out of time, drop those whose victim the core no longer holds."""
        results = self.executor.poll(now)
        for result in results:
            self.log_result(result)
        for held in self.holds.take_unless(in_flight):
            self._drop(held, "victim no longer in flight")
        for held in self.holds.take_due(now):
            self._release(held, Release.HOOK_TIMEOUT)
        for held, why in self.holds.take_finished(results):
            self._release(held, why)

    def next_release(self) -> float | None:
        """When a held SIGTERM is due at the latest (the loop wakes then); None: nothing held."""
        return self.holds.next_deadline()

    def close(self) -> None:
        """The daemon stops: a SIGTERM still held is never sent."""
        for held in self.holds.take_all():
            self._drop(held, "daemon stopping")

    def _hold(self, item: HoldForHook, tick_at: float) -> None:
        # Held from before the hook is spawned: the executor's own timeout counts from its spawn, so a
        # release at that timeout is never measured as shorter than it.
        asked = self.clock()
        started = self._run(item.hook, tick_at)
        now = self.clock()
        held = self.holds.hold(item, started, now=asked, tick_at=tick_at)
        if held is None:
            self.log.warning("signal_released", guard=item.guard, reason=str(Release.HOOK_NOT_STARTED), held_s=0.0)
            self.carry_out(item.then, tick_at=tick_at)
            return
        self.log.info(
            "signal_held",
            guard=held.guard,
            pid=int(held.target.pid),
            hook_pid=held.hook_pid,
            timeout_s=round(held.deadline - now, 3),
        )

    def _release(self, held: Held, reason: Release) -> None:
        held_s = round(self.clock() - held.held_at, 3)
        self.log.info("signal_released", guard=held.guard, pid=int(held.target.pid), reason=str(reason), held_s=held_s)
        self.carry_out(held.then, tick_at=held.tick_at)

    def _drop(self, held: Held, reason: str) -> None:
        self.log.info("held_signal_dropped", guard=held.guard, pid=int(held.target.pid), reason=reason)

    def _execute(self, action: Action, tick_at: float) -> Outcome:
        return self._run(action, tick_at).outcome

    def _run(self, action: Action, tick_at: float) -> ActionResult:
        result = self.executor.execute(action)
        if isinstance(action, SendSignal):
            # Detect -> signal: from the reading that crossed (this tick's) to the signal sent.
            since_ms = round((self.clock() - tick_at) * 1000, 3)
            result = replace(result, details=(*result.details, ("since_reading_ms", since_ms)))
        self.log_result(result)
        if isinstance(action, SendSignal) and result.outcome in (Outcome.GONE, Outcome.RECYCLED):
            # The victim is not there to signal: drop it from the warm ranking so the next
            # step does not choose it again.
            self.forget(action.target)
        return result

    def _notice_desktop(self, chosen: Record) -> None:
        """One desktop notice per victim, at its first signal; children, never a blocking call."""
        # Imported here: only desktop policies pay its memory (0.6 MiB RSS measured).
        from uoomd.desktop import DesktopNotices, kill_notice  # noqa: PLC0415

        if self.desktop is None:
            self.desktop = DesktopNotices(self.log)
        summary, body = kill_notice(chosen.as_dict())
        self.desktop.notify(summary, body, now=self.clock())

    def _warn_desktop(self, warning: NotifyWarning) -> None:
        """A warning's notice, to the likely victim's owner only (the decision core limits it to one a minute)."""
        from uoomd.desktop import DesktopNotices, warn_notice  # noqa: PLC0415

        if self.desktop is None:
            self.desktop = DesktopNotices(self.log)
        summary, body = warn_notice(warning.record.as_dict())
        self.desktop.notify(summary, body, now=self.clock(), uid=warning.uid)

    def log_record(self, record: Record) -> None:
        facts = record.as_dict()
        level = "warning" if record.event in {"term", "kill", "victim_stuck", "rate_limited"} else "info"
        getattr(self.log, level)(record.event, **facts)
        self.recent.add(record.event, facts)

    def log_result(self, result: ActionResult) -> None:
        facts = result.fields()
        failed = result.outcome in (Outcome.FAILED, Outcome.REFUSED, Outcome.TIMED_OUT)
        (self.log.warning if failed else self.log.info)("action_result", **facts)
        if result.outcome in (Outcome.SENT, Outcome.RELEASED, Outcome.FAILED, Outcome.REFUSED):
            self.recent.add("action_result", facts)
