"""Living as a system service: sd_notify readiness/status/watchdog, the daemon's own protection and its name."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sdnotify

# include/uapi/asm-generic/mman-common.h
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4  # Linux 4.4+: lock pages as they are touched, not the whole reserved address space

STATUS_INTERVAL_S = 1.0  # STATUS= is for people reading `systemctl status`: once a second is plenty


class Notifier:
    """sd_notify(3) messages; a no-op outside systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self._enabled else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the interval, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if wanted else None
        self._last_ping = float("-inf")
        self._status_sent = ""
        self._status_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._status_sent = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def update_status(self, line: Callable[[], str]) -> None:
        """STATUS= when the line changed, at most once per STATUS_INTERVAL_S: `systemctl status`
        stays current and a tick at poll_min costs no datagram (nor the line's formatting).
        Spaced by the clock at the send, not the tick's start, so one long tick cannot
        bring two lines closer together."""
        now = time.monotonic()
        if self._notifier is None or now - self._status_at < STATUS_INTERVAL_S:
            return
        text = line()
        if text != self._status_sent:
            self._status_sent = text
            self._status_at = now
            self.status(text)

    def reloading(self) -> None:
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_us}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self, now: float) -> None:
        """Ping from the loop itself, so a stuck loop stops the pings and systemd restarts us."""
        if self.watchdog_interval_s is None or now - self._last_ping < self.watchdog_interval_s:
            return
        self._last_ping = now
        self._send("WATCHDOG=1")

    def watchdog_due_in(self, now: float) -> float | None:
        """Seconds until the next ping is due (None: no watchdog), so the loop never sleeps past it."""
        if self.watchdog_interval_s is None:
            return None
        return max(0.0, self._last_ping + self.watchdog_interval_s - now)


@dataclass(frozen=True, slots=True, kw_only=True)
class Protection:
    """What self-protection achieved, for the start-up log line; each ``*_error`` says why a step
    fell short and what lifts it (None: it did what it should)."""

    oom_score_adj: int | None
    mlocked: bool
    mlock_error: str | None
    nice: int | None
    nofile: int | None = None  # the soft open-file limit after raising it
    oom_score_adj_error: str | None = None
    nice_error: str | None = None


def adj_error(error: int, adj: int | None) -> str:
    """Why oom_score_adj could not be set to -1000: EACCES is the kernel's answer to lowering it
    below oom_score_adj_min without CAP_SYS_RESOURCE (fs/proc/base.c __set_oom_adj(), Linux 6.18)."""
    now = "unknown" if adj is None else str(adj)
    if error == errno.EACCES:
        return f"oom_score_adj stays {now}: CAP_SYS_RESOURCE missing (OOMScoreAdjust=-1000 in the unit sets it)"
    return f"oom_score_adj stays {now}: {os.strerror(error)}"


def nice_error(error: int, nice: int | None) -> str:
    """Why setpriority(-10) failed: EACCES is a lower nice value without CAP_SYS_NICE or RLIMIT_NICE
    (kernel/sys.c set_one_prio(), can_nice())."""
    now = "unknown" if nice is None else str(nice)
    if error in (errno.EACCES, errno.EPERM):
        return f"nice stays {now}: CAP_SYS_NICE missing (Nice=-10 in the unit sets it)"
    return f"nice stays {now}: {os.strerror(error)}"


def protect_self() -> Protection:
    """Make uoomd the last thing the kernel kills, keep it in RAM and ahead in the run queue."""
    adj: int | None
    adj_failed: str | None = None
    try:
        # -1000 exempts us from the kernel OOM killer (needs CAP_SYS_RESOURCE to lower it).
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("-1000")
        adj = -1000
    except OSError as exc:
        try:
            with open("/proc/self/oom_score_adj") as handle:
                adj = int(handle.read())
        except (OSError, ValueError):
            adj = None
        adj_failed = adj_error(exc.errno or 0, adj)
    mlocked, mlock_error = _mlockall()
    nice: int | None
    nice_failed: str | None = None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        nice = os.getpriority(os.PRIO_PROCESS, 0)
    except OSError as exc:
        nice = None
        with contextlib.suppress(OSError):
            nice = os.getpriority(os.PRIO_PROCESS, 0)
        nice_failed = nice_error(exc.errno or 0, nice)
    return Protection(
        oom_score_adj=adj,
        mlocked=mlocked,
        mlock_error=mlock_error,
        nice=nice,
        nofile=_raise_nofile(),
        oom_score_adj_error=adj_failed,
        nice_error=nice_failed,
    )


# The soft open-file limit uoomd started with, before _raise_nofile: what unprotect_child gives
# back. None until protect_self ran (the CLI's children keep what they inherit).
_started_nofile_soft: int | None = None


def unprotect_child() -> None:
    """In a child of the daemon (a hook, the policy checker, a desktop notice), before it execs:
    give back what protect_self took, and never more than that.

    They used to inherit oom_score_adj -1000, nice -10 and the raised open-file limit (issue 12):
    a hook that leaks could not be killed by the kernel and competed with the loop for the CPU.
    Raising oom_score_adj and nice needs no privilege; a value above 0 is left as it is, since
    lowering it would shield the child. Written while the child still has CAP_SYS_RESOURCE, the
    0 also becomes its floor (oom_score_adj_min, fs/proc/base.c __set_oom_adj()): inherited at
    -1000, that floor would let the child go back to -1000 unprivileged. The daemon is
    single-threaded, so this can run between fork and exec (subprocess's preexec_fn)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/oom_score_adj", "rb") as current:
            lowered = int(current.read()) < 0
        if lowered:
            with open("/proc/self/oom_score_adj", "wb") as handle:
                handle.write(b"0")
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, 0) < 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    if _started_nofile_soft is not None:
        with contextlib.suppress(OSError, ValueError):
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft > _started_nofile_soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (_started_nofile_soft, hard))


def _raise_nofile() -> int | None:
    # The warm scanner keeps two fds per process (sources/scanner.py ProcScanner, half the soft limit):
    # systemd's default soft limit of 1024 would cover ~256 processes. The hard limit is ours to take.
    global _started_nofile_soft  # noqa: PLW0603 -- one record per process, read in its children
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if _started_nofile_soft is None:
            _started_nofile_soft = soft
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return None


def _mlockall() -> tuple[bool, str | None]:
    # A daemon whose pages are swapped or evicted stalls exactly when memory is short.
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    libc = ctypes.CDLL(None, use_errno=True)  # the libc already mapped: ctypes.util would cost ~1 MiB RSS
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return True, None
    err = ctypes.get_errno()
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    return False, f"{os.strerror(err)} (RLIMIT_MEMLOCK {limit}; LimitMEMLOCK=infinity in the unit lifts it)"


# --- the daemon's name -----------------------------------------------------------------------

PROCESS_NAME = "uoomd"


@dataclass(frozen=True, slots=True, kw_only=True)
class Renaming:
    """What take_name() could not do, each with why (None: done)."""

    comm_error: str | None = None
    cmdline_error: str | None = None

    @property
    def complete(self) -> bool:
        return self.comm_error is None and self.cmdline_error is None


def take_name(argv: Sequence[str], *, proc_self: str = "/proc/self") -> Renaming:
    """Be ``uoomd`` to ps, pgrep, systemctl status and the policy's own rules: comm "uoomd" and
    a command line of ``argv`` (``uoomd run --policy FILE``), in place of the isolated interpreter's
    ``python3 -I -S -c import json, sys; ...`` (issue 13). Never raises: the daemon guards all the
    same under the interpreter's name, and run_daemon logs what failed (``process_name_kept``).

    Why a rewrite in place and not exec with argv[0] "uoomd": CPython derives sys.executable and
    its prefix from argv[0] (Modules/getpath.py), searching PATH for a bare name. Measured here,
    Python 3.11.7: with argv[0] "uoomd", sys.executable became /root/.pyenv/shims/uoomd (a bash
    shim), a venv's sys.prefix fell back to the base interpreter's, and with PATH unset
    sys.executable was ''. The policy checker is started as sys.executable (uoomd/policy/isolated.py),
    so a reload would have run a shell script. comm comes from the executed file's name, never
    from argv[0], so it needs its own write either way."""
    comm_error: str | None = None
    try:
        # fs/proc/base.c comm_write(): a task may rename itself; prctl(PR_SET_NAME) without ctypes.
        with open(os.path.join(proc_self, "comm"), "wb") as handle:
            handle.write(PROCESS_NAME.encode())
    except OSError as exc:
        comm_error = f"cannot write {proc_self}/comm: {exc.strerror or exc}"
    return Renaming(comm_error=comm_error, cmdline_error=_rewrite_cmdline(argv, proc_self))


def _rewrite_cmdline(argv: Sequence[str], proc_self: str) -> str | None:
    """Overwrite the argument strings where the kernel reads /proc/PID/cmdline; why not, or None.

    The area is [arg_start, arg_end) of the stack (proc(5) /proc/PID/stat fields 48 and 49): the
    interpreter copied its argv at start (sys.orig_argv), so nothing reads these bytes again.
    The title is written with spaces, a NUL after it, and a last byte that is not NUL: that byte
    tells fs/proc/base.c get_mm_cmdline() (Linux 5.2+) that the area was rewritten, and it then
    shows the area up to its first NUL (get_mm_proctitle()), as setproctitle(3) relies on;
    NUL padding alone would show every padding byte as an empty argument. /proc/self/mem may
    write the process's own pages (a task may always access its own mm: kernel/ptrace.c
    __ptrace_may_access()), and the stack is writable, so no FOLL_FORCE is needed."""
    title = b" ".join(os.fsencode(word) for word in argv)
    try:
        with open(os.path.join(proc_self, "stat"), "rb") as handle:
            stat = handle.read()
        # Fields after the last ")" (a name may hold one): fields[0] is field 3, so 48 is [45].
        fields = stat[stat.rfind(b")") + 2 :].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])
        with open(os.path.join(proc_self, "cmdline"), "rb") as handle:
            before = handle.read()
    except (OSError, ValueError, IndexError) as exc:
        return f"cannot find the argument area in {proc_self}/stat: {exc}"
    size = arg_end - arg_start
    if not 0 < size <= 1 << 20 or len(title) + 2 > size:
        return f"the title needs {len(title) + 2} bytes, the argument area has {size}"
    try:
        fd = os.open(os.path.join(proc_self, "mem"), os.O_RDWR | os.O_CLOEXEC)
        try:
            # The kernel must show these very bytes as the command line now: else the area is not
            # where the fields say, or was rewritten already, and nothing is written.
            if os.pread(fd, size, arg_start) != before:
                return f"{proc_self}/cmdline is not the argument area that {proc_self}/stat names"
            os.pwrite(fd, title + b"\0" * (size - len(title) - 1) + b" ", arg_start)
        finally:
            os.close(fd)
        with open(os.path.join(proc_self, "cmdline"), "rb") as handle:
            after = handle.read()
    except OSError as exc:
        return f"cannot rewrite the argument area through {proc_self}/mem: {exc.strerror or exc}"
    if after.rstrip(b"\0") != title:
        return f"{proc_self}/cmdline shows {after[:80]!r} after the rewrite"
    return None
