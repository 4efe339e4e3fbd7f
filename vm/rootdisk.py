"""The root disk a boot runs on: the base image's tree with uoomd installed as an admin installs it.

``packaging/install-unit --wheels`` (the project's own admin command) runs in a chroot of the
tree, with the guest's own python3 and pip at native speed (the same install inside the
emulated guest took more than 5 minutes): the venv in /opt/uoomd, the unit in
/etc/systemd/system, the default policy, nothing enabled. Beside it a test venv (TEST_VENV)
with uoomd and the project's test extras, for the repo's own tests run in the guest. The
tree becomes an ext4 image with ``mkfs.ext4 -d`` (no loop mount). Rebuilt when the wheels
change (uoomd's sources) or this file does, ~1 minute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from vm.image import BuildFailed, Image, locked, run_logged

IMAGE_SIZE = "2G"
# What install-unit needs of the tree besides the wheels (it refuses a tree without them).
SOURCE_TREE = ("pyproject.toml", "README.md", "uoomd", "etc", "policies", "systemd", "packaging")
TEST_VENV = "/opt/uoomd-vmtest"
# The repo's tests need the test extras (tests/conftest.py imports hypothesis): vm/wheels.py
# builds wheels of the same requirement.
TEST_REQUIREMENT = "uoomd[test]"
KEPT_DISKS = 2  # another session may still boot the one before (one per wheels)


def disk_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]


def ensure_root_disk(image: Image, wheels: Path, repo: Path) -> Path:
    """The root disk for these wheels on ``image``, built first if missing. Raises BuildFailed."""
    name = f"root-{wheels.name}-{disk_key()}"
    disk = image.directory / f"{name}.img"
    if disk.exists():
        return disk
    with locked(image.directory.parent / "lock"):
        if disk.exists():
            return disk
        stage = image.directory / "stage"
        tmp = disk.with_suffix(".tmp")
        log_path = image.directory / f"{name}.log"
        try:
            shutil.rmtree(stage, ignore_errors=True)
            with log_path.open("w") as log_file:
                run_logged(["cp", "-a", "--reflink=auto", str(image.rootfs), str(stage)], log_file)
                src = stage / "root" / "uoomd-src"
                for top in SOURCE_TREE:
                    path = repo / top
                    if path.is_dir():
                        shutil.copytree(path, src / top, ignore=shutil.ignore_patterns("__pycache__"))
                    elif path.exists():
                        src.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, src / top)
                shutil.copytree(wheels, stage / "root" / "uoomd-wheels")
                chroot = ["chroot", str(stage)]
                install_unit = ["/bin/sh", "/root/uoomd-src/packaging/install-unit", "--wheels", "/root/uoomd-wheels"]
                run_logged([*chroot, *install_unit], log_file)
                run_logged([*chroot, "/usr/bin/python3", "-m", "venv", TEST_VENV], log_file)
                pip = [*chroot, f"{TEST_VENV}/bin/pip", "install", "--quiet", "--no-index"]
                run_logged([*pip, "--find-links", "/root/uoomd-wheels", TEST_REQUIREMENT], log_file)
                # The source tree stays in the image (/root/uoomd-src): it is what the admin ran.
                shutil.rmtree(stage / "root" / "uoomd-wheels")
                mkfs = ["mkfs.ext4", "-q", "-F", "-L", "uoomdroot", "-d", str(stage), str(tmp), IMAGE_SIZE]
                run_logged(mkfs, log_file)
        except (subprocess.CalledProcessError, OSError) as exc:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise BuildFailed(f"the root disk could not be built ({exc}); log {log_path}:\n{tail}") from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        os.rename(tmp, disk)
        disks = sorted(image.directory.glob("root-*.img"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in disks[KEPT_DISKS:]:
            old.unlink()
            old.with_suffix(".log").unlink(missing_ok=True)
    return disk
