"""Frozen values read from the machine: memory, pressure, processes (stdlib only).

Sources produce these, the pure core consumes them. Memory is in bytes, except
where the kernel's own page arithmetic is needed (``page_size`` travels along).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

Pid = NewType("Pid", int)
Uid = NewType("Uid", int)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryReading:
    """Memory of a scope. For a cgroup, ``total`` is its limit and ``available`` is
    limit - usage + reclaimable file cache; swap is the cgroup's swap allowance."""

    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    # Pages evicted and then faulted back in, since boot (the cgroup's: since it was made), in
    # bytes: workingset_refault_anon + _file. None where the scope has no such counters, or
    # where nothing asked for them (uoomd/thrash.py, psi_refault_gate).
    refault_bytes: int | None = None
    # Whether that count is every refault: the multi-gen LRU, or a v1 cgroup, where no
    # activation counter tells a page the working set had room for (sources/vmstat.py). Then
    # only its duration tells a burst from a thrash: psi_refault_sustain_all.
    refaults_all: bool = False

    @property
    def available_fraction(self) -> float:
        return self.available_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def swap_free_fraction(self) -> float:
        return self.swap_free_bytes / self.swap_total_bytes if self.swap_total_bytes else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PressureReading:
    """One line pair of a PSI file (``/proc/pressure/memory`` or ``memory.pressure``)."""

    some_avg10: float
    some_avg60: float
    some_avg300: float
    some_total_us: int
    full_avg10: float
    full_avg60: float
    full_avg300: float
    full_total_us: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessKey:
    """A process's identity: a PID is recycled, (pid, starttime) is not."""

    pid: Pid
    starttime_ticks: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessInfo:
    """One process as /proc showed it. Detail fields are None when not read."""

    pid: Pid
    ppid: Pid
    pgid: int
    starttime_ticks: int  # /proc/PID/stat field 22, clock ticks since boot
    name: str  # comm, attacker-controlled
    state: str  # R, S, D, Z, ...
    uid: Uid
    kthread: bool  # PF_KTHREAD
    has_mm: bool  # False for zombies and exiting tasks: the kernel skips them
    oom_score_adj: int
    rss_anon_bytes: int
    rss_file_bytes: int
    rss_shmem_bytes: int
    swap_bytes: int
    pgtables_bytes: int
    vm_size_bytes: int = 0
    # /proc/PID/stat field 24: get_mm_rss(), the approximate per-CPU counter that
    # mm/oom_kill.c oom_badness() uses (Linux 6.18); status' Rss* lines are exact sums
    # since 6.16 and differ by up to a per-CPU batch. None: use rss_bytes.
    mm_rss_pages: int | None = None
    kernel_oom_score: int | None = None  # /proc/PID/oom_score when read (tests, explain)
    # The Snapshot.taken_at of the scan that read /proc/PID/status, where uid, rss_*_bytes,
    # swap_bytes and pgtables_bytes come from. None: read in the same pass as stat. An
    # incremental scan (sources/scanner.py ProcScanner) carries an unchanged process's
    # status over from an earlier scan: then it is older than the snapshot (not exact).
    status_read_at: float | None = None
    # Expensive details, read only when a rule or a report needs them:
    cmdline: str | None = None  # NUL separators replaced by spaces
    exe: str | None = None
    cgroup: str | None = None  # the path of the memory cgroup (v1) or the v2 cgroup
    user: str | None = None

    @property
    def key(self) -> ProcessKey:
        return ProcessKey(pid=self.pid, starttime_ticks=self.starttime_ticks)

    @property
    def rss_bytes(self) -> int:
        return self.rss_anon_bytes + self.rss_file_bytes + self.rss_shmem_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Every process at one moment, with the machine facts the kernel formula needs."""

    processes: tuple[ProcessInfo, ...]
    taken_at: float  # time.monotonic() when the scan started
    page_size: int
    total_ram_bytes: int
    total_swap_bytes: int
    self_pid: Pid  # uoomd itself: never a victim
    details: frozenset[str] = frozenset()  # which detail fields were read


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardReading:
    """What one guard sees at one poll."""

    guard: str
    memory: MemoryReading
    pressure: PressureReading | None = None
    psi_fired: tuple[int, ...] = ()  # indices into GuardPlan.psi of triggers the kernel fired
    refault_rate: float | None = None  # bytes/s refaulted over the last second or so (thrash.RefaultMeter)
    refault_above_since: float | None = None  # since when the rate has stayed at or above psi_refault_gate


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """Everything the decision core gets at one step."""

    now: float  # time.monotonic()
    guards: tuple[GuardReading, ...]
    snapshot: Snapshot | None = None  # the warm ranking's input; None when not rescanned
    alive: frozenset[ProcessKey] = field(default_factory=frozenset)  # in-flight victims still alive
    # In-flight victims still alive that may no longer be signalled, as the daemon found on
    # re-reading them: they left the guard's scope, or a protect rule covers them now.
    ineligible: frozenset[ProcessKey] = field(default_factory=frozenset)
