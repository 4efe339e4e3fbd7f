"""Read earlyoom's contrib/oomstat output as a trace: memory and PSI every 100 ms, from another tool's recordings.

oomstat (earlyoom's contrib/oomstat/oomstat.go) prints four header lines and then, every
100 ms, one line made by ``"%4.1f | %8d %8d | %4d %5d %4d %5d"``::

         | /proc/meminfo     | /proc/pressure/memory
    Time | MemAvail SwapFree | some avg10 full avg10
       s |      MiB      MiB |    %     %    %     %
         -                   -
     2.6 |     5133     6669 |   30     0    8     0

that is: seconds since it started; MemAvailable and SwapFree in MiB (kB / 1024, truncated);
the share of the last interval stalled, "some" then its avg10, "full" then its avg10, in
whole percent. The "now" columns are (total - previous total) x 100 / interval, so they may
pass 100 where several CPUs stall at once. Lines of anything else (oomstat's own warning,
comments such as the ``#`` lines of its example files, ``[...]`` cuts) are skipped.

What the format lacks is filled in and said: MemTotal and SwapTotal are not printed (give
them, else the largest MemAvailable and SwapFree seen stand in for them, and percent levels
are of that); stall totals are rebuilt from the "now" columns (each interval's share times
its length), to the percent's resolution; there are no processes, so a replay says when a
policy would have acted and against which level, never whom.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from uoomd.readings import MemoryReading, PressureReading
from uoomd.trace import TraceError
from uoomd.tracelines import Header, ReadingLine, TraceGuard, TraceItem
from uoomd.units import format_bytes

MIB = 1 << 20
MAX_ROWS = 1_000_000  # a day of 100 ms rows is 864,000
_ROW = re.compile(
    rb"^\s*(?P<t>\d+(?:\.\d+)?)\s*\|\s*(?P<avail>\d+)\s+(?P<swap>\d+)\s*\|"
    rb"\s*(?P<some>\d+)\s+(?P<some10>\d+)\s+(?P<full>\d+)\s+(?P<full10>\d+)\s*$"
)
_TITLE = re.compile(rb"^\s*Time\s*\|\s*MemAvail\s+SwapFree\s*\|", re.MULTILINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class OomstatRow:
    """One oomstat line, in the units it prints."""

    t_s: float
    mem_available_mib: int
    swap_free_mib: int
    some_now_pct: int
    some_avg10_pct: int
    full_now_pct: int
    full_avg10_pct: int


def parse_row(line: bytes) -> OomstatRow | None:
    """One data line, or None for anything else."""
    match = _ROW.match(line)
    if match is None:
        return None
    return OomstatRow(
        t_s=float(match["t"]),
        mem_available_mib=int(match["avail"]),
        swap_free_mib=int(match["swap"]),
        some_now_pct=int(match["some"]),
        some_avg10_pct=int(match["some10"]),
        full_now_pct=int(match["full"]),
        full_avg10_pct=int(match["full10"]),
    )


def looks_like_oomstat(head: bytes) -> bool:
    """The start of a file is oomstat's: its column titles, or a data line before any JSON."""
    if head.lstrip().startswith(b"{"):
        return False
    if _TITLE.search(head):
        return True
    return any(parse_row(line) is not None for line in head.splitlines()[:50])


def parse_rows(text: bytes) -> list[OomstatRow]:
    rows = []
    for line in text.splitlines():
        row = parse_row(line)
        if row is not None:
            rows.append(row)
            if len(rows) > MAX_ROWS:
                raise TraceError(f"more than {MAX_ROWS} oomstat lines")
    return rows


def oomstat_trace(
    rows: Sequence[OomstatRow], *, source: str, mem_total_bytes: int | None, swap_total_bytes: int | None
) -> Iterator[TraceItem]:
    """The rows as a trace of one system guard: a header (with what was estimated) and one reading per row."""
    if not rows:
        raise TraceError(f"{source}: no oomstat lines (time | MemAvail SwapFree | some avg10 full avg10)")
    notes = []
    mem_total = mem_total_bytes
    if mem_total is None:
        mem_total = max(r.mem_available_mib for r in rows) * MIB
        notes.append(
            f"oomstat prints no MemTotal: the largest MemAvailable seen ({format_bytes(mem_total)}) stands in "
            "for it (give --mem-total), so percent levels are of that"
        )
    swap_total = swap_total_bytes
    if swap_total is None:
        swap_total = max(r.swap_free_mib for r in rows) * MIB
        if swap_total:
            notes.append(
                f"oomstat prints no SwapTotal: the largest SwapFree seen ({format_bytes(swap_total)}) stands in "
                "for it (give --swap-total)"
            )
    notes.append("oomstat has no processes: the replay says when a policy would act, never whom")
    yield Header(
        started_at=0.0,
        started_wall=0.0,
        host="?",
        kernel="?",
        page_size=4096,
        ram_bytes=mem_total,
        swap_bytes=swap_total,
        source="oomstat",
        policy=source,
        guards=(TraceGuard(name="system", scope="system"),),
        psi_every_poll=True,
        notes=tuple(notes),
    )
    some_us = full_us = 0
    offset = 0.0
    previous: float | None = None
    for row in rows:
        t = row.t_s + offset
        if previous is not None and t <= previous:
            # Concatenated runs restart at 0.0 (and a 100 ms row may repeat its rounded time):
            # keep time moving forward by one interval.
            offset += previous - t + 0.1
            t = row.t_s + offset
        dt_us = 0 if previous is None else round((t - previous) * 1e6)
        # The "now" column is the interval's stall share: rebuild the counter a trigger reads.
        some_us += row.some_now_pct * dt_us // 100
        full_us += row.full_now_pct * dt_us // 100
        previous = t
        yield ReadingLine(
            at=round(t, 4),
            guard="system",
            memory=MemoryReading(
                total_bytes=max(mem_total, row.mem_available_mib * MIB),
                available_bytes=row.mem_available_mib * MIB,
                swap_total_bytes=max(swap_total, row.swap_free_mib * MIB),
                swap_free_bytes=row.swap_free_mib * MIB,
            ),
            pressure=PressureReading(
                some_avg10=float(row.some_avg10_pct),
                some_avg60=0.0,
                some_avg300=0.0,
                some_total_us=some_us,
                full_avg10=float(row.full_avg10_pct),
                full_avg60=0.0,
                full_avg300=0.0,
                full_total_us=full_us,
            ),
        )


MAX_FILE_BYTES = 64 << 20


def read_oomstat(
    paths: Sequence[str], *, mem_total_bytes: int | None, swap_total_bytes: int | None
) -> Iterator[TraceItem]:
    """The oomstat files, one after the other, as one trace."""
    rows: list[OomstatRow] = []
    for path in paths:
        with open(path, "rb") as handle:
            text = handle.read(MAX_FILE_BYTES + 1)
        if len(text) > MAX_FILE_BYTES:
            raise TraceError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
        rows += parse_rows(text)
    yield from oomstat_trace(
        rows, source=", ".join(paths), mem_total_bytes=mem_total_bytes, swap_total_bytes=swap_total_bytes
    )
