"""Trace files: write trace lines bounded by size (FILE, rotated once to FILE.1), write a whole
trace into a trusted directory keeping the newest few (record_on_decision), and read them back line by line.

The format is uoomd/trace.py's; this module only moves its lines to and from files.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from uoomd.atomicfile import replace_file
from uoomd.trace import MAX_LINE_BYTES, TraceError, encode, encode_header, parse_line
from uoomd.tracelines import Header, TraceItem
from uoomd.trust import prepare_directory

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


# What write_trace_file names its files (uoomd/flight.py trace_name), and the only files it removes.
TRACE_FILE = re.compile(r"uoomd-\d{8}T\d{6}\.\d{3}Z-(\d+|x)\.jsonl")
CHUNK_LINES = 256  # lines encoded and written at a time: the writer never holds the whole trace


def write_trace_file(
    directory: str, name: str, header: Header, items: Iterable[TraceItem], *, keep: int
) -> tuple[str, int, int]:
    """Write a whole trace as ``directory/name`` (0600: command lines of other users' processes are
    in it), atomically, then remove the oldest of uoomd's traces there beyond ``keep``; returns
    (path, bytes, lines). The directory is created (0700) under a trusted parent, and refused
    when another user could plant something in it (uoomd/trust.py); raises OSError."""
    if not TRACE_FILE.fullmatch(name):
        raise ValueError(f"not a trace file name: {name!r}")
    refused = prepare_directory(directory, mode=0o700)
    if refused:
        raise PermissionError(f"{directory}: {refused}")
    counts = [0, 0]  # bytes, lines

    def chunks() -> Iterator[bytes]:
        batch = [encode_header(header).encode("ascii") + b"\n"]
        for item in items:
            batch.append(encode(item).encode("ascii") + b"\n")
            if len(batch) >= CHUNK_LINES:
                yield _counted(batch, counts)
                batch = []
        yield _counted(batch, counts)

    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        replace_file(dir_fd, name, chunks(), mode=0o600, exact_mode=True)
        prune_traces(dir_fd, keep=keep)
    finally:
        os.close(dir_fd)
    return os.path.join(directory, name), counts[0], counts[1]


def _counted(batch: list[bytes], counts: list[int]) -> bytes:
    data = b"".join(batch)
    counts[0] += len(data)
    counts[1] += len(batch)
    return data


def prune_traces(dir_fd: int, *, keep: int) -> list[str]:
    """Remove the oldest trace files beyond ``keep`` (by name: they sort by time); only regular
    files named as uoomd names them, never followed through a link. Returns what was removed."""
    names = sorted(n for n in os.listdir(dir_fd) if TRACE_FILE.fullmatch(n))
    removed: list[str] = []
    for name in names[: max(0, len(names) - keep)]:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    return removed


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
