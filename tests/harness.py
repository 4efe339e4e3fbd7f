"""The daemon's loop driven by a test: scripted memory sources, a recording executor, a clock the test moves.

The real :class:`uoomd.daemon.Daemon` runs each tick as it would on the machine, except that
each guard's memory is what the test last set, the processes are a recorded /proc tree
(tests/fixtures/proc), nothing is signalled, and time passes only when the test says so.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.builders import CHILDREN, make_memory
from uoomd.actions import SendSignal
from uoomd.daemon import Daemon
from uoomd.executor import RecordingExecutor
from uoomd.logs import configure
from uoomd.metrics.collector import Metrics
from uoomd.plan import GuardPlan, LogFormat, Plan
from uoomd.readings import MemoryReading
from uoomd.sources.watch import GuardWatch


class Clock:
    """``time.monotonic()`` as the test sets it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedMemory:
    """A guard's memory source: reads what the test set last, or raises what it set."""

    reading: MemoryReading
    failure: OSError | None = None
    reads: int = 0

    def read(self) -> MemoryReading:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return self.reading

    def close(self) -> None:
        return None


@dataclass
class RecordingNotices:
    """Stands in for uoomd.desktop.DesktopNotices: keeps each notice, forks nothing."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    uids: list[int | None] = field(default_factory=list)  # whom each was for (None: every user)
    running: int = 0

    def notify(self, summary: str, body: str, *, now: float, uid: int | None = None) -> None:
        self.sent.append((summary, body))
        self.uids.append(uid)

    def poll(self, now: float) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class LoopHarness:
    daemon: Daemon
    executor: RecordingExecutor
    clock: Clock
    memory: dict[str, ScriptedMemory]
    out: io.StringIO

    def set_available(self, available_bytes: int, guard: str = "system") -> None:
        self.memory[guard].reading = make_memory(available_bytes)

    def tick(self, after_s: float = 0.5) -> float:
        """Let ``after_s`` pass, run one tick; how long the loop would sleep."""
        self.clock.now += after_s
        return self.daemon.tick(self.clock.now)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in lines if name is None or e["event"] == name]

    def signals(self) -> list[SendSignal]:
        return [a for a in self.executor.actions if isinstance(a, SendSignal)]


@contextmanager
def loop_harness(
    plan: Plan,
    tmp_path: Path,
    *,
    available_bytes: int,
    proc_root: str = CHILDREN,
    executor: RecordingExecutor | None = None,
) -> Iterator[LoopHarness]:
    """A daemon on ``plan`` whose guards all read ``available_bytes`` until the test says otherwise;
    ``executor``: one that answers otherwise (a subclass), else a plain RecordingExecutor."""
    plan = replace(plan, daemon=replace(plan.daemon, state_file=str(tmp_path / "state.json")))
    memory = {g.name: ScriptedMemory(make_memory(available_bytes)) for g in plan.guards}

    def scripted(guard: GuardPlan, _now: float) -> GuardWatch:
        return GuardWatch(guard=guard, memory=memory[guard.name], pressure=None, triggers=(None,) * len(guard.psi))

    out = io.StringIO()
    clock = Clock()
    executor = executor or RecordingExecutor()
    metrics = Metrics(wall_clock=lambda: 1_700_000_000.0)  # counts the log's events, as in run_daemon
    daemon = Daemon(
        plan,
        executor=executor,
        log=configure(LogFormat.JSON, out, first=[metrics.processor]),
        proc_root=proc_root,
        clock=clock,
        open_sources=scripted,
        metrics=metrics,
    )
    daemon.open()
    try:
        yield LoopHarness(daemon=daemon, executor=executor, clock=clock, memory=memory, out=out)
    finally:
        daemon.close()
