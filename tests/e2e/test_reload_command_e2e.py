"""`uoomd reload` (the unit's ExecReload, issue 13) against the installed `uoomd run` and real hogs:
it returns once the new policy is in force, exits 1 with `uoomd check`'s words when the daemon
refused it (the old policy guarding on), and two at once, one during the other's slow check,
each wait for a check that started after their own SIGHUP.

Every daemon guards only a memory cgroup the test created, so it can only signal the test's own
hogs (oom_score_adj 1000); SIGHUP goes only to the daemon the test started, through the command.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, uoomd_command, wait_until
from tests.e2e.test_reload_e2e import slow_site
from uoomd.errors import ExitCode
from uoomd.status import read_state

pytestmark = pytest.mark.e2e

SLOW_CHECK_S = 3.0  # each policy check sleeps this long before it reads the file (slow_site)


def policy(cg: ScratchCgroup, tmp_path: Path, *, term: str) -> str:
    return cgroup_policy(cg, tmp_path, term=term, kill="1%", term_timeout="30s", max_kills=None, poll_max="500ms")


def reload_argv(daemon: RunningDaemon, tmp_path: Path) -> list[str]:
    """As the unit runs it (`--pid $MAINPID`), with this test's state file."""
    return [*uoomd_command(), "reload", "--pid", str(daemon.process.pid), "--state-file", str(tmp_path / "state.json")]


def reload(daemon: RunningDaemon, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        reload_argv(daemon, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def start_holding_hog(cg: ScratchCgroup, tmp_path: Path, mib: int) -> tuple[subprocess.Popen[bytes], Path]:
    record = tmp_path / f"hog{mib}.rec"
    hog = cg.spawn(hog_argv(record, "--name", "reloadhog", "--max-mib", str(mib), "--hold"))
    assert wait_until(lambda: [r for r in read_record(record) if r[0] == "HOLD"], 20), "the hog never reached its size"
    return hog, record


def test_a_good_policy_is_in_force_when_reload_returns(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path, term="1%"))
    daemon.wait_for("started")
    hog, _record = start_holding_hog(cgroup, tmp_path, 300)  # about 40% of 512 MiB left: above 1%
    daemon.policy_path.write_text(policy(cgroup, tmp_path, term="60%"))
    done = reload(daemon, tmp_path)
    # Read at once, no waiting: the command returned, so the daemon has already said it.
    state, _data = read_state(str(tmp_path / "state.json"))
    assert (done.returncode, done.stderr) == (ExitCode.OK, ""), daemon.log_path.read_text()[-2000:]
    assert done.stdout == f"reloaded {daemon.policy_path} (uoomd pid {daemon.process.pid})\n"
    assert state.reload is not None
    assert state.reload.outcome == "applied"
    levels = state.guards[0].levels
    assert levels is not None
    assert "60%" in levels, levels
    assert daemon.find("policy_reloaded")
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert (chosen["pid"], chosen["term_threshold_bytes"]) == (hog.pid, int(CGROUP_LIMIT_BYTES * 0.6))


def test_a_bad_policy_exits_1_with_its_file_line_and_key_and_the_old_one_guards_on(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path, term="60%"))
    daemon.wait_for("started")
    bad = policy(cgroup, tmp_path, term="1%").replace('poll_min = "10ms"', 'poll_mni = "10ms"')
    daemon.policy_path.write_text(bad)
    checked = subprocess.run(
        [*uoomd_command(), "check", str(daemon.policy_path)], capture_output=True, text=True, check=False
    )
    done = reload(daemon, tmp_path)
    assert (done.returncode, done.stdout) == (ExitCode.POLICY, ""), done.stderr
    lines = done.stderr.splitlines()
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "poll_mni" in text)
    assert lines[0].startswith(f"{daemon.policy_path}:{line}: daemon.poll_mni: unknown key")
    assert lines[:-1] == checked.stderr.splitlines(), "the daemon's reasons read as `uoomd check` says them"
    assert lines[-1] == f"uoomd: reload refused; uoomd (pid {daemon.process.pid}) goes on with the previous policy"
    # The previous policy's 60% acts on a hog that grows past it (the refused one said 1%).
    hog = cgroup.spawn(hog_argv(tmp_path / "hog.rec", "--name", "reloadhog", "--max-mib", "300", "--hold"))
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert (chosen["pid"], chosen["term_threshold_bytes"]) == (hog.pid, int(CGROUP_LIMIT_BYTES * 0.6))


def test_two_reloads_at_once_each_wait_for_a_check_that_started_after_their_sighup(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    command, marker = slow_site(tmp_path, SLOW_CHECK_S)
    daemon = start_daemon(policy(cgroup, tmp_path, term="30%"), command=command)
    daemon.wait_for("started", timeout_s=30)
    marker.touch()  # from now on each check sleeps before it reads the file
    daemon.policy_path.write_text(policy(cgroup, tmp_path, term="31%"))
    first = subprocess.Popen(reload_argv(daemon, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemon.wait_for("policy_check_started")
    daemon.policy_path.write_text(policy(cgroup, tmp_path, term="32%"))
    before_second = time.monotonic()  # the second command's SIGHUP is later still
    second = subprocess.Popen(reload_argv(daemon, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemon.wait_for("policy_reload_coalesced")  # its SIGHUP came during the first check

    # Seen as soon as it exits: the record the second command returned on (or a later one).
    assert wait_until(lambda: second.poll() is not None, 120)
    state, _data = read_state(str(tmp_path / "state.json"))
    out, err = second.communicate()
    assert (second.returncode, err) == (ExitCode.OK, ""), daemon.log_path.read_text()[-3000:]
    assert state.reload is not None
    assert state.reload.started_at >= before_second, "it returned on the check running at its SIGHUP"
    assert len(daemon.find("policy_reloaded")) == 2
    first_out, first_err = first.communicate(timeout=60)
    assert (first.returncode, first_err) == (ExitCode.OK, "")
    assert first_out.startswith("reloaded ")
    assert out.startswith("reloaded ")
    levels = json.loads((tmp_path / "state.json").read_text())["guards"][0]["levels"]
    assert "32%" in levels, levels
