"""An unprivileged impostor of protected processes is a candidate under every shipped policy (issue 12).

The impostors are children of this test running as uid 65534 (or, run without root, as
the test's own uid): one per protected name, with comm (prctl(PR_SET_NAME)) and argv[0]
set to it, and, where the machine allows user namespaces, one whose /proc/PID/exe reads
``/usr/sbin/sshd``: a copy of python on a tmpfs mounted over /usr/sbin inside
``unshare -Urm``. The test only reads /proc and ranks; it sends no signal but to its
own children, by PID, at the end.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from uoomd import kernel
from uoomd.plan import Plan, ScopeKind
from uoomd.policy.load import load_plan, parse_plan
from uoomd.readings import Pid
from uoomd.scoring import Candidate, Exclusion, rank
from uoomd.sources.procfs import read_snapshot

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "etc" / "uoomd.toml", *sorted((ROOT / "policies").glob("*.toml"))]
NOBODY = 65534
HOLD_MIB = 16  # 4,096 pages: above server.toml's min_badness of 2,560, so that cannot exclude it
# One per kind of shipped protection: a root daemon (uid), a system service (unit), a
# database (unit), the desktop session (its owner's cgroups), a discounted daemon.
NAMES = ("sshd", "dbus-daemon", "postgres", "gnome-shell", "nginx")

# Started as root, it drops to the unprivileged uid for good before anything else, so
# the kernel sees exactly what an unprivileged user's process shows. Every import comes
# first: once it is uid 65534, the interpreter's own directory may be out of its reach.
IMPOSTOR = r"""
import ctypes, os, sys, time
name, uid, mib = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])
with open("/proc/self/oom_score_adj") as f:
    if int(f.read()) < 0:  # inherited from the runner; raising needs no privilege
        with open("/proc/self/oom_score_adj", "w") as w:
            w.write("0")
if os.getuid() != uid:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
hold = b"\1" * (mib << 20)
print("ready", flush=True)
time.sleep(600)
"""

# Runs as the unprivileged uid inside `unshare -Urm` (root of its own user namespace,
# owner of its own mount namespace): a tmpfs over /usr/sbin holding a copy of this
# interpreter named sshd, then exec it. The host sees exe=/usr/sbin/sshd, comm sshd.
USERNS_SETUP = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
with open("/proc/self/exe", "rb") as f:
    binary = f.read()
if libc.mount(b"tmpfs", b"/usr/sbin", b"tmpfs", 0, None) != 0:
    sys.exit("mount tmpfs on /usr/sbin: " + os.strerror(ctypes.get_errno()))
with open("/usr/sbin/sshd", "wb") as f:
    f.write(binary)
os.chmod("/usr/sbin/sshd", 0o755)
hold = "import sys, time; hold = b'\\1' * (int(sys.argv[1]) << 20); print('ready', flush=True); time.sleep(600)"
os.execve("/usr/sbin/sshd", ["sshd", "-c", hold, sys.argv[1]], {"PYTHONHOME": sys.base_prefix})
"""


def _as_nobody() -> dict[str, Any]:
    """Popen arguments that run the child as uid 65534 when we are root (else as ourselves)."""
    if os.geteuid() != 0:
        return {}
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _wait_ready(child: subprocess.Popen[bytes], timeout_s: float = 30.0) -> str | None:
    """None once the child said ready, else why not (its stderr)."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout_s)
    if ready and child.stdout.readline() == b"ready\n":
        return None
    child.kill()
    _, err = child.communicate(timeout=10)
    return err.decode(errors="replace").strip() or f"exited {child.returncode}"


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:  # our own unreaped children: the PID cannot have been recycled
        if child.poll() is None:
            child.kill()
        child.wait()


def _unprivileged_uid() -> int:
    return NOBODY if os.geteuid() == 0 else os.getuid()


@pytest.fixture(scope="module")
def impostors() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    if _unprivileged_uid() == 0:
        pytest.skip("running as root without the right to change uid")
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in NAMES:
            child = subprocess.Popen(
                [name, "-c", IMPOSTOR, name, str(_unprivileged_uid()), str(HOLD_MIB)],
                executable=sys.executable,
                # Python finds its prefix from argv[0], searched in PATH: "dbus-daemon" found
                # /usr/bin/dbus-daemon and so another Python's library. Point it home.
                env={**os.environ, "PYTHONHOME": sys.base_prefix},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            started[name] = child
            problem = _wait_ready(child)
            assert problem is None, f"impostor {name}: {problem}"
        yield started
    finally:
        _stop(list(started.values()))


def _interpreter_for_nobody() -> str | None:
    """A python that uid 65534 may run (the test's own may live under /root)."""
    for candidate in dict.fromkeys(
        [sys.executable, os.path.realpath(sys.executable), shutil.which("python3"), "/usr/bin/python3"]
    ):
        if candidate is None or not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import ctypes"], capture_output=True, timeout=30, check=False, **_as_nobody()
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def userns_impostor() -> Iterator[subprocess.Popen[bytes]]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) on this machine")
    python = _interpreter_for_nobody()
    if python is None:
        pytest.skip(f"no python that uid {NOBODY} may run")
    try:
        # unshare execs the command (no -f): the child's PID is the impostor's.
        child = subprocess.Popen(
            [unshare, "-Urm", python, "-c", USERNS_SETUP, str(HOLD_MIB)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **_as_nobody(),
        )
    except OSError as exc:
        pytest.skip(f"cannot start unshare: {exc}")
    try:
        problem = _wait_ready(child)
        if problem is not None:
            pytest.skip(f"this machine refuses the user-namespace trick: {problem}")
        exe = os.readlink(f"/proc/{child.pid}/exe")
        if exe != "/usr/sbin/sshd":
            pytest.skip(f"the user-namespace copy reads as exe={exe} here, not /usr/sbin/sshd")
        yield child
    finally:
        _stop([child])


def _verdicts(plan: Plan, pids: set[int]) -> dict[str, dict[int, Candidate | Exclusion]]:
    """Per guard, what the ranking of the live /proc made of each PID."""
    snapshot = read_snapshot("/proc", details=plan.needed_details() | {"exe", "cmdline", "cgroup"})
    totalpages = kernel.system_totalpages(
        total_ram_bytes=snapshot.total_ram_bytes,
        total_swap_bytes=snapshot.total_swap_bytes,
        page_size=snapshot.page_size,
    )
    out: dict[str, dict[int, Candidate | Exclusion]] = {}
    for guard in plan.guards:
        assert guard.scope.kind is ScopeKind.SYSTEM, f"{guard.name}: this test ranks the whole machine"
        ranking = rank(snapshot, plan, guard, totalpages=totalpages)
        seen: dict[int, Candidate | Exclusion] = {}
        results: list[Candidate | Exclusion] = [*ranking.candidates, *ranking.excluded]
        for result in results:
            if result.process.pid in pids:
                seen[result.process.pid] = result
        out[guard.name] = seen
    return out


def _assert_a_plain_candidate(plan: Plan, result: Candidate | Exclusion | None, what: str) -> None:
    assert result is not None, f"{what}: not in the snapshot"
    assert isinstance(result, Candidate), f"{what}: excluded ({result.reason}); rules {result.rules}"
    shielding = {r.label for r in plan.rules if r.protect or r.adjust < 0}
    assert not shielding & set(result.rules), f"{what}: matched {result.rules}"
    assert result.effective_adj >= 0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_an_unprivileged_process_named_like_a_protected_one_is_a_candidate(
    path: Path, impostors: dict[str, subprocess.Popen[bytes]]
) -> None:
    plan = load_plan(str(path), check_system=False)
    pids = {child.pid for child in impostors.values()}
    for guard, seen in _verdicts(plan, pids).items():
        for name, child in impostors.items():
            result = seen.get(child.pid)
            if result is not None:  # what makes it an impostor, as uoomd read it
                assert (result.process.name, result.process.uid) == (name, _unprivileged_uid())
                assert (result.process.cmdline or "").split(" ")[0] == name
            _assert_a_plain_candidate(plan, result, f"{path.name} guard {guard}: impostor {name} (pid {child.pid})")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_an_impostor_whose_exe_reads_usr_sbin_sshd_is_a_candidate(
    path: Path, userns_impostor: subprocess.Popen[bytes]
) -> None:
    plan = load_plan(str(path), check_system=False)
    pid = userns_impostor.pid
    for guard, seen in _verdicts(plan, {pid}).items():
        result = seen.get(Pid(pid))
        if result is not None:
            process = result.process
            assert (process.name, process.exe, process.uid) == ("sshd", "/usr/sbin/sshd", _unprivileged_uid())
        _assert_a_plain_candidate(plan, result, f"{path.name} guard {guard}: exe=/usr/sbin/sshd impostor (pid {pid})")


def test_name_and_exe_are_hints_the_user_namespace_copy_forges(userns_impostor: subprocess.Popen[bytes]) -> None:
    # The rule docs/SECURITY.md once recommended, and why `uoomd check` now warns on it.
    plan = parse_plan(
        '[[guard]]\nname = "system"\n\n'
        '[[rule]]\nname = "real-sshd"\nmatch = { name = "^sshd$", exe = "^/usr/sbin/sshd$" }\nprotect = true\n'
    )
    seen = _verdicts(plan, {userns_impostor.pid})["system"].get(userns_impostor.pid)
    assert isinstance(seen, Exclusion)
    assert seen.reason == "protected by rule 'real-sshd'"
