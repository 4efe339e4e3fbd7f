"""The trace format: the one owner of encoding and parsing a recorded machine's memory, line by line (pure).

A trace is UTF-8 JSON lines, each an object whose ``k`` says what it is. Every file starts
with a header, so each file of a rotated recording (FILE.1, FILE) replays alone. Times
``t`` are seconds since the header's ``started_at`` (the recorder's ``time.monotonic()``),
to 0.1 ms; memory is in bytes. Keys are short: a day at poll_max 1 s is ~86,000 readings
per guard, ~11 MiB. Version 1:

==========  =====================================================================================
``k``       keys
==========  =====================================================================================
header      ``format`` ("uoomd-trace"), ``version``, ``started_at`` (monotonic), ``started_wall``
            (time.time()), ``host``, ``kernel``, ``page_size``, ``ram``/``swap`` (the machine's
            totals), ``source`` (what wrote it: "uoomd record", "uoomd run" for record_on_decision,
            "oomstat"), ``policy`` (its path), ``policy_text`` (the policy itself, or null),
            ``details`` (process details read), ``psi_every_poll``, ``guards``: [{``name``, ``scope``,
            ``psi``: [trigger, ...]}], ``notes``
r           a guard's reading: ``g`` (guard), ``avail``, ``total``, ``swap_free``, ``swap_total``;
            ``psi`` [some avg10, some total us, full avg10, full total us] where the pressure
            file was read; ``fired`` [trigger index, ...] where a PSI trigger fired; ``refault``
            (bytes refaulted and not activated since boot or since the cgroup was made,
            sources/vmstat.py) where it was read, and ``refault_all`` true where that count is
            every refault (the multi-gen LRU, a v1 cgroup: psi_refault_sustain_all)
c           a guard's candidates near a level: ``g``, ``totalpages``, ``system_totalpages``, ``procs``:
            [process, ...] (below), best first for the recording policy, then the kernel's own picks
x           a process listed in a ``c`` line has exited (or become a zombie): ``pid``, ``start``
d           a record the live daemon logged (its decisions, warnings, exits): ``event``, ``facts``; in
            the daemon's own traces (record_on_decision, uoomd/flight.py), for people and tests to
            compare with: a replay makes its own decisions
end         the recording stopped: ``reason`` ("duration", "signal", "rotated")
==========  =====================================================================================

A process: ``pid``, ``start`` (starttime, clock ticks), ``ppid``, ``pgid``, ``name``, ``state``,
``uid``, ``adj`` (its oom_score_adj), ``anon``/``file``/``shmem`` (RSS bytes), ``swap``,
``pgtables``, ``vm``, ``mm_rss`` (stat's page count, or absent), ``cmdline``/``exe``/``cgroup``/
``user`` (absent when not read), and the recording policy's verdict: ``points``, ``terms``
[rss, swap, pgtables, adj points] and ``rules``, or ``excluded`` (the reason). A replay
scores the process afresh under its own policy; the verdict is for people reading the trace.

Lines of a newer version or an unknown ``k`` are refused and skipped respectively: a header
says which version wrote the file, and a kind added later must not stop an older replay.
"""

from __future__ import annotations

import json
import math
from typing import Any, assert_never

from uoomd.readings import MemoryReading, Pid, PressureReading, ProcessInfo, ProcessKey, Uid
from uoomd.scoring import Candidate, Exclusion
from uoomd.tracelines import (
    VERSION,
    CandidatesLine,
    DecisionLine,
    EndLine,
    ExitLine,
    Header,
    ReadingLine,
    TracedProcess,
    TraceGuard,
    TraceItem,
)

FORMAT = "uoomd-trace"
# A candidates line of 16 processes with 4 KiB command lines is ~70 KiB; anything longer is not ours.
MAX_LINE_BYTES = 1 << 20
MAX_PROCESSES = 16  # per candidates line
# Microseconds: a replay compares these times with the core's deadlines (a dry run's hold of
# term_timeout ends at chosen + 1 s): rounded to 0.1 ms, a poll 40 µs short of one read as past
# it, and the replay decided a poll before the daemon had (CI, tests/e2e/test_flight_e2e.py).
_TIME_DIGITS = 6


class TraceError(ValueError):
    """A line that is not a trace line of a version we read; the message says what is wrong."""


# --- encoding -----------------------------------------------------------------------------------


def _dump(obj: dict[str, Any]) -> str:
    # ensure_ascii: control characters and anything a process may put in its name arrive as
    # \\uXXXX escapes, so a trace line is one line of ASCII whatever the processes were called.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _t(at: float) -> float:
    return round(at, _TIME_DIGITS)


def encode_header(header: Header) -> str:
    return _dump(
        {
            "k": "header",
            "format": FORMAT,
            "version": header.version,
            "started_at": header.started_at,
            "started_wall": header.started_wall,
            "host": header.host,
            "kernel": header.kernel,
            "page_size": header.page_size,
            "ram": header.ram_bytes,
            "swap": header.swap_bytes,
            "source": header.source,
            "policy": header.policy,
            "policy_text": header.policy_text,
            "details": sorted(header.details),
            "psi_every_poll": header.psi_every_poll,
            "guards": [{"name": g.name, "scope": g.scope, "psi": list(g.psi)} for g in header.guards],
            "notes": list(header.notes),
        }
    )


def encode_reading(line: ReadingLine) -> str:
    mem = line.memory
    out: dict[str, Any] = {
        "k": "r",
        "t": _t(line.at),
        "g": line.guard,
        "avail": mem.available_bytes,
        "total": mem.total_bytes,
        "swap_free": mem.swap_free_bytes,
        "swap_total": mem.swap_total_bytes,
    }
    if mem.refault_bytes is not None:
        out["refault"] = mem.refault_bytes
        if mem.refaults_all:
            out["refault_all"] = True  # every refault counted (readings.py): only where it is so
    if line.pressure is not None:
        p = line.pressure
        out["psi"] = [p.some_avg10, p.some_total_us, p.full_avg10, p.full_total_us]
    if line.fired:
        out["fired"] = list(line.fired)
    return _dump(out)


def traced(result: Candidate | Exclusion) -> TracedProcess:
    """A ranking's verdict on a process, as a trace keeps it."""
    if isinstance(result, Candidate):
        b = result.badness
        return TracedProcess(
            process=result.process,
            points=b.points,
            terms=(b.rss_pages, b.swap_pages, b.pgtables_pages, b.adj_points),
            rules=result.rules,
        )
    return TracedProcess(process=result.process, rules=result.rules, excluded=result.reason)


def _encode_process(item: TracedProcess) -> dict[str, Any]:
    p = item.process
    out: dict[str, Any] = {
        "pid": int(p.pid),
        "start": p.starttime_ticks,
        "ppid": int(p.ppid),
        "pgid": p.pgid,
        "name": p.name,
        "state": p.state,
        "uid": int(p.uid),
        "adj": p.oom_score_adj,
        "anon": p.rss_anon_bytes,
        "file": p.rss_file_bytes,
        "shmem": p.rss_shmem_bytes,
        "swap": p.swap_bytes,
        "pgtables": p.pgtables_bytes,
        "vm": p.vm_size_bytes,
    }
    if p.mm_rss_pages is not None:
        out["mm_rss"] = p.mm_rss_pages
    for key in ("cmdline", "exe", "cgroup", "user"):
        value = getattr(p, key)
        if value is not None:
            out[key] = value
    if item.excluded is not None:
        out["excluded"] = item.excluded
    else:
        out["points"] = item.points
        out["terms"] = list(item.terms) if item.terms is not None else None
    if item.rules:
        out["rules"] = list(item.rules)
    return out


def encode_candidates(line: CandidatesLine) -> str:
    return _dump(
        {
            "k": "c",
            "t": _t(line.at),
            "g": line.guard,
            "totalpages": line.totalpages,
            "system_totalpages": line.system_totalpages,
            "procs": [_encode_process(p) for p in line.processes[:MAX_PROCESSES]],
        }
    )


def encode_exit(line: ExitLine) -> str:
    return _dump({"k": "x", "t": _t(line.at), "pid": int(line.key.pid), "start": line.key.starttime_ticks})


def encode_decision(line: DecisionLine) -> str:
    return _dump({"k": "d", "t": _t(line.at), "event": line.event, "facts": _plain(dict(line.facts))})


def encode_end(line: EndLine) -> str:
    return _dump({"k": "end", "t": _t(line.at), "reason": line.reason})


def encode(item: TraceItem) -> str:
    match item:
        case Header():
            return encode_header(item)
        case ReadingLine():
            return encode_reading(item)
        case CandidatesLine():
            return encode_candidates(item)
        case ExitLine():
            return encode_exit(item)
        case DecisionLine():
            return encode_decision(item)
        case EndLine():
            return encode_end(item)
        case _:
            assert_never(item)


def _plain(value: Any) -> Any:
    """A record's facts as JSON can hold them: tuples as lists, non-finite floats as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --- parsing ------------------------------------------------------------------------------------


class _Fields:
    """Typed access to one decoded line's keys, each failure naming the key."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise TraceError(f"missing key {key!r}")
        return self.obj[key]

    def integer(self, key: str, *, minimum: int = 0) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value > 2**63 - 1:
            raise TraceError(f"{key!r} must be an integer from {minimum}, not {_short(value)}")
        return value

    def opt_integer(self, key: str) -> int | None:
        return None if self.obj.get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TraceError(f"{key!r} must be a finite number, not {_short(value)}")
        return float(value)

    def time(self) -> float:
        value = self.number("t")
        if value < 0:
            raise TraceError(f"'t' must not be negative, not {value}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise TraceError(f"{key!r} must be a string, not {_short(value)}")
        return value

    def opt_text(self, key: str) -> str | None:
        return None if self.obj.get(key) is None else self.text(key)

    def flag(self, key: str) -> bool:
        value = self.obj.get(key, False)
        if not isinstance(value, bool):
            raise TraceError(f"{key!r} must be true or false, not {_short(value)}")
        return value

    def items(self, key: str, *, default: list[Any] | None = None) -> list[Any]:
        value = self.obj.get(key, default)
        if not isinstance(value, list):
            raise TraceError(f"{key!r} must be a list, not {_short(value)}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        items = self.items(key, default=[])
        if not all(isinstance(v, str) for v in items):
            raise TraceError(f"{key!r} must be a list of strings")
        return tuple(items)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "..."


def parse_line(text: str | bytes) -> TraceItem | None:
    """One trace line as a value; None for a blank line or a kind this version does not know.
    Raises TraceError saying what is wrong (the caller adds where)."""
    if len(text) > MAX_LINE_BYTES:
        raise TraceError(f"a line of {len(text)} bytes, over the {MAX_LINE_BYTES}-byte limit")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"not JSON: {exc}") from None
    except RecursionError:
        raise TraceError("not JSON: nested too deep") from None
    if not isinstance(obj, dict):
        raise TraceError("a trace line is a JSON object")
    f = _Fields(obj)
    kind = obj.get("k")
    match kind:
        case "header":
            return _parse_header(f)
        case "r":
            return _parse_reading(f)
        case "c":
            return _parse_candidates(f)
        case "x":
            return ExitLine(at=f.time(), key=ProcessKey(pid=Pid(f.integer("pid")), starttime_ticks=f.integer("start")))
        case "d":
            facts = obj.get("facts")
            if not isinstance(facts, dict):
                raise TraceError("'facts' must be an object")
            return DecisionLine(at=f.time(), event=f.text("event"), facts=tuple(facts.items()))
        case "end":
            return EndLine(at=f.time(), reason=f.text("reason"))
        case str():
            return None  # a kind added by a later recorder: skipped
        case _:
            raise TraceError("missing key 'k' (what the line is)")


def _parse_header(f: _Fields) -> Header:
    if f.obj.get("format") != FORMAT:
        raise TraceError(f"not a uoomd trace (format {_short(f.obj.get('format'))})")
    version = f.integer("version", minimum=1)
    if version > VERSION:
        raise TraceError(f"a trace of version {version}: this uoomd reads version {VERSION} and older")
    guards = []
    for item in f.items("guards"):
        if not isinstance(item, dict):
            raise TraceError("each of 'guards' must be an object")
        g = _Fields(item)
        guards.append(TraceGuard(name=g.text("name"), scope=g.text("scope"), psi=g.strings("psi")))
    return Header(
        version=version,
        started_at=f.number("started_at"),
        started_wall=f.number("started_wall"),
        host=f.text("host"),
        kernel=f.text("kernel"),
        page_size=f.integer("page_size", minimum=1),
        ram_bytes=f.integer("ram"),
        swap_bytes=f.integer("swap"),
        source=f.text("source"),
        policy=f.text("policy"),
        policy_text=f.opt_text("policy_text"),
        details=frozenset(f.strings("details")),
        psi_every_poll=f.flag("psi_every_poll"),
        guards=tuple(guards),
        notes=f.strings("notes"),
    )


def _parse_reading(f: _Fields) -> ReadingLine:
    memory = MemoryReading(
        total_bytes=f.integer("total"),
        available_bytes=f.integer("avail"),
        swap_total_bytes=f.integer("swap_total"),
        swap_free_bytes=f.integer("swap_free"),
        refault_bytes=f.opt_integer("refault"),
        refaults_all=f.flag("refault_all"),
    )
    pressure = None
    if f.obj.get("psi") is not None:
        psi = f.items("psi")
        if len(psi) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in psi):
            raise TraceError("'psi' must be [some avg10, some total us, full avg10, full total us]")
        some_avg10, some_total, full_avg10, full_total = psi
        if not all(isinstance(v, int) and v >= 0 for v in (some_total, full_total)):
            raise TraceError("'psi' totals must be integers from 0")
        pressure = PressureReading(
            some_avg10=float(some_avg10),
            some_avg60=0.0,
            some_avg300=0.0,
            some_total_us=some_total,
            full_avg10=float(full_avg10),
            full_avg60=0.0,
            full_avg300=0.0,
            full_total_us=full_total,
        )
    fired = f.items("fired", default=[])
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 64 for i in fired):
        raise TraceError("'fired' must be a list of trigger indices")
    return ReadingLine(at=f.time(), guard=f.text("g"), memory=memory, pressure=pressure, fired=tuple(fired))


def _parse_candidates(f: _Fields) -> CandidatesLine:
    procs = f.items("procs")
    if len(procs) > MAX_PROCESSES:
        raise TraceError(f"{len(procs)} processes in one line, over {MAX_PROCESSES}")
    items = []
    for item in procs:
        if not isinstance(item, dict):
            raise TraceError("each of 'procs' must be an object")
        items.append(_parse_process(_Fields(item)))
    return CandidatesLine(
        at=f.time(),
        guard=f.text("g"),
        totalpages=f.integer("totalpages", minimum=1),
        system_totalpages=f.integer("system_totalpages", minimum=1),
        processes=tuple(items),
    )


def _parse_process(f: _Fields) -> TracedProcess:
    adj = f.integer("adj", minimum=-1000)
    if adj > 1000:
        raise TraceError(f"'adj' must be from -1000 to 1000, not {adj}")
    process = ProcessInfo(
        pid=Pid(f.integer("pid", minimum=1)),
        ppid=Pid(f.integer("ppid")),
        pgid=f.integer("pgid"),
        starttime_ticks=f.integer("start"),
        name=f.text("name"),
        state=f.text("state"),
        uid=Uid(f.integer("uid")),
        kthread=False,  # never a candidate: the recorder lists none
        has_mm=True,
        oom_score_adj=adj,
        rss_anon_bytes=f.integer("anon"),
        rss_file_bytes=f.integer("file"),
        rss_shmem_bytes=f.integer("shmem"),
        swap_bytes=f.integer("swap"),
        pgtables_bytes=f.integer("pgtables"),
        vm_size_bytes=f.integer("vm"),
        mm_rss_pages=f.opt_integer("mm_rss"),
        cmdline=f.opt_text("cmdline"),
        exe=f.opt_text("exe"),
        cgroup=f.opt_text("cgroup"),
        user=f.opt_text("user"),
    )
    excluded = f.opt_text("excluded")
    if excluded is not None:
        return TracedProcess(process=process, rules=f.strings("rules"), excluded=excluded)
    terms_raw = f.obj.get("terms")
    terms: tuple[int, int, int, int] | None = None
    if terms_raw is not None:
        if not (isinstance(terms_raw, list) and len(terms_raw) == 4 and all(isinstance(v, int) for v in terms_raw)):
            raise TraceError("'terms' must be [rss, swap, pgtables, adj points]")
        terms = (terms_raw[0], terms_raw[1], terms_raw[2], terms_raw[3])
    points = f.obj.get("points")
    if points is not None and (isinstance(points, bool) or not isinstance(points, int)):
        raise TraceError(f"'points' must be an integer, not {_short(points)}")
    return TracedProcess(process=process, points=points, terms=terms, rules=f.strings("rules"))
