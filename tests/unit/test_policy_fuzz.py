"""`uoomd check` on mutated shipped policies: every input ends in exit 0, 1 or 2, in bounded time.

Issue 12: a random-mutation fuzz of the shipped policies (3,000 runs) gave 410 internal
errors (exit 70) and typed values 37 more (a 400-digit size, `stall = inf`, arrays nested
1,000 deep, a line of spaces that took the key locator 19 s). This runs the same code path
as the command (`uoomd.cli.main(["check", path])`, in-process for speed), seeded, and
counts the outcomes with hypothesis's event() (see them with --hypothesis-show-statistics).
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from uoomd.cli import main
from uoomd.policy import compile as compile_module
from uoomd.policy.automaton import compile_regex

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "etc" / "uoomd.toml", *sorted((ROOT / "policies").glob("*.toml"))]
TEXTS = {p.name: p.read_bytes() for p in SHIPPED}

# Generous: the promise is "within a second"; a slow CI machine must not make this flaky,
# while the hangs it guards against took 19 s to hours. CPU seconds of this process (check
# runs in it), not wall time: two busy loops beside the suite took one case to 5.02 s of wall.
CASE_BOUND_S = 5.0
ALLOWED = {0, 1, 2}

# Values a user (or an attacker who can write a policy) might put on the right of `key =`.
TYPED_VALUES = [
    "1" * 400,
    '"' + "1" * 400 + 'GiB"',
    str(2**63),
    str(2**64),
    "-1",
    "inf",
    "-inf",
    "nan",
    "+nan",
    '"inf"',
    '"nan"',
    '"1e999s"',
    '"99999999999999999999999h"',
    "1e308",
    "0",
    "true",
    "1",
    '"yes"',
    '"1%"',
    '"2GiB"',
    '"100%"',
    '"101%"',
    '""',
    '"\\u0000"',
    '"/bin/true\\u0000x"',
    '["/bin/true", "a\\u0000b"]',
    '"/proc/self/mem"',
    '"a{99999999999}"',
    '"' + "(" * 2000 + "a" + ")" * 2000 + '"',
    "[" * 1000 + "]" * 1000,
    "{a = " * 300 + "1" + "}" * 300,
    '"' + " " * 3000 + '"',
    '"' + "x" * 100_000 + '"',
    "[1, 2, 3]",
    "{}",
    "1979-05-27T07:32:00Z",
]
LONG_LINES = [" " * 3000, " " * 8000, "[" + " " * 8000, "a" + " " * 8000, "a." * 4000, "{," * 4000]


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _flip(data: bytes, draw: st.DrawFn) -> bytes:
    if not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    b = draw(st.integers(0, 255))
    return data[:i] + bytes([b]) + data[i + 1 :]


def _delete_line(data: bytes, draw: st.DrawFn) -> bytes:
    lines = _lines(data)
    i = draw(st.integers(0, len(lines) - 1))
    return b"\n".join(lines[:i] + lines[i + 1 :])


def _duplicate_line(data: bytes, draw: st.DrawFn) -> bytes:
    lines = _lines(data)
    i = draw(st.integers(0, len(lines) - 1))
    return b"\n".join(lines[: i + 1] + lines[i:])


def _swap_value(data: bytes, draw: st.DrawFn) -> bytes:
    # Replace the value of one `key = value` line, by a typed value or by another line's value.
    lines = _lines(data)
    keyed = [i for i, line in enumerate(lines) if b"=" in line and not line.lstrip().startswith(b"#")]
    if not keyed:
        return data
    i = draw(st.sampled_from(keyed))
    key = lines[i].split(b"=", 1)[0]
    if draw(st.booleans()):
        value = draw(st.sampled_from(TYPED_VALUES)).encode()
    else:
        value = lines[draw(st.sampled_from(keyed))].split(b"=", 1)[1]
    lines[i] = key + b"= " + value.strip()
    return b"\n".join(lines)


def _insert_line(data: bytes, draw: st.DrawFn) -> bytes:
    lines = _lines(data)
    i = draw(st.integers(0, len(lines)))
    new = draw(st.sampled_from(LONG_LINES)).encode()
    return b"\n".join([*lines[:i], new, *lines[i:]])


MUTATIONS: dict[str, Callable[[bytes, st.DrawFn], bytes]] = {
    "flip": _flip,
    "delete": _delete_line,
    "duplicate": _duplicate_line,
    "swap": _swap_value,
    "insert": _insert_line,
}


@st.composite
def mutated_policies(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(TEXTS)))
    data = TEXTS[name]
    kinds = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3))
    for kind in kinds:
        data = MUTATIONS[kind](data, draw)
    return "+".join(kinds), data


def _check(path: Path) -> tuple[int, float, str]:
    out, err = io.StringIO(), io.StringIO()
    start = time.process_time()
    code = main(["check", str(path)], out, err)
    return code, time.process_time() - start, err.getvalue()


def _judge(code: int, elapsed: float, errors: str) -> None:
    event(f"exit {code}")
    assert code in ALLOWED, errors
    assert elapsed < CASE_BOUND_S, f"took {elapsed:.1f}s"
    assert "Traceback" not in errors


@pytest.fixture(scope="module", autouse=True)
def _reuse_compiled_patterns() -> Iterator[None]:
    # Building a pattern's DFA is a pure function of the pattern and most of each check's
    # time (0.2 s for desktop.toml's rules here): each distinct pattern is still built once,
    # and a mutated one afresh, so thousands of cases fit in CI's minute.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compile_module, "compile_regex", functools.lru_cache(maxsize=None)(compile_regex))
        yield


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "policy.toml"


@settings(
    max_examples=2000,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_policies())
def test_mutated_shipped_policies_never_crash_check(scratch: Path, case: tuple[str, bytes]) -> None:
    kinds, data = case
    scratch.write_bytes(data)
    code, elapsed, errors = _check(scratch)
    event(f"{kinds.split('+')[0]}: exit {code}")
    _judge(code, elapsed, errors)


@settings(
    max_examples=500,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.sampled_from(sorted(TEXTS)),
    st.integers(0, 200),
    st.sampled_from(TYPED_VALUES),
)
def test_typed_values_never_crash_check(scratch: Path, name: str, which: int, value: str) -> None:
    # Every typed value on every key of every shipped policy, deterministically spread.
    lines = TEXTS[name].decode().split("\n")
    keyed = [i for i, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")]
    i = keyed[which % len(keyed)]
    lines[i] = lines[i].split("=", 1)[0] + "= " + value
    scratch.write_text("\n".join(lines))
    code, elapsed, errors = _check(scratch)
    _judge(code, elapsed, errors)
