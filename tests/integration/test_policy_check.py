"""A reload's policy check beside the loop (issue 11): uoomd.policy.isolated.PolicyCheck with
real children, and the Daemon that polls it (ticks and watchdog pings go on, SIGHUPs coalesce,
stopping reaps the checker, a FIFO is refused at once)."""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.builders import CHILDREN, make_guard, make_plan
from tests.e2e.daemon_runner import uoomd_command
from uoomd.daemon import Daemon
from uoomd.errors import ExitCode, PolicyError, SetupError
from uoomd.executor import RecordingExecutor
from uoomd.logs import configure
from uoomd.plan import LogFormat, Plan
from uoomd.policy.file import open_regular, refuse_not_regular
from uoomd.policy.isolated import PolicyCheck, checker_argv, load_plan_isolated
from uoomd.service import Notifier

pytestmark = pytest.mark.integration

GOOD = '[daemon]\npoll_max = "2s"\n\n[[guard]]\nname = "system"\n'
BAD = '[daemon]\npoll_mni = "2s"\n\n[[guard]]\nname = "system"\n'
# A promptness bound far above the few ms these take, so a loaded machine cannot fail it,
# and far below the checker's 30 s timeout that a blocking open used to wait for.
AT_ONCE_S = 2.0


def _gone(pid: int) -> bool:
    """Neither running nor a zombie of ours: reaped."""
    return not os.path.exists(f"/proc/{pid}")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _sleeping_checker(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def _answer_file(tmp_path: Path, plan: Plan) -> Path:
    """What the checker child writes for a good policy, so a test checker can be `cat`."""
    path = tmp_path / "answer.pickle"
    path.write_bytes(pickle.dumps(("plan", plan)))
    return path


def _wait_readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "policy.fifo"
    os.mkfifo(path)
    return path


# --- the check object ----------------------------------------------------------------------


def test_a_good_policy_answers_with_its_plan_once_the_childs_pidfd_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    before = _open_fds()
    check = PolicyCheck.start(str(path), time.monotonic())
    assert _wait_readable(check.fileno(), 60), "the checker never exited"
    result = check.poll(time.monotonic())
    assert isinstance(result, Plan), result
    assert result.daemon.poll_max_s == 2.0
    assert result.source == str(path)
    assert _gone(check.pid)
    assert _open_fds() == before, "the pidfd and memfds are closed once answered"
    assert check.poll(time.monotonic()) is result, "the answer stays"


def test_a_bad_policy_answers_with_every_issue_located(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    result = PolicyCheck.start(str(path), time.monotonic()).wait()
    assert isinstance(result, PolicyError)
    assert result.render() == f"{path}:2: daemon.poll_mni: unknown key (did you mean 'poll_min'?)"


@pytest.mark.parametrize("kind", ["FIFO", "character device", "directory"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once_without_a_child(
    tmp_path: Path, fifo: Path, kind: str
) -> None:
    path = {"FIFO": str(fifo), "character device": "/dev/null", "directory": str(tmp_path)}[kind]
    started = time.monotonic()
    with pytest.raises(PolicyError, match="not a regular file") as caught:
        PolicyCheck.start(path, started)
    assert time.monotonic() - started < AT_ONCE_S
    assert caught.value.render() == f"{path}: not a regular file (a {kind})"


def test_a_missing_policy_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        PolicyCheck.start(str(tmp_path / "nope.toml"), time.monotonic())


def test_a_symlink_to_a_regular_file_passes_the_parents_look(tmp_path: Path) -> None:
    target = tmp_path / "good.toml"
    target.write_text(GOOD)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    refuse_not_regular(str(link))  # no error
    result = PolicyCheck.start(str(link), time.monotonic()).wait()
    if os.geteuid() == 0:
        # docs/SECURITY.md 9: root's policy is the file itself, never a symlink (the child says so).
        assert isinstance(result, PolicyError)
        assert result.render() == f"{link}: not a regular file (a symbolic link)"
    else:
        assert isinstance(result, Plan)


def test_the_checker_itself_never_blocks_on_a_fifo(tmp_path: Path, fifo: Path) -> None:
    # A FIFO swapped in after the parent's look: the child opens it O_NONBLOCK and refuses it.
    started = time.monotonic()
    with pytest.raises(PolicyError, match=r"not a regular file \(a FIFO\)"):
        open_regular(str(fifo), nofollow=False)
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    check = PolicyCheck.start(str(good), started, argv=checker_argv(str(fifo)))
    result = check.wait()
    assert isinstance(result, PolicyError), result
    assert result.render() == f"{fifo}: not a regular file (a FIFO)"
    assert time.monotonic() - started < check.timeout_s, "the child waited for a writer"


def test_uoomd_check_on_a_fifo_fails_at_once_with_the_policy_exit_code(fifo: Path) -> None:
    done = subprocess.run(
        [*uoomd_command(), "check", str(fifo)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == ExitCode.POLICY, done.stderr
    assert done.stderr.strip() == f"{fifo}: not a regular file (a FIFO)"


def test_the_start_up_load_refuses_a_fifo_at_once(fifo: Path) -> None:
    started = time.monotonic()
    with pytest.raises(PolicyError, match="a FIFO"):
        load_plan_isolated(str(fifo))
    assert time.monotonic() - started < AT_ONCE_S


def test_a_slow_checker_never_blocks_poll_and_is_killed_and_reaped_at_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    now = time.monotonic()
    check = PolicyCheck.start(str(path), now, timeout_s=1.0, argv=_sleeping_checker(60))
    polled_at = time.monotonic()
    assert check.poll(polled_at) is None
    assert time.monotonic() - polled_at < 0.5, "poll() must return at once while the child runs"
    assert not _wait_readable(check.fileno(), 0.05), "the pidfd is quiet while the child runs"
    due = check.due_in(polled_at)
    assert due is not None
    assert 0 < due <= 1.0
    assert check.poll(check.deadline) is None, "killed at the deadline; its exit answers"
    assert check.due_in(check.deadline) is None, "once killed, the loop waits for the pidfd only"
    assert _wait_readable(check.fileno(), 10), "the killed child never exited"
    result = check.poll(time.monotonic())
    assert isinstance(result, SetupError)
    assert "took longer than 1 s" in str(result)
    assert _gone(check.pid)


def test_cancel_kills_the_checker_and_reaps_it(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    before = _open_fds()
    check = PolicyCheck.start(str(path), time.monotonic(), argv=_sleeping_checker(60))
    pid = check.pid
    assert not _gone(pid)
    check.cancel()
    assert _gone(pid), "a zombie or a live checker was left"
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert _open_fds() == before
    check.cancel()  # twice is fine


def test_a_checker_that_cannot_start_is_a_setup_error_and_leaks_no_fd(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    before = _open_fds()
    with pytest.raises(SetupError, match="cannot run the policy checker"):
        PolicyCheck.start(str(path), time.monotonic(), argv=[str(tmp_path / "no-such-program")])
    assert _open_fds() == before


def test_a_crashing_checker_is_a_setup_error_with_its_last_stderr_lines(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('x' * 100000 + '\\nboom\\n'); sys.exit(3)"]
    result = PolicyCheck.start(str(path), time.monotonic(), argv=argv).wait()
    assert isinstance(result, SetupError)
    assert str(result).startswith("the policy checker failed (exit 3): ")
    assert str(result).endswith("| boom")


# --- the daemon polling it -----------------------------------------------------------------


class RecordingNotifier(Notifier):
    """sd_notify messages kept in a list, with the watchdog on at ``interval_s``."""

    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__()
        self.watchdog_interval_s = interval_s
        self.sent: list[tuple[float, str]] = []

    def _send(self, message: str) -> None:
        self.sent.append((time.monotonic(), message))

    def pings(self) -> list[float]:
        return [at for at, message in self.sent if message == "WATCHDOG=1"]

    def kinds(self) -> list[str]:
        return [message.split("=", 1)[0] for _at, message in self.sent if message != "WATCHDOG=1"]


class Harness:
    def __init__(self, daemon: Daemon, out: io.StringIO, notifier: RecordingNotifier) -> None:
        self.daemon = daemon
        self.out = out
        self.notifier = notifier
        self.ticks = 0

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]

    def spin(self, until: Callable[[], bool], timeout_s: float) -> bool:
        """The body of Daemon.run() (tick, wait, signals, check) until ``until()`` or the timeout."""
        end = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > end:
                return False
            self.daemon.wait(self.daemon.tick(self.daemon.clock()))
            self.daemon._handle_signals()
            self.daemon.reloads.poll(self.daemon.clock())
            self.ticks += 1
        return True


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Daemon] = []
    proc_root = tmp_path / "proc"
    shutil.copytree(CHILDREN, proc_root, symlinks=True)
    (proc_root / "meminfo").write_text(
        "MemTotal: 4194304 kB\nMemFree: 1024 kB\nMemAvailable: 3145728 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
    )

    def make(
        policy_path: Path,
        start_check: Callable[[str, float], PolicyCheck] = PolicyCheck.start,
        *,
        poll_max_s: float = 0.2,
        watchdog_s: float | None = None,
    ) -> Harness:
        base = make_plan()
        plan = replace(
            base,
            source=str(policy_path),
            daemon=replace(base.daemon, poll_max_s=poll_max_s, state_file=str(tmp_path / "state.json")),
        )
        out = io.StringIO()
        notifier = RecordingNotifier(watchdog_s)
        daemon = Daemon(
            plan,
            executor=RecordingExecutor(),
            log=configure(LogFormat.JSON, out),
            notifier=notifier,
            proc_root=str(proc_root),
            start_check=start_check,
        )
        made.append(daemon)
        daemon.open()
        return Harness(daemon, out, notifier)

    try:
        yield make
    finally:
        for daemon in made:
            daemon.close()


def _new_plan(tmp_path: Path, name: str, poll_max_s: float = 0.2) -> Plan:
    base = make_plan(guards=(make_guard(name),))
    return replace(
        base,
        source=str(tmp_path / "policy.toml"),
        daemon=replace(base.daemon, poll_max_s=poll_max_s, state_file=str(tmp_path / "state.json")),
    )


def _cat_after(seconds: float, answer: Path) -> Callable[[str, float], PolicyCheck]:
    """A checker that answers ``answer`` after ``seconds``: a slow check, without pydantic's start-up."""

    def start(path: str, now: float) -> PolicyCheck:
        return PolicyCheck.start(path, now, argv=["/bin/sh", "-c", f'sleep {seconds}; exec cat "$0"', str(answer)])

    return start


def test_the_loop_ticks_and_pings_the_watchdog_while_a_slow_check_runs(
    tmp_path: Path, harness: Callable[..., Harness]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    answer = _answer_file(tmp_path, _new_plan(tmp_path, "reloaded"))
    h = harness(policy, _cat_after(1.5, answer), watchdog_s=0.1)
    h.spin(lambda: len(h.notifier.pings()) >= 2, 10)
    started = time.monotonic()
    h.daemon.reload()
    assert time.monotonic() - started < 0.5, "reload() only starts the check"
    [check] = h.events("policy_check_started")
    assert h.spin(lambda: bool(h.events("policy_reloaded")), 30), h.out.getvalue()
    assert _gone(check["checker_pid"])
    assert [w.guard.name for w in h.daemon.watches] == ["reloaded"]
    pings = [at for at in h.notifier.pings() if at >= started]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Pings every 0.1 s; the 1.5 s check would have been one 1.5 s gap had the loop waited.
    assert len(pings) >= 5, pings
    assert max(gaps) < 1.0, f"the loop stalled during the check: {max(gaps):.3f}s between pings"
    assert h.ticks >= 5
    assert h.notifier.kinds()[-2:] == ["RELOADING", "READY"]


def test_the_checkers_exit_wakes_the_loop_not_its_next_poll(tmp_path: Path, harness: Callable[..., Harness]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    answer = _answer_file(tmp_path, _new_plan(tmp_path, "reloaded", poll_max_s=60.0))
    h = harness(policy, _cat_after(0.2, answer), poll_max_s=60.0)
    h.spin(lambda: h.ticks >= 2, 5)
    started = time.monotonic()
    h.daemon.reload()
    assert h.spin(lambda: bool(h.events("policy_reloaded")), 60)
    assert time.monotonic() - started < 30, "the loop slept its 60 s poll_max past the checker's exit"


def test_a_sighup_during_a_check_is_coalesced_into_one_more_check(
    tmp_path: Path, harness: Callable[..., Harness]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    answer = _answer_file(tmp_path, _new_plan(tmp_path, "reloaded"))
    h = harness(policy, _cat_after(0.5, answer))
    h.daemon.reload()
    first = h.events("policy_check_started")[0]["checker_pid"]
    h.daemon.reload()
    h.daemon.reload()
    assert len(h.events("policy_reload_coalesced")) == 2
    assert h.spin(lambda: len(h.events("policy_reloaded")) == 2, 30), h.out.getvalue()
    checks = [e["checker_pid"] for e in h.events("policy_check_started")]
    assert len(checks) == 2, "two SIGHUPs during a check make one more check"
    assert checks[0] == first, "the check under way was not restarted"
    assert all(_gone(pid) for pid in checks)
    # systemd hears RELOADING=1 per SIGHUP, and READY=1 once, after the last check.
    assert h.notifier.kinds()[-4:] == ["RELOADING", "RELOADING", "RELOADING", "READY"]
    h.spin(lambda: h.ticks >= 3, 5)
    assert len(h.events("policy_check_started")) == 2


def test_a_fifo_at_the_policy_path_fails_the_reload_at_once_and_keeps_the_policy(
    tmp_path: Path, harness: Callable[..., Harness]
) -> None:
    policy = tmp_path / "policy.toml"
    os.mkfifo(policy)
    h = harness(policy)
    started = time.monotonic()
    h.daemon.reload()
    assert time.monotonic() - started < AT_ONCE_S
    [failed] = h.events("policy_reload_failed")
    assert failed["error"] == f"{policy}: not a regular file (a FIFO)"
    assert failed["kept"] == "previous policy"
    assert not h.events("policy_check_started"), "no child for a FIFO"
    assert [w.guard.name for w in h.daemon.watches] == ["system"]
    assert h.notifier.kinds()[-2:] == ["RELOADING", "READY"]


def test_a_bad_policy_fails_the_reload_with_located_errors_and_keeps_the_policy(
    tmp_path: Path, harness: Callable[..., Harness]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(BAD)
    h = harness(policy)
    h.daemon.reload()
    assert h.spin(lambda: bool(h.events("policy_reload_failed")), 60)
    error = h.events("policy_reload_failed")[0]["error"]
    assert error == f"{policy}:2: daemon.poll_mni: unknown key (did you mean 'poll_min'?)"
    assert h.daemon.plan.source == str(policy)
    assert [w.guard.name for w in h.daemon.watches] == ["system"]


def test_stopping_during_a_check_kills_and_reaps_the_checker(tmp_path: Path, harness: Callable[..., Harness]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    h = harness(policy, lambda path, now: PolicyCheck.start(path, now, argv=_sleeping_checker(60)))
    h.daemon.reload()
    pid = h.events("policy_check_started")[0]["checker_pid"]
    h.spin(lambda: h.ticks >= 2, 5)
    assert not _gone(pid)
    started = time.monotonic()
    h.daemon.close()
    assert time.monotonic() - started < AT_ONCE_S
    assert _gone(pid), "the checker outlived the daemon, or was left a zombie"
