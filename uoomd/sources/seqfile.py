"""Keep a /proc or cgroup file open and read it whole, from offset 0, at every poll.

seq_file and kernfs files regenerate their text when read at offset 0 (fs/seq_file.c
seq_read_iter(), fs/kernfs/file.c), so one open fd serves every poll: a daemon under
memory pressure needs no new file descriptor, dentry lookup or allocation to look.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self

_READ_SIZE = 4096  # /proc/meminfo is ~1.5 KiB on Linux 6.18 (58 lines); reads loop if a file ever grows


def pread_all(fd: int, size: int = _READ_SIZE) -> bytes:
    """The whole content of a kept file from offset 0, without moving the file offset."""
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


class Closing:
    """Closes itself at the end of a ``with`` block: every reader here keeps fds until close()."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class KeptFile(Closing):
    """One file opened once and re-read with :func:`pread_all`; the readers of meminfo and PSI files are these."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    def read_bytes(self) -> bytes:
        return pread_all(self.fileno())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
