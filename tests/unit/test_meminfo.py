"""parse_meminfo on /proc/meminfo text captured on the development machine and on edge cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uoomd.sources.meminfo import MeminfoError, MeminfoReader, parse_meminfo

pytestmark = pytest.mark.unit

# Captured on the development machine (Linux 6.18, 24 GiB, no swap).
REAL_MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        24043884 kB
MemAvailable:   24271484 kB
Buffers:           16184 kB
Cached:           391060 kB
SwapCached:            0 kB
Active:           200176 kB
Inactive:         206316 kB
Active(anon):       1540 kB
Inactive(anon):     6588 kB
Active(file):     198636 kB
Inactive(file):   199728 kB
Unevictable:       15008 kB
Mlocked:           13928 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:              1448 kB
Writeback:             0 kB
AnonPages:         14372 kB
Mapped:            10752 kB
Shmem:              8872 kB
KReclaimable:      80028 kB
Slab:             103348 kB
SReclaimable:      80028 kB
SUnreclaim:        23320 kB
CommitLimit:    12342040 kB
Committed_AS:      59544 kB
VmallocTotal:   34359738367 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
DirectMap1G:    25165824 kB
"""


def _meminfo(total: int = 8000000, avail: int = 4000000, swap_total: int = 2000000, swap_free: int = 1500000) -> str:
    return (
        f"MemTotal: {total} kB\nMemFree: 100 kB\nMemAvailable: {avail} kB\n"
        f"SwapTotal: {swap_total} kB\nSwapFree: {swap_free} kB\n"
    )


def test_real_meminfo_is_read_in_bytes() -> None:
    reading = parse_meminfo(REAL_MEMINFO)
    assert reading.total_bytes == 24684084 * 1024
    assert reading.available_bytes == 24271484 * 1024
    assert reading.swap_total_bytes == 0
    assert reading.swap_free_bytes == 0
    assert reading.swap_free_fraction == 0.0  # no swap: no division by zero


def test_swap_values_are_converted_from_kib() -> None:
    reading = parse_meminfo(_meminfo())
    assert reading.swap_total_bytes == 2000000 * 1024
    assert reading.swap_free_bytes == 1500000 * 1024
    assert reading.available_fraction == pytest.approx(0.5)


def test_lines_without_kb_unit_and_unknown_keys_are_ignored() -> None:
    text = _meminfo() + "HugePages_Total:       0\nSomeFutureField:  12 kB\n"
    assert parse_meminfo(text).total_bytes == 8000000 * 1024


@pytest.mark.parametrize("missing", ["MemTotal", "MemAvailable", "SwapTotal", "SwapFree"])
def test_a_missing_key_is_named_in_the_error(missing: str) -> None:
    text = "\n".join(line for line in _meminfo().splitlines() if not line.startswith(missing + ":"))
    with pytest.raises(MeminfoError, match=missing):
        parse_meminfo(text)


def test_available_above_total_is_refused() -> None:
    with pytest.raises(MeminfoError, match=r"MemAvailable .* exceeds MemTotal"):
        parse_meminfo(_meminfo(total=1000, avail=2000))


def test_swap_free_above_swap_total_is_refused() -> None:
    with pytest.raises(MeminfoError, match=r"SwapFree .* exceeds SwapTotal"):
        parse_meminfo(_meminfo(swap_total=10, swap_free=20))


def test_zero_total_is_refused() -> None:
    with pytest.raises(MeminfoError, match="MemTotal"):
        parse_meminfo(_meminfo(total=0, avail=0))


@pytest.mark.parametrize(
    "line", ["MemAvailable: lots kB", "MemAvailable:", "MemAvailable: 12 MB"], ids=["word", "empty", "unit"]
)
def test_a_garbled_value_is_refused(line: str) -> None:
    text = "\n".join(line if x.startswith("MemAvailable:") else x for x in _meminfo().splitlines())
    with pytest.raises(MeminfoError, match="MemAvailable"):
        parse_meminfo(text)


def test_meminfo_error_is_a_value_error() -> None:
    assert issubclass(MeminfoError, ValueError)


def test_reader_reads_a_fixture_proc_root_at_every_call(tmp_path: Path) -> None:
    path = os.path.join(tmp_path, "meminfo")
    with open(path, "w") as f:
        f.write(_meminfo(avail=4000000))
    with MeminfoReader(proc_root=str(tmp_path)) as reader:
        assert reader.read().available_bytes == 4000000 * 1024
        with open(path, "r+") as f:  # rewrite in place: the kept fd sees the new text
            f.write(_meminfo(avail=3000000))
        assert reader.read().available_bytes == 3000000 * 1024


def test_reader_reads_files_longer_than_one_chunk(tmp_path: Path) -> None:
    padding = "".join(f"Pad{i}: {i} kB\n" for i in range(600))  # ~8 KiB: more than one 4 KiB pread
    with open(os.path.join(tmp_path, "meminfo"), "w") as f:
        f.write(padding + _meminfo(swap_free=1234))
    with MeminfoReader(proc_root=str(tmp_path)) as reader:
        assert reader.read().swap_free_bytes == 1234 * 1024


def test_closed_reader_refuses_to_read(tmp_path: Path) -> None:
    with open(os.path.join(tmp_path, "meminfo"), "w") as f:
        f.write(_meminfo())
    reader = MeminfoReader(proc_root=str(tmp_path))
    reader.close()
    reader.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        reader.read()
