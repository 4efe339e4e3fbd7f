"""Parsing and reading /proc, on text samples and on recorded trees (tests/fixtures/proc)."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.builders import CHILDREN, IDLE, recorded_children
from uoomd.readings import ProcessInfo
from uoomd.sources import procfs
from uoomd.sources.scanner import ProcScanner

pytestmark = pytest.mark.unit

STAT = (
    b"4242 (evil) S 1 1\nx) S 77 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 "
    b"123456 10485760 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
)


def test_parse_stat_ends_comm_at_the_last_paren() -> None:
    stat = procfs.parse_stat(STAT)
    assert stat.name == "evil) S 1 1\nx"
    assert (stat.state, stat.ppid, stat.pgid) == ("S", 77, 4242)
    assert stat.starttime_ticks == 123456
    assert stat.vsize_bytes == 10485760
    assert stat.rss_pages == 2560
    assert not stat.kthread


def test_parse_stat_sees_pf_kthread() -> None:
    line = b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
    assert procfs.parse_stat(line).kthread


def test_parse_stat_rejects_a_truncated_line() -> None:
    with pytest.raises(ValueError, match="fields"):
        procfs.parse_stat(b"12 (x) S 1 1")


def test_parse_status_converts_kib_to_bytes() -> None:
    text = (
        "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nRssAnon:\t     108 kB\nRssFile:\t    1640 kB\n"
        "RssShmem:\t       4 kB\nVmPTE:\t      48 kB\nVmSwap:\t      12 kB\n"
    )
    status = procfs.parse_status(text)
    assert status.uid == 1000
    assert status.has_mm
    assert (status.rss_anon_bytes, status.rss_file_bytes, status.rss_shmem_bytes) == (108 << 10, 1640 << 10, 4 << 10)
    assert (status.pgtables_bytes, status.swap_bytes) == (48 << 10, 12 << 10)


def test_parse_status_of_a_zombie_has_no_mm() -> None:
    status = procfs.parse_status("Name:\tx\nState:\tZ (zombie)\nUid:\t0\t0\t0\t0\nThreads:\t1\n")
    assert not status.has_mm
    assert status.rss_anon_bytes == 0


def test_parse_status_ignores_keys_hidden_in_the_name_line() -> None:
    status = procfs.parse_status("Name:\tUid: 5 RssAnon: 9\nUid:\t7\t7\t7\t7\n")
    assert status.uid == 7
    assert not status.has_mm


def test_parse_cmdline_turns_nuls_into_spaces() -> None:
    assert procfs.parse_cmdline(b"python3\0-c\0print(1)\0") == "python3 -c print(1)"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("12:memory:/app/web\n11:cpu:/x\n0::/user.slice\n", "/app/web"),
        ("5:cpu,memory:/a\n", "/a"),
        ("0::/system.slice/foo.service\n", "/system.slice/foo.service"),
        ("3:cpu:/x\n", None),
    ],
)
def test_parse_cgroup_prefers_the_v1_memory_line_then_v2(text: str, want: str | None) -> None:
    assert procfs.parse_cgroup(text) == want


def test_read_snapshot_reads_a_recorded_tree() -> None:
    snap = procfs.read_snapshot(IDLE, details=frozenset({"cmdline", "exe", "cgroup", "user"}))
    assert len(snap.processes) > 20
    assert snap.total_ram_bytes > 0
    kthreads = [p for p in snap.processes if p.kthread]
    users = [p for p in snap.processes if not p.kthread]
    assert kthreads
    assert users
    assert all(p.exe is None and p.mm_rss_pages == 0 for p in kthreads)
    # readlink(exe) may fail (here: init's exe, outside this container's view): None, not an error
    with_exe = [p for p in users if p.exe is not None]
    assert with_exe
    assert all(p.exe.startswith("/") for p in with_exe if p.exe is not None)
    init = next(p for p in snap.processes if p.pid == 1)
    assert init.user == "root"
    assert init.cgroup is not None


def test_read_snapshot_reads_details_only_when_asked() -> None:
    snap = procfs.read_snapshot(IDLE)
    assert all(p.cmdline is None and p.exe is None and p.cgroup is None and p.user is None for p in snap.processes)


def test_recorded_children_tree_has_hostile_name_zombie_and_adjs() -> None:
    snap = procfs.read_snapshot(CHILDREN, details=frozenset({"cmdline"}))
    ours = {p.pid: p for p in snap.processes if p.pid in set(recorded_children(CHILDREN))}
    names = {p.name for p in ours.values()}
    assert "evil) S 1 1\nx" in names
    zombies = [p for p in ours.values() if p.state == "Z"]
    assert len(zombies) == 1
    assert not zombies[0].has_mm
    adjs = {p.name: p.oom_score_adj for p in ours.values()}
    assert adjs["hog-adj-pos"] == 500
    assert adjs["hog-adj-max"] == 1000


def test_restricting_pids_reads_only_those(tmp_path: Path) -> None:
    snap = procfs.read_snapshot(IDLE, pids=[1, 999_999])
    assert [p.pid for p in snap.processes] == [1]


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(IDLE, root, symlinks=True)
    return root


def test_a_process_with_missing_files_is_skipped_as_vanished(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "1" / "status").unlink()  # it exited between reading stat and status
    snap = procfs.read_snapshot(str(root))
    assert 1 not in {p.pid for p in snap.processes}
    assert len(snap.processes) == len(procfs.read_snapshot(IDLE).processes) - 1


def test_an_empty_pid_dir_is_skipped(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "4000000").mkdir()
    assert 4000000 not in {p.pid for p in procfs.read_snapshot(str(root)).processes}


def test_permission_and_esrch_errors_skip_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads every fixture file, so chmod cannot simulate EPERM here: make os.open fail
    # the way the kernel does instead (EACCES on open, ESRCH on read of an exited task).
    root = _copy_tree(tmp_path)
    real_open, real_read = os.open, os.read
    denied = os.fsencode(str(root / "1" / "status"))
    gone = os.fsencode(str(root / "2" / "stat"))
    gone_fds: set[int] = set()

    def fake_open(path: bytes, flags: int, *args: int) -> int:
        if path == denied:
            raise PermissionError(errno.EACCES, "Permission denied")
        fd = real_open(path, flags, *args)
        if path == gone:
            gone_fds.add(fd)
        return fd

    def fake_read(fd: int, size: int) -> bytes:
        if fd in gone_fds:
            gone_fds.discard(fd)
            raise ProcessLookupError(errno.ESRCH, "No such process")
        return real_read(fd, size)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "read", fake_read)
    pids = {p.pid for p in procfs.read_snapshot(str(root)).processes}
    assert 1 not in pids
    assert 2 not in pids
    assert len(pids) > 10


def test_other_read_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_open(path: bytes, flags: int, *args: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(OSError, match="Too many open files"):
        procfs.read_process(IDLE, 1)


def test_read_oom_score_of_a_missing_pid_is_none() -> None:
    assert procfs.read_oom_score(IDLE, 999_999) is None
    assert procfs.read_oom_score(IDLE, 1) is not None


def test_unknown_detail_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown process details"):
        procfs.read_snapshot(IDLE, details=frozenset({"environ"}))


# --- ProcScanner: the incremental scan --------------------------------------------------


def _user_pid(root: Path) -> int:
    """A user process of the recorded tree (not init, not a kernel thread)."""
    snap = procfs.read_snapshot(str(root))
    return next(p.pid for p in snap.processes if not p.kthread and p.has_mm and p.pid != 1)


def _set_stat_field(root: Path, pid: int, index: int, value: int) -> None:
    """Rewrite one field (0-based after the comm) of a recorded stat line in place, so a
    held fd on the file sees it, as it sees a live process's new line."""
    path = root / str(pid) / "stat"
    data = path.read_bytes()
    close_at = data.rfind(b")")
    rest = data[close_at + 2 :].split(b" ")
    rest[index] = b"%d" % value
    path.write_bytes(data[: close_at + 2] + b" ".join(rest))


def _set_status_kib(root: Path, pid: int, key: str, kib: int) -> None:
    path = root / str(pid) / "status"
    lines = [
        f"{key}:\t{kib:8d} kB" if line.startswith(f"{key}:") else line
        for line in path.read_text(errors="surrogateescape").split("\n")
    ]
    path.write_text("\n".join(lines), errors="surrogateescape")


def _without_status_time(p: ProcessInfo) -> ProcessInfo:
    return replace(p, status_read_at=None)


def test_scanner_first_scan_equals_read_snapshot(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    details = frozenset({"cmdline", "exe", "cgroup", "user"})
    with ProcScanner(str(root)) as scanner:
        snap = scanner.scan(details)
    fresh = procfs.read_snapshot(str(root), details=details)
    assert tuple(_without_status_time(p) for p in snap.processes) == fresh.processes
    assert all(p.status_read_at == snap.taken_at for p in snap.processes if not p.kthread)


def test_scanner_hands_back_the_same_object_for_an_unchanged_process(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root)) as scanner:
        first = {int(p.pid): p for p in scanner.scan().processes}
        second = scanner.scan()
    again = {int(p.pid): p for p in second.processes}
    assert again[pid] is first[pid]
    read_at = again[pid].status_read_at
    assert read_at is not None
    assert read_at < second.taken_at  # carried over: not this scan's


def test_scanner_rereads_status_when_the_stat_line_changes(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root)) as scanner:
        scanner.scan()
        _set_stat_field(root, pid, 21, 777_777)  # rss: the process faulted
        _set_status_kib(root, pid, "VmPTE", 4444)
        snap = scanner.scan()
    info = next(p for p in snap.processes if p.pid == pid)
    assert info.mm_rss_pages == 777_777
    assert info.pgtables_bytes == 4444 << 10
    assert info.status_read_at == snap.taken_at


def test_scanner_carries_status_of_an_unchanged_stat_until_the_rotation(tmp_path: Path) -> None:
    # The documented approximation: status alone changing (a THP collapse freeing a page
    # table, say) is seen at the latest STATUS_EVERY_SCANS scans later.
    root = _copy_tree(tmp_path)
    every = 4
    snap = procfs.read_snapshot(str(root))
    # Re-reads are spread over the rotation by PID: take one not due at the very next scan.
    pid = next(p.pid for p in snap.processes if not p.kthread and p.has_mm and p.pid != 1 and p.pid % every)
    with ProcScanner(str(root), status_every_scans=every) as scanner:
        old = next(p for p in scanner.scan().processes if p.pid == pid).pgtables_bytes
        _set_status_kib(root, pid, "VmPTE", 4444)
        assert old != 4444 << 10
        seen = [next(p for p in scanner.scan().processes if p.pid == pid).pgtables_bytes for _ in range(every)]
    assert seen[0] == old
    assert seen[-1] == 4444 << 10


def test_scanner_reads_oom_score_adj_at_every_scan(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root)) as scanner:
        scanner.scan()
        (root / str(pid) / "oom_score_adj").write_bytes(b"913\n")
        info = next(p for p in scanner.scan().processes if p.pid == pid)
    assert info.oom_score_adj == 913


def test_scanner_refresh_rereads_the_named_processes(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root), status_every_scans=1000) as scanner:
        scanner.scan()
        _set_status_kib(root, pid, "VmPTE", 4444)
        snap = scanner.scan(refresh=[pid])
        assert 1 <= scanner.status_reads <= 2  # this one, and one other if the rotation is due
    info = next(p for p in snap.processes if p.pid == pid)
    assert info.pgtables_bytes == 4444 << 10
    assert info.status_read_at == snap.taken_at


def test_scanner_reads_details_asked_for_later(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    with ProcScanner(str(root)) as scanner:
        scanner.scan()
        snap = scanner.scan(frozenset({"cmdline"}))
    assert all(p.cmdline is not None for p in snap.processes if not p.kthread)


def test_scanner_follows_a_recycled_pid_as_a_new_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A held fd pins the struct pid it was opened for: once that process is gone, pread
    # answers ESRCH (tests/integration checks the real kernel does), and the PID's files
    # now show the new process.
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    real_pread, real_close = os.pread, os.close
    dead: set[int] = set()

    def fake_pread(fd: int, size: int, offset: int) -> bytes:
        if fd in dead:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        return real_pread(fd, size, offset)

    def fake_close(fd: int) -> None:
        dead.discard(fd)  # the number may be reused by a new open: that one is alive
        real_close(fd)

    monkeypatch.setattr(os, "pread", fake_pread)
    monkeypatch.setattr(os, "close", fake_close)
    with ProcScanner(str(root)) as scanner:
        old = next(p for p in scanner.scan().processes if p.pid == pid)
        dead.update(int(fd) for fd in os.listdir("/proc/self/fd"))  # every fd open now: old incarnations
        _set_stat_field(root, pid, 19, old.starttime_ticks + 5000)
        held = scanner.held_fds
        new = next(p for p in scanner.scan().processes if p.pid == pid)
        assert scanner.held_fds == held
    assert new.starttime_ticks == old.starttime_ticks + 5000
    assert new.key != old.key


def test_scanner_forgets_vanished_processes_and_closes_their_fds(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root)) as scanner:
        scanner.scan()
        held = scanner.held_fds
        shutil.rmtree(root / str(pid))
        snap = scanner.scan()
        assert scanner.held_fds == held - 2  # stat and oom_score_adj
    assert pid not in {p.pid for p in snap.processes}


def test_scanner_close_releases_every_fd(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    scanner = ProcScanner(str(root))
    scanner.scan()
    assert len(os.listdir("/proc/self/fd")) == before + scanner.held_fds > before
    scanner.close()
    assert scanner.held_fds == 0
    assert len(os.listdir("/proc/self/fd")) == before
    assert scanner.scan().processes  # usable again after close()
    scanner.close()


def test_scanner_without_an_fd_budget_reads_by_path(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root), max_held_fds=0) as scanner:
        first = scanner.scan()
        _set_stat_field(root, pid, 21, 777_777)
        second = scanner.scan()
        assert scanner.held_fds == 0
    assert len(first.processes) == len(second.processes)
    assert next(p for p in second.processes if p.pid == pid).mm_rss_pages == 777_777


def test_scanner_out_of_fds_falls_back_to_reads_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_tree(tmp_path)
    real_open = os.open
    opened = 0

    def fake_open(path: bytes, flags: int, *args: int) -> int:
        nonlocal opened
        opened += 1
        if opened > 5:  # the held fds after the fifth hit RLIMIT_NOFILE
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args)

    with ProcScanner(str(root)) as scanner:
        monkeypatch.setattr(os, "open", fake_open)
        with pytest.raises(OSError, match="Too many open files"):
            scanner.scan()  # the reads by path need an fd too: the scan fails, loudly
        monkeypatch.setattr(os, "open", real_open)
        assert len(scanner.scan().processes) == len(procfs.read_snapshot(str(root)).processes)


def test_scanner_keeps_the_status_of_a_process_that_ran_without_memory_change(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    pid = _user_pid(root)
    with ProcScanner(str(root), status_every_scans=1000) as scanner:
        before = next(p for p in scanner.scan().processes if p.pid == pid)
        _set_stat_field(root, pid, 11, 99_999)  # utime: it ran
        _set_stat_field(root, pid, 2, 4321)  # pgid: it called setpgid()
        _set_status_kib(root, pid, "VmPTE", 4444)
        ran = next(p for p in scanner.scan().processes if p.pid == pid)
        assert ran.pgid == 4321  # stat's own fields are this scan's
        assert ran.pgtables_bytes == before.pgtables_bytes  # status carried: same name, vsize, rss
        assert ran.status_read_at == before.status_read_at
        _set_stat_field(root, pid, 20, before.vm_size_bytes + (1 << 20))  # mmap(): vsize moved
        moved = next(p for p in scanner.scan().processes if p.pid == pid)
    assert moved.pgtables_bytes == 4444 << 10


def test_parse_last_pid_is_the_last_field_of_loadavg() -> None:
    from uoomd.sources.procfs import parse_last_pid

    assert parse_last_pid("2.66 1.64 0.86 4/103 17473\n") == 17473
