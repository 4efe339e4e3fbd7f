"""The service around the loop, on the real machine: desktop notices over a real dbus-daemon,
the systemd unit under systemd-analyze, and the processes uoomd never picks.

The session buses here are dbus-daemons the test starts on sockets in its own temp
directory; the only processes signalled are those the test started, through their Popen.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.builders import make_plan, make_rule
from uoomd import dbus, desktop
from uoomd.dbus import (
    METHOD_CALL,
    METHOD_RETURN,
    Message,
    Variant,
    auth_external,
    encode_message,
    method_call,
)
from uoomd.desktop import DesktopNotices, kill_notice
from uoomd.scoring import REASON_INIT, REASON_PARENT, REASON_SELF, rank
from uoomd.sources import procfs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, facts: dict[str, Any]) -> None:
        self.events.append((level, event, facts))

    def info(self, event: str, **facts: Any) -> None:
        self._add("info", event, facts)

    def warning(self, event: str, **facts: Any) -> None:
        self._add("warning", event, facts)

    def error(self, event: str, **facts: Any) -> None:
        self._add("error", event, facts)

    def debug(self, event: str, **facts: Any) -> None:
        self._add("debug", event, facts)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [facts for _level, name, facts in self.events if name == event]


# --- a real session bus -----------------------------------------------------------------------


@dataclass
class SessionBus:
    run_user: str  # stands in for /run/user
    uid: int
    path: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def run_user() -> Iterator[str]:
    # Short (sun_path is 108 bytes) and traversable by the unprivileged bus owner.
    directory = tempfile.mkdtemp(prefix="uoomd-dbus-")
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start_bus(run_user: str, uid: int) -> SessionBus:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed (Debian package dbus-daemon)")
    if uid != os.geteuid() and os.geteuid() != 0:
        pytest.skip("starting a bus as another user needs root")
    home = os.path.join(run_user, str(uid))
    os.makedirs(home, exist_ok=True)
    os.chown(home, uid, uid)
    path = os.path.join(home, "bus")
    argv = ["dbus-daemon", "--session", f"--address=unix:path={path}", "--nofork", "--print-address"]
    drop: dict[str, Any] = {} if uid == os.geteuid() else {"user": uid, "group": uid, "extra_groups": []}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **drop)
    assert process.stdout is not None
    process.stdout.readline()  # printed once it listens
    return SessionBus(run_user=run_user, uid=uid, path=path, process=process)


@pytest.fixture
def buses() -> Iterator[list[SessionBus]]:
    started: list[SessionBus] = []
    try:
        yield started
    finally:
        for bus in started:
            bus.process.kill()  # our own child, by its Popen
            bus.process.wait()


@dataclass
class FakeNotificationServer:
    """Owns org.freedesktop.Notifications on a bus and answers Notify with an id (a thread)."""

    bus_path: str
    calls: list[Message] = field(default_factory=list)
    notification_id: int = 4242

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.bus_path)
        self.sock.sendall(auth_external(os.geteuid()))
        self.buffer = bytearray()
        deadline = time.monotonic() + 10
        assert desktop._read_line(self.sock, self.buffer, deadline).startswith(b"OK ")
        bus = {
            "destination": "org.freedesktop.DBus",
            "path": "/org/freedesktop/DBus",
            "interface": "org.freedesktop.DBus",
        }
        self.sock.sendall(
            b"BEGIN\r\n"
            + method_call(1, member="Hello", **bus)
            + method_call(2, member="RequestName", signature="su", body=["org.freedesktop.Notifications", 4], **bus)
        )
        while True:  # wait until the name is ours: only then may a Notify be routed to us
            reply = desktop._read_message(self.sock, self.buffer, deadline)
            if reply.reply_serial == 2:
                assert reply.type == METHOD_RETURN
                assert reply.body == (1,), "not the primary owner of org.freedesktop.Notifications"
                break
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        serial = 10
        while True:
            try:
                message = desktop._read_message(self.sock, self.buffer, time.monotonic() + 30)
            except (OSError, dbus.DbusError):
                return
            if message.type == METHOD_CALL and message.field(dbus.F_MEMBER) == "Notify":
                self.calls.append(message)
                sender = message.field(dbus.F_SENDER)
                assert sender is not None
                serial += 1
                fields = {
                    dbus.F_REPLY_SERIAL: Variant("u", message.serial),
                    dbus.F_DESTINATION: Variant("s", sender),
                }
                reply = encode_message(
                    type=METHOD_RETURN, serial=serial, fields=fields, signature="u", body=[self.notification_id]
                )
                self.sock.sendall(reply)

    def close(self) -> None:
        self.sock.close()


def settle(notices: DesktopNotices, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while notices.running and time.monotonic() < deadline:
        notices.poll(time.monotonic())
        time.sleep(0.01)
    assert notices.running == 0, "a notice child never finished"


def test_notify_call_arrives_with_summary_body_and_critical_urgency(run_user: str, buses: list[SessionBus]) -> None:
    bus = start_bus(run_user, os.geteuid())
    buses.append(bus)
    server = FakeNotificationServer(bus.path)
    try:
        log = RecordingLog()
        notices = DesktopNotices(log, run_user=run_user)
        summary, body = kill_notice(
            {"name": "chromium", "pid": 4711, "rss_bytes": 2 << 30, "action": "kill", "guard": "system"}
        )
        notices.notify(summary, body, now=time.monotonic())
        settle(notices)
        assert len(server.calls) == 1
        app, replaces, _icon, got_summary, got_body, actions, hints, expire = server.calls[0].body
        assert (app, replaces, actions, expire) == ("uoomd", 0, [], -1)
        assert got_summary == "Low memory: killed chromium"
        assert isinstance(got_body, str)
        assert got_body.startswith("Killed chromium (pid 4711, 2048 MiB)")
        assert hints == {"urgency": Variant("y", dbus.URGENCY_CRITICAL)}
        (sent,) = log.named("desktop_notice_sent")
        assert sent["notification_id"] == server.notification_id
        assert sent["uid"] == bus.uid
    finally:
        server.close()


def test_a_hostile_process_name_reaches_the_desktop_escaped(run_user: str, buses: list[SessionBus]) -> None:
    bus = start_bus(run_user, os.geteuid())
    buses.append(bus)
    server = FakeNotificationServer(bus.path)
    try:
        notices = DesktopNotices(RecordingLog(), run_user=run_user)
        summary, body = kill_notice({"name": '<a href="x">&\nREADY=1', "pid": 1, "action": "term"})
        notices.notify(summary, body, now=time.monotonic())
        settle(notices)
        got_body = server.calls[0].body[4]
        assert isinstance(got_body, str)
        assert "&lt;a href=&quot;x&quot;&gt;&amp;\\x0aREADY=1" in got_body
        assert "<a" not in got_body
        assert "\nREADY" not in got_body
    finally:
        server.close()


def test_the_notice_child_becomes_the_bus_owner_before_connecting(run_user: str, buses: list[SessionBus]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start a bus as another user")
    bus = start_bus(run_user, NOBODY)
    buses.append(bus)
    # An independent parser watches the bus: dbus-monitor, as the owner (it is /usr/bin, readable by nobody).
    monitor = subprocess.Popen(
        ["dbus-monitor", "--address", f"unix:path={bus.path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )
    try:
        time.sleep(0.3)  # it becomes a monitor
        log = RecordingLog()
        notices = DesktopNotices(log, run_user=run_user)
        notices.notify("Low memory: killed hog", "Killed hog (pid 7)", now=time.monotonic())
        settle(notices)
        time.sleep(0.2)
    finally:
        monitor.kill()
        output = monitor.communicate()[0].decode(errors="replace")
    # Accepted as the owner and routed: nobody owns org.freedesktop.Notifications on this bus,
    # so the bus itself answers ServiceUnknown (a root connection would have been dropped).
    (failed,) = log.named("desktop_notice_failed")
    assert "ServiceUnknown" in failed["error"]
    assert "member=Notify" in output
    assert 'string "Low memory: killed hog"' in output
    assert re.search(r"variant\s+byte 2", output)


def test_root_is_not_accepted_on_another_users_bus(run_user: str, buses: list[SessionBus]) -> None:
    """Why the child drops privileges: dbus-daemon drops a root connection to a user's bus."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bus = start_bus(run_user, NOBODY)
    buses.append(bus)
    with pytest.raises(dbus.DbusError, match="closed the connection"):
        desktop.send_notice(bus.path, summary="s", body="b", urgency=1, timeout_s=3)


def test_no_session_bus_is_a_log_line(run_user: str) -> None:
    log = RecordingLog()
    notices = DesktopNotices(log, run_user=run_user)
    notices.notify("s", "b", now=0.0)
    assert notices.running == 0
    (skipped,) = log.named("desktop_notice_skipped")
    assert skipped["reason"] == "no session bus"


def test_a_dead_bus_socket_is_a_log_line_not_a_failure(run_user: str) -> None:
    home = os.path.join(run_user, str(os.geteuid()))
    os.makedirs(home)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(home, "bus"))
    stale.close()  # the file stays, nobody listens: as after a session's bus crashed
    log = RecordingLog()
    notices = DesktopNotices(log, run_user=run_user)
    notices.notify("s", "b", now=time.monotonic())
    settle(notices)
    (failed,) = log.named("desktop_notice_failed")
    assert "Connection refused" in failed["error"]


def test_a_socket_not_owned_by_the_uid_of_its_directory_is_not_a_bus(run_user: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    home = os.path.join(run_user, "1000")
    os.makedirs(home)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(home, "bus"))  # owned by root, in uid 1000's directory
    sock.close()
    assert desktop.find_session_buses(run_user) == []
    os.chown(os.path.join(home, "bus"), 1000, 1000)
    assert [b.uid for b in desktop.find_session_buses(run_user)] == [1000]


# --- the systemd unit -------------------------------------------------------------------------


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # The uoomd beside the interpreter running the tests (a venv's), before any on PATH.
    beside = Path(sys.executable).parent / "uoomd"
    uoomd = str(beside) if beside.exists() else shutil.which("uoomd")
    assert uoomd is not None, "the uoomd command is not installed"
    text = (ROOT / "systemd" / "uoomd.service").read_text()
    # packaging/install-unit's default prefix; it rewrites these paths for another.
    assert "/opt/uoomd/bin/uoomd " in text
    assert "/usr/local/bin" not in text
    unit = tmp_path / "uoomd.service"
    unit.write_text(text.replace("/opt/uoomd/bin/uoomd ", f"{uoomd} "))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    # Messages about other units of this machine (it boots no systemd) are not ours.
    ours = [line for line in result.stderr.splitlines() if "uoomd.service" in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], result.stderr


def test_the_unit_asks_for_what_the_daemon_does() -> None:
    text = (ROOT / "systemd" / "uoomd.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    assert settings["Type"] == "notify"
    # `systemctl reload` waits for the outcome: the command sends SIGHUP and reads the state file.
    assert settings["ExecReload"] == "/opt/uoomd/bin/uoomd reload --pid $MAINPID"
    caps = set(settings["CapabilityBoundingSet"].split())
    # kill, read every /proc/PID, write other users' files under /sys/fs/cgroup, lock memory, raise priority
    assert {"CAP_KILL", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_IPC_LOCK", "CAP_SYS_NICE"} <= caps
    syscalls = settings["SystemCallFilter"].split()
    for needed in ("process_mrelease", "pidfd_open", "pidfd_send_signal"):
        assert needed in syscalls or _in_system_service(needed), needed


def _in_system_service(syscall: str) -> bool:
    """Whether @system-service allows a syscall, its nested groups expanded."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return False
    seen: set[str] = set()
    todo = ["@system-service"]
    while todo:
        group = todo.pop()
        if group in seen:
            continue
        seen.add(group)
        listing = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True, check=False)
        for line in listing.stdout.splitlines()[1:]:
            name = line.strip()
            if name == syscall:
                return True
            if name.startswith("@"):
                todo.append(name)
    return False


def test_system_service_filter_lacks_process_mrelease_here_so_the_unit_names_it() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    assert _in_system_service("pidfd_send_signal")  # the expansion works
    if _in_system_service("process_mrelease"):
        pytest.skip("this systemd's @system-service already allows process_mrelease")
    text = (ROOT / "systemd" / "uoomd.service").read_text()
    assert re.search(r"^SystemCallFilter=.*\bprocess_mrelease\b", text, re.MULTILINE)


# --- never itself, its parent or init --------------------------------------------------------


def test_uoomd_never_picks_itself_its_parent_or_pid_1_even_when_a_rule_prefers_everything() -> None:
    everything = make_rule(0, adjust=1000, name="")
    plan = make_plan(everything)
    guard = plan.guards[0]
    snapshot = procfs.read_snapshot("/proc", self_pid=os.getpid())
    totalpages = (snapshot.total_ram_bytes + snapshot.total_swap_bytes) // snapshot.page_size
    ranking = rank(snapshot, plan, guard, totalpages=totalpages)
    reasons = {int(e.process.pid): e.reason for e in ranking.excluded}
    assert reasons[os.getpid()] == REASON_SELF
    assert reasons[os.getppid()] in {REASON_PARENT, REASON_INIT}
    assert reasons[1] == REASON_INIT
    chosen = {int(c.process.pid) for c in ranking.candidates}
    assert not chosen & {os.getpid(), os.getppid(), 1}
    assert ranking.candidates, "the rule should have made every other process a candidate"
