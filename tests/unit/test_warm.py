"""The crossing's refresh of a stale ranking (uoomd/warm.py refresh_candidates), on synthetic candidates."""

from __future__ import annotations

import pytest

from tests.builders import make_candidate, make_process
from uoomd.readings import MemoryReading
from uoomd.scoring import Candidate, Exclusion
from uoomd.warm import refresh_candidates, used_bytes

pytestmark = pytest.mark.unit


def cand(pid: int, points: int) -> Candidate:
    return make_candidate(make_process(pid, rss_anon_bytes=points * 4096), rss_pages=points)


class Reader:
    """Re-reads from a table: pid -> points now (None: gone, -1: no longer eligible)."""

    def __init__(self, now: dict[int, int | None]) -> None:
        self.now = now
        self.read: list[int] = []

    def __call__(self, candidate: Candidate) -> Candidate | Exclusion | None:
        pid = int(candidate.process.pid)
        self.read.append(pid)
        points = self.now.get(pid, candidate.badness.points)
        if points is None:
            return None
        if points < 0:
            return Exclusion(process=candidate.process, reason="outside the guard's scope")
        return cand(pid, points)


STALE = tuple(cand(pid, points) for pid, points in ((1, 1000), (2, 900), (3, 500), (4, 100), (5, 50)))


def test_a_grower_that_was_small_at_the_scan_overtakes_when_the_bound_allows_it() -> None:
    # 4 held 100 pages at the scan and holds 5,000 now: memory grew by that much.
    reader = Reader({4: 5000})
    done = refresh_candidates(STALE, fresh=(), bound_pages=5000, reread=reader, max_reads=50)
    assert done is not None
    assert [int(c.process.pid) for c in done.candidates][:2] == [4, 1]
    assert reader.read[:4] == [1, 2, 3, 4]


def test_the_bound_tightens_once_the_grower_is_read() -> None:
    # Memory grew by 5,000 pages: everyone could be it, until 1 is read at 6,000. Then only
    # a candidate with at least 1,000 stale points could still reach it: 2 (900) cannot.
    reader = Reader({1: 6000})
    done = refresh_candidates(STALE, fresh=(), bound_pages=5000, reread=reader, max_reads=50)
    assert done is not None
    assert reader.read == [1]
    assert [int(c.process.pid) for c in done.candidates] == [1, 2, 3, 4, 5]


def test_a_new_process_beats_the_stale_top_without_rereading_the_tail() -> None:
    reader = Reader({})
    done = refresh_candidates(STALE, fresh=(cand(9, 3000),), bound_pages=100, reread=reader, max_reads=50)
    assert done is not None
    assert int(done.candidates[0].process.pid) == 9
    assert reader.read == []  # 1000 + 100 < 3000: nothing stale can be the victim


def test_no_growth_still_rereads_the_top_so_a_gone_or_ineligible_one_drops_out() -> None:
    reader = Reader({1: None, 2: -1})
    done = refresh_candidates(STALE, fresh=(), bound_pages=0, reread=reader, max_reads=50)
    assert done is not None
    assert [int(c.process.pid) for c in done.candidates] == [3, 4, 5]
    assert [int(e.process.pid) for e in done.excluded] == [2]
    # 1 gone freed 1,000 pages, which any of the rest could have taken: all are re-read.
    assert reader.read == [1, 2, 3, 4, 5]


def test_too_many_rereads_asks_for_a_full_scan() -> None:
    assert refresh_candidates(STALE, fresh=(), bound_pages=10**9, reread=Reader({}), max_reads=3) is None


def test_used_bytes_counts_ram_and_swap() -> None:
    m = MemoryReading(total_bytes=100, available_bytes=30, swap_total_bytes=50, swap_free_bytes=20)
    assert used_bytes(m) == 70 + 30


def test_an_unusable_top_does_not_hide_a_grower_below_it() -> None:
    # 1 is stuck (in flight, D state): it cannot be chosen, so its 1,000 points must not stop
    # the walk before 4, which grew from 100 to 1,500.
    reader = Reader({4: 1500})
    stuck = frozenset({STALE[0].key})
    done = refresh_candidates(STALE, fresh=(), bound_pages=1400, reread=reader, max_reads=50, unusable=stuck)
    assert done is not None
    assert 1 not in reader.read
    assert [int(c.process.pid) for c in done.candidates][:2] == [4, 1]
