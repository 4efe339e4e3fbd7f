"""A SIGHUP's reload: the policy checked again in a child, one check at a time, the loop polling for its answer.

A SIGHUP while a check runs is coalesced, not a restart: that check runs on and its answer
is applied, then one more check reads the file again (the child may have read it before
the edit this SIGHUP announces). Never killing a check under way keeps one checker at a
time, and a burst of SIGHUPs (a script looping `systemctl reload`) still makes progress;
any number of them during a check make one more check.

Each answer is handed on with the time its check started (the clock before the child was
spawned, or before a file refused without one): ``uoomd reload`` takes only the answer of a
check that started after its SIGHUP (uoomd/statusboard.py ReloadRecord).
"""

from __future__ import annotations

from collections.abc import Callable

from uoomd.errors import PolicyError, SetupError
from uoomd.logs import Log
from uoomd.policy.isolated import CheckResult, PolicyCheck

StartCheck = Callable[[str, float], PolicyCheck]  # (policy path, now): a checker child, started
Answered = Callable[[CheckResult, float], None]  # (a Plan or why none, when its check started)


class Reloads:
    """The reload checks of one daemon: ``request()`` at a SIGHUP, ``poll()`` when the loop wakes.

    Each answer goes to ``answered`` (a Plan to apply, or why there is none, and when its check
    started); once no further check is due, ``settled()`` (the daemon says READY=1 again)."""

    def __init__(
        self,
        *,
        log: Log,
        start: StartCheck,
        clock: Callable[[], float],
        answered: Answered,
        settled: Callable[[], None],
    ) -> None:
        self._log = log
        self._start = start  # tests pass a checker that is slow, or fails
        self._clock = clock
        self._answered = answered
        self._settled = settled
        self.check: PolicyCheck | None = None  # the check under way, polled by the loop
        self._started_at = 0.0  # when that check started: handed on with its answer
        self._again = False  # a SIGHUP came while it ran: check once more after it

    def request(self, path: str) -> None:
        """Check ``path`` again, now, or after the check under way."""
        if self.check is not None:
            self._again = True
            self._log.info("policy_reload_coalesced", policy=path, checker_pid=self.check.pid)
            return
        self._begin(path)

    def _begin(self, path: str) -> None:
        self._started_at = self._clock()
        try:
            self.check = self._start(path, self._started_at)
        except (PolicyError, SetupError) as exc:  # a FIFO, a device, no file: refused without a child
            self._done(path, exc)
            return
        self._log.info("policy_check_started", policy=path, checker_pid=self.check.pid)

    def poll(self, now: float) -> None:
        """A checker that exited (or is overdue): hand on its answer."""
        if self.check is None:
            return
        result = self.check.poll(now)
        if result is not None:
            path, self.check = self.check.path, None
            self._done(path, result)

    def _done(self, path: str, result: CheckResult) -> None:
        self._answered(result, self._started_at)
        if self._again:
            self._again = False
            self._begin(path)
        else:
            self._settled()

    def fileno(self) -> int | None:
        """The checker's pidfd, readable once it exited: the loop polls it."""
        return self.check.fileno() if self.check is not None else None

    def due_in(self, now: float) -> float | None:
        """When an overdue checker is to be killed (None: no check under way)."""
        return self.check.due_in(now) if self.check is not None else None

    def cancel(self) -> None:
        """Stopped during a reload: the checker is killed and reaped."""
        if self.check is not None:
            self.check.cancel()
            self.check = None
