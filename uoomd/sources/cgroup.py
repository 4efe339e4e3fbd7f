"""Read a memory cgroup (v1 or v2) into a MemoryReading, and its members, OOM count and pressure file."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from enum import StrEnum

from uoomd import kernel
from uoomd.plan import Scope, ScopeKind
from uoomd.readings import MemoryReading, Snapshot
from uoomd.sources.seqfile import Closing, pread_all
from uoomd.sources.vmstat import activations_tell_fit, has_activation_counters, refault_pages

# A v1 limit at or above this means "no limit". The kernel stores limits in pages in a
# page_counter whose maximum is PAGE_COUNTER_MAX = LONG_MAX / PAGE_SIZE
# (include/linux/page_counter.h) and prints it times PAGE_SIZE
# (mm/memcontrol-v1.c mem_cgroup_read_u64()): 9223372036854771712 with 4 KiB pages,
# a little less with 64 KiB pages. Anything this large is beyond any real machine.
V1_UNLIMITED_MIN_BYTES = 1 << 62


class CgroupVersion(StrEnum):
    V1 = "v1"
    V2 = "v2"


class CgroupError(ValueError):
    """A cgroup directory is not a memory cgroup, or one of its files makes no sense."""


class CgroupGone(CgroupError):
    """The cgroup whose files are kept open was removed (a service restart does it).

    A kept fd of a removed cgroup's file fails with ENODEV for ever, even once a cgroup of
    the same name exists again (pread of memory.usage_in_bytes and of memory.pressure after
    rmdir, and after rmdir + mkdir; Linux 6.18, this machine): the files must be reopened.
    """


def detect_version(path: str) -> CgroupVersion:
    """v2 when memory.current exists, v1 when memory.usage_in_bytes does."""
    if os.path.exists(os.path.join(path, "memory.current")):
        return CgroupVersion.V2
    if os.path.exists(os.path.join(path, "memory.usage_in_bytes")):
        return CgroupVersion.V1
    if not os.path.isdir(path):
        raise CgroupError(f"{path}: no such cgroup directory")
    raise CgroupError(
        f"{path}: not a memory cgroup (no memory.current, no memory.usage_in_bytes); "
        "on cgroup v2 the memory controller must be enabled in the parent's cgroup.subtree_control"
    )


def cgroup_exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cgroup.procs"))


def supports_kill(path: str) -> bool:
    """True where the kernel can kill a whole cgroup at once (cgroup.kill, v2, Linux >= 5.14)."""
    return os.path.exists(os.path.join(path, "cgroup.kill"))


# ---- pure parsers -------------------------------------------------------------------


def parse_bytes_value(text: str, *, name: str) -> int:
    """A single number of bytes (memory.current, memory.usage_in_bytes, ...)."""
    stripped = text.strip()
    try:
        value = int(stripped)
    except ValueError:
        raise CgroupError(f"{name}: expected a number of bytes, got {stripped!r}") from None
    if value < 0:
        raise CgroupError(f"{name}: negative value {value}")
    return value


def parse_limit_v1(text: str, *, name: str = "memory.limit_in_bytes") -> int | None:
    """A v1 limit in bytes, None when unlimited (PAGE_COUNTER_MAX pages)."""
    value = parse_bytes_value(text, name=name)
    return None if value >= V1_UNLIMITED_MIN_BYTES else value


def parse_limit_v2(text: str, *, name: str = "memory.max") -> int | None:
    """A v2 limit in bytes, None for "max"."""
    if text.strip() == "max":
        return None
    return parse_bytes_value(text, name=name)


def parse_flat_keyed(text: str, *, name: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control) into a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise CgroupError(f"{name}: cannot read line {line!r}")
        try:
            out[fields[0]] = int(fields[1])
        except ValueError:
            raise CgroupError(f"{name}: {fields[0]} is not a number in {line!r}") from None
    return out


def parse_memory_stat(text: str) -> dict[str, int]:
    return parse_flat_keyed(text, name="memory.stat")


def parse_oom_kill_count_v1(oom_control_text: str) -> int:
    """memory.oom_control's ``oom_kill`` line (Linux >= 4.13, mm/memcontrol-v1.c mem_cgroup_oom_control_read())."""
    values = parse_flat_keyed(oom_control_text, name="memory.oom_control")
    if "oom_kill" not in values:
        raise CgroupError("memory.oom_control: no oom_kill line (needs Linux >= 4.13)")
    return values["oom_kill"]


def parse_oom_kill_count_v2(events_text: str) -> int:
    """memory.events' ``oom_kill`` (hierarchical unless mounted with memory_localevents)."""
    values = parse_flat_keyed(events_text, name="memory.events")
    if "oom_kill" not in values:
        raise CgroupError("memory.events: no oom_kill line")
    return values["oom_kill"]


def reclaimable_file_bytes(stat: dict[str, int], version: CgroupVersion) -> int:
    """The page cache reclaim can take back without swap: the file LRU lists.

    Why inactive_file + active_file and not v2's ``file`` or v1's ``cache``: those include
    shmem/tmpfs, which lives on the anon LRU (swap-backed) and cannot be reclaimed without
    swap; charging a 1 GiB tmpfs file to a cgroup would otherwise look like 1 GiB
    available. The file LRUs are what shrink_lruvec() scans (mm/vmscan.c) and what the
    kernel's own MemAvailable counts as page cache (mm/show_mem.c si_mem_available():
    pagecache = NR_ACTIVE_FILE + NR_INACTIVE_FILE). si_mem_available() holds back
    min(pagecache / 2, low watermark); a memcg has no watermarks, so nothing is held back.
    Hot, active file pages are "available" too: thrashing on them is what the PSI
    guard is for. oomd and systemd-oomd do not compute an available figure for a
    cgroup at all (they watch memory.current, swap and PSI), so the kernel is the model.
    v1: the ``total_`` keys are hierarchical, like memory.usage_in_bytes.
    """
    if version is CgroupVersion.V1:
        keys = ("total_inactive_file", "total_active_file")
    else:
        keys = ("inactive_file", "active_file")
    missing = [k for k in keys if k not in stat]
    if missing:
        raise CgroupError(f"memory.stat: missing {', '.join(missing)}")
    return sum(stat[k] for k in keys)


def compute_cgroup_reading(
    *,
    usage_bytes: int,
    limit_bytes: int | None,
    reclaimable_bytes: int,
    swap_usage_bytes: int,
    swap_limit_bytes: int | None,
    machine_total_bytes: int,
    machine_swap_total_bytes: int,
) -> MemoryReading:
    """The cgroup's memory as if it were a machine: pure arithmetic on values already read.

    total = the limit, or the machine's MemTotal when unlimited or larger than the machine.
    available = total - usage + reclaimable file cache, clamped to [0, total].
    swap_total = min(the cgroup's swap allowance, the machine's swap); swap_free accordingly.
    """
    total = machine_total_bytes if limit_bytes is None else min(limit_bytes, machine_total_bytes)
    available = max(0, min(total, total - usage_bytes + reclaimable_bytes))
    swap_allowance = machine_swap_total_bytes if swap_limit_bytes is None else swap_limit_bytes
    swap_total = max(0, min(swap_allowance, machine_swap_total_bytes))
    swap_free = max(0, swap_total - swap_usage_bytes)
    return MemoryReading(
        total_bytes=total,
        available_bytes=available,
        swap_total_bytes=swap_total,
        swap_free_bytes=swap_free,
    )


# ---- I/O ----------------------------------------------------------------------------


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("ascii", errors="replace")


# Errors that mean the file is not there for us: the cgroup went, or is not what we took it for.
_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM, errno.ENOTDIR})


def read_limit(cgroup_dir: str, *names: str) -> int | None:
    """The first of ``names`` that exists in ``cgroup_dir``, as a number (bytes, or a swappiness); "max" and
    absence are None (unlimited)."""
    for name in names:
        try:
            text = _read_text(os.path.join(cgroup_dir, name)).strip()
        except OSError as exc:
            if exc.errno in _ABSENT_ERRNOS:
                continue
            raise
        return None if text == "max" else int(text)
    return None


def read_members(path: str) -> frozenset[int]:
    """PIDs in cgroup.procs of the cgroup and of all its descendants.

    A descendant that vanishes while we walk is skipped: gone is fine.
    """
    pids: set[int] = set()
    for dirpath, _dirnames, _files in os.walk(path):
        try:
            text = _read_text(os.path.join(dirpath, "cgroup.procs"))
        except FileNotFoundError:
            continue
        pids.update(int(tok) for tok in text.split())
    return frozenset(pids)


def read_oom_kill_count(path: str) -> int:
    """How many processes the kernel's OOM killer killed in this cgroup (v1 or v2)."""
    if detect_version(path) is CgroupVersion.V2:
        return parse_oom_kill_count_v2(_read_text(os.path.join(path, "memory.events")))
    return parse_oom_kill_count_v1(_read_text(os.path.join(path, "memory.oom_control")))


def pressure_path_for(scope: Scope, proc_root: str = "/proc", mountinfo: str | None = None) -> str | None:
    """The PSI file that tells how much a scope stalls on memory, or None.

    system: /proc/pressure/memory. A v2 cgroup: its memory.pressure (present in every v2
    cgroup when CONFIG_PSI is on, even without the memory controller). A v1 memory cgroup
    has no pressure file: PSI follows a task's cgroup on the default (v2) hierarchy
    (kernel/sched/psi.c task_psi_group() uses task_dfl_cgroup()). On a hybrid machine
    (systemd's "unified" mount beside the v1 controllers) the same path exists on both
    hierarchies -- systemd creates every unit's cgroup on each -- so the v2 twin of a
    v1 memory cgroup is where its tasks' stalls are counted. Without a twin: None, and
    the daemon says that guard has no PSI.
    """
    if scope.kind is ScopeKind.SYSTEM:
        path = os.path.join(proc_root, "pressure", "memory")
        return path if os.path.exists(path) else None
    assert scope.cgroup_path is not None
    path = os.path.join(scope.cgroup_path, "memory.pressure")
    if os.path.exists(path):
        return path
    twin = v2_twin_of(scope.cgroup_path, _read_mountinfo(proc_root) if mountinfo is None else mountinfo)
    if twin is None:
        return None
    path = os.path.join(twin, "memory.pressure")
    return path if os.path.exists(path) else None


def _read_mountinfo(proc_root: str) -> str:
    try:
        return _read_text(os.path.join(proc_root, "self", "mountinfo"))
    except OSError:
        return ""


def parse_cgroup_mounts(mountinfo: str) -> tuple[list[str], str | None]:
    """(v1 mount points carrying the memory controller, the cgroup2 mount point) from mountinfo text."""
    v1_memory: list[str] = []
    v2: str | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point, fstype, options = fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = point
        elif fstype == "cgroup" and "memory" in options:
            v1_memory.append(point)
    return v1_memory, v2


def v2_twin_of(v1_path: str, mountinfo: str) -> str | None:
    """The cgroup2 directory with the same path below its mount as ``v1_path`` below the v1 memory mount."""
    v1_mounts, v2_mount = parse_cgroup_mounts(mountinfo)
    if v2_mount is None:
        return None
    normal = os.path.normpath(v1_path)
    for mount in v1_mounts:
        if normal == mount or normal.startswith(mount.rstrip("/") + "/"):
            relative = os.path.relpath(normal, mount)
            twin = os.path.normpath(os.path.join(v2_mount, relative))
            return twin if os.path.isdir(twin) else None
    return None


class CgroupMemoryReader(Closing):
    """Keeps a memory cgroup's files open and reads them into a MemoryReading at each poll."""

    def __init__(self, path: str, machine_total_bytes: int, machine_swap_total_bytes: int) -> None:
        self.path = path
        self.version = detect_version(path)
        self.machine_total_bytes = machine_total_bytes
        self.machine_swap_total_bytes = machine_swap_total_bytes
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.activations = activations_tell_fit()  # the refaults counted: vmstat.py
        if self.version is CgroupVersion.V2:
            names = {
                "usage": "memory.current",
                "limit": "memory.max",
                "swap_usage": "memory.swap.current",
                "swap_limit": "memory.swap.max",
                "stat": "memory.stat",
            }
        else:
            names = {
                "usage": "memory.usage_in_bytes",
                "limit": "memory.limit_in_bytes",
                # memsw = memory + swap; absent when the kernel has no swap accounting.
                "swap_usage": "memory.memsw.usage_in_bytes",
                "swap_limit": "memory.memsw.limit_in_bytes",
                "stat": "memory.stat",
            }
        self._names = names
        self._fds: dict[str, int] = {}
        try:
            for key, name in names.items():
                try:
                    self._fds[key] = os.open(os.path.join(path, name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    if key in ("swap_usage", "swap_limit"):
                        continue  # no swap accounting (swapaccount=0, or no swap support)
                    raise
        except BaseException:
            self.close()
            raise

    def _text(self, key: str) -> str | None:
        fd = self._fds.get(key)
        if fd is None:
            return None
        try:
            return pread_all(fd).decode("ascii", errors="replace")
        except OSError as exc:
            if exc.errno == errno.ENODEV:  # kernfs: the cgroup was removed under us
                raise CgroupGone(f"{self.path}: cgroup removed") from exc
            raise

    def _required(self, key: str) -> str:
        text = self._text(key)
        assert text is not None, key  # opened in __init__ or __init__ raised
        return text

    def read(self) -> MemoryReading:
        usage = parse_bytes_value(self._required("usage"), name=self._names["usage"])
        stat = parse_memory_stat(self._required("stat"))
        reclaimable = reclaimable_file_bytes(stat, self.version)
        # v2's memory.stat is hierarchical already; v1's own lines are this cgroup's alone.
        prefix = "" if self.version is CgroupVersion.V2 else "total_"
        refaults = refault_pages(stat, prefix, activations=self.activations)
        refaults_all = not self.activations or not has_activation_counters(stat, prefix)
        swap_usage_text = self._text("swap_usage")
        swap_limit_text = self._text("swap_limit")
        swap_usage = 0
        swap_limit: int | None = None  # no swap accounting files: swap is not limited per cgroup
        if self.version is CgroupVersion.V2:
            limit = parse_limit_v2(self._required("limit"))
            if swap_usage_text is not None:
                swap_usage = parse_bytes_value(swap_usage_text, name="memory.swap.current")
            if swap_limit_text is not None:
                swap_limit = parse_limit_v2(swap_limit_text, name="memory.swap.max")
        else:
            limit = parse_limit_v1(self._required("limit"))
            if swap_usage_text is not None and swap_limit_text is not None:
                # v1 counts memory+swap together: the swap part is memsw minus memory.
                memsw_usage = parse_bytes_value(swap_usage_text, name="memory.memsw.usage_in_bytes")
                memsw_limit = parse_limit_v1(swap_limit_text, name="memory.memsw.limit_in_bytes")
                swap_usage = max(0, memsw_usage - usage)
                if memsw_limit is not None:
                    # Swap is used once memory sits at its limit: the room for swap is memsw - limit.
                    swap_limit = max(0, memsw_limit - (limit or 0))
        reading = compute_cgroup_reading(
            usage_bytes=usage,
            limit_bytes=limit,
            reclaimable_bytes=reclaimable,
            swap_usage_bytes=swap_usage,
            swap_limit_bytes=swap_limit,
            machine_total_bytes=self.machine_total_bytes,
            machine_swap_total_bytes=self.machine_swap_total_bytes,
        )
        if refaults is None:
            return reading
        return replace(reading, refault_bytes=refaults * self.page_size, refaults_all=refaults_all)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def read_oom_totalpages(cgroup_dir: str, *, page_size: int, total_swap_pages: int, fallback: int) -> int:
    """totalpages of a memcg OOM in this cgroup: mm/memcontrol.c mem_cgroup_get_max() from its files (v1 or v2).

    The one place that says it: `uoomd run`, `candidates` and `explain` rank a cgroup's
    processes with this number, so they cannot disagree.

    An unlimited cgroup never has a memcg OOM of its own: the kernel would OOM with the
    system's (or a limited ancestor's) totalpages, so the system value is used."""
    unlimited_pages = kernel.LONG_MAX // page_size  # PAGE_COUNTER_MAX
    v1 = os.path.exists(os.path.join(cgroup_dir, "memory.limit_in_bytes"))
    if v1:
        memory_max = read_limit(cgroup_dir, "memory.limit_in_bytes")
        memsw_max = read_limit(cgroup_dir, "memory.memsw.limit_in_bytes")
        swappiness = read_limit(cgroup_dir, "memory.swappiness")
        swap_max = None
    else:
        memory_max = read_limit(cgroup_dir, "memory.max")
        swap_max = read_limit(cgroup_dir, "memory.swap.max")
        memsw_max = None
        swappiness = read_limit("/proc/sys/vm", "swappiness")
    if memory_max is None or memory_max // page_size >= unlimited_pages:
        return fallback
    # A missing or "max" swap limit is the page counter's default, PAGE_COUNTER_MAX; without
    # memsw accounting (v1 swapaccount=0, or v2) the kernel uses memcg->swap.max.
    memsw_pages = None if memsw_max is None else min(memsw_max // page_size, unlimited_pages)
    swap_pages = unlimited_pages if swap_max is None else swap_max // page_size
    return kernel.mem_cgroup_get_max(
        memory_max_pages=memory_max // page_size,
        total_swap_pages=total_swap_pages,
        swappiness=60 if swappiness is None else swappiness,
        memsw_max_pages=memsw_pages,
        swap_max_pages=None if memsw_pages is not None else swap_pages,
    )


def read_totalpages(scope: Scope, snapshot: Snapshot) -> int:
    """oom_badness()'s totalpages for a guard's scope: the machine's, or its cgroup's memcg limit
    (read_oom_totalpages()). `uoomd run`, `candidates` and `explain` all rank with this one."""
    system = kernel.system_totalpages(
        total_ram_bytes=snapshot.total_ram_bytes,
        total_swap_bytes=snapshot.total_swap_bytes,
        page_size=snapshot.page_size,
    )
    if scope.kind is ScopeKind.SYSTEM:
        return system
    assert scope.cgroup_path is not None
    try:
        return read_oom_totalpages(
            scope.cgroup_path,
            page_size=snapshot.page_size,
            total_swap_pages=snapshot.total_swap_bytes // snapshot.page_size,
            fallback=system,
        )
    except (OSError, ValueError):
        return system  # the cgroup went away mid-read: its reading fails too, and says so
