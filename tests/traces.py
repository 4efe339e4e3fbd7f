"""Builders of synthetic traces (uoomd/trace.py values) for replay tests: a header, readings, candidates, exits.

The recorded traces (real hogs in a real memory cgroup, made here) are in tests/fixtures/traces.
"""

from __future__ import annotations

from collections.abc import Iterable

from tests.builders import GIB, make_memory, make_process
from uoomd.readings import PressureReading, ProcessInfo
from uoomd.tracelines import CandidatesLine, ExitLine, Header, ReadingLine, TracedProcess, TraceGuard, TraceItem

TOTAL_BYTES = 16 * GIB
PAGE = 4096


def trace_header(*guards: TraceGuard, source: str = "uoomd record", psi_every_poll: bool = True) -> Header:
    return Header(
        started_at=100.0,
        started_wall=1.7e9,
        host="test",
        kernel="6.18",
        page_size=PAGE,
        ram_bytes=TOTAL_BYTES,
        swap_bytes=0,
        source=source,
        policy="<synthetic>",
        guards=guards or (TraceGuard(name="system", scope="system"),),
        psi_every_poll=psi_every_poll,
    )


def reading(
    at: float,
    available_bytes: int,
    *,
    guard: str = "system",
    total_bytes: int = TOTAL_BYTES,
    stall_us: int | None = None,
    fired: tuple[int, ...] = (),
    refault_bytes: int | None = None,
) -> ReadingLine:
    """A reading; ``stall_us``: the some and full stall totals (the PSI file was read)."""
    pressure = None
    if stall_us is not None:
        pressure = PressureReading(
            some_avg10=0.0,
            some_avg60=0.0,
            some_avg300=0.0,
            some_total_us=stall_us,
            full_avg10=0.0,
            full_avg60=0.0,
            full_avg300=0.0,
            full_total_us=stall_us,
        )
    return ReadingLine(
        at=at,
        guard=guard,
        memory=make_memory(available_bytes, total_bytes=total_bytes, refault_bytes=refault_bytes),
        pressure=pressure,
        fired=fired,
    )


def hog(pid: int, mib: int, *, name: str = "", adj: int = 0) -> ProcessInfo:
    return make_process(
        pid,
        name=name or f"hog{pid}",
        starttime_ticks=10_000 + pid,
        rss_anon_bytes=mib << 20,
        mm_rss_pages=None,
        oom_score_adj=adj,
        cmdline=f"hog {pid}",
        exe="/usr/bin/hog",
        cgroup="/",
        user="user",
    )


def candidates(at: float, *processes: ProcessInfo, guard: str = "system") -> CandidatesLine:
    totalpages = TOTAL_BYTES // PAGE
    return CandidatesLine(
        at=at,
        guard=guard,
        totalpages=totalpages,
        system_totalpages=totalpages,
        processes=tuple(TracedProcess(process=p, points=p.rss_bytes // PAGE) for p in processes),
    )


def exit_of(at: float, process: ProcessInfo) -> ExitLine:
    return ExitLine(at=at, key=process.key)


def run_out(
    *, start_bytes: int, fall_bytes_per_s: int, until_bytes: int, dt_s: float = 0.05, at: float = 0.0
) -> Iterable[ReadingLine]:
    """Readings every ``dt_s`` from ``start_bytes`` falling at ``fall_bytes_per_s`` down to ``until_bytes``."""
    available = start_bytes
    while available > until_bytes:
        yield reading(round(at, 4), available)
        at += dt_s
        available -= int(fall_bytes_per_s * dt_s)


def trace(*items: TraceItem | Iterable[TraceItem], header: Header | None = None) -> list[TraceItem]:
    """A header and the items in time order (a stable sort: a poll's lines keep their order)."""
    flat: list[TraceItem] = []
    for item in items:
        if isinstance(item, Iterable):
            flat += list(item)
        else:
            flat.append(item)
    body = sorted((i for i in flat if not isinstance(i, Header)), key=lambda i: i.at)
    return [header or trace_header(), *body]
