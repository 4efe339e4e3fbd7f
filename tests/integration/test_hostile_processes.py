"""Real child processes with hostile names and cmdlines, processes that vanish mid-scan, zombies, D state,
and (end to end) a victim that does not die after SIGKILL.

Every process here is a child of this test (names set with prctl(PR_SET_NAME), argv given as
bytes); the daemon tests guard only a ``uoomd-test-*`` cgroup holding those children, and
signals go only to them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import pytest

from tests.builders import cgroup_policy, make_guard, make_plan, make_rule
from tests.cgroups import scratch_cgroup
from tests.e2e.daemon_runner import RunningDaemon, daemon_fixture, hog_argv, read_record, wait_until
from tests.integration.test_actions import frozen
from uoomd import logs
from uoomd.actions import RunHook
from uoomd.daemon import Daemon
from uoomd.executor import RecordingExecutor
from uoomd.hooks import run_hook
from uoomd.plan import Amount, HooksPlan, LogFormat, Scope, ScopeKind
from uoomd.readings import Pid
from uoomd.scoring import rank
from uoomd.sources import procfs

pytestmark = pytest.mark.integration

MIB = 1 << 20
REPO = str(Path(__file__).resolve().parents[2])

# Sets comm to the bytes given in hex, touches some memory, says ready, sleeps.
CHILD = r"""
import ctypes, mmap, sys, time
name = bytes.fromhex(sys.argv[1])
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
with open("/proc/self/oom_score_adj", "w") as f:
    f.write(sys.argv[2])
# Private and anonymous: RssAnon, what the tests assert (a bare mmap(-1) is a shared
# mapping, counted as RssShmem; it passed only where the interpreter's own anon memory
# made up the difference)
buf = mmap.mmap(-1, int(sys.argv[3]) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(buf), 4096):
    buf[i] = 1
sys.stdout.write("ready\n"); sys.stdout.flush()
time.sleep(600)
"""

LONG_ARG = b"A" * 5000  # past procfs' 4 KiB cmdline cap
MARKER = "/tmp/u7"  # a name below tries to create it through a shell; none may
HOSTILE: dict[str, tuple[bytes, bytes]] = {
    # id: (comm, one hostile argv element)
    "newline": (b'x\n{"event":1}', b'line1\n{"event": "kill", "pid": 1}\nline3'),
    "ansi": (b"\x1b[2J\x1b]0;pw\x07", b"\x1b[31mred\x1b[0m\r\x08"),
    "shell": (b"`touch /tmp/u7`", b"; rm -rf / #$(reboot) | `id` && >x"),
    "invalid-utf8": (b"\xff\xfe\xc3(bad", b"\xff\xfe\xc3\x28\xa0\xa1"),
    "parens": (b"a) R 1 1 1 (b", b") S 0 0 0 ("),
    "sshd": (b"sshd", b"-D"),
}


def start_child(
    comm: bytes,
    arg: bytes,
    *,
    adj: int = 1000,
    mib: int = 4,
    spawn: Callable[..., subprocess.Popen[bytes]] | None = None,
) -> subprocess.Popen[bytes]:
    argv: list[bytes] = [
        os.fsencode(sys.executable),
        b"-c",
        CHILD.encode(),
        comm.hex().encode(),
        str(adj).encode(),
        str(mib).encode(),
        arg,
        LONG_ARG,
    ]
    launch = spawn if spawn is not None else subprocess.Popen
    child = launch(argv, stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    return child


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:  # our own unreaped children: the PID cannot have been recycled
        if child.poll() is None:
            child.kill()
        child.wait()


@pytest.fixture(scope="module")
def hostile() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for key, (comm, arg) in HOSTILE.items():
            started[key] = start_child(comm, arg)
        yield started
    finally:
        stop(list(started.values()))


# --- the snapshot ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(HOSTILE))
def test_read_snapshot_parses_a_hostile_child_with_every_field_in_place(
    key: str, hostile: dict[str, subprocess.Popen[bytes]]
) -> None:
    child = hostile[key]
    comm, arg = HOSTILE[key]
    snap = procfs.read_snapshot(details=frozenset({"cmdline", "exe", "user"}), pids=[child.pid])
    (info,) = snap.processes
    assert info.name == procfs.decode_name(comm[:15])
    assert info.ppid == os.getpid(), "the fields after comm are where they belong"
    assert info.state == "S"
    assert info.oom_score_adj == 1000
    assert info.rss_anon_bytes >= 4 * MIB
    assert not info.kthread
    assert info.has_mm
    assert info.exe is not None
    assert os.path.realpath(info.exe) == os.path.realpath(sys.executable)
    assert info.cmdline is not None
    assert procfs.decode_name(arg.replace(b"\0", b" ")) in info.cmdline
    assert len(info.cmdline) <= 4096 + 4096 * 3, "capped at 4 KiB of bytes (escapes may widen it)"
    with open(f"/proc/{child.pid}/stat", "rb") as f:
        assert int(f.read().rsplit(b")", 1)[1].split()[19]) == info.starttime_ticks


def test_candidates_json_escapes_hostile_children_and_ranks_the_impostor_sshd(
    hostile: dict[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[guard]]\nname = "system"\nscope = "system"\n\n'
        '[[rule]]\nname = "real-sshd"\nmatch = { name = "^sshd$", exe = "^/usr/sbin/sshd$" }\nprotect = true\n'
    )
    policy.chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-m", "uoomd", "candidates", "--json", "--policy", str(policy)],
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not any(b < 0x20 and b != 0x0A for b in done.stdout), "a raw control byte reached the output"
    rows = {row["pid"]: row for row in json.loads(done.stdout)}
    for key, child in hostile.items():
        row = rows[child.pid]
        assert row["name"] == procfs.decode_name(HOSTILE[key][0])
        assert row["protected"] is False, f"{key}: {row['reason']}"
        assert row["rank"] is not None
    assert rows[hostile["sshd"].pid]["rules"] == [], "a python process named sshd is not the real sshd"


# --- the daemon's log lines and hooks -------------------------------------------------------


@pytest.mark.parametrize("key", list(HOSTILE))
def test_daemon_log_lines_escape_the_hostile_victim_and_hooks_get_it_only_as_env(key: str, tmp_path: Path) -> None:
    with scratch_cgroup(limit_bytes=256 * MIB) as cg:
        comm, arg = HOSTILE[key]
        start_child(comm, arg, mib=32, spawn=cg.spawn)
        start_child(b"runner-up", b"x", mib=8, spawn=cg.spawn)
        # Term at 100 % of the limit: any usage crosses it; the guard sees only our children.
        guard = make_guard(
            "cg",
            scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path),
            mem_available_term=Amount(fraction=1.0),
            mem_available_kill=Amount(bytes=0),
        )
        protect = make_rule(0, protect=True, name="^sshd$", exe="^/usr/sbin/sshd$")
        plan = replace(
            make_plan(protect, guards=(guard,)),
            hooks=HooksPlan(after_kill=("/bin/sh", "-c", 'printf %s "$UOOMD_NAME"'), timeout_s=5.0),
        )
        plan = replace(plan, daemon=replace(plan.daemon, state_file=str(tmp_path / "state.json")))
        out = io.StringIO()
        executor = RecordingExecutor()
        daemon = Daemon(plan, executor=executor, log=logs.configure(LogFormat.JSON, out))
        try:
            daemon.open()
            daemon.tick(time.monotonic())
        finally:
            daemon.close()
        text = out.getvalue()
        lines = text.splitlines()
        events = [json.loads(line) for line in lines]  # every line is one whole JSON object
        assert len(events) == text.count("\n")
        assert "\x1b" not in text
        assert "\r" not in text
        chosen = [e for e in events if e["event"] == "victim_chosen"]
        assert len(chosen) == 1, text
        name = procfs.decode_name(comm)
        assert chosen[0]["name"] == logs.escape(name)
        assert chosen[0]["runner_up_name"] == "runner-up"
        (hook,) = [a for a in executor.actions if isinstance(a, RunHook)]
        assert dict(hook.env)["UOOMD_NAME"] == name
        assert hook.argv == plan.hooks.after_kill
        # The real hook runs the policy's argv; the name arrives as a value and stays one.
        result = run_hook(hook.argv, hook.env, 5.0).wait(10)
        assert result is not None
        assert result.detail("output") == name
        assert not os.path.exists(MARKER), "a name was executed by a shell"


# --- vanishing, zombies, D state ------------------------------------------------------------


def test_children_killed_between_listing_and_reading_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    children = [start_child(b"vanish", b"x", adj=1000, mib=1) for _ in range(10)]
    try:
        real_list = procfs.list_pids

        def list_then_kill(proc_root: str = "/proc") -> list[int]:
            pids = real_list(proc_root)
            for child in children[::2]:  # half of them die (and are reaped) after the listing
                child.kill()
                child.wait()
            return pids

        monkeypatch.setattr(procfs, "list_pids", list_then_kill)
        snap = procfs.read_snapshot(details=frozenset({"cmdline", "exe", "user", "cgroup"}))
        seen = {p.pid for p in snap.processes}
        assert not {c.pid for c in children[::2]} & seen
        assert {c.pid for c in children[1::2]} <= seen
        assert os.getpid() in seen
    finally:
        stop(children)


def test_a_child_that_dies_between_its_stat_and_status_reads_is_skipped_or_a_zombie(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child = start_child(b"midread", b"x", mib=1)
    try:
        real_read = procfs.read_file  # the seam where the race happens

        def read_and_kill(path: bytes, size: int = 65536) -> bytes | None:
            data = real_read(path, size)
            if path == b"/proc/%d/stat" % child.pid and child.poll() is None:
                child.kill()  # dies, unreaped: a zombie by the time status is read
                while procfs.parse_stat(real_read(path) or b"0 (x) Z" + b" 0" * 40).state != "Z":
                    time.sleep(0.001)
            return data

        monkeypatch.setattr(procfs, "read_file", read_and_kill)
        snap = procfs.read_snapshot(pids=[child.pid])
        infos = [p for p in snap.processes if p.pid == child.pid]
        assert all(not p.has_mm for p in infos), "read as a zombie (no mm), or skipped"
    finally:
        stop([child])


def test_a_real_zombie_is_read_and_excluded_without_a_crash() -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert wait_until(lambda: (procfs.read_process("/proc", zombie.pid) or _gone()).state == "Z", 10)
        snap = procfs.read_snapshot(details=frozenset({"cmdline", "exe", "user", "cgroup"}), pids=[zombie.pid])
        (info,) = snap.processes
        assert info.state == "Z"
        assert not info.has_mm
        ranking = rank(snap, make_plan(), make_guard(), totalpages=1 << 20)
        assert ranking.candidates == ()
        assert [e.reason for e in ranking.excluded] == ["no mm"]
    finally:
        zombie.wait()


def _gone() -> NoReturn:
    raise AssertionError("the zombie vanished before it was read")


def test_a_child_in_d_state_is_read_and_stays_a_candidate() -> None:
    child = start_child(b"dstate", b"x", mib=8)
    try:
        with frozen(child.pid):
            assert wait_until(lambda: (procfs.read_process("/proc", child.pid) or _gone()).state == "D", 5)
            snap = procfs.read_snapshot(details=frozenset({"cmdline", "exe"}), pids=[child.pid])
            (info,) = snap.processes
            assert info.state == "D"
            assert info.has_mm
            ranking = rank(snap, make_plan(), make_guard(), totalpages=1 << 20)
            # Uninterruptible sleep is not immunity: SIGKILL stays pending and process_mrelease
            # can still reap its memory (mm/oom_kill.c process_mrelease(), Linux 6.18).
            assert [c.process.pid for c in ranking.candidates] == [Pid(child.pid)]
    finally:
        stop([child])


# --- end to end: a victim that does not die after SIGKILL ----------------------------------


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    yield from daemon_fixture(tmp_path)


@pytest.mark.e2e
def test_a_victim_that_survives_sigkill_is_released_marked_stuck_and_the_next_hog_is_chosen(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    with scratch_cgroup(limit_bytes=512 * MIB) as cg:
        first_rec, second_rec = tmp_path / "first.rec", tmp_path / "second.rec"
        first = cg.spawn(hog_argv(first_rec, "--max-mib", "400", "--hold", "--name", "stuckhog"))
        assert wait_until(lambda: [r for r in read_record(first_rec) if r[0] == "HOLD"], 20)
        with frozen(first.pid):  # D state: it cannot act on SIGTERM or finish a SIGKILL
            daemon = start_daemon(cgroup_policy(cg, tmp_path, term_timeout="1s", kill_timeout="2s"))
            daemon.wait_for("started")
            daemon.wait_for("victim_chosen", pid=first.pid, action="term")
            daemon.wait_for("victim_escalated", pid=first.pid, action="kill")
            released = daemon.wait_for("action_result", action="release", pid=first.pid)
            assert released["outcome"] in {"released", "gone"}, released
            stuck = daemon.wait_for("victim_stuck", pid=first.pid)
            assert first.poll() is None, "frozen: it really did not die"
            # The memory is back (reaped while the victim stays frozen), so the next hog can grow.
            second = cg.spawn(
                hog_argv(second_rec, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900", "--hold")
            )
            assert wait_until(lambda: [r for r in read_record(second_rec) if r[0] == "SIGTERM"], 20), (
                daemon.log_path.read_text()[-3000:]
            )
            second.wait(10)
            chosen = daemon.find("victim_chosen", action="term")
            assert [e["pid"] for e in chosen] == [first.pid, second.pid]
            assert chosen[1]["timestamp"] > stuck["timestamp"]
            assert cg.oom_kill_count() == 0
        with contextlib.suppress(subprocess.TimeoutExpired):
            first.wait(10)  # thawed: the pending SIGKILL finishes it
        assert first.returncode == -signal.SIGKILL
