"""A guarded cgroup removed and created again, as a service restart does, in the real daemon loop.

The daemon runs in this process with a recording executor (nothing is ever signalled) and
guards a throwaway ``uoomd-test-*`` cgroup: v1 memory beside its v2 twin where the machine
is hybrid (the twin carries memory.pressure), so the PSI trigger is re-armed on the twin.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.builders import make_guard, make_plan
from tests.cgroups import ScratchCgroup, scratch_cgroup
from uoomd.daemon import Daemon
from uoomd.executor import RecordingExecutor
from uoomd.logs import configure
from uoomd.plan import LogFormat, PsiAction, PsiKind, PsiTriggerPlan, Scope, ScopeKind
from uoomd.sources.watch import SCOPE_RETRY_S

pytestmark = pytest.mark.integration

MIB = 1 << 20
RESTARTS = 5


class Loop:
    """The daemon's loop, run from the test: tick and wait, until a condition or a deadline."""

    def __init__(self, daemon: Daemon, out: io.StringIO) -> None:
        self.daemon = daemon
        self.out = out
        self.iterations = 0

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self.out.getvalue().splitlines()) if e["event"] == name]

    def run_until(self, done: Callable[[], object], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            self.daemon.wait(self.daemon.tick(time.monotonic()))
            self.iterations += 1
        return True

    def run_for(self, duration_s: float) -> None:
        self.run_until(lambda: False, duration_s)

    def run_until_logged(self, event: str, times: int, timeout_s: float = 3.0) -> bool:
        return self.run_until(lambda: len(self.events(event)) >= times, timeout_s)


@pytest.fixture
def loop_on(tmp_path: Path) -> Iterator[Callable[[ScratchCgroup], Loop]]:
    made: list[Daemon] = []

    def make(cg: ScratchCgroup) -> Loop:
        psi: tuple[PsiTriggerPlan, ...] = ()
        if cg.pressure_path is not None:
            psi = (
                PsiTriggerPlan(
                    kind=PsiKind.SOME, stall_us=100_000, window_us=2_000_000, sustain_s=0, action=PsiAction.TERM
                ),
            )
        guard = make_guard("svc", scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path), psi=psi)
        plan = make_plan(guards=(guard,))
        # poll_max 0.2 s, as a daemon near trouble polls: each removal is seen within a poll.
        plan = replace(plan, daemon=replace(plan.daemon, state_file=str(tmp_path / "state.json"), poll_max_s=0.2))
        out = io.StringIO()
        daemon = Daemon(plan, executor=RecordingExecutor(), log=configure(LogFormat.JSON, out))
        made.append(daemon)
        daemon.open()
        return Loop(daemon, out)

    try:
        yield make
    finally:
        for daemon in made:
            daemon.close()


def cgroup_fds() -> int:
    """Our fds on cgroup files (the warm ranking's /proc fds come and go with its scans)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/sys/fs/cgroup/")
    return count


def test_a_cgroup_removed_and_recreated_five_times_is_guarded_again_each_time(
    loop_on: Callable[[ScratchCgroup], Loop],
) -> None:
    with scratch_cgroup(limit_bytes=64 * MIB, prefer="v1") as cg:
        loop = loop_on(cg)
        [watch] = loop.daemon.watches
        with_psi = bool(watch.guard.psi)
        loop.run_for(0.3)
        assert watch.last is not None
        fds_guarded = cgroup_fds()
        assert fds_guarded >= 4, "the memory files (and the pressure file and trigger) are kept open"
        back_after_s: list[float] = []
        for k in range(1, RESTARTS + 1):
            cg.remove()
            assert loop.run_until_logged("scope_gone", k), f"restart {k}: no scope_gone"
            assert watch.last is None, "no stale reading of the removed cgroup"
            assert cgroup_fds() == 0, "every file of the removed cgroup is closed"
            assert not loop.daemon.wakeup.polled, "a gone scope's trigger fds are out of the poll set"
            iterations = loop.iterations
            cpu = time.process_time()
            loop.run_for(1.0)  # gone for a while: ~5 polls at poll_max and 2 retries, nothing logged
            assert loop.iterations - iterations < 15, "the loop spins while the scope is gone"
            assert time.process_time() - cpu < 0.3
            assert len(loop.events("scope_gone")) == k
            cg.recreate()
            recreated_at = time.monotonic()
            assert loop.run_until_logged("scope_back", k), f"restart {k}: no scope_back"
            back_after_s.append(time.monotonic() - recreated_at)
            loop.run_for(0.3)
            assert watch.last is not None, f"restart {k}: no reading of the recreated cgroup"
            assert watch.last.total_bytes == 64 * MIB, "the recreated cgroup's limit is read"
            if with_psi:
                [trigger] = watch.triggers
                assert trigger is not None
                assert trigger.path == cg.pressure_path
                if trigger.pollable:
                    assert trigger.fileno() in loop.daemon.wakeup.polled, "the re-armed trigger is polled"
            assert len(loop.events("scope_gone")) == k
            assert len(loop.events("scope_back")) == k
        assert cgroup_fds() == fds_guarded, "no fd leaks across restarts"
        assert not loop.events("reading_failed")
        assert not loop.events("psi_trigger_gone"), "one line when it goes: scope_gone"
        assert max(back_after_s) < SCOPE_RETRY_S + 0.5, "back within a retry (and a loaded machine's lag)"
        if with_psi:
            assert watch.triggers[0] is not None
            modes = {tuple(e["psi"]) for e in loop.events("scope_back")}
            assert modes == {(str(watch.triggers[0].mode),)}, "re-armed the same way each time"


def test_a_cgroup_removed_and_recreated_between_two_polls_is_seen_and_reopened(
    loop_on: Callable[[ScratchCgroup], Loop],
) -> None:
    # The old fds fail with ENODEV even though a cgroup of that name exists again (measured on
    # Linux 6.18: pread of memory.usage_in_bytes and of memory.pressure), so the swap is seen.
    with scratch_cgroup(limit_bytes=64 * MIB, prefer="v1") as cg:
        loop = loop_on(cg)
        [watch] = loop.daemon.watches
        loop.run_for(0.2)
        cg.remove()
        cg.recreate()
        assert loop.run_until(lambda: loop.events("scope_back"), 3)
        assert len(loop.events("scope_gone")) == 1
        loop.run_for(0.3)
        assert watch.last is not None
        assert len(loop.events("scope_back")) == 1
        assert not loop.events("reading_failed")


def test_a_v2_twin_removed_before_its_v1_memory_cgroup_logs_one_scope_gone(
    loop_on: Callable[[ScratchCgroup], Loop],
) -> None:
    # systemd removes a unit's v2 cgroup first, then the v1 ones (cg_trim_everywhere()): a
    # daemon woken in between (POLLERR on the trigger) must still say scope_gone once, not
    # psi_trigger_gone, reading_failed and scope_gone. The v1 cgroup alone, if it stays, is
    # guarded again without PSI.
    with scratch_cgroup(limit_bytes=64 * MIB, prefer="v1") as cg:
        if cg.pressure_cgroup_path is None or cg.pressure_cgroup_path == cg.memory_path or cg.pressure_path is None:
            pytest.skip("needs a v1 memory cgroup with a separate v2 twin (a hybrid machine)")
        loop = loop_on(cg)
        [watch] = loop.daemon.watches
        loop.run_for(0.2)
        os.rmdir(cg.pressure_cgroup_path)
        assert loop.run_until_logged("scope_gone", 1)
        assert loop.run_until_logged("scope_back", 1)
        [back] = loop.events("scope_back")
        assert back["psi"] == ["unavailable"]
        loop.run_for(0.5)
        assert watch.last is not None
        assert watch.last_at > time.monotonic() - 0.3, "memory is read again"
        os.rmdir(cg.memory_path)  # the rest of the unit's removal
        assert loop.run_until_logged("scope_gone", 2)
        cg.recreate()
        assert loop.run_until_logged("scope_back", 2)
        [trigger] = watch.triggers
        assert trigger is not None, "re-armed on the recreated twin"
        assert loop.events("scope_back")[1]["psi"] == [str(trigger.mode)]
        assert not loop.events("psi_trigger_gone")
        assert not loop.events("reading_failed")
