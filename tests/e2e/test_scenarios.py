"""The scenario matrix of issue 11: ``uoomd run`` against hogs, bystanders and races, trial after trial.

Each scenario runs as repeated trials (parametrized by the trial index, which also sets the
start offsets), each with its own daemon guarding its own 512 MiB v1 memory cgroup: term at
30% available, kill at 15%, ``poll_min`` 10 ms, ``term_timeout`` 1 s. Beside what the scenario
is about, EVERY trial asserts:

1. the kernel's memcg OOM killer never acted (``oom_kill`` stays 0 in every cgroup the trial made);
2. no process but the intended victims got a signal: every process the test starts is
   ``tests/hogs.py``, which records each signal it receives; a bystander must record none and
   still be alive at the end, and the daemon's log must name no PID outside the victims.

A failing trial lists what went wrong, which process got what, and a merged timeline of the
daemon's log, the processes' records and the test's own steps (plus each process's stderr and
the daemon's non-JSON output, e.g. a traceback). The 61 trials take ~5 minutes on 2 vCPUs.

Safety: every daemon guards only a cgroup the test created, so it can only ever signal the
test's own processes; all of them run at oom_score_adj 1000; the busy loops of the loaded
scenarios run outside the guarded cgroup and are stopped by PID; cgroups are removed (with
their members, through pidfds) also when a trial fails. The test process is a child subreaper
while a trial runs, so processes orphaned by a victim's death are reaped, not left as zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup, scratch_cgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, wait_until

pytestmark = pytest.mark.e2e

MIB = 1 << 20
TERM_FRACTION = 0.30
KILL_FRACTION = 0.15
TERM_TIMEOUT_S = 1.0
KILL_TIMEOUT_S = 2.0
# Cgroup usage above which the guard is past its term level (available = limit - usage).
TERM_USAGE_BYTES = int(CGROUP_LIMIT_BYTES * (1 - TERM_FRACTION))

# Waits that end as soon as their condition holds: generous, so load cannot break them.
SETTLE_TIMEOUT_S = 30.0
STARTED_TIMEOUT_S = 30.0
# After the daemon stopped: a signal it sent before is recorded by the receiver's handler
# within milliseconds (it sleeps in pause() or allocates in 5-40 ms steps); this covers load.
RECORD_GRACE_S = 0.5

SIGNAL_WORDS = frozenset({"SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"})

_PR_SET_CHILD_SUBREAPER = 36  # include/uapi/linux/prctl.h


def spread(trial: int, trials: int, low: float, high: float) -> float:
    """The trial's value, spread evenly over [low, high] across the trials."""
    return low + (high - low) * trial / max(1, trials - 1)


def hog_opts(*flags: str, **values: object) -> list[str]:
    """tests/hogs.py options: ``hog_opts("hold", max_mib=900)`` is ``--hold --max-mib 900``; a list repeats."""
    out = [f"--{flag.replace('_', '-')}" for flag in flags]
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            out += [f"--{key.replace('_', '-')}", str(item)]
    return out


# A hog asks for more than the 512 MiB cgroup holds: it reaches HOLD only if nothing stops it, and
# then the kernel acts first. All that a trial's processes ask for adds up to 1.5 GiB at most.
GROWER_MAX_MIB = 600
# ~1.2 GiB/s measured here (2 vCPUs): 300 MiB in 250 ms.
FAST_HOG = hog_opts("hold", mib_per_step=32, interval_ms=5, max_mib=GROWER_MAX_MIB)


def trial_ids(trials: int) -> list[Any]:
    return [pytest.param(n, id=f"trial{n:02d}") for n in range(trials)]


def scenario_policy(cg: ScratchCgroup, tmp_path: Path, *, guard_extra: str = "", rules: str = "") -> str:
    return cgroup_policy(
        cg,
        tmp_path,
        name="scenario",
        term=f"{TERM_FRACTION:.0%}",
        kill=f"{KILL_FRACTION:.0%}",
        term_timeout=f"{TERM_TIMEOUT_S}s",
        kill_timeout=f"{KILL_TIMEOUT_S}s",
        max_kills=100,
        guard_extra=guard_extra,
        extra=rules,
    )


def less_preferred(name: str) -> str:
    """A rule that makes uoomd prefer others to ``name`` (the kernel still sees adj 1000)."""
    return f"""
[[rule]]
name = "less-preferred"
match = {{ name = "^{name}$" }}
adjust = -1000
"""


# --- processes ----------------------------------------------------------------------------


class Role(StrEnum):
    VICTIM = "victim"  # uoomd may signal it
    BYSTANDER = "bystander"  # must receive no signal and be alive at the end


class Proc:
    """A process the trial started (directly or through another), with its record file."""

    def __init__(
        self,
        label: str,
        role: Role,
        record: Path,
        pid: int,
        *,
        popen: subprocess.Popen[Any] | None = None,
        status: Callable[[], str | None] | None = None,
    ) -> None:
        self.label = label
        self.role = role
        self.record = record
        self.pid = pid
        self.popen = popen
        self._status = status  # another process's account of how this one ended (a fork parent's EXIT)
        self.pidfd: int | None = None
        if popen is None:
            try:
                self.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self.pidfd = None

    def lines(self) -> list[list[str]]:
        return read_record(self.record)

    def has(self, kind: str) -> bool:
        return any(line[0] == kind for line in self.lines())

    def signals(self) -> list[str]:
        return [line[0] for line in self.lines() if line[0] in SIGNAL_WORDS]

    def ended(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None
        if self._status is not None and self._status() is not None:
            return True
        if self.pidfd is None:
            return not os.path.exists(f"/proc/{self.pid}")
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def status(self) -> str:
        """``running``, ``exit N``, ``signal SIGKILL`` or ``ended`` (not our child: no status)."""
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return "running"
            return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        told = self._status() if self._status is not None else None
        if told is not None:
            how, _, number = told.partition(":")
            return f"signal {signal.Signals(int(number)).name}" if how == "signal" else f"exit {number}"
        return "ended" if self.ended() else "running"

    def sigkilled(self) -> bool:
        return self.status() == "signal SIGKILL"

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def describe(self) -> str:
        events = " ".join(
            line[0] + (f"@{line[2]}MiB" if len(line) > 2 and line[0] != "START" else "") for line in self.lines()
        )
        return f"{self.label:<10} {self.role:<9} pid {self.pid:<7} {self.status():<16} records: {events or '-'}"


def cgroup_of(pid: int) -> str | None:
    """The v1 memory cgroup of a process, as /proc/PID/cgroup names it."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _id, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return path
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# --- one trial ----------------------------------------------------------------------------

_SHOWN_EVENTS = frozenset(
    {
        "started",
        "victim_chosen",
        "victim_escalated",
        "action_result",
        "victim_exited",
        "victim_left",
        "victim_stuck",
        "memory_recovered",
        "recovery_timeout",
        "no_candidate",
        "rate_limited",
        "reading_failed",
        "scope_gone",
        "policy_reloaded",
        "policy_reload_failed",
        "stopping",
    }
)
_SHOWN_FACTS = (
    "trigger",
    "action",
    "outcome",
    "signal",
    "pid",
    "pgid",
    "name",
    "victim_kind",
    "members",
    "sent",
    "phase",
    "reason",
    "error",
    "in_flight",
)
_TIMELINE_MAX = 160


class Scene:
    """One trial: its cgroups, its daemon, its processes, and the problems found so far."""

    def __init__(
        self, title: str, cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
    ) -> None:
        self.title = title
        self.cgroup = cgroup
        self.cgroups = [cgroup]
        self._start_daemon = start_daemon
        self.tmp_path = tmp_path
        self.daemon: RunningDaemon | None = None
        self.procs: list[Proc] = []
        self.problems: list[str] = []
        self.notes: list[str] = []  # facts of the trial, shown in a failure report
        self.marks: list[tuple[float, str]] = []  # what the test did and when (wall clock), for the timeline
        self._wall_minus_mono = time.time() - time.monotonic()

    # -- set-up

    def start(self, policy: str) -> RunningDaemon:
        self.daemon = self._start_daemon(policy)
        self.daemon.wait_for("started", timeout_s=STARTED_TIMEOUT_S)
        return self.daemon

    def record_path(self, label: str) -> Path:
        return self.tmp_path / f"{label}.rec"

    def spawn(
        self, label: str, role: Role, options: Sequence[str], *, cgroup: ScratchCgroup | None = None, **popen: Any
    ) -> Proc:
        """Start tests/hogs.py (inside ``cgroup``, default the guarded one), recording to ``label.rec``."""
        record = self.record_path(label)
        return self.spawn_argv(label, role, record, hog_argv(record, *options), cgroup or self.cgroup, **popen)

    def spawn_argv(
        self, label: str, role: Role, record: Path, argv: list[str], cgroup: ScratchCgroup, **popen: Any
    ) -> Proc:
        """Start ``argv`` in ``cgroup``; its stderr (and its children's) goes to ``label.err`` for the report."""
        self.mark(f"spawn {label}")
        with open(self.tmp_path / f"{label}.err", "wb") as err:
            child = cgroup.spawn(argv, stdin=subprocess.DEVNULL, stderr=err, **popen)
        proc = Proc(label, role, record, child.pid, popen=child)
        self.procs.append(proc)
        return proc

    def adopt(
        self, label: str, role: Role, record: Path, pid: int, status: Callable[[], str | None] | None = None
    ) -> Proc:
        """Track a process another one started (a fork child, a group member) by its record's START pid."""
        proc = Proc(label, role, record, pid, status=status)
        self.procs.append(proc)
        return proc

    def add_cgroup(self, cg: ScratchCgroup) -> None:
        self.cgroups.append(cg)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def mark(self, text: str) -> None:
        self.marks.append((time.time(), text))

    def abort(self, text: str) -> NoReturn:
        """The trial cannot go on: fail now, with the full report."""
        self.problem(text)
        pytest.fail(self.report(), pytrace=False)

    # -- waiting and expecting

    def started_pid(self, record: Path, timeout_s: float = STARTED_TIMEOUT_S) -> int | None:
        lines = wait_until(lambda: [line for line in read_record(record) if line[0] == "START"], timeout_s)
        return int(lines[0][2]) if lines else None

    def wait_settled(
        self, procs: list[Proc], timeout_s: float = SETTLE_TIMEOUT_S, done: tuple[str, ...] = ("HOLD", "DONE")
    ) -> bool:
        """Until each process has ended or reached one of ``done`` in its record (HOLD: nothing stopped it)."""

        def unsettled() -> list[Proc]:
            return [p for p in procs if not p.ended() and not any(p.has(kind) for kind in done)]

        left = wait_until(lambda: not unsettled(), timeout_s)
        if not left:
            rest = ", ".join(f"{p.label} (pid {p.pid})" for p in unsettled())
            self.problem(f"still running after {timeout_s:.0f}s, neither ended nor at {'/'.join(done)}: {rest}")
            return False
        return True

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def expect(self, condition: object, text: str) -> bool:
        if not condition:
            self.problem(text)
        return bool(condition)

    def expect_stopped(self, proc: Proc) -> None:
        """uoomd stopped ``proc``: it got SIGTERM (recorded, or fatal before its handler was set)
        or died of SIGKILL, before reaching its full size. The kernel's kills are checked apart."""
        signals, status = proc.signals(), proc.status()
        if "SIGTERM" not in signals and status not in {"signal SIGTERM", "signal SIGKILL"}:
            self.problem(f"{proc.label} (pid {proc.pid}) was not stopped by uoomd: signals {signals}, {status}")
        for kind in ("HOLD", "DONE"):
            if proc.has(kind):
                self.problem(f"{proc.label} (pid {proc.pid}) reached its full size ({kind}): it was stopped too late")

    # -- the checks every trial makes

    def finish(self) -> None:
        """Stop the daemon, make the two checks of every trial, and fail with a full report if anything is wrong."""
        if self.daemon is not None:
            self.daemon.stop()
        time.sleep(RECORD_GRACE_S)
        for cg in self.cgroups:
            kills = cg.oom_kill_count()
            self.expect(kills == 0, f"the kernel's memcg OOM killer acted {kills} time(s) in {cg.name}")
        for proc in self.procs:
            if proc.role is Role.BYSTANDER:
                self.expect(not proc.signals(), f"bystander {proc.label} (pid {proc.pid}) received {proc.signals()}")
                self.expect(not proc.ended(), f"bystander {proc.label} (pid {proc.pid}) is gone: {proc.status()}")
        victims = {p.pid for p in self.procs if p.role is Role.VICTIM}
        bystanders = {p.pid: p.label for p in self.procs if p.role is Role.BYSTANDER}
        for event in self.daemon.events() if self.daemon is not None else []:
            if event.get("event") != "action_result" or event.get("outcome") != "sent" or "pid" not in event:
                continue
            pid = event["pid"]
            if pid not in victims:
                who = f"bystander {bystanders[pid]}" if pid in bystanders else "a process that is no intended victim"
                self.problem(f"the daemon sent {event.get('signal', event.get('action'))} to pid {pid} ({who})")
        if self.problems:
            pytest.fail(self.report(), pytrace=False)

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    # -- the report

    def report(self) -> str:
        out = [f"{self.title}: {len(self.problems)} problem(s)"]
        out += [f"  - {text}" for text in self.problems]
        if self.notes:
            out.append("trial: " + "; ".join(self.notes))
        out.append("processes:")
        out += [f"  {proc.describe()}" for proc in self.procs]
        for cg in self.cgroups:
            try:
                usage = f"usage {cg.usage_bytes() / MIB:.0f} MiB, oom_kill {cg.oom_kill_count()}"
            except OSError as exc:
                usage = f"unreadable: {exc}"
            out.append(f"cgroup {cg.memory_path}: limit {cg.limit_bytes / MIB:.0f} MiB, {usage}")
        out.append("timeline (daemon events and process records):")
        out += [f"  {line}" for line in self.timeline()]
        for err in sorted(self.tmp_path.glob("*.err")):
            text = err.read_text(errors="replace").strip().splitlines()
            if text:
                out.append(f"stderr of {err.stem} (last 10 lines):")
                out += [f"  {line[:300]}" for line in text[-10:]]
        if self.daemon is not None:
            raw = [
                line
                for line in self.daemon.log_path.read_text(errors="replace").splitlines()
                if not line.startswith("{")
            ]
            if raw:
                out.append("daemon output that is not a JSON event (last 30 lines):")
                out += [f"  {line[:300]}" for line in raw[-30:]]
        return "\n".join(out)

    def timeline(self) -> list[str]:
        entries: list[tuple[float, str]] = [(at, f"test     {text}") for at, text in self.marks]
        if self.daemon is not None:
            for event in self.daemon.events():
                if event.get("event") not in _SHOWN_EVENTS:
                    continue
                try:
                    at = datetime.fromisoformat(str(event["timestamp"])).timestamp()
                except (KeyError, ValueError):
                    continue
                facts = [f"{key}={event[key]}" for key in _SHOWN_FACTS if key in event]
                if "available_bytes" in event:
                    facts.append(f"available={event['available_bytes'] / MIB:.0f}MiB")
                entries.append((at, f"daemon   {event['event']} {' '.join(facts)}"))
        for proc in self.procs:
            for line in proc.lines():
                try:
                    at = float(line[1]) + self._wall_minus_mono
                except (IndexError, ValueError):
                    continue
                entries.append((at, f"{proc.label:<8} {line[0]} {' '.join(line[2:])}"))
        entries.sort()
        if not entries:
            return ["(empty)"]
        first = entries[0][0]
        lines = [f"+{at - first:7.3f}s {text}" for at, text in entries]
        if len(lines) > _TIMELINE_MAX:
            cut = len(lines) - _TIMELINE_MAX
            lines = [*lines[:20], f"... {cut} lines left out ...", *lines[20 + cut :]]
        return lines


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Adopt orphans while the trial runs (a victim's children outlive it), and reap them afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        # Runs after the cgroup and daemon fixtures (it is set up first): every Popen of the
        # trial has been waited for, so what is left are adopted orphans, killed by the cleanup.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)


@pytest.fixture
def scene(
    request: pytest.FixtureRequest,
    subreaper: None,
    cgroup: ScratchCgroup,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> Iterator[Scene]:
    made = Scene(request.node.name, cgroup, start_daemon, tmp_path)
    try:
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` CPU-bound loops outside the guarded cgroup, at oom_score_adj 1000, stopped by PID."""

    def adj_1000() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")

    loops: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            loops.append(
                subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"],
                    stdin=subprocess.DEVNULL,
                    preexec_fn=adj_1000,  # noqa: PLW1509 -- only writes our own oom_score_adj
                )
            )
        yield loops
    finally:
        for loop in loops:
            if loop.poll() is None:
                loop.kill()
            loop.wait(10)


def expect_loops_alive(scene: Scene, loops: list[subprocess.Popen[bytes]]) -> None:
    for loop in loops:
        code = loop.poll()
        scene.expect(code is None, f"busy loop pid {loop.pid} ended ({code}) before the test stopped it")


# --- 1. a fast hog beside idle processes --------------------------------------------------


def run_fast_hog_beside_idle(scene: Scene, trial: int, trials: int) -> None:
    """An idle 30 MiB bystander, then a fast hog born 0.2-2.5 s after the daemon is up."""
    idle = scene.spawn("idle", Role.BYSTANDER, hog_opts("hold", name="idle30", max_mib=30, mib_per_step=10))
    if not wait_until(lambda: idle.has("HOLD") or idle.ended(), SETTLE_TIMEOUT_S) or idle.ended():
        scene.abort("the idle bystander never held its 30 MiB")
    scene.start(scenario_policy(scene.cgroup, scene.tmp_path))
    # Where the hog is born relative to the daemon's warm refreshes (>= 0.5 s apart) varies.
    offset_s = spread(trial, trials, 0.2, 2.5)
    scene.note(f"hog started {offset_s:.2f}s after the daemon was up")
    time.sleep(offset_s)
    hog = scene.spawn("hog", Role.VICTIM, [*FAST_HOG, "--name", "fasthog"])
    scene.wait_settled([hog])
    scene.expect_stopped(hog)


FAST_HOG_TRIALS = 12


@pytest.mark.parametrize("trial", trial_ids(FAST_HOG_TRIALS))
def test_a_fast_hog_beside_an_idle_process_is_the_only_victim(scene: Scene, trial: int) -> None:
    run_fast_hog_beside_idle(scene, trial, FAST_HOG_TRIALS)
    scene.finish()


# --- 2. a second grower during recovery ---------------------------------------------------

SECOND_GROWER_TRIALS = 6


@pytest.mark.parametrize("trial", trial_ids(SECOND_GROWER_TRIALS))
def test_a_second_grower_during_recovery_is_stopped_too(scene: Scene, trial: int) -> None:
    # The grower is less preferred (a rule; the kernel still sees adj 1000), so the fast hog is the
    # first victim even when it is the smaller one. When the hog is gone, the grower is left at
    # 150-350 MiB (varied), growing at 150 MiB/s to 600 MiB: uoomd must stop it too.
    scene.start(scenario_policy(scene.cgroup, scene.tmp_path, rules=less_preferred("grower2")))
    grower = scene.spawn(
        "grower",
        Role.VICTIM,
        hog_opts("hold", name="grower2", mib_per_step=4, fill_rate_mib_s=150, max_mib=GROWER_MAX_MIB),
    )
    # Not later: the hog needs ~0.2 s to start, and the grower alone crosses at ~350 MiB.
    at_mib = spread(trial, SECOND_GROWER_TRIALS, 150, 300)
    scene.note(f"fast hog started at cgroup usage {at_mib:.0f} MiB")
    wait_until(lambda: scene.cgroup.usage_bytes() >= at_mib * MIB or grower.ended(), SETTLE_TIMEOUT_S)
    hog = scene.spawn("hog", Role.VICTIM, [*FAST_HOG, "--name", "fasthog"])
    scene.wait_settled([hog, grower])
    scene.expect_stopped(hog)
    scene.expect_stopped(grower)
    scene.finish()


# --- 3. a forking hog ---------------------------------------------------------------------

FORK_CHILDREN = 8
FORK_CHILD_MIB = 64  # 8 x 64 MiB + the interpreter: more than the 512 MiB cgroup holds
FORK_RATE_MIB_S = 200  # per child; 1.6 GiB/s together (CPU-bound on 2 vCPUs: less)


def run_forking_hog(scene: Scene, trial: int, trials: int) -> None:
    """A parent forks 8 children that each grow to 64 MiB and hold: uoomd must stop enough of them."""
    scene.start(scenario_policy(scene.cgroup, scene.tmp_path))
    offset_s = spread(trial, trials, 0.2, 1.2)
    scene.note(f"forking hog started {offset_s:.2f}s after the daemon was up")
    time.sleep(offset_s)
    options = hog_opts(
        "hold",
        fork=FORK_CHILDREN,
        name="forkhog",
        max_mib=FORK_CHILD_MIB,
        mib_per_step=4,
        fill_rate_mib_s=FORK_RATE_MIB_S,
    )
    parent = scene.spawn("parent", Role.VICTIM, options)

    def forks() -> list[list[str]]:
        return [line for line in parent.lines() if line[0] == "CHILD"]

    def exit_of(pid: int) -> Callable[[], str | None]:
        def told() -> str | None:  # the parent's EXIT line for this child: code:N or signal:N
            ends = [line[3] for line in parent.lines() if line[0] == "EXIT" and int(line[2]) == pid]
            return ends[0] if ends else None

        return told

    wait_until(lambda: len(forks()) == FORK_CHILDREN or parent.ended(), SETTLE_TIMEOUT_S)
    children = []
    for line in forks():
        pid, index = int(line[2]), line[3]
        record = Path(f"{parent.record}.{index}")
        children.append(scene.adopt(f"child{index}", Role.VICTIM, record, pid, exit_of(pid)))
    scene.expect(len(children) == FORK_CHILDREN, f"the parent forked {len(children)} of {FORK_CHILDREN} children")
    if scene.wait_settled(children):
        # Every child has ended or holds its 64 MiB: what is left must fit under the term level.
        back = wait_until(lambda: scene.cgroup.usage_bytes() < TERM_USAGE_BYTES, 10.0)
        stopped = sum(1 for c in children if c.signals() or c.sigkilled())
        scene.expect(
            back,
            f"memory never came back under the term level ({TERM_USAGE_BYTES / MIB:.0f} MiB used): "
            f"{scene.cgroup.usage_bytes() / MIB:.0f} MiB used after uoomd stopped {stopped} child(ren)",
        )
    stopped_children = [c for c in children if "SIGTERM" in c.signals() or c.sigkilled()]
    scene.expect(stopped_children, "no allocating child was stopped by uoomd")
    scene.note(f"{len(stopped_children)} of {len(children)} children stopped")


FORK_TRIALS = 6


@pytest.mark.parametrize("trial", trial_ids(FORK_TRIALS))
def test_a_forking_hog_is_stopped_until_memory_is_back(scene: Scene, trial: int) -> None:
    run_forking_hog(scene, trial, FORK_TRIALS)
    scene.finish()


# --- 4. several hogs at once --------------------------------------------------------------

SEVERAL_TRIALS = 6


@pytest.mark.parametrize("trial", trial_ids(SEVERAL_TRIALS))
def test_three_hogs_started_together_are_all_stopped(scene: Scene, trial: int) -> None:
    scene.start(scenario_policy(scene.cgroup, scene.tmp_path))
    offset_s = spread(trial, SEVERAL_TRIALS, 0.2, 1.2)
    scene.note(f"hogs start {offset_s:.2f}s after the daemon was up, together (--start-at)")
    start_at = f"{time.monotonic() + offset_s:.6f}"
    hogs = [
        scene.spawn(
            f"hog{n}",
            Role.VICTIM,
            hog_opts("hold", name=f"hog{n}", start_at=start_at, mib_per_step=16, interval_ms=5, max_mib=450),
        )
        for n in range(3)
    ]
    scene.wait_settled(hogs)
    for hog in hogs:
        scene.expect_stopped(hog)
    scene.finish()


# --- 5. a SIGTERM-ignoring small victim, then a grower ------------------------------------

STUBBORN_TRIALS = 5
# The grower waits this long below the kill level (3 x term_timeout) while the stubborn one is killed.
STUBBORN_PAUSE_S = 3.0


@pytest.mark.parametrize("trial", trial_ids(STUBBORN_TRIALS))
def test_a_stubborn_small_victim_is_killed_then_the_grower_is_stopped(scene: Scene, trial: int) -> None:
    daemon = scene.start(scenario_policy(scene.cgroup, scene.tmp_path, rules=less_preferred("grower5")))
    stubborn = scene.spawn(
        "stubborn", Role.VICTIM, hog_opts("hold", "ignore_term", name="stubborn", max_mib=40, mib_per_step=8)
    )
    if not wait_until(lambda: stubborn.has("HOLD") or stubborn.ended(), SETTLE_TIMEOUT_S) or stubborn.ended():
        scene.abort("the stubborn victim never held its 40 MiB")
    # Paused at P MiB, the grower puts the cgroup past the term level (~P + 56 MiB used; the level is
    # 358 MiB) but short of the kill level (435 MiB); after the pause it grows on to 600 MiB.
    pause_mib = round(spread(trial, STUBBORN_TRIALS, 320, 345))
    scene.note(f"grower pauses at {pause_mib} MiB for {STUBBORN_PAUSE_S}s")
    grower_opts = hog_opts(
        "hold",
        name="grower5",
        mib_per_step=16,
        interval_ms=5,
        pause_at_mib=pause_mib,
        pause_s=STUBBORN_PAUSE_S,
        max_mib=GROWER_MAX_MIB,
    )
    grower = scene.spawn("grower", Role.VICTIM, grower_opts)
    scene.wait_settled([stubborn, grower])
    chosen = [e.get("pid") for e in daemon.find("victim_chosen")]
    scene.expect(
        chosen[:1] == [stubborn.pid],
        f"the stubborn victim (pid {stubborn.pid}) was not the first chosen (the rule should make it so): {chosen}",
    )
    scene.expect(stubborn.signals() == ["SIGTERM"], f"the stubborn victim got {stubborn.signals()}, not one SIGTERM")
    scene.expect(stubborn.sigkilled(), f"the stubborn victim was not SIGKILLed: {stubborn.status()}")
    triggers = [e.get("trigger") for e in daemon.find("victim_escalated", pid=stubborn.pid)]
    scene.expect("term_timeout" in triggers, f"the stubborn victim was not escalated at term_timeout: {triggers}")
    scene.expect_stopped(grower)
    scene.finish()


# --- 6. a reload while a hog grows --------------------------------------------------------

RELOAD_TRIALS = 8


@pytest.mark.parametrize("trial", trial_ids(RELOAD_TRIALS))
def test_a_reload_while_a_hog_grows_still_catches_it(scene: Scene, trial: int) -> None:
    daemon = scene.start(scenario_policy(scene.cgroup, scene.tmp_path))
    # Up to ~800 MiB/s: the term level (358 MiB used) comes 0.4 s or less after the SIGHUP, which is
    # sent at a cgroup usage (not a time: the reload's own child competes for the CPU) varied by trial.
    hog = scene.spawn(
        "hog", Role.VICTIM, hog_opts("hold", name="reloadhog", mib_per_step=8, interval_ms=10, max_mib=GROWER_MAX_MIB)
    )
    at_mib = spread(trial, RELOAD_TRIALS, 40, 340)
    scene.note(f"SIGHUP at cgroup usage {at_mib:.0f} MiB, policy file unchanged")
    wait_until(lambda: scene.cgroup.usage_bytes() >= at_mib * MIB or hog.ended(), SETTLE_TIMEOUT_S)
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGHUP)
        scene.mark(f"SIGHUP sent to the daemon at usage {scene.cgroup.usage_bytes() / MIB:.0f} MiB")
    scene.wait_settled([hog])
    scene.expect_stopped(hog)
    # The levels are 77 MiB apart, which the hog needs >= 96 ms to cross: a daemon that watches
    # through the reload (10 ms polls) acts at the term level. One that went blind acts past the kill level.
    for first in daemon.find("victim_chosen", pid=hog.pid)[:1]:
        available_mib = first.get("available_bytes", 0) / MIB
        scene.expect(
            first.get("action") == "term",
            f"uoomd first acted on the hog past the kill level (action {first.get('action')}, "
            f"{available_mib:.0f} MiB available): it did not watch while reloading",
        )
    reloaded = wait_until(lambda: daemon.find("policy_reloaded") or daemon.find("policy_reload_failed"), 20.0)
    scene.expect(reloaded and reloaded[0]["event"] == "policy_reloaded", f"the reload did not succeed: {reloaded}")
    scene.finish()


# --- 7. a process group spanning two cgroups ----------------------------------------------

# Starts ``then`` as a child (same process group), then becomes ``first``. No shell.
_GROUP_LAUNCHER = """
import json, os, subprocess, sys
first, then = json.loads(sys.argv[1]), json.loads(sys.argv[2])
subprocess.Popen(then)
os.execv(first[0], first)
"""
GROUP_TRIALS = 3


def join_opts(cg: ScratchCgroup) -> list[str]:
    return hog_opts(join_cgroup=cg.procs_files())


@pytest.mark.parametrize("trial", trial_ids(GROUP_TRIALS))
@pytest.mark.parametrize("layout", ["hog-leads-in-a", "sleeper-leads-in-b"])
def test_a_process_group_member_outside_the_guarded_cgroup_gets_no_signal(
    scene: Scene, layout: str, trial: int
) -> None:
    with scratch_cgroup(limit_bytes=256 * MIB, prefix="uoomd-test-b", prefer="v1") as other:
        scene.add_cgroup(other)
        scene.start(scenario_policy(scene.cgroup, scene.tmp_path, guard_extra='victim = "process-group"'))
        offset_s = spread(trial, GROUP_TRIALS, 0.2, 1.2)
        scene.note(f"group started {offset_s:.2f}s after the daemon was up")
        time.sleep(offset_s)
        hog_rec, sleeper_rec = scene.record_path("hog"), scene.record_path("sleeper")
        hog_cmd = hog_argv(hog_rec, *FAST_HOG, "--name", "grouphog")
        sleeper_cmd = hog_argv(sleeper_rec, *hog_opts("hold", name="groupsleeper", max_mib=0))
        if layout == "hog-leads-in-a":  # its member, the sleeper, moves to B at its start
            first, then, home = hog_cmd, [*sleeper_cmd, *join_opts(other)], scene.cgroup
            leader_role, leader_rec, member_label, member_rec = Role.VICTIM, hog_rec, "sleeper", sleeper_rec
        else:  # the sleeper leads in B; its member, the hog, moves to A at its start
            first, then, home = sleeper_cmd, [*hog_cmd, *join_opts(scene.cgroup)], other
            leader_role, leader_rec, member_label, member_rec = Role.BYSTANDER, sleeper_rec, "hog", hog_rec
        argv = [sys.executable, "-c", _GROUP_LAUNCHER, json.dumps(first), json.dumps(then)]
        # Its own session: the group is the trial's, never the test runner's or the daemon's.
        leader_label = "hog" if member_label == "sleeper" else "sleeper"
        leader = scene.spawn_argv(leader_label, leader_role, leader_rec, argv, home, start_new_session=True)
        member_pid = scene.started_pid(member_rec)
        if member_pid is None:
            scene.abort("the group's member never started")
        member_role = Role.VICTIM if member_label == "hog" else Role.BYSTANDER
        member = scene.adopt(member_label, member_role, member_rec, member_pid)
        hog, sleeper = (leader, member) if member_label == "sleeper" else (member, leader)
        where = cgroup_of(sleeper.pid)
        scene.expect(where == "/" + other.name, f"test set-up: the sleeper is in {where}, not in /{other.name}")
        # The leader's pid names the group of both (the hog may already be gone, if uoomd was quick).
        groups = {}
        for proc in (sleeper, hog):
            with contextlib.suppress(ProcessLookupError):
                groups[proc.label] = os.getpgid(proc.pid)
        scene.expect(
            groups.get("sleeper") == leader.pid and groups.get("hog", leader.pid) == leader.pid,
            f"test set-up: the sleeper and the hog are not one process group led by pid {leader.pid}: {groups}",
        )
        scene.wait_settled([hog])
        scene.expect_stopped(hog)
        scene.finish()


# --- 8. a victim that leaves the scope ----------------------------------------------------

LEAVER_TRIALS = 5
# After leaving, the leaver is watched this long; uoomd's SIGKILL would come at term_timeout (1 s).
LEAVER_WATCH_S = 3 * TERM_TIMEOUT_S


@pytest.mark.parametrize("trial", trial_ids(LEAVER_TRIALS))
def test_a_victim_that_left_the_guarded_cgroup_gets_no_sigkill(scene: Scene, trial: int) -> None:
    with scratch_cgroup(limit_bytes=CGROUP_LIMIT_BYTES, prefix="uoomd-test-b", prefer="v1") as other:
        scene.add_cgroup(other)
        daemon = scene.start(scenario_policy(scene.cgroup, scene.tmp_path))
        offset_s = spread(trial, LEAVER_TRIALS, 0.2, 1.2)
        scene.note(f"leaver started {offset_s:.2f}s after the daemon was up")
        time.sleep(offset_s)
        # 8 MiB steps: it stops growing within a step of SIGTERM, far below the kill level. Its pages
        # stay charged to the guarded cgroup (v1 moves no charge by default), so the guard stays low.
        options = hog_opts(
            "hold",
            name="leaver",
            mib_per_step=8,
            interval_ms=5,
            max_mib=GROWER_MAX_MIB,
            on_term_join=other.procs_files(),
        )
        leaver = scene.spawn("leaver", Role.VICTIM, options)
        scene.wait_settled([leaver], done=("MOVED", "HOLD", "DONE"))
        if scene.expect(leaver.has("MOVED"), "the leaver never got SIGTERM, so it never left"):
            where = cgroup_of(leaver.pid)
            scene.expect(where == "/" + other.name, f"test set-up: the leaver is in {where}, not /{other.name}")
            time.sleep(LEAVER_WATCH_S)
        scene.expect(leaver.signals() == ["SIGTERM"], f"the leaver got {leaver.signals()}, not exactly one SIGTERM")
        scene.expect(not leaver.ended(), f"the leaver, out of the scope, was ended: {leaver.status()}")
        kills = [e.get("timestamp") for e in daemon.find("action_result", pid=leaver.pid, signal="SIGKILL")]
        scene.expect(not kills, f"uoomd sent SIGKILL to the leaver after it left the scope (at {kills})")
        scene.finish()


# --- 9. a loaded machine ------------------------------------------------------------------

LOADED_TRIALS = {"fast-hog-beside-idle": 4, "forking-hog": 3}
_LOADED = {"fast-hog-beside-idle": run_fast_hog_beside_idle, "forking-hog": run_forking_hog}


@pytest.mark.parametrize(
    ("scenario", "trial"),
    [pytest.param(name, n, id=f"{name}-trial{n:02d}") for name, count in LOADED_TRIALS.items() for n in range(count)],
)
def test_scenarios_on_a_loaded_machine(scene: Scene, scenario: str, trial: int) -> None:
    with busy_loops(2) as loops:
        scene.note("two busy loops running outside the cgroup")
        _LOADED[scenario](scene, trial, LOADED_TRIALS[scenario])
        expect_loops_alive(scene, loops)
        scene.finish()
