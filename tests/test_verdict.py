"""The failure text: expected vs actual ranges, the first offending event, the broken rules."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle.dma_event import DmaEvent, DmaOp
from fixtures.oracle.expected_state import (
    MapIntent,
    PageMap,
    Run,
    from_events,
    from_intent,
    from_view,
)
from fixtures.oracle.notifier_rules import in_place_change, noop_invalidation
from fixtures.oracle.verdict import MAX_ROWS, assert_host_matches, compare, diff
from fixtures.oracle.walk import walk_device
from tests.vtd_image import LegacyTables, SecondLevelTables, TableImage

P = 0x1000
M, U = DmaOp.MAP, DmaOp.UNMAP


def ev(seq: int, op: DmaOp, iova: int, size: int, gpa: int | None = None, err: int = 0) -> DmaEvent:
    return DmaEvent(
        seq, seq / 10, "dev0", op, iova, size, gpa, read=op is M, write=op is M, errno=err
    )


def test_equal_state_and_clean_stream_is_ok() -> None:
    events = [ev(0, M, 0x10_0000, 2 * P, 0x4000_0000)]
    expected = from_intent([MapIntent(0x10_0000, 0x4000_0000, 2 * P)])
    verdict = compare(expected, from_events(events), events)
    assert verdict.ok
    assert str(verdict) == "host mappings: as expected (2 pages)"
    assert assert_host_matches(expected, events, device="dev0").ok


def test_table_shows_missing_extra_and_wrong_ranges_with_their_events() -> None:
    events = [
        ev(0, M, 0x10_0000, 0x20_0000, 0x4000_0000),
        ev(1, M, 0x80_0000, P, 0x5000_0000),
        ev(2, U, 0x90_0000, 0x1000_0000),
    ]
    expected = from_intent(
        [
            MapIntent(0x10_0000, 0x4000_0000, P),
            MapIntent(0x10_1000, 0x6000_1000, 0x1F_F000),  # wrong target on the host
            MapIntent(0x90_0000, 0x7000_0000, 4 * P),  # missing on the host
        ]
    )
    verdict = compare(expected, from_events(events), events, device="dev0")
    assert not verdict.ok
    assert [(r.iova, r.size) for r in verdict.rows] == [
        (0x10_1000, 0x1F_F000),
        (0x80_0000, P),
        (0x90_0000, 4 * P),
    ]
    text = str(verdict)
    lines = text.splitlines()
    assert lines[0] == (
        "host mappings differ: 3 ranges, 516 pages (expected 516 pages mapped, host has 513)"
    )
    header, *rows = lines[1:5]
    assert header.split() == ["iova", "range", "pages", "expected", "actual", "last", "event"]
    for row in rows:  # aligned columns
        assert row.index("->") == header.index("expected") or "unmapped" in row
    assert (
        "0x000000101000-0x0000002fffff    511  -> 0x0060001000 rw  -> 0x0040001000 rw  #0 dev0"
        in text
    )
    assert "unmapped" in rows[1]
    assert "#1 dev0" in rows[1]
    assert rows[2].split()[-2:] == ["#2", "dev0"]  # the big UNMAP was the last to touch it
    assert lines[5].startswith("first offending event: #0")


def test_rows_are_capped() -> None:
    expected = from_intent(MapIntent(i * 2 * P, i * 2 * P, P) for i in range(MAX_ROWS + 5))
    text = str(compare(expected, PageMap()))
    assert "... and 5 more ranges" in text
    assert text.count("unmapped") == MAX_ROWS
    assert "first offending event: none recorded" in text


def test_violations_are_reported_even_when_state_matches() -> None:
    events = [
        ev(0, M, 0x10_0000, 0x20_0000, 0x4000_0000),
        ev(1, U, 0x10_0000, P, err=errno.EINVAL),
    ]
    expected = from_intent([MapIntent(0x10_0000, 0x4000_0000, 0x20_0000)])
    with pytest.raises(AssertionError) as info:
        assert_host_matches(expected, events, device="dev0")
    text = str(info.value)
    assert "state as expected, but the event stream broke rules" in text
    assert "first offending event: #1" in text
    assert "type1_no_bisecting_unmap" in text
    assert "guards: type1 v2 (-EINVAL)" in text


def test_assert_host_matches_uses_segments_and_names_the_device() -> None:
    events = [ev(0, M, 0, P, 0x9000), ev(1, U, 0, P), ev(2, M, 0, P, 0x9000)]
    expected = from_intent([MapIntent(0, 0x9000, P)])
    assert_host_matches(expected, events, segments=[in_place_change(events[1:], [(0, P)])])
    with pytest.raises(AssertionError, match="unchanged_translation_silent") as info:
        assert_host_matches(
            expected, events, device="dev0", segments=[noop_invalidation(events[1:])]
        )
    assert str(info.value).startswith("host mappings of dev0: state as expected")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 5), st.integers(0, 8), st.booleans()),
        max_size=8,
    ),
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 5), st.integers(0, 8), st.booleans()),
        max_size=8,
    ),
)
def test_diff_is_empty_iff_equal_and_patching_it_gives_expected(
    a: list[tuple[int, int, int, bool]], b: list[tuple[int, int, int, bool]]
) -> None:
    expected = PageMap(Run(i * P, n * P, g * P, True, w) for i, n, g, w in a)
    actual = PageMap(Run(i * P, n * P, g * P, True, w) for i, n, g, w in b)
    rows = diff(expected, actual)
    assert (rows == []) == (expected == actual)
    patched = actual
    for r in rows:
        patched = patched.without(r.iova, r.size)
        if r.expected is not None:
            patched = patched.overlay(r.expected)
    assert patched == expected
    for x, y in itertools.pairwise(rows):
        assert x.end <= y.iova


def test_tables_walk_to_host_state_end_to_end() -> None:
    """A 2 MiB leaf announced as 512 4 KiB MAPs compares equal; a stale page does not."""
    mem = TableImage()
    tables = LegacyTables(mem)
    sl = SecondLevelTables(mem)
    sl.map(0x20_0000, 0x60_0000, 0x20_0000, page_size=0x20_0000)
    tables.attach(0, 0x18, domain_id=1, slpt=sl.root)
    view = walk_device(mem, tables.rtaddr, 0, 0x18)
    expected = from_view(view, ram=[(0, 0x800_0000)])
    events = [ev(i, M, 0x20_0000 + i * P, P, 0x60_0000 + i * P) for i in range(512)]
    assert compare(expected, from_events(events), events).ok
    sl.unmap(0x20_0000, 0x20_0000, page_size=0x20_0000)
    expected = from_view(walk_device(mem, tables.rtaddr, 0, 0x18), ram=[(0, 0x800_0000)])
    events.append(ev(512, U, 0x20_0000, 0x1F_F000))  # one page left behind
    verdict = compare(expected, from_events(events), events)
    assert [(r.iova, r.expected, r.actual is not None) for r in verdict.rows] == [
        (0x3F_F000, None, True)
    ]
    assert "#511 dev0" in str(verdict)
