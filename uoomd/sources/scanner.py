"""Scan /proc again and again, re-reading only what can have changed: the reader behind the daemon's warm ranking.

sources/procfs.py parses and reads afresh (read_snapshot()); ProcScanner keeps fds and
parsed values between scans and hands back the very same ProcessInfo for a process that did
not change, which lets scoring.rank(previous=) reuse its verdict.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from uoomd.readings import Pid, ProcessInfo, Snapshot
from uoomd.sources.meminfo import read_meminfo_totals
from uoomd.sources.procfs import (
    GONE_ERRNOS,
    PF_KTHREAD,
    StatusFields,
    check_details,
    kthread_info,
    list_pids,
    parse_stat,
    parse_status,
    read_file,
    read_page_size,
    user_process_info,
)

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
        if exc.errno in GONE_ERRNOS:
            return None
        raise


def _open_held(path: bytes) -> int | None:
    """An fd to keep, or None: the process is gone, or no fd is left to keep (EMFILE,
    ENFILE), in which case the file is read by path, as read_snapshot() does."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in GONE_ERRNOS or exc.errno in (errno.EMFILE, errno.ENFILE):
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
        check_details(details)
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
                    if exc.errno not in GONE_ERRNOS:
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
            stat_raw = _pread(tracked.stat_fd) if tracked.stat_fd >= 0 else read_file(base + b"stat", _STAT_READ_SIZE)
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
            tracked.info = kthread_info(pid, stat, details)
            return tracked.info
        adj_raw = _pread(tracked.adj_fd) if tracked.adj_fd >= 0 else read_file(base + b"oom_score_adj")
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
        info = user_process_info(base, pid, stat=stat, status=status, adj=adj, details=details, status_read_at=taken_at)
        tracked.stat_raw = stat_raw
        tracked.adj_raw = adj_raw
        tracked.info = info
        tracked.details = details
        tracked.status_due = self._scans + self._status_every
        tracked.stat_rss_pages = stat.rss_pages
        return info

    def _read_status(self, base: bytes) -> StatusFields | None:
        self.status_reads += 1
        data = read_file(base + b"status")
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
            stat_raw = _pread(stat_fd) if stat_fd >= 0 else read_file(base + b"stat", _STAT_READ_SIZE)
            if stat_raw is None:
                return None
            try:
                stat = parse_stat(stat_raw)
            except ValueError:
                return None
            if stat.flags & PF_KTHREAD:
                info = kthread_info(pid, stat, details)
                tracked = _Tracked(stat_fd, -1, stat_raw, b"", info, details, 0)
                return info
            adj_fd = self._hold(base + b"oom_score_adj")
            adj_raw = _pread(adj_fd) if adj_fd >= 0 else read_file(base + b"oom_score_adj")
            if adj_raw is None:
                return None
            status = self._read_status(base)
            if status is None:
                return None
            try:
                adj = int(adj_raw)
            except ValueError:
                return None
            info = user_process_info(
                base, pid, stat=stat, status=status, adj=adj, details=details, status_read_at=taken_at
            )
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
