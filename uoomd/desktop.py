"""Desktop notices: tell the logged-in users, over their D-Bus session bus, that uoomd killed something.

No D-Bus library is installed and the daemon must stay small, so this speaks the few
bytes of the wire protocol it needs (the D-Bus Specification, "Message Protocol" and
"Authentication Protocol"): ``AUTH EXTERNAL``, ``Hello``, one
``org.freedesktop.Notifications.Notify`` call, and the reply.

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
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from uoomd.logs import Log, escape
from uoomd.service import unprotect_child

RUN_USER = "/run/user"
NOTICE_TIMEOUT_S = 3.0  # the child gives up on a bus that does not answer within this
MAX_MESSAGE_BYTES = 1 << 20  # a reply larger than this is not one we asked for

# D-Bus Specification, "Message Format": message types and header field codes.
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
FLAG_NO_REPLY_EXPECTED = 0x1
F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME, F_REPLY_SERIAL, F_DESTINATION, F_SENDER, F_SIGNATURE = range(1, 9)

URGENCY_NORMAL, URGENCY_CRITICAL = 1, 2  # Desktop Notifications Specification, "Urgency Levels"


class DbusError(Exception):
    """The bus or the notification server said no, or spoke something we cannot read."""


# --- marshalling (pure) ---------------------------------------------------------------------

Value: TypeAlias = "str | int | list[Value] | tuple[Value, ...] | dict[str, Value] | Variant"


@dataclass(frozen=True, slots=True)
class Variant:
    signature: str  # a single complete type
    value: Value


_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "s": 4, "o": 4, "g": 1, "v": 1, "a": 4}
_ALIGN.update({"(": 8, "{": 8})
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q"}


def split_signature(signature: str) -> list[str]:
    """'susssasa{sv}i' -> ['s', 'u', 's', 's', 's', 'as', 'a{sv}', 'i']."""
    out: list[str] = []
    index = 0
    while index < len(signature):
        end = _complete_type_end(signature, index)
        out.append(signature[index:end])
        index = end
    return out


def _complete_type_end(signature: str, index: int) -> int:
    char = signature[index]
    if char == "a":
        return _complete_type_end(signature, index + 1)
    if char in "({":
        close = ")" if char == "(" else "}"
        depth, pos = 0, index
        while pos < len(signature):
            if signature[pos] == char:
                depth += 1
            elif signature[pos] == close:
                depth -= 1
                if depth == 0:
                    return pos + 1
            pos += 1
        raise DbusError(f"unbalanced signature {signature!r}")
    if char in _ALIGN:
        return index + 1
    raise DbusError(f"unsupported type {char!r} in signature {signature!r}")


class Writer:
    """Appends marshalled values, aligned from the start of the message (little-endian)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def align(self, boundary: int) -> None:
        self.data += b"\0" * (-len(self.data) % boundary)

    def write(self, signature: str, value: Value) -> None:
        for one, item in zip(split_signature(signature), _as_list(signature, value), strict=True):
            self._write_one(one, item)

    def _write_one(self, sig: str, value: Value) -> None:
        code = sig[0]
        self.align(_ALIGN[code])
        if code in _FIXED:
            assert isinstance(value, int)
            self.data += struct.pack("<" + _FIXED[code], value)
        elif code in "so":
            assert isinstance(value, str)
            raw = value.encode()
            self.data += struct.pack("<I", len(raw)) + raw + b"\0"
        elif code == "g":
            assert isinstance(value, str)
            raw = value.encode()
            self.data += struct.pack("<B", len(raw)) + raw + b"\0"
        elif code == "v":
            assert isinstance(value, Variant)
            self._write_one("g", value.signature)
            self._write_one(value.signature, value.value)
        elif code == "(":
            assert isinstance(value, tuple | list)
            for part, item in zip(split_signature(sig[1:-1]), value, strict=True):
                self._write_one(part, item)
        elif code == "a":
            self._write_array(sig[1:], value)
        else:  # pragma: no cover - split_signature already refused it
            raise DbusError(f"cannot write {sig!r}")

    def _write_array(self, element: str, value: Value) -> None:
        length_at = len(self.data)
        self.data += b"\0\0\0\0"
        self.align(_ALIGN[element[0]])  # padding after the length is not counted in it
        start = len(self.data)
        if element.startswith("{"):
            key_sig, value_sig = split_signature(element[1:-1])
            assert isinstance(value, dict)
            for key, item in value.items():
                self.align(8)
                self._write_one(key_sig, key)
                self._write_one(value_sig, item)
        else:
            assert isinstance(value, list | tuple)
            for item in value:
                self._write_one(element, item)
        struct.pack_into("<I", self.data, length_at, len(self.data) - start)


def _as_list(signature: str, value: Value) -> Sequence[Value]:
    if len(split_signature(signature)) == 1:
        return [value]
    assert isinstance(value, tuple | list)
    return value


class Reader:
    """Reads marshalled values from a whole message, in its own byte order."""

    def __init__(self, data: bytes, offset: int, order: str) -> None:
        self.data = data
        self.pos = offset
        self.order = order  # "<" or ">"

    def align(self, boundary: int) -> None:
        self.pos += -self.pos % boundary

    def _unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise DbusError("message truncated")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def _bytes(self, length: int) -> bytes:
        if self.pos + length + 1 > len(self.data):
            raise DbusError("message truncated")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length + 1  # and the NUL
        return raw

    def read(self, signature: str) -> list[Value]:
        return [self._read_one(one) for one in split_signature(signature)]

    def _read_one(self, sig: str) -> Value:
        code = sig[0]
        self.align(_ALIGN[code])
        if code in _FIXED:
            return self._unpack(_FIXED[code])
        if code in "so":
            return self._bytes(self._unpack("I")).decode(errors="replace")
        if code == "g":
            return self._bytes(self._unpack("B")).decode(errors="replace")
        if code == "v":
            inner = str(self._read_one("g"))
            return Variant(inner, self._read_one(inner))
        if code == "(":
            return tuple(self._read_one(part) for part in split_signature(sig[1:-1]))
        if code == "a":
            length = self._unpack("I")
            element = sig[1:]
            self.align(_ALIGN[element[0]])
            end = self.pos + length
            if end > len(self.data):
                raise DbusError("message truncated")
            if element.startswith("{"):
                key_sig, value_sig = split_signature(element[1:-1])
                entries: dict[str, Value] = {}
                while self.pos < end:
                    self.align(8)
                    key = str(self._read_one(key_sig))  # before the value: an assignment evaluates its right side first
                    entries[key] = self._read_one(value_sig)
                return entries
            items: list[Value] = []
            while self.pos < end:
                items.append(self._read_one(element))
            return items
        raise DbusError(f"cannot read {sig!r}")  # pragma: no cover


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    type: int
    serial: int
    fields: dict[int, Value]
    body: tuple[Value, ...]
    flags: int = 0

    @property
    def reply_serial(self) -> int | None:
        value = self.fields.get(F_REPLY_SERIAL)
        return value if isinstance(value, int) else None

    def field(self, code: int) -> str | None:
        value = self.fields.get(code)
        return value if isinstance(value, str) else None


def encode_message(
    *,
    type: int,  # the specification's name for it
    serial: int,
    fields: dict[int, Variant],
    signature: str = "",
    body: Sequence[Value] = (),
    flags: int = 0,
) -> bytes:
    """One whole message: the fixed header, the header fields, padding to 8, the body."""
    body_writer = Writer()
    if signature:
        body_writer.write(signature, list(body) if len(split_signature(signature)) > 1 else body[0])
    all_fields = dict(fields)
    if signature:
        all_fields[F_SIGNATURE] = Variant("g", signature)
    head = Writer()
    head.data += struct.pack("<cBBBII", b"l", type, flags, 1, len(body_writer.data), serial)
    head.write("a(yv)", [(code, value) for code, value in sorted(all_fields.items())])
    head.align(8)  # the body starts on an 8-byte boundary
    return bytes(head.data + body_writer.data)


def message_length(prefix: bytes) -> int | None:
    """The whole message's length from its first 16 bytes, or None when fewer have arrived."""
    if len(prefix) < 16:
        return None
    order = {b"l": "<", b"B": ">"}.get(prefix[:1])
    if order is None:
        raise DbusError(f"bad byte order mark {prefix[:1]!r}")
    body_len, _serial, fields_len = struct.unpack_from(order + "III", prefix, 4)
    header = 16 + fields_len
    total = header + (-header % 8) + body_len
    if total > MAX_MESSAGE_BYTES:
        raise DbusError(f"message of {total} bytes")
    return int(total)


def decode_message(data: bytes) -> Message:
    order = {b"l": "<", b"B": ">"}.get(data[:1])
    if order is None:
        raise DbusError(f"bad byte order mark {data[:1]!r}")
    reader = Reader(data, 1, order)
    mtype, flags, _version = reader._unpack("B"), reader._unpack("B"), reader._unpack("B")
    _body_len, serial = reader._unpack("I"), reader._unpack("I")
    (raw_fields,) = reader.read("a(yv)")
    fields: dict[int, Value] = {}
    assert isinstance(raw_fields, list)
    for entry in raw_fields:
        assert isinstance(entry, tuple)
        code, variant = entry
        assert isinstance(code, int)
        assert isinstance(variant, Variant)
        fields[code] = variant.value
    reader.align(8)
    signature = fields.get(F_SIGNATURE, "")
    body = tuple(reader.read(signature)) if isinstance(signature, str) and signature else ()
    return Message(type=mtype, serial=serial, fields=fields, body=body, flags=flags)


def method_call(
    serial: int,
    *,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Sequence[Value] = (),
) -> bytes:
    fields = {
        F_PATH: Variant("o", path),
        F_INTERFACE: Variant("s", interface),
        F_MEMBER: Variant("s", member),
        F_DESTINATION: Variant("s", destination),
    }
    return encode_message(type=METHOD_CALL, serial=serial, fields=fields, signature=signature, body=body)


NOTIFY_SIGNATURE = "susssasa{sv}i"


def notify_call(serial: int, *, summary: str, body: str, urgency: int, timeout_ms: int = -1) -> bytes:
    """org.freedesktop.Notifications.Notify(app_name, replaces_id, app_icon, summary, body,
    actions, hints, expire_timeout) (Desktop Notifications Specification 1.2)."""
    return method_call(
        serial,
        destination="org.freedesktop.Notifications",
        path="/org/freedesktop/Notifications",
        interface="org.freedesktop.Notifications",
        member="Notify",
        signature=NOTIFY_SIGNATURE,
        body=["uoomd", 0, "dialog-warning", summary, body, [], {"urgency": Variant("y", urgency)}, timeout_ms],
    )


def auth_external(uid: int) -> bytes:
    """The client's opening: a NUL byte (credentials passing), then AUTH EXTERNAL with the
    uid as hex-encoded ASCII decimal; the bus checks it against SO_PEERCRED."""
    return b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n"


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

    def notify(self, summary: str, body: str, *, urgency: int = URGENCY_CRITICAL, now: float) -> None:
        buses = find_session_buses(self._run_user)
        if not buses:
            self._log.info("desktop_notice_skipped", reason="no session bus", run_user=self._run_user)
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
