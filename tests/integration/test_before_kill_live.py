"""A before_kill hook on the live executor: its own timeout, and a real child's SIGTERM held until the hook exits."""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path

import pytest

from tests.builders import make_key
from uoomd.actions import HoldForHook, RunHook, SendSignal
from uoomd.carrier import Carrier
from uoomd.decision import SIGTERM
from uoomd.executor import LiveExecutor
from uoomd.logs import configure
from uoomd.plan import LogFormat, VictimKind
from uoomd.results import ActionResult, Outcome
from uoomd.sources.procfs import read_stat
from uoomd.statusboard import Recent

pytestmark = pytest.mark.integration


def test_a_hook_with_its_own_timeout_is_killed_then_not_at_the_executors() -> None:
    executor = LiveExecutor(hook_timeout_s=30.0)
    try:
        start = time.monotonic()
        started = executor.execute(RunHook(guard="test", argv=("sleep", "30"), env=(), timeout_s=0.3))
        assert started.outcome is Outcome.STARTED
        deadline = executor.hooks.next_deadline()
        assert deadline is not None
        assert deadline - start < 1.0
        results: tuple[ActionResult, ...] = ()
        while not results:
            assert time.monotonic() - start < 10, "the 0.3 s hook outlived its timeout"
            time.sleep(0.02)
            results = executor.poll()
        (result,) = results
        assert result.outcome is Outcome.TIMED_OUT
        assert result.detail("timeout_s") == 0.3
    finally:
        executor.close()


def test_the_live_carrier_holds_a_real_childs_sigterm_until_the_real_hook_exits(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    victim = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: Path("/proc/self/oom_score_adj").write_text("1000"))  # noqa: PLW1509
    stat = read_stat("/proc", victim.pid)
    assert stat is not None
    target = make_key(victim.pid, stat.starttime_ticks)
    sigterm = SendSignal(
        guard="test",
        target=target,
        signal=SIGTERM,
        victim_kind=VictimKind.PROCESS,
        pgid=victim.pid,
        cgroup=None,
        dry_run=False,
    )
    hook = RunHook(guard="test", argv=("/bin/sh", "-c", f'sleep 0.3; touch "{marker}"'), env=(), timeout_s=3.0)
    executor = LiveExecutor()
    out = io.StringIO()
    carrier = Carrier(
        executor=executor,
        log=configure(LogFormat.JSON, out),
        recent=Recent(),
        clock=time.monotonic,
        forget=lambda _k: None,
    )
    try:
        carrier.carry_out([HoldForHook(guard="test", hook=hook, then=(sigterm,))], tick_at=time.monotonic())
        assert "signal_held" in out.getvalue()
        start = time.monotonic()
        while "signal_released" not in out.getvalue():
            assert time.monotonic() - start < 10
            assert victim.poll() is None, "the victim was signalled while its hook ran"
            carrier.poll(time.monotonic(), in_flight=frozenset({target}))
            time.sleep(0.01)
        assert marker.exists(), "released before the hook had done its work"
        assert '"reason": "hook_exited"' in out.getvalue()
        assert victim.wait(10) == -SIGTERM
    finally:
        carrier.close()
        executor.close()
        if victim.poll() is None:
            victim.kill()
            victim.wait()
