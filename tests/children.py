"""Live children for integration tests: Python processes that hold a given amount of private
anonymous memory at a given oom_score_adj, under a given name, until they are stopped."""

from __future__ import annotations

import signal
import subprocess
import sys

CHILD_SCRIPT = """
import mmap, sys, time
mib, adj, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(adj)
except PermissionError:
    pass  # lowering oom_score_adj needs CAP_SYS_RESOURCE; the test reads back what was set
with open("/proc/self/comm", "w") as f:
    f.write(name)
# Private and anonymous: RssAnon, what the tests assert (a bare mmap(-1) is a shared
# mapping, counted as RssShmem; it passed only where the interpreter's own anon memory
# made up the difference)
buf = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(buf), 4096):
    buf[i] = 1
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(600)
"""

# (MiB, oom_score_adj, name): 1000 MiB in total
HOG_SPECS = (
    (300, -1000, "uoomd-t-min"),
    (250, -500, "uoomd-t-neg"),
    (200, 0, "uoomd-t-zero"),
    (150, 500, "uoomd-t-pos"),
    (100, 1000, "uoomd-t-max"),
)


def start_children(specs: tuple[tuple[int, int, str], ...] = HOG_SPECS) -> list[subprocess.Popen[bytes]]:
    """Start the hogs and wait until each touched its memory; the caller stops them with stop_children()."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        for mib, adj, name in specs:
            children.append(
                subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, str(mib), str(adj), name], stdout=subprocess.PIPE)
            )
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline() != b"ready\n":
                raise RuntimeError(f"child {child.pid} failed to start")
    except BaseException:
        stop_children(children)
        raise
    return children


def stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL our own children, by PID, and reap them."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
