"""The ``record`` and ``replay`` commands: load their policies and traces, run the recorder or the replay, print."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TextIO

from uoomd.errors import ExitCode, SetupError
from uoomd.plan import LogFormat, Plan
from uoomd.trace import TraceError
from uoomd.tracelines import TraceItem

MAX_POLICY_TEXT_BYTES = 256 * 1024  # uoomd/policy/load.py MAX_POLICY_BYTES: a larger one never loaded


def policy_text(path: str) -> str | None:
    """The policy's text for the trace's header (a replay can use it), or None if unreadable or too big."""
    from uoomd.errors import PolicyError  # noqa: PLC0415
    from uoomd.policy.file import open_regular  # noqa: PLC0415 -- no pydantic behind it

    try:
        fd, _info = open_regular(path, nofollow=False)
    except PolicyError:
        return None
    try:
        raw = os.read(fd, MAX_POLICY_TEXT_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_POLICY_TEXT_BYTES:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def run_record(*, policy_path: str, output: str, duration_s: float | None, max_bytes: int, psi_every_poll: bool) -> int:
    """``uoomd record``: the policy is checked in a child (the recorder, like the daemon, never
    imports pydantic), then the loop runs until the duration or a signal."""
    from uoomd.logs import configure  # noqa: PLC0415
    from uoomd.policy.isolated import load_plan_isolated  # noqa: PLC0415
    from uoomd.recorder import run_recorder  # noqa: PLC0415

    plan = load_plan_isolated(policy_path)
    log = configure(LogFormat.AUTO)
    run_recorder(
        plan,
        output=output,
        duration_s=duration_s,
        max_bytes=max_bytes,
        policy_text=policy_text(policy_path),
        psi_every_poll=psi_every_poll,
        log=log,
    )
    return ExitCode.OK


def _items(paths: Sequence[str], *, mem_total: int | None, swap_total: int | None) -> Iterator[TraceItem]:
    """The trace's lines: uoomd's JSON lines, or earlyoom's oomstat text (uoomd/sources/oomstat.py)."""
    from uoomd.sources.oomstat import looks_like_oomstat, read_oomstat  # noqa: PLC0415
    from uoomd.tracefile import read_lines  # noqa: PLC0415

    first = paths[0]
    with open(first, "rb") as handle:
        head = handle.read(4096)
    if looks_like_oomstat(head):
        yield from read_oomstat(paths, mem_total_bytes=mem_total, swap_total_bytes=swap_total)
        return
    for located in read_lines(paths):
        yield located.item


def _load(path: str) -> Plan:
    from uoomd.policy.load import load_plan  # noqa: PLC0415

    # Not checked against this machine: the trace's cgroups need not exist where it is replayed.
    return load_plan(path, check_system=False)


def _recorded_plan(paths: Sequence[str], mem_total: int | None, swap_total: int | None) -> Plan:
    from uoomd.policy.load import parse_plan  # noqa: PLC0415
    from uoomd.tracelines import Header  # noqa: PLC0415

    header = next(_items(paths, mem_total=mem_total, swap_total=swap_total), None)
    if not isinstance(header, Header) or header.policy_text is None:
        raise SetupError(
            f"{paths[0]}: the trace carries no policy", hint="name one with --policy FILE (twice to compare two)"
        )
    return parse_plan(header.policy_text, f"{paths[0]} (recorded {header.policy})")


def run_replay(
    *,
    traces: Sequence[str],
    policies: Sequence[str],
    as_json: bool,
    mem_total: int | None,
    swap_total: int | None,
    out: TextIO,
) -> int:
    """``uoomd replay``: one policy's timeline, or two policies' decisions side by side."""
    import json  # noqa: PLC0415

    from uoomd.replay import diff, replay  # noqa: PLC0415
    from uoomd.replayreport import diff_json, render_diff, render_text, timeline_json  # noqa: PLC0415

    if len(policies) > 2:
        raise SetupError("replay compares at most two policies", hint="give --policy once or twice")
    plans = [_load(p) for p in policies]
    try:
        plans = plans or [_recorded_plan(traces, mem_total, swap_total)]
        timelines = [replay(_items(traces, mem_total=mem_total, swap_total=swap_total), plan) for plan in plans]
    except TraceError as exc:
        hint = "a trace is what `uoomd record` wrote, or earlyoom's oomstat output"
        raise SetupError(f"cannot replay: {exc}", hint=hint) from None
    except OSError as exc:
        raise SetupError(f"cannot read the trace {exc.filename}: {exc.strerror}") from None
    if len(timelines) == 1:
        (timeline,) = timelines
        out.write(json.dumps(timeline_json(timeline), indent=1) + "\n" if as_json else render_text(timeline))
        return ExitCode.OK
    a, b = timelines
    rows = diff(a, b)
    out.write(json.dumps(diff_json(a, b, rows), indent=1) + "\n" if as_json else render_diff(a, b, rows))
    return ExitCode.OK
