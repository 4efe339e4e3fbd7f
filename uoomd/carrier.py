"""Carry out one step's outputs in their order: records logged, actions executed, a notice sent once its signal was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, assert_never

from uoomd.actions import Action, KillCgroup, Notify, Output, Record, ReleaseMemory, RunHook, SendSignal
from uoomd.executor import Executor
from uoomd.logs import Log
from uoomd.readings import ProcessKey
from uoomd.results import ActionResult, Outcome
from uoomd.statusboard import Recent


class Notices(Protocol):
    """What the loop needs of its desktop notices (uoomd/desktop.py DesktopNotices, or a test's)."""

    @property
    def running(self) -> int: ...
    def notify(self, summary: str, body: str, *, now: float) -> None: ...
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

    def carry_out(self, outputs: list[Output], *, tick_at: float) -> None:
        """In order: log each record, execute each action, send each notice whose signal was delivered.
        ``tick_at``: the clock before this tick's readings, which a signal's log measures from."""
        delivered: dict[Action, Outcome] = {}
        for item in outputs:
            match item:
                case Record():
                    self.log_record(item)
                case Notify():
                    if delivered.get(item.after) is Outcome.SENT:
                        self._notice_desktop(item.record)
                case SendSignal() | KillCgroup() | ReleaseMemory() | RunHook():
                    delivered[item] = self._execute(item, tick_at)
                case _:
                    assert_never(item)

    def _execute(self, action: Action, tick_at: float) -> Outcome:
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
        return result.outcome

    def _notice_desktop(self, chosen: Record) -> None:
        """One desktop notice per victim, at its first signal; children, never a blocking call."""
        # Imported here: only desktop policies pay its memory (0.6 MiB RSS measured).
        from uoomd.desktop import DesktopNotices, kill_notice  # noqa: PLC0415

        if self.desktop is None:
            self.desktop = DesktopNotices(self.log)
        summary, body = kill_notice(chosen.as_dict())
        self.desktop.notify(summary, body, now=self.clock())

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
