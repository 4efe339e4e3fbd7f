"""The log pipeline: one line per event, attacker-controlled strings escaped, a broken stream never raises."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uoomd.logs import configure, escape
from uoomd.plan import LogFormat

pytestmark = pytest.mark.unit


def test_json_line_has_timestamp_level_event_first_and_facts_as_keys() -> None:
    out = io.StringIO()
    configure(LogFormat.JSON, out).info("victim_chosen", pid=42, name="hog", rules=["a"])
    line = json.loads(out.getvalue())
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["event"] == "victim_chosen"
    assert line["pid"] == 42
    assert line["rules"] == ["a"]


def test_debug_is_dropped_unless_asked() -> None:
    out = io.StringIO()
    configure(LogFormat.JSON, out).debug("ranking_refreshed")
    assert out.getvalue() == ""
    configure(LogFormat.JSON, out, debug=True).debug("ranking_refreshed")
    assert "ranking_refreshed" in out.getvalue()


@pytest.mark.parametrize("fmt", [LogFormat.JSON, LogFormat.CONSOLE])
def test_hostile_name_cannot_forge_a_second_line(fmt: LogFormat) -> None:
    out = io.StringIO()
    evil = 'x\n{"event": "kill", "pid": 1}\r\x1b[2J\x1b]0;pwned\x07\\'
    configure(fmt, out).info("victim_chosen", name=evil, **{"key\nx": evil})
    text = out.getvalue()
    assert text.count("\n") == 1
    assert "\x1b" not in text
    assert "\r" not in text
    assert "\\x0a" in text


def test_auto_format_is_json_when_not_a_terminal() -> None:
    out = io.StringIO()
    configure(LogFormat.AUTO, out).info("started")
    assert json.loads(out.getvalue())["event"] == "started"


def test_a_broken_stream_drops_lines_and_never_raises() -> None:
    out = io.StringIO()
    log = configure(LogFormat.JSON, out)
    out.close()
    log.error("policy_reload_failed", error="x")
    assert log.dropped == 1


@given(st.text())
def test_escaped_text_has_no_control_characters_and_is_injective_on_backslashes(text: str) -> None:
    escaped = escape(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in escaped)
    # An escaped backslash is doubled, so "\x0a" written by an attacker stays distinguishable.
    assert escape("\\x0a") != escape("\n")


def test_undecodable_bytes_kept_as_surrogates_are_shown_as_hex() -> None:
    raw = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert escape(raw) == "caf\\xe9"
