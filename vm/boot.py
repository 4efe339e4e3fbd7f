"""Boot the image once on one test and bring its results back.

The test goes in as a bare tar written at offset 0 of a second raw disk (serial ``uoomdio``);
the guest's oneshot unit (`guest/vmtest-runner`) unpacks it, runs its ``run`` script, writes a
tar of the results over the same disk and powers off. The root disk is attached with
``snapshot=on``, so every boot starts from the same image and nothing a test does persists.

The accelerator is TCG (software emulation): /dev/kvm on this kind of host is a PVM hypervisor
that cannot run stock kernels (emulation failures on ``lock cmpxchg16b`` / ``xrstor``), so the
guest runs 5-10x slower than the host and tests must check outcomes, not latencies.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vm.image import Image, cache_root, locked

IO_DISK_BYTES = 256 << 20  # the results tar (journal, dmesg, logs) must fit; sparse on the host
KERNEL_ARGS = (
    "console=ttyS0 root=/dev/nvme0n1 rw panic=-1 "
    "systemd.unified_cgroup_hierarchy=1 psi=1 "
    # quiet boots are faster on an emulated UART; the journal keeps every line anyway
    "quiet loglevel=4 systemd.show_status=0"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BootResult:
    """What one boot gave back; ``results`` holds rc, run.log, dmesg.txt, journal.txt, ..."""

    results: Path
    console: Path
    elapsed_s: float
    timed_out: bool
    qemu_rc: int | None
    rc: int | None  # the test's exit code in the guest; None when no results came back
    waited_s: float = 0.0  # for another session's boot to end (the host's lock), before this one

    def describe(self) -> str:
        """A line for assertion messages: how the boot ended and where to look."""
        how = "timed out" if self.timed_out else f"qemu exit {self.qemu_rc}"
        return f"boot {how} after {self.elapsed_s:.0f} s, guest rc {self.rc}; console {self.console}"


Payload = Mapping[str, Path | bytes]


def _tar_bytes(payload: Payload) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, source in sorted(payload.items()):
            data = source.read_bytes() if isinstance(source, Path) else source
            mode = 0o755 if isinstance(source, Path) and os.access(source, os.X_OK) else 0o644
            if name == "run":
                mode = 0o755
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def qemu_argv(image: Image, root: Path, io_disk: Path, console: Path, *, memory_mib: int, cpus: int) -> list[str]:
    accel = os.environ.get("UOOMD_VM_ACCEL", "tcg,thread=multi")
    return [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-cpu",
        # Not "max": with AVX in CPUID glibc picks AVX string functions, which TCG emulates
        # 3-4x slower (measured here: touching 200 MiB took 4.9 s with max, 1.1 s with qemu64).
        "qemu64",
        "-machine",
        "q35",
        "-m",
        str(memory_mib),
        "-smp",
        str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(image.kernel),
        "-append",
        KERNEL_ARGS,
        "-drive",
        f"file={root},if=none,id=root,format=raw,snapshot=on",
        "-device",
        "nvme,drive=root,serial=uoomdroot",
        "-drive",
        f"file={io_disk},if=none,id=io,format=raw",
        "-device",
        "nvme,drive=io,serial=uoomdio",
    ]


def boot(
    image: Image,
    root: Path,
    payload: Payload,
    work: Path,
    *,
    timeout_s: float,
    memory_mib: int = 1024,
    cpus: int = 2,
) -> BootResult:
    """Boot ``image``'s kernel on the ``root`` disk (vm/rootdisk.py) once with ``payload``
    (tar member name -> file or bytes; it must hold an executable ``run``, called with the
    results directory); results land in ``work/results``."""
    work.mkdir(parents=True, exist_ok=True)
    io_disk = work / "io.raw"
    console = work / "console.log"
    results = work / "results"
    # The guest stops its test first (boot ~15-40 s before it, results after it), so results come back.
    guest_limit_s = max(30, int(timeout_s) - 120)
    data = _tar_bytes({**payload, "timeout_s": f"{guest_limit_s}\n".encode()})
    if len(data) > IO_DISK_BYTES:
        raise ValueError(f"the test is {len(data)} bytes: more than the I/O disk holds")
    with io_disk.open("wb") as f:
        f.write(data)
        f.truncate(IO_DISK_BYTES)
    argv = qemu_argv(image, root, io_disk, console, memory_mib=memory_mib, cpus=cpus)
    (work / "qemu.argv").write_text(" ".join(argv) + "\n")
    timed_out = False
    asked = time.monotonic()
    with _one_vm_at_a_time(), (work / "qemu.log").open("wb") as qemu_log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT)
        try:
            qemu_rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()  # our own QEMU, by its Popen
            proc.wait()
            qemu_rc = None
    elapsed_s = time.monotonic() - started
    rc = _unpack_results(io_disk, results)
    io_disk.unlink()
    return BootResult(
        results=results,
        console=console,
        elapsed_s=elapsed_s,
        timed_out=timed_out,
        qemu_rc=qemu_rc,
        rc=rc,
        waited_s=started - asked,
    )


@contextlib.contextmanager
def _one_vm_at_a_time() -> Iterator[None]:
    """Boots of all sessions on this host take turns: two emulated guests on 2 cores run each
    other slow, and a slower guest makes a daemon's race with a hog an unfair one."""
    # One lock per host, whatever cache each session uses.
    path = Path("/run/lock/uoomd-vm-boot.lock") if os.path.isdir("/run/lock") else cache_root() / "boot.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        yield


def _unpack_results(io_disk: Path, results: Path) -> int | None:
    """Extract the guest's results tar; None if the disk still holds the test (no results)."""
    results.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(io_disk, mode="r:") as tar:
            names = {m.name.removeprefix("./") for m in tar.getmembers()}
            if "rc" not in names:
                return None
            tar.extractall(results, filter="data")
    except tarfile.TarError:
        return None
    try:
        return int((results / "rc").read_text().strip())
    except ValueError:
        return None
