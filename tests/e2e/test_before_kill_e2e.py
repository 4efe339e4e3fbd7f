"""``hooks.before_kill`` against the installed ``uoomd run`` in a scratch memory cgroup: facts before the SIGTERM.

The daemon guards only the test's cgroup (512 MiB, term below 30 % available, kill below 10 %), so
it can only signal the test's own hogs (oom_score_adj 1000). Each test asserts the kernel's memcg
OOM killer never had to act.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, uoomd_command, wait_until

pytestmark = pytest.mark.e2e

# The hook: writes what it saw of the victim while it still ran (its /proc status), a stamp on the
# monotonic clock the hogs record with, its own nice and oom_score_adj, then sleeps, then a second
# stamp. Written to a file of its own, as an admin's hook would be: root's, 0755.
HOOK = """#!{python}
import json, os, sys, time
out, sleep_s = sys.argv[1], float(sys.argv[2])
pid = os.environ["UOOMD_PID"]
with open(f"/proc/{{pid}}/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
with open("/proc/self/oom_score_adj") as f:
    adj = int(f.read())
facts = {{
    "gathered_at": time.monotonic(),
    "victim_rss": status["VmRSS"].strip(),
    "env": {{k: v for k, v in os.environ.items() if k.startswith("UOOMD_")}},
    "nice": os.getpriority(os.PRIO_PROCESS, 0),
    "oom_score_adj": adj,
}}
with open(out + ".tmp", "w") as f:
    json.dump(facts, f)
os.rename(out + ".tmp", out)
time.sleep(sleep_s)
with open(out + ".done", "w") as f:
    f.write(repr(time.monotonic()))
"""


def write_hook(tmp_path: Path, mode: int = 0o755) -> Path:
    hook = tmp_path / "gather.py"
    hook.write_text(HOOK.format(python=sys.executable))
    hook.chmod(mode)
    return hook


def hooks_toml(hook: Path, out: Path, *, sleep_s: float, timeout: str) -> str:
    return f"""
[hooks]
before_kill = ["{hook}", "{out}", "{sleep_s}"]
before_kill_timeout = "{timeout}"
"""


def sigterm_at(record: Path) -> float:
    times = [float(r[1]) for r in read_record(record) if r[0] == "SIGTERM"]
    assert times, f"the hog got no SIGTERM: {read_record(record)}"
    return times[0]


def holding_hog(cgroup: ScratchCgroup, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A hog that crosses the term level (30 % of 512 MiB available) and holds, far above the kill level."""
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(
        hog_argv(
            record, "--name", "heaphog", "--mib-per-step", "16", "--interval-ms", "5", "--max-mib", "400", "--hold"
        )
    )
    return hog, record


def test_before_kill_gathers_facts_from_the_live_victim_before_its_sigterm(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    out = tmp_path / "facts.json"
    hook = write_hook(tmp_path)
    policy = cgroup_policy(cgroup, tmp_path, term_timeout="5s", extra=hooks_toml(hook, out, sleep_s=0.3, timeout="4s"))
    daemon = start_daemon(policy)
    protected = daemon.wait_for("self_protected")
    hog, record = holding_hog(cgroup, tmp_path)
    hog.wait(30)
    chosen = daemon.wait_for("victim_chosen", action="term")
    assert chosen["pid"] == hog.pid
    facts: dict[str, Any] = json.loads(out.read_text())
    # Gathered while the victim ran with its memory, and the SIGTERM waited for the hook to exit.
    assert int(facts["victim_rss"].split()[0]) > 300 * 1024
    assert facts["gathered_at"] < sigterm_at(record)
    assert float((tmp_path / "facts.json.done").read_text()) <= sigterm_at(record)
    env = facts["env"]
    assert (env["UOOMD_HOOK"], env["UOOMD_PID"], env["UOOMD_NAME"]) == ("before_kill", str(hog.pid), "heaphog")
    assert (env["UOOMD_SIGNAL"], env["UOOMD_GUARD"]) == ("SIGTERM", "test")
    # The child reset of every hook: not the daemon's nice -10 (nor its -1000, where it has it).
    if protected.get("nice") == -10:
        assert facts["nice"] == 0
    assert facts["oom_score_adj"] >= 0
    released = daemon.wait_for("signal_released")
    assert (released["reason"], released["pid"]) == ("hook_exited", hog.pid)
    assert daemon.wait_for("action_result", action="hook", outcome="completed")
    assert cgroup.oom_kill_count() == 0


def test_a_hook_that_sleeps_past_its_timeout_holds_the_sigterm_only_that_long(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    out = tmp_path / "facts.json"
    hook = write_hook(tmp_path)
    policy = cgroup_policy(cgroup, tmp_path, term_timeout="5s", extra=hooks_toml(hook, out, sleep_s=60, timeout="1s"))
    daemon = start_daemon(policy)
    daemon.wait_for("started")
    hog, record = holding_hog(cgroup, tmp_path)
    hog.wait(30)
    released = daemon.wait_for("signal_released")
    assert released["reason"] == "hook_timeout"
    assert released["held_s"] >= 1.0  # never before its time (no upper bound: a loaded machine polls late)
    assert json.loads(out.read_text())["gathered_at"] < sigterm_at(record)
    # The hook itself is killed at its timeout, its process group with it: it never wrote its second stamp.
    timed_out = daemon.wait_for("action_result", action="hook", outcome="timed_out")
    assert timed_out["timeout_s"] == 1.0
    assert not (tmp_path / "facts.json.done").exists()
    assert cgroup.oom_kill_count() == 0


def test_the_kill_level_does_not_wait_for_a_hook(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    out = tmp_path / "facts.json"
    hook = write_hook(tmp_path)
    policy = cgroup_policy(cgroup, tmp_path, term_timeout="5s", extra=hooks_toml(hook, out, sleep_s=60, timeout="5s"))
    daemon = start_daemon(policy)
    daemon.wait_for("started")
    # It never stops growing: past the term level while the hook runs, on to the kill level.
    record = tmp_path / "hog.rec"
    hog = cgroup.spawn(
        hog_argv(
            record,
            "--name",
            "runaway",
            "--mib-per-step",
            "8",
            "--interval-ms",
            "10",
            "--max-mib",
            "900",
            "--ignore-term",
        )
    )
    hog.wait(30)
    assert hog.returncode == -9
    released = daemon.wait_for("signal_released")
    assert released["reason"] == "next_signal"
    assert released["held_s"] < 5.0, "released by the kill level, not by the hook's timeout"
    escalated = daemon.wait_for("victim_escalated")
    assert (escalated["pid"], escalated["trigger"]) == (hog.pid, "mem_available_kill")
    assert cgroup.oom_kill_count() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="hook ownership is checked when uoomd runs as root")
def test_a_before_kill_hook_others_can_write_is_refused(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    hook = write_hook(tmp_path, mode=0o777)
    os.chmod(hook, 0o777)  # the umask may have taken the others' write bit away
    policy_text = cgroup_policy(cgroup, tmp_path, extra=hooks_toml(hook, tmp_path / "f", sleep_s=0, timeout="1s"))
    policy = tmp_path / "untrusted.toml"
    policy.write_text(policy_text)
    checked = subprocess.run(
        [*uoomd_command(), "check", str(policy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 1
    assert "hooks.before_kill" in checked.stdout + checked.stderr
    assert "writable by others" in checked.stdout + checked.stderr
    # The daemon refuses to start on it too: it never runs a hook another user could have replaced.
    daemon = start_daemon(policy_text)
    assert wait_until(lambda: daemon.process.poll() is not None, 30)
    assert daemon.process.returncode == 1
