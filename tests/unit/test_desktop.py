"""The D-Bus wire format and the notice text, without a bus (pure)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uoomd import dbus
from uoomd.dbus import (
    METHOD_CALL,
    NOTIFY_SIGNATURE,
    DbusError,
    Reader,
    Variant,
    Writer,
    auth_external,
    decode_message,
    message_length,
    notify_call,
    split_signature,
)
from uoomd.desktop import kill_notice, markup_safe

pytestmark = pytest.mark.unit


def test_split_signature_into_complete_types() -> None:
    assert split_signature(NOTIFY_SIGNATURE) == ["s", "u", "s", "s", "s", "as", "a{sv}", "i"]
    assert split_signature("a(yv)aa{s(ii)}") == ["a(yv)", "aa{s(ii)}"]


@pytest.mark.parametrize("bad", ["a{sv", "h", "(i"])
def test_split_signature_refuses_what_it_cannot_speak(bad: str) -> None:
    with pytest.raises(DbusError):
        split_signature(bad)


def test_auth_external_sends_the_uid_as_hex_encoded_decimal() -> None:
    # D-Bus Specification, "AUTH command": uid 1000 -> "1000" -> hex "31303030".
    assert auth_external(1000) == b"\0AUTH EXTERNAL 31303030\r\n"
    assert auth_external(0) == b"\0AUTH EXTERNAL 30\r\n"


def test_string_padding_and_array_length_exclude_the_element_padding() -> None:
    w = Writer()
    w.write("y", 7)
    w.write("a{sv}", {"k": Variant("y", 2)})
    # The byte, 3 bytes of padding to the array's length (10: the padding to the first dict
    # entry, none here at offset 8, is not counted), then "k" (length, text, NUL), the
    # variant's signature (length, "y", NUL) and its byte.
    assert bytes(w.data) == b"\x07\0\0\0" + struct.pack("<I", 10) + b"\x01\0\0\0k\0" + b"\x01y\0" + b"\x02"


def test_notify_call_decodes_to_the_fields_and_body_it_was_built_from() -> None:
    message = decode_message(notify_call(7, summary="Low memory", body="Killed <b>x</b>", urgency=2))
    assert message.type == METHOD_CALL
    assert message.serial == 7
    assert message.field(dbus.F_MEMBER) == "Notify"
    assert message.field(dbus.F_INTERFACE) == "org.freedesktop.Notifications"
    assert message.field(dbus.F_PATH) == "/org/freedesktop/Notifications"
    assert message.field(dbus.F_DESTINATION) == "org.freedesktop.Notifications"
    assert message.fields[dbus.F_SIGNATURE] == NOTIFY_SIGNATURE
    assert message.body == (
        "uoomd",
        0,
        "dialog-warning",
        "Low memory",
        "Killed <b>x</b>",
        [],
        {"urgency": Variant("y", 2)},
        -1,
    )


def test_message_length_waits_for_the_fixed_header_then_knows_the_whole_size() -> None:
    data = notify_call(1, summary="s", body="b", urgency=1)
    assert message_length(data[:15]) is None
    assert message_length(data[:16]) == len(data)


def test_a_message_claiming_to_be_huge_is_refused() -> None:
    header = b"l\x02\x00\x01" + struct.pack("<III", dbus.MAX_MESSAGE_BYTES, 1, 0)
    with pytest.raises(DbusError, match="bytes"):
        message_length(header)


def test_a_bad_byte_order_mark_is_refused() -> None:
    with pytest.raises(DbusError, match="byte order"):
        message_length(b"x" * 16)


def test_a_truncated_message_is_an_error_not_an_index_error() -> None:
    data = notify_call(1, summary="summary", body="body", urgency=1)
    with pytest.raises(DbusError, match="truncated"):
        decode_message(data[:-9])


def test_big_endian_replies_are_read_too() -> None:
    reader = Reader(struct.pack(">I", 5) + b"hello\0", 0, ">")
    assert reader.read("s") == ["hello"]


@given(
    st.lists(st.text(max_size=20), max_size=4),
    st.dictionaries(st.text(max_size=8), st.integers(0, 255), max_size=3),
    st.integers(-(2**31), 2**31 - 1),
)
def test_what_is_written_reads_back(strings: list[str], hints: dict[str, int], number: int) -> None:
    w = Writer()
    value: list[dbus.Value] = [list(strings), {k: Variant("y", v) for k, v in hints.items()}, number]
    w.write("asa{sv}i", value)
    assert Reader(bytes(w.data), 0, "<").read("asa{sv}i") == value


def test_markup_safe_escapes_markup_and_control_characters() -> None:
    assert markup_safe("<b>a&b</b>") == "&lt;b&gt;a&amp;b&lt;/b&gt;"
    assert markup_safe('x"y\nz') == "x&quot;y\\x0az"


def test_kill_notice_names_the_victim_its_size_and_the_guard() -> None:
    summary, body = kill_notice(
        {
            "name": "firefox",
            "pid": 1234,
            "rss_bytes": 3 << 30,
            "action": "kill",
            "guard": "system",
            "available_fraction": 0.021,
        }
    )
    assert summary == "Low memory: killed firefox"
    assert body.startswith("Killed firefox (pid 1234, 3072 MiB) to keep the system responsive.")
    assert "guard system at 2.1% available" in body


def test_a_term_notice_says_stopped() -> None:
    summary, body = kill_notice({"name": "make", "pid": 9, "action": "term"})
    assert summary == "Low memory: stopped make"
    assert body.startswith("Stopped make (pid 9)")
