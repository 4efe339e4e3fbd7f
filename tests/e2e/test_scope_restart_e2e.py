"""``uoomd run`` guarding a cgroup that is removed and created again (a service restart), end to end.

The daemon guards only the test's own cgroup, so it can only ever signal the test's hog,
which runs at oom_score_adj 1000. The hog starts in the recreated cgroup and must get
SIGTERM from uoomd before the kernel's memcg OOM killer acts (oom_kill stays 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, wait_until

pytestmark = pytest.mark.e2e

MIB = 1 << 20
RUNS = 5


def policy(cg: ScratchCgroup, tmp_path: Path) -> str:
    # A warn-only PSI trigger where the cgroup has a pressure file: it is re-armed on the
    # recreated cgroup (scope_back says how) and can never be the reason the hog is stopped.
    psi = ""
    if cg.pressure_path is not None:
        psi = """
  [[guard.psi]]
  kind = "some"
  stall = "100ms"
  window = "2s"
  sustain = "0s"
  action = "warn"
"""
    return cgroup_policy(cg, tmp_path, name="svc", max_kills=None, guard_extra=psi)


@pytest.mark.parametrize("run", range(RUNS))
def test_a_hog_in_a_recreated_cgroup_gets_sigterm_before_the_kernel_oom_killer(
    run: int, cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(policy(cgroup, tmp_path))
    daemon.wait_for("started")
    cgroup.remove()
    gone = daemon.wait_for("scope_gone", guard="svc")
    assert cgroup.name in gone["error"], "says which file went: the v2 one first on a hybrid machine"
    cgroup.recreate()
    back = daemon.wait_for("scope_back", guard="svc")
    if cgroup.pressure_path is not None:
        assert back["psi"] in (["kernel"], ["kernel-rounded"], ["polled"])
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(hog_argv(record, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "600", "--hold"))
    sigterm = wait_until(lambda: [line for line in read_record(record) if line[0] == "SIGTERM"], 20)
    assert sigterm, daemon.log_path.read_text()[-3000:]
    hog.wait(10)
    assert int(sigterm[0][2]) * MIB < CGROUP_LIMIT_BYTES, "the hog got past the cgroup's limit before SIGTERM"
    assert not [line for line in read_record(record) if line[0] == "HOLD"], "nothing stopped the hog"
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == hog.pid
    assert cgroup.oom_kill_count() == 0
    assert len(daemon.find("scope_gone")) == 1
    assert len(daemon.find("scope_back")) == 1
    assert not daemon.find("reading_failed")


@pytest.mark.parametrize("run", range(3))
def test_a_cgroup_created_after_the_daemon_starts_is_guarded_once_it_appears(
    run: int, cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # A slice systemd creates only when its first unit starts may come after uoomd: the
    # daemon starts, says the scope is not there, and guards it once it appears.
    text = policy(cgroup, tmp_path)
    cgroup.remove()
    daemon = start_daemon(text)
    daemon.wait_for("started")
    gone = daemon.wait_for("scope_gone", guard="svc")
    assert "does not exist" in gone["error"]
    cgroup.recreate()
    daemon.wait_for("scope_back", guard="svc")
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(hog_argv(record, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "600", "--hold"))
    sigterm = wait_until(lambda: [line for line in read_record(record) if line[0] == "SIGTERM"], 20)
    assert sigterm, daemon.log_path.read_text()[-3000:]
    hog.wait(10)
    assert daemon.wait_for("victim_chosen", action="term")["pid"] == hog.pid
    assert cgroup.oom_kill_count() == 0
    assert len(daemon.find("scope_gone")) == 1
