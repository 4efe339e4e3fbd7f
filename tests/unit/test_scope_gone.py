"""A guarded cgroup that goes away and comes back (a service restart), on fixture cgroup trees.

A fixture tree lives on tmpfs, where a kept fd of a deleted file still reads; a removed
kernfs cgroup answers ENODEV instead (tests/integration/test_scope_restart.py has the real
one). So here the reader raises what the kernel's ENODEV becomes, CgroupGone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.builders import IDLE, make_guard, make_plan
from uoomd.daemon import Daemon
from uoomd.executor import RecordingExecutor
from uoomd.logs import PipelineLogger, configure
from uoomd.plan import LogFormat, Scope, ScopeKind
from uoomd.sources.cgroup import CgroupGone
from uoomd.sources.watch import SCOPE_RETRY_S, GuardWatch, open_watch

pytestmark = pytest.mark.unit

MIB = 1 << 20


def write_cgroup(path: Path, *, usage_bytes: int, limit_bytes: int = 512 * MIB) -> None:
    """A v2 memory cgroup as the kernel lays it out (the files CgroupMemoryReader opens)."""
    path.mkdir(parents=True, exist_ok=True)
    files = {
        "cgroup.procs": "",
        "memory.current": f"{usage_bytes}\n",
        "memory.max": f"{limit_bytes}\n",
        "memory.swap.current": "0\n",
        "memory.swap.max": "0\n",
        "memory.stat": "anon 0\nfile 0\ninactive_file 0\nactive_file 0\n",
    }
    for name, text in files.items():
        (path / name).write_text(text)


def events(out: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == name]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def watch_on(path: Path) -> tuple[GuardWatch, PipelineLogger, io.StringIO]:
    out = io.StringIO()
    log = configure(LogFormat.JSON, out)
    guard = make_guard("svc", scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=str(path)))
    return open_watch(guard, proc_root=IDLE, now=100.0, log=log), log, out


def test_a_gone_scope_is_looked_for_at_most_every_retry_and_reopened_once_back(tmp_path: Path) -> None:
    cg = tmp_path / "svc"
    write_cgroup(cg, usage_bytes=100 * MIB)
    watch, log, out = watch_on(cg)
    watch.remember(watch.memory.read(), 100.0)
    before = open_fds()
    watch.mark_gone(100.0, log, error="cgroup removed")
    assert open_fds() == before - 5, "every kept file of the cgroup is closed"
    assert watch.last is None, "no stale reading survives the cgroup"
    shutil.rmtree(cg)
    assert not watch.reopen(proc_root=IDLE, now=100.1, log=log)  # not due yet
    assert not watch.reopen(proc_root=IDLE, now=100.0 + SCOPE_RETRY_S, log=log)  # due, still missing
    write_cgroup(cg, usage_bytes=300 * MIB)
    assert not watch.reopen(proc_root=IDLE, now=100.0 + SCOPE_RETRY_S + 0.1, log=log)  # back, but not due
    assert watch.reopen(proc_root=IDLE, now=100.0 + 2 * SCOPE_RETRY_S, log=log)
    assert watch.memory.read().available_bytes == 212 * MIB, "the new cgroup's files are read"
    assert watch.reopen(proc_root=IDLE, now=100.0 + 2 * SCOPE_RETRY_S + 0.01, log=log), "open stays open"
    assert len(events(out, "scope_gone")) == 1
    [back] = events(out, "scope_back")
    assert back["guard"] == "svc"
    assert back["gone_s"] == 2 * SCOPE_RETRY_S
    watch.close()


def test_a_cgroup_that_is_back_but_not_yet_complete_is_retried_and_leaks_no_fd(tmp_path: Path) -> None:
    cg = tmp_path / "svc"
    write_cgroup(cg, usage_bytes=100 * MIB)
    watch, log, out = watch_on(cg)
    watch.mark_gone(100.0, log, error="cgroup removed")
    (cg / "memory.stat").unlink()  # the reader opens memory.current, memory.max, ... and fails here
    before = open_fds()
    for attempt in range(1, 4):
        assert not watch.reopen(proc_root=IDLE, now=100.0 + attempt * SCOPE_RETRY_S, log=log)
    assert open_fds() == before, "a failed reopen closes what it opened"
    write_cgroup(cg, usage_bytes=100 * MIB)
    assert watch.reopen(proc_root=IDLE, now=100.0 + 4 * SCOPE_RETRY_S, log=log)
    assert len(events(out, "scope_back")) == 1
    watch.close()


def test_the_daemon_marks_a_removed_scope_gone_once_and_guards_it_again_when_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cg = tmp_path / "svc"
    write_cgroup(cg, usage_bytes=100 * MIB)
    guard = make_guard("svc", scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=str(cg)))
    plan = make_plan(guards=(guard,))
    plan = replace(plan, daemon=replace(plan.daemon, state_file=str(tmp_path / "state.json")))
    out = io.StringIO()
    daemon = Daemon(plan, executor=RecordingExecutor(), log=configure(LogFormat.JSON, out), proc_root=IDLE)
    daemon.open()
    try:
        [watch] = daemon.watches
        assert watch.last is not None

        def removed() -> None:
            raise CgroupGone(f"{cg}: cgroup removed")

        monkeypatch.setattr(watch.memory, "read", removed)  # what ENODEV on the kept fd becomes
        shutil.rmtree(cg)
        now = 100.0
        timeouts = []
        for _ in range(20):  # quiet and full ticks alike, for 2 s
            timeouts.append(daemon.tick(now))
            now += 0.1
        assert len(events(out, "scope_gone")) == 1
        assert not events(out, "reading_failed"), "a gone scope is not a failing reading"
        assert watch.last is None
        assert max(timeouts[1:]) <= SCOPE_RETRY_S, "a gone scope is looked for at least every retry"
        write_cgroup(cg, usage_bytes=100 * MIB)
        for _ in range(int(SCOPE_RETRY_S / 0.1) + 1):
            daemon.tick(now)
            now += 0.1
        assert len(events(out, "scope_back")) == 1
        assert watch.last is not None, "read again once back"
        assert watch.memory.read().available_bytes == 412 * MIB
    finally:
        daemon.close()
