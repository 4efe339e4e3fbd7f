"""tests/vm/swapstats.py on synthetic samples: the figures the swap tier asserts on and tabulates."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vm import swapstats

pytestmark = pytest.mark.unit

MIB = 1 << 20


def sample(t: float, *, refault: int = 0, pswpin: int = 0, full_us: float = 0, avg10: float = 0.0) -> dict[str, Any]:
    return {
        "t": t,
        "workingset_refault_anon": refault,
        "workingset_refault_file": 0,
        "pswpin": pswpin,
        "psi_full_total": full_us,
        "psi_full_avg10": avg10,
        "psi_some_avg10": avg10,
        "MemTotal": 1000 * MIB,
        "SwapTotal": 1024 * MIB,
        "SwapFree": 1024 * MIB,
    }


def test_rates_are_per_second_between_samples_whatever_their_spacing() -> None:
    samples = [sample(0.0, refault=0), sample(0.5, refault=100), sample(2.5, refault=500)]
    assert swapstats.rates(samples, "refault") == [200.0, 200.0]


def test_window_means_average_over_the_span() -> None:
    samples = [sample(float(t), refault=r) for t, r in enumerate([0, 1000, 1000, 1000, 4000])]
    # over 2 s: (1000-0)/2, (1000-1000)/2, (4000-1000)/2
    assert swapstats.window_means(samples, "refault", 2.0) == [500.0, 0.0, 1500.0]


def test_quantile_takes_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert swapstats.quantile(values, 0.5) == 5.0
    assert swapstats.quantile(values, 0.9) == 9.0
    assert swapstats.quantile([], 0.9) == 0.0


def test_full_windows_see_200ms_of_full_stall_in_2s() -> None:
    # 150 ms of full stall a second: 300 ms in any 2 s, the desktop trigger's 200 ms crossed
    stalled = [sample(float(t), full_us=150_000 * t) for t in range(5)]
    assert swapstats.full_windows(stalled) == [False, False, True, True, True]
    assert swapstats.longest_run_s(swapstats.full_windows(stalled), stalled) == 2.0
    # 50 ms a second: 100 ms in 2 s, never
    quiet = [sample(float(t), full_us=50_000 * t) for t in range(5)]
    assert not any(swapstats.full_windows(quiet))


def _case(events: list[list[str]], **outcome: str) -> dict[str, Any]:
    return {
        "workload": "thrash",
        "t0": 100.0,
        "t1": 160.0,
        "ended": True,
        "kernel_oom_kills": 0,
        "outcome": {"pid": 42, "events": events, **outcome},
        "uoomd": [],
        "samples": [sample(100.0, pswpin=10), sample(160.0, pswpin=1010)],
    }


def test_a_handled_sigterm_then_a_sigkill_reads_as_both() -> None:
    case = _case([["START", "100.5", "42"], ["FILLED", "130.0", "1200"], ["SIGTERM", "145.0", "1200"]],
                 ExecMainCode="2", ExecMainStatus="9")  # fmt: skip
    case["uoomd"] = [{"event": "victim_chosen", "pid": 42, "mono": 144.9, "trigger": "psi[0] full 200000/2000000us"}]
    assert swapstats.signals_got(case) == ["SIGTERM", "SIGKILL"]
    assert swapstats.how_it_ended(case) == "SIGTERM by uoomd, then SIGKILL"
    assert swapstats.acted_s(case) == pytest.approx(45.0)
    assert swapstats.swap_ins(case) == 1000


def test_a_sigterm_the_hog_never_handled_is_still_uoomds() -> None:
    case = _case([["START", "100.5", "42"], ["FILLED", "130.0", "1200"]], ExecMainCode="2", ExecMainStatus="9")
    case["uoomd"] = [
        {"event": "victim_chosen", "pid": 42, "mono": 141.0, "trigger": "psi[0] full 200000/2000000us"},
        {"event": "victim_escalated", "pid": 42, "mono": 143.0, "trigger": "term_timeout"},
        {"event": "victim_exited", "pid": 42, "mono": 144.0},
    ]
    assert swapstats.how_it_ended(case) == "SIGTERM by uoomd (not handled in time), then SIGKILL"
    assert swapstats.acted_s(case) == pytest.approx(41.0)
    assert swapstats.passes_s(case) == pytest.approx(14.0)  # FILLED at 130, exited at 144


def test_the_kernel_oom_killer_is_named_as_such() -> None:
    case = _case([["START", "100.5", "42"]], ExecMainCode="2", ExecMainStatus="9")
    case["kernel_oom_kills"] = 1
    assert swapstats.how_it_ended(case) == "kernel OOM killer (1 kills)"


def test_a_victim_of_another_process_is_not_the_workloads() -> None:
    case = _case([["START", "100.5", "42"]])
    case["uoomd"] = [{"event": "victim_chosen", "pid": 7, "mono": 120.0, "trigger": "psi[1] full"}]
    assert swapstats.uoomd_victims(case) == []
    assert swapstats.trigger_index("psi[1] full 2000000/10000000us sustained 60s") == 1
    assert swapstats.trigger_index("mem_available_term") is None
