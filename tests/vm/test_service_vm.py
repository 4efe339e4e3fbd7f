"""Scenario 1 in a VM: uoomd installed as an admin would, run by a real systemd 252 (vm/scenarios/service.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.vm.tier import ScenarioRun, VmEnv, service_boot

pytestmark = pytest.mark.vm
VM_SCENARIOS = ("service",)


@pytest.fixture(scope="module")
def service(vm_env: VmEnv) -> ScenarioRun:
    return service_boot(vm_env)


def _step_ok(run: ScenarioRun, name: str) -> None:
    errors = run.step_errors()
    assert name not in errors, f"step {name!r} failed in the guest: {errors[name]}; {run.where()}"


def test_install_unit_left_a_venv_a_unit_and_the_default_policy(service: ScenarioRun) -> None:
    _step_ok(service, "admin install")
    install = service.fact("install")
    assert install["unit_exec_start"] == ["ExecStart=/opt/uoomd/bin/uoomd run --policy /etc/uoomd/uoomd.toml"], install
    assert install["unit_exec_start_pre"] == [], install  # the daemon checks its policy itself, once
    assert install["policy_is_default"], install
    assert install["uoomd_version"].startswith("uoomd "), install
    assert install["enabled_before"] == "disabled", install  # enabling is the admin's next step
    kinds = {line.split()[0] for line in install["manifest"]}
    assert {"venv", "unit", "policy"} <= kinds, install["manifest"]


def test_enable_now_counts_the_unit_started_only_after_ready(service: ScenarioRun) -> None:
    _step_ok(service, "enable --now")
    enable = service.fact("enable")
    props = enable["props"]
    assert enable["rc"] == 0, enable
    assert (props["ActiveState"], props["SubState"], props["Type"]) == ("active", "running", "notify"), props
    # uoomd logs `started` right before READY=1 (daemon.run): systemd entered `active` after it,
    # and only once the interpreter, the policy and the first readings were done after exec.
    started = enable["started_event_mono"]
    assert started is not None, "no `started` line from uoomd in the journal"
    assert enable["active_enter_mono"] >= started - 0.05, enable  # journald stamps the line on receipt
    assert enable["active_enter_mono"] - enable["exec_start_mono"] > 0.2, enable
    print(f"`systemctl enable --now uoomd`: {enable['returned'] - enable['called']:.1f} s under emulation")


def test_systemctl_status_shows_the_status_line_and_the_name(service: ScenarioRun) -> None:
    text = service.text("systemctl-status.txt")
    assert "uoomd.service - uoomd, a policy-driven userspace OOM killer" in text, text
    assert re.search(r"Main PID: \d+ \(uoomd\)", text), text
    assert re.search(r"Status: \"mem \d+% avail", text), text


def test_main_process_has_exactly_the_units_capabilities(service: ScenarioRun) -> None:
    _step_ok(service, "main process")
    proc = service.fact("process")
    caps, unit_caps = proc["caps"], {name.upper() for name in proc["unit_caps"]}
    assert set(caps["CapBnd"]) == unit_caps, (caps, unit_caps)
    assert set(caps["CapEff"]) == unit_caps, caps
    assert set(caps["CapPrm"]) == unit_caps, caps
    assert caps["CapAmb"] == [], caps
    assert proc["NoNewPrivs"] == "1", proc


def test_main_process_is_unkillable_by_the_kernel_and_locked_in_memory(service: ScenarioRun) -> None:
    proc = service.fact("process")
    assert proc["oom_score_adj"] == -1000, proc
    locked_kib = int(proc["VmLck"].split()[0])
    rss_kib = int(proc["VmRSS"].split()[0])
    assert locked_kib >= 0.9 * rss_kib > 0, proc  # mlockall(MCL_CURRENT | MCL_FUTURE)
    protected = service.fact("enable")["self_protected"]
    assert protected is not None
    assert protected["mlocked"] is True, protected


def test_systemd_analyze_security_is_saved(service: ScenarioRun) -> None:
    security = service.fact("security")
    assert service.text("systemd-analyze-security.txt"), "no systemd-analyze security output"
    assert security["exposure"] is not None, security
    print(
        f"systemd-analyze security uoomd.service (installed, systemd 252): {security['exposure']} {security['verdict']}"
    )
    assert security["exposure"] <= 3.0, security  # README: 2.5 OK offline; the installed unit must not be worse


def _good_reloads(service: ScenarioRun) -> list[dict[str, Any]]:
    _step_ok(service, "reload good")
    tries: list[dict[str, Any]] = service.fact("reload_good")
    assert tries, "no reload was tried"
    return tries


def test_a_good_reload_applies_the_new_policy(service: ScenarioRun) -> None:
    for attempt in _good_reloads(service):
        assert attempt["rc"] == 0, attempt
        assert attempt["reloaded_mono"] is not None, f"no policy_reloaded for {attempt['guard']}: {attempt}"


# With `ExecReload=/bin/kill -HUP $MAINPID` systemd 252 waited for READY=1 only when uoomd's
# RELOADING=1 reached it before kill had exited: 1 of 5 tries lost that race in the first VM
# run (the policy in force 19 s after `systemctl reload` returned). The waiting ExecReload
# (`uoomd reload --pid $MAINPID`) returns once the reload is done.
def test_the_new_policy_is_in_force_when_systemctl_reload_returns(service: ScenarioRun) -> None:
    tries = _good_reloads(service)
    late = [t for t in tries if not t.get("in_force_at_return")]
    lags = ", ".join(f"{t.get('applied_after_return_s')} s" for t in tries)
    print(f"reload applied after `systemctl reload` returned, per try: {lags}")
    assert not late, f"{len(late)} of {len(tries)} reloads returned before the policy was in force ({lags})"


def test_a_bad_reload_is_logged_and_the_old_policy_keeps_guarding(service: ScenarioRun) -> None:
    _step_ok(service, "reload bad")
    bad = service.fact("reload_bad")
    good = service.fact("reload_good")
    assert bad["failed_event"] is not None, bad
    assert "nmae" in bad["failed_event"]["error"], bad["failed_event"]
    assert bad["props_after"]["ActiveState"] == "active", bad
    last_good = next(t["guard"] for t in reversed(good) if t["reloaded_mono"] is not None)
    assert bad["state_guards_after"] == [last_good], bad


# `kill -HUP` succeeded whatever the daemon made of the policy; the waiting ExecReload
# exits non-zero when the daemon kept the old policy.
def test_a_bad_reload_fails_the_systemctl_command(service: ScenarioRun) -> None:
    bad = service.fact("reload_bad")
    assert bad["rc"] != 0, f"`systemctl reload` with a bad policy exited {bad['rc']}: the failure is only in the log"


def test_the_watchdog_restarts_a_stopped_daemon(service: ScenarioRun) -> None:
    _step_ok(service, "watchdog")
    dog = service.fact("watchdog")
    assert dog["restart_s"] is not None, dog
    assert dog["old_pid_gone"], dog
    after = dog["props_after"]
    assert int(after["NRestarts"]) > dog["restarts_before"], dog
    assert any("Watchdog timeout" in line for line in dog["systemd_lines"]), dog["systemd_lines"]
    print(f"watchdog restart after SIGSTOP: {dog['restart_s']} s")


def test_the_restarted_daemon_stops_a_hog_before_the_kernel(service: ScenarioRun) -> None:
    _step_ok(service, "hog after the watchdog restart")
    after = service.fact("guards_after_restart")
    hog = after["hog"]
    assert after["ended"], after
    assert after["kernel_oom_kills"] == 0, after
    chosen = [v for v in after["victims"] if v["pid"] == hog["pid"]]
    assert chosen, f"uoomd chose {after['victims']}, not the hog {hog['pid']}"
    assert int(chosen[0]["journal_pid"]) == after["daemon_pid"], after
    # SIGTERM first; a hog growing fast may be past the kill level before its handler runs.
    got_term = any(e[0] == "SIGTERM" for e in hog["events"])
    assert got_term or (hog["ExecMainCode"], hog["ExecMainStatus"]) == ("2", "9"), hog
