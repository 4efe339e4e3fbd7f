"""The trace format (uoomd/trace.py) and its files (uoomd/tracefile.py): round trips, refusals, bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import make_candidate, make_memory, make_process
from uoomd.readings import Pid, PressureReading, ProcessKey
from uoomd.scoring import Exclusion
from uoomd.trace import MAX_LINE_BYTES, MAX_PROCESSES, TraceError, encode, parse_line, traced
from uoomd.tracefile import MIN_MAX_BYTES, TraceWriter, read_lines
from uoomd.tracelines import (
    VERSION,
    CandidatesLine,
    DecisionLine,
    EndLine,
    ExitLine,
    Header,
    ReadingLine,
    TraceGuard,
    TraceItem,
)

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "traces"


def header(**overrides: object) -> Header:
    fields: dict[str, object] = {
        "started_at": 1234.5,
        "started_wall": 1.7e9,
        "host": "box",
        "kernel": "6.18",
        "page_size": 4096,
        "ram_bytes": 16 << 30,
        "swap_bytes": 0,
        "source": "uoomd record",
        "policy": "/etc/uoomd/uoomd.toml",
        "guards": (TraceGuard(name="system", scope="system", psi=("full 200000 2000000 sustain 4s term",)),),
        "policy_text": "[[guard]]\nname = 'system'\n",
        "details": frozenset({"cmdline", "exe"}),
    }
    fields.update(overrides)
    return Header(**fields)  # type: ignore[arg-type]


PRESSURE = PressureReading(
    some_avg10=1.5,
    some_avg60=0.0,
    some_avg300=0.0,
    some_total_us=123,
    full_avg10=0.25,
    full_avg60=0.0,
    full_avg300=0.0,
    full_total_us=45,
)


def hostile_process() -> object:
    # Control characters, a newline, a quote and non-ASCII in what a process controls.
    return make_process(
        4242,
        name='x\n"\x1b[31mé',
        cmdline="sleep 1\x00\n",
        exe="/tmp/évil",
        cgroup="/app",
        user="nobody",
        rss_anon_bytes=100 << 20,
        oom_score_adj=1000,
        mm_rss_pages=25600,
    )


def every_kind() -> list[TraceItem]:
    proc = hostile_process()
    cand = make_candidate(proc, rss_pages=25600, adj=1000, adj_points=1_000_000, rules=("prefer",))  # type: ignore[arg-type]
    excl = Exclusion(process=make_process(7, name="sshd"), reason="protected by rule 'ssh'", rules=("ssh",))
    return [
        header(),
        ReadingLine(at=0.25, guard="system", memory=make_memory(1 << 30), pressure=PRESSURE, fired=(0,)),
        ReadingLine(at=0.5, guard="system", memory=make_memory(2 << 30, swap_total_bytes=4 << 30, swap_free_bytes=3)),
        ReadingLine(at=0.6, guard="system", memory=make_memory(2 << 30, refault_bytes=123 << 20)),
        ReadingLine(at=0.7, guard="system", memory=make_memory(2 << 30, refault_bytes=5 << 20, refaults_all=True)),
        CandidatesLine(
            at=0.5,
            guard="system",
            totalpages=4_000_000,
            system_totalpages=4_000_000,
            processes=(traced(cand), traced(excl)),
        ),
        ExitLine(at=0.75, key=ProcessKey(pid=Pid(4242), starttime_ticks=5242)),
        DecisionLine(at=0.8, event="victim_chosen", facts=(("pid", 4242), ("name", "x"), ("rules", ["prefer"]))),
        EndLine(at=1.0, reason="duration"),
    ]


@pytest.mark.parametrize("item", every_kind(), ids=lambda i: type(i).__name__)
def test_every_kind_of_line_parses_back_to_the_value_it_was_made_from(item: TraceItem) -> None:
    line = encode(item)
    assert "\n" not in line
    assert line.isascii()
    assert parse_line(line) == item


def test_times_keep_a_microsecond() -> None:
    # Finer than any poll is apart, so a replay's deadlines fall where the daemon's did.
    line = encode(EndLine(at=1.2345674, reason="signal"))
    parsed = parse_line(line)
    assert isinstance(parsed, EndLine)
    assert parsed.at == 1.234567


def test_a_reading_line_stays_short() -> None:
    # A day at poll_max 1 s is 86,400 lines a guard: what the line costs is what a day costs.
    line = encode(ReadingLine(at=86399.9999, guard="system", memory=make_memory(3 << 30, total_bytes=64 << 30)))
    assert len(line) < 120


def test_unknown_kinds_and_blank_lines_are_skipped_and_newer_versions_refused() -> None:
    assert parse_line('{"k": "future-kind", "t": 1}') is None
    assert parse_line("   \n") is None
    newer = json.loads(encode(header()))
    newer["version"] = VERSION + 1
    with pytest.raises(TraceError, match=f"version {VERSION + 1}"):
        parse_line(json.dumps(newer))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "a JSON object"),
        ("{not json", "not JSON"),
        ('{"t": 1}', "missing key 'k'"),
        ('{"k": "r", "t": 1, "g": "s", "avail": 1, "total": 1, "swap_free": 0}', "missing key 'swap_total'"),
        ('{"k": "r", "t": -1, "g": "s", "avail": 1, "total": 1, "swap_free": 0, "swap_total": 0}', "negative"),
        ('{"k": "r", "t": 1, "g": "s", "avail": -5, "total": 1, "swap_free": 0, "swap_total": 0}', "'avail'"),
        ('{"k": "r", "t": 1, "g": "s", "avail": true, "total": 1, "swap_free": 0, "swap_total": 0}', "'avail'"),
        ('{"k": "r", "t": NaN, "g": "s", "avail": 1, "total": 1, "swap_free": 0, "swap_total": 0}', "finite"),
        ('{"k": "r", "t": 1, "g": "s", "avail": 1, "total": 1, "swap_free": 0, "swap_total": 0, "psi": [1]}', "psi"),
        (
            '{"k": "r", "t": 1, "g": "s", "avail": 1, "total": 1, "swap_free": 0, "swap_total": 0, "refault": -1}',
            "'refault'",
        ),
        (
            '{"k": "r", "t": 1, "g": "s", "avail": 1, "total": 1, "swap_free": 0, "swap_total": 0, "refault_all": 1}',
            "'refault_all'",
        ),
        ('{"k": "x", "t": 1, "pid": "1", "start": 2}', "'pid'"),
        ('{"k": "header", "format": "other"}', "not a uoomd trace"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
    ],
)
def test_a_malformed_line_is_refused_saying_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_line(line)


def test_a_line_over_the_limit_and_too_many_processes_are_refused() -> None:
    with pytest.raises(TraceError, match="limit"):
        parse_line(b"{" + b" " * MAX_LINE_BYTES + b"}")
    proc = json.loads(encode(next(i for i in every_kind() if isinstance(i, CandidatesLine))))["procs"][0]
    many = {"k": "c", "t": 1, "g": "s", "totalpages": 1, "system_totalpages": 1, "procs": [proc] * (MAX_PROCESSES + 1)}
    with pytest.raises(TraceError, match="processes in one line"):
        parse_line(json.dumps(many))


def test_the_writer_rotates_to_dot_one_and_keeps_at_most_two_files(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    writer = TraceWriter(str(path), header(), max_bytes=MIN_MAX_BYTES)
    reading = ReadingLine(at=0.0, guard="system", memory=make_memory(1 << 30))
    for i in range(5000):  # ~500 KiB of lines: several rotations
        writer.write(ReadingLine(at=i * 0.01, guard=reading.guard, memory=reading.memory))
        writer.flush()
    writer.write(EndLine(at=50.0, reason="duration"))
    writer.close()
    assert writer.rotations >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.jsonl", "trace.jsonl.1"]
    for file in (path, tmp_path / "trace.jsonl.1"):
        assert file.stat().st_size <= MIN_MAX_BYTES
        first = parse_line(file.read_text().splitlines()[0])
        assert first == header()  # each file replays alone, its times from the same start
    items = [located.item for located in read_lines([str(tmp_path / "trace.jsonl.1"), str(path)])]
    times = [item.at for item in items if isinstance(item, ReadingLine)]
    assert times == sorted(times)
    assert times[-1] == pytest.approx(49.99)
    assert isinstance(items[-1], EndLine)


def test_the_writer_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    link = tmp_path / "trace.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):  # ELOOP: O_NOFOLLOW
        TraceWriter(str(link), header())
    assert target.read_text() == "precious"


def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(encode(header()) + "\n\n" + '{"k": "x", "t": 1}\n')
    with pytest.raises(TraceError, match=r"t\.jsonl:3: missing key 'pid'"):
        list(read_lines([str(path)]))


@pytest.mark.parametrize("name", ["two_hogs_live.jsonl", "holder_dry_run.jsonl"])
def test_the_shipped_traces_parse_and_say_what_recorded_them(name: str) -> None:
    items = [located.item for located in read_lines([str(FIXTURES / name)])]
    first = items[0]
    assert isinstance(first, Header)
    assert first.source == "uoomd record"
    assert first.policy_text is not None
    kinds = {type(item).__name__ for item in items}
    assert {"ReadingLine", "CandidatesLine", "EndLine"} <= kinds
