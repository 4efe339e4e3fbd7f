"""``uoomd run`` end to end: the installed command against real hogs in a real memory cgroup.

Every daemon here guards only a cgroup the test created, so it can only ever signal the
test's own hogs; the hogs run at oom_score_adj 1000. Each test asserts the kernel's own
memcg OOM killer never had to act (oom_kill stays 0).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup, scratch_cgroup
from tests.e2e.daemon_runner import HOGS, RunningDaemon, hog_argv, read_record, wait_until
from tests.thrash import THRASH_PROGRAM, thrash_file

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def hog_events(path: Path, kind: str) -> list[list[str]]:
    return [line for line in read_record(path) if line[0] == kind]


def test_hog_gets_sigterm_before_the_kernel_oom_killer_acts(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path))
    daemon.wait_for("started")
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(hog_argv(record, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900", "--hold"))
    assert wait_until(lambda: hog_events(record, "SIGTERM"), 20), daemon.log_path.read_text()[-3000:]
    hog.wait(10)
    term_mib = int(hog_events(record, "SIGTERM")[0][2])
    assert term_mib * MIB < CGROUP_LIMIT_BYTES, "the hog got past the cgroup's limit before SIGTERM"
    assert not hog_events(record, "HOLD"), "the hog reached its target: nothing stopped it"
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == hog.pid
    assert chosen["guard"] == "test"
    assert daemon.find("action_result", action="signal", outcome="sent", pid=hog.pid)
    assert cgroup.oom_kill_count() == 0


def test_hog_that_ignores_sigterm_gets_sigkill_after_term_timeout(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # Holds at 400 MiB: below the term level (30% of 512 MiB available), above the kill level.
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, term_timeout="1s"))
    daemon.wait_for("started")
    record = tmp_path / "stubborn.rec"
    hog = cgroup.spawn(hog_argv(record, "--mib-per-step", "32", "--max-mib", "400", "--hold", "--ignore-term"))
    hog.wait(20)
    assert hog.returncode == -signal.SIGKILL
    terms = hog_events(record, "SIGTERM")
    assert len(terms) == 1, "a victim that ignores SIGTERM must never get a second one (earlyoom#373)"
    term_at = daemon.wait_for("victim_chosen", action="term")
    kill_at = daemon.wait_for("victim_escalated", pid=hog.pid, action="kill", trigger="term_timeout")
    assert kill_at["timestamp"] > term_at["timestamp"]
    assert cgroup.oom_kill_count() == 0


def test_protected_hog_is_spared_and_the_other_one_is_chosen(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    rules = """
[[rule]]
name = "keep-it"
match = { name = "^keephog$" }
protect = true

[[rule]]
name = "prefer-it"
match = { name = "^spillhog$" }
adjust = 500
"""
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, extra=rules))
    daemon.wait_for("started")
    keep_rec, spill_rec = tmp_path / "keep.rec", tmp_path / "spill.rec"
    # The protected hog is the bigger one: the kernel alone would pick it.
    keep = cgroup.spawn(hog_argv(keep_rec, "--name", "keephog", "--max-mib", "250", "--hold"))
    assert wait_until(lambda: hog_events(keep_rec, "HOLD"), 20)
    spill = cgroup.spawn(
        hog_argv(spill_rec, "--name", "spillhog", "--mib-per-step", "16", "--interval-ms", "5", "--max-mib", "400")
    )
    spill.wait(20)
    assert hog_events(spill_rec, "SIGTERM")
    assert not hog_events(keep_rec, "SIGTERM")
    assert keep.poll() is None
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == spill.pid
    assert "prefer-it" in chosen["rules"]
    assert cgroup.oom_kill_count() == 0


def test_dry_run_sends_nothing_and_logs_would_term(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path), "--dry-run")
    daemon.wait_for("started", dry_run=True)
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(hog_argv(record, "--max-mib", "400", "--hold"))
    chosen = daemon.wait_for("victim_chosen", action="would_term")
    assert chosen["pid"] == hog.pid
    time.sleep(1.0)
    assert hog.poll() is None
    assert not hog_events(record, "SIGTERM")
    assert daemon.find("action_result", outcome="dry_run", pid=hog.pid)
    assert not daemon.find("action_result", outcome="sent")
    assert cgroup.oom_kill_count() == 0


def test_two_hogs_in_a_row_are_handled_one_after_the_other(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, kill_timeout="2s"))
    daemon.wait_for("started")
    pids = []
    for n in range(2):
        record = tmp_path / f"hog{n}.rec"
        hog = cgroup.spawn(hog_argv(record, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900", "--hold"))
        pids.append(hog.pid)
        hog.wait(20)
        assert hog_events(record, "SIGTERM"), f"hog {n} was not stopped"
        assert not hog_events(record, "HOLD")
    chosen = [e["pid"] for e in daemon.find("victim_chosen", action="term")]
    assert chosen == pids
    assert cgroup.oom_kill_count() == 0


def test_psi_trigger_on_page_cache_thrash_fires_and_the_guard_acts(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # A 64 MiB cgroup whose member re-reads a 48 MiB file beside 40 MiB of its own memory:
    # the cache is reclaimed and re-read all the time, a real memory stall, never an OOM.
    with scratch_cgroup(limit_bytes=64 * MIB, prefer="v1") as cg:
        if cg.pressure_path is None:
            pytest.skip("no cgroup2 memory.pressure for the test cgroup: PSI cannot be observed here")
        psi = """
psi_mem_gate = "100%"
  [[guard.psi]]
  kind = "some"
  stall = "50ms"
  window = "2s"
  sustain = "0s"
  action = "term"
"""
        text = cgroup_policy(cg, tmp_path, term="1%", kill="0.5%", guard_extra=psi)
        with thrash_file(tmp_path) as data:
            daemon = start_daemon(text)
            daemon.wait_for("started")
            armed = daemon.wait_for("psi_trigger_armed")
            assert armed["mode"] in {"kernel", "kernel-rounded", "polled"}
            thrasher = cg.spawn([sys.executable, "-c", THRASH_PROGRAM, data])
            thrasher.wait(30)
            assert thrasher.returncode == -signal.SIGTERM
            fired = daemon.wait_for("trigger_fired")
            assert fired["trigger"].startswith("psi[0] some")
            chosen = daemon.wait_for("victim_chosen", action="term")
            assert chosen["pid"] == thrasher.pid
            assert chosen["trigger"].startswith("psi[0]")
        assert cg.oom_kill_count() == 0


def test_after_kill_hook_runs_with_the_victims_facts(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    out = tmp_path / "hook.env"
    # The hook program is the admin's choice (here a shell); uoomd itself never uses one.
    hooks = f"""
[hooks]
after_kill = ["/bin/sh", "-c", "env | grep ^UOOMD_ | sort > \\"$0\\"", "{out}"]
timeout = "5s"
"""
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, extra=hooks))
    daemon.wait_for("started")
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(
        hog_argv(record, "--name", "hookhog", "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900")
    )
    hog.wait(20)
    assert wait_until(lambda: out.exists() and out.read_text(), 10)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env["UOOMD_PID"] == str(hog.pid)
    assert env["UOOMD_NAME"] == "hookhog"
    assert env["UOOMD_SIGNAL"] == "SIGTERM"
    assert env["UOOMD_GUARD"] == "test"
    assert daemon.wait_for("action_result", action="hook", outcome="completed")
    assert cgroup.oom_kill_count() == 0


def test_the_running_daemon_stays_small(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # Like earlyoom's suite: pin the footprint. nohang 0.2 idles at ~17 MiB here (BENCHMARKS.md);
    # uoomd's loop runs in an isolated interpreter without pydantic, psutil or structlog (~16 MiB).
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path))
    started = daemon.wait_for("started")
    time.sleep(1.5)
    pid = daemon.process.pid
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    # The loop names itself (issue 13): `uoomd run --policy FILE`, and says it runs isolated (-I -S).
    # (written in place, setproctitle-style, as one string: ps shows it as it reads)
    assert b" ".join(argv).startswith(b"uoomd run --policy "), argv
    assert started["isolated"] is True, "the daemon should run in an isolated interpreter (-I -S)"
    assert rss_kib < 18 * 1024, f"daemon RSS {rss_kib} KiB"
    assert fds < 32, f"daemon holds {fds} fds"


_FORKING_HOG = """
import os, subprocess, sys
hogs, rec_parent, rec_child = sys.argv[1:4]
# A helper in the same process group, holding nothing: only a group victim reaches it.
subprocess.Popen([sys.executable, hogs, "--record", rec_child, "--max-mib", "0", "--hold"])
os.execv(sys.executable, [sys.executable, hogs, "--record", rec_parent, "--mib-per-step", "32",
                          "--interval-ms", "5", "--max-mib", "900", "--hold"])
"""


def test_process_group_victim_signals_the_whole_group(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, guard_extra='victim = "process-group"'))
    daemon.wait_for("started")
    parent_rec, child_rec = tmp_path / "parent.rec", tmp_path / "child.rec"
    # Its own session: the group is the hog's, never the test's or the daemon's.
    hog = cgroup.spawn(
        [sys.executable, "-c", _FORKING_HOG, str(HOGS), str(parent_rec), str(child_rec)], start_new_session=True
    )
    hog.wait(20)
    assert hog_events(parent_rec, "SIGTERM")
    assert wait_until(lambda: hog_events(child_rec, "SIGTERM"), 10), "the group's other member was not signalled"
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == hog.pid
    assert daemon.find("action_result", action="signal", outcome="sent", pid=hog.pid)
    assert cgroup.oom_kill_count() == 0


def test_cgroup_victim_signals_every_member_of_the_victims_cgroup(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, guard_extra='victim = "cgroup"'))
    daemon.wait_for("started")
    idle_rec, grow_rec = tmp_path / "idle.rec", tmp_path / "grow.rec"
    idle = cgroup.spawn(hog_argv(idle_rec, "--max-mib", "0", "--hold"))
    assert wait_until(lambda: hog_events(idle_rec, "HOLD"), 10)
    grow = cgroup.spawn(hog_argv(grow_rec, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900", "--hold"))
    grow.wait(20)
    idle.wait(20)
    assert hog_events(grow_rec, "SIGTERM")
    assert hog_events(idle_rec, "SIGTERM"), "every member of the victim's cgroup is signalled"
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == grow.pid
    assert chosen["victim_kind"] == "cgroup"
    assert cgroup.oom_kill_count() == 0
