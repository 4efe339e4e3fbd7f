"""The daemon is `uoomd` to ps, pgrep and the policy's rules (issue 13), whether it was started as the
installed script or from a venv's interpreter, and its interpreter still works (a reload's policy
checker is started as sys.executable); reports leave the running daemon out.

Each daemon runs in dry-run and guards only a memory cgroup the test created: it signals nothing,
and only the daemon processes the test started are stopped (by PID)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, daemon_fixture, uoomd_command
from tests.e2e.test_reload_e2e import slow_site
from uoomd.errors import ExitCode
from uoomd.report import REASON_DAEMON
from uoomd.sources.procfs import read_stat
from uoomd.status import is_running, parse_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    yield from daemon_fixture(tmp_path)


def uoomd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*uoomd_command(), *args], capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize("started_as", ["installed-script", "venv-python"])
def test_the_daemon_is_named_uoomd_and_its_interpreter_still_checks_a_reload(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path, started_as: str
) -> None:
    # A venv's interpreter: sys.prefix and sys.executable are derived from argv[0], which the
    # daemon keeps; only what the kernel shows is rewritten (uoomd/service.py take_name).
    command = slow_site(tmp_path, 0)[0] if started_as == "venv-python" else None
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, dry_run=True), "--dry-run", command=command)
    daemon.wait_for("started", timeout_s=30)
    pid = daemon.process.pid
    policy = str(daemon.policy_path)

    assert Path(f"/proc/{pid}/comm").read_text() == "uoomd\n"
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == f"uoomd run --policy {policy} --dry-run\0".encode()
    assert psutil.Process(pid).name() == "uoomd"
    assert psutil.Process(pid).cmdline() == ["uoomd", "run", "--policy", policy, "--dry-run"]
    if shutil.which("pgrep"):
        found = subprocess.run(["pgrep", "-x", "uoomd"], capture_output=True, text=True, check=False).stdout
        assert str(pid) in found.split()
    assert not daemon.find("process_name_kept")

    # The checker child runs as the daemon's sys.executable: a reload proves it is an interpreter.
    daemon.policy_path.write_text(cgroup_policy(cgroup, tmp_path, dry_run=True, term="31%"))
    reloaded = uoomd("reload", "--pid", str(pid), "--state-file", str(tmp_path / "state.json"))
    assert reloaded.returncode == ExitCode.OK, reloaded.stderr + daemon.log_path.read_text()[-2000:]
    assert daemon.find("policy_reloaded")


def test_reports_leave_the_running_daemon_out_and_the_shipped_rule_protects_it(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, dry_run=True), "--dry-run")
    daemon.wait_for("started", timeout_s=30)
    pid = daemon.process.pid
    explained = uoomd("explain", str(pid), "--policy", str(daemon.policy_path))
    assert explained.returncode == ExitCode.OK, explained.stderr
    assert f"uoomd: excluded: {REASON_DAEMON}\n" in explained.stdout
    listed = uoomd("candidates", "--all", "--json", "--policy", str(daemon.policy_path))
    assert listed.returncode == ExitCode.OK, listed.stderr
    [row] = [r for r in json.loads(listed.stdout) if r["pid"] == pid]
    assert (row["reason"], row["rank"]) == (REASON_DAEMON, None)
    if os.geteuid() != 0:
        pytest.skip("the shipped system-core rule protects uoomd by uid 0: the daemon here is not root")
    # The shipped policy's state file is not this daemon's: the rule alone must protect it.
    shipped = uoomd("explain", str(pid), "--policy", str(ROOT / "etc" / "uoomd.toml"))
    assert "rules that match:\n  system-core: protect\n" in shipped.stdout, shipped.stdout
    assert "uoomd: excluded: protected by rule 'system-core'" in shipped.stdout


def test_a_zombie_is_not_a_running_daemon() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        while (stat := read_stat("/proc", pid)) is not None and stat.state != "Z":
            os.sched_yield()
        assert stat is not None, "a child is a zombie until it is reaped"
        state = {"pid": pid, "starttime_ticks": stat.starttime_ticks, "policy": "/p", "dry_run": False}
        state |= {"updated_at": 0.0, "status": "", "guards": [], "recent": [], "reload": None}
        assert not is_running(parse_state(state))
    finally:
        os.waitpid(pid, 0)
