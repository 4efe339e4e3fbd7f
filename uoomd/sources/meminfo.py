"""Read the machine's memory from /proc/meminfo: a MemoryReading at each poll, and the totals a scan needs."""

from __future__ import annotations

import os
from dataclasses import replace

from uoomd.readings import MemoryReading
from uoomd.sources.seqfile import KeptFile
from uoomd.sources.vmstat import VmstatReader

_KEYS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")
_TOTALS = ("MemTotal", "SwapTotal")


class MeminfoError(ValueError):
    """/proc/meminfo said something that cannot be true (a missing key, available above total, ...)."""


def _parse_kib_lines(text: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The ``Key: N kB`` lines of ``keys`` that are present, in bytes (kB is KiB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in keys:
            continue
        fields = rest.split()
        if not fields or (len(fields) > 1 and fields[1] != "kB"):
            raise MeminfoError(f"/proc/meminfo: cannot read {key!r} from {line!r}")
        try:
            values[key] = int(fields[0]) * 1024
        except ValueError:
            raise MeminfoError(f"/proc/meminfo: {key} is not a number: {line!r}") from None
    return values


def parse_meminfo(text: str) -> MemoryReading:
    """Parse /proc/meminfo text (values in kB, i.e. KiB) into a reading in bytes.

    Only MemTotal, MemAvailable, SwapTotal and SwapFree are used. MemAvailable is the
    kernel's own estimate (mm/show_mem.c si_mem_available(), Linux >= 3.14): free pages
    minus reserves plus the reclaimable part of the page cache and slab. It is what
    earlyoom and nohang watch too.
    """
    values = _parse_kib_lines(text, _KEYS)
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


def parse_meminfo_totals(text: str) -> tuple[int, int]:
    """(MemTotal, SwapTotal) in bytes: what oom_badness()'s totalpages is made of. MemTotal is
    totalram_pages() and SwapTotal total_swap_pages, in kB (fs/proc/meminfo.c meminfo_proc_show());
    a kernel without swap support prints no SwapTotal: 0."""
    values = _parse_kib_lines(text, _TOTALS)
    if "MemTotal" not in values:
        raise MeminfoError("/proc/meminfo: missing MemTotal")
    return values["MemTotal"], values.get("SwapTotal", 0)


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


def read_meminfo_totals(proc_root: str = "/proc") -> tuple[int, int]:
    """(MemTotal, SwapTotal) in bytes, read afresh (a scan, a cgroup reader's machine facts)."""
    path = os.path.join(proc_root, "meminfo")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    return parse_meminfo_totals(data.decode("ascii", errors="replace"))


class MeminfoReader(KeptFile):
    """Keeps /proc/meminfo open and reads it with pread at every poll.

    Measured here (Linux 6.18, Python 3.11, 2 cores; 100,000 iterations of each in a
    time.perf_counter() loop): pread on the kept fd 6.4 µs, os.open+os.read+os.close
    9.7 µs, builtin open().read() 14.0 µs; parse_meminfo 11.2 µs; MeminfoReader.read 17.3 µs.
    """

    def __init__(self, proc_root: str = "/proc", *, refaults: bool = False) -> None:
        super().__init__(os.path.join(proc_root, "meminfo"))
        # /proc/vmstat too, for a guard with a refault gate only: ~20 µs more per reading.
        self._vmstat: VmstatReader | None = None
        if refaults:
            try:
                self._vmstat = VmstatReader(proc_root)
            except BaseException:
                super().close()
                raise

    def read_text(self) -> str:
        return self.read_bytes().decode("ascii", errors="replace")

    def read(self) -> MemoryReading:
        reading = parse_meminfo(self.read_text())
        if self._vmstat is None:
            return reading
        return replace(reading, refault_bytes=self._vmstat.refault_bytes(), refaults_all=not self._vmstat.activations)

    def close(self) -> None:
        if self._vmstat is not None:
            self._vmstat.close()
            self._vmstat = None
        super().close()
