"""uoomd's /proc readings agree with psutil's, an independent reader, for every live process.

uoomd/sources/procfs.py parses /proc itself (psutil is not a runtime dependency): this is the
check that its parsing of stat, status and cmdline says what another careful reader says, on
whatever this machine runs, plus children made to cover the awkward cases (a name with ')'
and spaces, an argument that is not UTF-8, a stopped process, a zombie).

Processes come and go and change while they are read: each is read by uoomd, then by psutil,
then by uoomd again, and psutil's value must lie between uoomd's two (a process that is gone,
or whose PID was reused, by then is skipped). A process busy enough to move past that is read
up to ATTEMPTS times before a disagreement counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from uoomd.readings import ProcessInfo
from uoomd.sources import procfs

pytestmark = pytest.mark.integration

PROC = "/proc"
ATTEMPTS = 3
CMDLINE_MAX = 4096  # uoomd reads the head of a cmdline (procfs._CMDLINE_MAX)
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/PID/status and statm (which psutil reads) read the mm counters the same way (exact sums
# since Linux 6.16, fs/proc/task_mmu.c task_mem() and task_statm()); stat's rss, which the
# kernel's oom_badness() uses, is the per-CPU approximation (get_mm_rss()): apart by up to the
# counter batch, max(32, 2 * CPUs) pages (lib/percpu_counter.c compute_batch_value()), on each
# CPU, for each of anon, file and shmem.
CPUS = os.cpu_count() or 1
COUNTER_SLACK_BYTES = 3 * max(32, 2 * CPUS) * CPUS * PAGE

# proc(5)'s state letters, as psutil names them.
STATES = {
    "R": psutil.STATUS_RUNNING,
    "S": psutil.STATUS_SLEEPING,
    "D": psutil.STATUS_DISK_SLEEP,
    "T": psutil.STATUS_STOPPED,
    "t": psutil.STATUS_TRACING_STOP,
    "Z": psutil.STATUS_ZOMBIE,
    "X": psutil.STATUS_DEAD,
    "I": psutil.STATUS_IDLE,
    "P": psutil.STATUS_PARKED,
}

HOSTILE_NAME = "x) S 1 (y z"  # a naive split at the first ')' reads a wrong state and ppid
HOSTILE_ARGS = [b"two words", b"caf\xc3\xa9", b"\xff\xfe not utf-8", b""]
CHILD = """
import mmap, sys
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")  # a hog of ours: first to go if this machine runs short
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[1])
buf = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(buf), 4096):
    buf[i] = 1
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()  # asleep (S) until the test closes stdin
"""


@dataclass
class Children:
    sleeper: subprocess.Popen[bytes]
    stopped: subprocess.Popen[bytes]
    zombie: subprocess.Popen[bytes]


@pytest.fixture
def children() -> Iterator[Children]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(name: str) -> subprocess.Popen[bytes]:
        argv: list[bytes | str] = [sys.executable, "-c", CHILD, name, *HOSTILE_ARGS]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        return child

    try:
        sleeper = spawn(HOSTILE_NAME)
        stopped = spawn("uoomd-t-stop")
        stopped.send_signal(signal.SIGSTOP)
        os.waitid(os.P_PID, stopped.pid, os.WSTOPPED)  # it is stopped (T) once this returns
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        started.append(zombie)
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: Z
        yield Children(sleeper=sleeper, stopped=stopped, zombie=zombie)
    finally:
        for child in started:  # ours, by PID
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait()


def _ours(pid: int) -> ProcessInfo | None:
    return procfs.read_process(PROC, pid, frozenset({"cmdline"}))


def _as_ours(text: str) -> str:
    """psutil's text (surrogateescape) in uoomd's form (undecodable bytes as \\xNN)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _between(value: int, first: int, second: int, slack: int = 0) -> bool:
    return min(first, second) - slack <= value <= max(first, second) + slack


@dataclass(frozen=True, slots=True, kw_only=True)
class Theirs:
    """One process as psutil reads it."""

    created: float  # seconds since the epoch
    name: str
    state: str
    uid: int
    ppid: int
    rss_bytes: int  # statm's resident
    swap_bytes: int | None  # smaps_rollup's Swap; None: not readable (another user's, not root)
    argv: list[str] | None  # None: a zombie (psutil raises ZombieProcess for its cmdline)


def _read_psutil(pid: int) -> Theirs:
    process = psutil.Process(pid)
    with process.oneshot():
        try:
            swap: int | None = process.memory_full_info().swap
        except psutil.AccessDenied:
            swap = None
        try:
            argv: list[str] | None = process.cmdline()
        except psutil.ZombieProcess:
            argv = None
        return Theirs(
            created=process.create_time(),
            name=_as_ours(process.name()),
            state=process.status(),
            uid=process.uids().real,
            ppid=process.ppid(),
            rss_bytes=process.memory_info().rss,
            swap_bytes=swap,
            argv=argv,
        )


def _disagreements(before: ProcessInfo, after: ProcessInfo, theirs: Theirs) -> list[str]:
    """What psutil read that lies outside both of uoomd's readings ([] when they agree)."""
    found: list[str] = []

    def differ(field: str, ours: object, psutils: object) -> None:
        found.append(f"{field}: uoomd {ours!r}, psutil {psutils!r}")

    expected_created = psutil.boot_time() + before.starttime_ticks / CLK_TCK
    if abs(theirs.created - expected_created) > 1 / CLK_TCK:
        differ("starttime", expected_created, theirs.created)
    # psutil completes a 15-byte comm from the cmdline where it can: the head must match.
    name = theirs.name
    if not (name == before.name or (len(before.name.encode()) >= 15 and name.startswith(before.name))):
        differ("name", before.name, name)
    if theirs.state not in {STATES.get(before.state), STATES.get(after.state)}:
        differ("state", (before.state, after.state), theirs.state)
    if theirs.uid not in {before.uid, after.uid}:
        differ("uid", (before.uid, after.uid), theirs.uid)
    if theirs.ppid not in {before.ppid, after.ppid}:
        differ("ppid", (before.ppid, after.ppid), theirs.ppid)
    if not _between(theirs.rss_bytes, before.rss_bytes, after.rss_bytes):
        differ("rss (status)", (before.rss_bytes, after.rss_bytes), theirs.rss_bytes)
    stat_rss = ((before.mm_rss_pages or 0) * PAGE, (after.mm_rss_pages or 0) * PAGE)
    if not _between(theirs.rss_bytes, *stat_rss, slack=COUNTER_SLACK_BYTES):
        differ("rss (stat)", stat_rss, theirs.rss_bytes)
    # smaps counts swapped-out shared memory too, which VmSwap leaves out: at least ours.
    if (
        theirs.swap_bytes is not None
        and theirs.swap_bytes < min(before.swap_bytes, after.swap_bytes) - COUNTER_SLACK_BYTES
    ):
        differ("swap", (before.swap_bytes, after.swap_bytes), theirs.swap_bytes)
    if before.kthread:
        if theirs.argv != []:  # PF_KTHREAD, as uoomd reads it, is what has no argv
            differ("kthread", True, theirs.argv)
    else:
        # uoomd keeps the head of the cmdline, NULs as spaces; trailing empty arguments aside.
        # A zombie's is empty (its mm is gone), where psutil refuses to read it.
        argv = theirs.argv if theirs.argv is not None else []
        joined = b" ".join(arg.encode("utf-8", "surrogateescape") for arg in argv)[:CMDLINE_MAX]
        expected = joined.decode("utf-8", "backslashreplace").rstrip(" ")
        if expected not in {(before.cmdline or "").rstrip(" "), (after.cmdline or "").rstrip(" ")}:
            differ("cmdline", (before.cmdline, after.cmdline), theirs.argv)
        if theirs.argv is None and "Z" not in {before.state, after.state}:
            differ("zombie", (before.state, after.state), "psutil: a zombie")
    return found


def _compare(pid: int) -> list[str] | None:
    """None: gone (or its PID reused) while it was read; else what did not agree."""
    found: list[str] = []
    for _ in range(ATTEMPTS):
        before = _ours(pid)
        if before is None:
            return None
        try:
            theirs = _read_psutil(pid)
        except psutil.NoSuchProcess:
            return None
        after = _ours(pid)
        if after is None or after.starttime_ticks != before.starttime_ticks:
            return None
        found = _disagreements(before, after, theirs)
        if not found:
            return []
    return found


def test_every_live_process_reads_the_same_in_uoomd_and_psutil(children: Children) -> None:
    special = {children.sleeper.pid, children.stopped.pid, children.zombie.pid, os.getpid()}
    compared: set[int] = set()
    disagreements: dict[int, list[str]] = {}
    for pid in procfs.list_pids(PROC):
        found = _compare(pid)
        if found is None:
            assert pid not in special, f"our own process {pid} vanished"
            continue
        compared.add(pid)
        if found:
            disagreements[pid] = found
    assert disagreements == {}
    assert special <= compared
    assert len(compared) >= len(special) + 1  # the machine's own processes too, at least init

    # The children read as they were made: a hostile name, argv bytes, their states.
    sleeper = procfs.read_process(PROC, children.sleeper.pid, frozenset({"cmdline"}))
    assert sleeper is not None
    assert (sleeper.name, sleeper.state, sleeper.ppid) == (HOSTILE_NAME, "S", os.getpid())
    assert sleeper.rss_anon_bytes >= 32 << 20
    assert sleeper.cmdline is not None
    assert sleeper.cmdline.endswith("x) S 1 (y z two words café \\xff\\xfe not utf-8")
    stopped = procfs.read_process(PROC, children.stopped.pid)
    zombie = procfs.read_process(PROC, children.zombie.pid)
    assert stopped is not None
    assert zombie is not None
    assert (stopped.state, zombie.state, zombie.has_mm) == ("T", "Z", False)
