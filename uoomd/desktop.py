"""Desktop notices: tell the logged-in users, over their D-Bus session bus, that uoomd killed something, or
(a warning) that it will if this goes on.

The notice's text, the one blocking conversation a notice child has with a bus (its bytes
are uoomd/dbus.py's), and the service that forks and reaps those children.

The conversation never runs in the daemon's loop. :class:`DesktopNotices` forks one
short-lived child per session bus; the child drops to the bus owner's gid and uid,
connects, talks with a timeout, writes one JSON line to a pipe and ``_exit``s; the loop
reaps it with ``waitpid(WNOHANG)``. Why a forked child and not a non-blocking socket in
the loop: the session bus accepts only its owner (measured with dbus-daemon 1.14: a
root connection to another user's bus authenticates and is then dropped), so the
connect() must come from a process that has become that user, and uoomd itself must
stay root; a stuck or hostile bus can only stall the child; no exec, so nothing must be
readable by the user (a pyenv under /root is not). The daemon is single-threaded, so
fork() is safe; mlockall's locks are not inherited, so the child costs only the pages
it touches. Text goes in as D-Bus strings, never through a shell.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass

from uoomd.dbus import (
    ERROR,
    F_ERROR_NAME,
    METHOD_RETURN,
    URGENCY_CRITICAL,
    DbusError,
    Message,
    auth_external,
    decode_message,
    message_length,
    method_call,
    notify_call,
)
from uoomd.logs import Log, escape
from uoomd.service import unprotect_child

RUN_USER = "/run/user"
NOTICE_TIMEOUT_S = 3.0  # the child gives up on a bus that does not answer within this


# --- text of the notice (pure) -----------------------------------------------------------------


def markup_safe(text: str) -> str:
    """A process name for a notification body: control characters escaped (as in the logs),
    then the body-markup subset's metacharacters (Desktop Notifications Specification,
    "Markup"), so a name like ``<b>x</b>`` or ``a&b`` shows as typed."""
    return html.escape(escape(text), quote=True)


def kill_notice(facts: dict[str, object]) -> tuple[str, str]:
    """(summary, body) for a victim_chosen record's facts."""
    name = markup_safe(str(facts.get("name", "?")))
    pid = facts.get("pid", "?")
    rss = facts.get("rss_bytes")
    size = f", {int(rss) / (1 << 20):.0f} MiB" if isinstance(rss, int) else ""
    verb = "Stopped" if facts.get("action") == "term" else "Killed"
    summary = f"Low memory: {verb.lower()} {name}"
    fraction = facts.get("available_fraction")
    avail = f" at {float(fraction) * 100:.1f}% available" if isinstance(fraction, int | float) else ""
    body = (
        f"{verb} {name} (pid {pid}{size}) to keep the system responsive.\n"
        f"guard {markup_safe(str(facts.get('guard', '?')))}{avail}; see `journalctl -u uoomd`."
    )
    return summary, body


def _size(rss: object) -> str:
    """2.1 GiB, 340 MiB: as a person reads a process's size."""
    if not isinstance(rss, int) or isinstance(rss, bool) or rss < 0:
        return "?"
    return f"{rss / (1 << 30):.1f} GiB" if rss >= 1 << 30 else f"{rss / (1 << 20):.0f} MiB"


def warn_notice(facts: dict[str, object]) -> tuple[str, str]:
    """(summary, body) for a warning's facts (memory_warn, psi_warn), naming the likely victim:
    "Memory low: firefox (2.1 GiB) will be stopped if this goes on"."""
    name = markup_safe(str(facts.get("name", "?")))
    summary = f"Memory low: {name} ({_size(facts.get('rss_bytes'))}) will be stopped if this goes on"
    fraction = facts.get("available_fraction")
    avail = f"{float(fraction) * 100:.1f}% of memory available" if isinstance(fraction, int | float) else "memory low"
    trigger = markup_safe(str(facts.get("trigger", "?")))
    body = (
        f"{avail} (guard {markup_safe(str(facts.get('guard', '?')))}, {trigger}). "
        "Closing something you do not need now frees memory; see `journalctl -u uoomd`."
    )
    return summary, body


# --- the conversation (blocking, in the child) -------------------------------------------------


def send_notice(bus_path: str, *, summary: str, body: str, urgency: int, timeout_s: float = NOTICE_TIMEOUT_S) -> int:
    """Authenticate, Hello, Notify; returns the notification id. Raises DbusError or OSError."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(bus_path)
        sock.sendall(auth_external(os.geteuid()))
        buffer = bytearray()
        line = _read_line(sock, buffer, deadline)
        if not line.startswith(b"OK "):
            raise DbusError(f"authentication refused: {line.decode(errors='replace')[:200]}")
        hello = method_call(
            1,
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="Hello",
        )
        sock.sendall(b"BEGIN\r\n" + hello + notify_call(2, summary=summary, body=body, urgency=urgency))
        while True:
            message = _read_message(sock, buffer, deadline)
            if message.reply_serial != 2:
                continue  # the Hello reply, NameAcquired
            if message.type == ERROR:
                detail = message.body[0] if message.body else ""
                raise DbusError(f"{message.field(F_ERROR_NAME)}: {detail}")
            if message.type == METHOD_RETURN and message.body and isinstance(message.body[0], int):
                return message.body[0]
            raise DbusError("unexpected reply to Notify")


def _recv(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DbusError("timed out")
    sock.settimeout(remaining)
    chunk = sock.recv(65536)
    if not chunk:
        raise DbusError("the bus closed the connection")
    return chunk


def _read_line(sock: socket.socket, buffer: bytearray, deadline: float) -> bytes:
    while b"\r\n" not in buffer:
        if len(buffer) > 16384:
            raise DbusError("authentication line too long")
        buffer += _recv(sock, deadline)
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


def _read_message(sock: socket.socket, buffer: bytearray, deadline: float) -> Message:
    while True:
        total = message_length(bytes(buffer[:16]))
        if total is not None and len(buffer) >= total:
            data = bytes(buffer[:total])
            del buffer[:total]
            return decode_message(data)
        buffer += _recv(sock, deadline)


# --- the daemon's side: find the buses, start and reap the children ------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionBus:
    uid: int
    gid: int
    path: str


def find_session_buses(run_user: str = RUN_USER) -> list[SessionBus]:
    """The logged-in users' session buses: /run/user/UID/bus sockets owned by UID."""
    buses: list[SessionBus] = []
    try:
        names = sorted(os.listdir(run_user))
    except OSError:
        return buses
    for name in names:
        if not name.isdigit():
            continue
        path = os.path.join(run_user, name, "bus")
        try:
            info = os.lstat(path)
        except OSError:
            continue
        # A socket in UID's directory that UID does not own is not UID's bus: skip it
        # rather than hand it a notice (or connect as UID to something else).
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == int(name):
            buses.append(SessionBus(uid=info.st_uid, gid=info.st_gid, path=path))
    return buses


@dataclass(slots=True)
class _Child:
    bus: SessionBus
    pid: int
    result_fd: int
    started_at: float


class DesktopNotices:
    """Forks one notice child per session bus and reaps them from the loop; never blocks."""

    def __init__(self, log: Log, *, run_user: str = RUN_USER, timeout_s: float = NOTICE_TIMEOUT_S) -> None:
        self._log = log
        self._run_user = run_user
        self._timeout_s = timeout_s
        self._children: list[_Child] = []

    @property
    def running(self) -> int:
        return len(self._children)

    def notify(
        self, summary: str, body: str, *, urgency: int = URGENCY_CRITICAL, now: float, uid: int | None = None
    ) -> None:
        """To every logged-in user's bus, or (``uid``) to that user's only."""
        buses = [b for b in find_session_buses(self._run_user) if uid is None or b.uid == uid]
        if not buses:
            reason = "no session bus" if uid is None else "no session bus of that user"
            self._log.info("desktop_notice_skipped", reason=reason, run_user=self._run_user, uid=uid)
            return
        busy = {child.bus.path for child in self._children}
        for bus in buses:
            if bus.path in busy:
                # The previous notice to this bus is still talking to it: one at a time.
                self._log.info("desktop_notice_skipped", reason="previous notice still running", uid=bus.uid)
                continue
            self._start(bus, summary, body, urgency, now)

    def _start(self, bus: SessionBus, summary: str, body: str, urgency: int, now: float) -> None:
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
        except OSError as exc:
            self._log.warning("desktop_notice_failed", uid=bus.uid, bus=bus.path, error=str(exc))
            return
        if pid == 0:  # pragma: no cover - the child; its effects are asserted by the integration tests
            os.close(read_fd)
            _child_main(bus, summary, body, urgency=urgency, timeout_s=self._timeout_s, result_fd=write_fd)
        os.close(write_fd)
        self._children.append(_Child(bus=bus, pid=pid, result_fd=read_fd, started_at=now))

    def poll(self, now: float) -> None:
        """Reap finished children and log how it went; kill one that outlived its timeout twice over."""
        still: list[_Child] = []
        for child in self._children:
            done, status = os.waitpid(child.pid, os.WNOHANG)
            if done == 0:
                if now - child.started_at <= 2 * self._timeout_s + 1:
                    still.append(child)
                    continue
                # Our own child, not yet reaped: its PID cannot have been recycled.
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
                status = -1
            self._report(child, status)
        self._children = still

    def _report(self, child: _Child, status: int) -> None:
        try:
            output = os.read(child.result_fd, 65536).decode(errors="replace")
        except OSError:
            output = ""
        finally:
            os.close(child.result_fd)
        result: dict[str, object] = {}
        with contextlib.suppress(ValueError):
            loaded = json.loads(output) if output else {}
            result = loaded if isinstance(loaded, dict) else {}
        if "id" in result:
            self._log.info("desktop_notice_sent", uid=child.bus.uid, bus=child.bus.path, notification_id=result["id"])
        else:
            # No notification server, a bus that refuses us: a log line, never a failure.
            error = result.get("error") or ("timed out" if status == -1 else f"wait status {status}")
            self._log.info("desktop_notice_failed", uid=child.bus.uid, bus=child.bus.path, error=str(error))

    def close(self) -> None:
        for child in self._children:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(child.pid, os.WNOHANG)[0] == 0:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
            os.close(child.result_fd)
        self._children = []


def _child_main(bus: SessionBus, summary: str, body: str, *, urgency: int, timeout_s: float, result_fd: int) -> None:
    """In the forked child: become the bus's owner, talk, write one JSON line, _exit.

    Never returns: os._exit skips the parent's atexit handlers and buffered log output."""
    code = 1
    try:
        # The daemon's handlers would write to its wake-up pipe; the child is not the daemon.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()  # a terminal's SIGINT for uoomd is not for the child
        unprotect_child()  # before setresuid: then /proc/self/oom_score_adj is no longer ours to write
        try:
            if os.geteuid() != bus.uid:
                # Groups, then gid, then uid: after setresuid we could no longer change the others.
                os.setgroups([])
                os.setresgid(bus.gid, bus.gid, bus.gid)
                os.setresuid(bus.uid, bus.uid, bus.uid)
        except OSError as exc:
            message = (
                f"cannot become uid {bus.uid}: {exc.strerror} "
                "(the session bus accepts only its owner: CAP_SETUID and CAP_SETGID are needed)"
            )
            os.write(result_fd, json.dumps({"error": message}).encode())
        else:
            notification_id = send_notice(bus.path, summary=summary, body=body, urgency=urgency, timeout_s=timeout_s)
            os.write(result_fd, json.dumps({"id": notification_id}).encode())
            code = 0
    except (OSError, DbusError) as exc:
        with contextlib.suppress(OSError):
            os.write(result_fd, json.dumps({"error": str(exc)}).encode())
    except BaseException:  # whatever happens, the child must never return into the daemon's loop
        with contextlib.suppress(OSError):
            os.write(result_fd, json.dumps({"error": "internal error in the notice child"}).encode())
    finally:
        os._exit(code)
