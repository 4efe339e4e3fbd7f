"""Replace a file in an open directory atomically, through a fresh temp file nothing planted can be.

The one owner of how uoomd writes a file root may be tricked into: the state file
(uoomd/statusboard.py) and the metrics textfile (uoomd/metrics/textfile.py) both come here; each
caller opens (and judges) the directory its own way and hands over the fd.

O_EXCL|O_NOFOLLOW under a random name never opens something already there (a planted
symlink or file); rename(2) replaces whatever sits at the final name, a symlink included,
without following it, so a reader sees the old file or the new one, never half of one.
Not fsynced: both callers want the rename's atomicity, not durability (the textfile's
docstring has the measurement).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def replace_file(dir_fd: int, name: str, payload: bytes | Iterable[bytes], *, mode: int, exact_mode: bool) -> None:
    """Write ``payload`` (or its chunks, in order: a trace is written as it is encoded) as ``name``
    under ``dir_fd`` via a temp file renamed over it; raises OSError.

    ``mode`` is the temp file's creation mode (the umask applies); ``exact_mode`` fchmods it
    to ``mode`` as well, whatever the daemon's umask. The temp file is removed on any failure."""
    # os.urandom, not secrets: secrets imports hashlib, hmac and random into the daemon.
    tmp = f".{name}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            if exact_mode:
                os.fchmod(fd, mode)
            for chunk in (payload,) if isinstance(payload, bytes) else payload:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
