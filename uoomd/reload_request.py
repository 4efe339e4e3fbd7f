"""`uoomd reload`: SIGHUP the daemon through a verified pidfd, then wait for the outcome of a check started after it.

``ExecReload=/bin/kill -HUP $MAINPID`` returned at once, and `systemctl reload` said done seconds
before the new policy was in force (or refused); systemd 252 (Debian 12) has no
``Type=notify-reload`` to wait on. This command is the unit's ExecReload instead.

The daemon writes how each reload ended to its state file at once (uoomd/statusboard.py ReloadRecord),
stamped with when that reload's check started, on CLOCK_MONOTONIC. A reload whose SIGHUP is sent at
``t`` takes only a record stamped ``>= t``: its check read the policy after this command began,
so after the edit it announces. A check already running at the SIGHUP may have read the file
before; the daemon then runs one more check (uoomd/reload.py coalesces SIGHUPs), and that one's
record is the answer. Two commands at once each wait for a check that started after their own
SIGHUP, and each gets the latest such record: the policy in force when it returns.
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable
from typing import TextIO

from uoomd.errors import ExitCode, NoAnswerError, NotRunningError, PolicyError, SetupError
from uoomd.kill import PidFd, open_victim_checked, send_signal
from uoomd.logs import escape
from uoomd.plan import DaemonPlan
from uoomd.readings import ProcessKey
from uoomd.results import Outcome
from uoomd.status import StateFile, format_age, read_state, state_file_of
from uoomd.statusboard import ReloadRecord
from uoomd.units import format_duration

POLL_S = 0.05  # the state file is re-read this often; the daemon's exit wakes the wait at once
DEFAULT_TIMEOUT_S = 30.0  # the policy checker's own limit (uoomd/policy/isolated.py CHILD_TIMEOUT_S)


def answer(state: StateFile, sent_at: float) -> ReloadRecord | None:
    """The outcome of a reload whose check started at or after ``sent_at`` (None: not yet) (pure)."""
    record = state.reload
    return record if record is not None and record.started_at >= sent_at else None


def reload_state_file(state_file: str | None, policy_path: str | None) -> str:
    """``--state-file``, else the policy's; a policy that does not load (the edit this reload is
    for may have broken it) leaves the default path, where the daemon writes unless told otherwise."""
    if state_file is not None:
        return state_file
    try:
        return state_file_of(policy_path)
    except PolicyError:
        return DaemonPlan().state_file


def run_reload(
    *,
    pid: int | None,
    state_file: str | None,
    policy_path: str | None,
    timeout_s: float,
    out: TextIO,
    err: TextIO,
    proc_root: str = "/proc",
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Exit 0 once the new policy is in force; 1 with the daemon's reasons when it refused it (the
    previous policy still runs); NOT_RUNNING, NO_ANSWER, SETUP otherwise (uoomd/errors.py)."""
    path = reload_state_file(state_file, policy_path)
    state, _data = read_state(path)
    shown = escape(path)
    if pid is not None and pid != state.pid:
        raise SetupError(
            f"the state file {shown} is from pid {state.pid}, not {pid}",
            hint="give the state file this daemon writes (--state-file, or its policy's state_file)",
        )
    key = state.key
    if key is None or not state.reports_reloads:
        raise SetupError(
            f"the daemon that wrote {shown} (pid {state.pid}) does not report reloads",
            hint="it is older than this uoomd command: restart it (systemctl restart uoomd)",
        )
    pidfd = _open(key, state, proc_root)
    try:
        sent_at = clock()
        sent = send_signal(pidfd, signal.SIGHUP)
        if sent.outcome is Outcome.GONE:
            raise NotRunningError(f"the daemon (pid {key.pid}) exited before the reload")
        if sent.outcome is not Outcome.SENT:
            why = sent.detail("errno") or sent.detail("reason") or sent.outcome
            raise SetupError(f"cannot signal the daemon (pid {key.pid}): {why}", hint="run it as root")
        record = _wait(path, key, pidfd, sent_at=sent_at, timeout_s=timeout_s, clock=clock)
    finally:
        pidfd.close()
    if record.outcome == "applied":
        out.write(f"reloaded {escape(record.policy)} (uoomd pid {key.pid})\n")
        return ExitCode.OK
    for line in (record.error or "no reason given").splitlines():
        err.write(escape(line) + "\n")
    err.write(f"uoomd: reload refused; uoomd (pid {key.pid}) goes on with the previous policy\n")
    return ExitCode.POLICY


def _open(key: ProcessKey, state: StateFile, proc_root: str) -> PidFd:
    """A pidfd on the daemon the state file names, verified by its start time (kill.py)."""
    opened = open_victim_checked(proc_root, key)
    if not isinstance(opened, PidFd):
        age = format_age(time.time() - state.updated_at)
        raise NotRunningError(f"the daemon is not running (state file from pid {key.pid}, written {age} ago)")
    return opened


def _wait(
    path: str,
    key: ProcessKey,
    pidfd: PidFd,
    *,
    sent_at: float,
    timeout_s: float,
    clock: Callable[[], float],
) -> ReloadRecord:
    """Re-read the state file until it reports a reload that started after ``sent_at``; the
    daemon's exit (its pidfd readable) or the timeout end the wait."""
    poller = select.poll()
    poller.register(pidfd.fd, select.POLLIN)
    deadline = sent_at + timeout_s
    while True:
        try:
            state, _data = read_state(path)
        except SetupError:
            state = None  # renamed into place: never half a file; another shape is not an answer
        if state is not None and state.key == key:
            record = answer(state, sent_at)
            if record is not None:
                return record
        if pidfd.exited():
            raise NotRunningError(f"the daemon (pid {key.pid}) exited during the reload")
        remaining = deadline - clock()
        if remaining <= 0:
            raise NoAnswerError(
                f"the daemon (pid {key.pid}) reported no reload in {escape(path)} within {format_duration(timeout_s)}",
                hint="its log says what it is doing (journalctl -u uoomd)",
            )
        poller.poll(max(1, round(min(POLL_S, remaining) * 1000)))
