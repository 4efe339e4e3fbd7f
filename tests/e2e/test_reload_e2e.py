"""A reload never blinds the loop (issue 11): the installed ``uoomd run`` against real hogs while
its policy check is refused (a FIFO) or slow, with a fake NOTIFY_SOCKET counting watchdog pings.

Every daemon guards only a memory cgroup the test created, so it can only signal the test's own
hogs (oom_score_adj 1000); signals go only to the daemon process the test started.

A slow check without a test hook in uoomd: the daemon runs from a venv's interpreter, and the
checker child (python -I, with site-packages: only the daemon runs with -S) imports the
``sitecustomize.py`` in that venv's site-packages first; it sleeps while a marker file exists,
which the test creates only once the daemon is up. PYTHONPATH, which this test used before, no
longer reaches the checker (-I, issue 12); the interpreter's own site-packages is root's.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, uoomd_command, wait_until
from tests.e2e.test_service_e2e import NotifySocket
from uoomd.errors import ExitCode

pytestmark = pytest.mark.e2e

WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2s: the daemon pings every 1 s
SLOW_CHECK_S = 6.0
# The checker's own timeout (uoomd.policy.isolated.CHILD_TIMEOUT_S) is 30 s: "at once" is far
# below it, and far above what a loaded machine adds to a stat and a log line.
AT_ONCE_S = 5.0
ATTEMPTS = 5

SITECUSTOMIZE = """
import os, site, time
# The test's own environment (which may itself be a venv, with uoomd installed editable):
# --system-site-packages would reach the base interpreter's site-packages only.
for parent in {parents!r}:
    site.addsitedir(parent)
if os.path.exists({marker!r}):
    time.sleep({seconds})
"""


class Collector:
    """Receives sd_notify datagrams in a thread, so their receive times are their send times
    (a test busy spawning a hog would otherwise let them queue and stretch the gaps)."""

    def __init__(self, sock: NotifySocket) -> None:
        self.sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sock.drain(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def stamps(self, key: str, since: float = 0.0) -> list[float]:
        return [at for at, message in list(self.sock.messages) if key in message and at >= since]


@pytest.fixture
def collector() -> Iterator[Collector]:
    sock = NotifySocket()
    got = Collector(sock)
    try:
        yield got
    finally:
        got.stop()
        sock.close()


def slow_site(tmp_path: Path, seconds: float) -> tuple[list[str], Path]:
    """The command whose policy checker sleeps ``seconds`` once the returned marker exists."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    marker = tmp_path / "slow-check"
    parents = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    text = SITECUSTOMIZE.format(parents=parents, marker=str(marker), seconds=seconds)
    (Path(site) / "sitecustomize.py").write_text(text)
    return [str(python), "-m", "uoomd"], marker


def start_hog(cg: ScratchCgroup, tmp_path: Path) -> tuple[Path, int]:
    """A hog that would grow past the cgroup's limit (the kernel's OOM killer would act) unless signalled."""
    record = tmp_path / "hog.rec"
    hog = cg.spawn(
        hog_argv(record, "--name", "reloadhog", "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "700")
    )
    return record, hog.pid


def hog_termed(record: Path) -> bool:
    return any(line[0] == "SIGTERM" for line in read_record(record))


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_a_fifo_at_the_policy_path_is_refused_at_once_and_a_hog_right_after_is_still_caught(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path, attempt: int
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path))
    daemon.wait_for("started")
    daemon.policy_path.unlink()
    os.mkfifo(daemon.policy_path)
    sent_at = time.monotonic()
    daemon.process.send_signal(signal.SIGHUP)
    failed = daemon.wait_for("policy_reload_failed", timeout_s=AT_ONCE_S)
    refused_s = time.monotonic() - sent_at
    assert failed["error"] == f"{daemon.policy_path}: not a regular file (a FIFO)"
    assert failed["kept"] == "previous policy"
    assert not daemon.find("policy_check_started"), "a FIFO needs no checker"
    record, hog_pid = start_hog(cgroup, tmp_path)
    assert wait_until(lambda: hog_termed(record), 20), daemon.log_path.read_text()[-3000:]
    assert daemon.wait_for("victim_chosen", action="term")["pid"] == hog_pid
    assert cgroup.oom_kill_count() == 0, "the kernel's OOM killer had to act"
    assert daemon.process.poll() is None
    print(f"\nattempt {attempt}: FIFO refused {refused_s:.3f}s after SIGHUP")


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
def test_during_a_slow_check_a_hog_is_caught_and_the_watchdog_pings_go_on(
    cgroup: ScratchCgroup,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    collector: Collector,
    attempt: int,
) -> None:
    command, marker = slow_site(tmp_path, SLOW_CHECK_S)
    env = {"NOTIFY_SOCKET": collector.sock.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path), env=env, command=command)
    daemon.wait_for("started", timeout_s=30)
    assert wait_until(lambda: collector.stamps("WATCHDOG"), 10), "no watchdog ping before the reload"
    daemon.policy_path.write_text(cgroup_policy(cgroup, tmp_path, term="31%"))
    marker.touch()
    sent_at = time.monotonic()
    daemon.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: collector.stamps("RELOADING", since=sent_at), 10), (
        f"no RELOADING=1 after SIGHUP at {sent_at:.3f}: notify messages {list(collector.sock.messages)[-8:]}; "
        f"log: {daemon.log_path.read_text()[-2000:]}"
    )
    record, hog_pid = start_hog(cgroup, tmp_path)
    assert wait_until(lambda: hog_termed(record), 20), daemon.log_path.read_text()[-3000:]
    assert not daemon.find("policy_reloaded"), "the hog must be caught while the check is still running"
    assert daemon.wait_for("victim_chosen", action="term")["pid"] == hog_pid
    daemon.wait_for("policy_reloaded", timeout_s=60)
    reloaded_at = time.monotonic()
    assert reloaded_at - sent_at >= SLOW_CHECK_S, "the check was not slow: this test proved nothing"
    assert cgroup.oom_kill_count() == 0, "the kernel's OOM killer had to act"
    pings = collector.stamps("WATCHDOG", since=sent_at - WATCHDOG_USEC / 1e6)
    pings = [at for at in pings if at <= reloaded_at + WATCHDOG_USEC / 1e6]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert gaps, pings
    # What systemd checks: no silence as long as WatchdogSec across the whole reload.
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a {max(gaps):.3f}s gap would have let systemd kill the daemon"
    # READY=1 is sent just after policy_reloaded is logged: wait for the datagram, do not race it.
    assert wait_until(lambda: collector.stamps("READY", since=sent_at), 5), "no READY=1 after the reload"
    ready = collector.stamps("READY", since=sent_at)
    assert ready[0] >= sent_at + SLOW_CHECK_S, "READY=1 before the check ended"
    print(
        f"\nattempt {attempt}: reload took {reloaded_at - sent_at:.3f}s, {len(pings)} pings, "
        f"max gap {max(gaps):.3f}s (WatchdogSec {WATCHDOG_USEC / 1e6:g}s)"
    )


def test_sigterm_during_a_slow_check_exits_0_at_once_and_leaves_no_checker(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    command, marker = slow_site(tmp_path, 120)
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path), command=command)
    daemon.wait_for("started", timeout_s=30)
    marker.touch()
    daemon.process.send_signal(signal.SIGHUP)
    children = Path(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children")
    assert wait_until(lambda: children.read_text().split(), 10), "no checker child after SIGHUP"
    [checker] = [int(pid) for pid in children.read_text().split()]
    # Fields after the last ")" (earlyoom's rule): state is the 1st, starttime the 20th.
    started_ticks = Path(f"/proc/{checker}/stat").read_text().rsplit(")", 1)[1].split()[19]
    sent_at = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(AT_ONCE_S) == 0
    stopped_s = time.monotonic() - sent_at
    assert daemon.find("policy_check_started", checker_pid=checker)
    assert daemon.find("policy_check_cancelled", checker_pid=checker)
    assert daemon.find("stopping")

    def same_checker_alive() -> bool:
        try:
            now = Path(f"/proc/{checker}/stat").read_text()
        except FileNotFoundError:
            return False
        return now.rsplit(")", 1)[1].split()[19] == started_ticks

    assert not same_checker_alive(), "the checker outlived the daemon"
    print(f"\nSIGTERM during a slow check: exit 0 after {stopped_s:.3f}s")


def test_uoomd_run_on_a_fifo_exits_with_the_policy_code_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    done = subprocess.run(
        [*uoomd_command(), "run", "--policy", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == ExitCode.POLICY, done.stderr
    assert done.stderr.strip() == f"{fifo}: not a regular file (a FIFO)"
