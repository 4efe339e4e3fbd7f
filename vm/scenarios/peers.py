"""Scenario 4: the peers (earlyoom, nohang, systemd-oomd, as Debian 12 packages them) on the
cases of scenarios 2 and 3, one daemon at a time in one boot (guest side).

``peers.py OUT [DAEMON...]``: for each daemon, configured as machine.PEER_CONFIG says, the
whole-machine cases without swap, the cooperative hog with swap (swapfile + zram), then a hog
in test.slice (MemoryMax=400M). The verdicts
(stopped before the kernel? the right process? a protected process died?) are the host's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from cgroup import part_process, prepare
from guestlib import Scenario, show
from machine import DEFAULT_TOKENS, PEER_CONFIG, run_tokens, start_daemon, stop_daemon, stop_swap

PEERS = ("earlyoom", "nohang", "systemd-oomd")
# uoomd ends each case within ~20 s here; a peer that has not after 45 s has let the machine
# thrash (the kernel's OOM killer took up to 3 minutes to end one): the case is called there.
PEER_LIMIT_S = 45.0


def main() -> int:
    out, *daemons = sys.argv[1:]
    sc = Scenario(Path(out))
    results: list[dict[str, Any]] = []
    sc.facts["cases"] = results
    sc.facts["config"] = {d: PEER_CONFIG[d] for d in daemons or PEERS}
    with sc.step("a machine without uoomd or swap"):
        # This boot may have run scenario 2 first (tests/vm/tier.py BOOT_PLANS): uoomd stopped,
        # swap off, so each peer starts from the machine a fresh boot gives.
        sc.must("systemctl", "stop", "uoomd")
        stop_swap(sc)
    for daemon in daemons or PEERS:
        with sc.step(f"start {daemon}") as rec:
            unit = start_daemon(sc, daemon, "")
            time.sleep(3)  # the first readings (a peer's unit is started before it has any)
            rec["props"] = show(unit, "ActiveState", "SubState", "MainPID", "Result")
        tokens = [*DEFAULT_TOKENS, "swap", "cooperative", "noswap"]
        run_tokens(sc, daemon, unit, tokens, results, limit_s=PEER_LIMIT_S)
        with sc.step(f"{daemon} cgroup process") as rec:
            prepare(sc, daemon)
            case = part_process(sc, unit)
            case.update(daemon=daemon, swap=False, policy=daemon, holder_protected=True)
            results.append(case)
        with sc.step(f"stop {daemon}") as rec:
            rec["props"] = show(unit, "ActiveState", "SubState", "MainPID", "Result", "NRestarts")
            journal = sc.sh("journalctl", "-b", "-u", unit, "--no-pager", "-o", "short-monotonic")
            sc.save_file(f"{daemon}-journal.txt", journal.stdout)
            stop_daemon(sc, daemon, unit)
        sc.save()
    sc.note("scenario done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
