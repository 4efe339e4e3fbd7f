"""The warm ranking at a crossing, on real processes in a real memory cgroup: what the scan did not see is seen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.builders import make_guard, make_memory, make_plan
from tests.cgroups import ScratchCgroup, scratch_cgroup
from tests.e2e.daemon_runner import hog_argv, read_record, wait_until
from uoomd.decision import Need
from uoomd.plan import Plan, Scope, ScopeKind
from uoomd.readings import GuardReading
from uoomd.scoring import Candidate
from uoomd.sources.cgroup import CgroupMemoryReader
from uoomd.sources.meminfo import read_meminfo_totals
from uoomd.warm import WarmRanking

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
def cg() -> Iterator[ScratchCgroup]:
    with scratch_cgroup(limit_bytes=400 * MIB) as group:
        yield group


def _plan(cg: ScratchCgroup) -> Plan:
    guard = make_guard("cg", scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path))
    return make_plan(guards=(guard,))


def _reading(cg: ScratchCgroup) -> GuardReading:
    ram, swap = read_meminfo_totals()
    with CgroupMemoryReader(cg.memory_path, ram, swap) as reader:
        return GuardReading(guard="cg", memory=reader.read())


def _holding(cg: ScratchCgroup, record: Path, mib: int) -> subprocess.Popen[bytes]:
    """A hog of ``mib`` MiB in the cgroup, once it holds it."""
    hog = cg.spawn(hog_argv(record, "--max-mib", str(mib), "--mib-per-step", str(mib), "--hold"))
    assert wait_until(lambda: _held(record), 10)
    return hog


def _held(record: Path, kind: str = "HOLD") -> bool:
    return any(line[0] == kind for line in read_record(record))


@contextmanager
def _scanned(plan: Plan, reading: GuardReading) -> Iterator[tuple[WarmRanking, Candidate]]:
    """A warm ranking right after its full scan, and its best candidate then."""
    warm = WarmRanking("/proc", on_error=lambda *a, **k: None)
    try:
        warm.rescan(plan, [reading], time.monotonic())
        best = warm.rankings[reading.guard].best
        assert best is not None
        yield warm, best
    finally:
        warm.close()


def _best_now(warm: WarmRanking, plan: Plan, reading: GuardReading) -> Candidate | None:
    """The best candidate at a crossing just after the scan: well within the refresh interval."""
    rankings = warm.provide(plan, {reading.guard: Need.NOW}, [reading], warm.scanned_at + 0.01)
    return rankings[reading.guard].best


def test_a_process_born_after_the_scan_is_the_victim_at_the_crossing(cg: ScratchCgroup, tmp_path: Path) -> None:
    idle_rec, hog_rec = tmp_path / "idle.rec", tmp_path / "hog.rec"
    _holding(cg, idle_rec, 30)
    plan = _plan(cg)
    with _scanned(plan, _reading(cg)) as (warm, before):
        hog = cg.spawn(hog_argv(hog_rec, "--max-mib", "120", "--mib-per-step", "40", "--hold"))
        assert wait_until(lambda: _held(hog_rec), 10)
        best = _best_now(warm, plan, _reading(cg))
        assert not warm.stats.rescanned
        assert warm.stats.new == 1
        assert best is not None
        assert best.process.pid == hog.pid
        # A warm ranking alone (no crossing) would still have named the idle process.
        assert before.process.pid != hog.pid


def test_a_process_small_at_the_scan_that_grew_since_is_the_victim(cg: ScratchCgroup, tmp_path: Path) -> None:
    idle_rec, grow_rec = tmp_path / "idle.rec", tmp_path / "grow.rec"
    cg.spawn(hog_argv(idle_rec, "--max-mib", "30", "--mib-per-step", "30", "--hold"))
    grower = cg.spawn(
        hog_argv(grow_rec, "--max-mib", "150", "--mib-per-step", "4", "--pause-at-mib", "4", "--pause-s", "2", "--hold")
    )
    assert wait_until(lambda: _held(idle_rec), 10)
    plan = _plan(cg)
    with _scanned(plan, _reading(cg)) as (warm, top):
        assert top.process.pid != grower.pid
        assert wait_until(lambda: _held(grow_rec), 20)
        best = _best_now(warm, plan, _reading(cg))
        assert not warm.stats.rescanned
        assert best is not None
        assert best.process.pid == grower.pid


def test_a_process_that_left_the_cgroup_is_dropped_at_the_crossing(tmp_path: Path) -> None:
    with (
        scratch_cgroup(limit_bytes=400 * MIB) as cg,
        scratch_cgroup(limit_bytes=400 * MIB) as other,
    ):
        mover = _holding(cg, tmp_path / "mover.rec", 60)
        plan = _plan(cg)
        with _scanned(plan, _reading(cg)) as (warm, best):
            assert best.process.pid == mover.pid
            Path(other.memory_path, "cgroup.procs").write_text(str(mover.pid))
            rankings = warm.provide(plan, {"cg": Need.NOW}, [_reading(cg)], warm.scanned_at + 0.01)
            assert all(c.process.pid != mover.pid for c in rankings["cg"].candidates)
            # And an in-flight victim that moved away is no longer ours to signal.
            assert warm.ineligible(plan, [("cg", best.key)]) == {best.key}


def test_a_process_born_after_a_machine_scan_is_in_the_ranking_at_the_crossing() -> None:
    # The machine scope: what was born since the scan is found from the last PID handed out
    # (/proc/loadavg), or by listing /proc when too many PIDs went by; never missed either way.
    plan = make_plan(guards=(make_guard("system"),))
    ram, swap = read_meminfo_totals()
    reading = GuardReading(
        guard="system", memory=make_memory(ram // 2, total_bytes=ram, swap_total_bytes=swap, swap_free_bytes=swap)
    )
    child = None
    try:
        with _scanned(plan, reading) as (warm, _best):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            assert wait_until(lambda: Path(f"/proc/{child.pid}/stat").exists(), 5)
            rankings = warm.provide(plan, {"system": Need.NOW}, [reading], warm.scanned_at + 0.01)
            assert not warm.stats.rescanned
            assert child.pid in {int(c.process.pid) for c in rankings["system"].candidates}
    finally:
        if child is not None:
            child.kill()
            child.wait()


def test_a_victim_that_is_dying_has_not_left(cg: ScratchCgroup, tmp_path: Path) -> None:
    # A zombie (exited, not yet reaped) has no mm: it must read as exiting, never as a victim
    # that left the scope (that skipped the victim_exited path and leaked its pidfd, seen in
    # the soak test as one fd per victim).
    victim = _holding(cg, tmp_path / "dying.rec", 20)
    plan = _plan(cg)
    try:
        with _scanned(plan, _reading(cg)) as (warm, best):
            assert best.process.pid == victim.pid
            os.kill(victim.pid, signal.SIGKILL)  # our own child, by PID; left unreaped: a zombie
            assert wait_until(lambda: Path(f"/proc/{victim.pid}/stat").read_text().split(")")[-1].split()[0] == "Z", 5)
            assert warm.ineligible(plan, [("cg", best.key)]) == frozenset()
    finally:
        victim.wait()
