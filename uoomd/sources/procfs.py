"""Read processes from /proc into frozen ProcessInfo values (parse_* pure, read_* I/O).

This is the hot path of the daemon: every poll that needs a victim scans every PID.
Files are read with ``os.open``/``os.read`` on prebuilt byte paths (bench/scan.py
measures this against psutil), kernel threads cost one read, and the expensive
details (cmdline, exe, cgroup, user) are read only when asked for. read_snapshot()
reads everything afresh; sources/scanner.py (the daemon's warm ranking) builds on the
parsers and readers here to re-read only what can have changed.

A process may vanish or deny access between any two reads: it is skipped, never an error.
"""

from __future__ import annotations

import errno
import os
import pwd
import time
from collections.abc import Iterable
from dataclasses import dataclass

from uoomd.readings import Pid, ProcessInfo, Snapshot, Uid
from uoomd.sources.meminfo import read_meminfo_totals

PF_KTHREAD = 0x00200000  # include/linux/sched.h, Linux 6.18: "I am a kernel thread"

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


# --- I/O ---------------------------------------------------------------------------------

GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM, errno.ENOTDIR})


def read_file(path: bytes, size: int = _READ_SIZE) -> bytes | None:
    """One file in one read, or None when the process vanished or denied access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in GONE_ERRNOS:
            return None
        raise
    try:
        return os.read(fd, size)
    except OSError as exc:
        # ESRCH: the task exited between open and read (fs/proc/base.c get_proc_task()).
        if exc.errno in GONE_ERRNOS:
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


_KTHREAD_STATUS = StatusFields(uid=0, has_mm=False)


def kthread_info(pid: int, stat: StatFields, details: frozenset[str]) -> ProcessInfo:
    # Kernel threads are never victims (mm/oom_kill.c oom_unkillable_task()):
    # their status and oom_score_adj are never read, the scan's biggest saving.
    return _process_info(pid, stat, _KTHREAD_STATUS, adj=0, kthread=True, user="root" if "user" in details else None)


def _read_details(
    base: bytes, uid: int, details: frozenset[str]
) -> tuple[str | None, str | None, str | None, str | None]:
    """(cmdline, exe, cgroup, user), each None unless asked for."""
    cmdline = exe = cgroup = user = None
    if "cmdline" in details:
        raw = read_file(base + b"cmdline", _CMDLINE_MAX)
        cmdline = parse_cmdline(raw) if raw is not None else ""
    if "exe" in details:
        exe = _readlink(base + b"exe")
    if "cgroup" in details:
        raw = read_file(base + b"cgroup")
        cgroup = parse_cgroup(raw) if raw is not None else None
    if "user" in details:
        user = _user_name(uid)
    return cmdline, exe, cgroup, user


def user_process_info(
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
    return _process_info(
        pid,
        stat,
        status,
        adj=adj,
        kthread=False,
        vm_size_bytes=stat.vsize_bytes,
        status_read_at=status_read_at,
        cmdline=cmdline,
        exe=exe,
        cgroup=cgroup,
        user=user,
    )


def _process_info(
    pid: int,
    stat: StatFields,
    status: StatusFields,
    *,
    adj: int,
    kthread: bool,
    vm_size_bytes: int = 0,
    status_read_at: float | None = None,
    cmdline: str | None = None,
    exe: str | None = None,
    cgroup: str | None = None,
    user: str | None = None,
) -> ProcessInfo:
    return ProcessInfo(
        pid=Pid(pid),
        ppid=Pid(stat.ppid),
        pgid=stat.pgid,
        starttime_ticks=stat.starttime_ticks,
        name=stat.name,
        state=stat.state,
        uid=Uid(status.uid),
        kthread=kthread,
        has_mm=status.has_mm,
        oom_score_adj=adj,
        rss_anon_bytes=status.rss_anon_bytes,
        rss_file_bytes=status.rss_file_bytes,
        rss_shmem_bytes=status.rss_shmem_bytes,
        swap_bytes=status.swap_bytes,
        pgtables_bytes=status.pgtables_bytes,
        vm_size_bytes=vm_size_bytes,
        mm_rss_pages=stat.rss_pages if status.has_mm else 0,
        status_read_at=status_read_at,
        cmdline=cmdline,
        exe=exe,
        cgroup=cgroup,
        user=user,
    )


def _read_process(base: bytes, pid: int, details: frozenset[str]) -> ProcessInfo | None:
    """``base`` is ``b"/proc/PID/"``."""
    stat_data = read_file(base + b"stat")
    if stat_data is None:
        return None
    try:
        stat = parse_stat(stat_data)
    except ValueError:
        return None  # a half-written line cannot happen with one read; be safe anyway
    if stat.flags & PF_KTHREAD:
        return kthread_info(pid, stat, details)
    status_data = read_file(base + b"status")
    adj_data = read_file(base + b"oom_score_adj")
    if status_data is None or adj_data is None:
        return None
    try:
        status = parse_status(status_data)
        adj = int(adj_data)
    except ValueError:
        return None
    return user_process_info(base, pid, stat=stat, status=status, adj=adj, details=details)


def check_details(details: frozenset[str]) -> None:
    unknown = details - DETAILS
    if unknown:
        raise ValueError(f"unknown process details {sorted(unknown)}; known: {sorted(DETAILS)}")


def read_process(proc_root: str, pid: int, details: frozenset[str] = frozenset()) -> ProcessInfo | None:
    """One process, or None if it is gone or unreadable."""
    check_details(details)
    return _read_process(os.fsencode(proc_root) + b"/%d/" % pid, pid, details)


def read_stat(proc_root: str, pid: int) -> StatFields | None:
    """/proc/PID/stat alone, or None when the process is gone: what the executor re-checks
    (start time, pgid, PF_KTHREAD) after opening a pidfd."""
    data = read_file(os.fsencode(proc_root) + b"/%d/stat" % pid)
    if data is None:
        return None
    try:
        return parse_stat(data)
    except ValueError:
        return None  # one read gives a whole line; a malformed one is no process we know


def read_oom_score(proc_root: str, pid: int) -> int | None:
    """The kernel's /proc/PID/oom_score (fs/proc/base.c proc_oom_score()), or None if gone."""
    data = read_file(os.fsencode(proc_root) + b"/%d/oom_score" % pid)
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
    data = read_file(os.fsencode(proc_root) + b"/loadavg")
    if data is None:
        return None
    try:
        return parse_last_pid(data)
    except (ValueError, IndexError):
        return None


def read_pid_max(proc_root: str = "/proc") -> int:
    data = read_file(os.fsencode(proc_root) + b"/sys/kernel/pid_max")
    try:
        return int(data) if data else 1 << 22
    except ValueError:
        return 1 << 22  # PID_MAX_LIMIT on 64-bit


def is_thread_group_leader(proc_root: str, pid: int) -> bool:
    """Whether ``pid`` names a process (not one of its threads: /proc/TID exists too, unlisted)."""
    data = read_file(os.fsencode(proc_root) + b"/%d/status" % pid)
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
    check_details(details)
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
