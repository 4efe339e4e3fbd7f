"""Run the policy's hook programs: argv with a clean environment, no shell, a timeout, never blocking the loop."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterable

from uoomd.results import ActionKind, ActionResult, Outcome, make_result
from uoomd.service import unprotect_child

HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HOOK_OUTPUT_LIMIT_BYTES = 4096


def hook_environment(env: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A clean environment: a fixed PATH plus the UOOMD_* variables, nothing inherited.

    Values (process names, cmdlines) are attacker-controlled; they travel as data, and a value
    the kernel cannot carry (a NUL byte) is dropped rather than failing the hook."""
    out = {"PATH": HOOK_PATH}
    for key, value in env:
        if key.startswith("UOOMD_") and key.replace("_", "").isalnum() and key.isascii() and "\0" not in value:
            out[key] = value
    return out


class HookHandle:
    """One running hook: started without a shell in its own session, polled, never waited on."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str], timeout_s: float, now: float) -> None:
        self.argv = argv
        self.deadline = now + timeout_s
        self.timeout_s = timeout_s
        self.started_at = now
        self.result: ActionResult | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._output = bytearray()
        self._output_total_bytes = 0
        self._killed = False
        if not argv:
            self.result = make_result(ActionKind.HOOK, Outcome.FAILED, argv0="", error="empty argv")
            return
        try:
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd="/",
                close_fds=True,
                # Its own session and process group (pgid == its pid), so a timeout can kill
                # everything it forked, and a terminal's SIGINT for uoomd does not reach it.
                start_new_session=True,
                # Not the daemon's -1000, nice -10 and open-file limit: no environment knob or
                # posix_spawn attribute sets them, so between fork and exec.
                preexec_fn=unprotect_child,  # noqa: PLW1509 -- the daemon is single-threaded
            )
        except (OSError, ValueError) as exc:
            code = getattr(exc, "errno", None)
            self.result = make_result(
                ActionKind.HOOK,
                Outcome.FAILED,
                argv0=argv[0] if argv else "",
                errno=errno.errorcode.get(code, str(code)) if code else None,
                error=type(exc).__name__,
            )
            return
        assert self._proc.stdout is not None
        # Drained without blocking at each poll; a hook that writes faster than we drain just
        # blocks on its full pipe, which its timeout bounds.
        os.set_blocking(self._proc.stdout.fileno(), False)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _drain(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._output_total_bytes += len(chunk)
            room = HOOK_OUTPUT_LIMIT_BYTES - len(self._output)
            if room > 0:
                self._output += chunk[:room]

    def poll(self, now: float) -> ActionResult | None:
        """The final result once the hook is reaped; None while it runs. Kills it past its deadline."""
        if self.result is not None or self._proc is None:
            return self.result
        self._drain()
        code = self._proc.poll()
        if code is None:
            if now >= self.deadline and not self._killed:
                # Our own child, not yet reaped: its PID (== its pgid) cannot have been recycled.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._killed = True
            return None
        if self._killed:
            # The leader is reaped; also kill any member of its group that outlived it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._drain()
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        outcome = Outcome.COMPLETED if code == 0 else Outcome.FAILED
        if self._killed:
            outcome = Outcome.TIMED_OUT
        self.result = make_result(
            ActionKind.HOOK,
            outcome,
            pid=self._proc.pid,
            argv0=self.argv[0],
            exit_code=code,
            duration_s=round(now - self.started_at, 3),
            timeout_s=self.timeout_s,
            output=self._output.decode("utf-8", errors="replace"),
            output_bytes=self._output_total_bytes,
        )
        return self.result

    def wait(self, timeout_s: float, interval_s: float = 0.01) -> ActionResult | None:
        """Poll until finished or ``timeout_s`` passed (tests and shutdown; the loop uses poll())."""
        end = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            result = self.poll(now)
            if result is not None or now >= end:
                return result
            time.sleep(interval_s)


def run_hook(
    argv: tuple[str, ...], env: Iterable[tuple[str, str]], timeout_s: float, now: float | None = None
) -> HookHandle:
    """Start a hook and return at once; its result comes from ``handle.poll(now)``. Never raises.

    Design: a polled handle, not a thread. The daemon loop already wakes every poll interval, the
    result then lands in the loop's own log stream in order, timeouts need no lock, and the daemon
    keeps a single thread (no thread stacks, nothing to join at shutdown)."""
    return HookHandle(tuple(argv), hook_environment(env), timeout_s, time.monotonic() if now is None else now)


class HookRunner:
    """The running hooks of an executor: started by execute(), reaped by poll()."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.running: list[HookHandle] = []

    def start(
        self, argv: tuple[str, ...], env: Iterable[tuple[str, str]], now: float, timeout_s: float | None = None
    ) -> HookHandle:
        """``timeout_s``: this hook's own (before_kill's); None: the runner's."""
        handle = run_hook(argv, env, self.timeout_s if timeout_s is None else timeout_s, now)
        if handle.result is None:
            self.running.append(handle)
        return handle

    def poll(self, now: float) -> tuple[ActionResult, ...]:
        done: list[ActionResult] = []
        still: list[HookHandle] = []
        for handle in self.running:
            result = handle.poll(now)
            if result is None:
                still.append(handle)
            else:
                done.append(result)
        self.running = still
        return tuple(done)

    def next_deadline(self) -> float | None:
        """When the loop must wake to enforce a timeout (None: no hook running)."""
        return min((h.deadline for h in self.running), default=None)
