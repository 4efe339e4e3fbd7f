"""The reload outcome in the state file (issue 13), what `uoomd reload` waits on: written at once
when a reload ends, applied or refused, stamped with when its check started, so that a command
whose SIGHUP came during a check waits for the one more check the daemon runs after it.

The daemon is the real loop (tests/harness.py's scripted sources and recorded /proc); its policy
checks are fakes that answer what the policy file said when they started, as a real checker
child reads the file once it runs. Nothing is signalled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from io import StringIO
from pathlib import Path
from typing import cast

import pytest

from tests.builders import CHILDREN, GIB, make_guard, make_memory, make_plan
from tests.harness import Clock, ScriptedMemory
from uoomd.daemon import Daemon
from uoomd.errors import PolicyError, PolicyIssue
from uoomd.executor import RecordingExecutor
from uoomd.logs import configure
from uoomd.plan import Amount, GuardPlan, LogFormat, Plan
from uoomd.policy.isolated import CheckResult, PolicyCheck
from uoomd.reload_request import answer
from uoomd.sources.watch import GuardWatch
from uoomd.status import StateFile, read_state

pytestmark = pytest.mark.unit

PLENTY = 12 * GIB


@dataclass
class FakeCheck:
    """A checker child that answers what the file held when it started, once the test says it exited."""

    path: str
    result: CheckResult
    pid: int = 4242
    exited: bool = False

    def poll(self, now: float) -> CheckResult | None:
        return self.result if self.exited else None

    def fileno(self) -> int:
        return -1

    def due_in(self, now: float) -> float | None:
        return None

    def cancel(self) -> None:
        self.exited = True


@dataclass
class PolicyFile:
    """What the policy file holds now (a plan, or the error a check of it finds), and the checks started."""

    content: CheckResult
    checks: list[FakeCheck] = field(default_factory=list)
    refused: PolicyError | None = None  # not a file a child is started for (a FIFO): refused at once

    def start(self, path: str, _now: float) -> PolicyCheck:
        if self.refused is not None:
            raise self.refused
        check = FakeCheck(path=path, result=self.content)
        self.checks.append(check)
        return cast(PolicyCheck, check)


@dataclass
class Loop:
    daemon: Daemon
    clock: Clock
    policy: PolicyFile
    state_path: str

    def state(self) -> StateFile:
        return read_state(self.state_path)[0]

    def sighup(self, after_s: float = 1.0) -> float:
        """A `uoomd reload` sends SIGHUP: the time it took just before, and the loop handling it."""
        self.clock.now += after_s
        sent_at = self.clock.now
        self.clock.now += 0.01
        self.daemon.reload()
        return sent_at

    def check_exits(self, index: int, after_s: float = 1.0) -> None:
        self.clock.now += after_s
        self.policy.checks[index].exited = True
        self.daemon.reloads.poll(self.clock.now)


def plan_with_term(fraction: float, tmp_path: Path) -> Plan:
    plan = make_plan(guards=(make_guard(mem_available_term=Amount(fraction=fraction)),), source=str(tmp_path / "p"))
    return replace(plan, daemon=replace(plan.daemon, state_file=str(tmp_path / "state.json")))


@contextmanager
def loop(tmp_path: Path) -> Iterator[Loop]:
    plan = plan_with_term(0.1, tmp_path)
    memory = ScriptedMemory(make_memory(PLENTY))

    def scripted(guard: GuardPlan, _now: float) -> GuardWatch:
        return GuardWatch(guard=guard, memory=memory, pressure=None, triggers=())

    policy = PolicyFile(content=plan)
    clock = Clock()
    daemon = Daemon(
        plan,
        executor=RecordingExecutor(),
        log=configure(LogFormat.JSON, StringIO()),
        proc_root=CHILDREN,
        clock=clock,
        start_check=policy.start,
        open_sources=scripted,
    )
    daemon.open()
    daemon.announce()
    try:
        yield Loop(daemon=daemon, clock=clock, policy=policy, state_path=plan.daemon.state_file)
    finally:
        daemon.close()


def term_fraction(daemon: Daemon) -> float | None:
    return daemon.plan.guards[0].mem_available_term.fraction


def test_before_any_reload_the_state_file_says_none_yet_and_that_it_reports_them(tmp_path: Path) -> None:
    with loop(tmp_path) as h:
        state = h.state()
        assert (state.reports_reloads, state.reload) == (True, None)
        assert state.key is not None
        assert state.key.pid == state.pid


def test_an_applied_reload_is_in_the_state_file_at_once_stamped_with_its_checks_start(tmp_path: Path) -> None:
    with loop(tmp_path) as h:
        h.policy.content = plan_with_term(0.3, tmp_path)
        sent_at = h.sighup()
        assert answer(h.state(), sent_at) is None, "no answer while the check runs"
        h.check_exits(0)  # no tick in between: the loop writes it as the answer comes
        record = answer(h.state(), sent_at)
        assert record is not None
        assert (record.outcome, record.error, record.policy) == ("applied", None, str(tmp_path / "p"))
        assert record.started_at == sent_at + 0.01
        assert term_fraction(h.daemon) == 0.3


def test_a_refused_reload_says_why_and_keeps_the_previous_policy(tmp_path: Path) -> None:
    with loop(tmp_path) as h:
        h.policy.content = PolicyError("/etc/p.toml", [PolicyIssue(key="guard[0].victim", message="bad", line=3)])
        sent_at = h.sighup()
        h.check_exits(0)
        record = answer(h.state(), sent_at)
        assert record is not None
        assert (record.outcome, record.error) == ("refused", "/etc/p.toml:3: guard[0].victim: bad")
        assert term_fraction(h.daemon) == 0.1


def test_a_file_refused_without_a_check_is_answered_at_once(tmp_path: Path) -> None:
    with loop(tmp_path) as h:
        path = str(tmp_path / "p")
        h.policy.refused = PolicyError(path, [PolicyIssue(key="", message="not a regular file (a FIFO)")])
        sent_at = h.sighup()
        record = answer(h.state(), sent_at)
        assert record is not None
        assert record.outcome == "refused"
        assert record.error == f"{path}: not a regular file (a FIFO)"
        assert h.policy.checks == []


def test_a_sighup_during_a_check_is_answered_by_the_check_after_it_not_by_the_one_running(tmp_path: Path) -> None:
    with loop(tmp_path) as h:
        h.policy.content = plan_with_term(0.2, tmp_path)
        first = h.sighup()  # check 0 starts: it reads term 20%
        h.policy.content = plan_with_term(0.4, tmp_path)  # edited while check 0 runs
        second = h.sighup()  # coalesced: check 0 runs on, one more check follows
        h.check_exits(0)
        assert term_fraction(h.daemon) == 0.2
        record = answer(h.state(), first)
        assert record is not None, "the first command's answer"
        assert record.outcome == "applied"
        assert answer(h.state(), second) is None, "check 0 may have read the file before the edit"
        assert len(h.policy.checks) == 2, "one more check, started after check 0 answered"
        h.check_exits(1)
        record = answer(h.state(), second)
        assert record is not None
        assert record.outcome == "applied"
        assert term_fraction(h.daemon) == 0.4, "the edit the second SIGHUP announced is in force"
        # The first command, had it been slower to read, takes the latest answer: the policy in force.
        assert answer(h.state(), first) == record
