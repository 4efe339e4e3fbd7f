"""Hostile process names and cmdlines against the pure parsers, rules, records, logs and hook environment.

A process name (comm, 15 bytes) and a cmdline are set by whoever runs the process: any
bytes but NUL. Here Hypothesis feeds every such name through the whole pure path:
/proc/PID/stat parsing (both parsers), a protect rule that also checks exe or user, the
decision's records and hook environment, and both log renderers. Fixed single cases live
next to each module (test_procfs, test_actions_unit, test_scoring, test_logs).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.builders import make_guard, make_memory, make_plan, make_process, make_rule, make_snapshot
from uoomd import logs
from uoomd.actions import Record, RunHook
from uoomd.decision import initial_state, step
from uoomd.hooks import hook_environment
from uoomd.plan import HooksPlan, LogFormat
from uoomd.readings import GuardReading, Observation, Uid
from uoomd.scoring import Candidate, Exclusion, rank, score_process
from uoomd.sources import procfs

pytestmark = pytest.mark.unit

GIB = 1 << 30
TOTAL_PAGES = 1_048_576

# What a name can be: 1..15 bytes, anything but NUL (kernel/sys.c PR_SET_NAME copies up to
# TASK_COMM_LEN - 1 bytes and NUL-terminates). Biased towards the dangerous ones.
DANGEROUS = [
    b"(",
    b")",
    b" ",
    b"\n",
    b"\r",
    b"\x1b[2J",
    b"$(",
    b"`",
    b";",
    b"|",
    b"\\",
    b'"',
    b"\xff",
    b"\xc3",
    b"S 1 ",
]
comm_bytes = st.lists(
    st.one_of(st.sampled_from(DANGEROUS), st.binary(min_size=1, max_size=3)), min_size=1, max_size=8
).map(lambda parts: b"".join(parts).replace(b"\0", b"?")[:15])


def stat_line(
    pid: int, comm: bytes, *, ppid: int, pgid: int, flags: int, starttime: int, vsize: int, rss: int
) -> bytes:
    """A /proc/PID/stat line as fs/proc/array.c do_task_stat() writes it (comm unescaped)."""
    # proc(5) fields 3..: state ppid pgrp session tty_nr tpgid flags, 8 counters, priority nice
    # num_threads itrealvalue starttime vsize rss, then 27 more.
    after: list[object] = [b"S", ppid, pgid, 0, 0, -1, flags, *[0] * 8, 20, 0, 3, 0, starttime, vsize, rss, *[0] * 27]
    return b"%d (%s) " % (pid, comm) + b" ".join(x if isinstance(x, bytes) else str(x).encode() for x in after) + b"\n"


@settings(max_examples=500)
@given(
    comm=comm_bytes,
    pid=st.integers(min_value=2, max_value=4_194_304),
    ppid=st.integers(min_value=0, max_value=4_194_304),
    pgid=st.integers(min_value=0, max_value=4_194_304),
    kthread=st.booleans(),
    starttime=st.integers(min_value=0, max_value=2**40),
    rss=st.integers(min_value=0, max_value=2**30),
)
def test_any_name_leaves_every_stat_field_after_it_in_place(  # noqa: PLR0917
    comm: bytes, pid: int, ppid: int, pgid: int, kthread: bool, starttime: int, rss: int
) -> None:
    flags = 0x40 | (procfs.PF_KTHREAD if kthread else 0)
    line = stat_line(pid, comm, ppid=ppid, pgid=pgid, flags=flags, starttime=starttime, vsize=rss * 4096, rss=rss)
    stat = procfs.parse_stat(line)
    assert stat.name == procfs.decode_name(comm)
    assert (stat.pid, stat.state, stat.ppid, stat.pgid) == (pid, "S", ppid, pgid)
    assert (stat.kthread, stat.starttime_ticks, stat.rss_pages, stat.vsize_bytes) == (
        kthread,
        starttime,
        rss,
        rss * 4096,
    )
    # The same line handed over as text (surrogate-escaped bytes) parses the same.
    ident = procfs.parse_stat(line.decode("utf-8", "surrogateescape"))
    assert (ident.state, ident.pgid, ident.kthread, ident.starttime_ticks) == ("S", pgid, kthread, starttime)


@given(comm=comm_bytes)
def test_a_decoded_name_is_always_encodable_text(comm: bytes) -> None:
    # Undecodable bytes become the four characters \xNN, never lone surrogates that would
    # make json.dumps, an environment variable or a terminal write fail.
    name = procfs.decode_name(comm)
    name.encode("utf-8")
    assert (b"\xff" in comm) <= ("\\xff" in name)


# --- names that imitate protected ones ------------------------------------------------------

SSHD_RULE = make_rule(0, protect=True, name="^sshd$", exe="^/usr/sbin/sshd$")


def test_a_python_process_renamed_sshd_is_still_a_candidate_when_the_rule_checks_exe() -> None:
    plan = make_plan(SSHD_RULE)
    impostor = make_process(10, name="sshd", exe="/usr/bin/python3.11", mm_rss_pages=500)
    real = make_process(11, name="sshd", exe="/usr/sbin/sshd", mm_rss_pages=5)
    ranking = rank(
        make_snapshot(impostor, real, details=frozenset({"exe"})), plan, make_guard(), totalpages=TOTAL_PAGES
    )
    assert [c.process.pid for c in ranking.candidates] == [10]
    assert {e.process.pid: e.reason for e in ranking.excluded} == {11: "protected by rule 'rule[0]'"}


def test_a_process_whose_exe_cannot_be_read_is_not_protected_by_an_exe_rule() -> None:
    # readlink(/proc/PID/exe) fails for a process that exited its mm or when uoomd lacks
    # CAP_SYS_PTRACE: the rule's exe key does not match, so the name alone cannot protect it.
    plan = make_plan(SSHD_RULE)
    unknown = make_process(10, name="sshd", exe=None, mm_rss_pages=500)
    ranking = rank(make_snapshot(unknown, details=frozenset({"exe"})), plan, make_guard(), totalpages=TOTAL_PAGES)
    assert [c.process.pid for c in ranking.candidates] == [10]


def test_a_renamed_process_of_another_user_is_not_protected_by_a_rule_that_checks_the_user() -> None:
    plan = make_plan(make_rule(0, protect=True, name="^postgres$", user="postgres"))
    impostor = make_process(10, name="postgres", uid=Uid(1000), user="mallory", mm_rss_pages=500)
    real = make_process(11, name="postgres", uid=Uid(120), user="postgres", mm_rss_pages=5)
    ranking = rank(
        make_snapshot(impostor, real, details=frozenset({"user"})), plan, make_guard(), totalpages=TOTAL_PAGES
    )
    assert [c.process.pid for c in ranking.candidates] == [10]


@given(comm=comm_bytes)
def test_no_name_alone_escapes_a_rule_that_also_checks_exe(comm: bytes) -> None:
    process = make_process(10, name=procfs.decode_name(comm), exe="/home/mallory/a.out", mm_rss_pages=100)
    verdict = score_process(
        process, make_plan(SSHD_RULE), make_guard(), TOTAL_PAGES, page_size=4096, system_totalpages=TOTAL_PAGES
    )
    assert isinstance(verdict, Candidate)


def test_a_process_named_like_uoomd_is_spared_only_if_it_is_uoomd() -> None:
    impostor = make_process(10, name="uoomd", mm_rss_pages=500)
    me = make_process(20, name="python3", mm_rss_pages=900)
    ranking = rank(make_snapshot(impostor, me, self_pid=20), make_plan(), make_guard(), totalpages=TOTAL_PAGES)
    assert [c.process.pid for c in ranking.candidates] == [10]
    assert isinstance(ranking.excluded[0], Exclusion)
    assert ranking.excluded[0].reason == "self"


# --- records, logs and hooks ----------------------------------------------------------------


def decide_on(name: str, cmdline: str) -> tuple[list[Record], list[RunHook]]:
    """One step at critical memory with a single hostile candidate; hooks configured."""
    plan = replace(make_plan(), hooks=HooksPlan(after_kill=("/usr/bin/logger", "-t", "uoomd")))
    victim = make_process(4321, name=name, cmdline=cmdline, cgroup="/user.slice/" + name, mm_rss_pages=1000)
    ranking = rank(make_snapshot(victim), plan, plan.guards[0], totalpages=TOTAL_PAGES)
    reading = make_memory(GIB // 100, total_bytes=4 * GIB)
    obs = Observation(now=1.0, guards=(GuardReading(guard=plan.guards[0].name, memory=reading),))
    _state, actions = step(initial_state(plan), obs, plan, {plan.guards[0].name: ranking})
    return [a for a in actions if isinstance(a, Record)], [a for a in actions if isinstance(a, RunHook)]


hostile_text = st.one_of(
    comm_bytes.map(procfs.decode_name),
    st.text(min_size=1, max_size=40),
    st.sampled_from(['x\n{"event": "kill", "pid": 1}', "\x1b]0;pwned\x07", "$(reboot)", "a\\x0a"]),
)


@settings(max_examples=200)
@given(name=hostile_text, cmdline=hostile_text)
def test_hook_gets_the_name_only_as_an_environment_value_and_never_in_argv(name: str, cmdline: str) -> None:
    _records, hooks = decide_on(name, cmdline)
    assert len(hooks) == 1
    assert hooks[0].argv == ("/usr/bin/logger", "-t", "uoomd"), "the policy's argv, untouched"
    env = hook_environment(hooks[0].env)
    assert set(env) <= {"PATH"} | {k for k, _ in hooks[0].env}
    assert all(k.startswith("UOOMD_") for k in env if k != "PATH")
    if "\0" not in name:
        assert env["UOOMD_NAME"] == name, "passed verbatim, as data"
    else:
        assert "UOOMD_NAME" not in env, "a value the kernel cannot carry is dropped, not truncated"


@settings(max_examples=200)
@given(name=hostile_text, cmdline=hostile_text, fmt=st.sampled_from([LogFormat.JSON, LogFormat.CONSOLE]))
def test_every_decision_record_about_a_hostile_process_renders_as_one_clean_line(
    name: str, cmdline: str, fmt: LogFormat
) -> None:
    records, _hooks = decide_on(name, cmdline)
    assert [r.event for r in records] == ["victim_chosen"]
    out = io.StringIO()
    log = logs.configure(fmt, out)
    for record in records:
        log.warning(record.event, **record.as_dict())
    text = out.getvalue()
    assert text.count("\n") == len(records)
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in text)
    assert not any("\udc80" <= c <= "\udcff" for c in text)
    if fmt is LogFormat.JSON:
        event = json.loads(text)
        assert event["name"] == logs.escape(name)
        assert event["event"] == "victim_chosen"
        assert event["pid"] == 4321
