"""The daemon's flight recorder (``record_on_decision``): its last minutes kept, written as a trace after each decision.

What the loop saw is kept as ``uoomd record`` writes it (uoomd/trace.py): every guard's reading
at every poll (quiet ones too), the rankings the core was handed, the in-flight victims that
exited, the decisions it logged. After a tick that chose or escalated a victim (a dry run's
would_term too), a forked child writes the window as a trace file into ``record_dir``
(uoomd/tracefile.py write_trace_file: a trusted directory, atomically, the newest
``record_keep`` kept), so ``uoomd replay FILE`` runs the same policy over the same readings and
makes the same decision. The loop only forks and later reaps: it never encodes or writes.

Bounded: readings go to a fixed ring of :data:`MAX_READINGS` rows of plain doubles (one row
~100 bytes; 4,096 rows ~400 KiB allocated once, whatever the pace), rankings to at most
:data:`MAX_CANDIDATE_LINES` lines (an unchanged ranking is not kept twice), decisions and exits
to a few hundred small values; anything older than ``record_window`` is left out of a trace.

A trace starts at the window's first poll where the daemon had nothing open (every guard idle,
no victim, no stuck process, no recent kill or warning): from there a replay, which starts idle,
is in the daemon's state. Where no such poll is in the window, it starts at the window and its
header's notes say the daemon was mid-episode there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from uoomd.actions import Output, Record
from uoomd.decision import WARN_INTERVAL_S, Phase, State
from uoomd.logs import Log
from uoomd.plan import Plan
from uoomd.readings import GuardReading, MemoryReading, PressureReading, ProcessKey
from uoomd.recorder import POINTS_SLACK, finalists, trace_guard
from uoomd.scoring import Ranking
from uoomd.trace import traced
from uoomd.tracelines import (
    CandidatesLine,
    DecisionLine,
    ExitLine,
    Header,
    ReadingLine,
)

MAX_READINGS = 4096  # rows of the readings ring: 82 s of one guard at 20 ms, hours at a quiet pace
MAX_CANDIDATE_LINES = 48  # rankings kept; each is up to 10 processes
MAX_DECISIONS = 256  # records kept (decisions, exits of victims, warnings)
TOP = 5  # finalists per ranking, as uoomd record writes them (recorder.finalists)
DECISIONS = frozenset({"victim_chosen", "victim_escalated"})  # what makes the daemon write a trace
WRITER_TIMEOUT_S = 30.0  # a writer child still running after this is killed
NAN = float("nan")

# One row of the ring: when, which guard (its index), the memory reading, the pressure (NaN:
# not read), the fired triggers as a bit mask, whether the daemon had nothing open before it,
# and whether the refault count is every refault (readings.MemoryReading.refaults_all).
_AT, _GUARD, _AVAIL, _TOTAL, _SWAP_FREE, _SWAP_TOTAL, _REFAULT = range(7)
_SOME10, _SOME_TOTAL, _FULL10, _FULL_TOTAL, _FIRED, _SETTLED, _REFAULTS_ALL = range(7, 14)
_WIDTH = 14
_FIRED_BITS = 52  # a double holds 52-bit integers exactly; a guard never has that many triggers


def settled(state: State, now: float) -> bool:
    """Whether a replay starting idle here is in the daemon's state: nothing open, nothing recent."""
    if state.kill_times:
        return False
    for gs in state.guards:
        if gs.phase is not Phase.IDLE or gs.victim is not None or gs.noted or gs.stuck or gs.signalled:
            return False
        if gs.trend.samples or any(t.active_since is not None for t in gs.psi):
            return False
        if gs.warned_at is not None and now - gs.warned_at < WARN_INTERVAL_S:
            return False
    return True


class FlightRing:
    """The window, as plain values: a fixed ring of readings, and bounded deques of the rest."""

    def __init__(self, guards: Iterable[str], *, capacity: int = MAX_READINGS) -> None:
        self.guards = tuple(guards)
        self._index = {name: i for i, name in enumerate(self.guards)}
        self.capacity = capacity
        self._rows = array("d", bytes(8 * _WIDTH * capacity))
        self._next = 0  # rows written, ever: the ring holds the last min(_next, capacity)
        self.candidates: deque[CandidatesLine] = deque(maxlen=MAX_CANDIDATE_LINES)
        self.others: deque[ExitLine | DecisionLine] = deque(maxlen=MAX_DECISIONS)
        self.candidates_dropped_before = -math.inf  # rankings before this were let go (maxlen)

    def reading(
        self,
        at: float,
        guard: str,
        memory: MemoryReading,
        pressure: PressureReading | None = None,
        fired: tuple[int, ...] = (),
        *,
        settled: bool,
    ) -> None:
        index = self._index.get(guard)
        if index is None:
            return
        base = (self._next % self.capacity) * _WIDTH
        rows = self._rows
        rows[base + _AT] = at
        rows[base + _GUARD] = index
        rows[base + _AVAIL] = memory.available_bytes
        rows[base + _TOTAL] = memory.total_bytes
        rows[base + _SWAP_FREE] = memory.swap_free_bytes
        rows[base + _SWAP_TOTAL] = memory.swap_total_bytes
        rows[base + _REFAULT] = NAN if memory.refault_bytes is None else memory.refault_bytes
        rows[base + _REFAULTS_ALL] = 1.0 if memory.refaults_all else 0.0
        if pressure is None:
            rows[base + _SOME10] = NAN
        else:
            rows[base + _SOME10] = pressure.some_avg10
            rows[base + _SOME_TOTAL] = pressure.some_total_us
            rows[base + _FULL10] = pressure.full_avg10
            rows[base + _FULL_TOTAL] = pressure.full_total_us
        rows[base + _FIRED] = sum(1 << i for i in fired if i < _FIRED_BITS)
        rows[base + _SETTLED] = 1.0 if settled else 0.0
        self._next += 1

    def add_candidates(self, line: CandidatesLine) -> None:
        if len(self.candidates) == self.candidates.maxlen:
            self.candidates_dropped_before = self.candidates[0].at
        self.candidates.append(line)

    def add(self, item: ExitLine | DecisionLine) -> None:
        self.others.append(item)

    def clear(self) -> None:
        self._next = 0
        self.candidates.clear()
        self.others.clear()
        self.candidates_dropped_before = -math.inf

    def _row(self, n: int) -> tuple[float, ...]:
        base = (n % self.capacity) * _WIDTH
        return tuple(self._rows[base : base + _WIDTH])

    def readings(self) -> Iterator[tuple[float, ...]]:
        """The rows held, oldest first."""
        for n in range(max(0, self._next - self.capacity), self._next):
            yield self._row(n)

    def start(self, now: float, window_s: float) -> tuple[float, tuple[str, ...]]:
        """Where a trace of the window begins, and the notes that says about it."""
        oldest = now - window_s
        rows = [r for r in self.readings() if r[_AT] >= oldest]
        notes: list[str] = []
        if self._next > self.capacity and rows and rows[0][_AT] > oldest:
            notes.append(f"the daemon kept its last {self.capacity} readings: the trace covers less than its window")
        if self.candidates_dropped_before >= oldest:
            # A replay before then would lack the rankings the daemon had: begin where they are whole.
            rows = [r for r in rows if r[_AT] > self.candidates_dropped_before]
            notes.append("older rankings were let go (too many in the window): the trace starts after them")
        first = next((r for r in rows if r[_SETTLED]), None)
        if first is None:
            notes.append(
                "the daemon had an episode open (a victim, a stuck process, a recent kill or warning) at the "
                "trace's first reading: a replay starts idle there, so its first decisions may differ"
            )
            return (rows[0][_AT] if rows else now), tuple(notes)
        return first[_AT], tuple(notes)

    def items(self, start: float) -> Iterator[ReadingLine | CandidatesLine | ExitLine | DecisionLine]:
        """The window from ``start`` as trace lines in time order (a reading, then what else that poll had)."""
        extra: list[CandidatesLine | ExitLine | DecisionLine] = sorted(
            [*(c for c in self.candidates if c.at >= start), *(o for o in self.others if o.at >= start)],
            key=lambda item: item.at,
        )
        k = 0
        for row in self.readings():
            at = row[_AT]
            if at < start:
                continue
            while k < len(extra) and extra[k].at < at:
                yield extra[k]
                k += 1
            yield _reading_line(row, self.guards)
        yield from extra[k:]


def _reading_line(row: tuple[float, ...], guards: tuple[str, ...]) -> ReadingLine:
    pressure = None
    if not math.isnan(row[_SOME10]):
        pressure = PressureReading(
            some_avg10=row[_SOME10],
            some_avg60=0.0,
            some_avg300=0.0,
            some_total_us=int(row[_SOME_TOTAL]),
            full_avg10=row[_FULL10],
            full_avg60=0.0,
            full_avg300=0.0,
            full_total_us=int(row[_FULL_TOTAL]),
        )
    mask = int(row[_FIRED])
    return ReadingLine(
        at=row[_AT],
        guard=guards[int(row[_GUARD])],
        memory=MemoryReading(
            total_bytes=int(row[_TOTAL]),
            available_bytes=int(row[_AVAIL]),
            swap_total_bytes=int(row[_SWAP_TOTAL]),
            swap_free_bytes=int(row[_SWAP_FREE]),
            refault_bytes=None if math.isnan(row[_REFAULT]) else int(row[_REFAULT]),
            refaults_all=bool(row[_REFAULTS_ALL]),
        ),
        pressure=pressure,
        fired=tuple(i for i in range(_FIRED_BITS) if mask >> i & 1),
    )


def _close(points: tuple[int, ...], before: tuple[int, ...]) -> bool:
    """Points moved by no more than the recorder's slack (POINTS_SLACK of the best's)."""
    slack = max(1, int(abs(points[0]) * POINTS_SLACK)) if points else 1
    return len(points) == len(before) and all(abs(a - b) <= slack for a, b in zip(points, before, strict=True))


def candidates_line(at: float, ranking: Ranking) -> CandidatesLine | None:
    """The ranking's finalists as uoomd record lists them (the policy's best, the kernel's own picks)."""
    inputs = ranking.inputs
    if inputs is None:
        return None
    return CandidatesLine(
        at=at,
        guard=ranking.guard,
        totalpages=inputs.totalpages,
        system_totalpages=inputs.system_totalpages,
        processes=tuple(traced(r) for r in finalists(ranking, top=TOP)),
    )


@dataclass(slots=True)
class _Writer:
    pid: int
    result_fd: int
    started_at: float
    decision: str  # what it was written for: "victim_chosen pid 4711"
    loop_ms: float  # how long the loop was held: the fork (wall clock: a busy machine may run the child first)
    loop_cpu_ms: float  # the CPU that took


class FlightRecorder:
    """The daemon's side: what each tick adds to the ring, and the child that writes a trace after a decision."""

    def __init__(
        self,
        plan: Plan,
        *,
        log: Log,
        started_at: float,
        page_size: int,
        proc_root: str = "/proc",
    ) -> None:
        self.log = log
        self.started_at = started_at
        self.started_wall = time.time()
        self.page_size = page_size
        self.proc_root = proc_root
        self.writer: _Writer | None = None
        self.pending: str | None = None  # a decision came while a trace was being written
        self.written = 0
        self.ring: FlightRing | None = None
        self.reset(plan)

    def reset(self, plan: Plan) -> None:
        """A new plan (the start, a reload): the window starts afresh, since a trace is replayed
        under one policy. Off (record_on_decision false), nothing is kept and each call returns at once."""
        from uoomd.tracecmd import policy_text  # noqa: PLC0415 -- only where it records

        self.plan = plan
        on = plan.daemon.record_on_decision
        # The text as the file is now: the checker read it a moment ago (an edit in between is
        # the admin's, and the next reload's).
        self.policy_text = policy_text(plan.source) if on else None
        self.ring = FlightRing(g.name for g in plan.guards) if on else None
        self._listed: dict[str, tuple[Ranking, tuple[ProcessKey, ...], tuple[int, ...]]] = {}

    @property
    def running(self) -> int:
        return 0 if self.writer is None else 1

    # -- what the loop saw

    def memory(self, now: float, guard: str, memory: MemoryReading, *, state: State) -> None:
        """A quiet tick's reading (far from every level, no PSI trigger active)."""
        if self.ring is not None:
            self.ring.reading(now - self.started_at, guard, memory, settled=settled(state, now))

    def tick(
        self,
        now: float,
        *,
        before: State,
        readings: Iterable[GuardReading],
        rankings: Mapping[str, Ranking],
        alive: frozenset[ProcessKey],
        outputs: Iterable[Output],
    ) -> None:
        """A full tick: its readings, the rankings step() was handed, the victims in flight before it
        that are gone (not ``alive``), the records it logged; after a decision, a trace is written (or
        queued behind the one being written)."""
        ring = self.ring
        if ring is None:
            return
        at = now - self.started_at
        calm = settled(before, now)
        for r in readings:
            ring.reading(at, r.guard, r.memory, r.pressure, r.psi_fired, settled=calm)
        for key in before.in_flight() - alive:
            ring.add(ExitLine(at=at, key=key))
        records = [o for o in outputs if isinstance(o, Record)]
        decided = {str(r.get("guard")) for r in records if r.event in DECISIONS}
        for name, ranking in rankings.items():
            self._list(at, name, ranking, forced=name in decided)
        for rec in records:
            ring.add(DecisionLine(at=at, event=rec.event, facts=rec.fields))
        chosen = next((r for r in records if r.event in DECISIONS), None)
        if chosen is not None:
            self.decided(now, f"{chosen.event} pid {chosen.as_dict().get('pid')}")

    def gone(self, now: float, key: ProcessKey) -> None:
        """A victim found gone when signalled (the warm ranking forgets it): a replay must too."""
        if self.ring is not None:
            self.ring.add(ExitLine(at=now - self.started_at, key=key))

    def _list(self, at: float, guard: str, ranking: Ranking, *, forced: bool) -> None:
        """Keep a ranking unless it is the one kept last for the guard (as the warm ranking hands the
        same one on between refreshes); a decision's own ranking is always kept."""
        last = self._listed.get(guard)
        if not forced and last is not None and last[0] is ranking:
            return
        keys = tuple(c.key for c in ranking.candidates[:TOP])
        points = tuple(c.badness.points for c in ranking.candidates[:TOP])
        if not forced and last is not None and last[1] == keys and _close(points, last[2]):
            self._listed[guard] = (ranking, keys, points)  # the same finalists, points within 1 %: kept once
            return
        line = candidates_line(at, ranking)
        if line is not None and self.ring is not None:
            self.ring.add_candidates(line)
            self._listed[guard] = (ranking, keys, points)

    # -- writing a trace

    def decided(self, now: float, what: str) -> None:
        if self.writer is not None:
            self.pending = what  # the next trace, once this one is written, covers this decision too
            return
        self._start(now, what)

    def _start(self, now: float, what: str) -> None:
        if self.ring is None:
            return
        began, began_cpu = time.monotonic(), time.thread_time()
        name = trace_name(time.time(), self.plan, what)
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
        except OSError as exc:
            self.log.warning("trace_write_failed", decision=what, error=str(exc))
            return
        if pid == 0:  # pragma: no cover - the child; its file is asserted by the tests
            os.close(read_fd)
            _child_main(self, self.ring, at=now - self.started_at, name=name, result_fd=write_fd)
        os.close(write_fd)
        loop_ms = round((time.monotonic() - began) * 1000, 3)
        cpu_ms = round((time.thread_time() - began_cpu) * 1000, 3)
        self.writer = _Writer(
            pid=pid, result_fd=read_fd, started_at=now, decision=what, loop_ms=loop_ms, loop_cpu_ms=cpu_ms
        )

    def header(self, notes: tuple[str, ...]) -> Header:
        """A trace's header: this daemon, its plan and policy text, and what the window says of itself."""
        uname = os.uname()
        return Header(
            started_at=self.started_at,
            started_wall=self.started_wall,
            host=uname.nodename,
            kernel=uname.release,
            page_size=self.page_size,
            ram_bytes=0,  # read by the child (uoomd/sources/meminfo.py), not by the loop
            swap_bytes=0,
            source="uoomd run",
            policy=self.plan.source,
            policy_text=self.policy_text,
            details=self.plan.needed_details(),
            guards=tuple(trace_guard(g) for g in self.plan.guards),
            notes=notes,
        )

    def poll(self, now: float) -> None:
        """Reap the writer once it is done, log what it wrote; start the next one if a decision waits."""
        writer = self.writer
        if writer is None:
            return
        done, status = os.waitpid(writer.pid, os.WNOHANG)
        if done == 0:
            if now - writer.started_at <= WRITER_TIMEOUT_S:
                return
            os.kill(writer.pid, signal.SIGKILL)  # our own child, not yet reaped: its PID is ours
            os.waitpid(writer.pid, 0)
            status = -1
        self.writer = None
        self._report(writer, status)
        if self.pending is not None:
            what, self.pending = self.pending, None
            self._start(now, what)

    def _report(self, writer: _Writer, status: int) -> None:
        try:
            raw = os.read(writer.result_fd, 65536).decode(errors="replace")
        except OSError:
            raw = ""
        finally:
            os.close(writer.result_fd)
        result: dict[str, object] = {}
        with contextlib.suppress(ValueError):
            loaded = json.loads(raw) if raw else {}
            result = loaded if isinstance(loaded, dict) else {}
        if "path" in result:
            self.written += 1
            facts = {k: result[k] for k in sorted(result)}
            loop = {"loop_ms": writer.loop_ms, "loop_cpu_ms": writer.loop_cpu_ms}
            self.log.info("trace_written", decision=writer.decision, **loop, **facts)
        else:
            error = result.get("error") or ("timed out" if status == -1 else f"wait status {status}")
            self.log.warning("trace_write_failed", decision=writer.decision, error=str(error))

    def close(self) -> None:
        """Stopping: a trace being written is left to finish (it is ours to reap: wait a moment)."""
        writer = self.writer
        if writer is None:
            return
        deadline = time.monotonic() + 2.0
        while os.waitpid(writer.pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                os.kill(writer.pid, signal.SIGKILL)
                os.waitpid(writer.pid, 0)
                break
            time.sleep(0.01)
        os.close(writer.result_fd)
        self.writer = None


def trace_name(wall: float, plan: Plan, what: str) -> str:
    """``uoomd-20261201T101502.123Z-4711.jsonl``: sortable by time, the victim's pid last."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"
    pid = what.rsplit(" ", 1)[-1]
    return f"uoomd-{stamp}-{pid if pid.isdigit() else 'x'}.jsonl"


def _child_main(recorder: FlightRecorder, ring: FlightRing, *, at: float, name: str, result_fd: int) -> None:
    """In the forked child: find where the trace starts, write it, say where in one JSON line, _exit.
    Never returns. Everything but the fork is done here: the loop pays only for the fork."""
    from dataclasses import replace  # noqa: PLC0415

    from uoomd.service import unprotect_child  # noqa: PLC0415
    from uoomd.sources.meminfo import read_meminfo_totals  # noqa: PLC0415
    from uoomd.tracefile import write_trace_file  # noqa: PLC0415

    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the daemon's handlers write to its wake-up pipe: not ours
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        unprotect_child()  # killable, and behind the loop for the CPU
        began = time.monotonic()
        plan = recorder.plan.daemon
        start, notes = ring.start(at, plan.record_window_s)
        ram, swap = read_meminfo_totals(recorder.proc_root)
        header = replace(recorder.header(notes), ram_bytes=ram, swap_bytes=swap)
        path, size, lines = write_trace_file(plan.record_dir, name, header, ring.items(start), keep=plan.record_keep)
        report = {"path": path, "bytes": size, "lines": lines, "write_s": round(time.monotonic() - began, 3)}
        os.write(result_fd, json.dumps(report).encode())
        code = 0
    except Exception as exc:  # whatever it is, the parent logs it
        with contextlib.suppress(OSError):
            os.write(result_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(result_fd, json.dumps({"error": "internal error in the trace writer"}).encode())
    finally:
        os._exit(code)
