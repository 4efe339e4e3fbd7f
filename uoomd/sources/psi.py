"""Memory pressure (PSI): parse pressure files, and arm kernel poll triggers or compute them from the counter.

Kernel facts this module is built on (kernel/sched/psi.c psi_trigger_create(), Linux 6.18,
each checked on this machine by writing to /proc/pressure/memory and to a v2 cgroup's
memory.pressure as root without CAP_SYS_RESOURCE):

- A trigger is ``"some|full STALL_US WINDOW_US"`` written to the opened pressure file;
  0 < WINDOW_US <= 10 s (WINDOW_MAX_US) and 0 < STALL_US <= WINDOW_US, else EINVAL.
- Without CAP_SYS_RESOURCE (checked on the opener's credentials, file->f_cred) the window
  must also be a multiple of 2 s, else EINVAL: such triggers are evaluated by the averaging
  worker (psi_avgs_work(), every PSI_FREQ = 2 s) instead of a real-time "psimon" thread.
  So an unprivileged trigger fires up to ~2 s late. Accepted here: some 150000 2000000,
  full 1 4000000, some 100 10000000; refused: some 150000 1000000, some 100 500000,
  full 100 3000000, some 100 12000000, some 0 2000000, some 2000001 2000000.
- /proc/pressure/* drops the last byte written (psi_write(): buf[buf_size - 1] = '\\0'),
  so we send a trailing NUL; the cgroup file (kernfs) NUL-terminates itself and is
  indifferent to ours. One trigger per open file (EBUSY on a second write).
- An event is signalled as POLLPRI at most once per window (update_triggers()), and
  poll() consumes it (psi_trigger_poll(): cmpxchg(&t->event, 1, 0)). A removed cgroup's
  file polls as POLLERR|POLLPRI (kernfs_fop_poll() on an inactive node).
- Seen on 6.18 and worked around in PsiTrigger: an unprivileged trigger's window starts
  from group->total[PSI_POLL], which only privileged triggers update (it stays 0), while
  growth is measured on total[PSI_AVGS]. On a group with stall history the first growth is
  the whole history: "some 1900000 2000000" on /proc/pressure/memory fired after 1.9 s and
  again 4 s later while the real stall was ~24 ms/s. Fresh cgroups (total 0) are unaffected.
- Reading the same group's pressure file races with the worker: psi_show() runs
  update_averages() but not update_triggers(), so a read that lands first makes the worker
  skip that period. Page-cache thrash in a 64 MiB cgroup, trigger "some 50000 2000000" on
  its v2 memory.pressure: with the file read every 0.5 s the first POLLPRI came after 4, 8
  and 12 s (three runs); not read, after 2.04-2.05 s (four runs, the integration test).
  So in a kernel mode the loop should read the pressure file when woken by the fd or
  rarely, not at every short poll; the computed window saw the same stall within 0.5-1 s.
"""

from __future__ import annotations

import errno
import math
import os
import select
from collections import deque
from enum import StrEnum
from typing import Literal

from uoomd.readings import PressureReading
from uoomd.sources.seqfile import Closing, KeptFile

PsiKindName = Literal["some", "full"]

WINDOW_MAX_US = 10_000_000  # kernel/sched/psi.c WINDOW_MAX_US
UNPRIVILEGED_WINDOW_STEP_US = 2_000_000  # psi_trigger_create(): !privileged && window_us % 2000000 -> EINVAL

# Errors that mean "this kernel or file will not take a trigger from us": fall back to polling.
_REFUSED = {errno.EINVAL, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EROFS, errno.EBUSY}


class PressureError(ValueError):
    """A pressure file's text is not what PSI writes."""


class PressureFileGone(Exception):
    """A kept-open pressure file went away: its cgroup was removed (kernfs answers ENODEV)."""


class PsiTriggerGone(PressureFileGone):
    """The pressure file of an armed trigger went away (poll() said POLLERR)."""


def parse_pressure(text: str) -> PressureReading:
    """``some avg10=.. avg60=.. avg300=.. total=..`` and the same for ``full``.

    The ``full`` line is missing for cpu before Linux 5.13 and on some old kernels: zeros.
    """
    lines: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        kind = fields[0]
        if kind not in ("some", "full"):
            raise PressureError(f"pressure file: unexpected line {line!r}")
        pairs: dict[str, str] = {}
        for field in fields[1:]:
            key, sep, value = field.partition("=")
            if not sep:
                raise PressureError(f"pressure file: cannot read {field!r} in {line!r}")
            pairs[key] = value
        lines[kind] = pairs
    if "some" not in lines:
        raise PressureError("pressure file: no 'some' line")
    some = _parse_line(lines["some"], "some")
    full = _parse_line(lines["full"], "full") if "full" in lines else (0.0, 0.0, 0.0, 0)
    return PressureReading(
        some_avg10=some[0],
        some_avg60=some[1],
        some_avg300=some[2],
        some_total_us=some[3],
        full_avg10=full[0],
        full_avg60=full[1],
        full_avg300=full[2],
        full_total_us=full[3],
    )


def _parse_line(pairs: dict[str, str], kind: str) -> tuple[float, float, float, int]:
    try:
        avgs = (float(pairs["avg10"]), float(pairs["avg60"]), float(pairs["avg300"]))
        total = int(pairs["total"])
    except KeyError as exc:
        raise PressureError(f"pressure file: '{kind}' line lacks {exc.args[0]}") from None
    except ValueError:
        raise PressureError(f"pressure file: '{kind}' line has a non-number: {pairs}") from None
    if total < 0 or any(not 0.0 <= a <= 100.0 for a in avgs):
        raise PressureError(f"pressure file: '{kind}' line out of range: {pairs}")
    return (*avgs, total)


def stall_total_us(reading: PressureReading, kind: PsiKindName) -> int:
    return reading.some_total_us if kind == "some" else reading.full_total_us


class PressureReader(KeptFile):
    """Keeps a pressure file open and reads it with pread at every poll."""

    def read(self) -> PressureReading:
        try:
            data = self.read_bytes()
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise PressureFileGone(f"{self.path}: cgroup removed") from exc
            raise
        return parse_pressure(data.decode("ascii", errors="replace"))


def round_for_unprivileged(stall_us: int, window_us: int) -> tuple[int, int]:
    """The nearest trigger an unprivileged writer may arm: window a multiple of 2 s in [2 s, 10 s].

    The window is rounded up (a longer window only smooths), except that it cannot pass
    10 s; the stall is scaled by the same factor so the stall/window ratio, the share of
    time stalled that the user asked about, stays the same. "some 150000 1000000" (15 %
    of 1 s) becomes "some 300000 2000000" (15 % of 2 s).
    """
    if stall_us <= 0 or window_us <= 0:
        raise ValueError(f"a PSI trigger needs a positive stall and window, got {stall_us} {window_us}")
    steps = math.ceil(window_us / UNPRIVILEGED_WINDOW_STEP_US)
    new_window = min(max(steps, 1) * UNPRIVILEGED_WINDOW_STEP_US, WINDOW_MAX_US)
    ratio = min(stall_us / window_us, 1.0)
    new_stall = min(max(round(new_window * ratio), 1), new_window)
    return new_stall, new_window


class PsiWindow:
    """Did the stall counter grow by at least ``stall_us`` within the last ``window_us``? (no I/O)

    Fed with (monotonic seconds, cumulative stall µs) samples, e.g. the ``total=`` of each
    poll. The growth is measured from the newest sample at least one window old (or the
    oldest sample while less than a window has been seen), so: no growth, never stalled;
    growth >= stall between two samples at most a window apart, always stalled at the later.
    A counter that goes backwards (file re-created) restarts the window.
    """

    def __init__(self, stall_us: int, window_us: int) -> None:
        if stall_us <= 0 or window_us <= 0:
            raise ValueError(f"a PSI window needs a positive stall and window, got {stall_us} {window_us}")
        self.stall_us = stall_us
        self.window_us = window_us
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, total_us: int) -> bool:
        if self._samples and (total_us < self._samples[-1][1] or now < self._samples[-1][0]):
            self._samples.clear()
        self._samples.append((now, total_us))
        horizon = now - self.window_us / 1e6
        # Drop samples older than the newest one at or before the horizon: it is the base.
        while len(self._samples) >= 2 and self._samples[1][0] <= horizon:
            self._samples.popleft()
        return self.growth_us() >= self.stall_us

    def growth_us(self) -> int:
        if not self._samples:
            return 0
        return self._samples[-1][1] - self._samples[0][1]


class TriggerMode(StrEnum):
    KERNEL = "kernel"  # armed as asked
    KERNEL_ROUNDED = "kernel-rounded"  # armed with a window the kernel accepts from us
    POLLED = "polled"  # the kernel refused: computed from total= at each poll


class PsiTrigger(Closing):
    """One memory pressure trigger: a kernel poll trigger where possible, else computed.

    The loop registers ``fileno()`` (when ``pollable``) for POLLPRI, hands the revents it
    got for it to ``note_revents()``, and asks ``fired(now, reading)`` once per step.
    Both modes report at most once per window, as the kernel does.
    """

    def __init__(
        self,
        *,
        path: str,
        kind: PsiKindName,
        stall_us: int,
        window_us: int,
        mode: TriggerMode,
        reason: str,
        fd: int | None,
        armed_at: float,
        requested: tuple[int, int],
    ) -> None:
        self.path = path
        self.kind: PsiKindName = kind
        self.stall_us = stall_us
        self.window_us = window_us
        self.mode = mode
        self.reason = reason
        self.requested_stall_us, self.requested_window_us = requested
        self.armed_at = armed_at
        self._fd = fd
        self._pending = False
        self._last_fired: float | None = None
        self._window = PsiWindow(stall_us, window_us)
        self._poller: select.poll | None = None
        if fd is not None:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLPRI)

    @classmethod
    def arm(
        cls,
        path: str,
        kind: PsiKindName,
        stall_us: int,
        window_us: int,
        *,
        now: float,
        initial: PressureReading | None = None,
    ) -> PsiTrigger:
        """Arm a kernel trigger as asked, else rounded to what the kernel accepts, else polled.

        ``initial`` (a reading taken now) seeds the computed window; pass it.
        Raises FileNotFoundError when the pressure file does not exist at all.
        """
        if kind not in ("some", "full"):
            raise ValueError(f"PSI kind must be 'some' or 'full', not {kind!r}")
        requested = (stall_us, window_us)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            os.stat(path)  # raises FileNotFoundError when there is nothing to poll either
            reason = f"cannot open {path} for writing: {os.strerror(exc.errno)}"
            return cls.polled(
                path, kind=kind, stall_us=stall_us, window_us=window_us, reason=reason, now=now, initial=initial
            )
        attempts: list[tuple[TriggerMode, int, int]] = [(TriggerMode.KERNEL, stall_us, window_us)]
        rounded = round_for_unprivileged(stall_us, window_us)
        if rounded != requested:
            attempts.append((TriggerMode.KERNEL_ROUNDED, *rounded))
        refusals: list[str] = []
        for mode, stall, window in attempts:
            try:
                os.write(fd, f"{kind} {stall} {window}".encode() + b"\0")
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    os.close(fd)
                    raise
                refusals.append(f"'{kind} {stall} {window}': {os.strerror(exc.errno)}")
                continue
            if mode is TriggerMode.KERNEL:
                reason = "armed as asked"
            else:
                reason = (
                    f"the kernel refused '{kind} {stall_us} {window_us}' ({refusals[0]}): without "
                    "CAP_SYS_RESOURCE a window must be a multiple of 2 s and at most 10 s "
                    f"(kernel/sched/psi.c psi_trigger_create()); armed '{kind} {stall} {window}', same ratio"
                )
            trigger = cls(
                path=path,
                kind=kind,
                stall_us=stall,
                window_us=window,
                mode=mode,
                reason=reason,
                fd=fd,
                armed_at=now,
                requested=requested,
            )
            if initial is not None:
                trigger._window.update(now, stall_total_us(initial, kind))
            return trigger
        os.close(fd)
        reason = "the kernel refused the trigger (" + "; ".join(refusals) + "): computed from total= each poll"
        return cls.polled(
            path, kind=kind, stall_us=stall_us, window_us=window_us, reason=reason, now=now, initial=initial
        )

    @classmethod
    def polled(
        cls,
        path: str,
        *,
        kind: PsiKindName,
        stall_us: int,
        window_us: int,
        reason: str,
        now: float,
        initial: PressureReading | None = None,
    ) -> PsiTrigger:
        """A trigger computed from the ``total=`` counter of the readings handed to fired()."""
        trigger = cls(
            path=path,
            kind=kind,
            stall_us=stall_us,
            window_us=window_us,
            mode=TriggerMode.POLLED,
            reason=reason,
            fd=None,
            armed_at=now,
            requested=(stall_us, window_us),
        )
        if initial is not None:
            trigger._window.update(now, stall_total_us(initial, kind))
        return trigger

    @property
    def pollable(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"a {self.mode} PSI trigger has no file descriptor to poll")
        return self._fd

    def note_revents(self, revents: int) -> None:
        """Record what the loop's own poll() saw on ``fileno()`` (that poll consumed the event)."""
        if revents & (select.POLLERR | select.POLLNVAL):
            raise PsiTriggerGone(f"{self.path}: pressure file went away")
        if revents & select.POLLPRI:
            self._pending = True

    def fired(self, now: float, reading: PressureReading | None) -> bool:
        """Whether the trigger fired since the last call; consumes the event.

        kernel modes: a POLLPRI seen here or handed to note_revents(). During the first two
        windows after arming an event is only believed when the readings agree (see the
        module docstring: the kernel's first windows of an unprivileged trigger can carry the
        group's whole stall history). polled mode: the window computed from ``reading``.
        """
        stalled = None if reading is None else self._window.update(now, stall_total_us(reading, self.kind))
        if self.mode is not TriggerMode.POLLED:
            assert self._poller is not None
            for _fd, revents in self._poller.poll(0):
                self.note_revents(revents)
            hit, self._pending = self._pending, False
            if hit and stalled is False and now < self.armed_at + 2 * self.window_us / 1e6:
                return False  # an unconfirmed event in the kernel's warm-up windows
            return hit  # the kernel already signals at most once per window
        if not stalled:
            return False
        if self._last_fired is not None and now < self._last_fired + self.window_us / 1e6:
            return False  # at most once per window, like the kernel's update_triggers()
        self._last_fired = now
        return True

    def describe(self) -> str:
        return f"{self.kind} {self.stall_us} {self.window_us} ({self.mode}: {self.reason})"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file destroys the kernel trigger
            self._fd = None
            self._poller = None
