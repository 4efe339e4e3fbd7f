"""Faults of uoomd's own sources and outputs, in the real daemon loop: logged, handled, and the daemon keeps guarding.

Most tests drive :class:`uoomd.daemon.Daemon` directly on a fixture ``proc_root`` (a copy
of a recorded /proc tree whose ``meminfo`` and ``pressure/memory`` the test rewrites in
place) with a recording executor, so nothing is ever signalled. The cgroup tests use a
throwaway ``uoomd-test-*`` cgroup; the one end-to-end test signals only its own hog.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.builders import CHILDREN, cgroup_policy, make_guard, make_plan
from tests.cgroups import scratch_cgroup
from tests.e2e.daemon_runner import hog_argv, read_record, uoomd_command, wait_until
from tests.harness import Clock
from uoomd.actions import Action, RunHook, SendSignal
from uoomd.daemon import Daemon
from uoomd.executor import RecordingExecutor
from uoomd.hooks import HookRunner
from uoomd.logs import PipelineLogger, configure
from uoomd.plan import Amount, HooksPlan, LogFormat, Plan, PsiAction, PsiKind, PsiTriggerPlan, Scope, ScopeKind
from uoomd.readings import ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome
from uoomd.sources import psi as psi_source

pytestmark = pytest.mark.integration

MIB = 1 << 20
TOTAL_KIB = 4 * 1024 * 1024  # the fixture machine: 4 GiB, no swap
PLENTY_KIB = 3 * 1024 * 1024
LOW_KIB = 100 * 1024  # below the 10 % term level of make_guard()


# --- a fixture /proc whose files the test rewrites -------------------------------------------


@dataclass
class FakeProc:
    root: Path

    def meminfo(self, available_kib: int, total_kib: int = TOTAL_KIB) -> None:
        self.write_meminfo(
            f"MemTotal: {total_kib} kB\nMemFree: 1024 kB\nMemAvailable: {available_kib} kB\n"
            "SwapTotal: 0 kB\nSwapFree: 0 kB\n"
        )

    def write_meminfo(self, text: str) -> None:
        # In place (same inode): the daemon keeps /proc/meminfo open and preads it.
        with open(self.root / "meminfo", "w") as f:
            f.write(text)

    def pressure(self, some_total_us: int) -> None:
        (self.root / "pressure").mkdir(exist_ok=True)
        with open(self.root / "pressure" / "memory", "w") as f:
            f.write(
                f"some avg10=0.00 avg60=0.00 avg300=0.00 total={some_total_us}\n"
                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            )


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    root = tmp_path / "proc"
    shutil.copytree(CHILDREN, root, symlinks=True)
    fake = FakeProc(root)
    fake.meminfo(PLENTY_KIB)
    return fake


def with_state_file(plan: Plan, tmp_path: Path) -> Plan:
    return replace(plan, daemon=replace(plan.daemon, state_file=str(tmp_path / "state.json")))


@dataclass
class Harness:
    daemon: Daemon
    out: io.StringIO
    executor: RecordingExecutor

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in lines if name is None or e["event"] == name]

    def signals(self) -> list[SendSignal]:
        return [a for a in self.executor.actions if isinstance(a, SendSignal)]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Daemon] = []

    def make(plan: Plan, proc_root: str, executor: Any = None, clock: Callable[[], float] = time.monotonic) -> Harness:
        out = io.StringIO()
        recorder = executor if executor is not None else RecordingExecutor()
        daemon = Daemon(
            with_state_file(plan, tmp_path),
            executor=recorder,
            log=configure(LogFormat.JSON, out),
            proc_root=proc_root,
            clock=clock,
        )
        made.append(daemon)
        daemon.open()
        inner = recorder.recorder if isinstance(recorder, HookingRecorder) else recorder
        return Harness(daemon=daemon, out=out, executor=inner)

    try:
        yield make
    finally:
        for daemon in made:
            daemon.close()


# --- /proc/meminfo faults -------------------------------------------------------------------


def test_meminfo_unreadable_for_a_while_is_logged_and_guarding_resumes(
    proc: FakeProc, harness: Callable[..., Harness]
) -> None:
    clock = Clock()
    h = harness(make_plan(), str(proc.root), clock=clock)
    proc.write_meminfo("")  # a read that returns nothing usable
    for _ in range(3):
        clock.now += 0.5
        h.daemon.tick(clock.now)
    failed = h.events("reading_failed")
    assert len(failed) == 1, "logged once per interval, not at every poll"
    assert failed[0]["source"] == "memory"
    assert "missing" in failed[0]["error"]
    assert not h.signals()
    proc.meminfo(LOW_KIB)
    clock.now += 0.5
    h.daemon.tick(clock.now)
    assert [s.target.pid for s in h.signals()], "guarding resumed once meminfo read again"
    assert h.events("victim_chosen")


def test_nonsense_reading_mem_available_above_total_is_logged_and_skipped(
    proc: FakeProc, harness: Callable[..., Harness]
) -> None:
    clock = Clock()
    h = harness(make_plan(), str(proc.root), clock=clock)
    # MemAvailable above MemTotal, with MemTotal tiny: taken at face value, 0.1 % would be
    # "available" and the guard would kill. It must be refused instead.
    proc.meminfo(available_kib=LOW_KIB, total_kib=1)
    clock.now += 0.5
    h.daemon.tick(clock.now)
    failed = h.events("reading_failed")
    assert failed
    assert "exceeds MemTotal" in failed[0]["error"]
    assert not h.signals()
    proc.meminfo(LOW_KIB)
    clock.now += 0.5
    h.daemon.tick(clock.now)
    assert h.signals()


def test_meminfo_gone_during_a_process_scan_is_logged_and_the_daemon_keeps_guarding(
    proc: FakeProc, harness: Callable[..., Harness]
) -> None:
    clock = Clock()
    h = harness(make_plan(), str(proc.root), clock=clock)
    proc.meminfo(LOW_KIB)  # the kept fd reads this; the scan opens the path afresh
    os.unlink(proc.root / "meminfo")
    for _ in range(3):
        clock.now += 0.5
        h.daemon.tick(clock.now)  # must not raise: a failed scan is a fault, not the end
    failed = [e for e in h.events("reading_failed") if e.get("source") == "processes"]
    assert failed, h.out.getvalue()
    assert not h.signals()
    proc.meminfo(LOW_KIB)  # back (a new file at the path)
    clock.now += 0.5
    h.daemon.tick(clock.now)
    assert h.signals(), "the next scan after meminfo came back found a victim"


# --- cgroup faults --------------------------------------------------------------------------


def test_cgroup_removed_under_an_armed_psi_trigger_is_logged_and_the_loop_does_not_spin(
    harness: Callable[..., Harness],
) -> None:
    with scratch_cgroup(limit_bytes=64 * MIB, prefer="v1") as cg:
        if cg.pressure_path is None:
            pytest.skip("no cgroup2 memory.pressure for the test cgroup")
        trigger = PsiTriggerPlan(
            kind=PsiKind.SOME, stall_us=100_000, window_us=2_000_000, sustain_s=0, action=PsiAction.TERM
        )
        guard = make_guard("cg", scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path), psi=(trigger,))
        h = harness(make_plan(guards=(guard,)), "/proc")
        for _ in range(3):
            h.daemon.wait(min(0.05, h.daemon.tick(time.monotonic())))
        cg.cleanup()
    # A removed cgroup's pressure file polls POLLERR forever (kernfs_fop_poll() on an inactive
    # node): a loop that keeps it registered wakes at once, every time, at 100 % CPU.
    iterations = 0
    cpu_before = time.process_time()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        h.daemon.wait(h.daemon.tick(time.monotonic()))
        iterations += 1
    cpu_s = time.process_time() - cpu_before
    assert iterations < 200, f"{iterations} loop iterations in 1.5 s: the loop spins on a dead fd"
    assert cpu_s < 0.5, f"{cpu_s:.2f} s of CPU in 1.5 s"
    # The whole cgroup went (its v2 twin and the v1 memory cgroup): one line, not one per file.
    assert len(h.events("scope_gone")) == 1
    assert not h.events("reading_failed")
    assert not h.events("psi_trigger_gone")
    assert not h.signals()


def test_a_removed_cgroup_scope_is_logged_gone_once_not_a_crash(harness: Callable[..., Harness]) -> None:
    with scratch_cgroup(limit_bytes=64 * MIB) as cg:
        guard = make_guard("cg", scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path))
        h = harness(make_plan(guards=(guard,)), "/proc")
        h.daemon.tick(time.monotonic())
        cg.cleanup()
    for _ in range(3):
        h.daemon.tick(time.monotonic())
    [gone] = h.events("scope_gone")
    assert "removed" in gone["error"]
    assert not h.events("reading_failed")


# --- the PSI trigger refused ----------------------------------------------------------------


class RefusingOs:
    """The ``os`` module as psi.py sees it, except that writing a trigger fails with EINVAL,
    as a kernel without PSI triggers (or a file that is not a PSI file) answers."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def write(fd: int, data: bytes) -> int:
        if data.startswith((b"some ", b"full ")):
            raise OSError(22, "Invalid argument")
        return os.write(fd, data)


def test_refused_psi_trigger_falls_back_to_polled_and_still_fires(
    proc: FakeProc, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psi_source, "os", RefusingOs())
    proc.pressure(some_total_us=0)
    proc.meminfo(available_kib=TOTAL_KIB // 2)  # above term, below the PSI gate (100 %)
    trigger = PsiTriggerPlan(
        kind=PsiKind.SOME, stall_us=100_000, window_us=2_000_000, sustain_s=0, action=PsiAction.TERM
    )
    guard = make_guard(psi=(trigger,), psi_mem_gate=Amount(fraction=1.0))
    clock = Clock()
    h = harness(make_plan(guards=(guard,)), str(proc.root), clock=clock)
    armed = h.events("psi_trigger_armed")
    assert len(armed) == 1
    assert armed[0]["mode"] == "polled"
    assert "refused" in armed[0]["reason"]
    stall_us = 0
    for _ in range(6):
        clock.now += 0.5
        stall_us += 200_000  # 40 % of each half second stalled
        proc.pressure(some_total_us=stall_us)
        h.daemon.tick(clock.now)
    assert h.events("trigger_fired")
    chosen = h.events("victim_chosen")
    assert chosen
    assert chosen[0]["trigger"].startswith("psi[0] some")
    assert h.signals()


# --- a hook that hangs ----------------------------------------------------------------------


class HookingRecorder:
    """Records signals (sends none) but runs hooks for real, with the executor's own HookRunner."""

    def __init__(self, timeout_s: float) -> None:
        self.recorder = RecordingExecutor()
        self.hooks = HookRunner(timeout_s)

    def execute(self, action: Action) -> ActionResult:
        if isinstance(action, RunHook):
            handle = self.hooks.start(action.argv, action.env, time.monotonic())
            if handle.result is not None:
                return handle.result
            return ActionResult(kind=ActionKind.HOOK, outcome=Outcome.STARTED, pid=handle.pid)
        return self.recorder.execute(action)

    def alive(self, key: ProcessKey) -> bool:
        return self.recorder.alive(key)

    def keep_only(self, keys: frozenset[ProcessKey]) -> None:
        return None

    def poll(self, now: float | None = None) -> tuple[ActionResult, ...]:
        return self.hooks.poll(time.monotonic() if now is None else now)

    def victim_fds(self) -> tuple[int, ...]:
        return ()

    def hooks_running(self) -> bool:
        return self.hooks.next_deadline() is not None

    def close(self) -> None:
        return None


def test_hanging_hook_is_killed_after_its_timeout_and_never_blocks_the_loop(
    proc: FakeProc, harness: Callable[..., Harness]
) -> None:
    plan = replace(make_plan(), hooks=HooksPlan(after_kill=("/bin/sleep", "30"), timeout_s=0.5))
    executor = HookingRecorder(timeout_s=0.5)
    h = harness(plan, str(proc.root), executor=executor)
    proc.meminfo(LOW_KIB)
    tick_s: list[float] = []
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        started = time.monotonic()
        timeout_s = h.daemon.tick(started)
        tick_s.append(time.monotonic() - started)
        h.daemon.wait(timeout_s)
    assert h.signals(), "the victim was chosen"
    results = [e for e in h.events("action_result") if e["action"] == "hook"]
    assert [r["outcome"] for r in results] == ["started", "timed_out"], results
    assert results[1]["exit_code"] == -signal.SIGKILL
    assert max(tick_s) < 0.1, f"slowest tick {max(tick_s) * 1000:.0f} ms while the hook hung"
    assert not executor.hooks_running()


# --- the log stream and the notification socket gone ----------------------------------------


def test_log_stream_and_notify_socket_gone_the_daemon_keeps_guarding(
    proc: FakeProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    log = configure(LogFormat.JSON, stream)
    assert isinstance(log, PipelineLogger)
    executor = RecordingExecutor()
    daemon = Daemon(with_state_file(make_plan(), tmp_path), executor=executor, log=log, proc_root=str(proc.root))
    try:
        daemon.open()
        daemon.tick(time.monotonic())
        assert daemon.notifier.enabled
        os.close(read_end)  # the journal went away: writes now fail with EPIPE
        server.close()
        os.unlink(sock_path)  # and so did systemd's notification socket
        proc.meminfo(LOW_KIB)
        for _ in range(3):
            daemon.notifier.ready(daemon.status_line())
            daemon.tick(time.monotonic())
        assert [a for a in executor.actions if isinstance(a, SendSignal)], "still guarding"
        assert log.dropped > 0
    finally:
        daemon.close()
        with contextlib.suppress(OSError):
            stream.close()


@pytest.mark.e2e
def test_uoomd_run_with_its_output_closed_still_stops_a_hog(tmp_path: Path) -> None:
    with scratch_cgroup(limit_bytes=512 * MIB) as cg:
        policy = tmp_path / "policy.toml"
        # The policy's default escalation: SIGKILL after 5 s, 10 victims a minute.
        policy.write_text(cgroup_policy(cg, tmp_path, term_timeout="5s", kill_timeout="3s", max_kills=None))
        daemon = subprocess.Popen(
            [*uoomd_command(), "run", "--policy", str(policy)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert daemon.stdout is not None
            first = daemon.stdout.readline()
            while b'"started"' not in first:
                assert first, "the daemon exited before it started"
                first = daemon.stdout.readline()
            daemon.stdout.close()  # nobody reads the log any more
            record = tmp_path / "hog.rec"
            hog = cg.spawn(hog_argv(record, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900", "--hold"))
            assert wait_until(lambda: [r for r in read_record(record) if r[0] == "SIGTERM"], 20)
            hog.wait(10)
            assert daemon.poll() is None, "the daemon died when its log stream went away"
            assert cg.oom_kill_count() == 0
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


# --- the quiet path: a poll far from every level skips the step, never a crossing --------------

BIG_TOTAL_KIB = 64 * 1024 * 1024
BIG_PLENTY_KIB = 60 * 1024 * 1024
BIG_LOW_KIB = 1024 * 1024  # under the 10 % term level of make_plan()


def test_a_quiet_daemon_skips_the_step_far_from_trouble_and_acts_on_the_first_low_reading(
    proc: FakeProc, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uoomd.decision

    steps: list[float] = []
    real_step = uoomd.decision.step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        steps.append(args[1].now)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(uoomd.decision, "step", counting_step)  # the daemon calls decision.step
    clock = Clock()
    h = harness(make_plan(), str(proc.root), clock=clock)
    # A big machine far from its levels: a 4 GiB/s allocator needs seconds to get near them.
    proc.meminfo(BIG_PLENTY_KIB, total_kib=BIG_TOTAL_KIB)
    for _ in range(5):
        clock.now += 1.0
        h.daemon.tick(clock.now)
    assert len(steps) <= 1, "far from every level the loop should not run the decision step at each poll"
    proc.meminfo(BIG_LOW_KIB, total_kib=BIG_TOTAL_KIB)
    clock.now += 1.0
    h.daemon.tick(clock.now)
    assert steps[-1] == clock.now, "the first reading under the term level must reach the decision core"
    assert h.signals(), "and act at once"


def test_a_quiet_daemon_still_does_a_full_tick_now_and_then(
    proc: FakeProc, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uoomd.daemon

    full: list[float] = []
    real_full = uoomd.daemon.Daemon._full_tick

    def counting_full(self: Daemon, now: float) -> float:
        full.append(now)
        return real_full(self, now)

    monkeypatch.setattr(uoomd.daemon.Daemon, "_full_tick", counting_full)
    clock = Clock()
    proc.meminfo(BIG_PLENTY_KIB, total_kib=BIG_TOTAL_KIB)
    h = harness(make_plan(), str(proc.root), clock=clock)
    for _ in range(int(uoomd.daemon.QUIET_FULL_TICK_S) + 5):
        clock.now += 1.0
        h.daemon.tick(clock.now)
    assert len(full) >= 2, "status, state file and stuck victims are refreshed by a periodic full tick"
    assert len(full) <= 4
