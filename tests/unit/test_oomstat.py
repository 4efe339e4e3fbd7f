"""earlyoom's contrib/oomstat text as a trace (uoomd/sources/oomstat.py), and replays of traces made here in it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from uoomd.cli import main
from uoomd.errors import ExitCode
from uoomd.policy.load import parse_plan
from uoomd.replay import replay
from uoomd.sources.oomstat import OomstatRow, looks_like_oomstat, oomstat_trace, parse_row, parse_rows, read_oomstat
from uoomd.trace import TraceError
from uoomd.tracefile import read_lines
from uoomd.tracelines import Header, ReadingLine, TraceItem

pytestmark = pytest.mark.unit

MIB = 1 << 20
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "traces"
# oomstat.go's own lines: the four it prints first, and its printf for each row.
HEAD = (
    "     | /proc/meminfo     | /proc/pressure/memory\n"
    "Time | MemAvail SwapFree | some avg10 full avg10\n"
    "   s |      MiB      MiB |    %     %    %     %\n"
    "     -                   -                      \n"
)
ROW = "%4.1f | %8d %8d | %4d %5d %4d %5d\n"
LEVELS = """
[[guard]]
name = "system"
mem_available_term = "30%"
mem_available_kill = "10%"
"""
TREND = LEVELS + 'mem_available_eta = "4s"\nmem_available_eta_min_fall = "5%"\nmem_available_eta_sustain = "1s"\n'


def row(t: float, avail: int, swap: int = 0, *, some: int = 0, some10: int = 0, full: int = 0, full10: int = 0) -> str:
    return ROW % (t, avail, swap, some, some10, full, full10)


def test_a_row_in_oomstats_printf_format_parses_to_its_columns() -> None:
    assert parse_row(row(10.3, 52, 6667, some=61, some10=2, full=43, full10=1).encode()) == OomstatRow(
        t_s=10.3,
        mem_available_mib=52,
        swap_free_mib=6667,
        some_now_pct=61,
        some_avg10_pct=2,
        full_now_pct=43,
        full_avg10_pct=1,
    )
    # "now" passes 100 where several CPUs stall at once (oomstat divides by one interval).
    assert parse_row(row(26.0, 81, 5067, some=404, some10=71, full=187, full10=10).encode()) is not None


@pytest.mark.parametrize(
    "line",
    [
        "warning: mlockall: operation not permitted. Run as root?",
        "# Loadshift example",
        " [...]",
        "$ ./oomstat",
        "Time | MemAvail SwapFree | some avg10 full avg10",
        " 1.5 |    20251        0 |    0     6    0",  # a column short: a line cut off mid-write
        '{"k": "r"}',
    ],
)
def test_everything_but_a_data_row_is_skipped(line: str) -> None:
    assert parse_row(line.encode()) is None


def test_the_format_is_told_from_a_uoomd_trace() -> None:
    assert looks_like_oomstat((HEAD + row(0.0, 100)).encode())
    assert looks_like_oomstat(b"# notes first\n" + row(0.0, 100).encode())  # its example files start so
    assert not looks_like_oomstat((FIXTURES / "two_hogs_live.jsonl").read_bytes()[:4096])


def trace_of(text: str, **totals: int | None) -> list[TraceItem]:
    kw = {"mem_total_bytes": None, "swap_total_bytes": None, **totals}
    return list(oomstat_trace(parse_rows(text.encode()), source="test", **kw))


def test_what_oomstat_does_not_print_is_estimated_and_said() -> None:
    items = trace_of(HEAD + row(0.0, 1000, 200) + row(0.1, 900, 150))
    header = items[0]
    assert isinstance(header, Header)
    assert (header.ram_bytes, header.swap_bytes) == (1000 * MIB, 200 * MIB)
    assert any("no MemTotal" in n for n in header.notes)
    assert any("no SwapTotal" in n for n in header.notes)
    given = trace_of(HEAD + row(0.0, 1000), mem_total_bytes=4096 * MIB, swap_total_bytes=0)[0]
    assert isinstance(given, Header)
    assert given.ram_bytes == 4096 * MIB
    assert not any("MemTotal" in n for n in given.notes)


def test_stall_totals_are_rebuilt_from_the_now_columns_and_time_always_moves_on() -> None:
    text = HEAD + row(0.0, 100) + row(0.1, 100, some=50, full=20) + row(0.2, 100, some=100, full=0)
    text += row(0.0, 100)  # a second run appended: restarts at 0.0
    readings = [i for i in trace_of(text) if isinstance(i, ReadingLine)]
    assert [r.at for r in readings] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    pressure = [r.pressure for r in readings]
    assert [p.some_total_us for p in pressure if p] == [0, 50_000, 150_000, 150_000]
    assert [p.full_total_us for p in pressure if p] == [0, 20_000, 20_000, 20_000]


def test_no_rows_is_an_error_naming_the_format() -> None:
    with pytest.raises(TraceError, match="no oomstat lines"):
        trace_of(HEAD)


def test_a_psi_trigger_fires_on_an_oomstat_trace_from_its_rebuilt_totals() -> None:
    # 30 % of every 100 ms stalled from 1 s on, available above the term level: "some 150ms in 2s".
    text = HEAD + "".join(row(i / 10, 500, some=30 if i >= 10 else 0) for i in range(40))
    psi = '  [[guard.psi]]\n  kind = "some"\n  stall = "150ms"\n  window = "2s"\n  action = "warn"\n'
    plan = parse_plan(LEVELS + 'psi_mem_gate = "100%"\n' + psi)
    timeline = replay(trace_of(text, mem_total_bytes=1000 * MIB), plan)
    fired = [m for m in timeline.moments if m.event == "trigger_fired"]
    assert fired
    assert fired[0].at == pytest.approx(1.4)  # 5 rows of 30 ms, the first at 1.0 s
    assert [m.event for m in timeline.moments if m.event == "psi_warn"] == ["psi_warn"]


# --- traces made here, in oomstat's format (tests/fixtures/traces/make_traces.py) ----------------


def oomstat_fixture(name: str) -> list[TraceItem]:
    return list(read_oomstat([str(FIXTURES / name)], mem_total_bytes=512 * MIB, swap_total_bytes=0))


def uoomd_fixture(name: str) -> list[TraceItem]:
    return [located.item for located in read_lines([str(FIXTURES / name)])]


def crossing(items: list[TraceItem], policy: str, level: str) -> float:
    timeline = replay(items, parse_plan(policy))
    return next(m.at for m in timeline.moments if m.event == "level_crossed" and m.get("level") == level)


def test_the_same_run_read_from_oomstat_crosses_its_levels_when_uoomds_own_trace_does() -> None:
    # Both were written from the same readings (oomstat's every 100 ms, in whole MiB).
    for level in ("term", "kill"):
        ours = crossing(uoomd_fixture("runout_cgroup.jsonl"), LEVELS, level)
        theirs = crossing(oomstat_fixture("runout_cgroup.oomstat.txt"), LEVELS, level)
        assert abs(ours - theirs) <= 0.15, (level, ours, theirs)


def test_on_oomstat_traces_the_eta_acts_before_the_term_level_and_stays_quiet_on_a_burst() -> None:
    runout = replay(oomstat_fixture("runout_cgroup.oomstat.txt"), parse_plan(TREND))
    acts = [m for m in runout.moments if m.event == "no_candidate"]  # oomstat lists no processes
    assert [m.get("trigger") for m in acts] == ["mem_available_eta"]
    term = next(m.at for m in runout.moments if m.event == "level_crossed")
    assert term - acts[0].at > 0.5
    burst = replay(oomstat_fixture("burst_cgroup.oomstat.txt"), parse_plan(TREND))
    assert [m for m in burst.moments if m.event == "no_candidate"] == []


def test_uoomd_replay_reads_an_oomstat_file(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(TREND)
    out = io.StringIO()
    argv = ["replay", str(FIXTURES / "runout_cgroup.oomstat.txt"), "--policy", str(policy), "--mem-total", "512MiB"]
    assert main([*argv, "--json"], out=out) == ExitCode.OK
    doc = json.loads(out.getvalue())
    assert doc["trace"]["source"] == "oomstat"
    assert any("never whom" in note for note in doc["notes"])
    empty = tmp_path / "empty.txt"
    empty.write_text(HEAD)
    err = io.StringIO()
    assert main(["replay", str(empty), "--policy", str(policy)], out=io.StringIO(), err=err) == ExitCode.SETUP
    assert "no oomstat lines" in err.getvalue()
