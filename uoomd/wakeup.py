"""What wakes the daemon's loop: one poll set kept for the daemon's life, and the signals noted through a pipe."""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uoomd.logs import Log
    from uoomd.metrics.listener import MetricsListener
    from uoomd.sources.psi import PsiTrigger
    from uoomd.sources.watch import GuardWatch

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class Wakeup:
    """Sleeps in poll() until a timeout or an fd is ready. A signal handler only notes the
    signal and writes to a pipe in the poll set (signal.set_wakeup_fd), so a signal ends the
    sleep at once and is handled by the loop, between ticks, never inside one."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # One poll set for the daemon's life, updated only when its fds change: rebuilding it
        # at every wake-up was a quarter of an idle wake-up's CPU.
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self.polled: dict[int, int] = {}  # fd -> events, besides the wake-up pipe
        self._pending: set[int] = set()

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._note_signal)

    def _note_signal(self, signum: int, _frame: object) -> None:
        self._pending.add(signum)

    @property
    def signalled(self) -> bool:
        """A signal was noted and not yet taken: the loop must not sleep on."""
        return bool(self._pending)

    def take_signals(self) -> set[int]:
        """The signals noted since the last call."""
        pending, self._pending = self._pending, set()
        return pending

    def wait(self, wanted: dict[int, int], timeout_s: float) -> list[tuple[int, int]]:
        """Poll ``wanted`` (fd -> events) for up to ``timeout_s``; the (fd, revents) that came."""
        if wanted != self.polled:
            for fd in self.polled.keys() - wanted.keys():
                with contextlib.suppress(KeyError):
                    self._poller.unregister(fd)
            for fd, mask in wanted.items():
                if self.polled.get(fd) != mask:
                    self._poller.register(fd, mask)
            self.polled = wanted
        try:
            # Rounded up: a deadline 0.4 ms away (a gone scope's retry) polled 0 ms when
            # truncated, and the loop spun until it passed (~90 wake-ups, seen in a test).
            events = self._poller.poll(max(0, math.ceil(timeout_s * 1000)))
        except InterruptedError:
            return []
        ready: list[tuple[int, int]] = []
        for fd, revents in events:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            else:
                ready.append((fd, revents))
        return ready

    def sleep(
        self,
        timeout_s: float,
        *,
        clock: Callable[[], float],
        watches: Sequence[GuardWatch],
        victim_fds: Iterable[int],
        check_fd: int | None,
        listener: MetricsListener | None,
        log: Log,
    ) -> None:
        """Sleep until the timeout, a PSI event, a victim's exit (its pidfd), the policy
        checker's exit (``check_fd``) or a signal.

        A scrape of the metrics listener is answered meanwhile and the sleep goes on: it needs no
        tick (it reads what the last one made), and a client connecting in a loop must not make
        the daemon tick in a loop."""
        deadline = clock() + timeout_s
        owners: dict[int, tuple[GuardWatch, PsiTrigger]] = {}
        wanted: dict[int, int] = {}
        for watch in watches:
            for trigger in watch.triggers:
                if trigger is not None and trigger.pollable:
                    owners[trigger.fileno()] = (watch, trigger)
                    wanted[trigger.fileno()] = select.POLLPRI
        for fd in victim_fds:
            wanted[fd] = select.POLLIN
        if check_fd is not None:
            wanted[check_fd] = select.POLLIN  # the checker exited: reloads.poll() has its answer
        while True:
            now = clock()
            polled = wanted
            if listener is not None:
                listener.expire(now)
                polled = {**wanted, **listener.poll_fds(now)}
            ready = self.wait(polled, max(0.0, deadline - now))
            woken = not ready  # the timeout, a signal (its pipe is not in ready), EINTR
            for fd, revents in ready:
                if fd in owners:
                    watch, trigger = owners[fd]
                    watch.note_revents(trigger, revents, now=clock(), log=log)
                    woken = True
                elif listener is not None and listener.owns(fd):
                    listener.handle(fd, revents, clock())
                else:
                    woken = True  # a victim's pidfd, the policy checker's
            if woken or self.signalled:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._wake_r)
            os.close(self._wake_w)
