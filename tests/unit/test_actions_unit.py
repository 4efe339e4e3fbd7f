"""The executor's safety checks and value plumbing, without signalling anything."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from uoomd.actions import Action, KillCgroup, ReleaseMemory, RunHook, SendSignal
from uoomd.cgroupkill import cgroup_refusal_reason, resolve_cgroup_dir, signal_cgroup
from uoomd.executor import LiveExecutor, RecordingExecutor, action_kind
from uoomd.hooks import HOOK_PATH, hook_environment
from uoomd.kill import (
    MemberCounts,
    PidFd,
    pgid_refusal_reason,
    process_mrelease_nr,
    refusal_reason,
    release_memory,
    send_signal,
    send_to_members,
)
from uoomd.plan import VictimKind
from uoomd.readings import Pid, ProcessKey
from uoomd.results import ActionKind, ActionResult, Outcome
from uoomd.sources.cgroup import read_members
from uoomd.sources.procfs import parse_stat

pytestmark = pytest.mark.unit


def key(pid: int, starttime: int = 1) -> ProcessKey:
    return ProcessKey(pid=Pid(pid), starttime_ticks=starttime)


def fake_pidfd(pid: int, *, kthread: bool = False) -> PidFd:
    # fd -1: if a refusal check failed to stop the call, pidfd_send_signal(-1) would raise EBADF
    # and the test would fail on the exception, not silently pass.
    return PidFd(fd=-1, key=key(pid), pgid=pid, kthread=kthread)


def signal_action(pid: int, **kw: object) -> SendSignal:
    fields: dict[str, object] = {
        "guard": "system",
        "target": key(pid),
        "signal": signal.SIGTERM,
        "victim_kind": VictimKind.PROCESS,
        "pgid": pid,
        "cgroup": None,
        "dry_run": False,
    }
    fields.update(kw)
    return SendSignal(**fields)  # type: ignore[arg-type]


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pid", "reason"),
    [(1, "init"), (0, "invalid pid"), (-5, "invalid pid"), (os.getpid(), "self"), (os.getppid(), "parent")],
)
def test_send_signal_refuses_init_self_and_parent(pid: int, reason: str) -> None:
    result = send_signal(fake_pidfd(pid), signal.SIGKILL)
    assert result.outcome is Outcome.REFUSED
    assert result.detail("reason") == reason
    assert refusal_reason(pid) == reason


def test_send_signal_refuses_a_kernel_thread() -> None:
    result = send_signal(fake_pidfd(2, kthread=True), signal.SIGKILL)
    assert result.outcome is Outcome.REFUSED
    assert result.detail("reason") == "kernel thread"


def test_an_ordinary_pid_has_no_refusal_reason() -> None:
    assert refusal_reason(os.getpid() + 1_000_000) is None


@pytest.mark.parametrize("pid", [1, os.getpid(), os.getppid()])
@pytest.mark.parametrize("kind", list(VictimKind))
def test_live_executor_refuses_forbidden_targets_for_every_victim_kind(pid: int, kind: VictimKind) -> None:
    executor = LiveExecutor(cgroup_roots=())
    result = executor.execute(signal_action(pid, victim_kind=kind, pgid=12345, cgroup="/x"))
    assert result.outcome is Outcome.REFUSED
    assert result.guard == "system"
    assert executor.tracked() == frozenset()


@pytest.mark.parametrize(
    ("pgid", "reason"),
    [(0, "init or invalid pgid"), (1, "init or invalid pgid"), (os.getpgid(0), "own process group")],
)
def test_pgid_refusal_for_zero_init_and_own_group(pgid: int, reason: str) -> None:
    assert pgid_refusal_reason(pgid) == reason


def test_process_group_signal_to_own_group_is_refused_without_opening_anything() -> None:
    executor = LiveExecutor()
    result = executor.execute(
        signal_action(os.getpid() + 1_000_000, victim_kind=VictimKind.PROCESS_GROUP, pgid=os.getpgid(0))
    )
    assert result.outcome is Outcome.REFUSED
    assert result.detail("reason") == "own process group"


def test_release_of_a_closed_pidfd_is_gone() -> None:
    result = release_memory(PidFd(fd=-1, key=key(4242), pgid=4242, kthread=False))
    assert result.outcome in {Outcome.GONE, Outcome.NOT_SUPPORTED}


# --- parsing and tables ---------------------------------------------------------------------


def test_parse_stat_survives_a_hostile_comm() -> None:
    # comm "a) R 1 1 1 (x" would shift every field if parsed by splitting from the left.
    fields = ["S", "1", "777", "777", "0", "-1", str(0x00200000 | 0x40), *["0"] * 12, "98765", "0", "0"]
    stat = "4242 (a) R 1 1 1 (x) " + " ".join(fields)
    ident = parse_stat(stat)
    assert ident.state == "S"
    assert ident.pgid == 777
    assert ident.kthread is True
    assert ident.starttime_ticks == 98765


def test_process_mrelease_syscall_number_is_448_where_known_and_none_elsewhere() -> None:
    assert process_mrelease_nr("x86_64") == 448
    assert process_mrelease_nr("aarch64") == 448
    assert process_mrelease_nr("mips") is None


def test_action_kind_tells_every_decision_action_apart() -> None:
    assert action_kind(signal_action(4242)) is ActionKind.SIGNAL
    assert action_kind(ReleaseMemory(guard="g", target=key(4242))) is ActionKind.RELEASE
    assert action_kind(KillCgroup(guard="g", path="/a", dry_run=False)) is ActionKind.CGROUP_KILL
    assert action_kind(RunHook(guard="g", argv=("x",), env=())) is ActionKind.HOOK


def test_result_fields_are_flat_key_values() -> None:
    result = ActionResult(
        kind=ActionKind.SIGNAL, outcome=Outcome.SENT, guard="g", pid=7, details=(("signal", "SIGTERM"),)
    )
    assert result.fields() == {"action": "signal", "outcome": "sent", "guard": "g", "pid": 7, "signal": "SIGTERM"}


# --- hooks' environment ---------------------------------------------------------------------


def test_hook_environment_keeps_only_path_and_uoomd_variables() -> None:
    env = hook_environment(
        [
            ("UOOMD_NAME", "x; rm -rf / $(id)"),
            ("HOME", "/root"),
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("UOOMD_BAD KEY", "v"),
            ("UOOMD_NUL", "a\0b"),
            ("PATH", "/tmp"),
        ]
    )
    assert env == {"PATH": HOOK_PATH, "UOOMD_NAME": "x; rm -rf / $(id)"}


# --- recording executor ---------------------------------------------------------------------


def test_recording_executor_records_and_sends_nothing() -> None:
    executor = RecordingExecutor()
    actions: list[Action] = [
        signal_action(1, signal=signal.SIGKILL),  # pid 1: were anything sent, this would be fatal
        ReleaseMemory(guard="g", target=key(1)),
        KillCgroup(guard="g", path="/", dry_run=False),
        RunHook(guard="g", argv=("/bin/false",), env=()),
    ]
    results = [executor.execute(a) for a in actions]
    assert executor.actions == actions
    assert [r.outcome for r in results] == [Outcome.DRY_RUN] * 4
    assert [r.kind for r in results] == [ActionKind.SIGNAL, ActionKind.RELEASE, ActionKind.CGROUP_KILL, ActionKind.HOOK]
    assert executor.poll() == ()


def test_recording_executor_reports_alive_until_marked_exited() -> None:
    executor = RecordingExecutor()
    assert executor.alive(key(4242))
    executor.mark_exited(key(4242))
    assert not executor.alive(key(4242))


# --- cgroups on fixture trees ---------------------------------------------------------------


def make_cgroup(root: Path, rel: str, pids: list[int], *, v2: bool) -> Path:
    d = root / rel
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    if v2:
        (d / "cgroup.kill").write_text("")
    return d


def test_resolve_cgroup_dir_accepts_hierarchy_paths_and_directories_below_a_root(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("")
    app = make_cgroup(tmp_path, "app", [], v2=True)
    assert resolve_cgroup_dir("/app", [str(tmp_path)]) == str(app)
    assert resolve_cgroup_dir(str(app), [str(tmp_path)]) == str(app)
    assert resolve_cgroup_dir("/missing", [str(tmp_path)]) is None
    assert resolve_cgroup_dir("/", [str(tmp_path)]) is None  # the root itself
    assert resolve_cgroup_dir("/../../etc", [str(tmp_path)]) is None


def test_cgroup_containing_uoomd_is_refused_even_in_a_child_cgroup(tmp_path: Path) -> None:
    app = make_cgroup(tmp_path, "app", [], v2=True)
    make_cgroup(tmp_path, "app/inner", [os.getpid()], v2=True)
    assert read_members(str(app)) == frozenset({os.getpid()})
    result = signal_cgroup("/proc", str(app), signal.SIGKILL, [str(tmp_path)], group=(key(os.getpid()),))
    assert result.outcome is Outcome.REFUSED
    assert result.detail("reason") == "contains uoomd"
    assert (app / "cgroup.kill").read_text() == ""  # nothing written


def test_root_cgroup_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("")
    assert cgroup_refusal_reason(str(tmp_path), [str(tmp_path)], []) == "root cgroup"
    assert cgroup_refusal_reason("/proc", [str(tmp_path)], []) == "root cgroup"  # a mount point


def test_cgroup_containing_init_is_refused(tmp_path: Path) -> None:
    app = make_cgroup(tmp_path, "app", [1], v2=True)
    assert cgroup_refusal_reason(str(app), [str(tmp_path)], [1]) == "contains init"


# Fixture members get PIDs above any pid_max (PID_MAX_LIMIT is 2**22): were a check to let a
# pidfd path run, pidfd_open() would find nobody (ESRCH), never a process of this machine.
A, B, C = 5_000_001, 5_000_002, 5_000_003


def make_proc(root: Path, pid: int, *, starttime: int = 1, pgid: int | None = None) -> None:
    """A /proc/PID/stat with the fields the executor reads (state, pgid, flags, starttime), up to rss (field 24)."""
    fields = ["S", "1", str(pgid or pid), str(pgid or pid), "0", "-1", "0", *["0"] * 12, str(starttime), "0", "0"]
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "stat").write_text(f"{pid} (sleep) " + " ".join(fields) + "\n")


def fixture_executor(tmp_path: Path, pids: list[int]) -> tuple[LiveExecutor, Path]:
    """An executor on a fixture /proc holding ``pids`` and a v2 cgroup /app listing them."""
    proc = tmp_path / "proc"
    for pid in pids:
        make_proc(proc, pid)
    cgroups = tmp_path / "cgroup"
    app = make_cgroup(cgroups, "app", pids, v2=True)
    return LiveExecutor(proc_root=str(proc), cgroup_roots=(str(cgroups),)), app


def test_cgroup_kill_is_written_when_every_member_is_in_the_group(tmp_path: Path) -> None:
    executor, app = fixture_executor(tmp_path, [A, B])
    result = executor.execute(KillCgroup(guard="g", path="/app", dry_run=False, group=(key(A), key(B))))
    assert result.outcome is Outcome.SENT
    assert result.detail("method") == "cgroup.kill"
    assert result.detail("skipped") == 0
    assert (app / "cgroup.kill").read_text() == "1"


def test_a_member_outside_the_group_keeps_cgroup_kill_unwritten(tmp_path: Path) -> None:
    # C is in the cgroup but not in the group (protected, or out of the guard's scope): issue 11.
    executor, app = fixture_executor(tmp_path, [A, B, C])
    result = executor.execute(KillCgroup(guard="g", path="/app", dry_run=False, group=(key(A), key(B))))
    assert result.detail("method") == "pidfd"
    assert result.detail("skipped") == 1
    assert (result.detail("sent"), result.detail("gone")) == (0, 2)  # A and B: no such process here
    assert result.outcome is Outcome.GONE
    assert (app / "cgroup.kill").read_text() == ""


def test_a_group_pid_now_held_by_another_process_counts_as_outside_the_group(tmp_path: Path) -> None:
    executor, app = fixture_executor(tmp_path, [A, B])
    stale_b = key(B, starttime=0)  # the fixture's B started at tick 1: a newcomer on B's PID
    result = executor.execute(KillCgroup(guard="g", path="/app", dry_run=False, group=(key(A), stale_b)))
    assert result.detail("method") == "pidfd"
    assert result.detail("skipped") == 1
    assert (app / "cgroup.kill").read_text() == ""


@pytest.mark.parametrize("dry_run", [False, True])
def test_cgroup_kill_with_an_empty_group_is_refused_not_widened(tmp_path: Path, dry_run: bool) -> None:
    executor, app = fixture_executor(tmp_path, [A, B])
    result = executor.execute(KillCgroup(guard="g", path="/app", dry_run=dry_run))
    assert result.outcome is Outcome.REFUSED
    assert result.detail("reason") == "no eligible members"
    assert (app / "cgroup.kill").read_text() == ""


def test_dry_run_cgroup_kill_writes_nothing_and_says_who_would_be_left_alone(tmp_path: Path) -> None:
    executor, app = fixture_executor(tmp_path, [A, B, C])
    result = executor.execute(KillCgroup(guard="g", path="/app", dry_run=True, group=(key(A),)))
    assert result.outcome is Outcome.DRY_RUN
    assert (result.detail("members"), result.detail("skipped")) == (3, 2)
    assert (app / "cgroup.kill").read_text() == ""


def test_send_to_members_leaves_a_process_that_left_the_group_alone() -> None:
    # fd -1: a pidfd_send_signal() attempt would come back FAILED (EBADF), not GONE.
    pidfds = [fake_pidfd(A), fake_pidfd(B)]
    outcomes = send_to_members(pidfds, signal.SIGKILL, lambda member: member.key.pid == A)
    assert outcomes == [Outcome.FAILED, Outcome.GONE]


@pytest.mark.parametrize(
    ("outcomes", "counts", "overall"),
    [
        ([Outcome.SENT, Outcome.GONE, Outcome.RECYCLED], (1, 2, 0, 0), Outcome.SENT),
        ([Outcome.GONE, Outcome.REFUSED, Outcome.FAILED], (0, 1, 1, 1), Outcome.FAILED),
        ([Outcome.GONE, Outcome.REFUSED], (0, 1, 1, 0), Outcome.REFUSED),
        ([Outcome.RECYCLED], (0, 1, 0, 0), Outcome.GONE),
        ([], (0, 0, 0, 0), Outcome.GONE),
    ],
)
def test_member_counts_sum_the_members_and_say_the_most_telling_outcome(
    outcomes: list[Outcome], counts: tuple[int, int, int, int], overall: Outcome
) -> None:
    result = MemberCounts.of(outcomes)
    assert (result.sent, result.gone, result.refused, result.failed) == counts
    assert result.outcome() is overall


def test_cgroup_kill_outside_the_roots_is_refused(tmp_path: Path) -> None:
    executor = LiveExecutor(cgroup_roots=(str(tmp_path / "roots"),))
    make_cgroup(tmp_path, "elsewhere", [], v2=True)
    result = executor.execute(KillCgroup(guard="g", path=str(tmp_path / "elsewhere"), dry_run=False))
    assert result.outcome is Outcome.REFUSED
    assert (tmp_path / "elsewhere" / "cgroup.kill").read_text() == ""


def test_hook_with_an_empty_argv_fails_without_raising() -> None:
    result = LiveExecutor().execute(RunHook(guard="g", argv=(), env=()))
    assert result.outcome is Outcome.FAILED
    assert result.detail("error") == "empty argv"


def test_an_unexpected_errno_becomes_a_failed_result(tmp_path: Path) -> None:
    # A /proc whose stat cannot be read (a directory where a file should be): EISDIR, not ESRCH.
    (tmp_path / str(os.getpid() + 1)).mkdir()
    (tmp_path / str(os.getpid() + 1) / "stat").mkdir()
    executor = LiveExecutor(proc_root=str(tmp_path))
    result = executor.execute(ReleaseMemory(guard="g", target=key(os.getpid() + 1)))
    assert result.outcome in {Outcome.FAILED, Outcome.GONE}
