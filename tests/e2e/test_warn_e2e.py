"""The warn level against the installed ``uoomd run`` in a scratch memory cgroup: a warning naming the hog, no signal.

The daemon guards only the test's cgroup (512 MiB: warn below 60 % available, term below 30 %, kill
below 10 %); the hog holds between the warn and the term level (oom_score_adj 1000).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, wait_until

pytestmark = pytest.mark.e2e


def test_below_the_warn_level_the_likely_victim_is_named_and_its_owner_told_once(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    policy = cgroup_policy(
        cgroup, tmp_path, daemon_extra="notify_desktop = true", guard_extra='mem_available_warn = "60%"'
    )
    daemon = start_daemon(policy)
    assert "warn below 307.2MiB (60%)" in daemon.wait_for("guard_levels")["levels"]
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(hog_argv(record, "--name", "warnhog", "--max-mib", "250", "--hold"))
    assert wait_until(lambda: any(r[0] == "HOLD" for r in read_record(record)), 20)
    warned = daemon.wait_for("memory_warn")
    assert (warned["pid"], warned["name"], warned["action"]) == (hog.pid, "warnhog", "warn")
    assert warned["available_bytes"] < 0.6 * cgroup.limit_bytes
    # Told to the hog's owner (here root; with no session bus of root's, a log line says so).
    notice = wait_until(
        lambda: [
            e
            for e in daemon.events()
            if e["event"] in ("desktop_notice_sent", "desktop_notice_failed", "desktop_notice_skipped")
        ],
        10,
    )
    assert notice
    assert notice[0].get("uid") == warned["uid"]
    time.sleep(2)  # the episode goes on: no second warning, and nothing signalled
    assert len(daemon.find("memory_warn")) == 1
    assert hog.poll() is None
    assert not any(r[0] == "SIGTERM" for r in read_record(record))
    assert not daemon.find("victim_chosen")
    assert cgroup.oom_kill_count() == 0
