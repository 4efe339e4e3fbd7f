"""Structured logging set-up (structlog): event names with key/values, escaped, as console lines or JSON lines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol, TextIO

import structlog

from uoomd.plan import LogFormat

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL.update({0x5C: "\\\\"})


def escape(text: str) -> str:
    r"""Make an attacker-controlled string safe for one log line.

    Control characters (C0, DEL, C1: newlines, ANSI escapes) become \xNN and a
    backslash becomes \\, so a process named "x\nlevel=error" cannot forge a line
    and the escaping cannot be undone by the name itself. Undecodable bytes that
    /proc readers kept as surrogates become \xNN as well.
    """
    out = text.translate(_CONTROL)
    if any("\udc80" <= ch <= "\udcff" for ch in out):
        out = "".join(f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else ch for ch in out)
    return out


def _escape_value(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, Mapping):
        return {escape(str(k)): _escape_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_value(v) for v in value]
    return value


def escape_processor(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: escape every string in the event, keys included."""
    # timestamp, level and event first: a reader scans lines by what happened.
    ordered = {k: event_dict[k] for k in ("timestamp", "level", "event") if k in event_dict}
    ordered.update(event_dict)
    return {escape(str(k)): _escape_value(v) for k, v in ordered.items()}


class Log(Protocol):
    """What the daemon needs of a logger: an event name and facts as key/values."""

    def info(self, event: str, **facts: Any) -> Any: ...
    def warning(self, event: str, **facts: Any) -> Any: ...
    def error(self, event: str, **facts: Any) -> Any: ...
    def debug(self, event: str, **facts: Any) -> Any: ...


def configure(fmt: LogFormat, stream: TextIO | None = None, *, debug: bool = False) -> Log:
    """Set up the pipeline once; JSON lines unless ``auto`` finds a terminal. Debug events
    (every ranking refresh) only with ``debug``."""
    stream = stream or sys.stderr
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False, pad_event_to=20, sort_keys=False)
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            escape_processor,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.INFO),
        cache_logger_on_first_use=False,
    )
    log: Log = structlog.get_logger("uoomd")
    return log
