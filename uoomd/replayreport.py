"""A replay's outcome shown: the timeline, or where two policies differ, as text (names escaped) or JSON.

Pure, as uoomd/replay.py, whose values it renders.
"""

from __future__ import annotations

from uoomd.logs import escape
from uoomd.replay import DECISIONS, DiffRow, Moment, Timeline
from uoomd.units import format_bytes


def describe(m: Moment) -> str:
    """One moment in words, every process name escaped."""
    if m.event in ("level_crossed", "level_left"):
        verb = "crossed" if m.event == "level_crossed" else "left"
        return (
            f"{m.get('level')} level {verb}: available {_size(m.get('available_bytes'))} "
            f"(term {_size(m.get('term_threshold_bytes'))}, kill {_size(m.get('kill_threshold_bytes'))}); "
            f"headroom {_size(m.get('headroom_bytes'))} above the kill level"
        )
    if m.event == "trigger_fired":
        return f"PSI trigger fired: {m.get('trigger')}"
    if m.event in DECISIONS:
        text = (
            f"{m.event} {m.get('action')} (trigger {m.get('trigger')}): pid {m.get('pid')} "
            f"{escape(str(m.get('name')))}, badness {m.get('badness')} = rss {m.get('rss_pages')} + swap "
            f"{m.get('swap_pages')} + pgtables {m.get('pgtables_pages')} + adj {m.get('adj_points')} pages"
        )
        rules = m.get("rules")
        if isinstance(rules, tuple | list) and rules:
            text += f", rules {', '.join(escape(str(r)) for r in rules)}"
        if m.get("runner_up_pid") is not None:
            text += (
                f"; runner-up pid {m.get('runner_up_pid')} {escape(str(m.get('runner_up_name')))}"
                f" ({m.get('runner_up_badness')})"
            )
        if m.get("eta_s") is not None:
            text += f"; kill level in {m.get('eta_s')}s at {_size(m.get('fall_bytes_per_s'))}/s"
        return text + f"; available {_size(m.get('available_bytes'))}, headroom {_size(m.get('headroom_bytes'))}"
    if m.event == "no_candidate":
        return (
            f"would act (trigger {m.get('trigger')}) but has no candidate: ranking {m.get('ranking')}; "
            f"available {_size(m.get('available_bytes'))}, headroom {_size(m.get('headroom_bytes'))}"
        )
    extras = [f"{k}={_value(v)}" for k, v in m.facts if k in ("pid", "name", "after_s", "phase", "trigger")]
    return f"{m.event} {' '.join(extras)}".rstrip()


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return escape(str(value))


def _size(value: object) -> str:
    return format_bytes(value) if isinstance(value, int) else "?"


def render_text(timeline: Timeline) -> str:
    h = timeline.header
    out = [
        f"# replay under {timeline.policy} of a trace from {escape(h.source)} on {escape(h.host)} "
        f"({timeline.duration_s:.1f}s, {timeline.polls} polls)"
    ]
    out += [f"# note: {note}" for note in timeline.notes]
    out.append(f"{'t (s)':>9}  {'guard':<12} what")
    for m in timeline.moments:
        out.append(f"{m.at:9.3f}  {escape(m.guard):<12} {describe(m)}")
    decided = len(timeline.decisions)
    victimless = sum(1 for m in timeline.moments if m.event == "no_candidate")
    out.append(
        f"# {decided} decision{'s' if decided != 1 else ''}"
        + (f", {victimless} without a candidate to choose" if victimless else "")
    )
    for g in timeline.guards:
        if g.lowest_available_bytes is not None and g.lowest_at is not None:
            out.append(
                f"# guard {escape(g.guard)}: {g.readings} readings; lowest available "
                f"{_size(g.lowest_available_bytes)} at {g.lowest_at:.3f}s, "
                f"{_size(g.lowest_headroom_bytes)} above the kill level"
            )
    return "\n".join(out) + "\n"


def timeline_json(timeline: Timeline) -> dict[str, object]:
    return {
        "policy": timeline.policy,
        "trace": {
            "source": timeline.header.source,
            "host": timeline.header.host,
            "started_wall": timeline.header.started_wall,
            "duration_s": timeline.duration_s,
            "polls": timeline.polls,
        },
        "notes": list(timeline.notes),
        "events": [{"t": m.at, "guard": m.guard, "event": m.event, **dict(m.facts)} for m in timeline.moments],
        "guards": [
            {
                "guard": g.guard,
                "readings": g.readings,
                "lowest_available_bytes": g.lowest_available_bytes,
                "lowest_at": g.lowest_at,
                "lowest_headroom_bytes": g.lowest_headroom_bytes,
            }
            for g in timeline.guards
        ],
    }


def _short(m: Moment | None) -> str:
    if m is None:
        return "-"
    return f"{m.at:.3f}s {m.get('action')} pid {m.get('pid')} {escape(str(m.get('name')))}"


def render_diff(a: Timeline, b: Timeline, rows: tuple[DiffRow, ...]) -> str:
    out = [f"# A: {a.policy}", f"# B: {b.policy}"]
    out += [f"# note (A): {note}" for note in a.notes] + [f"# note (B): {note}" for note in b.notes]
    out.append(f"{'guard':<12} {'A':<40} {'B':<40} verdict")
    for row in rows:
        out.append(f"{escape(row.guard):<12} {_short(row.a):<40} {_short(row.b):<40} {row.verdict}")
    differ = sum(1 for r in rows if r.verdict != "same")
    out.append(f"# {len(rows) - differ} decisions the same, {differ} different")
    return "\n".join(out) + "\n"


def diff_json(a: Timeline, b: Timeline, rows: tuple[DiffRow, ...]) -> dict[str, object]:
    def one(m: Moment | None) -> dict[str, object] | None:
        return None if m is None else {"t": m.at, "event": m.event, **dict(m.facts)}

    return {
        "a": timeline_json(a),
        "b": timeline_json(b),
        "diff": [{"guard": r.guard, "verdict": r.verdict, "a": one(r.a), "b": one(r.b)} for r in rows],
    }
