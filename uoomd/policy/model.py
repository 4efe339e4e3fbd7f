"""The policy file's schema as pydantic models: field names are the public TOML keys."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from uoomd.metrics.listener import parse_listen
from uoomd.metrics.textfile import DEFAULT_HEARTBEAT_S, textfile_problem
from uoomd.policy.regex import MAX_PATTERN_CHARS
from uoomd.units import (
    MAX_DURATION_S,
    MAX_SIZE_BYTES,
    check_duration_s,
    parse_duration_s,
    parse_percent,
    parse_size_bytes,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# The kernel's PSI trigger limits: kernel/sched/psi.c psi_trigger_create() rejects
# windows outside [500ms, 10s] and stalls not shorter than the window.
PSI_WINDOW_MIN_US = 500_000
PSI_WINDOW_MAX_US = 10_000_000
METRICS_INTERVAL_MIN_S = 1.0
METRICS_INTERVAL_MAX_S = DEFAULT_HEARTBEAT_S
RECORD_WINDOW_MIN_S = 10.0
RECORD_WINDOW_MAX_S = 600.0
# A before_kill hook holds a SIGTERM: "a few seconds" at most, whatever the policy says.
BEFORE_KILL_TIMEOUT_MAX_S = 5.0


def _check_amount(value: str | int) -> str | int:
    if isinstance(value, bool):
        raise ValueError("expected a size like '512MiB' or a percent like '5%', not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        if value > MAX_SIZE_BYTES:
            raise ValueError(f"a size must be below 2**63 bytes (8 EiB), got an integer of {len(str(value))} digits")
        return value
    if parse_percent(value) is None:
        parse_size_bytes(value)
    return value


def _check_duration(value: str | int | float) -> str | int | float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like '200ms' or '5s', not a boolean")
    if isinstance(value, str):
        parse_duration_s(value)
        return value
    if value < 0:
        raise ValueError("a duration cannot be negative")
    # A bare number is seconds: bounded before float() (an integer of 400 digits overflowed
    # it) and finite (nan passed `< 0` and never escalated; issue 12).
    check_duration_s(value if isinstance(value, float) else min(value, MAX_DURATION_S * 2), value)
    return value


def _check_regex(value: str) -> str:
    # Python's syntax first (its messages are the ones people know); what uoomd can search
    # in linear time is checked when the policy is compiled (uoomd/policy/regex.py).
    if len(value) > MAX_PATTERN_CHARS:
        raise ValueError(f"a regular expression of {len(value)} characters, over {MAX_PATTERN_CHARS}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    except OverflowError:
        raise ValueError(f"invalid regular expression {value!r}: a count too large") from None
    except RecursionError:
        raise ValueError(f"invalid regular expression {value!r}: groups nested too deep") from None
    return value


AmountValue = Annotated[
    str | int,
    AfterValidator(_check_amount),
    Field(description="a percent of the scope's total ('5%') or a size ('512MiB', '2G', bytes as an integer)"),
]
DurationValue = Annotated[
    str | int | float,
    AfterValidator(_check_duration),
    Field(description="a duration: '200ms', '5s', '1m', or seconds as a number"),
]
RegexValue = Annotated[
    str,
    AfterValidator(_check_regex),
    Field(
        description="a regular expression, searched in linear time: Python's syntax without backreferences, "
        "lookarounds, \\b, (?i), possessive or atomic groups"
    ),
]


def _check_os_text(value: str) -> str:
    # The kernel ends a path or an argument at its first NUL, and Python refuses one there
    # (ValueError: embedded null byte): a NUL in state_file or a hook's argv passed check and
    # then the daemon exited 70 (issue 12). Refused here, so the daemon's start refuses it too.
    if "\0" in value:
        raise ValueError(f"a NUL character (at offset {value.index(chr(0))}) cannot be in a path or an argument")
    return value


OsText = Annotated[str, AfterValidator(_check_os_text)]


def duration_s(value: str | int | float) -> float:
    return float(value) if isinstance(value, int | float) else parse_duration_s(value)


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a safety policy must never pass silently.
    # strict: TOML has real types, so `protect = "yes"` or `protect = 1` is a mistake, not true
    # (pydantic's lax mode took both as true; issue 12).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DaemonModel(_Strict):
    """[daemon]: how the daemon runs."""

    dry_run: bool = Field(False, description="audit mode: decide, log and explain, send no signal")
    poll_min: DurationValue = Field("20ms", description="fastest poll, near a threshold")
    poll_max: DurationValue = Field("1s", description="slowest poll, when memory is plentiful")
    log_format: Literal["auto", "console", "json"] = Field(
        "auto", description="auto: console lines on a terminal, JSON lines otherwise"
    )
    state_file: OsText = Field("/run/uoomd/state.json", description="where `uoomd status` reads what the daemon sees")
    notify_desktop: bool = Field(False, description="send a desktop notification over D-Bus when a process is killed")
    metrics_file: OsText | None = Field(
        None,
        description="Prometheus metrics as a node_exporter textfile, an absolute path ending in .prom (default: none)",
    )
    metrics_listen: OsText | None = Field(
        None,
        description="serve GET /metrics on an IP address and port ('127.0.0.1:9595', '[::1]:9595') or a unix "
        "socket path (default: none)",
    )
    metrics_interval: DurationValue = Field(
        "5s", description="the metrics file is rewritten at most this often when its values change (1s..60s)"
    )
    record_on_decision: bool = Field(
        False,
        description="keep the last record_window of readings and rankings in memory and write them as a trace "
        "into record_dir after each decision (`uoomd replay` reads it)",
    )
    record_dir: OsText = Field(
        "/var/lib/uoomd/traces", description="where record_on_decision writes its traces: an absolute directory"
    )
    record_window: DurationValue = Field("2m", description="how far back a decision's trace goes (10s..10m)")
    record_keep: int = Field(10, ge=1, le=100, description="the newest this many traces are kept, older ones removed")

    @field_validator("metrics_file")
    @classmethod
    def _metrics_file(cls, value: str | None) -> str | None:
        problem = None if value is None else textfile_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)  # its ValueError says what is wrong
        return value

    @field_validator("record_dir")
    @classmethod
    def _record_dir(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r}: record_dir must be an absolute directory path")
        return value

    @field_validator("record_window")
    @classmethod
    def _record_window(cls, value: str | int | float) -> str | int | float:
        # The ring holds every poll of the window: bounded so that a fast-polling daemon's
        # memory stays bounded too (uoomd/flight.py caps the readings as well).
        if not RECORD_WINDOW_MIN_S <= duration_s(value) <= RECORD_WINDOW_MAX_S:
            raise ValueError(f"must be between 10s and 10m (got {value})")
        return value

    @field_validator("metrics_interval")
    @classmethod
    def _metrics_interval(cls, value: str | int | float) -> str | int | float:
        # Below 1 s the file would be rewritten at nearly every poll; above the 60 s heartbeat
        # (uoomd/metrics/textfile.py) the interval would mean nothing.
        if not METRICS_INTERVAL_MIN_S <= duration_s(value) <= METRICS_INTERVAL_MAX_S:
            raise ValueError(f"must be between 1s and 60s (got {value})")
        return value

    @model_validator(mode="after")
    def _poll_order(self) -> Self:
        lo, hi = duration_s(self.poll_min), duration_s(self.poll_max)
        if lo <= 0:
            raise ValueError("poll_min must be greater than 0")
        if lo > hi:
            raise ValueError(f"poll_min ({self.poll_min}) must not exceed poll_max ({self.poll_max})")
        return self


class EscalationModel(_Strict):
    """[escalation]: SIGTERM first, SIGKILL after a timeout, then wait for the memory."""

    term_timeout: DurationValue = Field("5s", description="after SIGTERM, how long before SIGKILL")
    kill_timeout: DurationValue = Field("3s", description="after SIGKILL, how long to wait for the memory to come back")
    max_kills_per_minute: int = Field(
        10,
        ge=1,
        le=1000,
        description="victims per minute (all guards) at the term level; never held back at the kill level",
    )


class PsiModel(_Strict):
    """[[guard.psi]]: a PSI trigger on the guard's memory.pressure."""

    kind: Literal["some", "full"] = Field(
        "full", description="some: any task stalled; full: all non-idle tasks stalled"
    )
    stall: DurationValue = Field("200ms", description="stall time ...")
    window: DurationValue = Field("2s", description="... within this window (kernel trigger semantics, 500ms..10s)")
    sustain: DurationValue = Field("0s", description="act only when the trigger keeps firing this long")
    action: Literal["warn", "term", "kill"] = Field("term", description="warn: log only; term/kill: pick a victim")
    gated: bool = Field(
        True,
        description="false: act whatever psi_refault_gate says, with memory below psi_mem_gate still (a backstop "
        "on a long full stall)",
    )

    @model_validator(mode="after")
    def _window(self) -> Self:
        stall_us = round(duration_s(self.stall) * 1e6)
        window_us = round(duration_s(self.window) * 1e6)
        if not PSI_WINDOW_MIN_US <= window_us <= PSI_WINDOW_MAX_US:
            raise ValueError(f"window must be between 500ms and 10s (got {self.window})")
        if not 0 < stall_us < window_us:
            raise ValueError(f"stall ({self.stall}) must be greater than 0 and shorter than window ({self.window})")
        return self


class GuardModel(_Strict):
    """[[guard]]: what to watch and when to act."""

    name: str = Field(description="a short name for logs and `--guard`")
    scope: str = Field("system", description="'system', or 'cgroup:<path of a cgroup directory>' (v2, or v1 memory)")
    mem_available_term: AmountValue = Field("5%", description="SIGTERM below this MemAvailable")
    mem_available_kill: AmountValue = Field("2.5%", description="SIGKILL below this MemAvailable")
    swap_free_term: AmountValue = Field("10%", description="with swap, memory AND swap must both be low to act")
    swap_free_kill: AmountValue = Field("5%")
    victim: Literal["process", "process-group", "cgroup"] = Field("process", description="what to signal")
    min_badness: int = Field(0, ge=0, description="never pick a victim smaller than this (kernel badness points)")
    ignore_positive_adj: bool = Field(
        False, description="discount the oom_score_adj that browsers raise on their own tabs"
    )
    psi_mem_gate: AmountValue = Field("20%", description="PSI triggers act only while MemAvailable is below this")
    mem_available_warn: AmountValue | None = Field(
        None,
        description="warn below this MemAvailable (at or above the term level): a log record and, with "
        "notify_desktop, a notice to the likely victim's owner; no signal (default: no warn level)",
    )
    swap_free_warn: AmountValue | None = Field(
        None, description="with swap, warn only when swap free is below this too (default: memory alone decides)"
    )
    psi_refault_gate: AmountValue = Field(
        "0",
        description="per second: PSI triggers act only while evicted pages the working set has no room for come back "
        "this fast ('0.5%' of the scope's total, or '20MiB'; '0' = no refault gate): a thrash, not a job that "
        "swaps its cold pages out",
    )
    psi_refault_sustain: DurationValue = Field(
        "0s", description="refaults must have stayed at or above psi_refault_gate this long (a burst is forgiven)"
    )
    psi_refault_sustain_all: DurationValue | None = Field(
        None,
        description="the same where the kernel's count is every refault (the multi-gen LRU, a v1 cgroup): no "
        "activation count tells a job growing into swap from a thrash, only how long it lasts "
        "(default: psi_refault_sustain)",
    )
    psi: list[PsiModel] = Field(default_factory=list, description="PSI triggers on this guard's memory.pressure")
    mem_available_eta: DurationValue | None = Field(
        None,
        description="act when the observed fall says MemAvailable (and swap) reaches the kill level within "
        "this time, even above the term level (README: Act on the trend); default: levels only",
    )
    mem_available_eta_min_fall: AmountValue = Field(
        "1%", description="per second: a slower fall never acts ('1%' of the scope's total, or '50MiB')"
    )
    mem_available_eta_sustain: DurationValue = Field(
        "500ms", description="the projection must hold at every reading this long (a one-off allocation stops)"
    )
    mem_available_eta_action: Literal["term", "kill"] = Field("term", description="what the trend does")

    @model_validator(mode="after")
    def _warn(self) -> Self:
        if self.swap_free_warn is not None and self.mem_available_warn is None:
            raise ValueError("swap_free_warn only with mem_available_warn (there is no warn level without it)")
        return self

    @model_validator(mode="after")
    def _eta(self) -> Self:
        rest = {"mem_available_eta_min_fall", "mem_available_eta_sustain", "mem_available_eta_action"}
        given = sorted(rest & self.model_fields_set)
        if self.mem_available_eta is None:
            if given:
                raise ValueError(f"{', '.join(given)} only with mem_available_eta (the trend is off without it)")
            return self
        if duration_s(self.mem_available_eta) <= 0:
            raise ValueError("mem_available_eta must be more than 0")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r}: use 1-64 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        if value == "system":
            return value
        if not value.startswith("cgroup:"):
            raise ValueError(f"{value!r}: expected 'system' or 'cgroup:/sys/fs/cgroup/...'")
        path = _check_os_text(value.removeprefix("cgroup:"))
        if not path.startswith("/"):
            raise ValueError(f"{value!r}: the cgroup must be an absolute directory path")
        return value


class MatchModel(_Strict):
    """match = { ... }: all given keys must match."""

    name: RegexValue | None = Field(None, description="regex searched in the process name (comm, 15 chars)")
    cmdline: RegexValue | None = Field(
        None, description="regex searched in the command line (arguments joined by spaces)"
    )
    exe: RegexValue | None = Field(None, description="regex searched in the executable's path")
    cgroup: RegexValue | None = Field(None, description="regex searched in the process's cgroup path")
    user: str | None = Field(None, description="user name, exact")
    uid: int | None = Field(None, ge=0, description="user id, exact")

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if all(getattr(self, key) is None for key in type(self).model_fields):
            raise ValueError("match needs at least one of: name, cmdline, exe, cgroup, user, uid")
        return self


class RuleModel(_Strict):
    """[[rule]]: protections first, then adjustments add up."""

    name: str | None = Field(None, description="a label for logs (default: rule[N])")
    match: MatchModel
    protect: bool = Field(False, description="never a victim")
    adjust: int = Field(
        0,
        ge=-2000,
        le=2000,
        description="added to oom_score_adj, clamped to [-1000, 1000]; >0 prefer, <0 avoid",
    )
    guards: list[str] = Field(default_factory=list, description="guard names this rule applies to (default: all)")

    @model_validator(mode="after")
    def _does_something(self) -> Self:
        if self.protect and self.adjust:
            raise ValueError("a rule either protects or adjusts, not both (protect wins anyway)")
        if not self.protect and not self.adjust:
            raise ValueError("rule does nothing: set protect = true or a non-zero adjust")
        return self


class HooksModel(_Strict):
    """[hooks]: programs to run, as argv (never through a shell)."""

    after_kill: list[OsText] = Field(
        default_factory=list, description="argv run after a victim is signalled; facts in UOOMD_* variables"
    )
    timeout: DurationValue = Field("10s", description="a hook still running after this is killed")
    before_kill: list[OsText] = Field(
        default_factory=list,
        description="argv run when a SIGTERM victim is chosen, before the SIGTERM (which waits until it exits "
        "or before_kill_timeout); never at the kill level; facts in UOOMD_* variables",
    )
    before_kill_timeout: DurationValue = Field(
        "2s", description="the SIGTERM waits at most this long for before_kill (at most 5s); then it is killed"
    )

    @field_validator("before_kill_timeout")
    @classmethod
    def _before_kill_timeout(cls, value: str | int | float) -> str | int | float:
        if not 0 < duration_s(value) <= BEFORE_KILL_TIMEOUT_MAX_S:
            raise ValueError(f"must be more than 0 and at most 5s: it holds a SIGTERM (got {value})")
        return value

    @field_validator("after_kill", "before_kill")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        if value and not value[0].startswith("/"):
            raise ValueError(f"{value[0]!r}: the program must be an absolute path (hooks run with a clean PATH)")
        return value


class PolicyModel(_Strict):
    """A uoomd policy file."""

    daemon: DaemonModel = Field(default_factory=DaemonModel)
    escalation: EscalationModel = Field(default_factory=EscalationModel)
    guard: list[GuardModel] = Field(min_length=1, description="one or more guards")
    rule: list[RuleModel] = Field(default_factory=list)
    hooks: HooksModel = Field(default_factory=HooksModel)


def policy_json_schema() -> dict[str, Any]:
    schema = PolicyModel.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "uoomd policy"
    return schema
