"""The recorder on real processes in a real memory cgroup: readings as the cgroup says, finalists, exits.

The recorder is driven tick by tick in the test process (``run_recorder`` would install its
signal handlers in pytest's). The test stops its own hog by PID; the recorder signals nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.builders import GIB, make_guard, make_memory, make_plan
from tests.cgroups import ScratchCgroup, scratch_cgroup
from tests.e2e.daemon_runner import hog_argv, read_record, wait_until
from uoomd.logs import PipelineLogger, render_json
from uoomd.plan import Amount, DaemonPlan, Plan, Scope, ScopeKind
from uoomd.readings import MemoryReading
from uoomd.recorder import Recorder, make_header
from uoomd.sources.cgroup import CgroupMemoryReader
from uoomd.sources.meminfo import read_meminfo_totals
from uoomd.sources.watch import GuardWatch
from uoomd.tracefile import TraceWriter, read_lines
from uoomd.tracelines import CandidatesLine, ExitLine, Header, ReadingLine

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
def cg() -> Iterator[ScratchCgroup]:
    with scratch_cgroup(limit_bytes=256 * MIB) as group:
        yield group


def _plan(cg: ScratchCgroup) -> Plan:
    guard = make_guard(
        "cg",
        scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path),
        mem_available_term=Amount(fraction=0.3),
        mem_available_kill=Amount(fraction=0.1),
    )
    return make_plan(guards=(guard,), daemon=DaemonPlan(poll_min_s=0.01, poll_max_s=0.1), source="live.toml")


def _recorder(plan: Plan, path: Path, log_path: Path, *, max_bytes: int = 1 << 20) -> Recorder:
    now = time.monotonic()
    header = make_header(plan, policy_text=None, psi_every_poll=False, proc_root="/proc", now=now)
    log = PipelineLogger([], render_json, log_path.open("w"))
    recorder = Recorder(plan=plan, writer=TraceWriter(str(path), header, max_bytes=max_bytes), log=log, started_at=now)
    recorder.open()
    return recorder


def _run(recorder: Recorder, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        time.sleep(min(recorder.tick(now), 0.05))


def test_a_recording_of_a_real_hog_has_its_readings_its_badness_and_its_exit(cg: ScratchCgroup, tmp_path: Path) -> None:
    plan = _plan(cg)
    path = tmp_path / "trace.jsonl"
    recorder = _recorder(plan, path, tmp_path / "log")
    record = tmp_path / "hog.rec"
    try:
        hog = cg.spawn(hog_argv(record, "--name", "holder", "--max-mib", "150", "--mib-per-step", "50", "--hold"))
        assert wait_until(lambda: any(r[0] == "HOLD" for r in read_record(record)), 10)
        _run(recorder, 1.0)
        ram, swap = read_meminfo_totals()
        with CgroupMemoryReader(cg.memory_path, ram, swap) as reader:
            now_reading = reader.read()
        os.kill(hog.pid, signal.SIGKILL)  # the test's own child
        hog.wait(10)
        _run(recorder, 0.5)
    finally:
        recorder.writer.close()
        recorder.close()
    items = [located.item for located in read_lines([str(path)])]
    assert isinstance(items[0], Header)
    assert items[0].guards[0].scope == f"cgroup:{cg.memory_path}"
    readings = [i for i in items if isinstance(i, ReadingLine)]
    assert all(r.memory.total_bytes == 256 * MIB for r in readings)
    held = [r for r in readings if r.at < 1.0]
    # What the cgroup's own files said while the hog held its 150 MiB (within what a Python
    # interpreter and the page cache move by between two reads).
    assert abs(held[-1].memory.available_bytes - now_reading.available_bytes) < 16 * MIB
    lists = [i for i in items if isinstance(i, CandidatesLine)]
    assert lists, "near its levels (a 256 MiB cgroup is always within 1 s of a 4 GiB/s fill) it lists finalists"
    top = [line for line in lists if line.at < 1.0][-1].processes[0]
    assert top.process.pid == hog.pid
    assert top.process.name == "holder"
    assert top.points is not None
    assert top.terms is not None
    assert top.points == sum(top.terms)
    assert top.process.cmdline is not None
    assert "hogs.py" in top.process.cmdline
    exits = [i for i in items if isinstance(i, ExitLine)]
    assert [e.key.pid for e in exits] == [hog.pid]
    assert recorder.stats.exits == 1


class ScriptedMemory:
    """A memory reader that says what the test scripts (a MemoryReader for GuardWatch)."""

    def __init__(self, readings: list[int], total_bytes: int) -> None:
        self.readings = readings
        self.total_bytes = total_bytes

    def read(self) -> MemoryReading:
        return make_memory(self.readings.pop(0), total_bytes=self.total_bytes)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("fall_gib_per_poll", "listed"), [(0, False), (20, True)])
def test_a_fast_fall_far_above_the_levels_lists_the_finalists_a_replayed_eta_needs(
    tmp_path: Path, fall_gib_per_poll: int, listed: bool
) -> None:
    # A 1 TiB machine at 800 GiB available: far from its levels (10 %, 5 %) for the warm ranking.
    # Falling 20 GiB a poll (0.1 s apart), the kill level is 3.8 s away: a replay of an eta of a
    # few seconds acts here, and needs the finalists this machine's /proc has (read, never signalled).
    total = 1024 * GIB
    plan = make_plan(guards=(make_guard(),), daemon=DaemonPlan(poll_min_s=0.01, poll_max_s=0.1))
    start = time.monotonic()
    header = make_header(plan, policy_text=None, psi_every_poll=False, proc_root="/proc", now=start)
    path = tmp_path / "trace.jsonl"
    log = PipelineLogger([], render_json, (tmp_path / "log").open("w"))
    recorder = Recorder(plan=plan, writer=TraceWriter(str(path), header), log=log, started_at=start)
    memory = ScriptedMemory([800 * GIB - i * fall_gib_per_poll * GIB for i in range(3)], total)
    recorder.watches = [GuardWatch(guard=plan.guards[0], memory=memory, pressure=None, triggers=())]
    try:
        for i in range(3):
            recorder.tick(start + i * 0.1)
    finally:
        recorder.writer.close()
        recorder.close()
    lines = [i.item for i in read_lines([str(path)]) if isinstance(i.item, CandidatesLine)]
    assert bool(lines) is listed
    if listed:
        assert lines[0].processes, "this machine's own processes are the finalists"
