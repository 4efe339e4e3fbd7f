"""The metrics wired into the daemon's loop (issue 17): what a tick counts and shows, when the
textfile is written, the listener served from the loop's own poll(), a reload, and
``uoomd status --metrics``. The real Daemon on scripted memory; nothing is signalled
(tests/harness.py)."""

from __future__ import annotations

import io
import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.builders import GIB, make_plan
from tests.harness import LoopHarness, loop_harness
from uoomd.errors import SetupError
from uoomd.plan import DaemonPlan, Plan
from uoomd.results import Outcome
from uoomd.status import run_status

pytestmark = pytest.mark.unit

PLENTY = 12 * GIB  # far above every level of make_guard()
LOW = GIB  # below its term level, above its kill level
TERM = "mem_available_term"


def parse(text: str) -> dict[str, list[Sample]]:
    """Every sample by name, through prometheus_client's own text-format parser."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    [found] = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return found


def exposition(h: LoopHarness) -> dict[str, list[Sample]]:
    return parse(h.daemon.metrics.exposition().decode())


def with_metrics(*, metrics_file: str | None = None, metrics_listen: str | None = None) -> Plan:
    return make_plan(daemon=DaemonPlan(metrics_file=metrics_file, metrics_listen=metrics_listen))


def test_a_crossing_in_the_loop_moves_the_signal_counter_by_one_and_shows_the_phase(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        h.executor.answer = Outcome.SENT
        h.tick()
        before = exposition(h)
        assert value(before, "uoomd_memory_available_bytes", guard="system") == PLENTY
        assert value(before, "uoomd_guard_phase", guard="system", phase="idle") == 1
        assert value(before, "uoomd_signals_total", guard="system", signal="SIGTERM", trigger="mem_available_term") == 0
        h.set_available(LOW)
        h.tick()
        after = exposition(h)
        assert value(after, "uoomd_signals_total", guard="system", signal="SIGTERM", trigger="mem_available_term") == 1
        assert sum(s.value for s in after["uoomd_signals_total"]) == 1
        assert value(after, "uoomd_guard_phase", guard="system", phase="term_sent") == 1
        assert value(after, "uoomd_memory_available_bytes", guard="system") == LOW
        assert value(after, "uoomd_log_events_total", level="info", event="victim_chosen") == 1
        assert sum(s.value for s in after["uoomd_scan_duration_seconds_count"]) >= 1, "the crossing's scan is timed"


def test_a_failing_source_is_counted_at_every_poll_though_logged_once_per_interval(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        h.memory["system"].failure = OSError(5, "Input/output error")
        for _ in range(10):
            h.tick(1.0)
        assert len(h.events("reading_failed")) == 1
        samples = exposition(h)
        assert value(samples, "uoomd_reading_failures_total", guard="system", source="memory") == 10
        # No reading: the guard's memory gauges go rather than go stale.
        assert "uoomd_memory_available_bytes" not in samples


def test_the_textfile_waits_while_a_victim_is_in_flight_and_is_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "uoomd.prom"
    with loop_harness(with_metrics(metrics_file=str(path)), tmp_path, available_bytes=PLENTY) as h:
        h.executor.answer = Outcome.SENT
        h.tick()
        written = parse(path.read_text())
        assert value(written, "uoomd_guard_phase", guard="system", phase="idle") == 1
        h.set_available(LOW)
        h.tick(6.0)  # past metrics_interval, and a victim is in flight
        assert h.signals()
        assert parse(path.read_text()) == written, "an fsync must not stand between the loop and its SIGKILL"
        h.executor.mark_exited(h.signals()[0].target)
        h.set_available(PLENTY)
        for _ in range(3):
            h.tick(6.0)  # exited, memory back, idle: written again
        assert h.daemon.state.guard("system").victim is None
        now = parse(path.read_text())
        assert value(now, "uoomd_signals_total", guard="system", signal="SIGTERM", trigger="mem_available_term") == 1
        assert value(now, "uoomd_victims_exited_total", guard="system") == 1
    assert not path.exists(), "a clean stop leaves no file saying the last values"


def test_a_reload_moves_the_textfile_and_keeps_every_counter(tmp_path: Path) -> None:
    old, new = tmp_path / "old.prom", tmp_path / "new.prom"
    with loop_harness(with_metrics(metrics_file=str(old)), tmp_path, available_bytes=LOW) as h:
        h.executor.answer = Outcome.SENT
        h.tick()
        counted = exposition(h)
        plan = replace(h.daemon.plan, daemon=replace(h.daemon.plan.daemon, metrics_file=str(new)))
        h.daemon._apply_plan(plan)
        assert not old.exists(), "nobody would update it again"
        h.tick(61.0)  # the heartbeat writes even while the guard acts
        reloaded = parse(new.read_text())
        assert value(reloaded, "uoomd_policy_reloads_total", result="ok") == 1
        for name, samples in counted.items():
            if name.endswith("_total"):
                for s in samples:
                    assert value(reloaded, name, **s.labels) >= s.value, f"{name}{s.labels} went down"


def test_the_listener_answers_a_scrape_from_the_loops_poll_without_ending_its_sleep(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with loop_harness(with_metrics(metrics_listen=str(path)), tmp_path, available_bytes=PLENTY) as h:
        h.tick()
        assert h.events("metrics_listening")[0]["address"] == str(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            started = time.monotonic()
            h.daemon.wait(0.3)
            slept_s = time.monotonic() - started
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert body == h.daemon.metrics.exposition()
        assert slept_s >= 0.3, "a scrape needs no tick: the sleep goes on"
        assert h.daemon.listener is not None
        assert h.daemon.listener.open_connections == 0
    assert not path.exists(), "the daemon removes its own socket at close"


def test_a_listener_that_cannot_open_is_logged_the_daemon_goes_on_and_a_reload_tries_again(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    path.write_text("not a socket")
    with loop_harness(with_metrics(metrics_listen=str(path)), tmp_path, available_bytes=LOW) as h:
        [failed] = h.events("metrics_listen_failed")
        assert failed["address"] == str(path)
        assert "not a socket" in failed["error"]
        h.tick()
        assert h.signals(), "guarding goes on without the listener"
        assert path.read_text() == "not a socket", "what is not a socket is never removed"
        path.unlink()
        h.daemon._apply_plan(h.daemon.plan)
        assert h.events("metrics_listening")
        assert path.is_socket()


def test_status_metrics_prints_the_exposition_the_daemon_kept(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=LOW) as h:
        h.executor.answer = Outcome.SENT
        h.tick()
        state = tmp_path / "state.json"
        out = io.StringIO()
        assert run_status(state_file=str(state), policy_path=None, as_json=False, out=out, as_metrics=True) == 0
        signals = parse(out.getvalue())["uoomd_signals_total"]
        assert [s.value for s in signals if s.labels == {"guard": "system", "signal": "SIGTERM", "trigger": TERM}] == [
            1
        ]
        data = json.loads(state.read_text())
        data["metrics"]["uoomd_signals_total"][0][1] = -1
        state.write_text(json.dumps(data))
        with pytest.raises(SetupError, match="a counter is finite and not negative"):
            run_status(state_file=str(state), policy_path=None, as_json=False, out=io.StringIO(), as_metrics=True)
        del data["metrics"]
        state.write_text(json.dumps(data))
        with pytest.raises(SetupError, match="holds no metrics"):
            run_status(state_file=str(state), policy_path=None, as_json=False, out=io.StringIO(), as_metrics=True)


def test_a_daemon_without_metrics_settings_writes_no_file_and_listens_nowhere(tmp_path: Path) -> None:
    assert DaemonPlan().metrics_file is None
    assert DaemonPlan().metrics_listen is None
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        h.tick()
        assert h.daemon.textfile is None
        assert h.daemon.listener is None
        assert not list(tmp_path.glob("*.prom"))
