"""The VM tier's shared parts: the environment (image, root disk) and the boots, each run once a session.

Scenarios 1 and 3 share a boot (2 GiB), as do 2 and 4 (1 GiB): BOOT_PLANS. A boot's results
stay in ``$UOOMD_VM_CACHE/runs/SESSION/BOOT/SCENARIO`` (``.../SCENARIO-ARGS`` for one booted
alone by run_scenario; default cache ``~/.cache/uoomd-vm``; the last few sessions are kept) for
reading after a failure: facts.json, run.log, commands.log; and per boot journal.txt,
dmesg.txt, console.log.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from vm.boot import BootResult, boot
from vm.image import Image
from vm.payload import build_payload, build_suite_payload

TIMINGS: dict[str, float] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class VmEnv:
    image: Image
    root: Path  # the root disk: the image with uoomd installed by packaging/install-unit
    runs: Path


@dataclass(slots=True, kw_only=True)
class ScenarioRun:
    """One boot's outcome: the BootResult and the guest's facts.json."""

    name: str
    boot: BootResult
    facts: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.boot.describe()}; results {self.boot.results}"

    def step_errors(self) -> dict[str, str]:
        return {s["name"]: s["error"] for s in self.facts.get("steps", []) if "error" in s}

    def fact(self, key: str) -> Any:
        """A recorded fact; fails the test, naming the boot, when the guest did not record it."""
        if key not in self.facts:
            pytest.fail(f"{self.name}: no {key!r} in facts.json (step errors {self.step_errors()}); {self.where()}")
        return self.facts[key]

    def text(self, name: str) -> str:
        path = self.boot.results / name
        return path.read_text(errors="replace") if path.exists() else ""


_BOOTS: dict[str, ScenarioRun] = {}
KEPT_SESSIONS = 4


def session_runs(runs: Path) -> Path:
    """This session's own results directory (two pytest sessions never share one), the
    oldest sessions' removed."""
    runs.mkdir(parents=True, exist_ok=True)
    mine = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    mine.mkdir()
    for old in sorted(p for p in runs.iterdir() if p.is_dir())[:-KEPT_SESSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    return mine


def run_scenario(
    env: VmEnv, name: str, *, args: tuple[str, ...] = (), timeout_s: float = 900, memory_mib: int = 1024
) -> ScenarioRun:
    """Boot once on vm/scenarios/NAME.py ARGS alone (cached for the session: several tests read one boot)."""
    key = " ".join((name, *args))
    if key in _BOOTS:
        return _checked(_BOOTS[key])
    work = env.runs / "-".join((name, *args))
    shutil.rmtree(work, ignore_errors=True)
    payload = build_payload(name, args=args)
    result = boot(env.image, env.root, payload, work, timeout_s=timeout_s, memory_mib=memory_mib)
    TIMINGS[f"boot {key} s"] = result.elapsed_s
    TIMINGS[f"waited to boot {key} s"] = result.waited_s
    _BOOTS[key] = _scenario_run(key, result)
    return _checked(_BOOTS[key])


@dataclass(frozen=True, slots=True, kw_only=True)
class Planned:
    """A scenario as a shared boot runs it: vm/scenarios/NAME.py ARGS within ``limit_s`` of guest time."""

    name: str
    args: tuple[str, ...] = ()
    limit_s: float = 600

    @property
    def key(self) -> str:
        return " ".join((self.name, *self.args))


@dataclass(frozen=True, slots=True, kw_only=True)
class BootPlan:
    """Scenarios that share one boot, in this order: each boot costs ~30 s of emulated start-up
    (kernel, systemd, the runner's interpreter) and a results round trip."""

    name: str
    memory_mib: int
    scenarios: tuple[Planned, ...]


# Scenario names the selected tests read (tests/vm/conftest.py fills it at collection from each
# module's VM_SCENARIOS): a shared boot runs only those, so one test module boots only its own.
WANTED: set[str] = set()


def planned_run(env: VmEnv, planned: Planned) -> ScenarioRun:
    """The run of ``planned``, booting its BootPlan (the wanted scenarios of it) the first time."""
    if planned.key not in _BOOTS:
        plan = next(p for p in BOOT_PLANS if planned in p.scenarios)
        members = tuple(s for s in plan.scenarios if s == planned or s.name in WANTED)
        work = env.runs / plan.name
        shutil.rmtree(work, ignore_errors=True)
        payload = build_suite_payload([(s.name, s.args, s.limit_s) for s in members])
        # The guest stops each scenario at its limit; the boot's own limit leaves time for the
        # start-up before them and the results after (boot.py takes 120 s off for that).
        timeout_s = sum(s.limit_s for s in members) + 240
        result = boot(env.image, env.root, payload, work, timeout_s=timeout_s, memory_mib=plan.memory_mib)
        TIMINGS[f"boot {plan.name} ({' + '.join(s.name for s in members)}) s"] = result.elapsed_s
        TIMINGS[f"waited to boot {plan.name} s"] = result.waited_s
        for member in members:
            results = result.results / member.name
            own = replace(result, results=results, rc=_read_rc(results) if result.rc is not None else None)
            _BOOTS[member.key] = _scenario_run(member.key, own)
    return _checked(_BOOTS[planned.key])


def _read_rc(results: Path) -> int | None:
    try:
        return int((results / "rc").read_text().strip())
    except (OSError, ValueError):
        return None


def _scenario_run(key: str, result: BootResult) -> ScenarioRun:
    facts_path = result.results / "facts.json"
    facts: dict[str, Any] = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    return ScenarioRun(name=key, boot=result, facts=facts)


def _checked(run: ScenarioRun) -> ScenarioRun:
    if run.boot.rc is None:
        pytest.fail(f"{run.name}: no results came back; {run.where()}\n{_tail(run.boot.console)}")
    return run


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# Scenario 2's cases, in boot order (vm/scenarios/machine.py): the default policy without swap,
# then with swap (swapfile + zram), then without swap again for the shipped policies as shipped
# (each loaded by a reload) and a forking hog over a 1-a-minute kill rate limit.
MACHINE_NOSWAP = ("cooperative", "ignore-term", "forking", "two-hogs")
MACHINE_SWAP = ("cooperative", "ignore-term", "forking")
MACHINE_POLICIES = ("desktop:cooperative", "server:cooperative", "ratelimit:forking")
PEER_DAEMONS = ("earlyoom", "nohang", "systemd-oomd")

SERVICE = Planned(name="service", limit_s=420)
# The live oom_score test's children hold 1000 MiB (tests/children.py): this boot has 2 GiB, and
# the cgroup guards' levels are their cgroups' limits, not the machine's.
CGROUP = Planned(name="cgroup", args=("uoomd",), limit_s=420)
MACHINE = Planned(
    name="machine", args=("uoomd", *MACHINE_NOSWAP, "swap", *MACHINE_SWAP, "noswap", *MACHINE_POLICIES), limit_s=600
)
PEERS = Planned(name="peers", args=PEER_DAEMONS, limit_s=900)
BOOT_PLANS = (
    BootPlan(name="systemd", memory_mib=2048, scenarios=(SERVICE, CGROUP)),
    # Whole-machine cases need the machine's RAM to be what runs out: 1 GiB fills in ~8 s.
    BootPlan(name="machine", memory_mib=1024, scenarios=(MACHINE, PEERS)),
)


def service_boot(env: VmEnv) -> ScenarioRun:
    """Scenario 1: uoomd installed as an admin would, under systemd."""
    return planned_run(env, SERVICE)


def machine_boot(env: VmEnv) -> ScenarioRun:
    """Scenario 2: the cases without swap, with swap (swapfile + zram), the shipped policies."""
    return planned_run(env, MACHINE)


def cgroup_boot(env: VmEnv) -> ScenarioRun:
    """Scenario 3: test.slice, a guarded service, a PSI-only case, the live oom_score test."""
    return planned_run(env, CGROUP)


def peers_boot(env: VmEnv) -> ScenarioRun:
    """Scenario 4: earlyoom, nohang and systemd-oomd on the cases of scenarios 2 and 3."""
    return planned_run(env, PEERS)
