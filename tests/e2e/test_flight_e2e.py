"""``record_on_decision`` against the installed ``uoomd run`` in a scratch memory cgroup: every decision comes with
its trace, and ``uoomd replay`` of that trace under the same policy makes the same decisions.

The daemon guards only the test's cgroup (512 MiB, term below 30 % available, kill below 10 %), so it
can only signal the test's own hogs (oom_score_adj 1000). Each test asserts the kernel's memcg OOM
killer never had to act.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, uoomd_command, wait_until
from uoomd.tracefile import read_lines
from uoomd.tracelines import DecisionLine, Header

pytestmark = pytest.mark.e2e


def replay_json(trace: str, *policy: str) -> dict[str, Any]:
    args = [a for p in policy for a in ("--policy", p)]
    done = subprocess.run(
        [*uoomd_command(), "replay", *args, trace, "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def same(decision: dict[str, Any]) -> tuple[object, ...]:
    return (decision["event"], decision["pid"], decision["action"], decision["trigger"])


def recording(tmp_path: Path, keep: int) -> str:
    return f'record_on_decision = true\nrecord_dir = "{tmp_path}/traces"\nrecord_keep = {keep}'


def test_a_kill_comes_with_its_trace_and_the_trace_replays_to_the_same_decision(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, daemon_extra=recording(tmp_path, keep=5)))
    daemon.wait_for("started")
    idle = cgroup.spawn(hog_argv(tmp_path / "idle.rec", "--name", "idlehog", "--max-mib", "40", "--hold"))
    assert wait_until(lambda: any(r[0] == "HOLD" for r in read_record(tmp_path / "idle.rec")), 10)
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(hog_argv(record, "--name", "grower", "--mib-per-step", "8", "--interval-ms", "10"))
    hog.wait(30)
    assert any(r[0] == "SIGTERM" for r in read_record(record))
    (chosen,) = daemon.find("victim_chosen")
    assert chosen["pid"] == hog.pid
    written = daemon.wait_for("trace_written")
    assert written["decision"] == f"victim_chosen pid {hog.pid}"
    path = written["path"]
    assert os.path.dirname(path) == str(tmp_path / "traces")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "traces").st_mode) == 0o700

    items = [located.item for located in read_lines([path])]
    header = items[0]
    assert isinstance(header, Header)
    assert header.source == "uoomd run"
    assert header.policy == str(daemon.policy_path)
    assert header.policy_text == daemon.policy_path.read_text()
    assert [i.event for i in items if isinstance(i, DecisionLine)][:1] == ["victim_chosen"]
    # Under the policy in the file, and under the policy recorded in the trace: the same decision.
    for replayed in (replay_json(path, str(daemon.policy_path)), replay_json(path)):
        decisions = [e for e in replayed["events"] if e["event"] in ("victim_chosen", "victim_escalated")]
        assert [same(d) for d in decisions] == [same(chosen)]
        assert decisions[0]["badness"] == chosen["badness"]
    assert idle.poll() is None, "the bystander was signalled"
    assert cgroup.oom_kill_count() == 0


def test_a_dry_runs_decisions_each_write_a_trace_the_newest_kept_and_each_replays_exactly(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # Nothing is signalled: the hog holds below the term level and the daemon decides again after
    # each term_timeout's hold (would_term), writing a trace each time; 2 are kept.
    policy = cgroup_policy(cgroup, tmp_path, dry_run=True, term_timeout="1s", daemon_extra=recording(tmp_path, keep=2))
    daemon = start_daemon(policy)
    daemon.wait_for("started")
    hog = cgroup.spawn(hog_argv(tmp_path / "hog.rec", "--name", "holder", "--max-mib", "400", "--hold"))
    try:
        assert wait_until(lambda: len(daemon.find("trace_written")) >= 3, 30), daemon.find("trace_write_failed")
    finally:
        hog.kill()  # our own child, by its Popen
        hog.wait()
    traces = sorted((tmp_path / "traces").iterdir())
    assert len(traces) == 2, "only the newest record_keep are kept"
    newest = str(traces[-1])
    items = [located.item for located in read_lines([newest])]
    logged = [i for i in items if isinstance(i, DecisionLine) and i.event in ("victim_chosen", "victim_escalated")]
    assert len(logged) >= 3
    replayed = [e for e in replay_json(newest)["events"] if e["event"] in ("victim_chosen", "victim_escalated")]
    # Every decision the daemon logged in the trace's span, made again by the replay, at the same poll.
    assert [(d["t"], same(d)) for d in replayed] == [(d.at, same({"event": d.event, **dict(d.facts)})) for d in logged]
    assert all(d["action"] == "would_term" for d in replayed)
    assert cgroup.oom_kill_count() == 0
