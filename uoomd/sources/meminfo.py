"""Read the machine's memory from /proc/meminfo into a MemoryReading."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self

from uoomd.readings import MemoryReading

_KEYS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")
_READ_SIZE = 4096  # /proc/meminfo is ~1.5 KiB on Linux 6.18 (58 lines); reads loop if it ever grows


class MeminfoError(ValueError):
    """/proc/meminfo said something that cannot be true (a missing key, available above total, ...)."""


def parse_meminfo(text: str) -> MemoryReading:
    """Parse /proc/meminfo text (values in kB, i.e. KiB) into a reading in bytes.

    Only MemTotal, MemAvailable, SwapTotal and SwapFree are used. MemAvailable is the
    kernel's own estimate (mm/show_mem.c si_mem_available(), Linux >= 3.14): free pages
    minus reserves plus the reclaimable part of the page cache and slab. It is what
    earlyoom and nohang watch too.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in _KEYS:
            continue
        fields = rest.split()
        if not fields or (len(fields) > 1 and fields[1] != "kB"):
            raise MeminfoError(f"/proc/meminfo: cannot read {key!r} from {line!r}")
        try:
            values[key] = int(fields[0]) * 1024
        except ValueError:
            raise MeminfoError(f"/proc/meminfo: {key} is not a number: {line!r}") from None
    missing = [k for k in _KEYS if k not in values]
    if missing:
        raise MeminfoError(f"/proc/meminfo: missing {', '.join(missing)} (MemAvailable needs Linux >= 3.14)")
    reading = MemoryReading(
        total_bytes=values["MemTotal"],
        available_bytes=values["MemAvailable"],
        swap_total_bytes=values["SwapTotal"],
        swap_free_bytes=values["SwapFree"],
    )
    _check_sane(reading)
    return reading


def _check_sane(reading: MemoryReading) -> None:
    if reading.total_bytes <= 0:
        raise MeminfoError(f"/proc/meminfo: MemTotal is {reading.total_bytes} bytes")
    if reading.available_bytes > reading.total_bytes:
        raise MeminfoError(
            f"/proc/meminfo: MemAvailable ({reading.available_bytes} B) exceeds MemTotal ({reading.total_bytes} B)"
        )
    if reading.swap_free_bytes > reading.swap_total_bytes:
        raise MeminfoError(
            f"/proc/meminfo: SwapFree ({reading.swap_free_bytes} B) exceeds SwapTotal ({reading.swap_total_bytes} B)"
        )


def pread_all(fd: int, size: int = _READ_SIZE) -> bytes:
    """The whole content of a /proc or cgroup file from offset 0, without moving the file offset.

    seq_file files regenerate their text when read at offset 0 (fs/seq_file.c
    seq_read_iter()), so one open fd serves every poll.
    """
    data = os.pread(fd, size, 0)
    if len(data) < size:
        return data
    chunks = [data]
    offset = len(data)
    while True:
        more = os.pread(fd, size, offset)
        if not more:
            return b"".join(chunks)
        chunks.append(more)
        offset += len(more)


class MeminfoReader:
    """Keeps /proc/meminfo open and reads it with pread at every poll.

    Measured here (Linux 6.18, Python 3.11, 2 cores; 100,000 iterations of each in a
    time.perf_counter() loop): pread on the kept fd 6.4 µs, os.open+os.read+os.close
    9.7 µs, builtin open().read() 14.0 µs; parse_meminfo 11.2 µs; MeminfoReader.read 17.3 µs.
    Keeping the fd also means a daemon under memory pressure needs no
    new file descriptor, dentry lookup or allocation to look at memory.
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self.path = os.path.join(proc_root, "meminfo")
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("MeminfoReader is closed")
        return self._fd

    def read_text(self) -> str:
        return pread_all(self.fileno()).decode("ascii", errors="replace")

    def read(self) -> MemoryReading:
        return parse_meminfo(self.read_text())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
