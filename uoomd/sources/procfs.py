"""Read processes from /proc into frozen ProcessInfo values (parse_* pure, read_* I/O).

This is the hot path of the daemon: every poll that needs a victim scans every PID.
Files are read with ``os.open``/``os.read`` on prebuilt byte paths (bench/scan.py
measures this against psutil), kernel threads cost one read, and the expensive
details (cmdline, exe, cgroup, user) are read only when asked for. read_snapshot()
reads everything afresh; ProcScanner (the daemon's warm ranking) keeps fds and parsed
values between scans and re-reads only what can have changed.

A process may vanish or deny access between any two reads: it is skipped, never an error.
"""

from __future__ import annotations

import errno
import os
import pwd
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from uoomd.readings import Pid, ProcessInfo, Snapshot, Uid

# include/linux/sched.h: "I am a kernel thread"
PF_KTHREAD = 0x00200000

DETAILS = frozenset({"cmdline", "exe", "cgroup", "user"})

_READ_SIZE = 65536  # one read: status is ~1.5 KiB, cmdline is capped below
_CMDLINE_MAX = 4096  # a report and a regex need the head of a cmdline, not 2 MiB of it


@dataclass(frozen=True, slots=True, kw_only=True)
class StatFields:
    """The fields of /proc/PID/stat that uoomd uses (proc(5) numbering in comments)."""

    pid: int  # 1
    name: str  # 2, comm without the parentheses
    state: str  # 3
    ppid: int  # 4
    pgid: int  # 5
    flags: int  # 9, PF_* flags
    num_threads: int  # 20
    starttime_ticks: int  # 22
    vsize_bytes: int  # 23
    rss_pages: int  # 24, get_mm_rss()

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusFields:
    """The fields of /proc/PID/status that uoomd uses, in bytes."""

    uid: int
    has_mm: bool  # the Vm*/Rss* lines exist only while the task has an mm
    rss_anon_bytes: int = 0
    rss_file_bytes: int = 0
    rss_shmem_bytes: int = 0
    swap_bytes: int = 0
    pgtables_bytes: int = 0


def _as_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def decode_name(raw: bytes) -> str:
    """Process names are bytes; undecodable bytes become ``\\xNN`` so the value is always printable-safe."""
    return raw.decode("utf-8", "backslashreplace")


def parse_stat(text: str | bytes) -> StatFields:
    """Parse /proc/PID/stat. Raises ValueError on a malformed line.

    comm may contain spaces, ')' and newlines (up to 15 bytes, attacker-controlled):
    the name ends at the LAST ')', as in earlyoom's parse_proc_pid_stat_buf().
    """
    data = _as_bytes(text)
    open_at = data.find(b"(")
    close_at = data.rfind(b")")
    if open_at < 0 or close_at < open_at:
        raise ValueError("no (comm) in stat line")
    rest = data[close_at + 2 :].split()
    if len(rest) < 22:
        raise ValueError(f"stat line has {len(rest) + 2} fields, expected at least 24")
    return StatFields(
        pid=int(data[:open_at]),
        name=decode_name(data[open_at + 1 : close_at]),
        state=rest[0].decode("ascii", "replace"),
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        flags=int(rest[6]),
        num_threads=int(rest[17]),
        starttime_ticks=int(rest[19]),
        vsize_bytes=int(rest[20]),
        rss_pages=int(rest[21]),
    )


def _field_kib(data: bytes, key: bytes) -> int | None:
    """The number after ``\\nKey:`` in a status text (kB lines and plain numbers alike)."""
    start = data.find(key)
    if start < 0:
        return None
    start += len(key)
    end = data.find(b"\n", start)
    line = data[start:end] if end >= 0 else data[start:]
    return int(line.split()[0])


def parse_status(text: str | bytes) -> StatusFields:
    """Parse /proc/PID/status (fs/proc/array.c proc_pid_status(), task_mem()).

    Zombies and kernel threads have no mm, hence no Vm*/Rss* lines: has_mm is False.
    """
    data = _as_bytes(text)
    if not data.startswith(b"\n"):
        data = b"\n" + data  # every key is searched as "\nKey:" so Name cannot fake one
    # Name: is the first line and may hold anything; skip it so a hostile name
    # cannot contain "\nUid:". Since Linux 4.x the kernel escapes \n in Name
    # (seq_escape), but skipping costs nothing.
    name_end = data.find(b"\n", 1)
    body = data[name_end:] if name_end >= 0 else data
    uid = _field_kib(body, b"\nUid:")
    if uid is None:
        raise ValueError("no Uid: line in status")
    anon = _field_kib(body, b"\nRssAnon:")
    if anon is None:
        return StatusFields(uid=uid, has_mm=False)
    return StatusFields(
        uid=uid,
        has_mm=True,
        rss_anon_bytes=anon * 1024,
        rss_file_bytes=(_field_kib(body, b"\nRssFile:") or 0) * 1024,
        rss_shmem_bytes=(_field_kib(body, b"\nRssShmem:") or 0) * 1024,
        swap_bytes=(_field_kib(body, b"\nVmSwap:") or 0) * 1024,
        pgtables_bytes=(_field_kib(body, b"\nVmPTE:") or 0) * 1024,
    )


def parse_cmdline(data: bytes) -> str:
    """NUL-separated argv -> one line with spaces (the trailing NUL dropped)."""
    return decode_name(data.rstrip(b"\0").replace(b"\0", b" "))


def parse_cgroup(text: str | bytes) -> str | None:
    """The memory cgroup path from /proc/PID/cgroup: the v1 line naming the
    ``memory`` controller, else the v2 ``0::`` line."""
    v2: str | None = None
    for line in _as_bytes(text).decode("utf-8", "backslashreplace").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if "memory" in controllers.split(","):
            return path
        if hierarchy == "0" and controllers == "":
            v2 = path
    return v2


def parse_meminfo_totals(text: str | bytes) -> tuple[int, int]:
    """(MemTotal, SwapTotal) in bytes from /proc/meminfo. MemTotal is totalram_pages()
    and SwapTotal is total_swap_pages, in kB (fs/proc/meminfo.c meminfo_proc_show())."""
    data = b"\n" + _as_bytes(text)
    mem = _field_kib(data, b"\nMemTotal:")
    swap = _field_kib(data, b"\nSwapTotal:")
    if mem is None:
        raise ValueError("no MemTotal: in meminfo")
    return mem * 1024, (swap or 0) * 1024


# --- I/O ---------------------------------------------------------------------------------

_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM, errno.ENOTDIR})


def _read(path: bytes, size: int = _READ_SIZE) -> bytes | None:
    """One file in one read, or None when the process vanished or denied access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return None
        raise
    try:
        return os.read(fd, size)
    except OSError as exc:
        # ESRCH: the task exited between open and read (fs/proc/base.c get_proc_task()).
        if exc.errno in _GONE_ERRNOS:
            return None
        raise
    finally:
        os.close(fd)


def _readlink(path: bytes) -> str | None:
    try:
        return decode_name(os.readlink(path))
    except OSError:
        return None  # kernel threads, other users' processes without CAP_SYS_PTRACE, gone


def read_page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def read_meminfo_totals(proc_root: str = "/proc") -> tuple[int, int]:
    """(MemTotal, SwapTotal) in bytes."""
    data = _read(os.fsencode(os.path.join(proc_root, "meminfo")))
    if data is None:
        raise FileNotFoundError(os.path.join(proc_root, "meminfo"))
    return parse_meminfo_totals(data)


_user_names: dict[int, str] = {}


def _user_name(uid: int) -> str:
    name = _user_names.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _user_names[uid] = name
    return name


def _kthread_info(pid: int, stat: StatFields, details: frozenset[str]) -> ProcessInfo:
    # Kernel threads are never victims (mm/oom_kill.c oom_unkillable_task()):
    # their status and oom_score_adj are never read, the scan's biggest saving.
    return ProcessInfo(
        pid=Pid(pid),
        ppid=Pid(stat.ppid),
        pgid=stat.pgid,
        starttime_ticks=stat.starttime_ticks,
        name=stat.name,
        state=stat.state,
        uid=Uid(0),
        kthread=True,
        has_mm=False,
        oom_score_adj=0,
        rss_anon_bytes=0,
        rss_file_bytes=0,
        rss_shmem_bytes=0,
        swap_bytes=0,
        pgtables_bytes=0,
        mm_rss_pages=0,
        user="root" if "user" in details else None,
    )


def _read_details(
    base: bytes, uid: int, details: frozenset[str]
) -> tuple[str | None, str | None, str | None, str | None]:
    """(cmdline, exe, cgroup, user), each None unless asked for."""
    cmdline = exe = cgroup = user = None
    if "cmdline" in details:
        raw = _read(base + b"cmdline", _CMDLINE_MAX)
        cmdline = parse_cmdline(raw) if raw is not None else ""
    if "exe" in details:
        exe = _readlink(base + b"exe")
    if "cgroup" in details:
        raw = _read(base + b"cgroup")
        cgroup = parse_cgroup(raw) if raw is not None else None
    if "user" in details:
        user = _user_name(uid)
    return cmdline, exe, cgroup, user


def _user_info(
    base: bytes,
    pid: int,
    *,
    stat: StatFields,
    status: StatusFields,
    adj: int,
    details: frozenset[str],
    status_read_at: float | None = None,
) -> ProcessInfo:
    cmdline, exe, cgroup, user = _read_details(base, status.uid, details) if details else (None, None, None, None)
    return ProcessInfo(
        pid=Pid(pid),
        ppid=Pid(stat.ppid),
        pgid=stat.pgid,
        starttime_ticks=stat.starttime_ticks,
        name=stat.name,
        state=stat.state,
        uid=Uid(status.uid),
        kthread=False,
        has_mm=status.has_mm,
        oom_score_adj=adj,
        rss_anon_bytes=status.rss_anon_bytes,
        rss_file_bytes=status.rss_file_bytes,
        rss_shmem_bytes=status.rss_shmem_bytes,
        swap_bytes=status.swap_bytes,
        pgtables_bytes=status.pgtables_bytes,
        vm_size_bytes=stat.vsize_bytes,
        mm_rss_pages=stat.rss_pages if status.has_mm else 0,
        status_read_at=status_read_at,
        cmdline=cmdline,
        exe=exe,
        cgroup=cgroup,
        user=user,
    )


def _read_process(base: bytes, pid: int, details: frozenset[str]) -> ProcessInfo | None:
    """``base`` is ``b"/proc/PID/"``."""
    stat_data = _read(base + b"stat")
    if stat_data is None:
        return None
    try:
        stat = parse_stat(stat_data)
    except ValueError:
        return None  # a half-written line cannot happen with one read; be safe anyway
    if stat.flags & PF_KTHREAD:
        return _kthread_info(pid, stat, details)
    status_data = _read(base + b"status")
    adj_data = _read(base + b"oom_score_adj")
    if status_data is None or adj_data is None:
        return None
    try:
        status = parse_status(status_data)
        adj = int(adj_data)
    except ValueError:
        return None
    return _user_info(base, pid, stat=stat, status=status, adj=adj, details=details)


def _check_details(details: frozenset[str]) -> None:
    unknown = details - DETAILS
    if unknown:
        raise ValueError(f"unknown process details {sorted(unknown)}; known: {sorted(DETAILS)}")


def read_process(proc_root: str, pid: int, details: frozenset[str] = frozenset()) -> ProcessInfo | None:
    """One process, or None if it is gone or unreadable."""
    _check_details(details)
    return _read_process(os.fsencode(proc_root) + b"/%d/" % pid, pid, details)


def read_oom_score(proc_root: str, pid: int) -> int | None:
    """The kernel's /proc/PID/oom_score (fs/proc/base.c proc_oom_score()), or None if gone."""
    data = _read(os.fsencode(proc_root) + b"/%d/oom_score" % pid)
    if data is None:
        return None
    try:
        return int(data)
    except ValueError:
        return None


def list_pids(proc_root: str = "/proc") -> list[int]:
    """Every thread-group ID in /proc, in the kernel's readdir order (ascending PID)."""
    return [int(name) for name in os.listdir(os.fsencode(proc_root)) if name.isdigit()]


def parse_last_pid(text: str | bytes) -> int:
    """The PID most recently handed out, from /proc/loadavg (its last field; fs/proc/loadavg.c)."""
    return int(_as_bytes(text).split()[-1])


def read_last_pid(proc_root: str = "/proc") -> int | None:
    """The last PID allocated in this /proc's PID namespace, or None where it cannot be read."""
    data = _read(os.fsencode(proc_root) + b"/loadavg")
    if data is None:
        return None
    try:
        return parse_last_pid(data)
    except (ValueError, IndexError):
        return None


def read_pid_max(proc_root: str = "/proc") -> int:
    data = _read(os.fsencode(proc_root) + b"/sys/kernel/pid_max")
    try:
        return int(data) if data else 1 << 22
    except ValueError:
        return 1 << 22  # PID_MAX_LIMIT on 64-bit


def is_thread_group_leader(proc_root: str, pid: int) -> bool:
    """Whether ``pid`` names a process (not one of its threads: /proc/TID exists too, unlisted)."""
    data = _read(os.fsencode(proc_root) + b"/%d/status" % pid)
    if data is None:
        return False
    tgid = _field_kib(data[data.find(b"\n") :], b"\nTgid:")  # past Name:, which may hold anything
    return tgid == pid


def read_snapshot(
    proc_root: str = "/proc",
    details: frozenset[str] = frozenset(),
    self_pid: int | None = None,
    pids: Iterable[int] | None = None,
) -> Snapshot:
    """Every process (or only ``pids``, for a cgroup-scoped guard) plus the machine facts
    the kernel's formula needs. Vanished and unreadable processes are left out."""
    _check_details(details)
    taken_at = time.monotonic()
    root = os.fsencode(proc_root)
    total_ram_bytes, total_swap_bytes = read_meminfo_totals(proc_root)
    wanted = list_pids(proc_root) if pids is None else sorted(set(pids))
    processes = []
    for pid in wanted:
        info = _read_process(b"%s/%d/" % (root, pid), pid, details)
        if info is not None:
            processes.append(info)
    return Snapshot(
        processes=tuple(processes),
        taken_at=taken_at,
        page_size=read_page_size(),
        total_ram_bytes=total_ram_bytes,
        total_swap_bytes=total_swap_bytes,
        self_pid=Pid(os.getpid() if self_pid is None else self_pid),
        details=details,
    )


# --- the incremental scanner of the daemon's warm ranking ---------------------------------

_STAT_READ_SIZE = 2048  # a stat line is at most ~1 KiB: 52 decimal fields and a 16-byte comm
STATUS_EVERY_SCANS = 16  # an unchanged process has its status re-read at least this often


def _pread(fd: int) -> bytes | None:
    """Re-read a held /proc file from offset 0 (seq_file renders it afresh), or None if
    the process it was opened for is gone: the fd pins that process's struct pid, so a
    recycled PID answers ESRCH here, never another process's data (fs/proc/base.c
    get_proc_task())."""
    try:
        return os.pread(fd, _STAT_READ_SIZE, 0)
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return None
        raise


def _open_held(path: bytes) -> int | None:
    """An fd to keep, or None: the process is gone, or no fd is left to keep (EMFILE,
    ENFILE), in which case the file is read by path, as read_snapshot() does."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS or exc.errno in (errno.EMFILE, errno.ENFILE):
            return None
        raise


@dataclass(slots=True)
class _Tracked:
    """One process incarnation the scanner follows (mutable, private to ProcScanner)."""

    stat_fd: int  # -1: not held (fd budget spent), read by path
    adj_fd: int  # -1: not held, or a kernel thread
    stat_raw: bytes
    adj_raw: bytes
    info: ProcessInfo
    details: frozenset[str]
    status_due: int  # the scan number by which status is re-read even if stat did not change
    stat_rss_pages: int = 0  # stat's rss counter when status was last read


def default_held_fd_budget() -> int:
    """Half the soft RLIMIT_NOFILE: the rest stays for pidfds, cgroup and PSI files, hooks."""
    import resource  # noqa: PLC0415  (Unix-only module, needed only here)

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return min(soft, 1 << 20) // 2


class ProcScanner:
    """Scans /proc again and again, re-reading only what can have changed.

    Per process incarnation it keeps /proc/PID/stat and /proc/PID/oom_score_adj open and
    re-reads them with pread(fd, 0) at every scan: this saves the path walk, open and
    close, the bulk of a /proc read (bench/scan.py: 9.8 -> 4.7 us for stat, 4.9 -> 0.8 us
    for oom_score_adj, 2,000 processes, this VM). Both are read fresh at every scan, so
    the name, state, rss counter (get_mm_rss(), what oom_badness() uses) and oom_score_adj
    of every process are always this scan's.

    /proc/PID/status (uid, RssAnon/File/Shmem, VmSwap, VmPTE; 13.6 us, the dearest read)
    and the details are re-read only when the process's memory or name changed since
    (stat's rss counter, vsize or comm), when the caller names the PID in ``refresh``, and
    for every process at least every STATUS_EVERY_SCANS scans. Otherwise they are carried
    over from the earlier scan, and ProcessInfo.status_read_at says so. An unchanged stat
    line and oom_score_adj hand back the very same ProcessInfo object, which lets
    scoring.rank(previous=) reuse its verdict.

    Costs: one held fd per kernel thread, two per user process (at most ``max_held_fds``;
    beyond that, processes are read by path each scan), and kernel memory charged to
    uoomd's memory cgroup: the 4 KiB seq_file page that each held stat fd keeps, plus its
    struct file (/proc/slabinfo, 2,070 processes: kmalloc-cg-4k +8.1 MiB, filp +0.8 MiB,
    seq_file +0.2 MiB). close() gives it all back; the daemon closes the scanner whenever
    it drops its warm ranking, so an idle daemon holds none of it.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        max_held_fds: int | None = None,
        status_every_scans: int = STATUS_EVERY_SCANS,
    ) -> None:
        self.proc_root = proc_root
        self._root = os.fsencode(proc_root)
        self._max_held_fds = default_held_fd_budget() if max_held_fds is None else max_held_fds
        self._status_every = max(1, status_every_scans)
        self._tracked: dict[int, _Tracked] = {}
        self._held = 0
        self._scans = 0
        self._page_size = read_page_size()
        self.status_reads = 0  # in the last scan: how many processes had status read

    @property
    def held_fds(self) -> int:
        return self._held

    def close(self) -> None:
        for pid in list(self._tracked):
            self._forget(pid)

    def __enter__(self) -> ProcScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan(
        self,
        details: frozenset[str] = frozenset(),
        *,
        self_pid: int | None = None,
        pids: Iterable[int] | None = None,
        refresh: Iterable[int] = (),
    ) -> Snapshot:
        """Like read_snapshot(), from what changed since the last scan. ``refresh``: PIDs
        whose status and details must be read in this scan (the finalists)."""
        _check_details(details)
        taken_at = time.monotonic()
        self._scans += 1
        self.status_reads = 0
        total_ram_bytes, total_swap_bytes = read_meminfo_totals(self.proc_root)
        wanted = list_pids(self.proc_root) if pids is None else sorted(set(pids))
        forced = frozenset(refresh)
        root = self._root
        processes = []
        tracked_get = self._tracked.get
        scans = self._scans
        pread = os.pread
        for pid in wanted:
            tracked = tracked_get(pid)
            stat_raw: bytes | None = None
            if (
                tracked is not None
                and tracked.adj_fd >= 0  # a user process (kernel threads hold no adj fd) ...
                and tracked.stat_fd >= 0  # ... with both files held
                and scans < tracked.status_due
                and pid not in forced
                and (tracked.details is details or details <= tracked.details)
            ):
                # The common case spelled out (it runs for nearly every process of every
                # scan): both held files read the same as last time, the process is as it was.
                try:
                    stat_raw = pread(tracked.stat_fd, _STAT_READ_SIZE, 0)
                    if stat_raw == tracked.stat_raw and pread(tracked.adj_fd, _STAT_READ_SIZE, 0) == tracked.adj_raw:
                        processes.append(tracked.info)
                        continue
                except OSError as exc:
                    if exc.errno not in _GONE_ERRNOS:
                        raise
                    stat_raw = None
            info = self._scan_one(pid, b"%s/%d/" % (root, pid), details, pid in forced, taken_at, stat_raw)
            if info is not None:
                processes.append(info)
        if len(self._tracked) > len(wanted):
            keep = set(wanted)
            for pid in [pid for pid in self._tracked if pid not in keep]:
                self._forget(pid)
        return Snapshot(
            processes=tuple(processes),
            taken_at=taken_at,
            page_size=self._page_size,
            total_ram_bytes=total_ram_bytes,
            total_swap_bytes=total_swap_bytes,
            self_pid=Pid(os.getpid() if self_pid is None else self_pid),
            details=details,
        )

    def _forget(self, pid: int) -> None:
        tracked = self._tracked.pop(pid, None)
        if tracked is None:
            return
        for fd in (tracked.stat_fd, tracked.adj_fd):
            if fd >= 0:
                os.close(fd)
                self._held -= 1

    def _scan_one(  # noqa: PLR0917  (private, one call site)
        self,
        pid: int,
        base: bytes,
        details: frozenset[str],
        forced: bool,
        taken_at: float,
        stat_raw: bytes | None,
    ) -> ProcessInfo | None:
        """``stat_raw``: the stat line scan() already read through the held fd, if it did."""
        tracked = self._tracked.get(pid)
        if tracked is None:
            return self._discover(pid, base, details, taken_at)
        if stat_raw is None:
            stat_raw = _pread(tracked.stat_fd) if tracked.stat_fd >= 0 else _read(base + b"stat", _STAT_READ_SIZE)
        if stat_raw is None:
            # Gone; the PID may already belong to a new process: follow that one afresh.
            self._forget(pid)
            return self._discover(pid, base, details, taken_at)
        info = tracked.info
        if info.kthread:
            if stat_raw == tracked.stat_raw:
                return info
            try:
                stat = parse_stat(stat_raw)
            except ValueError:
                return None
            if stat.starttime_ticks != info.starttime_ticks or not stat.flags & PF_KTHREAD:
                self._forget(pid)  # a recycled PID read by path
                return self._discover(pid, base, details, taken_at)
            tracked.stat_raw = stat_raw
            tracked.info = _kthread_info(pid, stat, details)
            return tracked.info
        adj_raw = _pread(tracked.adj_fd) if tracked.adj_fd >= 0 else _read(base + b"oom_score_adj")
        if adj_raw is None:
            self._forget(pid)
            return None
        if (
            stat_raw == tracked.stat_raw
            and not forced
            and self._scans < tracked.status_due
            and details <= tracked.details
        ):
            # Not run, not faulted, same rss: the status read of an earlier scan stands.
            if adj_raw != tracked.adj_raw:
                try:
                    info = replace(info, oom_score_adj=int(adj_raw))
                except ValueError:
                    return None
                tracked.adj_raw = adj_raw
                tracked.info = info
            return info
        try:
            stat = parse_stat(stat_raw)
            adj = int(adj_raw)
        except ValueError:
            return None
        if stat.starttime_ticks != info.starttime_ticks:
            self._forget(pid)  # a recycled PID read by path
            return self._discover(pid, base, details, taken_at)
        if (
            not forced
            and self._scans < tracked.status_due
            and details <= tracked.details
            and stat.name == info.name
            and stat.vsize_bytes == info.vm_size_bytes
            and stat.rss_pages == tracked.stat_rss_pages
        ):
            # It ran (CPU times, fault counts moved) but its memory did not: same name (no
            # exec), same mapped size, same rss counter. Page tables and swap move with those
            # (a fault that needs a page table or brings a page back from swap raises rss;
            # munmap shrinks vsize; reclaim to swap lowers rss), so the status read stands.
            # What slips through (a khugepaged collapse freeing a page table) is caught by
            # the rotation.
            tracked.stat_raw = stat_raw
            if (stat.state, stat.ppid, stat.pgid, adj) != (info.state, info.ppid, info.pgid, info.oom_score_adj):
                info = replace(info, state=stat.state, ppid=Pid(stat.ppid), pgid=stat.pgid, oom_score_adj=adj)
                tracked.adj_raw = adj_raw
                tracked.info = info
            return info
        status = self._read_status(base)
        if status is None:
            self._forget(pid)
            return None
        info = _user_info(base, pid, stat=stat, status=status, adj=adj, details=details, status_read_at=taken_at)
        tracked.stat_raw = stat_raw
        tracked.adj_raw = adj_raw
        tracked.info = info
        tracked.details = details
        tracked.status_due = self._scans + self._status_every
        tracked.stat_rss_pages = stat.rss_pages
        return info

    def _read_status(self, base: bytes) -> StatusFields | None:
        self.status_reads += 1
        data = _read(base + b"status")
        if data is None:
            return None
        try:
            return parse_status(data)
        except ValueError:
            return None

    def _hold(self, path: bytes) -> int:
        if self._held >= self._max_held_fds:
            return -1
        fd = _open_held(path)
        if fd is None:
            return -1
        self._held += 1
        return fd

    def _discover(self, pid: int, base: bytes, details: frozenset[str], taken_at: float) -> ProcessInfo | None:
        """First sight of a process: open what will be re-read, read everything."""
        stat_fd = self._hold(base + b"stat")
        adj_fd = -1
        tracked: _Tracked | None = None
        try:
            stat_raw = _pread(stat_fd) if stat_fd >= 0 else _read(base + b"stat", _STAT_READ_SIZE)
            if stat_raw is None:
                return None
            try:
                stat = parse_stat(stat_raw)
            except ValueError:
                return None
            if stat.flags & PF_KTHREAD:
                info = _kthread_info(pid, stat, details)
                tracked = _Tracked(stat_fd, -1, stat_raw, b"", info, details, 0)
                return info
            adj_fd = self._hold(base + b"oom_score_adj")
            adj_raw = _pread(adj_fd) if adj_fd >= 0 else _read(base + b"oom_score_adj")
            if adj_raw is None:
                return None
            status = self._read_status(base)
            if status is None:
                return None
            try:
                adj = int(adj_raw)
            except ValueError:
                return None
            info = _user_info(base, pid, stat=stat, status=status, adj=adj, details=details, status_read_at=taken_at)
            # Spread the periodic status re-reads of processes found together over the rotation.
            due = self._scans + 1 + pid % self._status_every
            tracked = _Tracked(stat_fd, adj_fd, stat_raw, adj_raw, info, details, due, stat.rss_pages)
            return info
        finally:
            if tracked is not None:
                self._tracked[pid] = tracked
            else:  # gone or unreadable: hold nothing for it
                for fd in (stat_fd, adj_fd):
                    if fd >= 0:
                        os.close(fd)
                        self._held -= 1


# --- cgroup files a report needs (sources/cgroup.py is the loop's reader) ------------------


def read_cgroup_procs(cgroup_dir: str) -> frozenset[int]:
    """PIDs in a cgroup directory and all its descendants (cgroup.procs, recursively)."""
    found: set[int] = set()
    for dirpath, _dirnames, filenames in os.walk(cgroup_dir):
        if "cgroup.procs" not in filenames:
            continue
        data = _read(os.fsencode(os.path.join(dirpath, "cgroup.procs")))
        if data:
            found.update(int(tok) for tok in data.split())
    return frozenset(found)


def read_cgroup_limit_bytes(cgroup_dir: str, *names: str) -> int | None:
    """The first of ``names`` that exists in ``cgroup_dir``, as bytes; "max" is None (unlimited)."""
    for name in names:
        data = _read(os.fsencode(os.path.join(cgroup_dir, name)))
        if data is None:
            continue
        text = data.strip()
        if text == b"max":
            return None
        return int(text)
    return None
