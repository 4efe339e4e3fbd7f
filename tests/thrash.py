"""Page-cache thrash for PSI tests: a small program and a disk file it re-reads (stdlib + pytest).

In a 64 MiB memory cgroup, 40 MiB of anonymous memory plus a 48 MiB file read in a loop
keeps reclaiming and re-reading the cache: 100-150 ms/s of memory stall on Linux 6.18,
with no OOM kill (the file cache is always reclaimable).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

MIB = 1 << 20

THRASH_PROGRAM = """
import sys
anon = bytearray(40 << 20)
for i in range(0, len(anon), 4096):
    anon[i] = 1
while True:
    with open(sys.argv[1], "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
"""


def _fstype(path: str) -> str:
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype


@contextlib.contextmanager
def thrash_file(tmp_path: Path) -> Iterator[str]:
    """A 48 MiB file on a disk filesystem, not in the page cache."""
    candidates = ["/var/tmp", str(tmp_path), "/work"]
    directory = next((d for d in candidates if os.path.isdir(d) and _fstype(d) not in ("tmpfs", "ramfs", "")), None)
    if directory is None:
        pytest.skip("no disk-backed directory for the thrash file (all candidates are tmpfs)")
    path = os.path.join(directory, f"uoomd-test-thrash-{secrets.token_hex(4)}.dat")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            chunk = os.urandom(MIB)
            for _ in range(48):
                os.write(fd, chunk)
            os.fsync(fd)
            # Drop our own cached copy: it is charged to our cgroup, and the child must read
            # (and be charged for) the pages itself.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        yield path
    finally:
        if os.path.exists(path):
            os.unlink(path)
