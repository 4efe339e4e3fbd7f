"""packaging/install-unit, run for real into a temporary root: the venv, the unit pointing at it
(checked by systemd-analyze verify), the policy never overwritten, a second run harmless, and
--uninstall removing exactly what was installed.

Every install here is offline (--wheels, with no pip configuration and no index), as a VM or
an air-gapped machine does it; the wheel directory is built once, from the machine's index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "packaging" / "install-unit"
UNIT = "etc/systemd/system/uoomd.service"
POLICY = "etc/uoomd/uoomd.toml"
SHIPPED_PREFIX = "/opt/uoomd"
BUILD = (str(ROOT), "hatchling")  # uoomd's dependencies, and its build backend for building it offline


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uoomd's dependencies and its build backend, as the README says to prepare them."""
    directory = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(directory), *BUILD],
        check=True,
        timeout=600,
    )
    return directory


def _offline_env() -> dict[str, str]:
    """No pip configuration or PIP_* variable: nothing but --wheels can be reached."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _python_args() -> list[str]:
    """The default interpreter (/usr/bin/python3) where it is the version the wheels were built
    for, as on Debian 12 here; else the one running the tests."""
    system = Path("/usr/bin/python3")
    if system.exists():
        version = subprocess.run(
            [str(system), "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, check=False
        ).stdout.split()
        if version == [str(n) for n in sys.version_info[:2]]:
            return []
    return ["--python", sys.executable]


def install_unit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(INSTALL), *args], capture_output=True, text=True, env=_offline_env(), check=False, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _tree(root: Path, *, skip: Path) -> dict[str, bytes | None]:
    """Every path under root (directories as None), the venv at ``skip`` left out."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        found[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return found


def _settings(unit_text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in unit_text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )


def _verify_copy(root: Path, prefix: str, tmp: Path) -> None:
    """systemd-analyze verify on the installed unit, its uoomd paths prefixed with the root so
    that they exist here: the whole unit is checked (keys, values, commands, sandboxing)."""
    text = (root / UNIT).read_text()
    copy = tmp / "verify" / "uoomd.service"
    copy.parent.mkdir()
    copy.write_text(text.replace(f"{prefix}/bin/uoomd ", f"{root}{prefix}/bin/uoomd "))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # A warning (an unknown key, a bad value) leaves the exit code at 0: none may name the unit.
    assert [line for line in result.stderr.splitlines() if "uoomd.service" in line] == [], result.stderr


def _commands_missing_under_root(root: Path) -> list[str]:
    """systemd-analyze verify --root on the unit as installed: the commands it finds missing in
    the root. (It also misses sysinit.target there: a bare tree has none.)"""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", str(root / UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return [line for line in result.stderr.splitlines() if "is not executable" in line]


def test_install_then_again_then_uninstall_leaves_nothing(wheels: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    root = tmp_path / "root"
    root.mkdir()
    first = install_unit("--root", str(root), "--wheels", str(wheels), *_python_args())
    assert first.stdout.rstrip().endswith("systemctl daemon-reload && systemctl enable --now uoomd"), first.stdout
    venv = root / SHIPPED_PREFIX.lstrip("/")

    # The unit is the shipped one, pointing at the venv (the default prefix is what it ships with).
    shipped = (ROOT / "systemd" / "uoomd.service").read_text()
    installed = (root / UNIT).read_text()
    assert installed == shipped
    settings = _settings(installed)
    assert "ExecStartPre" not in settings, "the daemon checks its policy itself: twice doubled the start"
    assert settings["ExecStart"] == f"{SHIPPED_PREFIX}/bin/uoomd run --policy /etc/uoomd/uoomd.toml"
    assert settings["ExecReload"] == f"{SHIPPED_PREFIX}/bin/uoomd reload --pid $MAINPID"
    assert (root / POLICY).read_bytes() == (ROOT / "etc" / "uoomd.toml").read_bytes()
    for path in (root / UNIT, root / POLICY):
        assert path.stat().st_mode & 0o777 == 0o644, path

    # The venv's uoomd names the interpreter the machine will see, and works (run through its
    # interpreter in the tree, since /opt/uoomd is not on this machine).
    script = venv / "bin" / "uoomd"
    assert script.read_text().splitlines()[0] == f"#!{SHIPPED_PREFIX}/bin/python"
    checked = subprocess.run(
        [str(venv / "bin" / "python"), str(script), "check", str(root / POLICY)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    assert not list(venv.glob("lib/python3*/site-packages/psutil")), "psutil is no runtime dependency"

    _verify_copy(root, SHIPPED_PREFIX, tmp_path)
    assert not any(f"{SHIPPED_PREFIX}/bin/uoomd" in line for line in _commands_missing_under_root(root))
    # The same check fails when the venv's uoomd is not where the unit says: it is a real check.
    script.rename(script.with_suffix(".moved"))
    assert any(f"{SHIPPED_PREFIX}/bin/uoomd" in line for line in _commands_missing_under_root(root))
    script.with_suffix(".moved").rename(script)

    # Again: harmless. The unit and policy stay byte for byte, and so does the record.
    before = _tree(root, skip=venv)
    again = install_unit("--root", str(root), "--wheels", str(wheels), *_python_args())
    assert f"unchanged /{UNIT}" in again.stdout
    assert f"kept /{POLICY} (installed by an earlier run)" in again.stdout
    assert _tree(root, skip=venv) == before
    manifest = (venv / "share" / "uoomd-install" / "manifest").read_text().splitlines()
    assert manifest == [
        "dir /opt",
        f"venv {SHIPPED_PREFIX}",
        "dir /etc",
        "dir /etc/systemd",
        "dir /etc/systemd/system",
        f"unit /{UNIT}",
        "dir /etc/uoomd",
        f"policy /{POLICY}",
    ]

    gone = install_unit("--root", str(root), "--uninstall")
    assert sorted(root.iterdir()) == [], gone.stdout
    assert gone.stdout.rstrip().endswith("systemctl daemon-reload")
    twice = install_unit("--root", str(root), "--uninstall")
    assert twice.stdout.startswith("nothing to undo")


def test_an_edited_policy_survives_uninstall_and_an_enabled_unit_refuses_it(wheels: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    prefix = "/srv/uoomd-test"
    install_unit("--root", str(root), "--prefix", prefix, "--wheels", str(wheels), "--python", sys.executable)
    settings = _settings((root / UNIT).read_text())
    assert settings["ExecStart"] == f"{prefix}/bin/uoomd run --policy /etc/uoomd/uoomd.toml"
    assert settings["ExecReload"] == f"{prefix}/bin/uoomd reload --pid $MAINPID"
    assert "/opt/uoomd/bin" not in (root / UNIT).read_text()
    assert (root / prefix.lstrip("/") / "bin" / "uoomd").exists()

    edited = (root / POLICY).read_text() + "\n# the admin's own line\n"
    (root / POLICY).write_text(edited)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "uoomd.service").symlink_to(f"/{UNIT}")
    refused = install_unit("--root", str(root), "--prefix", prefix, "--uninstall", check=False)
    assert refused.returncode == 1
    assert "systemctl disable --now uoomd" in refused.stderr
    assert (root / UNIT).exists()  # nothing removed
    assert (root / prefix.lstrip("/")).exists()

    shutil.rmtree(wants)  # what `systemctl disable` does here
    gone = install_unit("--root", str(root), "--prefix", prefix, "--uninstall")
    assert f"kept /{POLICY}: edited since it was installed" in gone.stdout
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["etc", "etc/uoomd", POLICY]
    assert (root / POLICY).read_text() == edited


def test_an_admins_policy_is_never_overwritten_nor_removed(wheels: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "uoomd").mkdir(parents=True)
    mine = "# the admin's policy\n[[guard]]\nname = 'system'\nscope = 'system'\n"
    (root / POLICY).write_text(mine)
    result = install_unit("--root", str(root), "--wheels", str(wheels), "--python", sys.executable)
    assert f"kept /{POLICY}: a policy is there already" in result.stdout
    assert (root / POLICY).read_text() == mine
    install_unit("--root", str(root), "--uninstall")
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["etc", "etc/uoomd", POLICY]  # /etc was there before: only what it made is gone
    assert (root / POLICY).read_text() == mine


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--prefix", "/"], 1, "--prefix must be an absolute path"),
        (["--prefix", "opt/uoomd"], 1, "--prefix must be an absolute path"),
        (["--prefix", "/opt/../etc"], 1, "--prefix must be an absolute path"),
        (["--prefix", "/opt/uo omd"], 1, "--prefix must be an absolute path"),
        (["--prefix", "/opt/$(id)"], 1, "--prefix must be an absolute path"),
        (["--prefix"], 2, "--prefix needs a value"),
        (["--frobnicate"], 2, "unknown argument: --frobnicate"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_made(
    tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    result = install_unit("--root", str(tmp_path), *args, check=False)
    assert (result.returncode, says in result.stderr) == (code, True), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_prefix_it_did_not_make_is_refused(tmp_path: Path) -> None:
    (tmp_path / "opt" / "uoomd").mkdir(parents=True)
    (tmp_path / "opt" / "uoomd" / "data").write_text("someone else's\n")
    result = install_unit("--root", str(tmp_path), "--python", sys.executable, check=False)
    assert result.returncode == 1
    assert "was not made by install-unit: refusing to install over it" in result.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["opt", "opt/uoomd", "opt/uoomd/data"]


def test_a_unit_whose_reload_would_not_wait_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    # A copy of the tree whose unit still sends a bare SIGHUP (the unit before issue 13).
    tree = tmp_path / "tree"
    for name in ("packaging/install-unit", "systemd/uoomd.service", "etc/uoomd.toml", "pyproject.toml"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    unit = tree / "systemd" / "uoomd.service"
    text = unit.read_text()
    assert "ExecReload=/opt/uoomd/bin/uoomd reload --pid $MAINPID\n" in text
    unit.write_text(text.replace("/opt/uoomd/bin/uoomd reload --pid $MAINPID", "/bin/kill -HUP $MAINPID"))
    root = tmp_path / "root"
    root.mkdir()
    result = subprocess.run(
        [str(tree / "packaging" / "install-unit"), "--root", str(root), "--python", sys.executable],
        capture_output=True,
        text=True,
        env=_offline_env(),
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "has no 'ExecReload=/opt/uoomd/bin/uoomd reload --pid $MAINPID' line" in result.stderr
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(("script", "shell"), [(INSTALL, "sh"), (ROOT / ".ci" / "run", "bash")])
def test_the_scripts_pass_shellcheck(script: Path, shell: str) -> None:
    # install-unit as POSIX sh (no bashisms: it runs under dash, busybox, ...); .ci/run is bash.
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    result = subprocess.run(
        ["shellcheck", f"--shell={shell}", str(script)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout
