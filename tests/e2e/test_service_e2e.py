"""``uoomd run`` as a service: sd_notify over a real NOTIFY_SOCKET, reload, stop, the kill line.

Every daemon guards only a cgroup the test created (so it can only signal the test's own
hogs, at oom_score_adj 1000); signals go only to the daemon process the test started.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, uoomd_command, wait_until

pytestmark = pytest.mark.e2e

MIB = 1 << 20
WATCHDOG_USEC = 200_000  # pings every 0.1 s (half the interval, sd_watchdog_enabled(3))


# Python 3.11's socket module lacks it: include/uapi/asm-generic/socket.h SO_TIMESTAMPNS_OLD
# (x86-64 and arm64 alike); its control message type is the same number (SCM_TIMESTAMPNS).
SO_TIMESTAMPNS = 35


class NotifySocket:
    """The systemd side of sd_notify: a unix datagram socket bound by the test."""

    def __init__(self) -> None:
        # A short directory: sun_path holds 108 bytes, pytest's tmp_path can be longer.
        self._dir = tempfile.mkdtemp(prefix="uoomd-notify-")
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        # The kernel stamps each datagram as it arrives (SO_TIMESTAMPNS): gaps between messages
        # are the daemon's, not how late this test got round to reading them on a busy machine
        # (receive-time stamps gave a 0.51 s "gap" between STATUS lines sent 1 s apart, at load).
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (arrival, monotonic s; message)

    def drain(self, wait_s: float = 0.0) -> None:
        """Receive every datagram that arrives within wait_s."""
        deadline = time.monotonic() + wait_s
        while True:
            self.sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
            except (TimeoutError, BlockingIOError):
                if time.monotonic() >= deadline:
                    return
                continue
            # Kept on the monotonic clock, as tests compare stamps with time.monotonic():
            # the kernel's CLOCK_REALTIME stamp, moved back by how long ago it was.
            arrived = time.monotonic()
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    arrived -= max(0.0, time.time() - (sec + nsec / 1e9))
            pairs = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((arrived, pairs))

    def wait_for(self, key: str, timeout_s: float = 15.0, after: int = 0) -> int:
        """Index of the first message at or after ``after`` that carries ``key``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index in range(after, len(self.messages)):
                if key in self.messages[index][1]:
                    return index
            self.drain(0.05)
        raise AssertionError(f"no {key} within {timeout_s}s; got {[m for _, m in self.messages][-10:]}")

    def keys(self, start: int = 0) -> list[str]:
        return [key for _, message in self.messages[start:] for key in message]

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


def policy(cg: ScratchCgroup, tmp_path: Path, *, term: str = "1%", kill: str = "0.5%", extra: str = "") -> str:
    """Levels below any hog's reach unless a test raises them: these tests are about the service."""
    return cgroup_policy(
        cg, tmp_path, term=term, kill=kill, term_timeout="30s", max_kills=None, poll_max="500ms", guard_extra=extra
    )


def notify_env(sock: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def start_holding_hog(cg: ScratchCgroup, tmp_path: Path, mib: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    record = tmp_path / f"hog{mib}.rec"
    hog = cg.spawn(hog_argv(record, "--name", "svchog", "--max-mib", str(mib), "--hold", *extra))
    assert wait_until(lambda: [r for r in read_record(record) if r[0] == "HOLD"], 20), "the hog never reached its size"
    return hog, record


# --- sd_notify ---------------------------------------------------------------------------------


def test_ready_comes_once_with_a_status_line_after_the_first_readings_then_watchdog_pings(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path, notify: NotifySocket
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path), env=notify_env(notify))
    ready = notify.wait_for("READY")
    assert notify.keys(0)[0] == "READY", "nothing may come before READY=1 (not even a watchdog ping)"
    status = notify.messages[ready][1]["STATUS"]
    # "mem N% avail": a reading was taken before READY; a cgroup without swap says so.
    assert status.startswith("mem "), status
    assert "% avail, no swap, last kill: none" in status, status
    assert daemon.find("started"), "READY=1 before the policy was loaded and the loop started"
    notify.drain(1.0)
    pings = [t for t, m in notify.messages[ready + 1 :] if "WATCHDOG" in m]
    assert len(pings) >= 6, f"{len(pings)} watchdog pings in 1 s with WATCHDOG_USEC={WATCHDOG_USEC}"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a gap of {max(gaps):.3f}s would have let systemd kill us"
    assert notify.keys(ready + 1).count("READY") == 0


def test_status_follows_what_the_daemon_sees_at_most_once_a_second(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path, notify: NotifySocket
) -> None:
    start_daemon(policy(cgroup, tmp_path), env=notify_env(notify))
    ready = notify.wait_for("READY")
    first = notify.messages[ready][1]["STATUS"]
    start_holding_hog(cgroup, tmp_path, 200)  # 512 MiB -> about 60% available
    changed = notify.wait_for("STATUS", after=ready + 1, timeout_s=10)
    assert notify.messages[changed][1]["STATUS"] != first
    notify.drain(2.0)
    stamps = [t for t, m in notify.messages if "STATUS" in m and "READY" not in m]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # The daemon spaces them >= 1 s at the send; the kernel's arrival stamps follow the send
    # within scheduling noise (a datagram is queued in the sender's sendmsg()).
    assert all(gap >= 0.9 for gap in gaps), f"STATUS more often than once a second: {gaps}"
    assert notify.messages[-1][1].get("STATUS", notify.messages[changed][1]["STATUS"]).startswith("mem ")


def test_sighup_sends_reloading_then_ready_in_that_order(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path, notify: NotifySocket
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path), env=notify_env(notify))
    ready = notify.wait_for("READY")
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", after=ready + 1)
    assert notify.messages[reloading][1]["MONOTONIC_USEC"].isdigit()  # systemd 253+ wants it with RELOADING=1
    ready_again = notify.wait_for("READY", after=reloading + 1)
    assert ready_again > reloading
    daemon.wait_for("policy_reloaded")


def test_a_stalled_loop_stops_the_watchdog_pings(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path, notify: NotifySocket
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path), env=notify_env(notify))
    notify.wait_for("READY")
    notify.wait_for("WATCHDOG")
    pid = daemon.process.pid  # the daemon this test started, and only it
    os.kill(pid, signal.SIGSTOP)
    try:
        notify.drain(0.15)  # a datagram already in flight
        stopped_at = len(notify.messages)
        notify.drain(3 * WATCHDOG_USEC / 1e6)
        assert "WATCHDOG" not in notify.keys(stopped_at), "pings kept coming from a stopped loop"
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = len(notify.messages)
    notify.wait_for("WATCHDOG", after=resumed, timeout_s=2)


# --- reload and stop --------------------------------------------------------------------------


def test_bad_reload_keeps_the_old_policy_and_a_good_one_takes_effect(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path, term="1%"))
    daemon.wait_for("started")
    hog, record = start_holding_hog(cgroup, tmp_path, 300)  # about 40% of 512 MiB left
    # The new term level would act on the hog, but a typo elsewhere makes the file invalid:
    # nothing of it may be applied.
    bad = policy(cgroup, tmp_path, term="60%").replace('poll_min = "10ms"', 'poll_mni = "10ms"')
    daemon.policy_path.write_text(bad)
    checked = subprocess.run(
        [*uoomd_command(), "check", str(daemon.policy_path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode != 0
    daemon.process.send_signal(signal.SIGHUP)
    failed = daemon.wait_for("policy_reload_failed")
    assert failed["error"] == checked.stderr.strip(), "the reload error must read as `uoomd check` says it"
    assert "poll_mni" in failed["error"]
    time.sleep(1.5)
    assert not daemon.find("victim_chosen"), "a policy that failed to load was acted on"
    assert hog.poll() is None
    daemon.policy_path.write_text(policy(cgroup, tmp_path, term="60%"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("policy_reloaded")
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == hog.pid
    assert chosen["term_threshold_bytes"] == int(CGROUP_LIMIT_BYTES * 0.6)
    assert wait_until(lambda: [r for r in read_record(record) if r[0] == "SIGTERM"], 10)


def test_sigterm_during_an_escalation_logs_the_guard_in_flight_and_exits_0(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path, term="60%"))
    daemon.wait_for("started")
    hog, _record = start_holding_hog(cgroup, tmp_path, 300, "--ignore-term")
    daemon.wait_for("victim_chosen", action="term")  # term_timeout is 30 s: the guard stays in term_sent
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(10) == 0
    stopping = daemon.wait_for("stopping")
    assert stopping["in_flight"] == ["test"]
    assert hog.poll() is None, "stopping must not kill the victim in flight"


# --- the kill line ------------------------------------------------------------------------------


def test_the_kill_line_carries_the_facts_the_kernel_prints_for_a_real_hog(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path, term="1%"))
    daemon.wait_for("started")
    hog, _record = start_holding_hog(cgroup, tmp_path, 300)
    # Only now raise the term level, so the hog is judged at the size it holds.
    daemon.policy_path.write_text(policy(cgroup, tmp_path, term="60%"))
    daemon.process.send_signal(signal.SIGHUP)
    line = daemon.wait_for("victim_chosen", action="term")
    # mm/oom_kill.c __oom_kill_process(): pid, comm, total-vm, anon-rss, file-rss, shmem-rss,
    # UID, pgtables, oom_score_adj; ours: guard, trigger, rules, badness.
    assert line["pid"] == hog.pid
    assert line["name"] == "svchog"
    assert 290 * MIB <= line["anon_rss_bytes"] <= 330 * MIB, line["anon_rss_bytes"]
    assert line["total_vm_bytes"] >= line["anon_rss_bytes"] + line["file_rss_bytes"]
    assert 0 < line["file_rss_bytes"] < 64 * MIB  # the interpreter's mapped text
    assert 0 <= line["shmem_rss_bytes"] < MIB
    assert line["uid"] == os.getuid() == 0
    # 300 MiB of anon memory needs 600 KiB of last-level page tables (4 KiB maps 2 MiB).
    assert 600 * 1024 <= line["pgtables_bytes"] < 4 * MIB, line["pgtables_bytes"]
    assert line["oom_score_adj"] == 1000
    assert line["guard"] == "test"
    assert line["trigger"] == "mem_available_term"
    assert line["rules"] == []
    assert line["badness"] > 0


def test_a_kill_with_notify_desktop_sends_one_notice_and_a_missing_bus_is_a_log_line(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    def with_notices(term: str) -> str:
        return policy(cgroup, tmp_path, term=term).replace(
            'log_format = "json"', 'log_format = "json"\nnotify_desktop = true'
        )

    daemon = start_daemon(with_notices("1%"))
    daemon.wait_for("started")
    hog, _record = start_holding_hog(cgroup, tmp_path, 300)
    daemon.policy_path.write_text(with_notices("60%"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("victim_chosen", action="term")
    assert hog.wait(10) == 0  # the hog exits on SIGTERM
    kinds = ("desktop_notice_sent", "desktop_notice_failed", "desktop_notice_skipped")
    assert wait_until(lambda: [e for e in daemon.events() if e.get("event") in kinds], 10), "no notice after a kill"
    if not os.path.isdir("/run/user"):
        skipped = daemon.wait_for("desktop_notice_skipped")
        assert skipped["reason"] == "no session bus"
    time.sleep(0.5)
    assert daemon.process.poll() is None, "a notice must never stop the daemon"
    notices = [e for e in daemon.events() if e.get("event") in kinds]
    assert len({e.get("uid", -1) for e in notices}) == len(notices), "one notice per bus per victim"
