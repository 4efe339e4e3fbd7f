"""Scenario 2 (and the peers' half of 4): a daemon guards the whole machine (guest side).

``machine.py OUT DAEMON TOKEN...``: DAEMON is uoomd, earlyoom, nohang or systemd-oomd; each
TOKEN is a case of oomcases.CASES, ``POLICY:CASE`` with POLICY ``desktop`` or ``server`` (uoomd
on that shipped policy, as shipped, loaded by a reload) or ``ratelimit`` (the default policy
with max_kills_per_minute = 1: a forking hog needs more victims than that, and the kill level
must act past the limit), ``swap``: from there on the machine has a 256 MiB swapfile plus
256 MiB of zram, or ``noswap``: swap off again. A holder service (300 MiB at oom_score_adj
1000: the kernel's own pick in the forking and two-hog cases) is protected the way each
daemon can. Cases follow each other without a pause: the kill rate limit's window carries
from one to the next, as it would on a machine in trouble.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from guestlib import Hog, Scenario, alive, mark, shipped, show, uoomd_events, use_policy, wait_until
from oomcases import CASES, run_case

HOLDER_MIB = 300
UOOMD_HOLDER_RULE = """
# vm: the holder service is protected by its cgroup, the identity a unit gives
[[rule]]
name = "vm-holder"
match = { cgroup = "^/system\\\\.slice/holder\\\\.service$" }
protect = true
"""
# Each peer's nearest equivalent of uoomd's protect rule (the holder by name or by cgroup).
EARLYOOM_ARGS = 'EARLYOOM_ARGS="-r 60 --avoid ^(holder|sshd)$"\n'
NOHANG_HOLDER = "\n@BADNESS_ADJ_RE_CGROUP_V2 -1000 /// ^/system\\.slice/holder\\.service$\n"
OOMD_DROPINS = {
    "system.slice": "[Slice]\nManagedOOMMemoryPressure=kill\nManagedOOMMemoryPressureLimit=50%\n",
    "-.slice": "[Slice]\nManagedOOMSwap=kill\n",
}
PEER_CONFIG = {
    "uoomd": "etc/uoomd.toml as shipped + a protect rule for the holder's cgroup",
    "earlyoom": EARLYOOM_ARGS.strip() + " (Debian defaults otherwise: -m 10 -s 10)",
    "nohang": "nohang.conf as shipped + " + NOHANG_HOLDER.strip(),
    "systemd-oomd": "oomd.conf as shipped; system.slice ManagedOOMMemoryPressure=kill (limit 50%), "
    "-.slice ManagedOOMSwap=kill; holder ManagedOOMPreference=omit",
}
DEFAULT_TOKENS = ("cooperative", "ignore-term", "forking", "two-hogs")
PROTECTING_POLICIES = ("default", "ratelimit")  # the ones with the holder's protect rule


def setup_swap(sc: Scenario) -> dict[str, Any]:
    """Swap on: a 256 MiB swapfile, and 256 MiB of zram (preferred) where the kernel has it."""
    if not Path("/swapfile").exists():
        sc.must("fallocate", "-l", "256M", "/swapfile")
        Path("/swapfile").chmod(0o600)
        sc.must("mkswap", "/swapfile")
    sc.must("swapon", "-p", "10", "/swapfile")
    zram: dict[str, Any] = {}
    done = sc.sh("modprobe", "zram")
    if done.returncode == 0:
        disksize = Path("/sys/block/zram0/disksize")
        if disksize.read_text().strip() == "0":
            disksize.write_text("256M")
        sc.must("mkswap", "/dev/zram0")
        sc.must("swapon", "-p", "100", "/dev/zram0")
        zram["zram"] = True
    else:
        zram["zram"] = False
        zram["zram_error"] = done.stderr.strip()
    zram["swaps"] = Path("/proc/swaps").read_text()
    return zram


def stop_swap(sc: Scenario) -> None:
    for device in ("/dev/zram0", "/swapfile"):
        if device in Path("/proc/swaps").read_text():
            sc.must("swapoff", device, timeout=600)


def start_daemon(sc: Scenario, daemon: str, policy: str) -> str:
    """Configure and start DAEMON; returns its unit."""
    if daemon == "uoomd":
        use_policy(sc, policy)
        return "uoomd.service"
    if daemon == "earlyoom":
        Path("/etc/default/earlyoom").write_text(EARLYOOM_ARGS)
        sc.must("systemctl", "start", "earlyoom")
        return "earlyoom.service"
    if daemon == "nohang":
        conf = Path("/etc/nohang/nohang.conf")
        if NOHANG_HOLDER not in conf.read_text():
            conf.write_text(conf.read_text() + NOHANG_HOLDER)
        sc.must("systemctl", "start", "nohang")
        return "nohang.service"
    if daemon == "systemd-oomd":
        for unit, text in OOMD_DROPINS.items():
            dropin = Path("/etc/systemd/system") / f"{unit}.d"
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "vm-oomd.conf").write_text(text)
        sc.must("systemctl", "daemon-reload")
        sc.must("systemctl", "start", "systemd-oomd")
        return "systemd-oomd.service"
    raise ValueError(f"unknown daemon {daemon}")


def stop_daemon(sc: Scenario, daemon: str, unit: str) -> None:
    sc.must("systemctl", "stop", unit)
    if daemon == "systemd-oomd":
        for name in OOMD_DROPINS:
            (Path("/etc/systemd/system") / f"{name}.d" / "vm-oomd.conf").unlink()
        sc.must("systemctl", "daemon-reload")


def uoomd_policy(name: str) -> str:
    """The policy a token names: default (etc/uoomd.toml + the holder rule), ratelimit (that,
    one victim a minute), or a shipped policies/NAME.toml as shipped."""
    default = shipped("etc/uoomd.toml") + UOOMD_HOLDER_RULE
    if name == "default":
        return default
    if name == "ratelimit":
        limited, count = re.subn(
            r"^max_kills_per_minute = \d+", "max_kills_per_minute = 1", default, count=1, flags=re.MULTILINE
        )
        if count != 1:
            raise RuntimeError("etc/uoomd.toml no longer sets max_kills_per_minute")
        return limited
    return shipped(f"policies/{name}.toml")


def reload_uoomd(sc: Scenario, policy: str) -> None:
    """Load another policy: SIGHUP, as `systemctl reload` would send it through `uoomd reload`,
    whose own start-up costs ~9 s under emulation (the service scenario tests that command),
    then wait for the daemon's word that the new policy is in force."""
    since = mark()
    use_policy(sc, policy, restart=False)
    sc.must("systemctl", "kill", "--kill-whom=main", "--signal=SIGHUP", "uoomd")

    def answered() -> dict[str, Any] | None:
        return next(
            (e for e in uoomd_events(since=since) if e["event"] in ("policy_reloaded", "policy_reload_failed")), None
        )

    answer = wait_until(answered, 120, 1.0)
    if answer is None or answer["event"] != "policy_reloaded":
        raise RuntimeError(f"uoomd did not apply the policy: {answer}")


def start_holder(sc: Scenario, daemon: str) -> Hog:
    # systemd-oomd's only protection: a root-owned cgroup can ask to be left out.
    props = ("ManagedOOMPreference=omit",) if daemon == "systemd-oomd" else ()
    holder = Hog(sc, "holder", "--max-mib", str(HOLDER_MIB), "--mib-per-step", "32", "--hold", "--name", "holder",
                 properties=props)  # fmt: skip
    if not wait_until(lambda: holder.got("HOLD"), 60):
        raise RuntimeError("the holder did not reach its size")
    return holder


def run_tokens(
    sc: Scenario, daemon: str, unit: str, tokens: list[str], results: list[dict[str, Any]], *, limit_s: float = 75
) -> None:
    """The cases named by ``tokens`` (see the module docstring), appended to ``results``; a
    case whose hogs are still there after ``limit_s`` is ended (and recorded as not ended)."""
    holder = start_holder(sc, daemon)
    sshd = int(show("ssh.service", "MainPID").get("MainPID", "0"))
    current_policy = "default"
    swap = Path("/proc/swaps").read_text().count("\n") > 1
    for step in tokens:
        if step == "swap":
            with sc.step("swap") as rec:
                rec.update(setup_swap(sc))
                sc.facts["swap_setup"] = rec
                swap = True
            continue
        if step == "noswap":
            with sc.step("swap off"):
                stop_swap(sc)
                swap = False
            continue
        policy_name, _, case_name = step.rpartition(":")
        policy_name = policy_name or "default"
        with sc.step(f"{daemon} {'swap' if swap else 'noswap'} {step}") as rec:
            if daemon == "uoomd" and policy_name != current_policy:
                reload_uoomd(sc, uoomd_policy(policy_name))
                current_policy = policy_name
            watch = {"holder": holder.pid, "sshd": sshd}
            result = run_case(sc, CASES[case_name], daemon_unit=unit, watch=watch, limit_s=limit_s)
            result.update(daemon=daemon, swap=swap, policy=policy_name if daemon == "uoomd" else daemon)
            # With a shipped policy nothing protects the holder: it is watched, not promised.
            result["holder_protected"] = policy_name in PROTECTING_POLICIES
            results.append(result)
            rec["ended"] = result["ended"]
            if not alive(holder.pid):  # the next cases need one: a new holder, noted
                holder.stop()
                holder = start_holder(sc, daemon)
        sc.save()
    holder.stop()


def main() -> int:
    out, daemon, *tokens = sys.argv[1:]
    sc = Scenario(Path(out))
    sc.fact("daemon", daemon)
    sc.fact("config", PEER_CONFIG[daemon])
    results: list[dict[str, Any]] = []
    sc.facts["cases"] = results
    with sc.step(f"start {daemon}") as rec:
        unit = start_daemon(sc, daemon, uoomd_policy("default"))
        if daemon != "uoomd":  # uoomd's unit is started once READY=1, after its first readings
            time.sleep(3)  # the peers' first readings
        rec["props"] = show(unit, "ActiveState", "SubState", "MainPID")
    run_tokens(sc, daemon, unit, tokens or list(DEFAULT_TOKENS), results)
    done = sc.sh("journalctl", "-b", "-u", unit, "--no-pager", "-o", "short-monotonic")
    sc.save_file("daemon-journal.txt", done.stdout)
    sc.note("scenario done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
