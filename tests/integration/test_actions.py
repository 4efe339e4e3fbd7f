"""The executor against real child processes that these tests start (and only those).

Every signal here goes to a process this test file forked or spawned; hogs run with
oom_score_adj 1000; cgroups are named uoomd-test-* and removed in finally blocks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cgroups import bare_cgroup
from uoomd.actions import KillCgroup, ReleaseMemory, RunHook, SendSignal
from uoomd.executor import LiveExecutor
from uoomd.hooks import run_hook
from uoomd.kill import open_victim
from uoomd.plan import VictimKind
from uoomd.readings import Pid, ProcessKey
from uoomd.results import Outcome
from uoomd.sources.procfs import read_stat

pytestmark = pytest.mark.integration

HOGS = str(Path(__file__).resolve().parent.parent / "hogs.py")
V1_MEMORY = Path("/sys/fs/cgroup/memory")
V2_UNIFIED = Path("/sys/fs/cgroup/unified")


# --- helpers --------------------------------------------------------------------------------


@dataclass
class Hog:
    proc: subprocess.Popen[bytes]
    record: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def key(self) -> ProcessKey:
        ident = read_stat("/proc", self.pid)
        assert ident is not None
        return ProcessKey(pid=Pid(self.pid), starttime_ticks=ident.starttime_ticks)

    def events(self) -> list[str]:
        if not self.record.exists():
            return []
        return [line.split()[0] for line in self.record.read_text().splitlines()]

    def wait_for_count(self, event: str, count: int, timeout_s: float = 10.0) -> None:
        end = time.monotonic() + timeout_s
        while self.events().count(event) < count:
            assert time.monotonic() < end, f"hog recorded {event} fewer than {count} times: {self.events()}"
            time.sleep(0.01)
        assert self.events().count(event) == count, self.events()

    def wait_for(self, event: str, timeout_s: float = 10.0) -> None:
        end = time.monotonic() + timeout_s
        while event not in self.events():
            assert self.proc.poll() is None, f"hog exited with {self.proc.returncode} before {event}"
            assert time.monotonic() < end, f"hog never recorded {event}: {self.events()}"
            time.sleep(0.01)


@dataclass
class HogFactory:
    tmp: Path
    hogs: list[Hog] = field(default_factory=list)

    def start(self, *args: str, max_mib: int = 0, process_group: int | None = None) -> Hog:
        record = self.tmp / f"hog-{len(self.hogs)}.txt"
        argv = [sys.executable, HOGS, "--max-mib", str(max_mib), "--record", str(record), "--hold", *args]
        proc = subprocess.Popen(argv, process_group=process_group)
        hog = Hog(proc=proc, record=record)
        self.hogs.append(hog)
        hog.wait_for("HOLD")
        return hog

    def cleanup(self) -> None:
        # Our own unreaped children: their PIDs cannot have been recycled, so kill() is safe.
        for hog in self.hogs:
            if hog.proc.poll() is None:
                hog.proc.kill()
            hog.proc.wait(timeout=10)


@pytest.fixture
def hogs(tmp_path: Path) -> Iterator[HogFactory]:
    factory = HogFactory(tmp=tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def executor() -> Iterator[LiveExecutor]:
    ex = LiveExecutor(hook_timeout_s=5.0)
    try:
        yield ex
    finally:
        ex.close()


def signal_action(
    key: ProcessKey,
    sig: int,
    *,
    kind: VictimKind = VictimKind.PROCESS,
    pgid: int = 0,
    cgroup: str | None = None,
    dry_run: bool = False,
    group: tuple[ProcessKey, ...] = (),
) -> SendSignal:
    return SendSignal(
        guard="test",
        target=key,
        signal=sig,
        victim_kind=kind,
        pgid=pgid or key.pid,
        cgroup=cgroup,
        dry_run=dry_run,
        group=group,
    )


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- signalling a process through a verified pidfd -----------------------------------------


def test_sigterm_via_pidfd_reaches_the_child_hog_and_it_records_it(hogs: HogFactory, executor: LiveExecutor) -> None:
    hog = hogs.start()
    result = executor.execute(signal_action(hog.key, signal.SIGTERM))
    assert result.outcome is Outcome.SENT
    assert result.fields()["signal"] == "SIGTERM"
    assert hog.proc.wait(timeout=10) == 0
    assert "SIGTERM" in hog.events()


def test_alive_polls_the_tracked_pidfd_until_the_victim_exits(hogs: HogFactory, executor: LiveExecutor) -> None:
    hog = hogs.start("--ignore-term")
    key = hog.key
    assert executor.execute(signal_action(key, signal.SIGTERM)).outcome is Outcome.SENT
    hog.wait_for("SIGTERM")
    assert key in executor.tracked()
    assert executor.alive(key)
    assert executor.execute(signal_action(key, signal.SIGKILL)).outcome is Outcome.SENT
    end = time.monotonic() + 10
    while executor.alive(key):  # readable once it is a zombie: before we reap it
        assert time.monotonic() < end
        time.sleep(0.005)
    assert hog.proc.wait(timeout=10) == -signal.SIGKILL
    assert key not in executor.tracked()


def test_a_key_with_another_starttime_is_recycled_and_nothing_is_sent(hogs: HogFactory, executor: LiveExecutor) -> None:
    hog = hogs.start("--ignore-term")
    real = hog.key
    stale = ProcessKey(pid=real.pid, starttime_ticks=real.starttime_ticks - 1)
    assert open_victim("/proc", stale) is None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        result = executor.execute(signal_action(stale, sig))
        assert result.outcome is Outcome.RECYCLED
    release = executor.execute(ReleaseMemory(guard="test", target=stale))
    assert release.outcome is Outcome.RECYCLED
    group = executor.execute(signal_action(stale, signal.SIGTERM, kind=VictimKind.PROCESS_GROUP, pgid=12345))
    assert group.outcome is Outcome.RECYCLED
    time.sleep(0.2)
    assert hog.proc.poll() is None
    assert "SIGTERM" not in hog.events()
    assert executor.alive(real)
    assert not executor.alive(stale)


def test_an_exited_and_reaped_process_is_gone(executor: LiveExecutor) -> None:
    proc = subprocess.Popen(["sleep", "0"])
    ident = read_stat("/proc", proc.pid)
    proc.wait()
    starttime = ident.starttime_ticks if ident is not None else 0
    key = ProcessKey(pid=Pid(proc.pid), starttime_ticks=starttime)
    result = executor.execute(signal_action(key, signal.SIGTERM))
    # Gone, unless another process took the PID in the meantime: then it is recycled. Never sent.
    assert result.outcome in {Outcome.GONE, Outcome.RECYCLED}
    assert not executor.alive(key)


def test_dry_run_verifies_the_victim_and_sends_nothing(hogs: HogFactory, executor: LiveExecutor) -> None:
    hog = hogs.start("--ignore-term")
    result = executor.execute(signal_action(hog.key, signal.SIGKILL, dry_run=True))
    assert result.outcome is Outcome.DRY_RUN
    time.sleep(0.2)
    assert hog.proc.poll() is None
    assert executor.tracked() == frozenset()


def test_close_releases_every_tracked_pidfd(hogs: HogFactory) -> None:
    before = open_fd_count()
    ex = LiveExecutor()
    for _ in range(3):
        hog = hogs.start("--ignore-term")
        assert ex.execute(signal_action(hog.key, signal.SIGUSR1)).outcome is Outcome.SENT
    assert len(ex.tracked()) == 3
    assert open_fd_count() == before + 3
    ex.close()
    assert open_fd_count() == before


# --- PID reuse: the reason for pidfds ------------------------------------------------------


NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")  # read only: writing it would move everyone's PIDs


def spawn_blocked_child(stdin_fd: int, devnull_fd: int) -> int:
    """A child that exits 0 after reading one byte; vfork-based, so cheap even from a big pytest."""
    return os.posix_spawn(
        "/usr/bin/head",
        ["head", "-c", "1"],
        {},
        file_actions=[(os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, devnull_fd, 1)],
    )


def burn_pids_until_near(anchor: int, pid_max: int, deadline: float, margin: int = 400) -> bool:
    """Consume PIDs with short-lived threads (each takes a PID, ~0.1 ms) until the next PID is
    just below ``anchor`` again. Threads of our own process: nothing outside this test is touched."""
    while time.monotonic() < deadline:
        for _ in range(64):
            t = threading.Thread(target=int)
            t.start()
            t.join()
        last = int(NS_LAST_PID.read_text())
        if (anchor - 1 - last) % pid_max <= margin:
            return True
    return False


def test_pid_reuse_stress_never_signals_the_newcomer(executor: LiveExecutor) -> None:
    """Spawn children, remember their keys, let them exit; wrap the PID counter; spawn again until
    our own new children hold the old PIDs. Every old key must read as recycled, and every child
    must exit 0 by itself: any other wait status means a signal reached the wrong process.

    Stale keys are only ever tried on a PID that our own live child holds right then."""
    if not NS_LAST_PID.exists():
        pytest.skip("no /proc/sys/kernel/ns_last_pid to follow the PID counter")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    deadline = time.monotonic() + 90
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    old: dict[int, ProcessKey] = {}
    reuses = wrong = children = 0

    def one_child() -> int:
        nonlocal reuses, wrong, children
        pid = spawn_blocked_child(r, devnull)
        children += 1
        try:
            ident = read_stat("/proc", pid)
            assert ident is not None
            stale = old.get(pid)
            if stale is not None and stale.starttime_ticks != ident.starttime_ticks:
                reuses += 1
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    result = executor.execute(signal_action(stale, sig))
                    assert result.outcome is Outcome.RECYCLED, result.fields()
            else:
                old[pid] = ProcessKey(pid=Pid(pid), starttime_ticks=ident.starttime_ticks)
        finally:
            os.write(w, b"x")
            _, status = os.waitpid(pid, 0)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            wrong += 1
        return pid

    try:
        anchor = one_child()
        for _ in range(199):
            one_child()
        span = max((p - anchor) % pid_max for p in old)
        if burn_pids_until_near(anchor, pid_max, deadline):
            while time.monotonic() < deadline:
                pid = one_child()
                if span < (pid - anchor) % pid_max < pid_max // 2:
                    break  # the counter passed the last old PID
    finally:
        os.close(r)
        os.close(w)
        os.close(devnull)
    print(f"pid reuse: {reuses} stale keys tried among {children} children, {wrong} wrong signals")
    assert wrong == 0
    if reuses == 0:
        pytest.skip(f"no PID came back ({children} children); the fabricated-key test covers the recycled path")
    assert reuses >= 20, f"only {reuses} reuses among {children} children"


# --- process_mrelease -----------------------------------------------------------------------


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Freeze a child of ours in a throwaway v1 freezer cgroup, thaw and remove it after.

    A frozen task with SIGKILL pending is the case process_mrelease exists for: the signal
    marks the group as exiting (kernel/signal.c complete_signal() sets SIGNAL_GROUP_EXIT)
    but the task cannot run its exit, so its mm stays attached until someone reaps it."""
    root = "/sys/fs/cgroup/freezer"
    if not os.path.isdir(root):
        pytest.skip("no cgroup v1 freezer here to hold a SIGKILLed victim before its exit")
    path = os.path.join(root, f"uoomd-test-frz-{os.getpid()}-{pid}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        with open(os.path.join(path, "freezer.state"), "w") as f:
            f.write("FROZEN")
        yield
    finally:
        with open(os.path.join(path, "freezer.state"), "w") as f:
            f.write("THAWED")
        with open(os.path.join(root, "cgroup.procs"), "w") as f, contextlib.suppress(OSError):
            f.write(str(pid))  # it may have exited once thawed
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_process_mrelease_is_refused_before_sigkill(hogs: HogFactory, executor: LiveExecutor) -> None:
    hog = hogs.start("--ignore-term", max_mib=50)
    before = executor.execute(ReleaseMemory(guard="test", target=hog.key))
    if before.outcome is Outcome.NOT_SUPPORTED:
        pytest.skip(f"process_mrelease not supported: {before.fields()}")
    assert before.outcome is Outcome.REFUSED  # the kernel's EINVAL: not dying (earlyoom#354)
    assert before.detail("errno") == "EINVAL"
    assert hog.proc.poll() is None


def test_process_mrelease_reaps_a_sigkilled_victim_that_cannot_exit(hogs: HogFactory, executor: LiveExecutor) -> None:
    hog = hogs.start("--ignore-term", max_mib=200)
    with frozen(hog.pid):
        assert executor.execute(signal_action(hog.key, signal.SIGKILL)).outcome is Outcome.SENT
        rss_before = _rss_kib(hog.pid)
        after = executor.execute(ReleaseMemory(guard="test", target=hog.key))
        if after.outcome is Outcome.NOT_SUPPORTED:
            pytest.skip(f"process_mrelease not supported: {after.fields()}")
        assert after.outcome is Outcome.RELEASED, after.fields()
        assert rss_before > 150 * 1024
        assert _rss_kib(hog.pid) < rss_before // 4, "the frozen victim's memory should be reaped already"
    assert hog.proc.wait(timeout=10) == -signal.SIGKILL


def test_process_mrelease_after_a_normal_sigkill_is_released_or_already_gone(
    hogs: HogFactory, executor: LiveExecutor
) -> None:
    # A victim free to run races to exit_mm(); once its mm is detached the kernel answers
    # ESRCH (find_lock_task_mm() fails), which means the memory is going back already.
    hog = hogs.start("--ignore-term", max_mib=200)
    assert executor.execute(signal_action(hog.key, signal.SIGKILL)).outcome is Outcome.SENT
    after = executor.execute(ReleaseMemory(guard="test", target=hog.key))
    assert after.outcome in {Outcome.RELEASED, Outcome.GONE}, after.fields()
    assert hog.proc.wait(timeout=10) == -signal.SIGKILL


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_release_of_a_live_process_such_as_ourselves_is_refused_not_raised(executor: LiveExecutor) -> None:
    ident = read_stat("/proc", os.getpid())
    assert ident is not None
    me = ProcessKey(pid=Pid(os.getpid()), starttime_ticks=ident.starttime_ticks)
    result = executor.execute(ReleaseMemory(guard="test", target=me))
    assert result.outcome in {Outcome.REFUSED, Outcome.NOT_SUPPORTED}


# --- process groups -------------------------------------------------------------------------


def test_process_group_victim_signals_only_the_keys_of_its_group(hogs: HogFactory, executor: LiveExecutor) -> None:
    # Issue 11: a guard scoped to a cgroup, a process group reaching outside it. The decision
    # core puts only the in-scope members in the group; the one outside must live.
    leader = hogs.start(process_group=0)
    inside = hogs.start(process_group=leader.pid)
    outside = hogs.start(process_group=leader.pid)
    with bare_cgroup(V1_MEMORY) as cg:
        try:
            join_cgroup(cg, leader.pid)
            join_cgroup(cg, inside.pid)
            action = signal_action(
                inside.key,
                signal.SIGTERM,
                kind=VictimKind.PROCESS_GROUP,
                pgid=leader.pid,
                group=(inside.key, leader.key),
            )
            result = executor.execute(action)
            assert result.outcome is Outcome.SENT, result.fields()
            assert (result.detail("method"), result.detail("sent")) == ("pidfd", 2)
            assert inside.key in executor.tracked()  # unreaped: running or a zombie, its pidfd opens
            assert inside.proc.wait(timeout=10) == 0
            assert leader.proc.wait(timeout=10) == 0
            assert "SIGTERM" in inside.events()
            assert "SIGTERM" in leader.events()
            time.sleep(0.2)
            assert outside.proc.poll() is None
            assert "SIGTERM" not in outside.events()
        finally:
            hogs.cleanup()


def test_process_group_victim_with_an_empty_group_signals_the_victim_alone(
    hogs: HogFactory, executor: LiveExecutor
) -> None:
    leader = hogs.start(process_group=0)
    member = hogs.start(process_group=leader.pid)
    result = executor.execute(signal_action(member.key, signal.SIGTERM, kind=VictimKind.PROCESS_GROUP, pgid=leader.pid))
    assert result.outcome is Outcome.SENT, result.fields()
    assert result.detail("sent") == 1
    assert member.proc.wait(timeout=10) == 0
    time.sleep(0.2)
    assert leader.proc.poll() is None
    assert "SIGTERM" not in leader.events()


def test_a_group_key_in_another_process_group_is_left_alone(hogs: HogFactory, executor: LiveExecutor) -> None:
    victim = hogs.start(process_group=0)
    stranger = hogs.start(process_group=0)
    action = signal_action(
        victim.key, signal.SIGTERM, kind=VictimKind.PROCESS_GROUP, pgid=victim.pid, group=(victim.key, stranger.key)
    )
    result = executor.execute(action)
    assert result.outcome is Outcome.SENT, result.fields()
    assert (result.detail("sent"), result.detail("gone")) == (1, 1)
    assert victim.proc.wait(timeout=10) == 0
    time.sleep(0.2)
    assert stranger.proc.poll() is None
    assert "SIGTERM" not in stranger.events()


def test_process_group_with_a_pgid_that_is_not_the_victims_is_refused(hogs: HogFactory, executor: LiveExecutor) -> None:
    victim = hogs.start("--ignore-term", process_group=0)
    other = hogs.start("--ignore-term", process_group=0)
    action = signal_action(
        victim.key, signal.SIGTERM, kind=VictimKind.PROCESS_GROUP, pgid=other.pid, group=(victim.key, other.key)
    )
    result = executor.execute(action)
    assert result.outcome is Outcome.REFUSED
    assert result.detail("reason") == "pgid changed"
    time.sleep(0.2)
    assert "SIGTERM" not in victim.events()
    assert "SIGTERM" not in other.events()


def test_a_recycled_or_exited_group_victim_signals_nobody_in_its_group(
    hogs: HogFactory, executor: LiveExecutor
) -> None:
    leader = hogs.start(process_group=0)
    member = hogs.start(process_group=leader.pid)
    stale = ProcessKey(pid=member.key.pid, starttime_ticks=member.key.starttime_ticks - 1)
    exited = subprocess.Popen(["sleep", "0"], process_group=leader.pid)
    ident = read_stat("/proc", exited.pid)
    exited.wait()
    dead = ProcessKey(pid=Pid(exited.pid), starttime_ticks=ident.starttime_ticks if ident is not None else 0)
    for target in (stale, dead):
        group = (target, leader.key, member.key)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            result = executor.execute(
                signal_action(target, sig, kind=VictimKind.PROCESS_GROUP, pgid=leader.pid, group=group)
            )
            assert result.outcome in {Outcome.RECYCLED, Outcome.GONE}, result.fields()
            assert result.detail("sent") is None
    time.sleep(0.2)
    assert leader.proc.poll() is None
    assert member.proc.poll() is None
    assert "SIGTERM" not in leader.events() + member.events()
    assert executor.tracked() == frozenset()


# --- cgroups --------------------------------------------------------------------------------


def join_cgroup(cgroup: Path, pid: int) -> None:
    (cgroup / "cgroup.procs").write_text(f"{pid}\n")


def test_v1_cgroup_kill_signals_every_member_through_pidfds(hogs: HogFactory) -> None:
    a = hogs.start()
    b = hogs.start()
    bystander = hogs.start("--ignore-term")
    with bare_cgroup(V1_MEMORY) as cg:
        try:
            join_cgroup(cg, a.pid)
            join_cgroup(cg, b.pid)
            assert not (cg / "cgroup.kill").exists()
            ex = LiveExecutor(cgroup_roots=(str(V1_MEMORY),))
            kill = KillCgroup(guard="test", path="/" + cg.name, dry_run=False, group=(a.key, b.key))
            result = ex.execute(kill)
            assert result.outcome is Outcome.SENT, result.fields()
            assert result.detail("method") == "pidfd"  # v1 has no cgroup.kill
            assert (result.detail("sent"), result.detail("skipped")) == (2, 0)
            assert a.proc.wait(timeout=10) == -signal.SIGKILL
            assert b.proc.wait(timeout=10) == -signal.SIGKILL
            assert bystander.proc.poll() is None
        finally:
            hogs.cleanup()


def test_v1_cgroup_victim_with_sigterm_reaches_every_member_of_its_group(hogs: HogFactory) -> None:
    a = hogs.start()
    b = hogs.start()
    with bare_cgroup(V1_MEMORY) as cg:
        try:
            join_cgroup(cg, a.pid)
            join_cgroup(cg, b.pid)
            ex = LiveExecutor(cgroup_roots=(str(V1_MEMORY),))
            group = (a.key, b.key)
            action = signal_action(a.key, signal.SIGTERM, kind=VictimKind.CGROUP, cgroup="/" + cg.name, group=group)
            result = ex.execute(action)
            assert result.outcome is Outcome.SENT, result.fields()
            assert a.proc.wait(timeout=10) == 0
            assert b.proc.wait(timeout=10) == 0
            assert "SIGTERM" in a.events()
            assert "SIGTERM" in b.events()
            ex.close()
        finally:
            hogs.cleanup()


def test_v2_cgroup_kill_writes_cgroup_kill_when_every_member_is_in_the_group(hogs: HogFactory) -> None:
    a = hogs.start()
    b = hogs.start()
    with bare_cgroup(V2_UNIFIED) as cg:
        try:
            if not (cg / "cgroup.kill").exists():
                pytest.skip("no cgroup.kill (Linux < 5.14)")
            join_cgroup(cg, a.pid)
            join_cgroup(cg, b.pid)
            ex = LiveExecutor(cgroup_roots=(str(V2_UNIFIED),))
            result = ex.execute(KillCgroup(guard="test", path=str(cg), dry_run=False, group=(a.key, b.key)))
            assert result.outcome is Outcome.SENT, result.fields()
            assert result.detail("method") == "cgroup.kill"
            assert a.proc.wait(timeout=10) == -signal.SIGKILL
            assert b.proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            hogs.cleanup()


@pytest.mark.parametrize("root", [V1_MEMORY, V2_UNIFIED], ids=["v1", "v2"])
def test_cgroup_kill_spares_a_member_outside_the_group(hogs: HogFactory, root: Path) -> None:
    # Issue 11: a protected (or out-of-scope) member shares the victim's cgroup. Where cgroup.kill
    # exists (v2) it is not used, since it would take everyone; each group key gets its pidfd.
    victim = hogs.start()
    spared = hogs.start("--ignore-term")
    with bare_cgroup(root) as cg:
        try:
            join_cgroup(cg, victim.pid)
            join_cgroup(cg, spared.pid)
            ex = LiveExecutor(cgroup_roots=(str(root),))
            result = ex.execute(KillCgroup(guard="test", path=str(cg), dry_run=False, group=(victim.key,)))
            assert result.outcome is Outcome.SENT, result.fields()
            assert (result.detail("method"), result.detail("skipped"), result.detail("sent")) == ("pidfd", 1, 1)
            assert victim.proc.wait(timeout=10) == -signal.SIGKILL
            time.sleep(0.2)
            assert spared.proc.poll() is None
        finally:
            hogs.cleanup()


def test_cgroup_victim_sigterm_spares_a_member_outside_the_group(hogs: HogFactory) -> None:
    victim = hogs.start()
    spared = hogs.start()
    with bare_cgroup(V1_MEMORY) as cg:
        try:
            join_cgroup(cg, victim.pid)
            join_cgroup(cg, spared.pid)
            ex = LiveExecutor(cgroup_roots=(str(V1_MEMORY),))
            for sent, group in enumerate(((victim.key,), ()), 1):  # empty: the victim alone, never the cgroup
                action = signal_action(victim.key, signal.SIGUSR1, kind=VictimKind.CGROUP, cgroup=str(cg), group=group)
                result = ex.execute(action)
                assert result.outcome is Outcome.SENT, result.fields()
                assert (result.detail("sent"), result.detail("skipped")) == (1, 1)
                # Two SIGUSR1s pending at once merge into one (a standard signal): wait for each.
                victim.wait_for_count("SIGUSR1", sent)
            assert victim.key in ex.tracked()
            ex.close()
            assert "SIGUSR1" not in spared.events()
            assert spared.proc.poll() is None
        finally:
            hogs.cleanup()


def test_a_recycled_cgroup_victim_signals_nobody(hogs: HogFactory) -> None:
    a = hogs.start()
    b = hogs.start()
    with bare_cgroup(V2_UNIFIED) as cg:
        try:
            join_cgroup(cg, a.pid)
            join_cgroup(cg, b.pid)
            stale = ProcessKey(pid=a.key.pid, starttime_ticks=a.key.starttime_ticks - 1)
            ex = LiveExecutor(cgroup_roots=(str(V2_UNIFIED),))
            action = signal_action(stale, signal.SIGKILL, kind=VictimKind.CGROUP, cgroup=str(cg), group=(stale, b.key))
            result = ex.execute(action)
            assert result.outcome is Outcome.RECYCLED, result.fields()
            # A KillCgroup has no victim to verify: a stale key in its group is a member outside it.
            kill = ex.execute(KillCgroup(guard="test", path=str(cg), dry_run=False, group=(stale, b.key)))
            assert (kill.detail("method"), kill.detail("skipped")) == ("pidfd", 1), kill.fields()
            assert b.proc.wait(timeout=10) == -signal.SIGKILL
            time.sleep(0.2)
            assert a.proc.poll() is None
            assert a.events() == ["START", "HOLD"]
        finally:
            hogs.cleanup()


def test_hierarchy_root_cgroup_is_refused(executor: LiveExecutor) -> None:
    for path in ("/", str(V1_MEMORY), "/sys/fs/cgroup/memory/."):
        result = executor.execute(KillCgroup(guard="test", path=path, dry_run=False))
        assert result.outcome is Outcome.REFUSED


# --- hooks ----------------------------------------------------------------------------------


def finished(handle_result: object) -> None:
    assert handle_result is not None


def test_hook_gets_a_clean_environment_with_the_uoomd_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UOOMD_LEAK_FROM_PARENT", "1")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    handle = run_hook(("env",), (("UOOMD_PID", "42"), ("UOOMD_NAME", "evil $(id)"), ("HOME", "/root")), 5.0)
    result = handle.wait(10)
    assert result is not None
    assert result.outcome is Outcome.COMPLETED, result.fields()
    lines = str(result.detail("output")).splitlines()
    assert sorted(lines) == sorted(["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "UOOMD_PID=42", "UOOMD_NAME=evil $(id)"])


def test_hook_stdin_is_dev_null() -> None:
    result = run_hook(("sh", "-c", "cat; echo eof"), (), 5.0).wait(10)
    assert result is not None
    assert result.outcome is Outcome.COMPLETED
    assert result.detail("output") == "eof\n"


def test_hanging_hook_is_killed_with_its_process_group_after_the_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    start = time.monotonic()
    handle = run_hook(("sh", "-c", 'sleep 30 & echo $! > "$0"; wait', str(pidfile)), (), 0.5)
    result = handle.wait(10)
    elapsed_s = time.monotonic() - start
    assert result is not None
    assert result.outcome is Outcome.TIMED_OUT
    assert result.detail("exit_code") == -signal.SIGKILL
    assert 0.5 <= elapsed_s < 5
    grandchild = int(pidfile.read_text())
    end = time.monotonic() + 5
    while True:  # gone, or a zombie waiting for init: either way killed, not sleeping
        ident = read_stat("/proc", grandchild)
        if ident is None or ident.state in {"Z", "X"} or ident.pgid != handle.pid:
            break
        assert time.monotonic() < end, "the hook's grandchild survived the timeout"
        time.sleep(0.02)


def test_missing_hook_binary_fails_without_raising() -> None:
    handle = run_hook(("/nonexistent/uoomd-hook",), (), 5.0)
    assert handle.result is not None
    assert handle.result.outcome is Outcome.FAILED
    assert handle.result.detail("errno") == "ENOENT"
    assert handle.poll(time.monotonic()) is handle.result


def test_hook_argv_with_shell_metacharacters_is_passed_verbatim(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arg = f"a; touch {marker} | $(touch {marker}) `touch {marker}` && * > ~ 'q\" \\"
    result = run_hook(("printf", "%s", arg), (), 5.0).wait(10)
    assert result is not None
    assert result.outcome is Outcome.COMPLETED
    assert result.detail("output") == arg
    assert not marker.exists()


def test_hook_that_exits_non_zero_is_failed_with_its_code() -> None:
    result = run_hook(("sh", "-c", "echo oops; exit 3"), (), 5.0).wait(10)
    assert result is not None
    assert result.outcome is Outcome.FAILED
    assert result.detail("exit_code") == 3
    assert result.detail("output") == "oops\n"


def test_hook_output_is_bounded_but_counted() -> None:
    result = run_hook(("sh", "-c", "head -c 1000000 /dev/zero"), (), 10.0).wait(15)
    assert result is not None
    assert result.outcome is Outcome.COMPLETED
    assert len(str(result.detail("output"))) == 4096
    assert result.detail("output_bytes") == 1_000_000


def test_executor_starts_hooks_without_waiting_and_reports_them_from_poll(executor: LiveExecutor) -> None:
    start = time.monotonic()
    started = executor.execute(RunHook(guard="test", argv=("sleep", "0.3"), env=()))
    assert time.monotonic() - start < 0.25  # the loop is not blocked for the hook's 0.3 s
    assert started.outcome is Outcome.STARTED
    assert started.guard == "test"
    assert executor.hooks.next_deadline() is not None
    results: tuple[object, ...] = ()
    end = time.monotonic() + 10
    while not results:
        assert time.monotonic() < end
        time.sleep(0.02)
        results = executor.poll()
    assert [r.outcome for r in executor.poll()] == []
    assert len(results) == 1
    assert executor.hooks.next_deadline() is None
