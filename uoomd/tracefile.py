"""Trace files: write trace lines bounded by size (FILE, rotated once to FILE.1), and read them back line by line.

The format is uoomd/trace.py's; this module only moves its lines to and from files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from uoomd.trace import MAX_LINE_BYTES, TraceError, encode, encode_header, parse_line
from uoomd.tracelines import Header, TraceItem

DEFAULT_MAX_BYTES = 64 << 20  # per file: a recording keeps at most twice this (FILE and FILE.1)
MIN_MAX_BYTES = 64 << 10  # a header with a 256 KiB policy text must fit, plus some lines


class TraceWriter:
    """Appends trace lines to ``path``; past ``max_bytes`` the file becomes ``path.1`` (an older
    ``path.1`` is dropped) and a new one starts with the header again, so a recording that runs
    for days keeps at most 2 x max_bytes and its newest minutes. ``path`` "-" writes to stdout,
    unbounded (whoever reads it bounds it). Lines are written at flush(), once per poll."""

    def __init__(self, path: str, header: Header, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.header = header
        self.max_bytes = max(max_bytes, MIN_MAX_BYTES)
        self.rotations = 0
        self._pending: list[bytes] = []
        self._size = 0
        self._out: BinaryIO = self._open()
        self.write(header)

    def _open(self) -> BinaryIO:
        if self.path == "-":
            return os.fdopen(os.dup(1), "wb")
        # A recorder may run as root in a directory others can write: never follow a link there.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        self._size = 0
        return os.fdopen(fd, "wb")

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(self, item: TraceItem) -> None:
        line = encode(item).encode("ascii") + b"\n"
        if self.path != "-" and self._size + len(line) > self.max_bytes and self._size > 0:
            self._rotate()
        self._pending.append(line)
        self._size += len(line)

    def _rotate(self) -> None:
        self.flush()
        self._out.close()
        os.replace(self.path, self.path + ".1")
        self.rotations += 1
        self._out = self._open()
        # The new file's header is the recording's, so its times stay relative to the same start.
        self._pending.append(encode_header(self.header).encode("ascii") + b"\n")
        self._size = len(self._pending[-1])

    def flush(self) -> None:
        if self._pending:
            self._out.write(b"".join(self._pending))
            self._pending.clear()
        self._out.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        self._out.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class Located:
    """A parsed trace line and where it came from."""

    path: str
    line: int
    item: TraceItem


def read_lines(paths: Iterable[str]) -> Iterator[Located]:
    """Every line of the given files, in order, parsed; a TraceError names the file and line.
    Files are read one line at a time (a recording of days is not held in memory)."""
    for path in paths:
        with open(path, "rb") as handle:
            number = 0
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                try:
                    item = parse_line(raw)  # refuses a line over the limit
                except TraceError as exc:
                    raise TraceError(f"{path}:{number}: {exc}") from None
                if item is not None:
                    yield Located(path=path, line=number, item=item)
