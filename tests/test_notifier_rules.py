"""Every notifier rule against accepted and rejected streams, hand-written and generated."""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fixtures.oracle.dma_event import DmaEvent, DmaOp
from fixtures.oracle.expected_state import HostReplay
from fixtures.oracle.notifier_rules import (
    JUDGEMENTS,
    RULES,
    JudgementCache,
    NotifierFlag,
    address_space_switch,
    check_stream,
    in_place_change,
    judge_stream,
    noop_invalidation,
    pasid_invalidation,
    replay,
    window,
)

P = 0x1000
M, U, ALL = DmaOp.MAP, DmaOp.UNMAP, DmaOp.UNMAP_ALL
IR = 0xFEE0_0000


def ev(
    seq: int,
    op: DmaOp,
    iova: int,
    size: int,
    gpa: int | None = None,
    *,
    dev: str = "d0",
    err: int = 0,
) -> DmaEvent:
    if op is M and gpa is None:
        gpa = 0x10_0000 + iova % 0x1000_0000
    return DmaEvent(seq, seq / 10, dev, op, iova, size, gpa, read=op is M, write=op is M, errno=err)


def names(violations: list) -> set[str]:
    return {v.rule for v in violations}


def test_every_rule_names_what_it_guards() -> None:
    assert len({r.name for r in RULES}) == len(RULES) == 10
    for r in RULES:
        assert r.guards


# --- hand-written: one accepted and one rejected stream per rule --------------------------------

BASE = [ev(0, M, 0x10_0000, 0x20_0000), ev(1, M, 0x40_0000, P)]


@pytest.mark.parametrize(
    ("rule", "good", "bad"),
    [
        (
            "type1_well_formed",
            [*BASE, ev(2, U, 0x40_0000, P)],
            [*BASE, ev(2, U, 0x40_0800, P, err=errno.EINVAL)],
        ),
        (
            "type1_disjoint_maps",
            [*BASE, ev(2, M, 0x30_0000, P)],
            [*BASE, ev(2, M, 0x2F_F000, 2 * P, err=errno.EEXIST)],
        ),
        (
            "type1_no_bisecting_unmap",
            [*BASE, ev(2, U, 0, 0x100_0000)],
            [*BASE, ev(2, U, 0x10_0000, P, err=errno.EINVAL)],
        ),
        (
            "host_verdict_matches_type1",
            [*BASE, ev(2, M, 0x10_0000, P, err=errno.EEXIST)],
            [*BASE, ev(2, M, 0x50_0000, P, err=errno.EEXIST)],
        ),
        (
            "notifier_range",
            [*BASE, ev(2, U, 0xFEF0_0000, (1 << 48) - 0xFEF0_0000), ev(3, U, 0, IR)],
            [*BASE, ev(2, U, 0xFEF0_0000, (1 << 49) - 0xFEF0_0000)],
        ),
    ],
)
def test_type1_and_range_rules(rule: str, good: list[DmaEvent], bad: list[DmaEvent]) -> None:
    assert rule not in names(check_stream(good))
    found = check_stream(bad)
    assert rule in names(found)
    assert next(v for v in found if v.rule == rule).event == bad[-1]


def test_a_rejected_overlap_is_still_a_violation_but_the_host_was_right() -> None:
    found = check_stream([*BASE, ev(2, M, 0x10_0000, P, err=errno.EEXIST)])
    assert names(found) == {"type1_disjoint_maps"}


def test_the_interrupt_window_splits_the_notifier_range() -> None:
    assert names(check_stream([ev(0, U, 0xFED0_0000, 0x20_0000)])) == {"notifier_range"}
    assert names(check_stream([ev(0, M, IR + 0xF_F000, P)])) == {"notifier_range"}
    assert check_stream([ev(0, U, 0, IR), ev(1, U, 0xFEF0_0000, P)]) == []


def test_aw_bits_sets_the_range_limit() -> None:
    stream = [ev(0, U, (1 << 39) - P, P), ev(1, U, 1 << 39, P)]
    assert check_stream(stream, aw_bits=48) == []
    assert [v.event for v in check_stream(stream, aw_bits=39)] == [stream[1]]


def test_listener_unmaps_of_whole_sections_are_not_notifier_traffic() -> None:
    big = ev(2, U, 0xFEF0_0000, (1 << 64) - 0xFEF0_0000)
    assert names(check_stream([*BASE, big])) == {"notifier_range"}
    assert check_stream([*BASE, big], segments=[address_space_switch([big])]) == []


def test_replay_rule() -> None:
    stream = [ev(0, M, 0, P), ev(1, M, P, P, dev="d1"), ev(2, U, 0, P), ev(3, M, 0, P)]
    assert check_stream(stream, segments=[replay(stream[:1], device="d0")]) == []
    assert check_stream(stream, segments=[replay(stream[:2])]) == []  # no device named: any
    found = check_stream(stream, segments=[replay(stream[:2], device="d0")])
    assert [(v.rule, v.event) for v in found] == [("replay_map_only", stream[1])]
    found = check_stream(stream, segments=[replay(stream[2:], device="d0", label="hotplug")])
    assert [(v.rule, v.event) for v in found] == [("replay_map_only", stream[2])]
    assert "'hotplug'" in found[0].message


def test_noop_invalidation_rule() -> None:
    stream = [ev(0, M, 0, P), ev(1, M, 0x2000, P, dev="d1")]
    assert check_stream(stream, segments=[noop_invalidation([])]) == []
    assert check_stream(stream, segments=[noop_invalidation(stream[1:], device="d0")]) == []
    found = check_stream(stream, segments=[noop_invalidation(stream[1:], label="PSI")])
    assert [(v.rule, v.event) for v in found] == [("unchanged_translation_silent", stream[1])]


def _changed(order: str) -> list[DmaEvent]:
    first = ev(0, M, 0x20_0000, 0x20_0000, 0x4000_0000)
    unmap = ev(1, U, 0x20_0000, 0x20_0000)
    remap = ev(2, M, 0x20_0000, 0x20_0000, 0x5000_0000, err=errno.EEXIST if order == "mu" else 0)
    after = {"um": [unmap, remap], "mu": [remap], "u": [unmap], "": []}[order]
    return [first, *after]


def test_changed_translation_rule() -> None:
    rng = [(0x20_0000, 0x20_0000)]
    good = _changed("um")
    assert check_stream(good, segments=[in_place_change(good[1:], rng)]) == []
    bad = _changed("mu")
    found = check_stream(bad, segments=[in_place_change(bad[1:], rng, label="PSI am=9")])
    assert "changed_translation_unmap_first" in names(found)
    stale = _changed("")
    found = check_stream(stale, segments=[in_place_change([], rng, device="d0")])
    assert [(v.rule, v.event) for v in found] == [("changed_translation_unmap_first", None)]
    assert "no UNMAP" in found[0].message
    half = _changed("u")
    found = check_stream(half, segments=[in_place_change(half[1:], rng)])
    assert [v.rule for v in found] == ["changed_translation_unmap_first"]
    assert check_stream(half, segments=[in_place_change(half[1:], rng, remapped=False)]) == []
    # an UNMAP-only notifier sees the UNMAP and nothing else (3e090e3489)
    flags = {"d0": NotifierFlag.UNMAP}
    unmap_only = [half[1]]
    assert (
        check_stream(unmap_only, segments=[in_place_change(unmap_only, rng)], notifier_flags=flags)
        == []
    )


def test_change_segment_flags_traffic_outside_the_changed_ranges() -> None:
    stream = [*_changed("um"), ev(3, U, 0x80_0000, P)]
    found = check_stream(stream, segments=[in_place_change(stream[1:], [(0x20_0000, 0x20_0000)])])
    assert [(v.rule, v.event) for v in found] == [("unchanged_translation_silent", stream[3])]


@pytest.mark.parametrize(
    ("flags", "op", "bad"),
    [
        (NotifierFlag.UNMAP, M, True),
        (NotifierFlag.UNMAP, U, False),
        (NotifierFlag.DEVIOTLB_UNMAP, M, True),
        (NotifierFlag.DEVIOTLB_UNMAP, U, False),
        (NotifierFlag.MAP, U, True),
        (NotifierFlag.IOTLB_EVENTS, M, False),
    ],
)
def test_notifier_flags_rule(flags: NotifierFlag, op: DmaOp, bad: bool) -> None:
    stream = [ev(0, op, 0, P)]
    found = check_stream(stream, notifier_flags={"d0": flags, "other": NotifierFlag.UNMAP})
    assert names(found) == ({"notifier_flags"} if bad else set())


def test_pasid_invalidation_reaches_only_its_own_pasid_space() -> None:
    """notifier_hears_own_pasid_only: after an invalidation of PASID 1, traffic on the
    notifier of PASID 1's address space is fine, traffic on RID_PASID's (0) is not; a device
    the segment does not name is not judged."""
    ours = [ev(0, M, 0, P, dev="p1"), ev(1, U, 0, P, dev="p1")]
    spaces = {"d0": 0, "p1": 1}
    accepted = check_stream(ours, segments=[pasid_invalidation(ours, 1, spaces)])
    assert "notifier_hears_own_pasid_only" not in names(accepted)
    leaked = [ev(0, M, 0, P, dev="d0"), ev(1, M, P, P, dev="p1")]
    found = check_stream(leaked, segments=[pasid_invalidation(leaked, 1, spaces, label="psi")])
    assert [(v.rule, v.event) for v in found] == [("notifier_hears_own_pasid_only", leaked[0])]
    assert "PASID 0 address space" in found[0].message
    assert "'psi'" in found[0].message
    # the same traffic after an invalidation of PASID 0 is d0's own
    assert check_stream(leaked, segments=[pasid_invalidation(leaked, 0, {"d0": 0})]) == []
    # and an UNMAP counts as much as a MAP
    unmap = [ev(0, M, 0, P, dev="d0"), ev(1, U, 0, P, dev="d0")]
    found = check_stream(unmap, segments=[pasid_invalidation(unmap[1:], 2, {"d0": 0})])
    assert [(v.rule, v.event) for v in found] == [("notifier_hears_own_pasid_only", unmap[1])]


def test_window_selects_by_arrival_time() -> None:
    stream = [ev(i, M, i * P, P) for i in range(5)]  # times 0.0, 0.1, ...
    assert window(stream, 0.1, 0.3) == tuple(stream[1:3])


def test_violations_come_in_stream_order() -> None:
    stream = [*BASE, ev(2, M, 0x10_0000, P, err=errno.EEXIST), ev(3, M, IR, P)]
    found = check_stream(stream, segments=[noop_invalidation(stream)])
    positions = [stream.index(v.event) for v in found if v.event is not None]
    assert positions == sorted(positions)
    assert "guards:" in found[0].describe()


# --- generated: good streams pass, mutated streams fail with the right rule ---------------------


@dataclass
class Stream:
    events: list[DmaEvent]
    aw_bits: int


@st.composite
def good_streams(draw: st.DrawFn) -> Stream:
    """Type1-valid, in-range traffic on one or two devices, as a correct QEMU would send."""
    aw_bits = draw(st.sampled_from([39, 48]))
    devices = draw(st.sampled_from([("d0",), ("d0", "d1")]))
    bases = [0, 0xFEF0_0000, (1 << aw_bits) - 64 * P]
    hosts = {d: HostReplay() for d in devices}
    seqs = dict.fromkeys(devices, 0)
    events: list[DmaEvent] = []
    for _ in range(draw(st.integers(0, 30))):
        dev = draw(st.sampled_from(devices))
        host = hosts[dev]
        op = draw(st.sampled_from([M, M, M, U, U, ALL]) if events else st.just(M))
        if op is U and host.live and draw(st.booleans()):
            # unmap whole mappings, maybe with slack around them
            first = draw(st.sampled_from(host.live))
            last = draw(st.sampled_from([m for m in host.live if m.iova >= first.iova]))
            iova = first.iova - draw(st.integers(0, 2)) * P
            end = last.end + draw(st.integers(0, 2)) * P
        else:
            iova = draw(st.sampled_from(bases)) + draw(st.integers(0, 60)) * P
            end = iova + draw(st.integers(1, 4)) * P
        iova, end = max(iova, 0), min(end, 1 << aw_bits)
        gpa = draw(st.integers(0, 1 << 16)) * P
        size = 0 if op is ALL else end - iova
        cand = DmaEvent(
            seqs[dev],
            len(events) * 0.01,
            dev,
            op,
            0 if op is ALL else iova,
            size,
            gpa if op is M else None,
            read=op is M,
            write=op is M,
        )
        if host.judge(cand)[0] or (iova < 0xFEF0_0000 and end > IR):
            continue
        host.apply(cand)
        events.append(cand)
        seqs[dev] += 1
    return Stream(events, aw_bits)


def _state_before(stream: Stream, at: int, device: str) -> HostReplay:
    host = HostReplay()
    for e in stream.events[:at]:
        if e.device == device:
            host.apply(e)
    return host


def _insert(stream: Stream, at: int, new: DmaEvent) -> list[DmaEvent]:
    return [*stream.events[:at], new, *stream.events[at:]]


def _extra(dev: str, op: DmaOp, iova: int, size: int, err: int = 0) -> DmaEvent:
    gpa = 0x1234_5000 if op is M else None
    return DmaEvent(90_000, 99.0, dev, op, iova, size, gpa, read=op is M, write=op is M, errno=err)


FAST = settings(max_examples=30, deadline=None)


@FAST
@given(good_streams())
def test_good_streams_are_accepted(stream: Stream) -> None:
    maps_only = [e for e in stream.events if e.op is M]
    segments = [replay(maps_only), noop_invalidation([])]
    assert check_stream(stream.events, aw_bits=stream.aw_bits, segments=segments) == []


@FAST
@given(good_streams(), st.data())
def test_overlapping_map_is_named_disjoint(stream: Stream, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(stream.events)))
    host = _state_before(stream, at, "d0")
    assume(host.live)
    m = data.draw(st.sampled_from(host.live))
    iova = m.iova + data.draw(st.integers(0, m.size // P - 1)) * P
    size = min(data.draw(st.integers(1, 3)) * P, (1 << stream.aw_bits) - iova)
    bad = _insert(stream, at, _extra("d0", M, iova, size, errno.EEXIST))
    assert names(check_stream(bad, aw_bits=stream.aw_bits)) == {"type1_disjoint_maps"}


@FAST
@given(good_streams(), st.data())
def test_bisecting_unmap_is_named(stream: Stream, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(stream.events)))
    host = _state_before(stream, at, "d0")
    wide = [m for m in host.live if m.size > P]
    assume(wide)
    m = data.draw(st.sampled_from(wide))
    cut = data.draw(st.integers(1, m.size // P - 1)) * P
    iova, size = (m.iova, cut) if data.draw(st.booleans()) else (m.iova + cut, m.size - cut)
    bad = _insert(stream, at, _extra("d0", U, iova, size, errno.EINVAL))
    assert names(check_stream(bad, aw_bits=stream.aw_bits)) == {"type1_no_bisecting_unmap"}


@FAST
@given(good_streams(), st.data())
def test_malformed_request_is_named(stream: Stream, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(stream.events)))
    iova, size = data.draw(st.sampled_from([(0x800, P), (0x2000, 0x800), (0x2000, 0)]))
    bad = _insert(
        stream, at, _extra("d0", data.draw(st.sampled_from([M, U])), iova, size, errno.EINVAL)
    )
    assert names(check_stream(bad, aw_bits=stream.aw_bits)) == {"type1_well_formed"}


@FAST
@given(good_streams(), st.data())
def test_wrong_host_verdict_is_named(stream: Stream, data: st.DataObject) -> None:
    maps = [i for i, e in enumerate(stream.events) if e.op is M]
    assume(maps)
    i = data.draw(st.sampled_from(maps))
    bad = list(stream.events)
    bad[i] = replace(bad[i], errno=errno.EEXIST)
    assert names(check_stream(bad, aw_bits=stream.aw_bits)) == {"host_verdict_matches_type1"}


@FAST
@given(good_streams(), st.data())
def test_out_of_range_event_is_named(stream: Stream, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(stream.events)))
    top = 1 << stream.aw_bits
    iova, size, op = data.draw(
        st.sampled_from(
            [(IR, P, M), (IR + 0xF_F000, P, U), (IR - P, 2 * P, U), (top, P, U), (top, 16 * P, U)]
        )
    )
    bad = _insert(stream, at, _extra("d0", op, iova, size))
    assert names(check_stream(bad, aw_bits=stream.aw_bits)) == {"notifier_range"}


@FAST
@given(good_streams(), st.data())
def test_replay_window_with_unmap_is_named(stream: Stream, data: st.DataObject) -> None:
    n = len(stream.events)
    start = data.draw(st.integers(0, n))
    end = data.draw(st.integers(start, n))
    part = stream.events[start:end]
    found = check_stream(stream.events, aw_bits=stream.aw_bits, segments=[replay(part, "d0")])
    bad = any(e.op is not M or e.device != "d0" for e in part)
    assert names(found) == ({"replay_map_only"} if bad else set())


@FAST
@given(good_streams(), st.data())
def test_traffic_after_noop_invalidation_is_named(stream: Stream, data: st.DataObject) -> None:
    n = len(stream.events)
    start = data.draw(st.integers(0, n))
    part = stream.events[start : data.draw(st.integers(start, n))]
    found = check_stream(stream.events, aw_bits=stream.aw_bits, segments=[noop_invalidation(part)])
    assert names(found) == ({"unchanged_translation_silent"} if part else set())
    assert len(found) == len(part)


@FAST
@given(good_streams(), st.data())
def test_in_place_change_order_is_named(stream: Stream, data: st.DataObject) -> None:
    host = _state_before(stream, len(stream.events), "d0")
    assume(host.live)
    m = data.draw(st.sampled_from(host.live))
    unmap = _extra("d0", U, m.iova, m.size)
    remap = replace(_extra("d0", M, m.iova, m.size), seq=90_001)
    rng = [(m.iova, m.size)]
    good = [*stream.events, unmap, remap]
    segs = [in_place_change([unmap, remap], rng, "d0")]
    assert check_stream(good, aw_bits=stream.aw_bits, segments=segs) == []
    swapped = [*stream.events, replace(remap, errno=errno.EEXIST), unmap]
    segs = [in_place_change(swapped[-2:], rng, "d0")]
    found = names(check_stream(swapped, aw_bits=stream.aw_bits, segments=segs))
    assert found == {"changed_translation_unmap_first", "type1_disjoint_maps"}
    silent = names(
        check_stream(
            stream.events, aw_bits=stream.aw_bits, segments=[in_place_change([], rng, "d0")]
        )
    )
    assert silent == {"changed_translation_unmap_first"}


@FAST
@given(good_streams(), st.sampled_from([NotifierFlag.UNMAP, NotifierFlag.DEVIOTLB_UNMAP]))
def test_map_to_unmap_only_notifier_is_named(stream: Stream, flags: NotifierFlag) -> None:
    found = check_stream(stream.events, aw_bits=stream.aw_bits, notifier_flags={"d0": flags})
    got_map = any(e.op is M and e.device == "d0" for e in stream.events)
    assert names(found) == ({"notifier_flags"} if got_map else set())


# --- the judgement cache: the same judgements as a replay from scratch -------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([M, M, U, ALL]),
            st.sampled_from(["d0", "d1"]),
            st.integers(0, 31),
            st.integers(0, 6),
            st.sampled_from([0, 0, 0, errno.EEXIST, errno.EINVAL]),
        ),
        max_size=30,
    ),
    st.lists(
        st.tuples(st.sampled_from(["grow", "cut", "fork", "same"]), st.integers(0, 30)),
        max_size=12,
    ),
)
def test_judgement_cache_equals_judging_from_scratch(
    ops: list[tuple[DmaOp, str, int, int, int]], moves: list[tuple[str, int]]
) -> None:
    """JudgementCache (every check_stream's type1 judgements) answers as judge_stream does
    for streams, good and bad, that grow, are cut back, fork from a prefix or repeat; and
    check_stream finds the same violations with the shared cache on and off."""
    full = tuple(ev(i, op, p * P, n * P, dev=d, err=e) for i, (op, d, p, n, e) in enumerate(ops))
    other = tuple(ev(e.seq, e.op, e.iova + P, e.size, dev=e.device) for e in full)
    cache = JudgementCache(size=3)
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
        assert cache.judge(stream) == tuple(judge_stream(stream)[0])
        with_cache = check_stream(stream)
        JUDGEMENTS.enabled = False
        try:
            assert check_stream(stream) == with_cache
        finally:
            JUDGEMENTS.enabled = True
