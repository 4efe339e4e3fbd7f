"""Build the VM tier's Debian image once and cache it, keyed by a hash of what goes into it.

Two layers. The base (``ensure_image``) is Debian packages only (mmdebstrap from the mirror
apt already uses) plus the Debian cloud kernel, whose NVMe and ext4 drivers are built in, so
no initramfs is needed; it is kept as a directory tree and rebuilt only when this file or the
guest files change. The root disk made from it, with uoomd installed, is vm/rootdisk.py's.

Usage (root): ``python3 -m vm.image [--cache DIR]`` prints the image directory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

VM_DIR = Path(__file__).resolve().parent
GUEST_DIR = VM_DIR / "guest"
SUITE = "bookworm"
# mmdebstrap's default mirror (it adds SUITE-updates and the security archive beside it):
# checked before a build, so that a host without network skips instead of failing.
MIRROR = "http://deb.debian.org/debian"
# The guest's Python must be the minor version the host builds wheels for (pydantic_core
# is built per version): Debian 12 ships 3.11.
GUEST_PYTHON = (3, 11)
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "python3",
    "python3-venv",
    "procps",
    "kmod",  # modprobe zram, depmod for the kernel copied in
    "openssh-server",  # a server's lifeline: it must survive every scenario
    # the peers, installed but disabled: the peers scenario starts one at a time
    "earlyoom",
    "nohang",
    "systemd-oomd",
)
KERNEL_META = "linux-image-cloud-amd64"
# Units a package enables that would compete with the daemon under test or wake at random.
DISABLED_UNITS = (
    "earlyoom.service",
    "nohang.service",
    "nohang-desktop.service",
    "systemd-oomd.service",
    "systemd-oomd.socket",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "e2scrub_all.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
)
# Boot work a headless test VM does not need: each costs a fraction of a second of emulated
# time, and there are several boots per run. Masked (linked to /dev/null).
MASKED_UNITS = (
    "getty@tty1.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "systemd-pstore.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service",
    # utmp records logins for who(1): nobody logs in, and its boot record cost ~3 s of emulated time
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
)
# systemd runs every generator at boot and again at each `systemctl daemon-reload` (the
# scenarios reload a dozen times): none has work here (no fstab entries, no LUKS/verity/GPT
# auto-mounts, no SysV-only scripts, no getty on a console nobody reads). Masked, a
# daemon-reload took 4.7-5.0 s instead of 5.6-8.8 s in one guest (host at load ~4).
MASKED_GENERATORS = (
    "systemd-cryptsetup-generator",
    "systemd-debug-generator",
    "systemd-fstab-generator",
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-rc-local-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    "systemd-sysv-generator",
    "systemd-veritysetup-generator",
)
# A fixed machine-id: systemd skips first-boot setup (and its seconds of emulated work).
MACHINE_ID = "75606f6d645f766d5f696d6167650a00"[:32]
HOSTNAME = "uoomd-vm"
NEEDED_TOOLS = ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "dpkg-deb", "apt-get", "apt-cache")


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """The base layer: ``kernel`` to boot, ``rootfs`` the Debian tree root disks are made from."""

    directory: Path
    kernel: Path
    rootfs: Path
    key: str
    kernel_version: str
    build_s: float | None  # seconds this process spent building it; None: taken from the cache


class Unavailable(Exception):
    """This host cannot build or boot the image: the reason, for a skip."""


class BuildFailed(Exception):
    """The project's own part of the build failed: a test failure, not a skip."""


def cache_root() -> Path:
    configured = os.environ.get("UOOMD_VM_CACHE")
    if configured:
        return Path(configured)
    return Path(os.path.expanduser("~")) / ".cache" / "uoomd-vm"


def missing_tools() -> list[str]:
    return [tool for tool in NEEDED_TOOLS if shutil.which(tool) is None and not _in_sbin(tool)]


def _in_sbin(tool: str) -> bool:
    return any(os.access(os.path.join(d, tool), os.X_OK) for d in ("/usr/sbin", "/sbin"))


def why_unavailable() -> str | None:
    """Why this host cannot run the tier at all (None: it can try)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return f"the VM tier needs an x86_64 Linux host (this is {sys.platform} {os.uname().machine})"
    if os.geteuid() != 0:
        return "the VM tier builds its image with mmdebstrap as root (not root here)"
    missing = missing_tools()
    if missing:
        return f"missing {' '.join(missing)} (apt-get install qemu-system-x86 qemu-utils mmdebstrap e2fsprogs)"
    return None


def image_key() -> str:
    """Hash of everything the image is made of: this file, the guest files and the package lists."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    for path in sorted(GUEST_DIR.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(VM_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def is_built(cache: Path) -> bool:
    """Whether ``cache`` holds the image for today's inputs."""
    return (cache / f"image-{image_key()}" / "manifest.json").exists()


def ensure_image(cache: Path | None = None, *, log: Path | None = None) -> Image:
    """The cached image for today's inputs, built first if missing. Raises Unavailable."""
    reason = why_unavailable()
    if reason:
        raise Unavailable(reason)
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    key = image_key()
    final = cache / f"image-{key}"
    with locked(cache / "lock"):
        if (final / "manifest.json").exists():
            return _load(final, build_s=None)
        started = time.monotonic()
        # What this host lacks is a skip (no apt lists to find the kernel in, no mirror); once
        # both are there, a build that fails is the project's failure.
        kernel_package = _kernel_package()
        check_mirror()
        work = cache / f"image-{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        log_path = log or (cache / f"image-{key}.build.log")
        try:
            with log_path.open("w") as log_file:
                _build(work, key, kernel_package, log_file)
        except (subprocess.CalledProcessError, OSError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise BuildFailed(f"image build failed ({exc}); log {log_path}:\n{tail}") from exc
        build_s = time.monotonic() - started
        manifest = json.loads((work / "manifest.json").read_text())
        manifest["build_s"] = round(build_s, 1)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.rename(work, final)
        for old in cache.glob("image-*"):  # one image at a time: each is ~1 GiB
            if old != final and old.name != log_path.name and not old.name.endswith(".tmp"):
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
        return _load(final, build_s=build_s)


def _load(directory: Path, *, build_s: float | None) -> Image:
    manifest = json.loads((directory / "manifest.json").read_text())
    return Image(
        directory=directory,
        kernel=directory / "vmlinuz",
        rootfs=directory / "rootfs",
        key=manifest["key"],
        kernel_version=manifest["kernel_version"],
        build_s=build_s,
    )


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` while the block runs: one image builder at a time (a second
    pytest session waits, then finds the image built), one boot at a time (vm/boot.py)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_logged(argv: list[str], log_file: TextIO, *, cwd: Path | None = None) -> None:
    log_file.write(f"$ {' '.join(argv)}\n")
    log_file.flush()
    # The guest's tools live in sbin; the host's PATH (pyenv shims first) means nothing in a chroot.
    env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL="C.UTF-8")
    subprocess.run(argv, check=True, text=True, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def _kernel_package() -> str:
    """The versioned cloud kernel the meta-package points at (needs the host's apt lists)."""
    done = subprocess.run(["apt-cache", "depends", KERNEL_META], check=False, text=True, capture_output=True)
    for line in done.stdout.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise Unavailable(
        f"apt-cache depends {KERNEL_META} names no kernel: this host's apt has no Debian lists"
        f" (apt-get update; a Debian host) ({done.stderr.strip()[-300:]})"
    )


def check_mirror(timeout_s: float = 15.0) -> None:
    """mmdebstrap fetches from MIRROR: an unreachable one means no network here, a skip."""
    url = f"{MIRROR}/dists/{SUITE}/InRelease"
    request = urllib.request.Request(url, method="HEAD")  # noqa: S310 - a constant http URL
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310
            pass
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        raise Unavailable(f"the Debian mirror is not reachable ({url}: {exc})") from exc


def _build(work: Path, key: str, kernel_package: str, log_file: TextIO) -> None:
    rootfs = work / "rootfs"
    run_logged(
        [
            "mmdebstrap",
            "--variant=apt",
            "--mode=root",
            "--dpkgopt=force-unsafe-io",
            "--aptopt=Acquire::Retries 3",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(rootfs),
        ],
        log_file,
    )
    debs = work / "debs"
    debs.mkdir()
    run_logged(["apt-get", "download", kernel_package], log_file, cwd=debs)
    unpacked = work / "kernel"
    (deb,) = debs.glob("*.deb")
    run_logged(["dpkg-deb", "-x", str(deb), str(unpacked)], log_file)
    # Copy into usr/lib, not lib: extracting over the rootfs would replace its lib -> usr/lib
    # symlink with a directory and break every binary's interpreter path.
    (modules,) = (unpacked / "lib" / "modules").iterdir()
    kernel_version = modules.name
    shutil.copytree(modules, rootfs / "usr" / "lib" / "modules" / kernel_version, symlinks=True)
    run_logged(["chroot", str(rootfs), "/usr/sbin/depmod", kernel_version], log_file)
    shutil.copy2(unpacked / "boot" / f"vmlinuz-{kernel_version}", work / "vmlinuz")
    _configure(rootfs)
    _check_guest_python(rootfs)
    shutil.rmtree(debs)
    shutil.rmtree(unpacked)
    manifest = {"key": key, "kernel_version": kernel_version, "kernel_package": kernel_package, "packages": PACKAGES}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _configure(rootfs: Path) -> None:
    etc = rootfs / "etc"
    (etc / "machine-id").write_text(MACHINE_ID + "\n")
    (etc / "hostname").write_text(HOSTNAME + "\n")
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    (etc / "fstab").write_text("# root is /dev/nvme0n1, mounted rw by the kernel (root= rw)\n")
    for wants in (etc / "systemd" / "system").glob("*.wants"):
        for unit in DISABLED_UNITS:
            with contextlib.suppress(FileNotFoundError):
                (wants / unit).unlink()
    lib = rootfs / "usr" / "local" / "lib" / "uoomd-vm"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST_DIR / "vmtest-runner", lib / "vmtest-runner")
    (lib / "vmtest-runner").chmod(0o755)
    unit_dir = etc / "systemd" / "system"
    shutil.copy2(GUEST_DIR / "uoomd-vmtest.service", unit_dir / "uoomd-vmtest.service")
    wants = unit_dir / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / "uoomd-vmtest.service"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to("/etc/systemd/system/uoomd-vmtest.service")
    for unit in MASKED_UNITS:
        masked = unit_dir / unit
        with contextlib.suppress(FileNotFoundError):
            masked.unlink()
        masked.symlink_to("/dev/null")
    generators = etc / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for generator in MASKED_GENERATORS:
        masked = generators / generator
        with contextlib.suppress(FileNotFoundError):
            masked.unlink()
        masked.symlink_to("/dev/null")


def _check_guest_python(rootfs: Path) -> None:
    wanted = f"python{GUEST_PYTHON[0]}.{GUEST_PYTHON[1]}"
    if not (rootfs / "usr" / "bin" / wanted).exists():
        raise OSError(f"the guest has no {wanted}: the host's wheels would not match it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        image = ensure_image(args.cache)
    except Unavailable as exc:
        print(f"vm.image: {exc}", file=sys.stderr)
        return 3
    print(image.directory)
    if image.build_s is not None:
        print(f"built in {image.build_s:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
