"""A trace's lines as frozen values, one per kind of line (uoomd/trace.py encodes and parses them; pure)."""

from __future__ import annotations

from dataclasses import dataclass

from uoomd.readings import MemoryReading, PressureReading, ProcessInfo, ProcessKey

VERSION = 1  # of the trace format (uoomd/trace.py): what a Header says by default
# Header.source of the traces uoomd writes itself: the recorder's, and the daemon's own
# (record_on_decision, uoomd/flight.py). Their `fired` are the PSI triggers as the daemon read them.
RECORDED_BY_UOOMD = ("uoomd record", "uoomd run")


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceGuard:
    name: str
    scope: str  # Scope.describe(): "system" or "cgroup:/path"
    psi: tuple[str, ...] = ()  # PsiTriggerPlan.describe() of the recording policy's triggers


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    started_at: float
    started_wall: float
    host: str
    kernel: str
    page_size: int
    ram_bytes: int
    swap_bytes: int
    source: str
    policy: str
    guards: tuple[TraceGuard, ...]
    policy_text: str | None = None
    details: frozenset[str] = frozenset()
    psi_every_poll: bool = False
    notes: tuple[str, ...] = ()  # what the writer had to estimate or leave out
    version: int = VERSION


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadingLine:
    at: float
    guard: str
    memory: MemoryReading
    pressure: PressureReading | None = None
    fired: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TracedProcess:
    """A process as recorded, with the recording policy's verdict on it."""

    process: ProcessInfo
    points: int | None = None  # None: excluded
    terms: tuple[int, int, int, int] | None = None  # rss, swap, pgtables, adj points (pages)
    rules: tuple[str, ...] = ()
    excluded: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidatesLine:
    at: float
    guard: str
    totalpages: int
    system_totalpages: int
    processes: tuple[TracedProcess, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitLine:
    at: float
    key: ProcessKey


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionLine:
    at: float
    event: str
    facts: tuple[tuple[str, object], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EndLine:
    at: float
    reason: str


TraceItem = Header | ReadingLine | CandidatesLine | ExitLine | DecisionLine | EndLine
