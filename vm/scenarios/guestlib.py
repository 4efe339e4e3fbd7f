"""What every guest scenario needs: commands logged with their times, facts saved as JSON, the
journal read as values, uoomd installed, hogs started as transient units (guest side, stdlib only).

A scenario is ``python3 scenarios/NAME.py OUT``: it writes ``OUT/facts.json`` (what it measured)
and any files it wants to keep; the host's pytest asserts on them. A scenario asserts nothing
itself beyond what it needs to go on: it measures and records, so one failed step does not
hide the others' results.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE.parent  # /var/lib/uoomd-vmtest: scenarios/, repo/, wheels/
REPO = WORK / "repo"
WHEELS = WORK / "wheels"
HOGS = REPO / "tests" / "hogs.py"
PREFIX = Path("/opt/uoomd")
UOOMD = PREFIX / "bin" / "uoomd"
POLICY = Path("/etc/uoomd/uoomd.toml")
UNIT = Path("/etc/systemd/system/uoomd.service")
STATE_FILE = Path("/run/uoomd/state.json")
RECORDS = Path("/var/lib/uoomd-vmtest-records")
MIB = 1 << 20

# include/uapi/linux/capability.h, Linux 6.1: bit number -> name
CAP_NAMES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]


def lock_in_memory() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE): the scenario must keep its pace (and record) while
    the machine thrashes, as a daemon under test may let it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(1 | 2) != 0:  # include/uapi/asm-generic/mman-common.h
        print(f"mlockall failed: {os.strerror(ctypes.get_errno())}", flush=True)


class Scenario:
    """The results directory of one boot: facts.json, commands.log and saved files."""

    def __init__(self, out: Path) -> None:
        lock_in_memory()
        self.out = out
        self.facts: dict[str, Any] = {"steps": []}
        self._log = (out / "commands.log").open("a")
        self.started = time.monotonic()
        self.last_stdout = ""

    def fact(self, key: str, value: Any) -> None:
        self.facts[key] = value
        self.save()

    def save(self) -> None:
        tmp = self.out / "facts.json.tmp"
        tmp.write_text(json.dumps(self.facts, indent=1, default=str))
        tmp.rename(self.out / "facts.json")

    def save_file(self, name: str, text: str) -> None:
        (self.out / name).write_text(text)

    def note(self, text: str) -> None:
        line = f"[{time.monotonic():10.3f}] {text}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """A named step: its duration and any exception go into facts['steps']; the scenario goes on."""
        record: dict[str, Any] = {"name": name, "start": round(time.monotonic(), 3)}
        self.facts["steps"].append(record)
        self.note(f"== {name}")
        try:
            yield record
        except Exception as exc:  # recorded for the host's assertion; the next step runs
            record["error"] = f"{type(exc).__name__}: {exc}"
            self.note(f"!! {name}: {record['error']}")
        finally:
            record["s"] = round(time.monotonic() - record["start"], 3)
            self.save()

    def sh(
        self, *argv: str | os.PathLike[str], timeout: float = 300, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv (never a shell), log it with its duration and output."""
        args = [os.fspath(a) for a in argv]
        t0 = time.monotonic()
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input_text, check=False)
        except subprocess.TimeoutExpired as exc:
            self.note(f"$ {' '.join(args)}  -> TIMEOUT after {timeout} s")
            raise RuntimeError(f"{args[0]} timed out after {timeout} s") from exc
        self.note(f"$ {' '.join(args)}  -> rc {done.returncode} in {time.monotonic() - t0:.2f} s")
        self.last_stdout = done.stdout
        for stream in (done.stdout, done.stderr):
            if stream.strip():
                self._log.write(_indent(stream[-4000:]))
        return done

    def must(self, *argv: str | os.PathLike[str], timeout: float = 300) -> str:
        done = self.sh(*argv, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))}: rc {done.returncode}: {done.stderr.strip()[-500:]}")
        return done.stdout


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> Any:
    """The predicate's first truthy value, or None after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)


# --- systemd and the journal ---------------------------------------------------------------


def show(unit: str, *props: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", unit, *(f"--property={p}" for p in props)], capture_output=True, text=True, check=False
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def mark() -> float:
    """Now, on the clock the journal stamps entries with (CLOCK_MONOTONIC of this boot)."""
    return time.monotonic()


def journal(*, unit: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
    """This boot's journal entries (of one unit) received at or after ``since`` (a mark())."""
    argv = ["journalctl", "-b", "-o", "json", "--no-pager", "--output-fields=MESSAGE,MESSAGE_ID,_PID,JOB_RESULT"]
    if unit:
        argv += ["-u", unit]
    if since > 0:
        # journalctl seeks by wall clock: 2 s early, then the monotonic filter below. The
        # scenarios poll this every half second; reading and parsing the whole boot's journal
        # each time cost the guest ~1 s of emulated CPU per call late in a long boot.
        wall = time.time() - (time.monotonic() - since)
        argv.append(f"--since=@{int(wall) - 2}")
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    entries = []
    for line in out.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and monotonic_s(entry) >= since:
            entries.append(entry)
    return entries


def monotonic_s(entry: dict[str, Any]) -> float:
    """When journald received the entry, on CLOCK_MONOTONIC (time.monotonic() in the guest)."""
    return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6


def message(entry: dict[str, Any]) -> str:
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):  # journald gives non-UTF-8 text as a byte list
        return bytes(value).decode(errors="replace")
    return str(value)


def uoomd_events(unit: str = "uoomd.service", since: float = 0.0) -> list[dict[str, Any]]:
    """uoomd's JSON lines from the journal, each with the journal's monotonic receive time as 'mono'."""
    events = []
    for entry in journal(unit=unit, since=since):
        text = message(entry)
        if not text.startswith("{"):
            continue
        try:
            event = json.loads(text)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            event["mono"] = monotonic_s(entry)
            event["journal_pid"] = entry.get("_PID")
            events.append(event)
    return events


def caps_of(pid: int) -> dict[str, list[str]]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, as capability names."""
    found: dict[str, list[str]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            bits = int(value.strip(), 16)
            found[key] = [name for bit, name in enumerate(CAP_NAMES) if bits >> bit & 1]
    return found


def status_field(pid: int, field: str) -> str | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in (status_field(pid, "State") or "zombie")


# --- installing uoomd ------------------------------------------------------------------------


INSTALL_MANIFEST = PREFIX / "share" / "uoomd-install" / "manifest"
INSTALLED_FROM = Path("/root/uoomd-src")  # the tree packaging/install-unit ran from (vm/image.py)


def use_policy(sc: Scenario, policy_text: str, *, restart: bool = True) -> None:
    """Put a policy where the installed unit reads it, and (re)start the unit on it."""
    if not INSTALL_MANIFEST.exists():
        raise RuntimeError(f"uoomd is not installed ({INSTALL_MANIFEST} missing)")
    POLICY.write_text(policy_text)
    if restart:
        sc.must("systemctl", "restart", "uoomd", timeout=300)


def shipped(name: str) -> str:
    """A policy as the repo ships it: 'etc/uoomd.toml' or 'policies/server.toml'."""
    return (REPO / name).read_text()


def read_state() -> dict[str, Any] | None:
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- memory hogs -----------------------------------------------------------------------------


class Hog:
    """tests/hogs.py run as a transient service (its own cgroup, like any program a user starts)."""

    def __init__(self, sc: Scenario, unit: str, *args: str, slice_name: str = "", properties: Sequence[str] = ()):
        self.sc = sc
        self.unit = unit
        RECORDS.mkdir(parents=True, exist_ok=True)
        self.record = RECORDS / unit
        for stale in RECORDS.glob(unit + "*"):
            stale.unlink()
        # No --collect: a unit failed by SIGKILL would be unloaded at once, and with it systemd's
        # record of how its process ended (ExecMainCode/Status); stop() resets it instead.
        argv = ["systemd-run", f"--unit={unit}", "--service-type=exec", "--remain-after-exit"]
        if slice_name:
            argv.append(f"--slice={slice_name}")
        for prop in properties:
            argv.append(f"--property={prop}")
        argv += [sys.executable, str(HOGS), "--record", str(self.record), *args]
        sc.must(*argv)
        self.pid = int(show(unit, "MainPID").get("MainPID", "0"))

    def events(self, suffix: str = "") -> list[list[str]]:
        try:
            return [line.split() for line in (RECORDS / (self.unit + suffix)).read_text().splitlines()]
        except OSError:
            return []

    def got(self, signal_name: str) -> bool:
        return any(event[0] == signal_name for event in self.events())

    def ended(self) -> bool:
        # From /proc, not `systemctl show`: on a machine thrashing for memory each new process
        # faults its binary back in, and a case's poll took minutes (systemd-oomd, no swap).
        return self.pid == 0 or not alive(self.pid)

    def outcome(self) -> dict[str, Any]:
        state = show(self.unit, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState", "SubState", "MainPID")
        return {"unit": self.unit, "pid": self.pid, "events": self.events(), **state}

    def stop(self) -> None:
        # cgroup.kill first: on a machine thrashing for want of memory `systemctl stop` (its
        # SIGTERM, then TimeoutStopSec) can take minutes; this is one write.
        cgroup = show(self.unit, "ControlGroup").get("ControlGroup", "")
        if cgroup:
            with contextlib.suppress(OSError):  # gone already
                Path("/sys/fs/cgroup", cgroup.lstrip("/"), "cgroup.kill").write_text("1")
        subprocess.run(["systemctl", "stop", self.unit], capture_output=True, check=False)
        subprocess.run(["systemctl", "reset-failed", self.unit], capture_output=True, check=False)


def kernel_oom_kills() -> int:
    """The kernel's own OOM kills since boot (/proc/vmstat oom_kill, Linux >= 4.13)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return -1


def dmesg_oom_lines() -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    # "Out of memory: Killed process" (global), "Memory cgroup out of memory: Killed process" (memcg)
    return [line for line in out.splitlines() if "out of memory" in line.lower() or "oom-kill:" in line]


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def copy_if_exists(src: Path, dst: Path) -> None:
    if src.exists():
        shutil.copy(src, dst)
