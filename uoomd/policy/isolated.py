"""Load a policy in a child process and hand back the Plan, so the daemon never imports pydantic.

pydantic costs the daemon ~11 MiB of RSS that it would carry for its whole life to
validate one file at start and at each reload (measured: VmRSS 23.7 -> 34.7 MiB on
importing uoomd.policy.load, Python 3.11, pydantic 2.13). The child validates and
compiles; the Plan is frozen stdlib dataclasses and crosses a memfd pickled. Only our
own child writes that memfd, from a policy file we were told to trust.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import select
import subprocess
import sys
import time
from collections.abc import Sequence

from uoomd.errors import PolicyError, PolicyIssue, SetupError
from uoomd.plan import Plan
from uoomd.policy.file import refuse_not_regular
from uoomd.service import unprotect_child

CHILD_TIMEOUT_S = 30.0
# cancel() waits this long for the killed checker: SIGKILL ends it within milliseconds unless
# it sleeps uninterruptibly in the kernel, and then the daemon's exit hands it to init.
CANCEL_WAIT_S = 2.0
ANSWER_LIMIT_BYTES = 16 << 20  # a pickled Plan is a few KiB; the daemon's pages are mlocked
ERRORS_TAIL_BYTES = 4096

CheckResult = Plan | PolicyError | SetupError


# The checker runs as root at start and at every SIGHUP, often from a user's directory (`sudo
# uoomd run`). `-m` put that directory first on sys.path: a pickle.py planted there by uid 65534
# ran as root (issue 12). -I keeps the working directory, PYTHON* variables and the user site
# out; uoomd's own directory is handed over explicitly, as cli._reexec_isolated does for the
# daemon. No -S, unlike the daemon: pydantic lives in site-packages, which root owns.
_CHECKER_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from uoomd.policy.isolated import run_checker; raise SystemExit(run_checker(sys.argv[2]))"
)


def checker_argv(path: str) -> list[str]:
    """The child that validates ``path``: this module, in an interpreter that may import pydantic."""
    import uoomd  # noqa: PLC0415 -- where this very package was found

    assert uoomd.__file__ is not None
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(uoomd.__file__)))
    return [sys.executable, "-I", "-c", _CHECKER_BOOT, json.dumps([package_parent]), path]


class PolicyCheck:
    """One policy file being validated in a child: started, then polled from the loop, never waited on.

    The child writes its answer and its stderr to memfds, not pipes, so it never blocks on a
    reader and the loop needs one fd, the child's pidfd, readable once it exited (pidfd_open(2)).
    A reload used to wait for the child (subprocess.run): a policy slow to check blinded the
    loop for up to CHILD_TIMEOUT_S, with no watchdog ping and no SIGTERM (issue 11)."""

    def __init__(
        self,
        path: str,
        proc: subprocess.Popen[bytes],
        *,
        pidfd: int,
        answer_fd: int,
        errors_fd: int,
        timeout_s: float,
        now: float,
    ) -> None:
        """Use start()."""
        self.path = path
        self.timeout_s = timeout_s
        self.deadline = now + timeout_s
        self._proc = proc
        self._pidfd = pidfd
        self._answer_fd = answer_fd
        self._errors_fd = errors_fd
        self._killed = False  # past the deadline: its exit is awaited, then reported as a timeout
        self._result: CheckResult | None = None

    @classmethod
    def start(
        cls, path: str, now: float, *, timeout_s: float = CHILD_TIMEOUT_S, argv: Sequence[str] | None = None
    ) -> PolicyCheck:
        """Start checking ``path`` (``argv``: another checker, for tests). PolicyError at once,
        with no child started, when it is not a regular file; SetupError when no child starts."""
        refuse_not_regular(path)
        fds: list[int] = []
        try:
            # A daemon short of fds (EMFILE) fails this reload, and keeps running.
            answer_fd = os.memfd_create("uoomd-policy-answer", os.MFD_CLOEXEC)
            fds.append(answer_fd)
            errors_fd = os.memfd_create("uoomd-policy-errors", os.MFD_CLOEXEC)
            fds.append(errors_fd)
            proc = subprocess.Popen(
                list(argv) if argv is not None else checker_argv(path),
                stdin=subprocess.DEVNULL,
                stdout=answer_fd,
                stderr=errors_fd,
                close_fds=True,
                preexec_fn=unprotect_child,  # noqa: PLW1509 -- the daemon is single-threaded (uoomd/service.py)
            )
        except (OSError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            raise SetupError(f"cannot run the policy checker: {exc}") from exc
        try:
            # Our own child, not yet reaped: its PID cannot have been recycled.
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:
            proc.kill()
            proc.wait()
            for fd in fds:
                os.close(fd)
            raise SetupError(f"cannot watch the policy checker: {exc}") from exc
        return cls(path, proc, pidfd=pidfd, answer_fd=answer_fd, errors_fd=errors_fd, timeout_s=timeout_s, now=now)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def fileno(self) -> int:
        """The fd to poll for POLLIN: readable once the child exited, then poll() has the answer."""
        return self._pidfd

    def due_in(self, now: float) -> float | None:
        """Seconds until poll() must run to kill an overdue child; None once killed (its exit wakes fileno())."""
        if self._killed or self._result is not None:
            return None
        return max(0.0, self.deadline - now)

    def poll(self, now: float) -> CheckResult | None:
        """The answer once the child exited (a Plan, or the error to log); None while it runs.
        Past the deadline the child is killed, and its exit later answers with a SetupError."""
        if self._result is not None:
            return self._result
        code = self._proc.poll()
        if code is None:
            if now >= self.deadline and not self._killed:
                self._proc.kill()
                self._killed = True
            return None
        self._result = self._answer(code)
        self._close()
        return self._result

    def wait(self) -> CheckResult:
        """Block until the answer (the start-up load, before the loop runs; the loop uses poll())."""
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        while True:
            result = self.poll(time.monotonic())
            if result is not None:
                return result
            due = self.due_in(time.monotonic())
            poller.poll(None if due is None else math.ceil(due * 1000))

    def cancel(self) -> None:
        """Kill the child if it runs and reap it: no zombie, no checker outliving the daemon."""
        if self._result is not None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(CANCEL_WAIT_S)
        self._result = SetupError("the policy check was cancelled")
        self._close()

    def _answer(self, code: int) -> CheckResult:
        if self._killed:
            return SetupError(f"the policy checker took longer than {self.timeout_s:g} s: killed")
        size = os.fstat(self._answer_fd).st_size
        if size > ANSWER_LIMIT_BYTES:
            return SetupError(f"the policy checker's answer is {size} bytes, over {ANSWER_LIMIT_BYTES}")
        raw = os.pread(self._answer_fd, size, 0) if size else b""
        if code != 0 or not raw:
            errors_size = os.fstat(self._errors_fd).st_size
            start = max(0, errors_size - ERRORS_TAIL_BYTES)
            errors = os.pread(self._errors_fd, errors_size - start, start) if errors_size else b""
            tail = errors.decode(errors="replace").strip().splitlines()[-5:]
            return SetupError(f"the policy checker failed (exit {code}): {' | '.join(tail)}")
        kind, payload = pickle.loads(raw)  # noqa: S301 -- our own child, see the module docstring
        if kind == "plan":
            assert isinstance(payload, Plan)
            return payload
        file, issues = payload
        return PolicyError(file, [PolicyIssue(key=k, message=m, line=line) for k, m, line in issues])

    def _close(self) -> None:
        for fd in (self._pidfd, self._answer_fd, self._errors_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def load_plan_isolated(path: str) -> Plan:
    """Like ``uoomd.policy.load.load_plan``, run in a checker child (checker_argv).

    Blocking: for the start-up load. A FIFO or device at ``path`` is refused at once."""
    result = PolicyCheck.start(path, time.monotonic()).wait()
    if isinstance(result, Plan):
        return result
    raise result


def run_checker(path: str) -> int:
    """The checker child's entry (see _CHECKER_BOOT): validate ``path``, write the answer to stdout."""
    from uoomd.policy.load import load_plan  # noqa: PLC0415 -- the import this process exists to hold

    try:
        result: tuple[str, object] = ("plan", load_plan(path))
    except PolicyError as exc:
        result = ("error", (exc.file, [(i.key, i.message, i.line) for i in exc.issues]))
    sys.stdout.buffer.write(pickle.dumps(result))
    sys.stdout.buffer.flush()
    return 0
