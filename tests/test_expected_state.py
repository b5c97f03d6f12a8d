"""PageMap normalisation, expected state from intent and tables, actual state from the record."""

from __future__ import annotations

import errno

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fixtures.oracle.dma_event import DmaEvent, DmaOp
from fixtures.oracle.expected_state import (
    HostReplay,
    MapIntent,
    PageMap,
    ReplayCache,
    Run,
    from_events,
    from_intent,
    from_tables,
    from_view,
    identity_map,
)
from fixtures.oracle.structures import TranslationType
from fixtures.oracle.walk import DeviceMode, DeviceView, Translation
from tests.vtd_image import LegacyTables, SecondLevelTables, TableImage

P = 0x1000


def pages_of(pages: PageMap) -> dict[int, tuple[int, bool, bool]]:
    return {
        r.iova + off: (r.gpa + off, r.read, r.write) for r in pages for off in range(0, r.size, P)
    }


# --- PageMap -------------------------------------------------------------------------------------


def test_contiguous_runs_coalesce() -> None:
    pages = PageMap([Run(0x2000, P, 0x9000, True, True), Run(0x1000, P, 0x8000, True, True)])
    assert pages.runs == (Run(0x1000, 2 * P, 0x8000, True, True),)
    assert pages.pages == 2


@pytest.mark.parametrize(
    "second", [Run(0x2000, P, 0xA000, True, True), Run(0x2000, P, 0x9000, True, False)]
)
def test_discontiguous_or_different_perms_do_not_coalesce(second: Run) -> None:
    assert len(PageMap([Run(0x1000, P, 0x8000, True, True), second]).runs) == 2


def test_overlay_later_wins_and_splits() -> None:
    pages = PageMap([Run(0, 4 * P, 0x10000, True, True), Run(P, P, 0x50000, True, False)])
    assert pages.runs == (
        Run(0, P, 0x10000, True, True),
        Run(P, P, 0x50000, True, False),
        Run(2 * P, 2 * P, 0x12000, True, True),
    )
    assert pages.lookup(P + 5) == (0x50005, True, False)
    assert pages.lookup(4 * P) is None


def test_without_and_runs_within() -> None:
    pages = PageMap([Run(0, 4 * P, 0x10000, True, True)]).without(P, 2 * P)
    assert pages.runs == (Run(0, P, 0x10000, True, True), Run(3 * P, P, 0x13000, True, True))
    assert list(PageMap([Run(0, 4 * P, 0, True, True)]).runs_within(P, 2 * P)) == [
        Run(P, P, P, True, True)
    ]


def test_unaligned_ranges_round_out_to_pages() -> None:
    pages = PageMap([Run(0x1800, 0x1000, 0x9800, True, True)])
    assert pages.runs == (Run(0x1000, 2 * P, 0x9000, True, True),)


def test_equality_ignores_how_ranges_were_split() -> None:
    whole = PageMap([Run(0, 512 * P, 0x20_0000, True, True)])
    split = PageMap(Run(i * P, P, 0x20_0000 + i * P, True, True) for i in reversed(range(512)))
    assert whole == split
    assert hash(whole) == hash(split)
    assert whole != PageMap()
    assert "0x200000" in repr(whole)


runs_strategy = st.lists(
    st.builds(
        Run,
        iova=st.integers(0, 63).map(lambda n: n * P),
        size=st.integers(1, 8).map(lambda n: n * P),
        gpa=st.integers(0, 15).map(lambda n: n * P),
        read=st.booleans(),
        write=st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(runs_strategy)
def test_page_map_matches_a_per_page_model(runs: list[Run]) -> None:
    model: dict[int, tuple[int, bool, bool]] = {}
    for r in runs:
        for off in range(0, r.size, P):
            model[r.iova + off] = (r.gpa + off, r.read, r.write)
    pages = PageMap(runs)
    assert pages_of(pages) == model
    # canonical: rebuilding from single pages gives the identical run list
    rebuilt = PageMap(Run(i, P, g, rd, wr) for i, (g, rd, wr) in sorted(model.items()))
    assert rebuilt.runs == pages.runs
    for a, b in zip(pages.runs, pages.runs[1:], strict=False):
        assert a.end < b.iova or a.gpa + a.size != b.gpa or (a.read, a.write) != (b.read, b.write)


# --- expected from intent and from a tables walk --------------------------------------------------


def test_intent_uses_vfio_permissions_and_skips_the_interrupt_window() -> None:
    pages = from_intent(
        [
            MapIntent(0x1000, 0x8000, P, read=False, write=True),  # vfio maps READ too
            MapIntent(0x2000, 0x9000, P, read=True, write=False),
            MapIntent(0x3000, 0xA000, P, read=False, write=False),  # no access: not mapped
            MapIntent(0xFEE0_0000 - P, 0x10000, 3 * P),
        ]
    )
    assert pages.runs == (
        Run(0x1000, P, 0x8000, True, True),
        Run(0x2000, P, 0x9000, True, False),
        Run(0xFEE0_0000 - P, P, 0x10000, True, True),
    )
    raw = from_intent([MapIntent(0x1000, 0x8000, P, read=False, write=True)], as_vfio=False)
    assert raw.runs == (Run(0x1000, P, 0x8000, False, True),)


def test_identity_map() -> None:
    assert identity_map([(0, 0xA0000), (0x10_0000, 0x100_0000)]).runs == (
        Run(0, 0xA0000, 0, True, True),
        Run(0x10_0000, 0x100_0000, 0x10_0000, True, True),
    )


def view(mode: DeviceMode, *leaves: Translation) -> DeviceView:
    return DeviceView(mode, 0, 8, translations=leaves)


def test_from_view_modes() -> None:
    assert from_view(view(DeviceMode.BLOCKED)) == PageMap()
    with pytest.raises(ValueError, match="RAM"):
        from_view(view(DeviceMode.PASS_THROUGH))
    ram = [(0, 0x800_0000)]
    assert from_view(view(DeviceMode.PASS_THROUGH), ram=ram) == identity_map(ram)
    leaves = (
        Translation(0x20_0000, 0x40_0000, 0x20_0000, True, True, 2),
        Translation(0x40_0000, 0x60_0000, P, False, True, 1),
    )
    assert from_view(view(DeviceMode.TRANSLATED, *leaves)).runs == (
        Run(0x20_0000, 0x20_0000 + P, 0x40_0000, True, True),
    )


def test_leaves_straddling_the_interrupt_window_keep_their_offsets() -> None:
    """A 2 MiB leaf at 0xfee00000: only its upper half is reachable through vfio's notifiers,
    and it must point at base + 1 MiB (QEMU crops the event; the GPA must move with it)."""
    leaves = (Translation(0xFEE0_0000, 0x4000_0000, 0x20_0000, True, True, 2),)
    assert from_view(view(DeviceMode.TRANSLATED, *leaves)).runs == (
        Run(0xFEF0_0000, 0x10_0000, 0x4010_0000, True, True),
    )
    gib = (Translation(0xC000_0000, 0x4000_0000, 1 << 30, True, False, 3),)
    assert from_view(view(DeviceMode.TRANSLATED, *gib)).runs == (
        Run(0xC000_0000, 0x3EE0_0000, 0x4000_0000, True, False),
        Run(0xFEF0_0000, 0x110_0000, 0x7EF0_0000, True, False),
    )


def test_from_view_keeps_only_targets_in_ram() -> None:
    leaves = (Translation(0, 0x7FF_F000, 4 * P, True, False, 1),)
    pages = from_view(view(DeviceMode.TRANSLATED, *leaves), ram=[(0, 0x800_0000)])
    assert pages.runs == (Run(0, P, 0x7FF_F000, True, False),)  # RAM ends at 0x8000000


def test_from_tables_follows_dmar_and_context_type() -> None:
    mem = TableImage()
    tables = LegacyTables(mem)
    sl = SecondLevelTables(mem, 3, aw_bits=39)
    sl.map(0x1000, 0x5000, P, write=False)
    tables.attach(0, 0x10, domain_id=2, slpt=sl.root, levels=3)
    tables.attach(0, 0x18, domain_id=3, tt=TranslationType.PASS_THROUGH, levels=3)
    ram = [(0, 0x100_0000)]
    assert from_tables(mem, tables.rtaddr, 0, 0x10, ram=ram, aw_bits=39).runs == (
        Run(0x1000, P, 0x5000, True, False),
    )
    assert from_tables(mem, tables.rtaddr, 0, 0x18, ram=ram, aw_bits=39) == identity_map(ram)
    off = from_tables(mem, tables.rtaddr, 0, 0x10, ram=ram, dmar_enabled=False)
    assert off == identity_map(ram)
    assert from_tables(mem, tables.rtaddr, 0, 0x20, ram=ram, aw_bits=39) == PageMap()


# --- actual from the host record ------------------------------------------------------------------


def ev(
    seq: int,
    op: DmaOp,
    iova: int,
    size: int,
    gpa: int | None = None,
    *,
    device: str = "d0",
    read: bool = False,
    write: bool = False,
    errno: int = 0,
) -> DmaEvent:
    return DmaEvent(seq, float(seq), device, op, iova, size, gpa, read, write, errno)


M, U, ALL = DmaOp.MAP, DmaOp.UNMAP, DmaOp.UNMAP_ALL


def test_replay_applies_accepted_events_with_type1_unmap() -> None:
    events = [
        ev(0, M, 0x1000, 2 * P, 0x8000, read=True, write=True),
        ev(1, M, 0x4000, P, 0xA000, read=True),
        ev(2, M, 0x4000, P, 0xB000, read=True, errno=errno.EEXIST),  # rejected: no change
        ev(3, U, 0x1000, P, errno=errno.EINVAL),  # rejected bisection
        ev(4, U, 0x3000, 0x10000),  # contains 0x4000 only
        ev(5, M, 0x9000, P, 0xC000, read=True, device="d1"),
    ]
    assert from_events(events, device="d0").runs == (Run(0x1000, 2 * P, 0x8000, True, True),)
    assert from_events(events, device="d1").runs == (Run(0x9000, P, 0xC000, True, False),)
    assert from_events([*events, ev(6, ALL, 0, 0)], device="d0") == PageMap()


def test_an_accepted_bisecting_unmap_leaves_the_mapping() -> None:
    # A host that wrongly accepted it still keeps the mapping in type1 terms; the rules flag it.
    events = [ev(0, M, 0, 2 * P, 0, read=True), ev(1, U, 0, P)]
    assert from_events(events).pages == 2


@pytest.mark.parametrize(
    ("event", "expect"),
    [
        (ev(9, M, 0x800, P, 0, read=True), errno.EINVAL),
        (ev(9, M, 0x10000, 0, 0, read=True), errno.EINVAL),
        (ev(9, M, 0x10000, P, 0), errno.EINVAL),  # neither READ nor WRITE
        (ev(9, M, 0x2000, P, 0, read=True), errno.EEXIST),
        (ev(9, M, 0x10000, P, 0, read=True), 0),
        (ev(9, U, 0x1000, P), errno.EINVAL),  # bisects [0x1000, 0x3000)
        (ev(9, U, 0x2000, 2 * P), errno.EINVAL),  # ends inside nothing, starts inside
        (ev(9, U, 0, 0x100_0000), 0),  # oversized: fine
        (ev(9, U, 0x20_0000, P), 0),  # empty: fine
        (ev(9, U, 0x1000, 2 * P), 0),  # exact
        (ev(9, ALL, 0, 0), 0),
    ],
)
def test_type1_judgement(event: DmaEvent, expect: int) -> None:
    host = HostReplay()
    host.apply(ev(0, M, 0x1000, 2 * P, 0x8000, read=True))
    assert host.judge(event)[0] == expect


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([M, U, ALL]),
            st.integers(0, 31),
            st.integers(1, 6),
            st.integers(0, 31),
        ),
        max_size=25,
    )
)
def test_replay_matches_a_per_page_type1_model(ops: list[tuple[DmaOp, int, int, int]]) -> None:
    """Events judged by the host as type1 would; state equals a naive model of live maps."""
    host = HostReplay()
    live: list[tuple[int, int, int, bool]] = []  # (iova, end, gpa, write)
    events = []
    for seq, (op, page, count, gpage) in enumerate(ops):
        s, e, gpa, write = page * P, (page + count) * P, gpage * P, bool(seq % 2)
        code = host.judge(ev(seq, op, s, e - s, gpa, read=True, write=write))[0]
        event = ev(seq, op, s, e - s, gpa, read=True, write=write, errno=code)
        host.apply(event)
        events.append(event)
        if code:
            continue
        if op is M:
            assert all(e <= a or b <= s for a, b, _, _ in live)
            live.append((s, e, gpa, write))
        elif op is U:
            assert all(not (a < e and s < b) or (s <= a and b <= e) for a, b, _, _ in live)
            live = [m for m in live if not (s <= m[0] and m[1] <= e)]
        else:
            live = []
    model = {a + off: (g + off, True, w) for a, b, g, w in live for off in range(0, b - a, P)}
    assert pages_of(from_events(events)) == model
    assert pages_of(host.page_map()) == model


class LinearReplay:
    """Reference for HostReplay: the plain list scan it replaced (same order, same answers)."""

    def __init__(self) -> None:
        self.maps: list[tuple[int, int, DmaEvent]] = []  # (iova, end, MAP event), sorted by iova

    def overlapping(self, iova: int, end: int) -> list[DmaEvent]:
        return [m[2] for m in self.maps if m[0] < end and iova < m[1]]

    def judge(self, e: DmaEvent) -> tuple[int, DmaEvent | None]:
        if e.op is ALL:
            return 0, None
        if e.size <= 0 or e.iova % P or e.size % P or e.end > 1 << 64:
            return errno.EINVAL, None
        if e.op is M:
            if not (e.read or e.write):
                return errno.EINVAL, None
            clash = self.overlapping(e.iova, e.end)
            return (errno.EEXIST, clash[0]) if clash else (0, None)
        for m in self.maps:
            if m[0] < e.end and e.iova < m[1] and (m[0] < e.iova or m[1] > e.end):
                return errno.EINVAL, m[2]
        return 0, None

    def apply(self, e: DmaEvent) -> None:
        if e.errno:
            return
        if e.op is ALL:
            self.maps = []
        elif e.op is M:
            at = next((i for i, m in enumerate(self.maps) if m[0] >= e.iova), len(self.maps))
            self.maps.insert(at, (e.iova, e.end, e))
        else:
            self.maps = [m for m in self.maps if not (e.iova <= m[0] and m[1] <= e.end)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([M, M, M, U, U, ALL]),
            st.integers(0, 40),
            st.integers(-1, 12),
            st.sampled_from([None, None, 0, 0, errno.EEXIST, errno.EINVAL]),
        ),
        max_size=60,
    ),
    st.sampled_from([P, 0x800]),
)
@example([(M, 0, 10, None), (M, 2, 2, 0), (M, 5, 1, None), (U, 0, 4, None)], P)  # nested accept
def test_bisected_replay_equals_a_linear_scan(
    ops: list[tuple[DmaOp, int, int, int | None]], unit: int
) -> None:
    """Every judgement and every live set of the O(log n) replay equals the plain scan's, also
    when the recorded host accepted what type1 rejects (overlapping or malformed maps) or
    rejected what it accepts (a verdict of None is type1's own)."""
    fast, slow = HostReplay(), LinearReplay()
    for seq, (op, first, count, verdict) in enumerate(ops):
        probe = ev(seq, op, first * unit, count * unit, 0, read=seq % 3 > 0, write=seq % 2 > 0)
        got, clash = fast.judge(probe)
        want, want_clash = slow.judge(probe)
        assert (got, clash.event if clash else None) == (want, want_clash)
        assert fast.overlapping(probe.iova, probe.end) == [
            m for m in fast.live if m.iova < probe.end and probe.iova < m.end
        ]
        event = ev(
            seq,
            op,
            probe.iova,
            probe.size,
            0,
            read=probe.read,
            write=probe.write,
            errno=want if verdict is None else verdict,
        )
        fast.apply(event)
        slow.apply(event)
        assert [m.event for m in fast.live] == [m[2] for m in slow.maps]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([M, U, ALL]),
            st.integers(0, 31),
            st.integers(1, 6),
            st.integers(0, 31),
            st.sampled_from([0, 0, 0, errno.EEXIST, errno.EINVAL]),
        ),
        max_size=30,
    ),
    st.lists(
        st.tuples(st.sampled_from(["grow", "cut", "fork", "same"]), st.integers(0, 30)),
        max_size=12,
    ),
)
def test_replay_cache_equals_a_full_replay(
    ops: list[tuple[DmaOp, int, int, int, int]], moves: list[tuple[str, int]]
) -> None:
    """ReplayCache (the rig's host state per check) gives from_events' page map for streams
    that grow, are cut back, fork from a prefix or repeat, in any order."""
    full = tuple(
        ev(seq, op, p * P, n * P, g * P, read=True, write=bool(seq % 2), errno=code)
        for seq, (op, p, n, g, code) in enumerate(ops)
    )
    other = tuple(ev(e.seq, e.op, e.iova + P, e.size, e.gpa, read=True) for e in full)
    cache = ReplayCache(size=3)
    length = 0
    for move, at in [("grow", 0), *moves, ("grow", len(full))]:
        if move == "grow":
            length = min(len(full), length + at)
            stream = full[:length]
        elif move == "cut":
            length = min(length, at)
            stream = full[:length]
        elif move == "fork":
            stream = full[: min(at, length)] + other[min(at, length) :]
        else:
            stream = full[:length]
        assert cache.page_map(stream) == from_events(stream)
