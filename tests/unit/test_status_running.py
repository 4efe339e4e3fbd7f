"""`uoomd status` after issue 13: the daemon known by pid and start time, the reload record read
back and checked, PSI in milliseconds, and `recent:` lines cut between facts, never in a name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.builders import make_guard, make_memory, make_plan, make_psi_trigger
from uoomd.decision import initial_state
from uoomd.plan import PsiAction
from uoomd.readings import ProcessKey
from uoomd.sources.procfs import read_stat
from uoomd.sources.psi import PsiTrigger
from uoomd.sources.watch import GuardWatch
from uoomd.status import (
    FACTS_SHOWN_CHARS,
    MalformedStateError,
    format_age,
    is_running,
    parse_state,
    render_status,
    running_daemon,
)
from uoomd.statusboard import Recent, ReloadRecord, status_document

pytestmark = pytest.mark.unit


def my_starttime() -> int:
    stat = read_stat("/proc", os.getpid())
    assert stat is not None
    return stat.starttime_ticks


def document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "pid": os.getpid(),
        "starttime_ticks": my_starttime(),
        "policy": "/etc/uoomd/uoomd.toml",
        "dry_run": False,
        "updated_at": 1_700_000_000.0,
        "status": "mem 41% avail, last kill: none",
        "guards": [],
        "recent": [],
        "reload": None,
    }
    doc.update(overrides)
    return doc


RECORD = {"started_at": 123.5, "finished_at": 1_700_000_000.0, "outcome": "refused", "policy": "/p", "error": "x"}


def test_the_document_carries_the_daemons_start_time_and_its_reload_record(tmp_path: Path) -> None:
    plan = make_plan()
    record = ReloadRecord(started_at=5.0, finished_at=1_700_000_000.0, outcome="applied", policy="/p", error=None)
    doc = status_document(plan=plan, state=initial_state(plan), watches=[], recent=Recent(), reload=record)
    state = parse_state(json.loads(json.dumps(doc)))
    assert state.key == ProcessKey(pid=os.getpid(), starttime_ticks=my_starttime())  # type: ignore[arg-type]
    assert (state.reports_reloads, state.reload) == (True, record)
    assert is_running(state)


def test_the_psi_triggers_of_the_document_are_in_milliseconds(tmp_path: Path) -> None:
    pressure = tmp_path / "memory.pressure"
    pressure.write_text(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    trigger = PsiTrigger.polled(str(pressure), kind="full", stall_us=200_000, window_us=2_000_000, reason="r", now=0.0)
    guard = make_guard(psi=(make_psi_trigger(PsiAction.TERM),))
    watch = GuardWatch(guard=guard, memory=None, pressure=None, triggers=(trigger,))  # type: ignore[arg-type]
    watch.last = make_memory(1 << 30)
    plan = make_plan(guards=(guard,))
    doc = status_document(plan=plan, state=initial_state(plan), watches=[watch], recent=Recent())
    [psi] = doc["guards"][0]["psi"]
    assert psi["describe"] == "full 200ms in 2s (polled: r)"
    assert (psi["stall_us"], psi["window_us"]) == (200_000, 2_000_000)
    assert doc["guards"][0]["levels"].endswith("psi[0] full 200ms in 2s: term below 3.2GiB available")


@pytest.mark.parametrize(
    ("edit", "running"),
    [({}, True), ({"starttime_ticks": 1}, False), ({"pid": 4_194_304}, False), ({"starttime_ticks": None}, True)],
    ids=["ours", "recycled-pid", "gone", "older-uoomd-pid-only"],
)
def test_running_means_that_pid_with_that_start_time(edit: dict[str, Any], running: bool, tmp_path: Path) -> None:
    state = parse_state(document(**edit))
    assert is_running(state) is running
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document(**edit)))
    # A report excludes a running daemon only when the start time says it is that process.
    expected = state.key if running and state.starttime_ticks is not None else None
    assert running_daemon(str(path)) == expected


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"outcome": "maybe"}, "reload.outcome: 'applied' or 'refused' expected"),
        ({"error": 1}, "reload.error: str or null expected"),
        ({"started_at": "now"}, "reload.started_at: a time in seconds expected"),
        ({"policy": None}, "reload.policy: str expected"),
    ],
)
def test_a_malformed_reload_record_is_refused_by_key(edit: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedStateError, match=message.replace("(", r"\(")):
        parse_state(document(reload={**RECORD, **edit}))
    with pytest.raises(MalformedStateError, match="starttime_ticks: int expected"):
        parse_state(document(starttime_ticks="1"))


def test_a_state_file_from_before_the_reload_record_reads_as_not_reporting_reloads() -> None:
    doc = document()
    del doc["reload"], doc["starttime_ticks"]
    state = parse_state(doc)
    assert (state.reports_reloads, state.reload, state.key) == (False, None, None)


def test_a_recent_line_keeps_the_victims_name_whole_and_cuts_between_facts() -> None:
    long_facts = {f"fact{i}_bytes": 10**15 + i for i in range(20)}
    event = {"event": "victim_chosen", "at": 1_700_000_000.0, **long_facts, "pid": 4242, "name": "web-worker"}
    text = render_status(parse_state(document(recent=[event])), running=True)
    line = text.splitlines()[-1]
    assert " victim_chosen pid=4242 name=web-worker fact0_bytes=" in line
    assert line.endswith(" more in --json)")
    shown = line.split(" victim_chosen ", 1)[1]
    assert len(shown) <= FACTS_SHOWN_CHARS + len("pid=4242 name=web-worker ") + len(" (+20 more in --json)")


def test_the_last_reload_is_shown_with_its_first_error_line() -> None:
    record = {**RECORD, "error": "/p:3: guard[0].victim: bad\n/p:4: rule[0]: worse"}
    text = render_status(parse_state(document(reload=record)), running=True)
    assert "last reload: " in text
    assert text.splitlines()[-1].endswith(" refused /p: /p:3: guard[0].victim: bad")


@pytest.mark.parametrize(
    ("seconds", "shown"), [(4.24, "4.2s"), (725, "12m 5s"), (3 * 3600 + 720, "3h 12m"), (2 * 86400 + 3 * 3600, "2d 3h")]
)
def test_ages_are_said_for_people(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown
