"""bench/analysis.py and bench/peers.py parsers: the crossing of the term level, summaries, the peers' output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import peers
from bench.analysis import Step, crossing, crossings, ratio, reaction, summarize

pytestmark = pytest.mark.unit

MIB = 1 << 20
TERM = 1000 * MIB


def steps_from(available_mib: list[int], *, step_s: float = 0.01, alloc_s: float = 0.004) -> list[Step]:
    """One step per entry: starts every step_s, allocates 2 MiB for alloc_s, then reads MemAvailable."""
    return [(i * step_s, i * step_s + alloc_s, 2 * (i + 1), avail * 1024) for i, avail in enumerate(available_mib)]


def test_crossing_is_interpolated_within_the_step_that_crossed() -> None:
    steps = steps_from([1004, 1002, 998, 996])
    found = crossing(steps, TERM)
    assert found is not None
    at, held = found
    # From 1002 to 998 MiB during step 2 (t 0.020..0.024): the level is halfway.
    assert at == pytest.approx(0.022)
    assert held == pytest.approx(5.0)


def test_a_first_reading_already_under_the_level_is_no_crossing() -> None:
    assert crossing(steps_from([990, 980]), TERM) is None


def test_memory_that_never_falls_under_the_level_is_no_crossing() -> None:
    assert crossing(steps_from([1010, 1008, 1006]), TERM) is None


def test_the_crossing_answered_is_the_last_fall_before_the_signal() -> None:
    # Under, back over (someone freed memory), under again; the signal comes after the second fall.
    steps = steps_from([1002, 998, 1100, 1002, 998, 996])
    assert len(crossings(steps, TERM)) == 2
    found = crossing(steps, TERM, signal_at=0.06)
    assert found is not None
    assert found[0] == pytest.approx(0.042)


def test_a_signal_before_any_crossing_gives_a_negative_latency() -> None:
    steps = steps_from([1004, 1002, 998])
    result = reaction(steps, TERM, signal_at=0.015, signal_mib=4)
    assert result is not None
    assert result.latency_ms == pytest.approx(-7.0)


def test_reaction_measures_latency_past_mib_and_the_real_rate() -> None:
    steps = steps_from([1004, 1002, 998, 996, 994])
    result = reaction(steps, TERM, signal_at=0.032, signal_mib=8)
    assert result is not None
    assert result.latency_ms == pytest.approx(10.0)
    assert result.past_mib == pytest.approx(3.0)
    # 8 MiB held at the end of step 3 (t=0.034 > signal) -> steps up to t=0.024: 6 MiB in 0.024 s.
    assert result.fill_rate_mib_s == pytest.approx(6 / 0.024)
    assert result.falls == 1


def test_no_signal_is_no_reaction() -> None:
    assert reaction(steps_from([1002, 998]), TERM, signal_at=None, signal_mib=None) is None


def test_summary_and_ratio() -> None:
    ours, theirs = summarize([3.0, 1.0, 2.0]), summarize([8.0, 4.0, 6.0, 2.0])
    assert (ours.median, ours.low, ours.high, ours.n) == (2.0, 1.0, 3.0, 3)
    assert ours.cell() == "2.0 (1.0–3.0)"
    assert ratio(ours, theirs) == "0.40×"
    empty = summarize([])
    assert math.isnan(empty.median)
    assert empty.cell() == "n/a"
    assert ratio(ours, empty) == "n/a"


def test_peer_output_parsers() -> None:
    nohang = "Found 2001 tasks with non-zero oom_score (except init and self) in 41ms\nTOP-15 tasks by badness:\n"
    assert peers.nohang_selection_ms(nohang) == [(2001, 41.0)]
    earlyoom = (
        'pid     1: badness  -1 vm_rss      -1 uid   -1 oom_score_adj   -1 ""\n'
        'pid     2: badness 666 vm_rss    1736 uid    0 oom_score_adj    0 "sleep" <--- new victim\n'
        "selecting victim took 2.572 ms\n"
    )
    assert peers.earlyoom_selection_ms(earlyoom) == [2.572]
    assert peers.earlyoom_seen(earlyoom) == [(1, ""), (2, "sleep")]
    uoomd = (
        '{"event": "victim_chosen", "pid": 7}\n'
        '{"event": "action_result", "action": "signal", "outcome": "sent", "since_reading_ms": 1.25}\n'
    )
    assert peers.uoomd_detect_to_signal_ms(uoomd) == 1.25
    assert peers.uoomd_detect_to_signal_ms('{"event": "started"}\n') is None


def test_the_shipped_policy_takes_the_benchmark_levels(tmp_path: Path) -> None:
    levels = peers.Levels(term_bytes=20 * (1 << 30), kill_bytes=18 * (1 << 30))
    policy = peers.uoomd_policy(levels, tmp_path)
    assert f'mem_available_term = "{20 * (1 << 30)}B"' in policy
    assert f'mem_available_kill = "{18 * (1 << 30)}B"' in policy
    assert 'log_format = "json"' in policy
    argv = peers.earlyoom_spec(levels).argv
    assert argv[argv.index("-M") + 1] == f"{20 * (1 << 20)},{18 * (1 << 20)}"


@pytest.mark.skipif(not peers.NOHANG_CONF.exists(), reason="nohang is not installed (bench/run.py installs it)")
def test_nohang_config_takes_the_benchmark_levels() -> None:
    levels = peers.Levels(term_bytes=20 * (1 << 30), kill_bytes=18 * (1 << 30))
    conf = peers.nohang_config(levels)
    assert "soft_threshold_min_mem = 20480.000 M" in conf
    assert "hard_threshold_min_mem = 18432.000 M" in conf
