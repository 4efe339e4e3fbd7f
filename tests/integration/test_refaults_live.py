"""The refault count on the real kernel: /proc/vmstat, and a memory cgroup whose page cache thrashes.

The guard's refault gate (uoomd/thrash.py) rests on these counters moving when evicted pages
are needed again, and only then. A cgroup of 64 MiB reading a 96 MiB file over and over
must evict and refault its own cache; the same file read in a cgroup that holds it does not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.cgroups import scratch_cgroup
from uoomd.sources.cgroup import CgroupMemoryReader
from uoomd.sources.meminfo import MeminfoReader, read_meminfo_totals

pytestmark = pytest.mark.integration

MiB = 1 << 20
READER = """
import sys
for _ in range(int(sys.argv[2])):
    with open(sys.argv[1], "rb") as f:
        while f.read(1 << 20):
            pass
"""


def test_the_machine_reading_carries_the_refault_count_only_when_asked() -> None:
    with MeminfoReader() as plain, MeminfoReader(refaults=True) as counted:
        assert plain.read().refault_bytes is None
        first = counted.read().refault_bytes
        assert first is not None
        assert (counted.read().refault_bytes or 0) >= first  # a counter since boot


def _refaults_after_reading(limit_bytes: int, data: Path, passes: int) -> int:
    total_ram, total_swap = read_meminfo_totals("/proc")
    # Cold first: cached pages stay charged to whoever read them first (here: this test),
    # so the cgroup must read them from disk to own, evict and refault them.
    fd = os.open(data, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with scratch_cgroup(limit_bytes=limit_bytes) as cg:
        reader = CgroupMemoryReader(cg.memory_path, total_ram, total_swap)
        try:
            before = reader.read().refault_bytes
            assert before is not None, "this kernel's memory.stat has workingset_refault counters"
            child = cg.spawn([sys.executable, "-c", READER, str(data), str(passes)])
            assert child.wait(120) == 0
            after = reader.read().refault_bytes
            assert after is not None
            return after - before
        finally:
            reader.close()


def test_a_cgroup_whose_cache_thrashes_refaults_and_one_that_holds_it_does_not(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with data.open("wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    thrash = _refaults_after_reading(64 * MiB, data, 4)
    fits = _refaults_after_reading(512 * MiB, data, 4)
    print(f"refaulted: 64 MiB cgroup {thrash / MiB:.1f} MiB, 512 MiB cgroup {fits / MiB:.1f} MiB")
    assert thrash >= 64 * MiB, "each pass after the first reads back pages the cgroup evicted"
    assert fits < 8 * MiB
