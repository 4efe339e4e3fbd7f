"""record_on_decision: the flight recorder's ring, where a trace starts, the trace files, and the loop writing one."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.builders import CHILDREN, make_guard, make_key, make_memory, make_plan
from tests.harness import LoopHarness, loop_harness
from uoomd.decision import GuardState, Phase, PsiTrack, State, initial_state
from uoomd.errors import PolicyError
from uoomd.flight import MAX_CANDIDATE_LINES, FlightRing, settled, trace_name
from uoomd.plan import DaemonPlan, EscalationPlan, Plan
from uoomd.policy.load import parse_plan
from uoomd.policy.render import render_plan
from uoomd.readings import PressureReading
from uoomd.replay import replay
from uoomd.trace import encode, parse_line
from uoomd.tracefile import TRACE_FILE, prune_traces, read_lines, write_trace_file
from uoomd.tracelines import CandidatesLine, DecisionLine, ExitLine, Header, ReadingLine, TraceGuard

pytestmark = pytest.mark.unit

GiB = 1 << 30
PRESSURE = PressureReading(
    some_avg10=1.5,
    some_avg60=0.0,
    some_avg300=0.0,
    some_total_us=123456789,
    full_avg10=0.25,
    full_avg60=0.0,
    full_avg300=0.0,
    full_total_us=98765,
)


def header(guards: tuple[str, ...] = ("system",)) -> Header:
    return Header(
        started_at=0.0,
        started_wall=1.7e9,
        host="h",
        kernel="k",
        page_size=4096,
        ram_bytes=16 * GiB,
        swap_bytes=0,
        source="uoomd run",
        policy="p.toml",
        guards=tuple(TraceGuard(name=g, scope="system") for g in guards),
    )


# --- the ring --------------------------------------------------------------------------------------


def test_a_reading_comes_back_as_it_went_in_through_the_trace_format() -> None:
    ring = FlightRing(("system", "app"))
    memory = make_memory(3 * GiB, swap_total_bytes=GiB, swap_free_bytes=GiB // 3, refault_bytes=7 << 20)
    ring.reading(1.25, "app", memory, PRESSURE, (0, 2), settled=True)
    ring.reading(1.5, "system", make_memory(5 * GiB), settled=False)
    every = make_memory(GiB, refault_bytes=9 << 20, refaults_all=True)  # the multi-gen LRU's count
    ring.reading(1.75, "system", every, settled=False)
    first, second, third = ring.items(0.0)
    assert first == ReadingLine(at=1.25, guard="app", memory=memory, pressure=PRESSURE, fired=(0, 2))
    assert second == ReadingLine(at=1.5, guard="system", memory=make_memory(5 * GiB))
    assert third == ReadingLine(at=1.75, guard="system", memory=every)
    # The trace format keeps what a replay reads (the avg60/avg300 are not part of it).
    assert parse_line(encode(first)) == first
    assert parse_line(encode(third)) == third
    assert '"refault_all"' not in encode(first)  # written only where it is so


def test_the_ring_holds_its_capacity_of_newest_readings() -> None:
    ring = FlightRing(("system",), capacity=4)
    for i in range(10):
        ring.reading(float(i), "system", make_memory(i * GiB), settled=True)
    assert [line.at for line in ring.items(0.0)] == [6.0, 7.0, 8.0, 9.0]
    start, notes = ring.start(now=9.0, window_s=100.0)
    assert start == 6.0
    assert any("last 4 readings" in n for n in notes)


def test_other_lines_are_merged_in_time_order_and_cut_at_the_start() -> None:
    ring = FlightRing(("system",))
    for i in range(5):
        ring.reading(float(i), "system", make_memory(GiB), settled=True)
    ring.add(ExitLine(at=1.0, key=make_key(7, 70)))
    ring.add(DecisionLine(at=3.0, event="victim_chosen", facts=(("pid", 7),)))
    ring.add(ExitLine(at=0.5, key=make_key(8, 80)))  # before the start: left out
    kinds = [(type(i).__name__, i.at) for i in ring.items(1.0)]
    assert kinds == [  # each poll's reading first, then what else it had
        ("ReadingLine", 1.0),
        ("ExitLine", 1.0),
        ("ReadingLine", 2.0),
        ("ReadingLine", 3.0),
        ("DecisionLine", 3.0),
        ("ReadingLine", 4.0),
    ]


def test_a_trace_starts_where_the_daemon_had_nothing_open() -> None:
    ring = FlightRing(("system",))
    for i, calm in enumerate([False, False, True, True, False]):
        ring.reading(float(i), "system", make_memory(GiB), settled=calm)
    assert ring.start(now=4.0, window_s=60.0) == (2.0, ())
    assert ring.start(now=4.0, window_s=1.5) == (3.0, ())
    assert ring.start(now=4.0, window_s=0.5)[0] == 4.0  # only the open end is in the window...
    assert "episode open" in ring.start(now=4.0, window_s=0.5)[1][0]  # ... and the notes say so


def test_rankings_let_go_move_the_start_after_them() -> None:
    ring = FlightRing(("system",))
    for i in range(MAX_CANDIDATE_LINES + 2):
        ring.reading(float(i), "system", make_memory(GiB), settled=True)
        ring.add_candidates(
            CandidatesLine(at=float(i), guard="system", totalpages=1, system_totalpages=1, processes=())
        )
    start, notes = ring.start(now=float(MAX_CANDIDATE_LINES + 1), window_s=1000.0)
    assert start == 2.0
    assert any("rankings were let go" in n for n in notes)


def test_settled_means_a_replay_starting_idle_is_in_the_daemons_state() -> None:
    plan = make_plan()
    idle = initial_state(plan)
    assert settled(idle, 100.0)
    gs = idle.guards[0]
    for open_state in (
        replace(gs, phase=Phase.RECOVERING),
        replace(gs, noted=frozenset({"no_candidate"})),
        replace(gs, stuck=frozenset({make_key(1, 1)})),
        replace(gs, psi=(PsiTrack(last_fired_at=99.0, active_since=99.0),)),
        replace(gs, warned_at=90.0),
    ):
        assert not settled(State(guards=(open_state,)), 100.0), open_state
    assert not settled(replace(idle, kill_times=(95.0,)), 100.0)
    assert settled(State(guards=(GuardState(guard="system", warned_at=30.0),)), 100.0), "a warning long ago"


# --- trace files -----------------------------------------------------------------------------------


def lines(n: int) -> list[ReadingLine]:
    return [ReadingLine(at=float(i), guard="system", memory=make_memory(GiB)) for i in range(n)]


def test_a_trace_file_is_written_whole_private_and_read_back(tmp_path: Path) -> None:
    directory = tmp_path / "traces"
    name = trace_name(1_700_000_000.25, make_plan(), "victim_chosen pid 4711")
    assert name == "uoomd-20231114T221320.250Z-4711.jsonl"
    path, size, count = write_trace_file(str(directory), name, header(), lines(600), keep=5)
    assert (path, count) == (str(directory / name), 601)
    assert os.stat(path).st_size == size
    assert os.stat(path).st_mode & 0o777 == 0o600  # other users' command lines are in it
    assert os.stat(directory).st_mode & 0o777 == 0o700
    items = [located.item for located in read_lines([path])]
    assert items[0] == header()
    assert items[1:] == lines(600)
    assert [n for n in os.listdir(directory) if not TRACE_FILE.fullmatch(n)] == [], "no temp file left"


def test_only_the_newest_traces_are_kept_and_nothing_else_is_touched(tmp_path: Path) -> None:
    for second in range(5):
        name = trace_name(1_700_000_000.0 + second, make_plan(), f"victim_chosen pid {second + 1}")
        write_trace_file(str(tmp_path), name, header(), lines(1), keep=3)
    (tmp_path / "notes.txt").write_text("mine")
    os.symlink("/etc/passwd", tmp_path / "uoomd-20000101T000000.000Z-1.jsonl")  # sorts first, is no trace
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert prune_traces(fd, keep=3) == []
        assert (
            prune_traces(fd, keep=1)
            == [
                "uoomd-20231114T221323.000Z-4.jsonl",
                "uoomd-20231114T221322.000Z-3.jsonl",
            ][::-1]
        )
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == [
        "notes.txt",
        "uoomd-20000101T000000.000Z-1.jsonl",
        "uoomd-20231114T221324.000Z-5.jsonl",
    ]
    assert os.path.exists("/etc/passwd")


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory others can write is refused when uoomd runs as root")
def test_a_record_dir_others_can_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    name = trace_name(1.0, make_plan(), "victim_chosen pid 1")
    with pytest.raises(PermissionError, match="writable by others"):
        write_trace_file(str(shared / "traces"), name, header(), lines(1), keep=3)
    assert not (shared / "traces").exists(), "never created under a directory others can write"
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OSError, match=r"directory|symbolic") as refused:  # O_NOFOLLOW: never followed
        write_trace_file(str(link), name, header(), lines(1), keep=3)
    assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(real) == []


# --- the loop --------------------------------------------------------------------------------------


def recording_plan(tmp_path: Path, **daemon: object) -> Plan:
    return make_plan(
        guards=(make_guard(),),
        daemon=DaemonPlan(
            poll_min_s=0.02,
            poll_max_s=1.0,
            record_on_decision=True,
            record_dir=str(tmp_path / "traces"),
            **daemon,  # type: ignore[arg-type]
        ),
        escalation=EscalationPlan(term_timeout_s=5.0),
    )


def wait_for_trace(h: LoopHarness, *, written: int = 1) -> list[dict[str, object]]:
    deadline = time.monotonic() + 20
    while len(h.events("trace_written")) < written:
        assert time.monotonic() < deadline, h.events("trace_write_failed")
        time.sleep(0.01)
        h.tick(0.02)
    return h.events("trace_written")


def test_after_a_decision_the_loop_writes_a_trace_that_replays_to_the_same_decision(tmp_path: Path) -> None:
    plan = recording_plan(tmp_path)
    with loop_harness(plan, tmp_path, available_bytes=12 * GiB, proc_root=CHILDREN) as h:
        for available in (12 * GiB, 8 * GiB, 4 * GiB, 2 * GiB):  # falling, quiet, then warm
            h.set_available(available)
            h.tick(0.5)
        h.set_available(int(1.2 * GiB))  # below the term level (10 % of 16 GiB)
        h.tick(0.05)
        (chosen,) = h.events("victim_chosen")
        (written,) = wait_for_trace(h)
        assert written["decision"] == f"victim_chosen pid {chosen['pid']}"
        path = str(written["path"])
    items = [located.item for located in read_lines([path])]
    head = items[0]
    assert isinstance(head, Header)
    assert (head.source, head.policy, head.ram_bytes > 0) == ("uoomd run", "<test>", True)
    assert [i.event for i in items if isinstance(i, DecisionLine)] == ["victim_chosen"]
    timeline = replay(items, plan)
    (replayed,) = timeline.decisions
    assert (replayed.get("pid"), replayed.get("trigger"), replayed.get("action")) == (
        chosen["pid"],
        chosen["trigger"],
        chosen["action"],
    )
    assert replayed.get("badness") == chosen["badness"]
    # The readings before it are there, quiet ticks too: the fall that led to it.
    readings = [i for i in items if isinstance(i, ReadingLine)]
    assert [r.memory.available_bytes for r in readings][-5:] == [12 * GiB, 8 * GiB, 4 * GiB, 2 * GiB, int(1.2 * GiB)]


def test_a_decision_while_a_trace_is_written_gets_the_next_one(tmp_path: Path) -> None:
    plan = recording_plan(tmp_path, dry_run=True)
    with loop_harness(plan, tmp_path, available_bytes=int(1.2 * GiB), proc_root=CHILDREN) as h:
        h.tick(0.05)  # would_term
        assert h.daemon.flight.running == 1
        h.daemon.flight.decided(h.clock.now, "victim_chosen pid 99")  # a second decision meanwhile
        assert h.daemon.flight.pending == "victim_chosen pid 99"
        written = wait_for_trace(h, written=2)
        assert [w["decision"] for w in written][1] == "victim_chosen pid 99"
    assert len(os.listdir(tmp_path / "traces")) == 2


def test_off_by_default_nothing_is_kept(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=int(1.2 * GiB)) as h:
        h.tick()
        assert h.daemon.flight.ring is None
        assert h.events("victim_chosen")
        assert not h.events("trace_written")
        assert h.daemon.flight.running == 0


def test_the_record_keys_are_checked_and_shown() -> None:
    base = '[[guard]]\nname = "system"\n'
    plan = parse_plan('[daemon]\nrecord_on_decision = true\nrecord_window = "30s"\nrecord_keep = 3\n' + base)
    assert (plan.daemon.record_on_decision, plan.daemon.record_window_s, plan.daemon.record_keep) == (True, 30.0, 3)
    assert plan.daemon.record_dir == "/var/lib/uoomd/traces"
    for bad, message in (
        ('record_window = "5s"', "between 10s and 10m"),
        ('record_window = "1h"', "between 10s and 10m"),
        ("record_keep = 0", "greater than or equal to 1"),
        ('record_dir = "traces"', "absolute directory path"),
    ):
        with pytest.raises(PolicyError, match=message):
            parse_plan(f"[daemon]\n{bad}\n" + base)
    shown = render_plan(plan, as_json=False)
    assert isinstance(shown, str)
    assert 'record_on_decision = true\nrecord_dir = "/var/lib/uoomd/traces"\nrecord_window = "30s"' in shown
    assert parse_plan(shown).daemon == plan.daemon, "what check prints is a policy that means the same"
