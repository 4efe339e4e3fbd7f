"""``uoomd record`` beside a live ``uoomd run``, then ``uoomd replay`` of the trace: the same decisions.

The daemon guards only the test's memory cgroup, so it can only ever signal the test's own
hogs (oom_score_adj 1000); the recorder never signals at all. Each test asserts the kernel's
memcg OOM killer never had to act.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, uoomd_command, wait_until
from uoomd.trace import parse_line
from uoomd.tracelines import Header

pytestmark = pytest.mark.e2e

POLL_MAX_S = 0.2  # cgroup_policy()'s poll_max: the recorder and the daemon each poll at least this often


class Recording:
    """``uoomd record`` as a subprocess; stopped by PID with SIGTERM (it writes its end line then)."""

    def __init__(self, tmp_path: Path, policy: Path, *args: str) -> None:
        self.trace = tmp_path / "trace.jsonl"
        self.log_path = tmp_path / "record.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        self.process = subprocess.Popen(
            [*uoomd_command(), "record", "--policy", str(policy), "--output", str(self.trace), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def _recovered(daemon: RunningDaemon, episodes: int) -> bool:
    return len(daemon.find("memory_recovered")) >= episodes


def _wall(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _replay(trace: Path, policy: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*uoomd_command(), "replay", "--policy", str(policy), str(trace), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _decisions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") in ("victim_chosen", "victim_escalated")]


def _same(decision: dict[str, Any]) -> tuple[object, ...]:
    return (decision["event"], decision["pid"], decision["action"], decision["trigger"])


def test_replaying_a_recorded_run_under_its_policy_makes_the_live_daemons_decisions(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, kill_timeout="2s"))
    daemon.wait_for("started")
    # The live daemon stops a hog within a poll of its crossing, and the hog frees its memory at
    # once: a recorder polling at the daemon's own pace can sample just before and just after
    # (seen here: 153.5 MiB, then 168 MiB, beside a term level of 153.6 MiB). So it records at a
    # finer pace than the daemon decides at; the replay runs under the daemon's policy.
    fine = tmp_path / "fine.toml"
    fine.write_text(daemon.policy_path.read_text().replace('poll_min = "10ms"', 'poll_min = "3ms"'))
    recording = Recording(tmp_path, fine)
    try:
        assert wait_until(lambda: any(e["event"] == "recording_started" for e in recording.events()), 15)
        # A bystander, then two hogs one after the other: each crosses the term level and is stopped.
        idle = cgroup.spawn(hog_argv(tmp_path / "idle.rec", "--name", "idlehog", "--max-mib", "40", "--hold"))
        assert wait_until(lambda: any(r[0] == "HOLD" for r in read_record(tmp_path / "idle.rec")), 10)
        hogs = []
        for n in range(2):
            record = tmp_path / f"hog{n}.rec"
            hog = cgroup.spawn(
                hog_argv(record, "--name", f"grow{n}", "--mib-per-step", "8", "--interval-ms", "10", "--max-mib", "900")
            )
            hogs.append(hog.pid)
            hog.wait(30)
            assert any(r[0] == "SIGTERM" for r in read_record(record)), f"hog {n} was not stopped"
            # The daemon's episode ends (memory back) before the next hog starts.
            assert wait_until(partial(_recovered, daemon, n + 1), 10)
    finally:
        assert recording.stop() == 0, recording.log_path.read_text()[-3000:]
    assert idle.poll() is None, "the bystander was signalled"
    live = _decisions(daemon.events())
    assert [e["pid"] for e in live if e["event"] == "victim_chosen"] == hogs

    replayed = _replay(recording.trace, daemon.policy_path)
    decisions = _decisions(replayed["events"])
    assert [_same(e) for e in decisions] == [_same(e) for e in live]
    header = parse_line(recording.trace.read_text().splitlines()[0])
    assert isinstance(header, Header)
    # Both poll at least every poll_max; near the level both poll at poll_min. The replay's time
    # is the recorder's poll, the daemon's is its log line.
    gaps = [abs(header.started_wall + e["t"] - _wall(d["timestamp"])) for e, d in zip(decisions, live, strict=True)]
    assert max(gaps) <= POLL_MAX_S, f"replayed decisions {gaps} s away from the live ones"
    exited = [e["pid"] for e in replayed["events"] if e["event"] == "victim_exited"]
    assert exited == hogs
    assert cgroup.oom_kill_count() == 0


def test_replaying_a_dry_run_reproduces_every_decision_at_the_daemons_own_pace(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # Nothing is signalled, so the hog stays below the levels and the decisions repeat as the
    # dry-run table says: would_term at the term level, and after each term_timeout's hold,
    # would_kill below the kill level. The recorder polls at the daemon's own pace.
    daemon = start_daemon(cgroup_policy(cgroup, tmp_path, dry_run=True, term_timeout="1s"))
    daemon.wait_for("started")
    recording = Recording(tmp_path, daemon.policy_path)
    try:
        assert wait_until(lambda: any(e["event"] == "recording_started" for e in recording.events()), 15)
        idle = cgroup.spawn(hog_argv(tmp_path / "idle.rec", "--name", "idlehog", "--max-mib", "40", "--hold"))
        assert wait_until(lambda: any(r[0] == "HOLD" for r in read_record(tmp_path / "idle.rec")), 10)
        # 470 MiB of 512: past the term level (30% available) after ~1 s, below the kill level
        # (10%) about a second later, then held.
        hog = cgroup.spawn(
            hog_argv(
                tmp_path / "hog.rec",
                "--name",
                "holder",
                "--mib-per-step",
                "4",
                "--interval-ms",
                "10",
                "--max-mib",
                "430",
                "--hold",
            )
        )
        assert wait_until(lambda: len(daemon.find("victim_chosen", action="would_kill")) >= 2, 30)
    finally:
        assert recording.stop() == 0, recording.log_path.read_text()[-3000:]
    header = parse_line(recording.trace.read_text().splitlines()[0])
    assert isinstance(header, Header)
    end = header.started_wall + max(
        e["t"] for e in map(json.loads, recording.trace.read_text().splitlines()) if e["k"] == "r"
    )
    # The daemon's decisions while the recorder ran, leaving out one poll at its end.
    live = [e for e in _decisions(daemon.events()) if _wall(e["timestamp"]) < end - POLL_MAX_S]
    assert live[0]["action"] == "would_term"
    assert "would_kill" in [e["action"] for e in live]
    assert {e["pid"] for e in live} == {hog.pid}
    replayed = _decisions(_replay(recording.trace, daemon.policy_path)["events"])
    assert [_same(e) for e in replayed[: len(live)]] == [_same(e) for e in live]
    gaps = [abs(header.started_wall + e["t"] - _wall(d["timestamp"])) for e, d in zip(replayed, live, strict=False)]
    assert max(gaps) <= POLL_MAX_S, f"replayed decisions {gaps} s away from the live ones"
    assert idle.poll() is None
    assert hog.poll() is None
    assert cgroup.oom_kill_count() == 0
