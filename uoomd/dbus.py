"""The few bytes of D-Bus a desktop notice needs, as pure functions: marshalling, messages, the auth line.

No D-Bus library is installed and the daemon must stay small, so this speaks what
uoomd/desktop.py needs of the wire protocol (the D-Bus Specification, "Message Protocol"
and "Authentication Protocol"): ``AUTH EXTERNAL``, ``Hello``, one
``org.freedesktop.Notifications.Notify`` call, and the reply. It reads and writes bytes
only; the socket is the notice child's.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

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
