"""Structured logging: event names with key/values through a small processor pipeline, as console or JSON lines.

The pipeline follows structlog's design (a list of processors, each taking and returning
the event dict, then one renderer), written here on the stdlib: importing structlog costs
the daemon 10.4 MiB of RSS (it imports asyncio, which loads ssl; measured with
/proc/self/status VmRSS, Python 3.11, structlog 26.1: 13.3 -> 23.7 MiB), more than the
whole of what the daemon does with it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TextIO

from uoomd.plan import LogFormat

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL.update({0x5C: "\\\\"})

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

EventDict = dict[str, Any]
Processor = Callable[[str, EventDict], EventDict]
Renderer = Callable[[EventDict], str]


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
    if isinstance(value, list | tuple | frozenset | set):
        return [_escape_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return escape(str(value))


# --- processors ---------------------------------------------------------------------------


def add_timestamp(_level: str, event: EventDict) -> EventDict:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return {"timestamp": stamp, **event}


def add_level(level: str, event: EventDict) -> EventDict:
    return {"level": level, **event}


def escape_values(_level: str, event: EventDict) -> EventDict:
    """Escape every string in the event, keys included."""
    return {escape(str(k)): _escape_value(v) for k, v in event.items()}


# --- renderers ----------------------------------------------------------------------------


def render_json(event: EventDict) -> str:
    return json.dumps(event, separators=(", ", ": "), default=str)


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value) if (not value or " " in value or "=" in value or '"' in value) else value
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


def render_console(event: EventDict) -> str:
    rest = {k: v for k, v in event.items() if k not in {"timestamp", "level", "event"}}
    head = f"{event.get('timestamp', '')} [{event.get('level', ''):<7}] {event.get('event', ''):<20}"
    return head + "".join(f" {k}={_console_value(v)}" for k, v in rest.items())


# --- the logger ---------------------------------------------------------------------------


class Log(Protocol):
    """What the daemon needs of a logger: an event name and facts as key/values."""

    def info(self, event: str, **facts: Any) -> None: ...
    def warning(self, event: str, **facts: Any) -> None: ...
    def error(self, event: str, **facts: Any) -> None: ...
    def debug(self, event: str, **facts: Any) -> None: ...


class PipelineLogger:
    """Runs each event through the processors and writes one rendered line.

    A log stream that fails (journal restarted, pipe closed) never stops the daemon:
    the line is dropped and counted in ``dropped``."""

    def __init__(
        self, processors: list[Processor], renderer: Renderer, stream: TextIO, *, min_level: str = "info"
    ) -> None:
        self.processors = processors
        self.renderer = renderer
        self.stream = stream
        self.min_level = LEVELS[min_level]
        self.dropped = 0

    def _emit(self, level: str, event: str, facts: dict[str, Any]) -> None:
        if LEVELS[level] < self.min_level:
            return
        data: EventDict = {"event": event, **facts}
        for processor in self.processors:
            data = processor(level, data)
        try:
            self.stream.write(self.renderer(data) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            self.dropped += 1

    def debug(self, event: str, **facts: Any) -> None:
        self._emit("debug", event, facts)

    def info(self, event: str, **facts: Any) -> None:
        self._emit("info", event, facts)

    def warning(self, event: str, **facts: Any) -> None:
        self._emit("warning", event, facts)

    def error(self, event: str, **facts: Any) -> None:
        self._emit("error", event, facts)


OnError = Callable[..., None]
"""``(key, event=..., **facts)``: a warning about a failing source, one per key per interval (Throttle.warning)."""


class Throttle:
    """Warns about a failing source at most once per key every ``interval_s``: a source that
    fails at every poll says so once in a while, not at every poll."""

    def __init__(self, log: Log, clock: Callable[[], float], interval_s: float) -> None:
        self._log = log
        self._clock = clock
        self._interval_s = interval_s
        self._logged_at: dict[str, float] = {}

    def warning(self, key: str, event: str = "source_error", **facts: Any) -> None:
        now = self._clock()
        last = self._logged_at.get(key)
        if last is None or now - last >= self._interval_s:
            self._logged_at[key] = now
            self._log.warning(event, **facts)


def configure(
    fmt: LogFormat, stream: TextIO | None = None, *, debug: bool = False, first: Sequence[Processor] = ()
) -> PipelineLogger:
    """JSON lines unless ``auto`` finds a terminal. Debug events (every ranking refresh) only with ``debug``.

    ``first``: processors that see each event before anything is added or escaped (the
    metrics' counter, uoomd/metrics/collector.py Metrics.processor)."""
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (OSError, ValueError):
        tty = False
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and tty)
    return PipelineLogger(
        [*first, add_level, add_timestamp, escape_values],  # each prepends: timestamp, level, event first
        render_console if use_console else render_json,
        stream,
        min_level="debug" if debug else "info",
    )
