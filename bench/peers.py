"""The daemons under test: find or install them, build their command lines and configs for levels, read their output.

All three get the same two levels (SIGTERM below ``term_bytes`` of MemAvailable, SIGKILL
below ``kill_bytes``) and otherwise run as their packages ship them: earlyoom with Debian's
``-r 3600`` (/etc/default/earlyoom), nohang with /etc/nohang/nohang.conf, uoomd with
etc/uoomd.toml. No prefer/avoid options: the PID namespace, not an option, is what confines
them (bench/sandbox.py), and a regex per process would only add work to their kill paths.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_POLICY = ROOT / "etc" / "uoomd.toml"
NOHANG = Path("/usr/sbin/nohang")
NOHANG_CONF = Path("/etc/nohang/nohang.conf")
EARLYOOM = Path("/usr/bin/earlyoom")
# Debian's /etc/default/earlyoom: the arguments a packaged earlyoom runs with.
EARLYOOM_PACKAGED_ARGS = ("-r", "3600")
# nohang refuses a soft or hard memory threshold above 50% of MemTotal (a config check in
# calculate_percent()); the benchmark's levels sit ~1.5 GiB under what is available now,
# far above that on a mostly idle machine. The bench runs a copy with only that check relaxed.
NOHANG_HALF_CHECK = "if mem_min_kb > mem_total * 0.5 or mem_min_kb < 0:"
NOHANG_RELAXED_CHECK = "if mem_min_kb < 0:"

NAMES = ("uoomd", "earlyoom", "nohang")


@dataclass(frozen=True, slots=True, kw_only=True)
class Levels:
    """The MemAvailable levels every daemon gets, in bytes."""

    term_bytes: int
    kill_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSpec:
    """How to start one daemon and how to tell from its output that it is watching."""

    name: str
    argv: tuple[str, ...]
    ready_marker: str
    env: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""


# --- install and versions -------------------------------------------------------------------


def ensure_installed() -> list[str]:
    """Install Debian's earlyoom and nohang when missing; returns what was done."""
    missing = [pkg for pkg, path in (("earlyoom", EARLYOOM), ("nohang", NOHANG)) if not path.exists()]
    if not missing:
        return []
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(f"{', '.join(missing)} missing and no apt-get: install them by hand")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if subprocess.run([apt, "install", "-y", *missing], env=env, check=False).returncode != 0:
        subprocess.run([apt, "update"], env=env, check=True)
        subprocess.run([apt, "install", "-y", *missing], env=env, check=True)
    # Debian starts the packaged services on install: they would watch the whole machine
    # beside the benchmark. Stop them through systemd (never by signalling a PID we did not start).
    systemctl = shutil.which("systemctl")
    for unit in missing:
        if systemctl is not None:
            subprocess.run([systemctl, "stop", f"{unit}.service"], check=False, capture_output=True)
    return [f"apt-get install -y {' '.join(missing)}"]


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def versions() -> dict[str, str]:
    def dpkg(pkg: str) -> str:
        return _first_line(["dpkg-query", "-W", "-f", "${Version}", pkg])

    return {
        "uoomd": _first_line([sys.executable, "-m", "uoomd", "--version"]),
        "earlyoom": f"{_first_line([str(EARLYOOM), '-v'])} (Debian {dpkg('earlyoom')})",
        "nohang": f"nohang 0.2.0 (Debian {dpkg('nohang')}), run by {_first_line(['/usr/bin/python3', '--version'])}",
        "python (uoomd)": sys.version.split()[0],
        "kernel": _first_line(["uname", "-r"]),
    }


# --- command lines and configs --------------------------------------------------------------


def uoomd_command() -> list[str]:
    beside = Path(sys.executable).parent / "uoomd"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "uoomd"]


def _replace_line(text: str, key: str, value: str) -> str:
    """Set ``key = value`` on the one line that assigns ``key`` (comments after it dropped)."""
    pattern = re.compile(rf"^(\s*){re.escape(key)}\s*=.*$", re.MULTILINE)
    found = pattern.findall(text)
    if len(found) != 1:
        raise RuntimeError(f"expected one '{key} =' line, found {len(found)}")
    return pattern.sub(lambda m: f"{m.group(1)}{key} = {value}", text)


def uoomd_policy(levels: Levels | None, workdir: Path) -> str:
    """The shipped policy with the benchmark's levels, a JSON log and a state file in ``workdir``."""
    text = SHIPPED_POLICY.read_text()
    text = _replace_line(text, "log_format", '"json"')
    text = _replace_line(text, "state_file", json.dumps(str(workdir / "uoomd-state.json")))
    if levels is not None:
        text = _replace_line(text, "mem_available_term", f'"{levels.term_bytes}B"')
        text = _replace_line(text, "mem_available_kill", f'"{levels.kill_bytes}B"')
    return text


def uoomd_spec(levels: Levels | None, workdir: Path) -> DaemonSpec:
    policy = workdir / "uoomd.toml"
    policy.write_text(uoomd_policy(levels, workdir))
    policy.chmod(0o644)
    return DaemonSpec(
        name="uoomd",
        argv=(*uoomd_command(), "run", "--policy", str(policy)),
        ready_marker='"event": "started"',
        notes="etc/uoomd.toml as shipped; levels, log_format=json and state_file changed",
    )


def earlyoom_spec(levels: Levels | None, *, debug: bool = False, dryrun: bool = False) -> DaemonSpec:
    argv = [str(EARLYOOM), *EARLYOOM_PACKAGED_ARGS]
    if levels is not None:
        argv += ["-M", f"{levels.term_bytes // 1024},{levels.kill_bytes // 1024}"]
    if debug:
        argv.append("-d")
    if dryrun:
        argv.append("--dryrun")
    return DaemonSpec(
        name="earlyoom",
        argv=tuple(argv),
        ready_marker="mem avail:",
        notes="Debian's -r 3600; -M TERM,KILL in KiB",
    )


def nohang_config(levels: Levels | None) -> str:
    text = NOHANG_CONF.read_text()
    if levels is not None:
        text = _replace_line(text, "soft_threshold_min_mem", f"{levels.term_bytes / (1 << 20):.3f} M")
        text = _replace_line(text, "hard_threshold_min_mem", f"{levels.kill_bytes / (1 << 20):.3f} M")
    return text


def relaxed_nohang(workdir: Path) -> Path:
    """A copy of /usr/sbin/nohang whose only change is the 50%-of-RAM threshold check."""
    text = NOHANG.read_text()
    if text.count(NOHANG_HALF_CHECK) != 1:
        raise RuntimeError(f"{NOHANG}: the 50% threshold check is not where nohang 0.2.0 has it")
    path = workdir / "nohang"
    path.write_text(text.replace(NOHANG_HALF_CHECK, NOHANG_RELAXED_CHECK))
    return path


def nohang_spec(levels: Levels | None, workdir: Path) -> DaemonSpec:
    conf = workdir / "nohang.conf"
    conf.write_text(nohang_config(levels))
    script = relaxed_nohang(workdir) if levels is not None else NOHANG
    return DaemonSpec(
        name="nohang",
        argv=("/usr/bin/python3", str(script), "--monitor", "--config", str(conf)),
        ready_marker="Monitoring has started!",
        # Unbuffered, so the log survives a SIGKILL; nohang prints ~20 lines per kill.
        env={"PYTHONUNBUFFERED": "1"},
        notes="/etc/nohang/nohang.conf as shipped; soft/hard_threshold_min_mem changed",
    )


def spec_for(name: str, levels: Levels | None, workdir: Path) -> DaemonSpec:
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "uoomd":
        return uoomd_spec(levels, workdir)
    if name == "earlyoom":
        return earlyoom_spec(levels)
    if name == "nohang":
        return nohang_spec(levels, workdir)
    raise ValueError(name)


# --- reading their output -------------------------------------------------------------------

_NOHANG_FOUND = re.compile(r"Found (\d+) tasks with non-zero oom_score \(except init and self\) in (\d+)ms")
_EARLYOOM_SELECT = re.compile(r"selecting victim took (\d+\.\d+) ms")
_EARLYOOM_SEEN = re.compile(r'pid\s+(\d+): badness\s+-?\d+ vm_rss\s+-?\d+ uid\s+-?\d+ oom_score_adj\s+-?\d+ "(.*)"')


def uoomd_events(text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def uoomd_detect_to_signal_ms(text: str) -> float | None:
    """From the first SIGTERM sent: ``since_reading_ms``, the time from the tick's memory reading
    (the one that crossed) to the signal, logged by the daemon on every signal it sends."""
    for event in uoomd_events(text):
        if event.get("event") == "action_result" and event.get("outcome") == "sent":
            value = event.get("since_reading_ms")
            return float(value) if isinstance(value, int | float) else None
    return None


def nohang_selection_ms(text: str) -> list[tuple[int, float]]:
    """(tasks scanned, ms) for every victim search nohang logged."""
    return [(int(n), float(ms)) for n, ms in _NOHANG_FOUND.findall(text)]


def earlyoom_selection_ms(text: str) -> list[float]:
    """Every ``selecting victim took`` (printed with -d only)."""
    return [float(ms) for ms in _EARLYOOM_SELECT.findall(text)]


def earlyoom_seen(text: str) -> list[tuple[int, str]]:
    """The processes earlyoom -d lists while it looks for a victim: what it can see."""
    return [(int(pid), name) for pid, name in _EARLYOOM_SEEN.findall(text)]
