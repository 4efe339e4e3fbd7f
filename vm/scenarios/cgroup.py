"""Scenario 3 (and the peers' other half of 4): cgroup v2 guards under systemd (guest side).

``cgroup.py OUT DAEMON [PART...]``, PART among: ``process`` (a hog in test.slice, MemoryMax
400M, guarded by scope "cgroup:/sys/fs/cgroup/test.slice", victim process, a bystander beside
it), ``service`` (svc.service, MemoryMax 200M, victim cgroup: cgroup.kill; Restart=always
recreates its cgroup and the guard must stop the next hog too), ``psi`` (psi.service held at
MemoryHigh: the memory stays under every level, only the PSI trigger can act), and ``live``
(the repo's live oom_score test, as root with CAP_SYS_RESOURCE). DAEMON is uoomd or a peer.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guestlib import (
    HOGS,
    POLICY,
    RECORDS,
    REPO,
    UOOMD,
    Hog,
    Scenario,
    mark,
    show,
    uoomd_events,
    use_policy,
    wait_until,
)
from machine import start_daemon
from oomcases import CASES, Case, memcg_oom_kills, run_case

SLICE = Path("/sys/fs/cgroup/test.slice")
UNITS = Path("/etc/systemd/system")
TEST_VENV_PYTHON = "/opt/uoomd-vmtest/bin/python"
START_EVENTS = ("started", "scope_gone", "scope_back", "psi_trigger_armed", "psi_unavailable")
SLOW = ("--mib-per-step", "8", "--interval-ms", "100", "--max-mib", "4000", "--hold")

CGROUP_POLICY = """
[daemon]
poll_max = "1s"
log_format = "json"

[escalation]
term_timeout = "5s"
kill_timeout = "3s"
max_kills_per_minute = 30

[[guard]]
name = "slice"
scope = "cgroup:/sys/fs/cgroup/test.slice"
mem_available_term = "20%"
mem_available_kill = "10%"
victim = "process"
  [[guard.psi]]
  kind = "some"
  stall = "100ms"
  window = "1s"
  sustain = "0s"
  action = "warn"

[[guard]]
name = "svc"
scope = "cgroup:/sys/fs/cgroup/test.slice/svc.service"
mem_available_term = "25%"
mem_available_kill = "12%"
victim = "cgroup"

[[guard]]
name = "psi"
scope = "cgroup:/sys/fs/cgroup/test.slice/psi.service"
mem_available_term = "2%"
mem_available_kill = "1%"
psi_mem_gate = "100%"
victim = "process"
  [[guard.psi]]
  kind = "some"
  stall = "150ms"
  window = "1s"
  sustain = "2s"
  action = "term"
"""

SLICE_UNIT = "[Slice]\nMemoryMax=400M\nMemorySwapMax=0\n"
# A service that runs a hog from its start; systemd restarts it (svc) or not (psi).
SERVICE_UNIT = """[Unit]
Description=vm: a hog service

[Service]
Slice=test.slice
MemoryMax={max}
{extra}
ExecStart={python} {hogs} --record {record} --name {name} {grow}
Restart={restart}
RestartSec=2
"""


def write_units(daemon: str) -> None:
    oomd = "ManagedOOMMemoryPressure=kill\nManagedOOMMemoryPressureLimit=20%\n" if daemon == "systemd-oomd" else ""
    (UNITS / "test.slice").write_text(SLICE_UNIT + oomd)
    common = {"python": sys.executable, "hogs": HOGS}
    (UNITS / "svc.service").write_text(
        SERVICE_UNIT.format(
            max="200M", extra="", record=RECORDS / "svc", name="svchog",
            grow=" ".join(("--fork", "2", *SLOW)), restart="always", **common,
        )
    )  # fmt: skip
    (UNITS / "psi.service").write_text(
        SERVICE_UNIT.format(
            max="300M", extra="MemoryHigh=100M", record=RECORDS / "psi", name="psihog",
            grow=" ".join(SLOW), restart="no", **common,
        )
    )  # fmt: skip


def memcg_events(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in (path / "memory.events").read_text().splitlines())}
    except OSError:
        return {}


def part_process(sc: Scenario, unit: str) -> dict[str, Any]:
    bystander = Hog(sc, "cg-bystander", "--max-mib", "40", "--hold", "--adj", "0", "--name", "cgbystander",
                    slice_name="test.slice")  # fmt: skip
    wait_until(lambda: bystander.got("HOLD"), 60)
    case = Case(name="process", hogs=(("cg-hog", ("--name", "cghog")),))
    record = run_case(
        sc, case, daemon_unit=unit, watch={"bystander": bystander.pid}, slice_name="test.slice", cgroup=str(SLICE)
    )
    bystander.stop()
    return record


def part_service(sc: Scenario, unit: str) -> dict[str, Any]:
    RECORDS.mkdir(parents=True, exist_ok=True)
    cg = SLICE / "svc.service"
    slice0 = memcg_oom_kills(str(SLICE))
    since = mark()
    # Its cgroup appears with it, after uoomd started: the guard waits for it (scope_back).
    sc.must("systemctl", "start", "svc.service")
    pids: list[str] = []

    def restarts() -> int:
        return int(show("svc.service", "NRestarts").get("NRestarts", "0"))

    def two_kills_and_back() -> bool:
        pid = show("svc.service", "MainPID").get("MainPID", "0")
        if pid != "0" and pid not in pids:
            pids.append(pid)
        return restarts() >= 2 and show("svc.service", "ActiveState")["ActiveState"] == "active"

    t0 = time.monotonic()
    back = bool(wait_until(two_kills_and_back, 240, 0.5))
    took = time.monotonic() - t0
    restarted = restarts()  # before the stop below, which starts the count again
    events_at_stop = memcg_events(cg)
    sc.must("systemctl", "stop", "svc.service")
    record: dict[str, Any] = {
        "case": "service",
        "restarted_twice": back,
        "s": round(took, 1),
        "main_pids": pids,
        "restarts": restarted,
        "slice_memcg_oom_kills": memcg_oom_kills(str(SLICE)) - slice0,
        "svc_memory_events_at_stop": events_at_stop,
        "service_result": show("svc.service", "Result")["Result"],
    }
    if unit == "uoomd.service":
        record["uoomd"] = [
            {k: e.get(k) for k in ("event", "guard", "pid", "name", "action", "trigger", "outcome", "cgroup", "psi")}
            for e in uoomd_events(since=since)
            if e["event"] in ("victim_chosen", "action_result", "scope_gone", "scope_back", "psi_trigger_armed")
        ]
    sc.note(f"service part: restarted twice {back} in {took:.1f} s")
    return record


def part_psi(sc: Scenario, unit: str) -> dict[str, Any]:
    since = mark()
    psi_cg = SLICE / "psi.service"
    sc.must("systemctl", "start", "psi.service")

    seen: dict[str, Any] = {"peak_mib": 0, "events": {}}

    def ended() -> bool:
        # The cgroup goes with the service: sample its memory while it is there.
        events = memcg_events(psi_cg)
        if events:
            seen["events"] = events
        try:
            current = int((psi_cg / "memory.current").read_text())
        except (OSError, ValueError):
            current = 0
        seen["peak_mib"] = max(seen["peak_mib"], current >> 20)
        return show("psi.service", "ActiveState")["ActiveState"] in ("inactive", "failed")

    done = bool(wait_until(ended, 180, 0.5))
    events = [line.split() for line in (RECORDS / "psi").read_text().splitlines()] if (RECORDS / "psi").exists() else []
    record: dict[str, Any] = {
        "case": "psi",
        "ended": done,
        "hog_events": events,
        "memory_events": seen["events"],
        "peak_mib": seen["peak_mib"],
        "result": show("psi.service", "Result", "ExecMainCode", "ExecMainStatus"),
        "slice_memcg_oom_kills": memcg_oom_kills(str(SLICE)),
    }
    sc.must("systemctl", "stop", "psi.service")
    if unit == "uoomd.service":
        record["uoomd"] = [
            e
            for e in uoomd_events(since=since)
            if e["event"] in ("victim_chosen", "trigger_fired", "psi_trigger_armed", "scope_back", "action_result")
        ]
    return record


def part_live(sc: Scenario) -> dict[str, Any]:
    junit = sc.out / "oom_score_live.xml"
    argv = [TEST_VENV_PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", f"--junitxml={junit}"]
    argv.append("tests/integration/test_oom_score_live.py")
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    sc.save_file("oom_score_live.txt", done.stdout + done.stderr)
    return {"case": "live", "rc": done.returncode, "s": round(time.monotonic() - t0, 1), "tail": done.stdout[-3000:]}


def prepare(sc: Scenario, daemon: str) -> None:
    """test.slice as DAEMON needs it (systemd-oomd: ManagedOOM on the slice), started; the
    services in it are started by their parts."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    write_units(daemon)
    sc.must("systemctl", "daemon-reload")
    sc.must("systemctl", "restart", "test.slice")
    if not wait_until(SLICE.is_dir, 30):
        raise RuntimeError(f"{SLICE} did not appear after `systemctl restart test.slice`")


def check_before_the_slice(sc: Scenario) -> None:
    """`uoomd check` on a policy whose cgroups are not there yet: warnings, exit 0."""
    with sc.step("uoomd check before the slice exists") as rec:
        POLICY.write_text(CGROUP_POLICY)
        rec["slice_existed"] = SLICE.exists()
        done = sc.sh(UOOMD, "check", POLICY, timeout=120)
        rec.update(rc=done.returncode, stdout=done.stdout[-3000:], stderr=done.stderr[-3000:])
        sc.facts["check"] = rec


def start_uoomd_before_the_slice(sc: Scenario) -> None:
    """uoomd first, on guards whose cgroups do not exist yet (scope_gone), then the slice
    (scope_back): a slice that systemd creates only when it starts, after uoomd."""
    with sc.step("start uoomd") as rec:
        since = mark()
        rec["slice_existed"] = SLICE.exists()
        use_policy(sc, CGROUP_POLICY)
        rec["props"] = show("uoomd.service", "ActiveState", "SubState", "MainPID")
        rec["events"] = [e for e in uoomd_events(since=since) if e["event"] in START_EVENTS]
        sc.facts["start"] = rec
    with sc.step("the slice appears") as rec:
        since = mark()
        prepare(sc, "uoomd")

        def back() -> list[dict[str, Any]]:
            return [e for e in uoomd_events(since=since) if e["event"] == "scope_back" and e.get("guard") == "slice"]

        rec["scope_back"] = wait_until(back, 30, 0.5) or []
        sc.facts["slice_appeared"] = rec


def main() -> int:
    out, daemon, *parts = sys.argv[1:]
    sc = Scenario(Path(out))
    sc.fact("daemon", daemon)
    parts = parts or ["process", "service", "psi", "live"]
    results: list[dict[str, Any]] = []
    sc.facts["parts"] = results
    if daemon == "uoomd":
        unit = "uoomd.service"
        check_before_the_slice(sc)
        start_uoomd_before_the_slice(sc)
    else:
        prepare(sc, daemon)
        with sc.step(f"start {daemon}") as rec:
            unit = start_daemon(sc, daemon, "")
            time.sleep(3)
            rec["props"] = show(unit, "ActiveState", "SubState", "MainPID")
            sc.facts["start"] = rec
    for part in parts:
        with sc.step(f"part {part}"):
            if part == "process":
                results.append(part_process(sc, unit))
            elif part == "service":
                results.append(part_service(sc, unit))
            elif part == "psi":
                results.append(part_psi(sc, unit))
            elif part == "live":
                results.append(part_live(sc))
            elif part in CASES:
                results.append(run_case(sc, CASES[part], daemon_unit=unit, watch={}, slice_name="test.slice"))
        sc.save()
    sc.note("scenario done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
